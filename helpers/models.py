"""Model names, and the offline twins of FLUX.1 that the notebooks run on.

One name picks the model everywhere (:func:`resolve_model`):

- ``tiny`` (default) and ``medium``: FLUX.1 twins built here, on first use, in the real diffusers
  layout (``model_index.json``, ``scheduler/``, ``text_encoder/`` CLIP, ``tokenizer/``,
  ``text_encoder_2/`` T5 encoder, ``tokenizer_2/``, ``transformer/``, ``vae/``), with the real
  classes and block structure (T5: 24 blocks; Flux: 19 double + 38 single blocks; CLIP: 12 layers;
  VAE: 4 levels of 2 ResNet blocks) but small widths. They load back with the same
  ``from_pretrained`` calls a real checkpoint gets. ``tiny`` builds from the trained weights the
  package ships (``helpers/twins/tiny.safetensors``; :mod:`helpers.twins.training` made them on the
  shapes world of :mod:`helpers.twins.world`), so it draws what it is told in that world; ``medium`` has
  random weights (benchmarks need its size, not its pictures), and its images are noise.
- ``flux-dev`` / ``flux-schnell``: black-forest-labs/FLUX.1-dev (gated) and FLUX.1-schnell (open).
- ``flux-dev-random``: FLUX.1-dev's real architecture (the shipped configs) with random bfloat16
  weights, written here on first use, for full-size benchmarks without a download (23.8 GB for
  the transformer; only the components asked for are built).
- any other hub id (``owner/name``), or a local folder in the diffusers layout.

``$FLUX_MODEL`` overrides the notebooks' default for a whole run. Explained in
``00_environment-check.ipynb``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import string
import sys
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from helpers.errors import UserError
from helpers.families import Family, default_family, families, family_for_pipeline, family_named
from helpers.files import not_a_file, outputs_dir

#: Environment variable that picks the model for a whole run of the notebooks.
MODEL_ENV = "FLUX_MODEL"
DEFAULT_MODEL = "tiny"

def _names() -> dict[str, str]:
    """The real models by short name, across the families (flux-dev -> black-forest-labs/FLUX.1-dev)."""
    return {short: repo for f in families() for short, repo in f.names.items()}


def _family_of_repo(repo_id: str | None):
    return next((f for f in families() if repo_id in f.names.values() or repo_id in f.shipped), None)


#: full-size models with random weights: name -> the repository whose shipped configs they copy
RANDOM = {"flux-dev-random": "black-forest-labs/FLUX.1-dev"}

#: Bump when the builder changes what it writes; older twin folders are then rebuilt.
BUILDER_VERSION = 2
MARKER = "twin.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------- the twins


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


#: where the package keeps trained twins' weights
TRAINED_DIR = Path(__file__).parent / "twins"


def trained_weights_path(spec: TwinSpec) -> Path | None:
    """The file of ``spec``'s trained weights (a name in ``helpers/twins/``, or a path), or None for a random twin."""
    return TRAINED_DIR / spec.trained if spec.trained else None


def trained_weights_info(spec: TwinSpec) -> dict | None:
    """What the shipped weights file of a trained twin says of itself (its metadata), plus its sha256."""
    path = trained_weights_path(spec)
    if path is None:
        return None
    if not path.is_file():
        raise UserError(f"the trained weights of this twin are missing ({path.name} in the helpers package); "
                        "reinstall the project, or make them again with `python -m helpers train-twin`.")
    import hashlib

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return meta


def _marker(name: str, spec: TwinSpec) -> dict:
    spec_dict = asdict(spec)
    info = trained_weights_info(spec)
    marker = {
        "twin": name,
        "builder_version": BUILDER_VERSION,
        "spec": json.loads(json.dumps(spec_dict)),
    }
    if info is None:
        marker["note"] = "Random weights in the FLUX.1 layout, built offline; its images are noise."
    else:
        marker["note"] = ("Trained on the shapes world (helpers.twins.world): one circle, square or triangle in a named "
                          "colour on a plain background of another, optionally placed.")
        marker["weights_sha256"] = info["sha256"]
    return marker


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


def _write_twin(spec: TwinSpec, folder: Path) -> None:
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


def twin_folder(name: str) -> Path:
    """Where the twin ``name`` is kept: ``outputs/models/<name>``."""
    return outputs_dir() / "models" / name


def twin_is_built(name: str, folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a complete twin made by this builder version with these widths."""
    marker = Path(folder) / MARKER
    try:
        return json.loads(marker.read_text()) == _marker(name, TWINS[name])
    except (OSError, ValueError):
        return False


def _remove_stale_builds(folder: Path) -> None:
    """Remove temporary folders that killed builds left next to ``folder`` (their process is gone)."""
    import psutil

    for stale in folder.parent.glob(f".{folder.name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if stale.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _built_here(name: str, folder: Path) -> bool:
    """True when ``folder`` holds twin ``name`` as some version of this builder left it (its marker
    names the twin and a builder version): the only kind of folder a build may replace."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("twin") == name and "builder_version" in marker


def build_twin(name: str = "tiny", folder: str | os.PathLike | None = None, rebuild: bool = False) -> Path:
    """The folder of twin ``name`` (``tiny`` or ``medium``), building it first if needed.

    Reuses a complete folder; otherwise builds into a temporary sibling folder and renames it into
    place, so an interrupted build never leaves a half-written twin behind. Deterministic: two
    builds give byte-identical files. Replaces only a folder this builder made (an older version or
    other widths of the same twin), never another folder; and where another build of the same twin
    finished first, keeps that one instead of deleting it.
    """
    if name not in TWINS:
        raise UserError(f"unknown twin {name!r}; the twins are {', '.join(TWINS)}.")
    folder = Path(folder) if folder is not None else twin_folder(name)
    if not rebuild and twin_is_built(name, folder):
        return folder

    def check_replaceable() -> None:
        if folder.exists() and any(folder.iterdir()) and not _built_here(name, folder):
            raise UserError(f"{folder} exists and is not a twin {name!r} built here (its {MARKER} does not say so); "
                            "nothing in it was changed: choose an empty or new folder.")

    check_replaceable()
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(folder)
    tmp = folder.parent / f".{folder.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_twin(TWINS[name], tmp)
        (tmp / MARKER).write_text(json.dumps(_marker(name, TWINS[name]), indent=2) + "\n")
        try:
            tmp.rename(folder)  # an absent (or empty) folder: replaced in one step
        except OSError:  # it holds something: a twin another build just finished, or one to replace
            if not rebuild and twin_is_built(name, folder):
                return folder  # the same files as ours: keep theirs, in use perhaps
            check_replaceable()
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- full size, random weights

#: what ``flux-dev-random`` builds unless asked for more: the diffusion stage
RANDOM_DEFAULT = ("scheduler", "transformer", "vae")
_SHARD_BYTES = 10 * 10**9  # as the real transformer: 3 files of up to 10 GB


def random_weight(name: str, shape: list[int], dtype, seed: int):
    """A deterministic random tensor for parameter ``name``, scaled as PyTorch's default init would.

    Matrices and convolutions: uniform in +-1/sqrt(fan_in) (``nn.Linear``'s default); norm weights:
    ones; biases and the rest: uniform in +-0.02. Seeded by the name, so any subset of a model
    can be built alone and still match a full build.
    """
    import zlib

    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) >= 2:
        bound = 1 / math.sqrt(math.prod(shape[1:]))
    elif "norm" in name and name.endswith((".weight", ".scale")):
        return torch.ones(shape, dtype=dtype)
    else:
        bound = 0.02
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=g)


def write_random_component(component: str, config: dict, folder: Path, seed: int = 0, progress=None) -> None:
    """``component`` from ``config`` with random bfloat16 weights, saved in the diffusers layout.

    Built tensor by tensor from the meta skeleton, one shard (up to 10 GB) in memory at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from safetensors.torch import save_file

    from helpers.architecture import skeleton

    module = skeleton(component, config)
    # each tensor once, under its first name: T5's shared embedding is stored as "shared.weight"
    # only, as in the real checkpoint (two names seeded apart would give two different tables)
    tensors = dict(module.named_parameters())
    tensors.update((n, b) for n, b in module.named_buffers() if n in module.state_dict(keep_vars=True))
    names = sorted(tensors)
    shapes = {n: list(t.shape) for n, t in tensors.items()}
    folder.mkdir(parents=True, exist_ok=True)
    transformers_style = component.startswith("text_encoder")
    stem = "model" if transformers_style else "diffusion_pytorch_model"
    shards, current, size = [], [], 0
    for n in names:
        nbytes = math.prod(shapes[n]) * 2
        if current and size + nbytes > _SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    steps = progress(range(len(shards)), desc=f"{component}: random weights") if progress else range(len(shards))
    for i in steps:
        file = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # each tensor seeds its own generator
            values = pool.map(lambda n: random_weight(n, shapes[n], torch.bfloat16, seed), shards[i])
            tensors = dict(zip(shards[i], values))
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shards[i]})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = dict(config)
    if not transformers_style:
        cfg.setdefault("_class_name", {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL"}[component])
    cfg["torch_dtype" if transformers_style else "_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def build_random(name: str = "flux-dev-random", folder: str | os.PathLike | None = None,
                 components=RANDOM_DEFAULT, rebuild: bool = False, configs: dict | None = None) -> Path:
    """The folder of ``name`` with at least ``components`` built (random weights, real architecture).

    Components already there are kept; each new one is written to a temporary folder and renamed
    into place, so an interrupted build leaves nothing half-written. ``configs`` overrides the
    shipped ones (tests build a small model this way).
    """
    from importlib import resources

    from tqdm.auto import tqdm

    from helpers.architecture import count_params, shipped_configs, skeleton

    if name not in RANDOM:
        raise UserError(f"unknown random model {name!r}; the random models are {', '.join(RANDOM)}.")
    family = _family_of_repo(RANDOM[name])
    shipped = resources.files("helpers") / "configs" / family.shipped[RANDOM[name]]
    folder = Path(folder) if folder is not None else twin_folder(name)
    configs = configs or shipped_configs(family.shipped[RANDOM[name]], family)
    unknown = [c for c in components if c not in ("scheduler", "text_encoder", "text_encoder_2", "transformer", "vae")]
    if unknown:
        raise UserError(f"{name} has random weights and no {', '.join(unknown)}: it is made for `python -m helpers "
                        "bench` (its components: scheduler, text_encoder, text_encoder_2, transformer, vae); to make "
                        "images use tiny, medium, flux-dev or flux-schnell.")

    def built(component: str) -> bool:
        marker = "scheduler_config.json" if component == "scheduler" else "config.json"
        return not rebuild and (folder / component / marker).is_file()

    todo = [c for c in components if not built(c)]
    need = sum(count_params(skeleton(c, configs[c])) * 2 for c in todo if c != "scheduler")
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise UserError(f"building {', '.join(todo)} of {name} writes {need / 2**30:.1f} GiB; {folder} has "
                        f"{free / 2**30:.1f} GiB free. Free some space or set FLUX_OUTPUTS to a larger disk.")
    if need:  # tens of GB for the full size: say so before the disk fills
        print(f"{name}: writing random weights for {', '.join(c for c in todo if c != 'scheduler')} "
              f"({need / 2**30:.1f} GiB) to {folder}", file=sys.stderr)
    for component in todo:
        target = folder / component
        tmp = folder / f".{component}.building-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if component == "scheduler":
                tmp.mkdir()
                (tmp / "scheduler_config.json").write_bytes(shipped.joinpath("scheduler", "scheduler_config.json").read_bytes())
            else:
                write_random_component(component, configs[component], tmp, progress=tqdm)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (folder / "model_index.json").write_bytes(shipped.joinpath("model_index.json").read_bytes())
    return folder


# --------------------------------------------------------------------------- the model knob


@dataclass(frozen=True)
class ModelRef:
    """A model name resolved once: a twin, a hub repository, or a local folder.

    Made at the edge (:func:`resolve_model`: the command line, a widget, a stage's entry point) and
    handed down, so the plans, the loaders and the embeddings file all ask one object: what it is
    (:attr:`kind`, :attr:`label`), its :attr:`configs` (read once, no weights, no download), the
    :attr:`fingerprint` an embeddings file must carry, its :attr:`variant`, and :meth:`folder`.
    """

    name: str
    kind: Literal["twin", "hub", "local", "random"]
    repo_id: str | None = None
    path: Path | None = None

    @cached_property
    def family(self) -> Family:
        """What the model is (:mod:`helpers.families`): a twin's by its builder, a known name's by its
        repository, a folder's by its ``model_index.json`` (``_class_name``)."""
        if self.kind == "twin":
            return family_named(TWINS[self.name].family)
        if self.kind == "random":
            return _family_of_repo(RANDOM[self.name])
        if self.path is not None:
            return family_for_pipeline(_pipeline_class(self.path / "model_index.json", self.name))
        known = _family_of_repo(self.repo_id)
        if known is not None:
            return known
        index = _cached_model_index(self.repo_id)
        return family_for_pipeline(_pipeline_class(index, self.name)) if index is not None else default_family()

    @property
    def gated(self) -> bool:
        return self.repo_id in self.family.gated

    @property
    def label(self) -> str:
        """The name that finds this model again from another process: a local folder's full path."""
        return str(self.path) if self.kind == "local" else self.name

    @property
    def variant(self) -> str | None:
        """The family's variant (FLUX.1: ``dev`` with a guidance embedder, else ``schnell``), for the
        usual steps, guidance and text length.

        Known names answer directly; a local folder answers from its transformer config; an unknown
        hub id gives ``None``.
        """
        if self.kind in ("twin", "random"):
            return TWINS[self.name].variant if self.kind == "twin" else "dev"
        repo = self.repo_id
        if repo in self.family.shipped:
            return self.family.variant_of(self._configs["transformer"])
        if self.path is not None:
            try:
                cfg = json.loads((self.path / "transformer" / "config.json").read_text())
                return self.family.variant_of(cfg)
            except (OSError, ValueError):
                return None
        return None

    @property
    def usual(self):
        """The usual steps, guidance and text length of this model's variant (:class:`Variant`)."""
        return self.family.variant(self.variant)

    @cached_property
    def _configs(self) -> dict[str, dict]:
        return _read_configs(self)

    @property
    def configs(self) -> dict[str, dict]:
        """Each component's config (a fresh copy: a caller may change its own); read once per object.

        Twins from their builder, FLUX.1-dev/schnell from the shipped configs, a local folder from
        its ``config.json`` files, another hub id from the Hugging Face cache if its configs are there.
        """
        return copy.deepcopy(self._configs)

    @cached_property
    def fingerprint(self) -> str:
        """The text encoders' shapes, hashed: what an embeddings file made by this model carries
        (:meth:`helpers.families.Family.fingerprint`)."""
        return self.family.fingerprint(self._configs)

    def folder(self, components=None, download: bool = False, rebuild: bool = False, configs=()) -> Path:
        """A local folder in the diffusers layout: built (a twin), found in the cache, or given.
        ``components``: only those (a hub model, the random model); ``configs``: components of which
        a hub model needs only the config (see :func:`hub_patterns`)."""
        if self.kind == "twin":
            return build_twin(self.name, rebuild=rebuild)
        if self.kind == "random":
            return build_random(self.name, components=components or RANDOM_DEFAULT, rebuild=rebuild)
        if self.kind == "local":
            return self.path
        return hub_snapshot(self, components=components, download=download, configs=configs)

    def as_dict(self) -> dict:
        """JSON for another process: :func:`resolve_model` of ``label`` makes it again."""
        return {"name": self.name, "kind": self.kind, "repo_id": self.repo_id, "label": self.label,
                "fingerprint": self.fingerprint}


def default_model() -> str:
    """The notebooks' model: ``$FLUX_MODEL`` when set, else ``tiny``."""
    return os.environ.get(MODEL_ENV, "").strip() or DEFAULT_MODEL


def _check_model_folder(path: Path, text: str) -> None:
    """A folder is the pipeline its ``model_index.json`` names, and every file in its components'
    folders is a file (``stat`` only: a FIFO or a device there would hang or never end a read)."""
    index = path / "model_index.json"
    kind = not_a_file(index)
    if kind == "missing":
        raise UserError(f"{text} has no model_index.json: it is not a model folder in the diffusers layout.")
    if kind:
        raise UserError(f"{index} is {kind}, not a file; a model folder's model_index.json is a JSON file.")
    try:
        family_for_pipeline(_pipeline_class(index, text))
    except UserError as err:
        raise UserError(f"{text} {err}: give one of those, or one of {', '.join([*TWINS, *_names()])}.") from None
    for component in sorted(p for p in path.iterdir() if p.is_dir()):
        for file in sorted(component.iterdir()):
            kind = not_a_file(file)
            if kind == "missing":
                raise UserError(f"{file} is a link to nothing; download or copy the model folder again.")
            if kind and kind != "a folder":
                raise UserError(f"{file} is {kind}, not a file; a model folder holds files: copy it again.")


def _pipeline_class(index: Path, text: str):
    """The ``_class_name`` of a ``model_index.json`` (whatever it holds: the family lookup judges it)."""
    try:
        return json.loads(Path(index).read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{index} is not readable JSON; download or copy the model folder {text} again.") from None


def _cached_model_index(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - an id the cache cannot hold: nothing cached
        return None
    return Path(found) if isinstance(found, str) else None


def resolve_model(name: str | ModelRef | None = None) -> ModelRef:
    """Say what a model name means (no building, no download): see the module docstring.

    A :class:`ModelRef` is returned as it is: a function handed one resolves nothing again."""
    if isinstance(name, ModelRef):
        return name
    if name is None:
        name = default_model()
    text = str(name).strip()
    if not text:
        raise UserError(f"no model named; use one of {', '.join([*TWINS, *_names()])}, a hub id or a folder.")
    if text in TWINS:
        return ModelRef(text, "twin")
    if text in RANDOM:
        return ModelRef(text, "random")
    if text in _names():
        return ModelRef(text, "hub", repo_id=_names()[text])
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{text} is a file; a model is a folder in the diffusers layout (with model_index.json).")
        _check_model_folder(path, text)
        return ModelRef(text, "local", path=path.resolve())
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(text)
        except HFValidationError as err:
            raise UserError(f"{text!r} is not a valid hub id ({err}); and no such folder exists either.") from None
        return ModelRef(text, "hub", repo_id=text)
    raise UserError(
        f"unknown model {text!r}: no such folder, and not a hub id; "
        f"use one of {', '.join([*TWINS, *_names(), *RANDOM])}, a hub id (owner/name) or a local folder."
    )


def hub_patterns(components: tuple[str, ...] | list[str] | None = None, configs=(), family=None) -> list[str]:
    """The files to fetch for ``components`` only (all by default), never the single-file checkpoints;
    of ``configs``, only their ``config.json`` (a transformer whose weights come from a file of its own)."""
    every = (family or default_family()).subfolders
    wanted = every if components is None else tuple(components)
    unknown = [c for c in (*wanted, *configs) if c not in every]
    if unknown:
        raise UserError(f"unknown component(s) {', '.join(unknown)}; the components are {', '.join(every)}.")
    return ["model_index.json", *[f"{c}/*" for c in wanted], *[f"{c}/config.json" for c in configs if c not in wanted]]


def _hub_help(ref: ModelRef) -> str:
    page = f"https://huggingface.co/{ref.repo_id}"
    if ref.gated:
        return (
            f"{ref.repo_id} is gated: accept its licence at {page} while logged in, then log in here "
            "with `hf auth login` (or set HF_TOKEN)"
        )
    return f"see {page}"


def hub_snapshot(ref: ModelRef, components=None, download: bool = False, configs=()) -> Path:
    """The local folder of a hub model, from the Hugging Face cache; fetch it only if ``download``.

    Only the files of ``components`` (and the config of ``configs``) are looked for or fetched. Access
    to a gated model is checked before any download, with a message that says how to get it.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = hub_patterns(components, configs, ref.family)
    try:
        return Path(snapshot_download(ref.repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if not download:
            raise UserError(
                f"{ref.repo_id} is not in your Hugging Face cache; fetch it with "
                f"`python -m helpers model {ref.name} --download` ({_hub_help(ref)})."
            ) from None
    from huggingface_hub import auth_check

    try:
        auth_check(ref.repo_id)
    except GatedRepoError:
        raise UserError(f"no access to {ref.repo_id}: {_hub_help(ref)}.") from None
    except RepositoryNotFoundError:
        raise UserError(f"{ref.repo_id} was not found on the hub (or is private: log in with `hf auth login`).") from None
    except Exception as err:  # network down, proxy, ...
        raise UserError(f"cannot reach the hub to fetch {ref.repo_id} ({type(err).__name__}); check your connection.") from None
    return Path(snapshot_download(ref.repo_id, allow_patterns=patterns))


def local_folder(ref: ModelRef) -> Path | None:
    """The folder ``ref`` already has on this machine, without building or fetching anything; None if none."""
    if ref.kind == "local":
        return ref.path
    if ref.kind == "twin":
        folder = twin_folder(ref.name)
        return folder if twin_is_built(ref.name, folder) else None
    if ref.kind == "random":
        folder = twin_folder(ref.name)
        return folder if folder.is_dir() else None
    try:
        return hub_snapshot(ref, download=False)
    except UserError:
        return None


def _read_configs(ref: ModelRef) -> dict[str, dict]:
    from helpers.architecture import folder_configs, shipped_configs

    family = ref.family
    if ref.kind == "twin":
        return twin_configs(TWINS[ref.name])
    if ref.kind == "random":
        return shipped_configs(family.shipped[RANDOM[ref.name]], family)
    if ref.kind == "local":
        return folder_configs(ref.path, family)
    if ref.repo_id in family.shipped:
        return shipped_configs(family.shipped[ref.repo_id], family)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(ref.repo_id, allow_patterns=["*/config.json"], local_files_only=True))
    except Exception:
        raise UserError(
            f"no config shipped for {ref.repo_id} and none in your Hugging Face cache; fetch its configs with "
            f"`hf download {ref.repo_id} --include '*/config.json'` or pass a local folder."
        ) from None
    return folder_configs(folder, family)


def component_configs(model: str | ModelRef | None = None) -> tuple[str, dict[str, dict]]:
    """``(name, configs)`` for a model (see :attr:`ModelRef.configs`); no weights, no download."""
    ref = resolve_model(model)
    return ref.name, ref.configs


def model_path(name: str | ModelRef | None = None, components=None, download: bool = False, rebuild: bool = False,
               configs=()) -> Path:
    """A local folder in the diffusers layout for model ``name`` (see :meth:`ModelRef.folder`)."""
    return resolve_model(name).folder(components, download=download, rebuild=rebuild, configs=configs)


def describe_pipeline(pipe, family=None) -> list[dict]:
    """One row per component of a loaded pipeline: class, blocks, parameters, bytes, dtype."""
    from helpers.precision import stored_bytes

    family = family or family_for_pipeline(type(pipe).__name__)
    rows = []
    for comp in family.models:
        module = getattr(pipe, comp, None)
        if module is None:
            continue
        rows.append({
            "component": comp,
            "class": type(module).__name__,
            "blocks": family.block_counts(module),
            "params": sum(p.numel() for p in module.parameters()),
            "bytes": stored_bytes(module),
            "dtype": str(next(module.parameters()).dtype).replace("torch.", ""),
        })
    return rows
