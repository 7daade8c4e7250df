"""Key layouts of FLUX.1's transformer: the diffusers one this project loads, and the original one.

Black Forest Labs' own checkpoints, and the single files of the ComfyUI / Forge world (GGUF
quantizations, fp8 ``.safetensors``), name the transformer's tensors as BFL's code does
(``double_blocks.0.img_attn.qkv.weight``) and fuse some that diffusers keeps apart: a double block's
query, key and value in one ``qkv`` tensor, a single block's query, key, value and MLP input in one
``linear1``; the final modulation stores shift before scale where diffusers stores scale first.

:func:`bfl_layout` says, for every diffusers tensor, which rows of which BFL tensor it is made of,
following the model's own widths (any twin, not only FLUX.1's 3072). Every piece is a range of
rows, so a reader can fetch a diffusers tensor from a BFL file by offsets, quantized or not (GGUF
quantizes along rows). :func:`to_bfl` and :func:`from_bfl` convert whole state dicts both ways.
"""

from __future__ import annotations

from helpers.families.common import Rows, gather_rows, scatter_rows

#: a checkpoint key prefix some single files carry (ComfyUI's full-model saves)
PREFIX = "model.diffusion_model."
#: the architecture name a GGUF file of FLUX.1's transformer carries (as ComfyUI-GGUF's files do)
GGUF_ARCH = "flux"
#: the tensors only FLUX.1-dev has (its guidance embedder): what tells dev from schnell in a file
_GUIDANCE = "guidance_in."


def variant_key(key: str) -> bool:
    """Whether a BFL key is one only some variants have (dev's guidance embedder)."""
    return key.startswith(_GUIDANCE)


def variant_of_keys(keys) -> str:
    """``dev`` when the keys hold FLUX.1-dev's guidance embedder, else ``schnell``."""
    return "dev" if any(variant_key(k) for k in keys) else "schnell"


def other_variant(name: str, has: str, wants: str) -> str:
    """The refusal of a file of the other variant."""
    return (f"{name} is a FLUX.1-{has} transformer (it {'has' if has == 'dev' else 'lacks'} guidance_in) and the "
            f"model is FLUX.1-{wants}: use --model flux-{has} (or a twin of it), or the {wants} file.")


def _widths(config) -> tuple[int, int, int, int, bool]:
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    inner = get("num_attention_heads") * get("attention_head_dim")
    mlp = int(inner * get("mlp_ratio", 4.0))
    return inner, mlp, get("num_layers"), get("num_single_layers"), bool(get("guidance_embeds", False))


def bfl_layout(config) -> dict[str, list[Rows]]:
    """Every diffusers tensor name of a ``FluxTransformer2DModel`` with ``config`` (a dict or the
    model's config) -> the BFL rows it is made of, concatenated in order along the first dimension."""
    inner, mlp, double, single, guidance = _widths(config)
    out: dict[str, list[Rows]] = {}

    def same(diffusers: str, bfl: str, bias: bool = True) -> None:
        for leaf in ("weight", "bias") if bias else ("weight",):
            out[f"{diffusers}.{leaf}"] = [Rows(f"{bfl}.{leaf}")]

    def split(names: list[str], bfl: str, sizes: list[int]) -> None:
        start = 0
        for name, size in zip(names, sizes):
            for leaf in ("weight", "bias"):
                out[f"{name}.{leaf}"] = [Rows(f"{bfl}.{leaf}", start, start + size)]
            start += size

    embed = "time_text_embed"
    for diffusers, bfl in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"),
                           *((("guidance_embedder", "guidance_in"),) if guidance else ())):
        same(f"{embed}.{diffusers}.linear_1", f"{bfl}.in_layer")
        same(f"{embed}.{diffusers}.linear_2", f"{bfl}.out_layer")
    same("context_embedder", "txt_in")
    same("x_embedder", "img_in")
    for i in range(double):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        same(f"{d}.norm1.linear", f"{b}.img_mod.lin")
        same(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{b}.img_attn.qkv", [inner] * 3)
        split([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{b}.txt_attn.qkv",
              [inner] * 3)
        out[f"{d}.attn.norm_q.weight"] = [Rows(f"{b}.img_attn.norm.query_norm.scale")]
        out[f"{d}.attn.norm_k.weight"] = [Rows(f"{b}.img_attn.norm.key_norm.scale")]
        out[f"{d}.attn.norm_added_q.weight"] = [Rows(f"{b}.txt_attn.norm.query_norm.scale")]
        out[f"{d}.attn.norm_added_k.weight"] = [Rows(f"{b}.txt_attn.norm.key_norm.scale")]
        same(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0")
        same(f"{d}.ff.net.2", f"{b}.img_mlp.2")
        same(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        same(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2")
        same(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        same(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
    for i in range(single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        same(f"{d}.norm.linear", f"{b}.modulation.lin")
        split([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], f"{b}.linear1",
              [inner, inner, inner, mlp])
        out[f"{d}.attn.norm_q.weight"] = [Rows(f"{b}.norm.query_norm.scale")]
        out[f"{d}.attn.norm_k.weight"] = [Rows(f"{b}.norm.key_norm.scale")]
        same(f"{d}.proj_out", f"{b}.linear2")
    same("proj_out", "final_layer.linear")
    for leaf in ("weight", "bias"):  # BFL: shift then scale; diffusers: scale then shift
        key = f"final_layer.adaLN_modulation.1.{leaf}"
        out[f"norm_out.linear.{leaf}"] = [Rows(key, inner, 2 * inner), Rows(key, 0, inner)]
    return out


def from_bfl(state: dict, config) -> dict:
    """A BFL state dict (torch tensors; the ``model.diffusion_model.`` prefix allowed) in diffusers'
    names. Missing or unexpected keys are a :class:`UserError` naming them (a file of another model)."""
    return gather_rows(state, bfl_layout(config), PREFIX, "a FLUX.1 transformer (dev or schnell)")


def to_bfl(state: dict, config) -> dict:
    """A diffusers state dict of the transformer in BFL's names and fused tensors (the inverse of
    :func:`from_bfl`, and of diffusers' own conversion of single files)."""
    return scatter_rows(state, bfl_layout(config))
