"""Full-size models with random weights (``flux-dev-random``, ``flux2-klein-4b-random``): a family's real architecture from its
shipped configs, written here on first use in bfloat16 and in the real checkpoint's shards, for
full-size benchmarks without a download. Deterministic: each tensor from its name and a seed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

from helpers.errors import UserError
from helpers.families import default_family, family_of_repo
from helpers.twins.builder import twin_folder

#: full-size models with random weights: name -> the repository whose shipped configs they copy
RANDOM = {"flux-dev-random": "black-forest-labs/FLUX.1-dev",
          "flux2-klein-4b-random": "black-forest-labs/FLUX.2-klein-4B"}

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


def write_random_component(component: str, config: dict, folder: Path, seed: int = 0, progress=None,
                           family=None) -> None:
    """``component`` of ``family`` (FLUX.1 by default) from ``config`` with random bfloat16 weights, saved
    in the diffusers layout.

    Built tensor by tensor from the meta skeleton, one shard (up to 10 GB) in memory at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from safetensors.torch import save_file

    from helpers.architecture import skeleton

    module = skeleton(component, config, family=family)
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
        cfg.setdefault("_class_name", (family or default_family()).component(component).class_name)
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
    family = family_of_repo(RANDOM[name])
    shipped = resources.files("helpers") / "configs" / family.shipped[RANDOM[name]]
    folder = Path(folder) if folder is not None else twin_folder(name)
    configs = configs or shipped_configs(family.shipped[RANDOM[name]], family)
    known = ("scheduler", *family.models)
    unknown = [c for c in components if c not in known]
    if unknown:
        raise UserError(f"{name} has random weights and no {', '.join(unknown)}: it is made for `python -m helpers "
                        f"bench` (its components: {', '.join(known)}); to make images use a twin or a real model.")

    def built(component: str) -> bool:
        marker = "scheduler_config.json" if component == "scheduler" else "config.json"
        return not rebuild and (folder / component / marker).is_file()

    todo = [c for c in components if not built(c)]
    need = sum(count_params(skeleton(c, configs[c], family=family)) * 2 for c in todo if c != "scheduler")
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
                write_random_component(component, configs[component], tmp, progress=tqdm, family=family)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    (folder / "model_index.json").write_bytes(shipped.joinpath("model_index.json").read_bytes())
    return folder
