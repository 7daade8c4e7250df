"""The pictures of the method, as PNG files for the documentation.

    .venv/bin/python scripts/diagrams.py                 # writes docs/images/stages.png and memory-over-time.png
    .venv/bin/python scripts/diagrams.py --out FOLDER    # somewhere else

Draws :func:`helpers.diagrams.draw_stages` and :func:`helpers.diagrams.draw_memory_over_time` for
FLUX.1-dev (another model with ``--model``) from its shipped configs: no weights, no download. Fixed
sizes and no timestamp, so drawing again gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DPI = 110
#: file name -> the function of helpers.diagrams that draws it (each makes its own figure, of a fixed size)
PICTURES = {"stages.png": "draw_stages", "memory-over-time.png": "draw_memory_over_time"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for the PNG files")
    parser.add_argument("--model", default="flux-dev", help="model name (default: flux-dev)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers import diagrams
    from helpers.footprint import footprint

    fp = footprint(args.model)  # built once, drawn twice
    args.out.mkdir(parents=True, exist_ok=True)
    for name, function in PICTURES.items():
        figure = getattr(diagrams, function)(fp).figure
        path = args.out / name
        # no Software entry: the file's bytes depend on the drawing only
        figure.savefig(path, dpi=DPI, metadata={"Software": None})
        plt.close(figure)
        shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
        print(f"wrote {shown} ({path.stat().st_size // 1024} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
