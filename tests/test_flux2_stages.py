"""FLUX.2 [klein]'s stages on its tiny twin: the text stage loads and runs the text path alone (embeddings
and layers 1-27 of Qwen3's 36; never the later layers, the final norm or the head) and hands over what
``Flux2KleinPipeline.encode_prompt`` makes; the diffusion stage, from the file, draws what the one-piece
pipeline draws at the same seed, distilled (no guidance) and base (guidance against the empty prompt,
whose embeddings the file carries)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.errors import UserError

PROMPTS = ["a red circle", "a small blue square at the left"]
#: the budgets: a cpu tier that holds a part of the text path (the rest on disk), and one that holds all of it
SPLIT, RESIDENT = "cpu=80%,disk=100%", "cpu=1GiB"


@pytest.fixture(scope="module")
def one_piece(klein_folder):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline.from_pretrained(klein_folder, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def base_folder(klein_folder, tmp_path_factory):
    """klein-tiny as a base model: the same weights, its index without ``is_distilled`` (as the base
    repositories publish it): 50 steps with classifier-free guidance."""
    folder = tmp_path_factory.mktemp("base") / "klein-tiny-base"
    shutil.copytree(klein_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("is_distilled")
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("budget, offload", [(SPLIT, "accelerate"), (SPLIT, "stream"), (RESIDENT, "stream")])
def test_the_text_stage_runs_the_text_path_alone_and_matches_encode_prompt(klein_folder, one_piece, tmp_path,
                                                                          budget, offload):
    from helpers.embeddings import load_embeddings
    from helpers.encode import encode_prompts, load_text_encoders
    from helpers.job import Request, plan_job
    from helpers.models import resolve_model

    out = tmp_path / "e.safetensors"
    result = encode_prompts(str(klein_folder), PROMPTS, out, max_memory=budget, offload=offload)
    assert result.offload == offload and not result.differences
    assert set(result.applied.values()) == ({"cpu", "disk"} if budget == SPLIT else {"cpu"})
    tensors, header = load_embeddings(out)
    theirs, ids = one_piece.encode_prompt(PROMPTS, device="cpu")
    ours = tensors["prompt_embeds"].float()
    assert ours.shape == (2, 512, 3 * 32) and torch.equal(tensors["text_ids"], ids)
    # the same modules in the same dtype: equal, or within one bf16 step on a CPU whose kernels differ by path
    torch.testing.assert_close(ours, theirs.float(), rtol=2 ** -7, atol=1e-6)
    meta = header.metadata
    template = one_piece.tokenizer.chat_template
    assert meta["family"] == "flux2" and meta["hidden_states"] == "9,18,27" and meta["text_encoder_layers_read"] == "27"
    assert meta["chat_template"] == hashlib.sha256(template.encode()).hexdigest()[:16]
    assert "negative_prompt_embeds" not in tensors  # distilled: no guidance, no negative
    # what was loaded: the embeddings and 27 layers, no head; their tensors read from the checkpoint alone
    job = plan_job(Request("text_encoding", resolve_model(str(klein_folder)), budget, result.plan.workload,
                           offload=offload))
    encoders = load_text_encoders(klein_folder, job.plan, offload=offload, progress=False)
    try:
        model = encoders.text_encoder
        assert len(model.model.layers) == 27
        assert isinstance(model.model.norm, torch.nn.Identity) and isinstance(model.lm_head, torch.nn.Identity)
        later = tuple(f"model.layers.{i}" for i in range(27, 36))
        assert not any(n in later or n.startswith(tuple(f"{b}." for b in later)) for n in encoders.applied)
        assert not list(model.lm_head.parameters()) and not list(model.model.norm.parameters())
        if encoders.streamer is not None:
            assert all(int(b.split(".")[2]) < 27 for b in encoders.streamer.streamed_blocks)
    finally:
        encoders.close()


def _pixels(path_or_image) -> np.ndarray:
    image = Image.open(path_or_image) if not isinstance(path_or_image, Image.Image) else path_or_image
    return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
@pytest.mark.parametrize("offload", ["accelerate", "stream"])
def test_generate_from_the_file_equals_the_one_piece_pipeline(klein_folder, one_piece, tmp_path, offload):
    from helpers.diffuse import diffuse_file
    from helpers.encode import encode_prompts

    emb = tmp_path / "e.safetensors"
    encode_prompts(str(klein_folder), PROMPTS, emb, max_memory=RESIDENT)
    result = diffuse_file(emb, tmp_path / "img.png", height=64, width=64, max_memory=SPLIT, offload=offload,
                          compute="bf16", progress=False)  # the one-piece pipeline computes in bf16 too
    assert result.offload == offload and set(result.applied.values()) == {"cpu", "disk"} and not result.differences
    assert len(result.step_times) == 2 * 4  # klein's 4 steps, each prompt
    for i, prompt in enumerate(PROMPTS):
        theirs = one_piece(prompt=prompt, height=64, width=64, num_inference_steps=4, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(i)).images[0]
        diff = np.abs(_pixels(result.paths[i]) - _pixels(theirs))
        print(f"{offload} prompt {i}: max {diff.max()}, mean {diff.mean():.4f}")
        assert diff.max() <= 2 and diff.mean() < 0.05


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_a_base_model_guides_against_the_files_negative_and_refuses_a_file_without_one(klein_folder, base_folder,
                                                                                      tmp_path):
    from diffusers import Flux2KleinPipeline

    from helpers.diffuse import diffuse_file
    from helpers.embeddings import load_embeddings
    from helpers.encode import encode_prompts
    from helpers.models import resolve_model

    assert resolve_model(str(base_folder)).variant == "klein-base"
    distilled, base = tmp_path / "distilled.safetensors", tmp_path / "base.safetensors"
    encode_prompts(str(klein_folder), PROMPTS[:1], distilled, max_memory=RESIDENT)
    with pytest.raises(UserError, match="classifier-free guidance.*encode the prompts with the base model"):
        diffuse_file(distilled, tmp_path / "never.png", str(base_folder), height=64, width=64, steps=2)
    assert not (tmp_path / "never.png").exists()

    encode_prompts(str(base_folder), PROMPTS[:1], base, max_memory=RESIDENT)
    tensors, _ = load_embeddings(base)
    pipe = Flux2KleinPipeline.from_pretrained(base_folder, dtype=torch.bfloat16)
    negative, _ = pipe.encode_prompt([""], device="cpu")
    torch.testing.assert_close(tensors["negative_prompt_embeds"].float(), negative.float(), rtol=2 ** -7, atol=1e-6)
    result = diffuse_file(base, tmp_path / "img.png", height=64, width=64, steps=3, max_memory=SPLIT,
                          compute="bf16", progress=False)
    assert result.header.metadata["model"] and len(result.step_times) == 3
    theirs = pipe(prompt=PROMPTS[0], height=64, width=64, num_inference_steps=3, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0)).images[0]
    diff = np.abs(_pixels(result.paths[0]) - _pixels(theirs))
    print(f"base, guidance 4: max {diff.max()}, mean {diff.mean():.4f}")
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_klein_random_builds_the_real_layout_and_its_text_path_loads_alone(tmp_path):
    """``flux2-klein-4b-random`` (the GPU check's model) at the twin's widths: Qwen3's tied embeddings stored
    once, as in the real checkpoint; the text path read whole by offsets, the transformer runs."""
    from diffusers import Flux2Transformer2DModel
    from safetensors import safe_open

    from helpers.families import family_named
    from helpers.families.flux2.twin import TWINS
    from helpers.loading import load_whole
    from helpers.precision import Precision
    from helpers.twins.random import build_random

    family = family_named("flux2")
    folder = build_random("flux2-klein-4b-random", tmp_path / "r", configs=TWINS["klein-tiny"].configs(),
                          components=["scheduler", "text_encoder", "transformer", "vae"])
    names = set()
    for f in (folder / "text_encoder").glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names and len(names) > 36 * 9
    spec = family.component("text_encoder")
    path = load_whole(folder / "text_encoder", spec.load_class(), "cpu", Precision("bf16", "bf16", "test"), spec.computes)
    assert len(path.model.layers) == 27 and all(p.device.type == "cpu" for p in path.parameters())
    with torch.no_grad():
        out = path(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False).logits  # the 27th layer's output (no head)
    assert out.shape == (1, 3, 32) and torch.isfinite(out).all()
    transformer = Flux2Transformer2DModel.from_pretrained(folder / "transformer", dtype=torch.bfloat16)
    inputs = family.bench_inputs("transformer", transformer, torch.bfloat16, 32, 32, 8)
    with torch.no_grad():
        assert torch.isfinite(transformer(**inputs)[0]).all()


def test_the_bfl_layout_is_the_one_diffusers_converts_and_round_trips(klein_folder):
    """Our map of FLUX.2's BFL keys, checked against diffusers' own conversion of a FLUX.2 single file:
    the file we write is read by diffusers as the same model, and by us back to the same tensors."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from helpers.families.flux2.layout import PREFIX, bfl_layout, from_bfl, to_bfl

    model = Flux2Transformer2DModel.from_pretrained(klein_folder / "transformer", dtype=torch.bfloat16)
    state = model.state_dict()
    bfl = to_bfl(state, model.config)
    assert "double_blocks.4.img_attn.qkv.weight" in bfl and "single_blocks.19.linear1.weight" in bfl
    assert len(bfl) == len(state) - 2 * 2 * 5  # a double block's q, k, v are one tensor per stream
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(theirs) == set(state) and all(torch.equal(theirs[k], state[k]) for k in state)
    back = from_bfl({PREFIX + k: v for k, v in bfl.items()}, model.config)
    assert all(torch.equal(back[k], state[k]) for k in state)
    half = model.config.num_attention_heads * model.config.attention_head_dim  # shift and scale swap places
    assert torch.equal(bfl["final_layer.adaLN_modulation.1.weight"][:half], state["norm_out.linear.weight"][half:])
    assert not any(k.startswith("guidance_in") for k in bfl)  # klein: no guidance embedder (FLUX.2 [dev] has one)
    assert any(r.key.startswith("guidance_in") for rows in bfl_layout({**model.config, "guidance_embeds": True}).values()
               for r in rows)


@pytest.mark.slow
def test_single_files_of_klein_give_the_folders_image_and_a_flux1_file_is_refused(klein_folder, tiny_folder, tmp_path):
    """``convert`` writes klein's transformer as one file in BFL's FLUX.2 layout (safetensors bf16 and fp8
    with row scales, GGUF Q8_0); each is planned from its header, streamed or dispatched as stored, and
    draws the folder's image within its format's error; bf16 exactly."""
    from helpers.diffuse import diffuse_file
    from helpers.encode import encode_prompts
    from helpers.formats.transformer_file import write_transformer_file

    emb = tmp_path / "e.safetensors"
    encode_prompts(str(klein_folder), PROMPTS[:1], emb, max_memory=RESIDENT)
    settings = dict(height=64, width=64, max_memory=SPLIT, compute="bf16", progress=False)
    folder_image = _pixels(diffuse_file(emb, tmp_path / "folder.png", str(klein_folder), **settings).paths[0])
    bounds = {"bf16": (0, 0.0), "fp8": (25, 6.0), "q8_0": (16, 3.0)}  # measured: fp8 14 / 3.79, q8_0 8 / 1.62
    for fmt, (most, mean) in bounds.items():
        path = write_transformer_file(str(klein_folder), fmt, tmp_path / f"klein-{fmt}.{'gguf' if fmt == 'q8_0' else 'safetensors'}",
                                      progress=False)
        for offload in ("accelerate", "stream"):
            result = diffuse_file(emb, tmp_path / f"{fmt}-{offload}.png", str(klein_folder), offload=offload,
                                  transformer_file=path, **settings)
            diff = np.abs(_pixels(result.paths[0]) - folder_image)
            print(f"{fmt} {offload}: max {diff.max()}, mean {diff.mean():.3f}")
            assert result.offload == offload and diff.max() <= most and diff.mean() <= mean
    flux1 = write_transformer_file(str(tiny_folder), "bf16", tmp_path / "flux1.safetensors", progress=False)
    with pytest.raises(UserError, match="not a FLUX.2 \\[klein\\] transformer in the BFL layout"):
        diffuse_file(emb, tmp_path / "never.png", str(klein_folder), transformer_file=flux1, **settings)
