"""FLUX.2 [klein] (4B, 9B; distilled and base): one Qwen3 LLM text encoder read up to its 27th layer,
``Flux2Transformer2DModel`` and ``AutoencoderKLFlux2``.

What the planner needs is here: the components and their classes, which stage loads each and how (the
encoder split, and of it only the text path: its embeddings and layers 1-27, since the pipeline stacks
hidden states 9, 18 and 27; layers 28-36, the final norm and ``lm_head`` are never run), the block lists,
the embeddings file's tensors (``prompt_embeds`` ``[batch, tokens, 3 x hidden]``; no pooled embeddings),
the usual settings of the distilled and base variants, the example inputs of each forward for the
activation count, and its twin (:mod:`.twin`: ``klein-tiny``). The published configs ship with ``helpers``
(``helpers/configs/FLUX.2-klein-*``).

The stages' calls: :func:`encode` (the pipeline's own ``encode_prompt`` on the text path; the base
variants add the empty prompt's embeddings, their guidance's negative), :func:`diffusion_pipeline`
(``Flux2KleinPipeline`` without its encoder, distilled or not as the variant is), and the checks of a
file against a variant (:func:`embeddings_check`).
"""

from __future__ import annotations

import hashlib

import torch

from helpers.errors import UserError
from helpers.families import Component, Family, Variant
from helpers.families.common import vae_decode_inputs
from helpers.families.flux2.twin import TWINS

TEXT, DIFFUSION = "text_encoding", "diffusion"

#: the encoder's hidden states the pipeline stacks (index 0 is the embeddings' output): the text path
#: runs the layers up to the deepest of them
HIDDEN_STATES = (9, 18, 27)


def text_path(module: torch.nn.Module) -> torch.nn.Module:
    """A ``Qwen3ForCausalLM`` skeleton cut to what stage 1 runs: its embeddings and the layers up to the
    deepest hidden state read; the later layers removed, the final norm and the head made no-ops (the
    forward calls them; the hidden states read are the layers' own outputs, and a forward of the whole
    returns the deepest one as its "logits"). A tied head is the embeddings: they stay, once."""
    body = module.model
    deepest = max(HIDDEN_STATES)
    if len(body.layers) < deepest:
        raise UserError(f"the text encoder has {len(body.layers)} layers; FLUX.2 [klein] reads its hidden state "
                        f"{deepest}: not a klein text encoder.")
    body.layers = torch.nn.ModuleList(list(body.layers)[:deepest])
    body.norm = torch.nn.Identity()
    module.lm_head = torch.nn.Identity()  # never run by stage 1, which runs the body (module.model) alone
    module.config.num_hidden_layers = deepest  # its own copy: what is left has no head to tie either
    module.config.tie_word_embeddings = False
    return module


COMPONENTS = (
    Component("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler", role="scheduler", stage=DIFFUSION),
    Component("text_encoder", "transformers", "Qwen3ForCausalLM", stage=TEXT, placement="mapped",
              config_class="Qwen3Config", required_key="num_hidden_layers", block_lists=("model.layers",),
              short="Qwen3", long="Qwen3 text encoder", colour="#8c564b", activation="the Qwen3 text path",
              fingerprint_keys=("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"),
              computes=text_path),
    Component("tokenizer", "transformers", "Qwen2TokenizerFast", role="tokenizer", stage=TEXT),
    Component("transformer", "diffusers", "Flux2Transformer2DModel", stage=DIFFUSION, placement="mapped",
              required_key="num_single_layers", block_lists=("transformer_blocks", "single_transformer_blocks"),
              short="transformer", long="transformer", colour="#e377c2", activation="a denoising step"),
    Component("vae", "diffusers", "AutoencoderKLFlux2", stage=DIFFUSION, placement="whole", required_key="latent_channels",
              short="VAE", long="VAE", colour="#bcbd22", activation="the VAE's decode"),
)

VARIANTS = {
    # distilled: 4 steps without classifier-free guidance (the pipeline ignores guidance above 1)
    "klein": Variant(steps=4, guidance=1.0, text_length=512, max_text_length=512, guidance_embedder=False),
    # base: 50 steps with classifier-free guidance (the pipeline's own defaults)
    "klein-base": Variant(steps=50, guidance=4.0, text_length=512, max_text_length=512, guidance_embedder=False),
}


def variant_of(transformer_config: dict, index: dict | None = None) -> str:
    """The distilled and base transformers share one config: the variant is the pipeline's
    ``is_distilled`` in ``model_index.json`` (the base repositories leave it out: classifier-free
    guidance); without an index, the distilled one."""
    return "klein" if index is None or index.get("is_distilled") else "klein-base"


def embedding_shapes(configs: dict, batch: int, tokens: int) -> dict[str, tuple[int, ...]]:
    cfg = configs.get("transformer", {})
    return {"prompt_embeds": (batch, tokens, cfg.get("joint_attention_dim"))}


def example_inputs(component: str, module: torch.nn.Module, dtype: torch.dtype, height: int = 1024,
                   width: int = 1024, tokens: int = 512, device="meta") -> tuple[torch.nn.Module, dict]:
    """``(module, inputs)`` for one forward of ``component``, batch 1, tensors empty on ``device``: the
    transformer's denoising step (512 text tokens and the image's 16x16 patches, 4 position axes), the
    text path on one prompt, the VAE's decode (32 latent channels at an eighth of the size)."""
    device = torch.device(device)
    if component == "transformer":
        cfg = module.config
        n = (height // 16) * (width // 16)
        inputs = dict(hidden_states=torch.empty(1, n, cfg.in_channels, dtype=dtype, device=device),
                      encoder_hidden_states=torch.empty(1, tokens, cfg.joint_attention_dim, dtype=dtype, device=device),
                      timestep=torch.empty(1, dtype=dtype, device=device),
                      img_ids=torch.zeros(1, n, 4, dtype=torch.long, device=device),
                      txt_ids=torch.zeros(1, tokens, 4, dtype=torch.long, device=device), return_dict=False)
        return module, inputs
    if component == "text_encoder":
        # the causal mask as the layers take it (a fused kernel's; building it reads values, which meta has not)
        return module.model, dict(input_ids=torch.zeros(1, tokens, dtype=torch.long, device=device), use_cache=False,
                                  attention_mask={"full_attention": None})
    if component == "vae":
        return vae_decode_inputs(module, dtype, height, width, device)
    raise UserError(f"activations are estimated for transformer, vae and text_encoder, not {component!r}.")


def encode(family: Family, parts: dict, prompts: list[str], device, length: int,
           variant: str | None = None) -> dict[str, torch.Tensor]:
    """``Flux2KleinPipeline.encode_prompt`` with only the text path and the tokenizer: the chat
    template, the body run to layer 27, hidden states 9, 18 and 27 side by side. The base variants run
    classifier-free guidance against the empty prompt (the pipeline's negative), encoded here too.
    Returns ``prompt_embeds`` (in the encoder's dtype), ``text_ids`` and, for the base variants,
    ``negative_prompt_embeds``."""
    body = parts["text_encoder"].model  # the text path: stage 1 never runs the head
    pipe = family.pipeline_class()(scheduler=None, vae=None, transformer=None, text_encoder=body,
                                   tokenizer=parts["tokenizer"])
    embeds, ids = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=length,
                                     text_encoder_out_layers=HIDDEN_STATES)
    out = {"prompt_embeds": embeds, "text_ids": ids}
    if variant == "klein-base":
        out["negative_prompt_embeds"], _ = pipe.encode_prompt(prompt=[""] * len(prompts), device=device,
                                                              max_sequence_length=length,
                                                              text_encoder_out_layers=HIDDEN_STATES)
    return out


def _chat(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def token_report(parts: dict, prompts: list[str], length: int) -> list[dict]:
    """Tokens per prompt as Qwen3 reads it (inside the chat template), and whether ``length`` cuts it."""
    tok = parts["tokenizer"]
    rows = []
    for i, p in enumerate(prompts):
        n = len(tok(_chat(tok, p)).input_ids)
        rows.append({"prompt": i, "qwen3 tokens": n, "cut": "Qwen3" if n > length else ""})
    return rows


def truncation_warnings(rows: list[dict], length: int) -> list[str]:
    return [f"prompt {i} is {r['qwen3 tokens']} Qwen3 tokens in the chat template; only the first {length} are "
            "used (raise max_sequence_length, up to 512, or shorten it)." for i, r in enumerate(rows)
            if r["qwen3 tokens"] > length]


def embeddings_facts(parts: dict) -> dict[str, str]:
    """What else decides the embeddings, recorded in the file: the hidden states read (and so the layers
    run) and the chat template the prompts were wrapped in (its hash)."""
    template = parts["tokenizer"].chat_template or ""
    return {"hidden_states": ",".join(map(str, HIDDEN_STATES)),
            "text_encoder_layers_read": str(max(HIDDEN_STATES)),
            "chat_template": hashlib.sha256(template.encode()).hexdigest()[:16]}


def diffusion_pipeline(family: Family, parts: dict, variant: str | None = None):
    """The pipeline with the diffusion stage's parts (scheduler, transformer, VAE) and no encoder; the
    base variants run classifier-free guidance (against the file's negative embeddings), the
    distilled ones never do."""
    return family.pipeline_class()(**parts, text_encoder=None, tokenizer=None, is_distilled=variant != "klein-base")


def pipeline_inputs(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's embeddings as the pipeline takes them (it makes the text's position ids itself)."""
    return {k: tensors[k] for k in ("prompt_embeds", "negative_prompt_embeds") if k in tensors}


def setting_notes(variant: str | None, steps: int, guidance: float, length: int | None) -> list[str]:
    """Notes on unusual but valid choices for the distilled and base variants."""
    notes = []
    if variant == "klein-base":
        if guidance <= 1:
            notes.append(f"guidance {guidance:g}: the base model runs without classifier-free guidance (its usual "
                         "is 4.0, with the empty prompt as the negative).")
    else:
        if steps != 4:
            notes.append(f"FLUX.2 [klein] is distilled for 4 steps; {steps} works but is unusual.")
        if guidance != 1:
            notes.append("FLUX.2 [klein] is distilled: it runs without classifier-free guidance, so guidance "
                         f"{guidance:g} is not used.")
    return notes


def embeddings_check(variant: str | None, guidance: float, names) -> str | None:
    """A refusal, before any weight loads, of a file the run cannot use: a base model's guidance needs
    the empty prompt's embeddings, which only an encoding for a base model writes."""
    if variant == "klein-base" and guidance > 1 and "negative_prompt_embeds" not in names:
        return ("the base model runs classifier-free guidance, against the empty prompt's embeddings, and this file "
                "has none (it was encoded for a distilled klein): encode the prompts with the base model, or run "
                "with --guidance 1 (no guidance).")
    return None


def bench_inputs(component: str, module: torch.nn.Module, dtype: torch.dtype, height: int | None, width: int | None,
                 tokens: int) -> dict:
    """One call's inputs of ``component`` with seeded random values, the same in every precision (drawn
    in float32, rounded to bf16, given in ``dtype``): the text path one prompt of random token ids; the
    transformer a denoising step of a ``height`` x ``width`` image, with the pipeline's position ids."""
    g = torch.Generator().manual_seed(0)
    if component == "text_encoder":
        return {"input_ids": torch.randint(0, module.config.vocab_size, (1, tokens), generator=g), "use_cache": False}
    pipe, cfg = FAMILY.pipeline_class(), module.config
    h, w = height // 16, width // 16
    return dict(
        hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=g).to(torch.bfloat16).to(dtype),
        encoder_hidden_states=torch.randn(1, tokens, cfg.joint_attention_dim, generator=g).to(torch.bfloat16).to(dtype),
        timestep=torch.tensor([0.5], dtype=dtype),
        img_ids=pipe._prepare_latent_ids(torch.zeros(1, 1, h, w)), txt_ids=pipe._prepare_text_ids(torch.zeros(1, tokens, 1)),
        return_dict=False,
    )


def diffusers_single_file(folder, path, compute: torch.dtype):
    """The transformer as diffusers reads a single file itself: ``from_single_file`` with this model's
    config (diffusers takes any FLUX.2 file for FLUX.2 [dev]'s otherwise), its own key conversion; a
    GGUF file with its ``GGUFQuantizationConfig`` (weights held as stored, each dequantized whole at
    every call)."""
    from diffusers import Flux2Transformer2DModel, GGUFQuantizationConfig

    extra = {"quantization_config": GGUFQuantizationConfig(compute_dtype=compute)} if str(path).endswith(".gguf") else {}
    return Flux2Transformer2DModel.from_single_file(str(path), config=str(folder.parent), subfolder=folder.name,
                                                    dtype=compute, local_files_only=True, **extra)


def block_counts(module) -> str:
    """The repeated blocks of a FLUX.2 component, as text (``5 double + 20 single``, ``27 of 36 layers``)."""
    name = type(module).__name__
    if name == "Flux2Transformer2DModel":
        return f"{len(module.transformer_blocks)} double + {len(module.single_transformer_blocks)} single"
    if name == "Qwen3ForCausalLM":
        return f"{len(module.model.layers)} of {module.config.num_hidden_layers} Qwen3DecoderLayer"
    return ""


FAMILY = Family(
    name="flux2", title="FLUX.2 [klein]", pipeline="Flux2KleinPipeline", components=COMPONENTS, variants=VARIANTS,
    twins=TWINS,
    variant_of=variant_of, embedding_names=("prompt_embeds",), embedding_shapes=embedding_shapes,
    optional_embeddings=("text_ids", "negative_prompt_embeds"),
    stage_weights={DIFFUSION: "bf16", TEXT: "bf16"},
    text_compute=("bf16", "Qwen3 is stored in bf16 and computes in it"),
    method_budget="0=8.5GiB,cpu=30GiB", reference_model="flux2-klein-4b",
    names={"flux2-klein-4b": "black-forest-labs/FLUX.2-klein-4B", "flux2-klein-9b": "black-forest-labs/FLUX.2-klein-9B",
           "flux2-klein-base-4b": "black-forest-labs/FLUX.2-klein-base-4B",
           "flux2-klein-base-9b": "black-forest-labs/FLUX.2-klein-base-9B"},
    gated=frozenset({"black-forest-labs/FLUX.2-klein-9B", "black-forest-labs/FLUX.2-klein-base-9B"}),
    shipped={"black-forest-labs/FLUX.2-klein-4B": "FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-9B": "FLUX.2-klein-9B",
             "black-forest-labs/FLUX.2-klein-base-4B": "FLUX.2-klein-base-4B",
             "black-forest-labs/FLUX.2-klein-base-9B": "FLUX.2-klein-base-9B"},
    example_inputs=example_inputs, block_counts=block_counts,
    encode=encode, token_report=token_report, truncation_warnings=truncation_warnings,
    embeddings_facts=embeddings_facts, diffusion_pipeline=diffusion_pipeline, pipeline_inputs=pipeline_inputs,
    setting_notes=setting_notes, embeddings_check=embeddings_check, bench_inputs=bench_inputs,
    layout="helpers.families.flux2.layout", diffusers_single_file=diffusers_single_file,
)
