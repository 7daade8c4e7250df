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
        try:
            with self.output:
                self._run(self)
        except UserError as err:
            self.show_error(str(err))
        except Exception as err:  # unexpected: say so, keep the traceback at hand
            self.show_error(f"unexpected error: {type(err).__name__}: {err}")
            with self.output:
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


def encode_panel(model: str, prompts: list[str], max_sequence_length: int, out_name: str,
                 overwrite: bool = True, max_memory=None) -> Panel:
    """Prompt box (one prompt per line), max_sequence_length, file name, and an Encode button.

    Encode calls :func:`helpers.encode.encode_prompts` and shows where the file went.
    """
    from IPython.display import display

    from helpers.budget import format_bytes
    from helpers.encode import embeddings_path, encode_prompts
    from helpers.report import Table

    prompt_box = w.Textarea(value="\n".join(prompts), description="Prompts", placeholder="one prompt per line",
                            layout=w.Layout(width="95%", height="6em"))
    length = w.BoundedIntText(value=max_sequence_length, min=1, max=512, description="Max tokens")
    name = w.Text(value=out_name, description="File name")
    replace = w.Checkbox(value=overwrite, description="replace a file of the same name")

    def run(panel: Panel) -> None:
        lines = [line.strip() for line in prompt_box.value.splitlines() if line.strip()]
        if not name.value.strip():
            from helpers.errors import UserError

            raise UserError("the file name is empty; give the embeddings a name.")
        panel.status.value = f"encoding {len(lines)} prompt(s)..."
        result = encode_prompts(model, lines or [""], embeddings_path(name.value.strip()), max_memory=max_memory,
                                max_sequence_length=int(length.value), overwrite=replace.value)
        m = result.measurement
        panel.status.value = f"done in {m.wall_s:.1f} s"
        display(_message(f"saved {result.path}\n{len(lines)} prompt(s), {result.shapes['prompt_embeds']}, "
                         f"peak RSS {format_bytes(m.peak_rss)}"))
        for warning in result.warnings:
            display(_message(f"warning: {warning}", "#a60"))
        display(Table(result.per_tier(), title="per tier"))

    return Panel([prompt_box, w.HBox([length, name]), replace], "Encode", run)
