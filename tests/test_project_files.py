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


def _code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a markdown text, in order."""
    return text.split("```")[1::2]


def test_readme_opens_with_the_learners_quick_start_then_the_two_commands_and_ci_calls_the_full_suite():
    readme = (ROOT / "README.md").read_text()
    make_blocks = [b for b in _code_blocks(readme) if re.search(r"^make ", b, re.M)]
    assert make_blocks, "the README shows its make commands in code blocks"
    first = make_blocks[0]
    assert "make install" in first and "make lab" in first, "the learner's quick start comes first"
    assert "make run" not in first and "make test" not in first
    assert any("make run" in b and "make test" in b for b in make_blocks[1:]), "then the two commands"
    assert "make test-all" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test-all$", ci, re.M) and re.search(r"^make test-browser$", ci, re.M)  # the full suite


def test_readme_is_the_door_not_the_reference():
    words = len((ROOT / "README.md").read_text().split())
    assert words <= 1600, f"README.md has {words} words; the reference belongs in docs/"


def test_readme_names_its_source():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "Lower Compute Costs for AI Model Inference: Decoupled Pipeline Stages" in readme
    assert "Matrico" in readme and "August 2025" in readme


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # examples in code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return _LINK.findall(text) + _HTML.findall(text)


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s), mailto: not files; an anchor of the page itself
            name, _, anchor = target.partition("#")
            where = (page.parent / name).resolve()
            label = f"{page.relative_to(ROOT)}: {target}"
            if not where.exists():
                broken.append(f"{label} (no such file)")
            elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
                broken.append(f"{label} (no such heading)")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)
