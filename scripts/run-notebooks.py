"""Execute notebooks in order, each on a fresh kernel, as ``make run`` does; print each one's time.

    .venv/bin/python scripts/run-notebooks.py --kernel flux-decoupled --out outputs/executed notebooks/0*.ipynb

One process for all of them: papermill is imported once (1.6 s on a 2-core machine, which a
``papermill`` command per notebook paid each time), and each notebook still runs on a kernel of its
own, started for it and shut down after it. Each executed copy is written when its notebook ends
(papermill's default rewrote it at every cell, 2-3 s a notebook with images). The executed copies go to ``--out`` (the stored notebooks
stay untouched); the first notebook that fails stops the run with status 1 and names its copy.
Parameters come from the environment the kernels inherit (``FLUX_MODEL``, ``FLUX_OUTPUTS``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--kernel", required=True, help="the Jupyter kernel to run them on")
    parser.add_argument("--out", type=Path, required=True, help="folder for the executed copies")
    parser.add_argument("--label", default="", help="said beside each notebook's name (the model, say)")
    args = parser.parse_args(argv)
    total = time.perf_counter()

    import papermill

    args.out.mkdir(parents=True, exist_ok=True)
    for notebook in args.notebooks:
        copy = args.out / notebook.name
        print(f"== {notebook.name}{f' ({args.label})' if args.label else ''}", flush=True)
        start = time.perf_counter()
        try:
            # the copy is written once, when the notebook ends or fails (not after every cell: 2-3 s a notebook)
            papermill.execute_notebook(str(notebook), str(copy), kernel_name=args.kernel, cwd=str(notebook.parent),
                                       request_save_on_cell_execute=False)
        except Exception as err:  # noqa: BLE001 - a cell's error, or a kernel that died: the copy says which
            print(f"FAILED: {notebook.name}; the executed copy with the error is {copy}\n{type(err).__name__}: "
                  f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}", file=sys.stderr)
            return 1
        print(f"{notebook.name}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"all notebooks: {time.perf_counter() - total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
