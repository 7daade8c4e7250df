"""The trained twins' gallery: the tests' 24 prompts x 3 seeds and 12 held-out prompts, drawn and read back.

    .venv/bin/python scripts/gallery.py        # writes docs/gallery/ (PNG sheets and README.md)

Uses the shipped trained weights (it builds the twins if needed) at the notebooks' defaults: ``tiny``
(FLUX.1) at 64x64, 4 steps, guidance 3.5, bfloat16, T5 padded to 512 tokens; ``klein-tiny`` (FLUX.2
[klein]) the same without guidance (it is distilled), Qwen3's text path padded to 512 tokens. The tables
are the detector's reading of each picture.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from helpers.twins import world
from helpers.twins.builder import build_twin

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "gallery"
SEEDS = (0, 1, 2)


def section(title: str, name: str, drawn: list[world.Drawn], prompts: list[str]) -> list[str]:
    sheet = world.contact_sheet(drawn, columns=len(prompts), scale=2)
    sheet.save(OUT / f"{name}.png")
    scores = world.score([(d.scene, d.detection) for d in drawn])
    lines = [f"## {title}", "", f"![{title}]({name}.png)", "",
             f"Columns: the prompts below, left to right; rows: seeds {', '.join(map(str, SEEDS))}.", "",
             "| part | right |", "|---|---|"]
    lines += [f"| {part} | {value:.0%} |" for part, value in scores.items()]
    lines += ["", "| # | prompt | read back (seed 0) |", "|---|---|---|"]
    for i, d in enumerate(drawn[:len(prompts)]):
        got = d.detection
        ok = all(got.matches(d.scene).values())
        lines.append(f"| {i + 1} | {d.scene.caption} | {got.shape_colour} {got.shape} on {got.background}"
                     f"{', ' + got.place if d.scene.place else ''}{'' if ok else ' (wrong)'} |")
    return lines + [""]


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    folder = build_twin("tiny")
    start = time.perf_counter()
    prompts = world.sample_prompts(24, seed=1)
    held = world.sample_prompts(12, seed=2, held_out=True)
    lines = ["# What the trained twins draw", "",
             "Made by `scripts/gallery.py` with the shipped weights: the one-piece `FluxPipeline` at the notebooks' "
             "defaults (64x64, 4 steps, guidance 3.5, bfloat16), each picture enlarged 2x. The detector "
             "(`helpers.twins.world.detect`) reads each picture back: the background's colour from the border, the shape's colour from the pixels that "
             "differ, the shape from how much of its bounding box it fills, the place from its centre. The same "
             "prompts and bars are in `tests/test_world.py` (FLUX.1) and `tests/test_klein_twin.py` (klein).", ""]
    drawn = world.draw(folder, prompts, SEEDS, dtype=torch.bfloat16)
    lines += section("tiny (FLUX.1): 24 prompts of the grammar", "prompts", drawn, prompts)
    lines += section("tiny (FLUX.1): 12 prompts with held-out colour pairs (never seen in training)", "held-out",
                     world.draw(folder, held, SEEDS, dtype=torch.bfloat16), held)
    klein = build_twin("klein-tiny")
    lines += ["The same prompts drawn by `klein-tiny` (FLUX.2 [klein]: `Flux2KleinPipeline`, 4 steps without "
              "guidance).", ""]
    lines += section("klein-tiny (FLUX.2 [klein]): 24 prompts of the grammar", "klein-prompts",
                     world.draw(klein, prompts, SEEDS, guidance=1.0, dtype=torch.bfloat16), prompts)
    lines += section("klein-tiny (FLUX.2 [klein]): 12 prompts with held-out colour pairs", "klein-held-out",
                     world.draw(klein, held, SEEDS, guidance=1.0, dtype=torch.bfloat16), held)
    (OUT / "README.md").write_text("\n".join(lines))
    print(f"wrote {OUT.relative_to(ROOT)} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
