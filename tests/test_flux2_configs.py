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
