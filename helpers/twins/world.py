"""The shapes world: what the tiny twin was trained to draw, rendered in code, and a detector that reads it back.

One shape (``circle``, ``square``, ``triangle``) in one named colour on a plain background of
another, optionally placed (``on the left``, ``on the right``, ``at the top``, ``at the bottom``,
``in the middle``), captioned in plain words::

    a red circle on a blue background, on the left

The colours have fixed RGB values (:data:`COLOURS`) so that anyone can check a picture. Some
(shape colour, background colour) pairs are held out of training (:data:`HELD_OUT`): prompts that
name them show whether the twin composes what it learned. :func:`detect` reads a picture back
(background, shape colour, shape, place), which is how the tests and notebook 00 check that the
words of a prompt reach the picture. Explained in ``00_environment-check.ipynb``.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass

import numpy as np

from helpers.errors import UserError

#: the world's colours, RGB
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 130, 20),
    "purple": (140, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
#: place words -> the shape's centre as fractions of (width, height)
PLACES: dict[str, tuple[float, float]] = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the middle": (0.5, 0.5),
}
#: (shape colour, background colour) pairs never shown in training
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "yellow"), ("green", "purple"), ("blue", "orange"),
    ("white", "black"), ("orange", "green"), ("purple", "white"),
)
#: the shape's half size (radius; half the side; half the triangle's base and height), of the side
SIZE = 0.22
#: how far a shape may sit from its place (fraction of the side): a named place, and none
JITTER_PLACED, JITTER_FREE = 0.03, 0.06
SIZE_JITTER = 0.02
#: every word a caption uses: the twins' vocabularies hold them whole
WORDS = tuple(dict.fromkeys(
    ["a", "an", "on", "background", "the", "at", "in", *COLOURS, *SHAPES]
    + [w for place in PLACES for w in place.split()]
))

_CAPTION = re.compile(
    r"^\s*an?\s+(?P<shape_colour>\w+)\s+(?P<shape>\w+)\s+on\s+an?\s+(?P<background>\w+)\s+background"
    r"(?:\s*,\s*(?P<place>on the left|on the right|at the top|at the bottom|in the middle))?\s*\.?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Scene:
    """One picture of the world: what its caption says."""

    shape: str
    shape_colour: str
    background: str
    place: str | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise UserError(f"unknown shape {self.shape!r}; the world has {', '.join(SHAPES)}.")
        for colour in (self.shape_colour, self.background):
            if colour not in COLOURS:
                raise UserError(f"unknown colour {colour!r}; the world has {', '.join(COLOURS)}.")
        if self.shape_colour == self.background:
            raise UserError(f"a {self.shape_colour} {self.shape} on a {self.background} background cannot be seen: "
                            "choose two different colours.")
        if self.place is not None and self.place not in PLACES:
            raise UserError(f"unknown place {self.place!r}; the places are {', '.join(PLACES)}.")

    @property
    def caption(self) -> str:
        text = f"{_article(self.shape_colour)} {self.shape_colour} {self.shape} on {_article(self.background)} " \
               f"{self.background} background"
        return f"{text}, {self.place}" if self.place else text

    @property
    def held_out(self) -> bool:
        return (self.shape_colour, self.background) in HELD_OUT


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse(caption: str) -> Scene:
    """The scene a caption of the world's grammar describes; a clear error for any other text."""
    m = _CAPTION.match(caption)
    if not m:
        raise UserError(f"{caption!r} is not a caption of the shapes world; write e.g. "
                        "'a red circle on a blue background, on the left'.")
    place = m["place"].lower() if m["place"] else None
    return Scene(m["shape"].lower(), m["shape_colour"].lower(), m["background"].lower(), place)


def scenes(held_out: bool | None = None) -> list[Scene]:
    """Every scene of the world in a fixed order; ``held_out``: only those (True) or none of them (False)."""
    out = []
    for shape, (fg, bg), place in itertools.product(
            SHAPES, itertools.permutations(COLOURS, 2), (None, *PLACES)):
        scene = Scene(shape, fg, bg, place)
        if held_out is None or scene.held_out == held_out:
            out.append(scene)
    return out


def sample_prompts(n: int, seed: int = 0, held_out: bool | None = None) -> list[str]:
    """``n`` captions drawn from the grammar without repeats (seeded)."""
    pool = scenes(held_out)
    return [s.caption for s in random.Random(seed).sample(pool, n)]


# --------------------------------------------------------------------------- drawing


def _geometry(scene: Scene, rng: random.Random | None) -> tuple[float, float, float]:
    cx, cy = PLACES[scene.place] if scene.place else PLACES["in the middle"]
    jitter = JITTER_PLACED if scene.place else JITTER_FREE
    size = SIZE
    if rng is not None:
        cx += rng.uniform(-jitter, jitter)
        cy += rng.uniform(-jitter, jitter)
        size += rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    return cx, cy, size


def coverage(shape: str, height: int, width: int, cx: float, cy: float, size: float, supersample: int = 4) -> np.ndarray:
    """How much of each pixel the shape covers, in [0, 1] (``supersample``^2 samples per pixel)."""
    s = supersample
    ys = (np.arange(height * s) + 0.5) / (height * s)
    xs = (np.arange(width * s) + 0.5) / (width * s)
    # measured in units of the shorter side, so shapes stay round on a non-square canvas
    side = min(height, width)
    y = (ys[:, None] - cy) * height / side
    x = (xs[None, :] - cx) * width / side
    if shape == "circle":
        inside = x * x + y * y <= size * size
    elif shape == "square":
        inside = (np.abs(x) <= size) & (np.abs(y) <= size)
    else:  # an upright triangle: apex at the top, base at the bottom, as wide as it is tall
        t = (y + size) / (2 * size)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(x) <= size * t)
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def render(scene: Scene, height: int = 64, width: int = 64, rng: random.Random | None = None) -> np.ndarray:
    """The picture of ``scene``: ``[height, width, 3]`` uint8. ``rng`` moves and sizes the shape a little."""
    cx, cy, size = _geometry(scene, rng)
    alpha = coverage(scene.shape, height, width, cx, cy, size)[..., None]
    fg = np.array(COLOURS[scene.shape_colour], dtype=np.float64)
    bg = np.array(COLOURS[scene.background], dtype=np.float64)
    return np.round(alpha * fg + (1 - alpha) * bg).astype(np.uint8)


# --------------------------------------------------------------------------- reading a picture back

#: fill ratio of the shape's bounding box for each shape
FILL = {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}


@dataclass(frozen=True)
class Detection:
    background: str
    shape_colour: str | None
    shape: str | None
    place: str | None
    fill: float
    centre: tuple[float, float] | None

    @property
    def caption(self) -> str:
        """What the picture shows, in the world's words: a caption, or what part of one it could read."""
        if self.shape_colour is None:
            return f"a plain {self.background} background"
        if self.shape is None:
            return f"something {self.shape_colour} on {_article(self.background)} {self.background} background"
        return (f"{_article(self.shape_colour)} {self.shape_colour} {self.shape} on {_article(self.background)} "
                f"{self.background} background, {self.place}")

    def matches(self, scene: Scene) -> dict[str, bool]:
        """Which parts of ``scene`` the picture shows (``place`` only where the scene names one)."""
        out = {"background": self.background == scene.background,
               "shape_colour": self.shape_colour == scene.shape_colour,
               "shape": self.shape == scene.shape}
        if scene.place:
            out["place"] = self.place == scene.place
        return out


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """The index (in :data:`COLOURS` order) of the named colour nearest each RGB pixel."""
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    d = ((pixels[..., None, :].astype(np.float64) - palette) ** 2).sum(-1)
    return d.argmin(-1)


def detect(image) -> Detection:
    """What a picture shows, read as the world's grammar.

    Background: the named colour nearest most border pixels. Shape: the pixels whose nearest named
    colour is not the background's; its colour the most common among them; its kind from how much
    of its bounding box it fills (triangle 0.5, circle 0.79, square 1); its place from its centre.
    """
    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)[..., :3]
    h, w = rgb.shape[:2]
    names = list(COLOURS)
    labels = nearest_colour(rgb)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(names)).argmax())
    mask = labels != bg
    if mask.sum() < 0.005 * h * w:
        return Detection(names[bg], None, None, None, 0.0, None)
    fg = int(np.bincount(labels[mask], minlength=len(names)).argmax())
    shape_mask = labels == fg
    # the bounding box of the rows and columns the shape really occupies (a stray pixel moves none)
    rows = np.flatnonzero(shape_mask.sum(1) >= max(1, 0.02 * w))
    cols = np.flatnonzero(shape_mask.sum(0) >= max(1, 0.02 * h))
    if len(rows) == 0 or len(cols) == 0:
        return Detection(names[bg], names[fg], None, None, 0.0, None)
    box = shape_mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    fill = float(box.mean())
    shape = min(FILL, key=lambda k: abs(FILL[k] - fill))
    ys, xs = np.nonzero(shape_mask)
    centre = ((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h)
    # the triangle's centre of area sits a third of its height below its apex: compare boxes instead
    box_centre = ((cols[0] + cols[-1] + 1) / 2 / w, (rows[0] + rows[-1] + 1) / 2 / h)
    place = min(PLACES, key=lambda p: (PLACES[p][0] - box_centre[0]) ** 2 + (PLACES[p][1] - box_centre[1]) ** 2)
    return Detection(names[bg], names[fg], shape, place, fill, centre)


def score(results: list[tuple[Scene, Detection]]) -> dict[str, float]:
    """The share of pictures right in each part (``place`` over the scenes that name one)."""
    parts: dict[str, list[bool]] = {}
    for scene, detection in results:
        for part, ok in detection.matches(scene).items():
            parts.setdefault(part, []).append(ok)
    return {part: sum(v) / len(v) for part, v in parts.items()}


# --------------------------------------------------------------------------- asking a model to draw it


@dataclass(frozen=True)
class Drawn:
    scene: Scene
    seed: int
    image: object  # PIL.Image.Image
    detection: Detection


def draw(folder, prompts: list[str], seeds=(0,), height: int = 64, width: int = 64, steps: int = 4,
         guidance: float = 3.5, dtype=None) -> list[Drawn]:
    """Each prompt drawn by the one-piece pipeline of model ``folder`` (the one its ``model_index.json``
    names: FLUX.1's or FLUX.2 [klein]'s) with each seed (a CPU generator per seed, all
    prompts in one batch), and read back by :func:`detect`.

    ``dtype``: the pipeline's (default float32). The notebooks' defaults: 64x64, 4 steps, guidance 3.5
    (klein is distilled: its guidance is not used).
    """
    import importlib
    import json
    from pathlib import Path

    import torch

    parsed = [parse(p) for p in prompts]  # refused before anything loads
    name = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]  # the pipeline the folder is
    pipeline = getattr(importlib.import_module("diffusers"), name)
    pipe = pipeline.from_pretrained(folder, dtype=dtype or torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for seed in seeds:
        images = pipe(prompt=prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator("cpu").manual_seed(seed)).images
        out += [Drawn(s, seed, im, detect(im)) for s, im in zip(parsed, images)]
    return out


def contact_sheet(drawn: list[Drawn], columns: int, scale: int = 2):
    """The pictures side by side, ``columns`` per row, each ``scale`` times larger (nearest neighbour)."""
    from PIL import Image

    w, h = drawn[0].image.size
    rows = math.ceil(len(drawn) / columns)
    sheet = Image.new("RGB", (columns * w * scale, rows * h * scale), (255, 255, 255))
    for i, d in enumerate(drawn):
        sheet.paste(d.image.resize((w * scale, h * scale), Image.NEAREST), ((i % columns) * w * scale, (i // columns) * h * scale))
    return sheet
