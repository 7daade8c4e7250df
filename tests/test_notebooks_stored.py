"""Notebooks are stored clean and follow the house skeleton (nbval executes them separately)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SECTIONS = ["## Overview", "## Prerequisites", "## Setup", "## Summary", "## Exercises", "## What's next"]


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_environment-check.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs_and_in_house_style(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "flux-decoupled"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), "strip the outputs"
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert text.lstrip().startswith("# ")
    positions = [text.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), "skeleton sections in order"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    assert max(len("".join(c["source"]).splitlines()) for c in code) <= 25, "keep code cells short"


def _exercise_budgets():
    """Every budget an exercise asks the reader to set, with its notebook and what the text promises."""
    import re

    for path in NOTEBOOKS:
        if path.name[:2] not in ("02", "03", "05"):  # the notebooks that run a stage on the twin
            continue
        nb = json.loads(path.read_text())
        text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
        exercises = text[text.find("## Exercises"):text.find("## What's next")]
        for line in re.split(r"\n(?=\d+\. )", exercises):
            for spec in re.findall(r'MAX_MEMORY = "([^"]+)"', line):
                yield pytest.param(path.name, spec, "refused" in line, id=f"{path.name[:2]}-{spec}")


@pytest.mark.parametrize("name, spec, refused", list(_exercise_budgets()))
def test_exercise_budgets_do_what_the_exercise_says_on_the_tiny_twin(name, spec, refused):
    """Shares are of the stage, and the twin's CLIP and VAE are relatively bigger than the real ones."""
    from helpers.diffuse import diffusion_plan
    from helpers.encode import text_encoding_plan
    from helpers.errors import UserError

    plan = text_encoding_plan if name.startswith("02") else diffusion_plan
    if refused:
        with pytest.raises(UserError):
            plan("tiny", spec)
    else:
        plan("tiny", spec)  # plans, without "too small" or "leaves ... on disk"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_runs_top_to_bottom_twice_in_one_kernel(path):
    """Run All, then Run All again without restarting: nothing the second run needs was deleted or
    shadowed by the first (in order, so that 03, 04 and 07 find what 02 wrote)."""
    import nbformat
    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells = nb.cells + [nbformat.from_dict(dict(c)) for c in nb.cells]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"run-{i}"
    nb.metadata["kernelspec"] = {"name": NATIVE_KERNEL_NAME, "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, timeout=600, kernel_name=NATIVE_KERNEL_NAME,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # a cell that fails raises CellExecutionError, naming it


def _code_between(nb, first: str, last: str) -> list:
    """The code cells of ``nb`` from the markdown cell that starts with ``first`` up to the one with ``last``."""
    start = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and first in c.source)
    end = next(i for i, c in enumerate(nb.cells) if i > start and c.cell_type == "markdown" and last in c.source)
    return [c for c in nb.cells[start:end] if c.cell_type == "code"]


def _run_with_exercise(path: Path, *steps) -> None:
    """Run All, then each of ``steps`` (a code cell's source, or a list of the notebook's cells), in one kernel."""
    import nbformat
    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    extra = []
    for step in steps:
        extra += [nbformat.v4.new_code_cell(step)] if isinstance(step, str) else [nbformat.from_dict(dict(c)) for c in step]
    nb.cells = nb.cells + extra
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"run-{i}"
    nb.metadata["kernelspec"] = {"name": NATIVE_KERNEL_NAME, "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=600, kernel_name=NATIVE_KERNEL_NAME,
                   resources={"metadata": {"path": str(path.parent)}}).execute()


@pytest.mark.slow
def test_00_exercise_1_a_new_colour_after_run_all():
    import nbformat

    path = NOTEBOOKS[0]
    nb = nbformat.read(path, as_version=4)
    again = _code_between(nb, "## 4.", "Each notebook ends by giving memory back")  # "run sections 4 and 5 again"
    _run_with_exercise(path, 'assert "red" in PROMPT\nPROMPT = PROMPT.replace("red", "yellow")', again,
                       'assert world.detect(image).shape_colour == "yellow", world.detect(image).caption')


@pytest.mark.slow
def test_03_exercise_1_the_same_seed_the_same_pixels_after_run_all():
    import nbformat

    import os

    path = next(p for p in NOTEBOOKS if p.name.startswith("03_"))
    if not (Path(os.environ["FLUX_OUTPUTS"]) / "embeddings" / "02_prompts.safetensors").is_file():
        _run_with_exercise(next(p for p in NOTEBOOKS if p.name.startswith("02_")))  # it writes what 03 reads
    nb = nbformat.read(path, as_version=4)
    again = _code_between(nb, "## 3.", "## 5.")  # "run sections 3 and 4 again"
    keep = "import numpy as np\nfirst = [np.asarray(i) for i in images]"
    same = "assert all((np.asarray(i) == f).all() for i, f in zip(images, first))"
    free = [c for c in nb.cells if c.cell_type == "code" and "remove_folder(offload_folder)" in c.source]
    assert len(free) == 1  # each load's offloaded copies are removed, as the notebook removes its own
    _run_with_exercise(path, keep, again, same, free, "SEED += 1", again,
                       "assert not all((np.asarray(i) == f).all() for i, f in zip(images, first))", free)
