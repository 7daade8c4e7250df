"""The published configs of FLUX.2 [klein] that ship with ``helpers`` (``helpers/configs/FLUX.2-klein-*``):
their module trees, built on the meta device, hold exactly the parameters the published weight files
store (their shard indices' ``total_size`` in bf16 and the single files' sizes), and the text stage's
path (the embeddings and the layers up to the deepest hidden state read, 27 of 36) is measured against
the whole encoder. Nothing is downloaded: the configs are the package's own files."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

CONFIGS = resources.files("helpers") / "configs"
VARIANTS = ("FLUX.2-klein-4B", "FLUX.2-klein-9B", "FLUX.2-klein-base-4B", "FLUX.2-klein-base-9B")

# the published weights, as their files say: (transformer, text encoder, VAE) parameters; the text
# encoders' and the 9B transformer's shard indices give total_size = 2 bytes x these (bf16)
PUBLISHED = {
    "4B": (3_875_544_576, 4_022_468_096, 84_046_115),
    "9B": (9_078_581_248, 8_190_735_360, 84_046_115),
}
TEXT_INDEX_TOTAL = {"4B": 8_044_936_192, "9B": 16_381_470_720}
LAYERS_READ = 27  # hidden states 9, 18 and 27 are stacked: layers 1-27 run, 28-36, the norm and lm_head never


def _config(variant: str, part: str) -> dict:
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return json.loads((CONFIGS / variant / part / name).read_text())


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied parameters once


def _skeletons(variant: str) -> dict:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with init_empty_weights():
        parts = {"transformer": Flux2Transformer2DModel.from_config(_config(variant, "transformer")),
                 "text_encoder": Qwen3ForCausalLM(Qwen3Config.from_dict(_config(variant, "text_encoder"))),
                 "vae": AutoencoderKLFlux2.from_config(_config(variant, "vae"))}
    parts["text_encoder"].tie_weights()  # as loading does: the 4B's lm_head is its embeddings
    return parts


@pytest.mark.parametrize("variant", VARIANTS)
def test_klein_configs_hold_the_published_parameter_counts(variant):
    size = "9B" if variant.endswith("9B") else "4B"
    parts = _skeletons(variant)
    counts = tuple(_params(parts[c]) for c in ("transformer", "text_encoder", "vae"))
    assert counts == PUBLISHED[size]
    assert 2 * counts[1] == TEXT_INDEX_TOTAL[size]  # bf16, tied embeddings once (4B ties them, 9B does not)
    te = parts["text_encoder"]
    assert te.config.tie_word_embeddings == (size == "4B")
    index = json.loads((CONFIGS / variant / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert index.get("is_distilled", False) == ("base" not in variant)  # the base variants run with CFG
    tr = parts["transformer"].config
    width = te.config.hidden_size
    assert tr.joint_attention_dim == 3 * width  # three hidden states stacked
    assert not tr.guidance_embeds


@pytest.mark.parametrize("variant", ["FLUX.2-klein-4B", "FLUX.2-klein-9B"])
def test_the_text_path_is_the_embeddings_and_the_layers_read(variant):
    """What stage 1 computes of the encoder: its token embeddings and layers 1-27; the 9 later layers,
    the final norm and lm_head are never needed (the figures go to the issue's note)."""
    te = _skeletons(variant)["text_encoder"]
    body, cfg = te.model, te.config
    assert len(body.layers) == cfg.num_hidden_layers == 36
    path = _params(body.embed_tokens) + sum(_params(layer) for layer in body.layers[:LAYERS_READ])
    # the same from the config's widths: attention (q, k, v, o), the gated MLP, two RMSNorms and q/k norms
    h, q, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layer = h * q * d + 2 * h * kv * d + q * d * h + 3 * h * cfg.intermediate_size + 2 * h + 2 * d
    assert path == cfg.vocab_size * h + LAYERS_READ * layer
    whole = _params(te)
    assert whole == path + (cfg.num_hidden_layers - LAYERS_READ) * layer + h + (
        0 if cfg.tie_word_embeddings else cfg.vocab_size * h)  # the later layers, the final norm, lm_head if untied
    if variant.endswith("4B"):  # tied: lm_head is the embeddings, held once
        assert round(path / whole, 2) == 0.77


# --------------------------------------------------------------------------- the family, planned


@pytest.fixture()
def flux2():
    """The FLUX.2 [klein] family, as the code finds it by name."""
    from helpers.families import family_named

    return family_named("flux2")


@pytest.mark.parametrize("name, size", [("flux2-klein-4b", "4B"), ("flux2-klein-9b", "9B")])
def test_klein_is_measured_whole_and_its_text_stage_planned_as_the_text_path(flux2, name, size):
    """The footprint reports the encoder as stored (tied weights once); the text stage's plan places its
    embeddings and layers 1-27 only: no later layer, no final norm, no head, under the method's budget and
    one tier down (the 4B's path fits GPU 0 alone; the 9B's spills to RAM, or to disk one tier down)."""
    from helpers.activations import Workload
    from helpers.footprint import footprint
    from helpers.models import resolve_model
    from helpers.planner import plan_stage

    ref = resolve_model(name)
    assert ref.family is flux2 and ref.variant == "klein" and ref.usual.steps == 4
    base = resolve_model(name.replace("klein-", "klein-base-"))  # its model_index has no is_distilled: CFG
    assert base.variant == "klein-base" and (base.usual.steps, base.usual.guidance) == (50, 4.0)
    fp = footprint(ref)
    transformer, encoder, vae = PUBLISHED[size]
    assert [fp.components[c].params for c in ("transformer", "text_encoder", "vae")] == [transformer, encoder, vae]
    # bf16 as stored: every parameter at 2 bytes, plus the rotary embedding's 64 float32 frequencies (a buffer)
    assert fp.components["text_encoder"].nbytes("bfloat16") == TEXT_INDEX_TOTAL[size] + 256
    te = _skeletons(f"FLUX.2-klein-{size}")["text_encoder"]
    path_bytes = 2 * (_params(te.model.embed_tokens) + sum(_params(layer) for layer in te.model.layers[:LAYERS_READ]))
    for budget, tiers in (("0=8.5GiB,cpu=30GiB", [0] if size == "4B" else [0, "cpu"]),
                          ("cpu=8.5GiB,disk=30GiB", ["cpu"] if size == "4B" else ["cpu", "disk"])):
        plan = plan_stage("text_encoding", ref, budget, runnable=False, workload=Workload(tokens=512))
        assert plan.fits and list(plan.tier_bytes()) == tiers
        assert sum(plan.tier_bytes().values()) == path_bytes  # the path, not the encoder's whole bytes
        placed = {u.name.split(".", 1)[1] for c in plan.components for u in c.units if u.nbytes}  # past "text_encoder."
        assert f"model.layers.{LAYERS_READ - 1}" in placed and "model.embed_tokens" in placed
        assert not any(m.startswith(f"model.layers.{LAYERS_READ}") or m in ("lm_head", "model.norm") for m in placed)
        assert plan.activations["text_encoder"] > 0 and not plan.warnings  # counted on the meta device
    diffusion = plan_stage("diffusion", ref, "0=8.5GiB,cpu=30GiB", runnable=False, compute="bf16")
    assert diffusion.fits and set(diffusion.activations) == {"transformer", "vae"}


def test_klein_tiny_is_built_in_the_real_layout_and_the_one_piece_pipeline_runs_it(flux2, tmp_path):
    """klein-tiny: klein's structure (5 + 20 blocks, Qwen3's 36 layers, tied embeddings, 32 latent
    channels) at tiny widths, deterministic, in the layout diffusers reads; its tokenizer renders a prompt
    as the real chat template does; planned from its folder like the real model, text path and all."""
    import hashlib

    from diffusers import Flux2KleinPipeline

    from helpers.models import resolve_model
    from helpers.planner import plan_stage
    from helpers.twins.builder import build_twin, twin_is_built

    folder = build_twin("klein-tiny", tmp_path / "klein-tiny")
    again = build_twin("klein-tiny", tmp_path / "again", rebuild=True)

    def hashes(root):
        return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(root.rglob("*"))
                if f.is_file()}

    assert hashes(folder) == hashes(again) and twin_is_built("klein-tiny", folder)
    assert (folder / "tokenizer" / "chat_template.jinja").is_file()
    ref = resolve_model(str(folder))
    assert ref.family is flux2 and ref.kind == "local" and ref.variant == "klein"  # its index: is_distilled
    pipe = Flux2KleinPipeline.from_pretrained(folder, dtype=torch.float32)
    assert pipe.config.is_distilled and len(pipe.text_encoder.model.layers) == 36
    assert len(pipe.transformer.transformer_blocks) == 5 and len(pipe.transformer.single_transformer_blocks) == 20
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    embeds, ids = pipe.encode_prompt("a red circle", device="cpu")
    assert embeds.shape == (1, 512, 3 * pipe.text_encoder.config.hidden_size) and ids.shape == (1, 512, 4)
    image = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    plan = plan_stage("text_encoding", ref, "cpu=50%,disk=100%", runnable=False)
    layers = {u.name.split(".")[3] for c in plan.components for u in c.units if u.name.count(".") >= 3}
    assert layers == {str(i) for i in range(LAYERS_READ)}  # the text path: layers 0-26 of 36
