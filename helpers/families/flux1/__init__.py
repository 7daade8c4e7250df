"""FLUX.1 (dev, schnell): CLIP + T5 text encoders, ``FluxTransformer2DModel``, ``AutoencoderKL``.

Everything the stages need to know about FLUX.1 and nothing else does: the components and their
classes, which stage loads each and how (CLIP whole, T5 split; the VAE whole, the transformer split),
the block lists in call order, the embeddings file's tensors (``prompt_embeds`` ``[batch, tokens,
joint_attention_dim]`` and ``pooled_prompt_embeds`` ``[batch, pooled_projection_dim]``), the usual
steps, guidance and text length of dev and schnell, the method's budget, the example inputs of each
forward for the activation count, and BFL's single-file key layout (:mod:`.layout`).
"""

from __future__ import annotations

import torch

from helpers.errors import UserError
from helpers.families import Component, Family, Variant
from helpers.families.common import vae_decode_inputs
from helpers.families.flux1.twin import TWINS

TEXT, DIFFUSION = "text_encoding", "diffusion"

COMPONENTS = (
    Component("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler", role="scheduler", stage=DIFFUSION),
    Component("text_encoder", "transformers", "CLIPTextModel", stage=TEXT, placement="whole",
              config_class="CLIPTextConfig", required_key="hidden_size", short="CLIP", long="CLIP text encoder",
              colour="#9467bd",
              fingerprint_keys=("hidden_size", "num_hidden_layers", "vocab_size", "max_position_embeddings",
                                "projection_dim")),
    Component("tokenizer", "transformers", "CLIPTokenizer", role="tokenizer", stage=TEXT),
    Component("text_encoder_2", "transformers", "T5EncoderModel", stage=TEXT, placement="mapped",
              config_class="T5Config", required_key="d_model", block_lists=("encoder.block",), short="T5",
              long="T5 encoder", colour="#8c564b", activation="the T5 encoder",
              fingerprint_keys=("d_model", "d_kv", "d_ff", "num_heads", "num_layers", "vocab_size",
                                "feed_forward_proj"),
              fp8_stream_only="T5 in fp8 runs with offload 'stream' only: under accelerate's hooks its feed-forward "
                              "would cast its activations to fp8 (it reads its weights' stored dtype); use --offload "
                              "stream, or keep T5 in bf16 (convert without text_encoder_2).",
              upcast_groups=("T5DenseActDense", "T5DenseGatedActDense")),
    Component("tokenizer_2", "transformers", "T5TokenizerFast", role="tokenizer", stage=TEXT),
    Component("transformer", "diffusers", "FluxTransformer2DModel", stage=DIFFUSION, placement="mapped",
              required_key="num_single_layers", block_lists=("transformer_blocks", "single_transformer_blocks"),
              short="transformer", long="transformer", colour="#e377c2", activation="a denoising step"),
    Component("vae", "diffusers", "AutoencoderKL", stage=DIFFUSION, placement="whole", required_key="latent_channels",
              short="VAE", long="VAE", colour="#bcbd22", activation="the VAE's decode"),
)

VARIANTS = {
    "dev": Variant(steps=28, guidance=3.5, text_length=512, max_text_length=512),
    "schnell": Variant(steps=4, guidance=0.0, text_length=256, max_text_length=256, guidance_embedder=False),
}


def variant_of(transformer_config: dict, index: dict | None = None) -> str:
    """dev when the transformer has a guidance embedder, else schnell (the pipeline's index says nothing more)."""
    return "dev" if transformer_config.get("guidance_embeds") else "schnell"


def embedding_shapes(configs: dict, batch: int, tokens: int) -> dict[str, tuple[int, ...]]:
    cfg = configs.get("transformer", {})
    return {"prompt_embeds": (batch, tokens, cfg.get("joint_attention_dim")),
            "pooled_prompt_embeds": (batch, cfg.get("pooled_projection_dim"))}


def encode(family: Family, parts: dict, prompts: list[str], device, length: int,
           variant: str | None = None) -> dict[str, torch.Tensor]:
    """``FluxPipeline.encode_prompt`` with only the encoders and tokenizers: the method's stage 1.
    Returns ``prompt_embeds``, ``pooled_prompt_embeds`` and ``text_ids`` in float32."""
    pipe = family.pipeline_class()(scheduler=None, vae=None, transformer=None, **parts)
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                         max_sequence_length=length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}


def token_report(parts: dict, prompts: list[str], length: int) -> list[dict]:
    """Tokens per prompt for CLIP (77 at most) and T5 (``length``), and which of them cuts it."""
    clip, t5 = parts["tokenizer"], parts["tokenizer_2"]
    rows = []
    for i, p in enumerate(prompts):
        clip_n = len(clip(p).input_ids)
        t5_n = len(t5(p).input_ids)
        rows.append({"prompt": i, "clip tokens": clip_n, "t5 tokens": t5_n,
                     "cut": "T5" if t5_n > length else ("CLIP" if clip_n > clip.model_max_length else "")})
    return rows


def truncation_warnings(rows: list[dict], length: int, clip_max: int = 77) -> list[str]:
    out = []
    for i, r in enumerate(rows):
        if r["t5 tokens"] > length:
            out.append(f"prompt {i} is {r['t5 tokens']} T5 tokens; only the first {length} are used "
                       "(raise max_sequence_length, up to 512, or shorten it).")
        elif r["clip tokens"] > clip_max:
            out.append(f"prompt {i} is {r['clip tokens']} CLIP tokens; CLIP reads only the first {clip_max}.")
    return out


def diffusion_pipeline(family: Family, parts: dict, variant: str | None = None):
    """The pipeline with the diffusion stage's parts (scheduler, transformer, VAE) and no encoders."""
    return family.pipeline_class()(**parts, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def setting_notes(variant: str | None, steps: int, guidance: float, length: int | None) -> list[str]:
    """Refuse what a variant cannot take; notes on unusual but valid choices."""
    notes = []
    if variant == "schnell":
        if length is not None and length > 256:
            raise UserError(f"FLUX.1-schnell takes at most 256 tokens, and these embeddings have {length}; "
                            "encode again with --max-sequence-length 256.")
        if steps != 4:
            notes.append(f"FLUX.1-schnell is distilled for about 4 steps; {steps} works but is unusual.")
        if guidance:
            notes.append("FLUX.1-schnell has no guidance embedder: guidance is ignored (0 is usual).")
    elif variant == "dev":
        if guidance == 0:
            notes.append("FLUX.1-dev usually runs with guidance about 3.5; 0.0 is the method's choice, not a rule.")
    return notes


def pipeline_inputs(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"prompt_embeds": tensors["prompt_embeds"], "pooled_prompt_embeds": tensors["pooled_prompt_embeds"]}


def example_inputs(component: str, module: torch.nn.Module, dtype: torch.dtype, height: int = 1024,
                   width: int = 1024, tokens: int = 512, device="meta") -> tuple[torch.nn.Module, dict]:
    """``(module, inputs)`` for one forward of ``component``, batch 1, tensors empty on ``device``: the
    transformer's denoising step, T5 on one prompt, the VAE's decode (wrapped so its forward is it)."""
    device = torch.device(device)
    if component == "transformer":
        cfg = module.config
        n = (height // 16) * (width // 16)
        inputs = dict(hidden_states=torch.empty(1, n, cfg.in_channels, dtype=dtype, device=device),
                      encoder_hidden_states=torch.empty(1, tokens, cfg.joint_attention_dim, dtype=dtype, device=device),
                      pooled_projections=torch.empty(1, cfg.pooled_projection_dim, dtype=dtype, device=device),
                      timestep=torch.empty(1, dtype=dtype, device=device), img_ids=torch.empty(n, 3, device=device),
                      txt_ids=torch.empty(tokens, 3, device=device), return_dict=False)
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.empty(1, device=device)
        return module, inputs
    if component == "text_encoder_2":
        return module, dict(input_ids=torch.zeros(1, tokens, dtype=torch.long, device=device))
    if component == "vae":
        return vae_decode_inputs(module, dtype, height, width, device)
    raise UserError(f"activations are estimated for transformer, vae and text_encoder_2, not {component!r}.")


def bench_inputs(component: str, module: torch.nn.Module, dtype: torch.dtype, height: int | None, width: int | None,
                 tokens: int) -> dict:
    """One call's inputs of ``component`` with seeded random values, the same in every precision (drawn
    in float32, rounded to bf16, given in ``dtype``): T5 one prompt of random token ids; the transformer
    a denoising step of a ``height`` x ``width`` image."""
    g = torch.Generator().manual_seed(0)
    if component == "text_encoder_2":
        return {"input_ids": torch.randint(0, module.config.vocab_size, (1, tokens), generator=g)}
    h, w = height // 16, width // 16
    cfg = module.config
    inputs = dict(
        hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=g).to(torch.bfloat16).to(dtype),
        encoder_hidden_states=torch.randn(1, tokens, cfg.joint_attention_dim, generator=g).to(torch.bfloat16).to(dtype),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(torch.bfloat16).to(dtype),
        timestep=torch.tensor([0.5], dtype=dtype),
        img_ids=FAMILY.pipeline_class()._prepare_latent_image_ids(1, h, w, "cpu", dtype),
        txt_ids=torch.zeros(tokens, 3, dtype=dtype),
        return_dict=False,
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


def diffusers_single_file(folder, path, compute: torch.dtype):
    """The transformer as diffusers reads a single file itself: ``from_single_file`` (a GGUF file with
    its ``GGUFQuantizationConfig``: weights held as stored, each dequantized whole at every call).

    One change: diffusers' own key conversion hard-codes FLUX.1's width (``inner_dim = 3072``) where
    it splits a single block's ``linear1``, so no file of another width loads (every twin); for the
    call, diffusers' table names our map, which follows the config's widths (:func:`.layout.from_bfl`).
    """
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    from helpers.families.flux1.layout import from_bfl

    config = FluxTransformer2DModel.load_config(folder)
    entry = SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    theirs = entry["checkpoint_mapping_fn"]
    entry["checkpoint_mapping_fn"] = lambda checkpoint, **_: from_bfl(checkpoint, config)
    try:
        extra = ({"quantization_config": GGUFQuantizationConfig(compute_dtype=compute)}
                 if str(path).endswith(".gguf") else {})
        return FluxTransformer2DModel.from_single_file(str(path), config=str(folder.parent), subfolder=folder.name,
                                                       dtype=compute, local_files_only=True, **extra)
    finally:
        entry["checkpoint_mapping_fn"] = theirs


def block_counts(module) -> str:
    """The repeated blocks of a FLUX.1 component, as text (``24 T5Block``, ``19 double + 38 single``)."""
    name = type(module).__name__
    if name == "FluxTransformer2DModel":
        return f"{len(module.transformer_blocks)} double + {len(module.single_transformer_blocks)} single"
    if name == "T5EncoderModel":
        return f"{len(module.encoder.block)} T5Block"
    if name == "CLIPTextModel":
        clip = getattr(module, "text_model", module)  # transformers 5 flattened CLIPTextModel
        return f"{len(clip.encoder.layers)} CLIPEncoderLayer"
    if name == "AutoencoderKL":
        enc = sum(len(b.resnets) for b in module.encoder.down_blocks)
        dec = sum(len(b.resnets) for b in module.decoder.up_blocks)
        return f"{len(module.encoder.down_blocks)} levels, {enc} + {dec} ResnetBlock2D"
    return ""


def checks(variant: str | None, length: int) -> str | None:
    """A text length this variant refuses, said; else None."""
    if variant == "schnell" and length > VARIANTS["schnell"].max_text_length:
        return f"FLUX.1-schnell takes at most 256 tokens (max_sequence_length {length}); use 256 or less."
    return None


FAMILY = Family(
    name="flux1", title="FLUX.1", pipeline="FluxPipeline", components=COMPONENTS, variants=VARIANTS, twins=TWINS,
    variant_of=variant_of, embedding_names=("prompt_embeds", "pooled_prompt_embeds"),
    embedding_shapes=embedding_shapes, optional_embeddings=("text_ids",),
    stage_weights={DIFFUSION: "bf16", TEXT: "fp32"},
    text_compute=("fp32", "T5 computes in float32 (the method's; it overflows in fp16)"),
    method_budget="0=8.5GiB,cpu=30GiB", reference_model="flux-dev",
    names={"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell"},
    gated=frozenset({"black-forest-labs/FLUX.1-dev"}),
    shipped={"black-forest-labs/FLUX.1-dev": "FLUX.1-dev", "black-forest-labs/FLUX.1-schnell": "FLUX.1-schnell"},
    layout="helpers.families.flux1.layout",
    encode=encode, token_report=token_report, truncation_warnings=truncation_warnings,
    diffusion_pipeline=diffusion_pipeline, pipeline_inputs=pipeline_inputs, example_inputs=example_inputs,
    block_counts=block_counts, checks=checks, setting_notes=setting_notes, bench_inputs=bench_inputs,
    diffusers_single_file=diffusers_single_file,
)
