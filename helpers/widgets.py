"""Controls for the notebooks: change a knob, press a button, see the result below it.

Each control panel takes its defaults from the notebook's ``parameters`` cell and calls the same
helper the cells and the command line use. While it works the button is disabled and says so;
a mistake shows as one readable line under the button. Explained in ``02_text-encoding-offload.ipynb``.
"""

from __future__ import annotations

import html
import traceback
from collections.abc import Callable

import ipywidgets as w


def shown(path) -> str:
    """A path as a person reads it: ``outputs/embeddings/x.safetensors`` when it is under outputs/."""
    from pathlib import Path

    from helpers.files import outputs_dir

    path = Path(path)
    try:
        return str(Path("outputs") / path.resolve().relative_to(outputs_dir()))
    except ValueError:
        return str(path)


#: every control's label in one column wide enough for the longest ("Embeddings", "Transformer")
LABELS = {"description_width": "7.5em"}
#: a prompt the tiny twin can draw (its shapes world, :mod:`helpers.twins.world`), shown where a prompt is asked for
EXAMPLE_PROMPT = "a red circle on a blue background, on the left"
#: what the Weights box holds for ``weights=None`` (a dropdown cannot show ``None`` as a choice)
DEFAULT = "default"


def _message(text: str, colour: str = "#333") -> w.HTML:
    return w.HTML(f'<div style="color:{colour};white-space:pre-wrap">{html.escape(text)}</div>')


class Panel(w.VBox):
    """Inputs, one button, a status line and an output area; ``run`` does the work."""

    def __init__(self, inputs: list[w.Widget], label: str, run: Callable[["Panel"], None]) -> None:
        self.button = w.Button(description=label, button_style="primary", icon="play")
        self.status = w.HTML("")
        self.output = w.Output()
        self._run = run
        self.button.on_click(self._clicked)
        super().__init__([*inputs, w.HBox([self.button, self.status]), self.output])

    def _clicked(self, _=None) -> None:
        from helpers.errors import UserError

        label = self.button.description
        self.button.disabled = True
        self.button.description = "working..."
        self.status.value = ""
        self.output.clear_output()
        # catch inside the output context: in a kernel, Output swallows what escapes it and prints
        # a traceback instead of our one-line message
        with self.output:
            try:
                self._run(self)
            except UserError as err:
                self.show_error(str(err))
            except KeyboardInterrupt:  # the kernel was interrupted: what was half written is already gone
                self.show_error("interrupted; nothing more was saved.")
            except Exception as err:  # unexpected: say so, keep the traceback at hand
                self.show_error(f"unexpected error: {type(err).__name__}: {err}")
                print(traceback.format_exc())
            finally:
                self.button.disabled = False
                self.button.description = label

    def show_error(self, text: str) -> None:
        self.status.value = '<span style="color:#c00">failed</span>'
        with self.output:
            from IPython.display import display

            display(_message(f"error: {text}", "#c00"))

    def click(self) -> None:
        """Press the button from code (tests, scripts)."""
        self._clicked()


def _default_weights(stage: str, model: str | None = None) -> str:
    """What ``weights=None`` means for ``stage`` of ``model``: the format a converted model's folder
    records (fp8), else the method's for the stage (:func:`helpers.precision.stage_weights`)."""
    from helpers.errors import UserError
    from helpers.models import resolve_model
    from helpers.precision import folder_format, stage_weights

    family = None
    try:
        ref = resolve_model(model)
        family = ref.family  # the component whose folder says how a stage's weights are stored: its main one
        stored = folder_format(ref.path / family.main(stage)) if ref.kind == "local" else None
    except UserError:  # a model that cannot be read: the run says why, when the button is pressed
        stored = None
    return stored or stage_weights(stage, family)


def _precision_boxes(stage: str, model: str | None, weights: str | None,
                     compute: str) -> tuple[w.Dropdown, w.Dropdown]:
    """The two knobs (:mod:`helpers.precision`): how the weights are stored, the dtype of the math.
    ``weights=None`` shows as a named choice, the default it stands for (see :func:`chosen_weights`)."""
    from helpers.precision import COMPUTES, WEIGHTS, check_compute, check_weights

    if weights is not None:
        check_weights(weights)
    meant = _default_weights(stage, model)
    stored = meant == "fp8"  # only a converted folder stores other than the method's (fp8)
    label = f"as stored ({meant})" if stored else f"method's default ({meant})"
    weights_box = w.Dropdown(options=[(label, DEFAULT), *[(k, k) for k in WEIGHTS]],
                             value=DEFAULT if weights is None else weights, description="Weights", style=LABELS,
                             layout=w.Layout(width="22em"))
    compute_box = w.Dropdown(options=["auto", *COMPUTES], value=check_compute(compute), description="Math",
                             style=LABELS, layout=w.Layout(width="22em"))
    return weights_box, compute_box


def chosen_weights(box: w.Dropdown) -> str | None:
    """The weights format a Weights box asks for: ``None`` (the default) or a format's name."""
    return None if box.value == DEFAULT else box.value


def _replace_box(value: bool, what: str) -> w.Checkbox:
    return w.Checkbox(value=value, description=f"replace {what} of the same name", style=LABELS,
                      layout=w.Layout(width="auto"))


def encode_panel(model: str, prompts: list[str], max_sequence_length: int, out_name: str,
                 overwrite: bool = True, max_memory=None, weights: str | None = None,
                 compute: str = "auto") -> Panel:
    """Prompt box (one prompt per line), max_sequence_length, file name, the weights format and
    compute dtype (``auto``: float32 for the text encoders), and an Encode button.

    Encode calls :func:`helpers.encode.encode_prompts` and shows where the file went.
    """
    from IPython.display import display

    from helpers.report import format_bytes
    from helpers.encode import embeddings_path, encode_prompts
    from helpers.report import Table

    prompt_box = w.Textarea(value="\n".join(prompts), description="Prompts", style=LABELS,
                            placeholder=f"one prompt per line, e.g. {EXAMPLE_PROMPT}",
                            layout=w.Layout(width="95%", height="6em"))
    length = w.BoundedIntText(value=max_sequence_length, min=1, max=512, description="Max tokens", style=LABELS)
    name = w.Text(value=out_name, description="File name", style=LABELS, layout=w.Layout(width="26em"))
    replace = _replace_box(overwrite, "a file")
    weights_box, compute_box = _precision_boxes("text_encoding", model, weights, compute)

    def run(panel: Panel) -> None:
        from helpers.errors import UserError

        lines = [line.strip() for line in prompt_box.value.splitlines() if line.strip()]
        stem = name.value.strip().removesuffix(".safetensors")
        if not stem or stem.startswith(".") or "/" in stem or "\\" in stem:
            raise UserError("give the embeddings a plain file name (no folders, not starting with a dot).")
        panel.status.value = f"encoding {len(lines)} prompt(s)..."
        result = encode_prompts(model, lines or [""], embeddings_path(stem), max_memory=max_memory,
                                max_sequence_length=int(length.value), overwrite=replace.value,
                                weights=chosen_weights(weights_box), compute=compute_box.value)
        m = result.measurement
        panel.status.value = f"done in {m.wall_s:.1f} s ({result.plan.precision.describe()})"
        display(_message(f"saved {shown(result.path)}\n{len(lines)} prompt(s), {result.shapes['prompt_embeds']}, "
                         f"peak RSS {format_bytes(m.peak_rss)}"))
        for warning in result.warnings:
            display(_message(f"warning: {warning}", "#a60"))
        display(Table(result.per_tier(), title="per tier"))

    return Panel([prompt_box, w.HBox([length, name]), w.HBox([weights_box, compute_box]), replace], "Encode", run)


def embeddings_choices() -> list[str]:
    """The embeddings files in ``outputs/embeddings/``, newest first."""
    from helpers.files import outputs_dir

    folder = outputs_dir() / "embeddings"
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    return [p.stem for p in files if not p.name.startswith(".")]  # not the temporary files of a write


def diffuse_panel(embeddings: str, seed: int, steps: int, guidance: float, height: int, width: int,
                  overwrite: bool = True, max_memory=None, model: str | None = None, weights: str | None = None,
                  compute: str = "auto", transformer_file: str | None = None) -> Panel:
    """Embeddings file (from ``outputs/embeddings/``), seed, steps, guidance, size, the weights format
    and compute dtype (:mod:`helpers.precision`), a transformer file (a ``.gguf`` or single
    ``.safetensors`` path, empty for the model's own weights), and a Generate button.

    Generate calls :func:`helpers.diffuse.diffuse_file`, saves to ``outputs/images/`` and shows the
    images under the button.
    """
    from IPython.display import display

    from helpers.diffuse import diffuse_file, grid, image_path
    from helpers.encode import embeddings_path
    from helpers.images import enlarge

    choices = embeddings_choices()
    if embeddings not in choices:
        choices = [embeddings, *choices]
    source = w.Dropdown(options=choices, value=embeddings, description="Embeddings", style=LABELS,
                        layout=w.Layout(width="30em"))
    refresh = w.Button(icon="refresh", tooltip="list outputs/embeddings/ again", layout=w.Layout(width="3em"))

    def relist(_=None) -> None:
        current = source.value
        source.options = embeddings_choices() or [current]
        if current in source.options:
            source.value = current

    refresh.on_click(relist)
    seed_box = w.IntText(value=seed, description="Seed", style=LABELS)
    steps_box = w.BoundedIntText(value=steps, min=1, max=200, description="Steps", style=LABELS)
    guidance_box = w.BoundedFloatText(value=guidance, min=0.0, max=30.0, step=0.5, description="Guidance",
                                      style=LABELS)
    height_box = w.IntText(value=height, description="Height", style=LABELS)
    width_box = w.IntText(value=width, description="Width", style=LABELS)
    replace = _replace_box(overwrite, "an image")
    weights_box, compute_box = _precision_boxes("diffusion", model, weights, compute)
    file_box = w.Text(value=str(transformer_file or ""), description="Transformer", style=LABELS,
                      placeholder="a .gguf or .safetensors file; empty: the model's own",
                      layout=w.Layout(width="40em"))

    def run(panel: Panel) -> None:
        panel.status.value = "checking, then loading and denoising..."
        name = f"{source.value}-seed{seed_box.value}"
        result = diffuse_file(
            embeddings_path(source.value), image_path(name), model=model, steps=steps_box.value,
            seed=seed_box.value, guidance=guidance_box.value, height=height_box.value, width=width_box.value,
            max_memory=max_memory, overwrite=replace.value, weights=chosen_weights(weights_box),
            compute=compute_box.value,
            transformer_file=file_box.value.strip() or None,
        )
        panel.status.value = (f"done in {result.measurement.wall_s:.1f} s ({result.s_per_step:.2f} s per step; "
                              f"{result.plan.precision.describe()})")
        for note in result.notes:
            display(_message(f"note: {note}", "#a60"))
        for warning in result.warnings:
            display(_message(f"warning: {warning}", "#a60"))
        display(_message("saved " + ", ".join(shown(p) for p in result.paths)))
        sheet = grid(result.images)
        display(enlarge(sheet, max(1, 256 // max(sheet.height, 1))))

    inputs = [w.HBox([source, refresh]), w.HBox([seed_box, steps_box, guidance_box]),
              w.HBox([height_box, width_box]), w.HBox([weights_box, compute_box]), file_box, replace]
    return Panel(inputs, "Generate", run)
