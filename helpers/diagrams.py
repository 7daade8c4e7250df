"""The pictures that explain the method: its stages as boxes and arrows, and memory over a run.

:func:`draw_stages` draws the pipeline cut in two: the text encoders (stage 1) write a small file of
embeddings, and the transformer and the VAE (stage 2) read it in a fresh process.
:func:`draw_memory_over_time` shows what that buys: the one-piece pipeline holds every component at
once, the decoupled stages hold one stage at a time, so the peak is the larger stage, not the sum.

Every size drawn is read from the model's weightless skeletons (:mod:`helpers.footprint`), in the
dtype the method gives each stage (:func:`helpers.precision.method_precision`: float32 for the text
encoders, bfloat16 for the transformer and the VAE), and the budget is the method's
(:data:`helpers.budget.METHOD_BUDGET`). Nothing is loaded. Drawn in ``00_environment-check.ipynb``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helpers.activations import Workload
from helpers.budget import METHOD_BUDGET, parse_budget
from helpers.report import format_bytes
from helpers.devicemap import tier_label
from helpers.families import STAGES, Family
from helpers.footprint import Footprint, footprint
from helpers.precision import method_precision

STAGE_TITLES = {"text_encoding": "stage 1: text encoding", "diffusion": "stage 2: diffusion"}
FILE_COLOUR = "#2ca02c"


@dataclass(frozen=True)
class StageBytes:
    """One stage of the method as the pictures draw it: its components' bytes in the stage's dtype."""

    name: str
    dtype: torch.dtype
    #: component -> bytes, in the order the stage loads them
    components: dict[str, int]

    @property
    def total(self) -> int:
        """The stage's peak of weights: every component it loads, held at once."""
        return sum(self.components.values())

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@dataclass(frozen=True)
class MethodBytes:
    """The numbers both pictures draw, read once from a footprint."""

    model: str
    stages: dict[str, StageBytes]
    #: the hand-off file's tensors: name -> (shape, bytes), stored in bfloat16
    embeddings: dict[str, tuple[tuple[int, ...], int]]
    #: the text tokens per prompt of the split encoder (FLUX.1: T5), and of each text model loaded whole
    tokens: int
    whole_tokens: dict[str, int]
    image: tuple[int, int]
    family: Family

    def name(self, component: str) -> str:
        """What the pictures call a component (its family's long name)."""
        return self.family.component(component).long

    def short(self, component: str) -> str:
        return self.family.component(component).short

    def colour(self, component: str) -> str:
        """The component's colour, as the footprint chart of notebook 01 gives it."""
        return self.family.component(component).colour

    @property
    def one_piece(self) -> int:
        """The one-piece pipeline's peak: every component loaded at once."""
        return sum(stage.total for stage in self.stages.values())

    @property
    def decoupled(self) -> int:
        """The decoupled stages' peak: the larger stage."""
        return max(stage.total for stage in self.stages.values())

    @property
    def largest_stage(self) -> StageBytes:
        return max(self.stages.values(), key=lambda stage: stage.total)

    @property
    def file_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.embeddings.values())


def method_bytes(model: str | Footprint = "flux-dev") -> MethodBytes:
    """The sizes the pictures draw for ``model`` (a name, or a :class:`~helpers.footprint.Footprint`
    already built): each stage's components in the method's dtype for it, the embeddings file for one
    prompt at the variant's usual T5 length, the method's image size. Drawn in
    ``00_environment-check.ipynb``."""
    from helpers.embeddings import STORED_DTYPE
    from helpers.models import resolve_model

    fp = model if isinstance(model, Footprint) else footprint(model)
    family, stages = fp.family, {}
    for name in STAGES:
        dtype = method_precision(name, family).storage_dtype
        # a stage's weights as they load, one after another, in the pipeline's order
        stages[name] = StageBytes(name, dtype, {c: fp.components[c].nbytes(dtype) for c in family.stage_models(name)})
    tokens = resolve_model(fp.model).usual.text_length
    configs = {c: module.config for c, module in fp.skeletons.items()}
    embeddings = {k: (shape, _numel(shape) * STORED_DTYPE.itemsize)
                  for k, shape in family.embedding_shapes(configs, 1, tokens).items()}
    whole_tokens = {c: fp.skeletons[c].config.max_position_embeddings for c in family.whole("text_encoding")}
    workload = Workload()
    return MethodBytes(fp.model, stages, embeddings, tokens, whole_tokens, (workload.height, workload.width), family)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# --------------------------------------------------------------------------- the stages


class _Canvas:
    """An axes of 100 x 50 units to draw boxes, text and arrows in, with the text sized to its width:
    full size from :data:`FULL_WIDTH` inches up, smaller (down to 70%) on narrower axes."""

    def __init__(self, ax) -> None:
        self.ax = ax
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 50)
        ax.set_axis_off()
        width = ax.get_window_extent().width / ax.figure.dpi
        self.scale = min(1.0, max(0.7, width / FULL_WIDTH))

    def box(self, x: float, y: float, width: float, height: float, colour: str, fill: float = 0.18,
            dashed: bool = False) -> None:
        from matplotlib.colors import to_rgba
        from matplotlib.patches import FancyBboxPatch

        self.ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="round,pad=0,rounding_size=1.2",
                                         facecolor=to_rgba(colour, fill), edgecolor=colour, linewidth=1.6,
                                         linestyle="--" if dashed else "-"))

    def text(self, x: float, y: float, text: str, size: float = 10, **style) -> None:
        self.ax.text(x, y, text, ha=style.pop("ha", "center"), va="center", fontsize=size * self.scale, **style)

    def arrow(self, start: tuple[float, float], end: tuple[float, float], label: str = "") -> None:
        self.ax.annotate("", xy=end, xytext=start,
                         arrowprops={"arrowstyle": "-|>", "color": "#333", "linewidth": 1.6, "mutation_scale": 14})
        if label:
            self.text((start[0] + end[0]) / 2 + 1, (start[1] + end[1]) / 2, label, 9, ha="left", style="italic",
                      color="#333")

    def component(self, x: float, y: float, width: float, title: str, detail: str, colour: str) -> None:
        self.box(x, y, width, 9, colour, fill=0.35)
        self.text(x + width / 2, y + 6.2, title, weight="bold")
        self.text(x + width / 2, y + 2.6, detail)


#: the width (inches) of the axes the stages are drawn for at full text size
FULL_WIDTH = 9.5


def draw_stages(model: str | Footprint = "flux-dev", ax=None):
    """The method's pipeline as boxes and arrows, with the sizes of ``model``'s components.

    Stage 1 (tokenizers, CLIP, T5: float32) writes the embeddings file (``prompt_embeds`` and
    ``pooled_prompt_embeds`` in bfloat16, a few MiB), the one hand-off; stage 2 (transformer, then
    VAE on the latents: bfloat16) turns it into an image. Each stage is labelled with its peak,
    every byte it loads. ``model``: a name or a built footprint; ``ax``: where to draw (without one,
    a new figure 10 inches wide; on axes narrower than 9.5 inches the text is smaller). Returns the
    axes. Drawn in ``00_environment-check.ipynb``.
    """
    import matplotlib.pyplot as plt

    sizes = method_bytes(model)
    if ax is None:
        figure, ax = plt.subplots(figsize=(10, 4.6))
        figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92)
    text, diffusion = sizes.stages["text_encoding"], sizes.stages["diffusion"]
    canvas = _Canvas(ax)

    # stage 1: a box around the tokenizers and the two encoders
    canvas.box(0.5, 1, 30, 46, "#555555", fill=0.05)
    canvas.text(15.5, 44, STAGE_TITLES["text_encoding"], 11, weight="bold")
    canvas.text(15.5, 40.2, f"{text.dtype_name}, peak {format_bytes(text.total)}")
    canvas.box(3, 26, 25, 9, "#7f7f7f", fill=0.12, dashed=True)
    canvas.text(15.5, 32.2, "tokenizers", weight="bold")
    counts = [f"{sizes.short(c)} {n}" for c, n in sizes.whole_tokens.items()]
    main = sizes.family.main("text_encoding")
    canvas.text(15.5, 28.6, ", ".join([*counts, f"{sizes.short(main)} {sizes.tokens}"]) + " tokens")
    for y, name in zip((14.5, 3), text.components):
        canvas.component(3, y, 25, sizes.name(name), format_bytes(text.components[name]), sizes.colour(name))

    # the hand-off: a file on disk, the one thing the stages share
    canvas.box(35, 12, 27, 26, FILE_COLOUR, fill=0.15)
    canvas.text(48.5, 34.5, "embeddings file", 11, weight="bold")
    canvas.text(48.5, 31, f"safetensors, bfloat16, {format_bytes(sizes.file_bytes)}")
    row = 26
    for name, (shape, _) in sizes.embeddings.items():
        canvas.text(48.5, row, name, 9.5, family="monospace")
        canvas.text(48.5, row - 3, _shape_text(shape), 9.5, family="monospace")
        row -= 7.5
    canvas.text(48.5, 7.5, "stage 1's process ends here:\nevery byte is returned", 9, style="italic", color="#444")
    canvas.arrow((30.5, 25), (35, 25))

    # stage 2: the transformer, then the VAE on its latents
    canvas.box(67, 1, 24, 46, "#555555", fill=0.05)
    canvas.text(79, 44, STAGE_TITLES["diffusion"], 11, weight="bold")
    canvas.text(79, 40.2, f"{diffusion.dtype_name}, peak {format_bytes(diffusion.total)}")
    for y, name in zip((26, 3), diffusion.components):
        canvas.component(69, y, 20, sizes.name(name), format_bytes(diffusion.components[name]), sizes.colour(name))
    canvas.arrow((79, 26), (79, 12), "latents")
    canvas.arrow((62, 25), (67, 25))

    # the image
    canvas.box(93, 3, 6.5, 9, "#1f77b4", fill=0.2)
    canvas.text(96.25, 7.5, f"image\n{sizes.image[0]}\nx {sizes.image[1]}", 9)
    canvas.arrow((91, 7.5), (93, 7.5))
    ax.set_title(f"{sizes.model}: the method in two stages; peak = the bytes a stage loads",
                 fontsize=12 * canvas.scale)
    return ax


# --------------------------------------------------------------------------- memory over a run


#: a run as (time, bytes held from then on), one pair per change
_Steps = list[tuple[float, int]]


def _timelines(sizes: MethodBytes) -> tuple[_Steps, _Steps, dict[str, tuple[float, float]]]:
    """The two runs as (time, bytes held from then on) steps, and each stage's span of time.

    Time is schematic: loading a component takes half a unit, encoding one unit and a half,
    denoising two, decoding one half; the one-piece run does the same work in the same spans, after
    loading everything at the start.
    """
    text, diffusion = sizes.stages["text_encoding"], sizes.stages["diffusion"]
    decoupled, held, t = [(0.0, 0)], 0, 0.0
    for nbytes in text.components.values():
        held += nbytes
        decoupled.append((t, held))
        t += 0.5
    t += 1.5  # encoding
    decoupled.append((t, sizes.file_bytes))  # the encoders freed; the file written
    stage_1 = (0.0, t)
    t += 0.5
    start_2, held = t, 0
    for nbytes in diffusion.components.values():
        held += nbytes
        decoupled.append((t, held))
        t += 0.5
    t += 2.5  # denoising, then decoding
    decoupled.append((t, 0))
    one_piece, held = [(0.0, 0)], 0
    loads = [*text.components.values(), *diffusion.components.values()]
    for k, nbytes in enumerate(loads):
        held += nbytes
        one_piece.append((k * 0.25, held))
    one_piece.append((t, 0))
    return one_piece, decoupled, {"text_encoding": stage_1, "diffusion": (start_2, t)}


def draw_memory_over_time(model: str | Footprint = "flux-dev", ax=None, budget=METHOD_BUDGET):
    """Weights held over one run, as steps: the one-piece pipeline (every component loaded at once:
    the peak is the sum) against the decoupled stages (stage 1 loads the text encoders in float32,
    frees them and writes the small embeddings file; stage 2 loads the transformer and the VAE in
    bfloat16: the peak is the larger stage). Both peaks are annotated, and ``budget`` (the method's
    8.5 GiB of GPU and 30 GiB of RAM; shares are of the one-piece total; ``None`` leaves it out) is
    drawn as a line at its total. Time is schematic. ``model``: a name or a built footprint; ``ax``:
    where to draw (without one, a new figure 10 inches wide). Returns the axes. Drawn in
    ``00_environment-check.ipynb``.
    """
    import matplotlib.pyplot as plt

    sizes = method_bytes(model)
    if ax is None:
        figure, ax = plt.subplots(figsize=(10, 5.4))
        figure.subplots_adjust(left=0.07, right=0.98, bottom=0.2, top=0.93)  # room for the legend below
    limit = parse_budget(budget, model_bytes=sizes.one_piece) if budget is not None else None
    top = max(sizes.one_piece, limit.total if limit else 0)
    unit, scale = ("GiB", 2**30) if top >= 2**30 else ("MiB", 2**20)
    one_piece, decoupled, spans = _timelines(sizes)
    text, diffusion = sizes.stages["text_encoding"], sizes.stages["diffusion"]
    dtypes = f"{text.dtype_name} text encoders, {diffusion.dtype_name} transformer and VAE"

    for name, (start, end) in spans.items():
        ax.axvspan(start, end, color="#1f77b4", alpha=0.06 if name == "text_encoding" else 0.12, linewidth=0)
        stage = sizes.stages[name]
        parts = " + ".join(sizes.short(c) for c in stage.components)
        # between the stage's last load and its end, clear of every line: under its level where there
        # is room (a quarter of the height), else above the level and its label
        loaded = start + 0.5 * len(stage.components)
        y = stage.total * 0.45 if stage.total > 0.25 * top else stage.total + 0.16 * top
        ax.text((loaded + end) / 2, y / scale, f"{STAGE_TITLES[name]}\n{parts}, {stage.dtype_name}",
                ha="center", va="center", fontsize=9.5, color="#1f4e79")
    xs, ys = zip(*one_piece)
    ax.step(xs, [y / scale for y in ys], where="post", color="#d62728", linewidth=2.2, linestyle="--",
            label="one piece: every component loaded at once, each in its stage's dtype")
    xs, ys = zip(*decoupled)
    ax.step(xs, [y / scale for y in ys], where="post", color="#1f77b4", linewidth=2.6,
            label=f"decoupled: one stage at a time ({dtypes})")

    end = one_piece[-1][0]
    over = sizes.one_piece - limit.total if limit is not None else 0
    beyond = f", {format_bytes(over)} over the budget" if over > 0 else ""
    ax.annotate(f"one-piece peak: {format_bytes(sizes.one_piece)} (the sum){beyond}",
                xy=(end * 0.5, sizes.one_piece / scale), xytext=(0, 6), textcoords="offset points",
                ha="center", va="bottom", fontsize=10, color="#d62728", weight="bold")
    largest = sizes.largest_stage
    for stage in sizes.stages.values():
        start, stop = spans[stage.name]
        peak = stage is largest
        label = (f"decoupled peak: {format_bytes(stage.total)}\n(the larger stage)" if peak
                 else f"{format_bytes(stage.total)}")
        under = stage.total > 0.85 * sizes.one_piece  # near the one-piece line: below its own
        ax.annotate(label, xy=((start + stop) / 2, stage.total / scale), xytext=(0, -5 if under else 5),
                    textcoords="offset points", ha="center", va="top" if under else "bottom",
                    fontsize=10 if peak else 9.5, color="#1f77b4", weight="bold" if peak else "normal")
    file_at = spans["text_encoding"][1]
    ax.annotate(f"embeddings file: {format_bytes(sizes.file_bytes)}", xy=(file_at + 0.25, sizes.file_bytes / scale),
                xytext=(file_at + 0.25, top * 0.55 / scale), ha="center", va="bottom", fontsize=9, color=FILE_COLOUR,
                arrowprops={"arrowstyle": "->", "color": FILE_COLOUR})
    if limit is not None:
        tiers = " + ".join(f"{tier_label(t)} {format_bytes(b)}" for t, b in limit.tiers)
        ax.axhline(limit.total / scale, color="black", linewidth=1.3, linestyle=":")
        # under the line, after the one-piece run's loads
        ax.text(one_piece[-2][0] + 0.1, limit.total / scale, f"budget: {tiers} = {format_bytes(limit.total)}",
                ha="left", va="top", fontsize=9.5)
    ax.set_xlim(0, end + 0.2)
    ax.set_ylim(0, top * 1.25 / scale)
    ax.set_xticks([])
    ax.set_xlabel("time (schematic)", fontsize=10)
    ax.set_ylabel(f"weights held ({unit})", fontsize=10)
    ax.set_title(f"{sizes.model}: memory over one run, one piece against decoupled stages", fontsize=12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=9, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return ax

