"""Key layouts of FLUX.2's transformer: the diffusers one this project loads, and BFL's original one.

The single files people hold for FLUX.2 [klein] (BFL's own ``flux-2-klein-4b.safetensors``, the fp8
files and GGUF quantizations made for ComfyUI) name the transformer's tensors as BFL's code does
(``double_blocks.0.img_attn.qkv.weight``). FLUX.2 fuses less than FLUX.1 did: only a double block's
query, key and value are one ``qkv`` tensor in BFL's layout and three in diffusers'; a single block's
fused ``linear1`` is one tensor in both (``attn.to_qkv_mlp_proj``). The modulations are shared by all
blocks (one per stream, not one per block), no linear layer has a bias, and the final modulation
stores shift before scale where diffusers stores scale first. FLUX.2 [dev]'s transformer adds a
guidance embedder (``guidance_in``), which is what tells its files from klein's; the distilled and
base klein transformers have the same tensors (only the pipeline's ``is_distilled`` differs).

:func:`bfl_layout` says, for every diffusers tensor, which rows of which BFL tensor it is made of,
following the model's own widths (any twin); :func:`to_bfl` and :func:`from_bfl` convert whole state
dicts both ways (:mod:`helpers.families.common`).
"""

from __future__ import annotations

from helpers.families.common import Rows, gather_rows, scatter_rows

#: a checkpoint key prefix some single files carry (ComfyUI's full-model saves)
PREFIX = "model.diffusion_model."
#: the architecture a GGUF file of a FLUX.2 transformer carries: ComfyUI-GGUF reads FLUX.2 files as
#: ``flux`` (its list of image architectures has no other name for them) and tells the model by its keys
GGUF_ARCH = "flux"
_GUIDANCE = "guidance_in."


def variant_key(key: str) -> bool:
    """Whether a BFL key is one only some transformers have (FLUX.2 [dev]'s guidance embedder)."""
    return key.startswith(_GUIDANCE)


def variant_of_keys(keys) -> str:
    """``dev`` when the keys hold FLUX.2 [dev]'s guidance embedder, else ``klein`` (distilled and base alike)."""
    return "dev" if any(variant_key(k) for k in keys) else "klein"


def other_variant(name: str, has: str, wants: str) -> str:
    """The refusal of a file of the other transformer."""
    said = {"dev": "FLUX.2 [dev] transformer (it has guidance_in)", "klein": "FLUX.2 [klein] transformer (no guidance_in)"}
    return f"{name} is a {said[has]} and the model is not: use the file made for this model."


def bfl_layout(config) -> dict[str, list[Rows]]:
    """Every diffusers tensor name of a ``Flux2Transformer2DModel`` with ``config`` (a dict or the
    model's config) -> the BFL rows it is made of, concatenated in order along the first dimension."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    inner = get("num_attention_heads") * get("attention_head_dim")
    out: dict[str, list[Rows]] = {}

    def same(diffusers: str, bfl: str, leaf: str = "weight") -> None:
        out[f"{diffusers}.weight"] = [Rows(f"{bfl}.{leaf}")]

    def qkv(names: list[str], bfl: str) -> None:
        for k, name in enumerate(names):
            out[f"{name}.weight"] = [Rows(f"{bfl}.weight", k * inner, (k + 1) * inner)]

    embed = "time_guidance_embed"
    for diffusers, bfl in (("timestep_embedder", "time_in"),
                           *((("guidance_embedder", "guidance_in"),) if get("guidance_embeds", False) else ())):
        same(f"{embed}.{diffusers}.linear_1", f"{bfl}.in_layer")
        same(f"{embed}.{diffusers}.linear_2", f"{bfl}.out_layer")
    for stream in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        same(f"{stream}.linear", f"{stream}.lin")
    same("x_embedder", "img_in")
    same("context_embedder", "txt_in")
    for i in range(get("num_layers")):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        qkv([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{b}.img_attn.qkv")
        qkv([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], f"{b}.txt_attn.qkv")
        for ours, theirs in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                             ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            same(f"{d}.attn.{ours}", f"{b}.{theirs}", "scale")
        same(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        same(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
        for ours, theirs in (("ff", "img_mlp"), ("ff_context", "txt_mlp")):
            same(f"{d}.{ours}.linear_in", f"{b}.{theirs}.0")
            same(f"{d}.{ours}.linear_out", f"{b}.{theirs}.2")
    for i in range(get("num_single_layers")):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        same(f"{d}.attn.to_qkv_mlp_proj", f"{b}.linear1")
        same(f"{d}.attn.to_out", f"{b}.linear2")
        same(f"{d}.attn.norm_q", f"{b}.norm.query_norm", "scale")
        same(f"{d}.attn.norm_k", f"{b}.norm.key_norm", "scale")
    same("proj_out", "final_layer.linear")
    key = "final_layer.adaLN_modulation.1.weight"  # BFL: shift then scale; diffusers: scale then shift
    out["norm_out.linear.weight"] = [Rows(key, inner, 2 * inner), Rows(key, 0, inner)]
    return out


def from_bfl(state: dict, config) -> dict:
    """A BFL state dict (torch tensors; the ``model.diffusion_model.`` prefix allowed) in diffusers'
    names. Missing or unexpected keys are a :class:`~helpers.errors.UserError` naming them."""
    return gather_rows(state, bfl_layout(config), PREFIX, "a FLUX.2 transformer")


def to_bfl(state: dict, config) -> dict:
    """A diffusers state dict of the transformer in BFL's names and fused tensors (the inverse of
    :func:`from_bfl`, and of diffusers' own conversion of FLUX.2 single files)."""
    return scatter_rows(state, bfl_layout(config))
