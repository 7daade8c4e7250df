import numpy as np
import pytest
import torch
from PIL import Image

import commands
from helpers.diffuse import check_settings, diffuse_file, grid, nearest_sizes, output_paths
from helpers.embeddings import fingerprint, save_embeddings
from helpers.encode import encode_prompts
from helpers.errors import UserError
from helpers.models import component_configs
from helpers.images import read_image_metadata

SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "two.safetensors"
    encode_prompts("tiny", ["a red cat", "a lighthouse at night"], out, max_sequence_length=32)
    return out


def test_diffuse_writes_one_png_per_prompt_with_metadata(embeddings, tmp_path):
    result = diffuse_file(embeddings, tmp_path / "img.png", steps=2, seed=1, progress=False, **SIZE)
    assert [p.name for p in result.paths] == ["img-1.png", "img-2.png"]
    meta = read_image_metadata(result.paths[1])
    # prompt i is seeded with seed + i (the same image whichever worker makes it)
    assert meta["prompt"] == "a lighthouse at night" and meta["seed"] == "2" and meta["steps"] == "2"
    assert read_image_metadata(result.paths[0])["seed"] == "1"
    assert meta["model"] == "tiny" and meta["embeddings_fingerprint"] == fingerprint(component_configs("tiny")[1])
    assert meta["guidance"] == "3.5"  # FLUX.1-dev's usual guidance: the twin mirrors dev
    assert len(result.step_times) == 2 * 2 and result.s_per_step > 0  # one pipeline call per prompt
    assert result.differences == [] and {"cpu", "disk"} <= set(map(str, result.applied.values()))
    assert Image.open(result.paths[0]).size == (64, 64)


@pytest.mark.slow
def test_same_seed_same_pixels(embeddings, tmp_path):
    a = diffuse_file(embeddings, tmp_path / "a.png", steps=2, seed=7, progress=False, **SIZE)
    b = diffuse_file(embeddings, tmp_path / "b.png", steps=2, seed=7, progress=False, **SIZE)
    c = diffuse_file(embeddings, tmp_path / "c.png", steps=2, seed=8, progress=False, **SIZE)
    for x, y in zip(a.paths, b.paths):
        assert np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y)))
    assert not np.array_equal(np.asarray(Image.open(a.paths[0])), np.asarray(Image.open(c.paths[0])))


@pytest.mark.parametrize("offload, compute", [("accelerate", "bf16"), *(
    pytest.param(*p, marks=pytest.mark.slow) for p in (("stream", "bf16"), ("accelerate", "fp32"), ("stream", "fp32")))])
def test_generate_in_two_processes_equals_one_piece_pipeline(tiny_folder, tmp_path, offload, compute):
    """The decoupled run (two processes, offloaded, file hand-off) against FluxPipeline in one process.

    fp32: the weights stay stored in bf16 and are upcast layer by layer; the one-piece pipeline holds
    them in float32 (the same values: widening is exact)."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    prompt, seed, steps = "a photo of a red cat sitting on a window", 3, 2
    out = tmp_path / "two.png"
    # generate in this process (tests/commands.py); its two stages are processes of their own
    done = commands.run("generate", "--model", tiny_folder, "--prompt", prompt, "--out", out, "--steps", steps,
                        "--seed", seed, "--height", "64", "--width", "64", "--max-sequence-length", "64",
                        "--max-memory", "cpu=50%,disk=100%", "--offload", offload, "--compute", compute)
    assert done.returncode == 0, done.stderr
    assert "text encoding" in done.stderr and "diffusion" in done.stderr and "total" in done.stderr
    assert done.stderr.count(f"offload {offload}") == 2  # both stages, as asked

    pipe = FluxPipeline.from_pretrained(
        tiny_folder, dtype=torch.bfloat16,
        text_encoder=CLIPTextModel.from_pretrained(tiny_folder / "text_encoder", dtype=torch.float32),
        text_encoder_2=T5EncoderModel.from_pretrained(tiny_folder / "text_encoder_2", dtype=torch.float32))
    with torch.no_grad():
        pe, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, max_sequence_length=64)  # float32
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[compute]
    pipe.transformer.to(dtype)
    pipe.vae.to(dtype)
    # the embeddings file holds bf16 (the method's hand-off), which the decoupled run widens
    one = pipe(prompt_embeds=pe.to(torch.bfloat16).to(dtype), pooled_prompt_embeds=pooled.to(torch.bfloat16).to(dtype),
               num_inference_steps=steps, guidance_scale=3.5, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    diff = np.abs(np.asarray(Image.open(out)).astype(int) - np.asarray(one).astype(int)).max()
    print(f"max pixel difference, decoupled ({offload}, {compute} math) vs one-piece: {diff}")
    assert diff == 0


# --------------------------------------------------------------------------- rejections before any load


@pytest.fixture
def no_load(monkeypatch):
    import helpers.diffuse as dif

    def must_not_load(*a, **k):
        raise AssertionError("loaded weights before rejecting the input")

    monkeypatch.setattr(dif, "load_diffusion", must_not_load)


def _bad_file(tmp_path, kind, good):
    from safetensors.torch import save_file

    path = tmp_path / f"{kind}.safetensors"
    meta = {"format": "flux-embeddings", "format_version": "1", "model": "tiny", "prompts": '["p"]',
            "max_sequence_length": "8", "fingerprint": fingerprint(component_configs("tiny")[1])}
    pe, pooled = torch.zeros(1, 8, 32, dtype=torch.bfloat16), torch.zeros(1, 32, dtype=torch.bfloat16)
    if kind == "missing":
        return path
    if kind == "not-safetensors":
        path.write_bytes(b"\x89PNG not this")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:-100])
    elif kind == "tensor-missing":
        save_file({"prompt_embeds": pe}, str(path), metadata=meta)
    elif kind == "wrong-shape":
        save_file({"prompt_embeds": pe[0], "pooled_prompt_embeds": pooled}, str(path), metadata=meta)
    elif kind == "wrong-dtype":
        save_file({"prompt_embeds": pe.float(), "pooled_prompt_embeds": pooled}, str(path), metadata=meta)
    elif kind == "other-model":
        save_embeddings(path, {"prompt_embeds": pe.float(), "pooled_prompt_embeds": pooled.float()}, model="medium",
                        fingerprint="0123456789abcdef",
                        prompts=["p"], max_sequence_length=8)
    elif kind == "other-width":
        save_embeddings(path, {"prompt_embeds": torch.zeros(1, 8, 64), "pooled_prompt_embeds": pooled.float()},
                        model="tiny", fingerprint=meta["fingerprint"],
                        prompts=["p"], max_sequence_length=8)
    return path


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "no embeddings file"),
    ("not-safetensors", "not a readable safetensors file"),
    ("truncated", "not a readable safetensors file"),
    ("tensor-missing", "lacks pooled_prompt_embeds"),
    ("wrong-shape", "expected [batch, tokens, dim]"),
    ("wrong-dtype", "prompt_embeds is F32, expected BF16"),
    ("other-model", "encoded by model 'medium'"),
    ("other-width", "64 wide, this transformer takes 32"),
])
def test_bad_embeddings_files_are_explained_before_any_load(tmp_path, embeddings, no_load, kind, fragment):
    path = _bad_file(tmp_path, kind, embeddings)
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as info:
        diffuse_file(path, tmp_path / "x.png", model="tiny", steps=1, **SIZE)
    assert "02_text-encoding-offload" in str(info.value) or "encode" in str(info.value)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(height=72), "height 72 is not a multiple of 16; the nearest valid sizes are 64 and 80"),
    (dict(width=8), "at least 16"),
    (dict(steps=0), "steps must be a whole number, 1 or more"),
    (dict(guidance=-1.0), "guidance must be a finite number from 0 to 1000"),
    (dict(guidance=float("inf")), "guidance must be a finite number"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(guidance=1e39), "guidance must be a finite number from 0 to 1000"),
    (dict(max_memory="cpu=1KiB"), "too small for diffusion"),
    (dict(max_memory="gpu=8GiB"), "write 0 for the first GPU"),
    (dict(model="flux-dev"), "encoded by model 'tiny'"),
])
def test_bad_settings_rejected_before_any_load(tmp_path, embeddings, no_load, kwargs, fragment):
    args = dict(steps=1, height=64, width=64)
    args.update(kwargs)
    with pytest.raises(UserError, match=fragment):
        diffuse_file(embeddings, tmp_path / "x.png", **args)


def test_existing_images_are_kept(tmp_path, embeddings, no_load):
    (tmp_path / "x-2.png").write_bytes(b"mine")
    with pytest.raises(UserError, match="x-2.png already exists"):
        diffuse_file(embeddings, tmp_path / "x.png", steps=1, **SIZE)
    assert (tmp_path / "x-2.png").read_bytes() == b"mine"
    with pytest.raises(UserError, match="PNG"):
        diffuse_file(embeddings, tmp_path / "x.jpg", steps=1, **SIZE)


def test_settings_notes_and_sizes():
    assert nearest_sizes(1000) == (992, 1008)
    assert check_settings(64, 64, 4, 0.0, "schnell") == []
    assert "distilled for about 4 steps" in check_settings(64, 64, 20, 0.0, "schnell")[0]
    assert "choice, not a rule" in check_settings(64, 64, 20, 0.0, "dev")[0]
    with pytest.raises(UserError, match="at most 256 tokens"):
        check_settings(64, 64, 4, 0.0, "schnell", max_sequence_length=512)
    assert [p.name for p in output_paths("a.png", 3)] == ["a-1.png", "a-2.png", "a-3.png"]
    sheet = grid([Image.new("RGB", (8, 8))] * 5, columns=4)
    assert sheet.size == (32, 16)


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_widget_generates_and_shows_errors(tmp_path, monkeypatch, embeddings):
    import shutil

    monkeypatch.setenv("FLUX_OUTPUTS", str(tmp_path))
    (tmp_path / "embeddings").mkdir()
    shutil.copy(embeddings, tmp_path / "embeddings" / "pair.safetensors")
    from helpers.widgets import diffuse_panel, embeddings_choices

    assert embeddings_choices() == ["pair"]
    panel = diffuse_panel("pair", seed=5, steps=1, guidance=3.5, height=64, width=64)
    panel.click()
    assert (tmp_path / "images" / "pair-seed5-1.png").is_file() and panel.status.value.startswith("done in")
    height = panel.children[2].children[0]
    height.value = 72
    panel.click()
    assert "failed" in panel.status.value and not panel.button.disabled and panel.button.description == "Generate"
    from helpers.formats.transformer_file import write_transformer_file  # the transformer from a file people hold

    height.value = 64
    panel.children[4].value = str(write_transformer_file("tiny", "q8_0", tmp_path / "tiny-Q8_0.gguf", progress=False))
    panel.click()
    assert panel.status.value.startswith("done in") and "Q8_0 GGUF transformer" in panel.status.value


def test_widget_shows_every_default_with_its_whole_label(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_OUTPUTS", str(tmp_path))
    from helpers.widgets import LABELS, chosen_weights, diffuse_panel

    panel = diffuse_panel("02_prompts", seed=0, steps=4, guidance=3.5, height=64, width=64)
    boxes = {}
    for row in panel.children[:6]:
        for box in getattr(row, "children", [row]):
            if getattr(box, "description", ""):
                boxes[box.description] = box
    assert boxes["Embeddings"].value == "02_prompts"  # not in outputs/ yet: offered all the same
    assert boxes["Weights"].label == "method's default (bf16)" and chosen_weights(boxes["Weights"]) is None
    assert (boxes["Seed"].value, boxes["Steps"].value, boxes["Height"].value, boxes["Math"].value) == (0, 4, 64, "auto")
    assert boxes["Transformer"].value == "" and "the model's own" in boxes["Transformer"].placeholder
    assert {b.style.description_width for b in boxes.values()} == {LABELS["description_width"]}
    assert boxes["replace an image of the same name"].layout.width == "auto"
    panel = diffuse_panel("02_prompts", seed=0, steps=4, guidance=3.5, height=64, width=64, weights="fp32")
    assert chosen_weights(panel.children[3].children[0]) == "fp32"


def test_seed_and_damaged_headers_are_refused(tmp_path, embeddings, no_load):
    with pytest.raises(UserError, match="seed must be a whole number from 0 to 2\\*\\*64 - 1"):
        diffuse_file(embeddings, tmp_path / "x.png", seed=2**64, steps=1, **SIZE)
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    meta = {"format": "flux-embeddings", "format_version": "1", "prompts": "5", "max_sequence_length": "8",
            "fingerprint": fingerprint(component_configs("tiny")[1])}
    save_file({"prompt_embeds": torch.zeros(1, 8, 32, dtype=torch.bfloat16),
               "pooled_prompt_embeds": torch.zeros(1, 32, dtype=torch.bfloat16)}, str(bad), metadata=meta)
    with pytest.raises(UserError, match="damaged header"):
        diffuse_file(bad, tmp_path / "x.png", model="tiny", steps=1, **SIZE)


def test_a_budget_that_leaves_the_transformer_on_disk_is_refused(tmp_path, embeddings, no_load):
    with pytest.raises(UserError, match="on disk with no RAM or GPU to compute on|too small"):
        diffuse_file(embeddings, tmp_path / "x.png", steps=1, max_memory="cpu=1%,disk=100%", **SIZE)


@pytest.mark.slow
def test_no_offload_copies_are_left_behind(tmp_path, embeddings, monkeypatch):
    monkeypatch.setenv("FLUX_OUTPUTS", str(tmp_path))
    diffuse_file(embeddings, tmp_path / "x.png", steps=1, progress=False, offload="accelerate", **SIZE)
    assert not [p for p in (tmp_path / "offload").iterdir()]  # the run's temporary folder is gone
    diffuse_file(embeddings, tmp_path / "y.png", steps=1, progress=False, offload="stream", **SIZE)
    assert not [p for p in (tmp_path / "offload").iterdir()]  # streaming reads the checkpoint: no copies at all
