"""The set-up files keep their promises: pinned CPU torch by default, bounded dependencies, conda env."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent


def test_dependencies_have_lower_bounds_and_a_test_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    names = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in deps}
    assert {"torch", "diffusers", "transformers", "accelerate", "safetensors", "jupyterlab", "ipywidgets",
            "matplotlib", "tqdm"} <= names
    assert all(">=" in d for d in deps), "every dependency has a lower bound"
    assert "diffusers>=0.42" in deps and "transformers>=5" in deps and "accelerate>=1.15" in deps
    assert {"pytest", "nbval", "papermill"} <= {re.split(r"[<>=]", d)[0] for d in project["optional-dependencies"]["test"]}


def test_makefile_pins_cpu_torch_by_default_and_has_the_targets():
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH \?= torch==2\.13\.0$", text, re.M)
    for target in ("install", "run", "test", "test-all", "lab"):
        assert re.search(rf"^{target}:", text, re.M), target


def test_conda_environment():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    deps = env["dependencies"]
    assert "python=3.11" in deps and any(str(d).startswith("pytorch") for d in deps)
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-e .[test]"]


def test_readme_puts_the_two_commands_first_and_ci_calls_the_test_command():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "make run" in first_block and "make test" in first_block
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test-all$", ci, re.M) and re.search(r"^make test-browser$", ci, re.M)  # the full suite
    assert "make test-all" in readme
