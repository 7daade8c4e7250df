import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.errors import UserError
from helpers.families import default_family
from helpers.families.flux1.twin import TWINS, clip_vocab, twin_configs
from helpers.models import default_model, describe_pipeline, hub_patterns, hub_snapshot, model_path, resolve_model
from helpers.twins.builder import MARKER, build_twin, twin_is_built


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- layout and structure


def test_real_diffusers_layout(tiny_folder):
    for comp in default_family().subfolders:
        assert (tiny_folder / comp).is_dir(), comp
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    # the big components are sharded with an index file, like the real checkpoint
    assert (tiny_folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (tiny_folder / "text_encoder_2" / "model.safetensors.index.json").is_file()
    assert len(list((tiny_folder / "transformer").glob("*.safetensors"))) >= 2


def test_block_structure_matches_flux(tiny_folder):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(tiny_folder / "text_encoder_2")
    assert len(t5.encoder.block) == 24
    assert "T5Block" in t5._no_split_modules

    flux = FluxTransformer2DModel.from_pretrained(tiny_folder / "transformer")
    assert len(flux.transformer_blocks) == 19
    assert len(flux.single_transformer_blocks) == 38
    assert set(flux._no_split_modules) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}

    clip = CLIPTextModel.from_pretrained(tiny_folder / "text_encoder")
    assert len(getattr(clip, "text_model", clip).encoder.layers) == 12

    vae = AutoencoderKL.from_pretrained(tiny_folder / "vae")
    assert len(vae.encoder.down_blocks) == 4 and all(len(b.resnets) == 2 for b in vae.encoder.down_blocks)
    assert vae.config.latent_channels == 16

    # small widths: the whole twin stays under 20 MB in bfloat16
    total = sum(p.numel() for m in (t5, flux, clip, vae) for p in m.parameters())
    assert total * 2 < 20e6


def test_mirrors_flux_dev_config(tiny_folder):
    cfg = json.loads((tiny_folder / "transformer" / "config.json").read_text())
    assert cfg["guidance_embeds"] is True
    assert cfg["in_channels"] == 64 and cfg["patch_size"] == 1
    assert sum(cfg["axes_dims_rope"]) == cfg["attention_head_dim"]
    sched = json.loads((tiny_folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["use_dynamic_shifting"] is True and sched["shift"] == 3.0
    # stored in bfloat16, like the real checkpoints
    from safetensors import safe_open

    shard = next((tiny_folder / "transformer").glob("*.safetensors"))
    with safe_open(shard, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_tokenizers_real_lengths_and_fixed_vocabulary(tiny_folder):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(tiny_folder / "tokenizer_2")
    assert clip.model_max_length == 77 and t5.model_max_length == 512

    ids = clip("A photo of a cat").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    # FLUX.1 pools CLIP at the highest token id: <|endoftext|> must be the last of the vocabulary
    assert clip.eos_token_id == len(clip_vocab()) - 1 == max(clip.get_vocab().values())
    assert clip.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    long = clip("word " * 200, truncation=True, max_length=77, padding="max_length")
    assert len(long.input_ids) == 77 and long.input_ids[-1] == clip.eos_token_id

    pieces = t5.convert_ids_to_tokens(t5("a photo of a red cat, 2 dogs!").input_ids)
    assert "\u2581photo" in pieces and "\u2581cat" in pieces and pieces[-1] == "</s>"
    assert t5.unk_token not in pieces
    assert len(t5("word " * 600, truncation=True, max_length=512).input_ids) == 512


def test_pipeline_from_pretrained_makes_an_image(tiny_folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_folder, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)

    def run(seed):
        out = pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                   generator=torch.Generator("cpu").manual_seed(seed))
        return np.asarray(out.images[0])

    a, again, other = run(0), run(0), run(1)
    assert a.shape == (64, 64, 3)
    assert a.std() > 5  # an image, not a constant
    assert np.array_equal(a, again)  # seeded: the same image
    assert np.abs(a.astype(int) - other.astype(int)).max() > 0


def test_no_dtype_gives_mixed_dtypes(tiny_folder):
    # the trap notebook 00 explains: transformers keeps the stored dtype, diffusers picks float32
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_folder)
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.transformer.dtype == torch.float32


def test_describe_pipeline(tiny_folder):
    from diffusers import FluxPipeline

    rows = {r["component"]: r for r in describe_pipeline(FluxPipeline.from_pretrained(tiny_folder, dtype=torch.float32))}
    assert rows["transformer"]["blocks"] == "19 double + 38 single"
    assert rows["text_encoder_2"]["blocks"] == "24 T5Block"
    assert rows["text_encoder"]["blocks"] == "12 CLIPEncoderLayer"
    assert rows["vae"]["bytes"] == rows["vae"]["params"] * 4


# --------------------------------------------------------------------------- determinism and reuse


def test_deterministic_byte_identical(tmp_path, tiny_folder):
    before = torch.random.get_rng_state()
    again = build_twin("tiny", tmp_path / "again")
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's random state is untouched
    assert _hashes(again) == _hashes(tiny_folder)


def test_reused_not_rebuilt(tiny_folder):
    stamp = {p: p.stat().st_mtime_ns for p in tiny_folder.rglob("*.safetensors")}
    assert build_twin("tiny", tiny_folder) == tiny_folder
    assert {p: p.stat().st_mtime_ns for p in tiny_folder.rglob("*.safetensors")} == stamp


def test_stale_twin_is_rebuilt_and_foreign_folders_are_refused(tmp_path, tiny_folder):
    twin = tmp_path / "tiny"
    shutil.copytree(tiny_folder, twin)
    stale = json.loads((twin / MARKER).read_text())
    stale["builder_version"] = 0  # made by an older builder
    (twin / MARKER).write_text(json.dumps(stale))
    (twin / "transformer" / "config.json").write_text("{}")
    assert not twin_is_built("tiny", twin)
    build_twin("tiny", twin)
    assert twin_is_built("tiny", twin) and _hashes(twin) == _hashes(tiny_folder)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers

    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not a twin 'tiny' built here"):
        build_twin("tiny", mine)
    assert (mine / "notes.txt").read_text() == "keep"
    # a folder with a marker that is not this builder's (a trained twin, another tool's) is not replaced
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    (other / MARKER).write_text(json.dumps({"twin": "tiny", "trained": True}))
    with pytest.raises(UserError, match="nothing in it was changed"):
        build_twin("tiny", other, rebuild=True)
    assert json.loads((other / MARKER).read_text()) == {"twin": "tiny", "trained": True}
    with pytest.raises(UserError, match="not a twin 'medium' built here"):  # another twin's folder neither
        build_twin("medium", twin)
    assert twin_is_built("tiny", twin)


def test_a_build_that_finishes_second_keeps_the_first_ones_folder(tmp_path, tiny_folder, monkeypatch):
    """Two builds at once: the one that finishes second must not delete the folder the first put in
    place (another process may already read it)."""
    from helpers.twins import builder

    twin = tmp_path / "tiny"
    write = builder._write_twin

    def meanwhile(spec, folder):  # while this build writes, another one finishes
        write(spec, folder)
        shutil.copytree(tiny_folder, twin)
        (twin / "theirs").write_text("in use")

    monkeypatch.setattr(builder, "_write_twin", meanwhile)
    assert build_twin("tiny", twin) == twin
    assert (twin / "theirs").read_text() == "in use"  # their folder, not replaced by ours
    assert twin_is_built("tiny", twin) and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_builds_killed_earlier_are_cleaned_up(tmp_path, tiny_folder):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".tiny.building-{dead.stdout.strip()}"  # a process that no longer exists
    leftover.mkdir()
    (leftover / "half.safetensors").write_bytes(b"x")
    build_twin("tiny", tmp_path / "tiny")
    assert not leftover.exists()


def test_medium_is_one_to_two_gb_in_bf16():
    # measured on the meta device: nothing is allocated, nothing built
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = twin_configs(TWINS["medium"])
    with init_empty_weights():
        modules = [
            CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            T5EncoderModel(T5Config(**cfg["text_encoder_2"])),
            FluxTransformer2DModel(**cfg["transformer"]),
            AutoencoderKL(**cfg["vae"]),
        ]
    params = sum(p.numel() for m in modules for p in m.parameters())
    assert 0.5e9 <= params <= 1.0e9, params  # 1 to 2 GB at 2 bytes a parameter
    assert len(modules[1].encoder.block) == 24 and len(modules[2].single_transformer_blocks) == 38


# --------------------------------------------------------------------------- the model knob


def test_resolve_names(tmp_path, tiny_folder, monkeypatch):
    assert resolve_model("tiny").kind == "twin"
    assert resolve_model("medium").kind == "twin"
    dev = resolve_model("flux-dev")
    assert (dev.kind, dev.repo_id, dev.gated, dev.variant) == ("hub", "black-forest-labs/FLUX.1-dev", True, "dev")
    schnell = resolve_model("flux-schnell")
    assert (schnell.repo_id, schnell.gated, schnell.variant) == ("black-forest-labs/FLUX.1-schnell", False, "schnell")
    assert resolve_model("someone/some-flux").repo_id == "someone/some-flux"
    local = resolve_model(str(tiny_folder))
    assert local.kind == "local" and local.path == tiny_folder.resolve()
    assert model_path(str(tiny_folder)) == tiny_folder.resolve()

    assert resolve_model("someone/flux-devil-merge").variant is None  # unknown: not guessed from the name
    assert local.variant == "dev"  # read from the folder's transformer config (guidance_embeds)

    monkeypatch.setenv("FLUX_MODEL", "flux-schnell")
    assert default_model() == "flux-schnell" and resolve_model().repo_id.endswith("schnell")
    monkeypatch.setenv("FLUX_MODEL", "")
    assert default_model() == "tiny"


@pytest.mark.parametrize("make, fragment", [
    (lambda d: "", "no model named"),
    (lambda d: "a/b--c", "not a valid hub id"),
    (lambda d: "owner/" + "x" * 100, "not a valid hub id"),
    (lambda d: "no-such-model", "unknown model"),
    (lambda d: str(d / "missing" / "folder"), "unknown model"),
    (lambda d: (d / "f.txt").write_text("x") and str(d / "f.txt"), "is a file"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "no model_index.json"),
])
def test_resolve_rejections(tmp_path, make, fragment):
    with pytest.raises(UserError, match=fragment):
        resolve_model(make(tmp_path))


def test_build_unknown_twin():
    with pytest.raises(UserError, match="unknown twin"):
        build_twin("huge")


def test_hub_patterns_fetch_only_what_a_stage_needs():
    assert hub_patterns() == ["model_index.json", *[f"{c}/*" for c in default_family().subfolders]]
    assert hub_patterns(["text_encoder", "tokenizer"]) == ["model_index.json", "text_encoder/*", "tokenizer/*"]
    # diffusion with --transformer FILE: the file brings the transformer's weights, the model its config
    assert hub_patterns(["scheduler", "vae"], configs=["transformer"]) == [
        "model_index.json", "scheduler/*", "vae/*", "transformer/config.json"]
    with pytest.raises(UserError, match="unknown component"):
        hub_patterns(["unet"])
    with pytest.raises(UserError, match="unknown component"):
        hub_patterns(["vae"], configs=["unet"])


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_model_not_cached_says_how_to_get_it(empty_hub_cache):
    with pytest.raises(UserError) as info:
        model_path("flux-dev")
    text = str(info.value)
    assert "--download" in text and "gated" in text and "hf auth login" in text and "HF_TOKEN" in text
    with pytest.raises(UserError, match="not in your Hugging Face cache"):
        model_path("flux-schnell")
    with pytest.raises(UserError, match="cannot reach the hub"):  # offline here: a clear line, no traceback
        hub_snapshot(resolve_model("flux-schnell"), download=True)


def test_hub_model_found_in_cache_loads(empty_hub_cache, tiny_folder):
    # lay the twin out as the hub cache stores a snapshot, then resolve flux-schnell through it
    repo = empty_hub_cache / "models--black-forest-labs--FLUX.1-schnell"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_folder, repo / "snapshots" / commit)
    path = model_path("flux-schnell", components=["text_encoder", "tokenizer"])
    assert path == repo / "snapshots" / commit

    from transformers import CLIPTextModel

    assert CLIPTextModel.from_pretrained(path / "text_encoder").config.num_hidden_layers == 12


@pytest.mark.big
@pytest.mark.skipif(not __import__("os").environ.get("RUN_BIG"), reason="builds 1.2 GB; set RUN_BIG=1")
def test_medium_builds_and_loads(tmp_path):
    from diffusers import FluxTransformer2DModel

    from helpers.files import folder_size

    folder = build_twin("medium", tmp_path / "medium")
    assert 1e9 <= folder_size(folder) <= 2e9
    flux = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    assert len(flux.transformer_blocks) == 19 and len(flux.single_transformer_blocks) == 38


# ----------------------------------------------------------------------------- flux-dev-random


def test_flux_dev_random_is_flux_dev_with_random_weights():
    from helpers.architecture import shipped_configs
    from helpers.models import component_configs, resolve_model

    ref = resolve_model("flux-dev-random")
    assert ref.kind == "random" and ref.variant == "dev" and not ref.gated
    assert component_configs("flux-dev-random")[1] == shipped_configs("FLUX.1-dev")


def test_random_build_is_real_layout_deterministic_and_loads(tmp_path, monkeypatch, capsys):
    """Built small (the tiny twin's widths): the same code writes the full-size one on a GPU machine."""
    from diffusers import FluxTransformer2DModel

    from helpers.twins import random
    from helpers.twins.random import build_random

    monkeypatch.setattr(random, "_SHARD_BYTES", 300_000)  # several shards and an index, as the real one
    configs = twin_configs(TWINS["tiny"])
    a = build_random("flux-dev-random", tmp_path / "a", components=["scheduler", "transformer"], configs=configs)
    b = build_random("flux-dev-random", tmp_path / "b", components=["transformer"], configs=configs)
    said = capsys.readouterr().err  # what it writes and where, before writing
    assert "flux-dev-random: writing random weights for transformer (" in said and str(tmp_path / "a") in said
    shards = sorted((a / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (a / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for f in shards:
        assert f.read_bytes() == (b / "transformer" / f.name).read_bytes()
    assert (a / "model_index.json").is_file() and (a / "scheduler" / "scheduler_config.json").is_file()
    assert not (a / "vae").exists() and not list(a.glob(".*building*"))  # only what was asked
    model = FluxTransformer2DModel.from_pretrained(a / "transformer", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(hidden_states=torch.randn(1, 16, 64, generator=g).bfloat16(),
                    encoder_hidden_states=torch.randn(1, 8, 32, generator=g).bfloat16(),
                    pooled_projections=torch.randn(1, 32, generator=g).bfloat16(),
                    timestep=torch.tensor([0.5]).bfloat16(), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                    guidance=torch.tensor([3.5]), return_dict=False)[0]
    assert torch.isfinite(out).all() and out.abs().max() > 0
    # kept, not rebuilt
    stamp = shards[0].stat().st_mtime_ns
    build_random("flux-dev-random", tmp_path / "a", components=["transformer"], configs=configs)
    assert shards[0].stat().st_mtime_ns == stamp and "writing" not in capsys.readouterr().err


def test_random_build_checks_disk_space_first(tmp_path, monkeypatch):
    import collections

    from helpers.twins import random

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(random.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"writes 22\.\d GiB; .* GiB free"):
        random.build_random("flux-dev-random", tmp_path / "r", components=["transformer"])
    assert not (tmp_path / "r" / "transformer").exists()
    with pytest.raises(UserError, match="random weights and no tokenizer: it is made for .python -m helpers bench"):
        random.build_random("flux-dev-random", tmp_path / "r", components=["tokenizer"])


def test_random_t5_stores_its_shared_embedding_once(tmp_path):
    """As in the real checkpoint: `shared.weight` only; loaded either way it is one table."""
    from safetensors import safe_open
    from transformers import T5EncoderModel

    from helpers.twins.random import build_random
    from helpers.offload.streamers import load_streaming

    folder = build_random("flux-dev-random", tmp_path / "r", components=["text_encoder_2"],
                          configs=twin_configs(TWINS["tiny"])) / "text_encoder_2"
    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    assert "shared.weight" in names and "encoder.embed_tokens.weight" not in names
    whole = T5EncoderModel.from_pretrained(folder, dtype=torch.float32).eval()
    assert whole.shared.weight.data_ptr() == whole.encoder.embed_tokens.weight.data_ptr()
    size = sum(p.numel() * 4 for p in whole.parameters())
    model, streamer = load_streaming(folder, T5EncoderModel, torch.float32, size // 2, ["encoder.block"])
    try:
        ids = torch.randint(0, whole.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert torch.equal(whole(ids).last_hidden_state, model(ids).last_hidden_state)
    finally:
        streamer.close()


def test_shipped_model_is_a_published_model_with_configs_here_else_a_user_error_naming_them(tiny_folder):
    """Notebook 01's REAL: a twin, a folder or an unknown hub id used to fail in its first footprint cell with a
    bare ``KeyError: None``; now the parameters are refused with the names that work, and its SIBLING table holds
    exactly those."""
    import nbformat

    from helpers.families import families
    from helpers.models import shipped_model

    shipped = sorted(short for f in families() for short, repo in f.names.items() if repo in f.shipped)
    assert {"flux-dev", "flux-schnell", "flux2-klein-4b", "flux2-klein-9b"} <= set(shipped)
    for name in shipped:
        ref = shipped_model(name)
        assert ref.repo_id in ref.family.shipped
    for name in ("tiny", "klein-tiny", str(tiny_folder), "someone/flux-finetune"):
        with pytest.raises(UserError) as err:
            shipped_model(name)
        assert all(short in str(err.value) for short in shipped), str(err.value)
    nb = nbformat.read(Path(__file__).parents[1] / "notebooks" / "01_memory-footprint.ipynb", as_version=4)
    cell = next(c.source for c in nb.cells if c.source.startswith("SIBLING = "))
    sibling = eval(cell[len("SIBLING = "):cell.index("}") + 1])  # noqa: S307 - our own notebook's literal
    assert sorted(sibling) == shipped and set(sibling.values()) == set(shipped)
