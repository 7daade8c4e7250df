"""FLUX.1's twins: the widths of ``tiny`` and ``medium`` (the depths are FLUX.1's own), their tokenizers
written in code, their components' configs and modules, and how a twin is saved in the diffusers layout.
:mod:`helpers.twins.builder` builds one into a folder on first use; :mod:`helpers.twins.training` trains
``tiny`` on the shapes world.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path

from helpers.errors import UserError
from helpers.twins.shipped import trained_weights_info, trained_weights_path


@dataclass(frozen=True)
class TwinSpec:
    """Widths of one twin; depths are FLUX.1's own."""

    clip_hidden: int
    clip_heads: int
    clip_ff: int
    t5_d_model: int
    t5_heads: int
    t5_d_kv: int
    t5_d_ff: int
    flux_heads: int
    flux_head_dim: int
    flux_axes_rope: tuple[int, int, int]
    vae_channels: tuple[int, int, int, int]
    vae_groups: int
    seed: int = 0
    clip_layers: int = 12
    t5_layers: int = 24
    flux_double: int = 19
    flux_single: int = 38
    guidance_embeds: bool = True  # FLUX.1-dev's transformer; schnell has none
    #: split the big weights into shards as the real checkpoint does (T5: 2 files, Flux: 3 files)
    t5_shards: int = 2
    flux_shards: int = 3
    #: the file of trained weights: a name in ``helpers/twins/`` or a path (None: random weights)
    trained: str | None = None
    #: the family it is a twin of (:mod:`helpers.families`)
    family: str = "flux1"

    @property
    def variant(self) -> str:
        return "dev" if self.guidance_embeds else "schnell"

    def note(self, trained: bool) -> str:
        """What a built twin's marker says of its weights."""
        if not trained:
            return "Random weights in the FLUX.1 layout, built offline; its images are noise."
        return ("Trained on the shapes world (helpers.twins.world): one circle, square or triangle in a named "
                "colour on a plain background of another, optionally placed.")

    def configs(self, trained: bool = True) -> dict[str, dict]:
        """Its components' configs (:func:`twin_configs`)."""
        return twin_configs(self, trained)

    def write(self, folder: Path) -> None:
        """Build the twin and save it in ``folder`` in the diffusers layout (:func:`write_twin`)."""
        write_twin(self, folder)


TWINS: dict[str, TwinSpec] = {
    # trained on the shapes world (helpers.twins.training); the transformer has 4 heads (64 wide, as wide as the
    # packed latent, 16 channels x 2x2, that it passes from input to output): at 32 it cannot learn the world
    "tiny": TwinSpec(
        clip_hidden=32, clip_heads=2, clip_ff=64,
        t5_d_model=32, t5_heads=4, t5_d_kv=8, t5_d_ff=64,
        flux_heads=4, flux_head_dim=16, flux_axes_rope=(4, 6, 6),
        vae_channels=(16, 16, 32, 32), vae_groups=8,
        trained="tiny.safetensors",
    ),
    # about 1.2 GB in bfloat16: the CPU benchmarks' model
    "medium": TwinSpec(
        clip_hidden=256, clip_heads=4, clip_ff=1024,
        t5_d_model=512, t5_heads=8, t5_d_kv=64, t5_d_ff=1280,
        flux_heads=5, flux_head_dim=128, flux_axes_rope=(16, 56, 56),
        vae_channels=(32, 64, 128, 128), vae_groups=32,
    ),
}


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _word_merges(words) -> list[tuple[str, str]]:
    """BPE merges that make each word one token (``red</w>``), whatever the other words' merges do.

    Each word gets merges, ranked after all earlier ones, for the pieces the earlier merges leave it in;
    a merge ranked later never applies to a word that earlier merges already make whole.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(pieces := _bpe(word, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def clip_merges() -> list[tuple[str, str]]:
    """The CLIP twin's merges: the shapes world's words (:data:`helpers.twins.world.WORDS`) become one token each."""
    from helpers.twins.world import WORDS

    return _word_merges(WORDS)


def clip_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet, the world's words whole, then the specials (highest ids, as in CLIP).

    Bytes are written as printable characters the way byte-level BPE does: printable Latin-1 bytes
    stand for themselves, the others are moved to code points from 256 up. Any other text is
    spelled out byte by byte. ``<|endoftext|>`` keeps the highest id: CLIP pools at it.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    shifted = 0
    chars = []
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    tokens = chars + [c + "</w>" for c in chars]
    for a, b in clip_merges():
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


#: Whole-word pieces of the T5 twin's vocabulary (with the word-start mark); the rest is characters.
T5_WORDS = tuple(dict.fromkeys((
    "a an the of and in on at with by for to from is are over under near into "
    "photo photograph picture painting drawing portrait landscape illustration render "
    "cat dog bird horse fish tree flower forest mountain river lake sea ocean sky cloud sun moon star "
    "city street house castle room window door car boat train road bridge "
    "man woman child person people face hand eye "
    "red orange yellow green blue purple pink black white gray grey brown gold silver "
    "big small tall old young new bright dark light night day morning evening "
    "beautiful detailed realistic cinematic sharp soft style art "
    "holding sitting standing walking wearing made "
    # the shapes world's words (helpers.twins.world.WORDS), whole
    "circle square triangle background left right top bottom middle"
).split()))


def t5_vocab() -> list[tuple[str, float]]:
    """The T5 twin's Unigram vocabulary, fixed in code: specials, then whole words, then characters.

    Scores make whole words win over spelling them out; any text of printable ASCII tokenises
    without unknowns.
    """
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -8.0)]
    pieces += [("\u2581" + w, -5.0) for w in T5_WORDS]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [("\u2581" + c, -9.0) for c in chars]
    pieces += [(c, -10.0) for c in chars]
    return pieces


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


#: the parts of a trained twin whose weights its file holds (all four learn: see helpers.twins.training)
TRAINED_COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae")


def twin_configs(spec: TwinSpec, trained: bool = True) -> dict[str, dict]:
    """The configs of a twin's components, in the real FLUX.1-dev shapes except for widths.

    A trained twin's VAE carries the latent scale and shift measured when it was trained.
    """
    clip_vocab_size = len(clip_vocab())
    configs = {
        "text_encoder": dict(
            vocab_size=clip_vocab_size,
            hidden_size=spec.clip_hidden,
            intermediate_size=spec.clip_ff,
            projection_dim=spec.clip_hidden,
            num_hidden_layers=spec.clip_layers,
            num_attention_heads=spec.clip_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            # the legacy id 2 makes CLIP pool at the highest token id, <|endoftext|>, as in FLUX.1
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        "text_encoder_2": dict(
            vocab_size=_round_up(len(t5_vocab()), 64),
            d_model=spec.t5_d_model,
            d_kv=spec.t5_d_kv,
            d_ff=spec.t5_d_ff,
            num_layers=spec.t5_layers,
            num_decoder_layers=spec.t5_layers,
            num_heads=spec.t5_heads,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu_new",
            is_gated_act=True,
            layer_norm_epsilon=1e-6,
            tie_word_embeddings=False,
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        "transformer": dict(
            patch_size=1,
            in_channels=64,
            num_layers=spec.flux_double,
            num_single_layers=spec.flux_single,
            attention_head_dim=spec.flux_head_dim,
            num_attention_heads=spec.flux_heads,
            joint_attention_dim=spec.t5_d_model,
            pooled_projection_dim=spec.clip_hidden,
            guidance_embeds=spec.guidance_embeds,
            axes_dims_rope=tuple(spec.flux_axes_rope),
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=tuple(spec.vae_channels),
            layers_per_block=2,
            act_fn="silu",
            latent_channels=16,
            norm_num_groups=spec.vae_groups,
            sample_size=1024,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=True,
            force_upcast=True,
        ),
        # FLUX.1-dev's scheduler, unchanged
        "scheduler": dict(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    }
    info = trained_weights_info(spec) if trained else None
    if info is not None:
        configs["vae"]["scaling_factor"] = float(info["vae_scaling_factor"])
        configs["vae"]["shift_factor"] = float(info["vae_shift_factor"])
    return configs


def _shard_size(module, shards: int) -> int:
    """A shard size that splits ``module``'s weights into about ``shards`` files."""
    sizes = [t.numel() * t.element_size() for t in module.state_dict().values()]
    return max(1, sum(sizes) // shards + max(sizes))


def twin_modules(spec: TwinSpec, trained: bool = True) -> dict:
    """Every part of a twin in memory, in float32: the four models from fixed seeds (then, for a
    trained twin and ``trained``, the shipped weights of the parts it was trained on), the two
    tokenizers and the scheduler. What :func:`build_twin` saves and the trainer starts from.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    configs = twin_configs(spec, trained=trained)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(spec.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).eval()
        torch.manual_seed(spec.seed + 1)
        text_encoder_2 = T5EncoderModel(T5Config(**configs["text_encoder_2"])).eval()
        torch.manual_seed(spec.seed + 2)
        transformer = FluxTransformer2DModel(**configs["transformer"]).eval()
        torch.manual_seed(spec.seed + 3)
        vae = AutoencoderKL(**configs["vae"]).eval()
    parts = dict(text_encoder=text_encoder, text_encoder_2=text_encoder_2, transformer=transformer, vae=vae)
    if trained and spec.trained:
        from safetensors.torch import load_file

        state = load_file(str(trained_weights_path(spec)))
        for component in TRAINED_COMPONENTS:
            prefix = component + "."
            sub = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                raise UserError(f"{trained_weights_path(spec).name} holds no weights for {component}; "
                                "make the file again with `python -m helpers train-twin`.")
            parts[component].load_state_dict(sub, strict=True)
    # real model_max_length values (77 and 512), or truncation would silently do nothing
    parts["tokenizer"] = CLIPTokenizer(vocab=clip_vocab(), merges=clip_merges(), model_max_length=77)
    parts["tokenizer_2"] = T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=512)
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(**configs["scheduler"])
    return parts


def write_twin(spec: TwinSpec, folder: Path) -> None:
    """Build every component (:func:`twin_modules`) and save it in the diffusers layout (bfloat16)."""
    import torch
    from diffusers import FluxPipeline

    parts = twin_modules(spec)
    # the real checkpoints store every component in bfloat16 (cast tensor by tensor: diffusers'
    # Module.to() warns about modules it would keep in float32, of which FLUX has none)
    for component in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        for tensor in (*parts[component].parameters(), *parts[component].buffers()):
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.bfloat16)

    pipe = FluxPipeline(**parts)
    pipe.save_config(folder)  # model_index.json
    parts["scheduler"].save_pretrained(folder / "scheduler")
    parts["tokenizer"].save_pretrained(folder / "tokenizer")
    parts["tokenizer_2"].save_pretrained(folder / "tokenizer_2")
    parts["text_encoder"].save_pretrained(folder / "text_encoder")
    parts["text_encoder_2"].save_pretrained(
        folder / "text_encoder_2", max_shard_size=_shard_size(parts["text_encoder_2"], spec.t5_shards))
    parts["transformer"].save_pretrained(
        folder / "transformer", max_shard_size=_shard_size(parts["transformer"], spec.flux_shards))
    parts["vae"].save_pretrained(folder / "vae")
