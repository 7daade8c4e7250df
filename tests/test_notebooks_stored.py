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
        if path.name[:2] not in ("02", "03", "04", "05"):  # the notebooks that run a stage on the twin
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

    plans = {"02": [text_encoding_plan], "04": [text_encoding_plan, diffusion_plan]}.get(name[:2], [diffusion_plan])
    for plan in plans:  # 04 runs both stages under the one budget
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
