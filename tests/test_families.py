"""The family seam: one object says what a model family is, and a family added alone is planned, saved
as a job and run; no module outside ``helpers/families/`` and the twins names FLUX.1's classes."""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from commands import run
from helpers.errors import UserError
from helpers.families import default_family, family_for_pipeline, register, unregister
from helpers.families import flux1
from helpers.models import resolve_model

PROMPT = "a red circle on a blue background, on the left"
HELPERS = Path(__file__).parent.parent / "helpers"


def test_a_folder_says_its_family_by_its_pipeline_class(tiny_folder, tmp_path):
    assert resolve_model(str(tiny_folder)).family is flux1.FAMILY
    assert resolve_model("flux-schnell").family is resolve_model("tiny").family is default_family()
    assert family_for_pipeline("FluxPipeline") is flux1.FAMILY
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(UserError, match="holds a StableDiffusion3Pipeline.*FluxPipeline"):
        resolve_model(str(other))


def test_flux1_says_what_each_stage_holds():
    f = flux1.FAMILY
    assert f.whole("text_encoding") == ("text_encoder",) and f.mapped("text_encoding") == ("text_encoder_2",)
    assert f.whole("diffusion") == ("vae",) and f.mapped("diffusion") == ("transformer",)
    assert f.stage_parts("text_encoding") == ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    assert f.block_lists("transformer") == ("transformer_blocks", "single_transformer_blocks")
    configs = resolve_model("flux-dev").configs
    assert f.embedding_shapes(configs, 2, 512) == {"prompt_embeds": (2, 512, 4096), "pooled_prompt_embeds": (2, 768)}
    assert (f.variant("schnell").steps, f.variant("dev").guidance) == (4, 3.5)


@pytest.fixture
def toy(tiny_folder, tmp_path):
    """A family added in a test alone: FLUX.1's classes under another pipeline name, and a folder of it."""
    family = register(dataclasses.replace(flux1.FAMILY, name="toy", title="Toy", pipeline="ToyFluxPipeline",
                                          pipeline_class_path=("diffusers", "FluxPipeline"), names={}, shipped={},
                                          reference_model=""))
    folder = tmp_path / "toy"
    shutil.copytree(tiny_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "ToyFluxPipeline"}))
    (folder / "twin.json").unlink(missing_ok=True)
    try:
        yield family, folder
    finally:
        unregister(family)


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_a_family_added_alone_is_planned_saved_as_a_job_and_run(toy, tiny_folder, tmp_path):
    family, folder = toy
    assert resolve_model(str(folder)).family is family
    emb, job1, job2, image = (tmp_path / n for n in ("e.safetensors", "encode.json", "diffuse.json", "toy.png"))
    budget = ["--max-memory", "cpu=50%,disk=100%"]
    for args in ([*budget, "--save-job", job1], ["--job", job1]):
        done = run("encode", "--model", folder, "--prompt", PROMPT, "--out", emb, *args)
        assert done.returncode == 0, done.stderr
    assert json.loads(job1.read_text())["model"]["label"] == str(folder.resolve())
    size = ["--height", "64", "--width", "64", "--steps", "3", "--seed", "5", "--compute", "fp32"]
    for args in ([*size, *budget, "--save-job", job2], ["--job", job2, "--steps", "3", "--seed", "5"]):
        done = run("diffuse", "--embeddings", emb, "--out", image, *args)
        assert done.returncode == 0, done.stderr
    # the same classes and weights as the tiny twin: the same picture, through the toy family's own path
    same_emb, same = tmp_path / "t.safetensors", tmp_path / "tiny.png"
    assert run("encode", "--model", tiny_folder, "--prompt", PROMPT, "--out", same_emb, *budget).returncode == 0
    done = run("diffuse", "--embeddings", same_emb, "--model", tiny_folder, "--out", same, *size, *budget)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.asarray(Image.open(image)), np.asarray(Image.open(same)))


def test_the_toy_family_gone_its_folder_is_refused_by_name(toy):
    family, folder = toy
    unregister(family)
    with pytest.raises(UserError, match="holds a ToyFluxPipeline"):
        resolve_model(str(folder))


# --------------------------------------------------------------------------- the seam holds

#: what only a family module (and the twins, which build a family's models) may name
FLUX1_NAMES = {c.class_name for c in flux1.COMPONENTS} | {"FluxPipeline", "CLIPTextConfig", "T5Config",
                                                           "T5Block", "CLIPEncoderLayer", "FluxTransformerBlock",
                                                           "FluxSingleTransformerBlock", "text_encoder_2",
                                                           "tokenizer_2", "pooled_prompt_embeds",
                                                           "single_transformer_blocks", "transformer_blocks", "T5DenseActDense", "T5DenseGatedActDense",
                                                           "encoder.block"}
#: the twins and the shapes world: they build FLUX.1's own models (the family's twin builder)
ALLOWED = {"families", "twins"}


def flux1_names(path: Path) -> list[tuple[int, str]]:
    """Each FLUX.1 name a module's code holds (identifiers, attributes and whole string constants;
    docstrings and comments are prose)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in FLUX1_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute) and node.attr in FLUX1_NAMES:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.alias) and node.name in FLUX1_NAMES:
            found.append((getattr(node, "lineno", 0), node.name))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FLUX1_NAMES
              and id(node) not in docstrings):
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.keyword) and node.arg in FLUX1_NAMES:
            found.append((node.value.lineno, node.arg))
    return found


def names_outside_families() -> dict[str, list[tuple[int, str]]]:
    out = {}
    for path in sorted(HELPERS.rglob("*.py")):
        rel = path.relative_to(HELPERS)
        if rel.parts[0] in ALLOWED:
            continue
        found = flux1_names(path)
        if found:
            out[str(rel)] = found
    return out


def test_no_module_outside_the_families_names_flux1():
    assert names_outside_families() == {}, "FLUX.1 named outside helpers/families/ (and the twins)"


def test_the_name_count_sees_a_name(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""T5EncoderModel in prose is fine."""\nfrom transformers import T5EncoderModel\nx = "text_encoder_2"\n')
    assert flux1_names(module) == [(2, "T5EncoderModel"), (3, "text_encoder_2")]
