"""The architecture of FLUX.1, as facts: configs, weightless skeletons, parameter counts.

Nothing here plans, loads or builds weights: :mod:`helpers.models` (names, twins, the trainer's
modules), :mod:`helpers.footprint` (bytes and plans) and :mod:`helpers.training` all stand on it,
and it imports none of them. The published configs of FLUX.1-dev and FLUX.1-schnell ship with this
package (``helpers/configs/``), so none of it needs a download. Explained in ``01_memory-footprint.ipynb``.
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from helpers.errors import UserError

if TYPE_CHECKING:
    import torch

COMPONENT_ORDER = ("text_encoder", "text_encoder_2", "transformer", "vae")

#: Published configs shipped as package data, copied from the hub repositories of the same name
#: (black-forest-labs/FLUX.1-dev and black-forest-labs/FLUX.1-schnell, each component's config.json).
SHIPPED = {"black-forest-labs/FLUX.1-dev": "FLUX.1-dev", "black-forest-labs/FLUX.1-schnell": "FLUX.1-schnell"}


def shipped_configs(name: str) -> dict[str, dict]:
    """The shipped configs of ``FLUX.1-dev`` or ``FLUX.1-schnell``, per component."""
    root = resources.files("helpers") / "configs" / name
    return {c: json.loads((root / c / "config.json").read_text()) for c in COMPONENT_ORDER}


#: a key each component's config must have, to tell a FLUX.1 folder from something else
_REQUIRED_KEYS = {"text_encoder": "hidden_size", "text_encoder_2": "d_model", "transformer": "num_single_layers",
                  "vae": "latent_channels"}


def folder_configs(folder: Path) -> dict[str, dict]:
    missing = [c for c in COMPONENT_ORDER if not (folder / c / "config.json").is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(c + '/config.json' for c in missing)}: not a FLUX.1 folder.")
    configs = {}
    for comp in COMPONENT_ORDER:
        path = folder / comp / "config.json"
        try:
            configs[comp] = json.loads(path.read_text())
        except (ValueError, OSError) as err:
            raise UserError(f"{path} is not readable JSON ({err}); fetch or copy that file again.") from None
        if not isinstance(configs[comp], dict) or _REQUIRED_KEYS[comp] not in configs[comp]:
            raise UserError(f"{path} has no {_REQUIRED_KEYS[comp]!r}: not a FLUX.1 {comp} config.")
    return configs


#: torch.nn.init's functions that draw or set a tensor's first values (what a module's constructor calls)
_INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
          "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def empty_weights():
    """accelerate's ``init_empty_weights`` (parameters on the meta device, no storage), with
    ``torch.nn.init``'s functions doing nothing meanwhile: on meta tensors they compute nothing, yet
    running them through PyTorch's decompositions cost 0.3 s for each FLUX.1 transformer skeleton,
    which every plan and every load builds (transformers' ``no_init_weights`` skips them the same way)."""
    import torch
    from accelerate import init_empty_weights

    saved = {name: getattr(torch.nn.init, name) for name in _INITS if hasattr(torch.nn.init, name)}
    for name in saved:
        setattr(torch.nn.init, name, _unchanged)
    try:
        with init_empty_weights():
            yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _unchanged(tensor, *args, **kwargs):
    return tensor


def skeleton(component: str, config: dict, tie: bool = True) -> "torch.nn.Module":
    """Build ``component`` from ``config`` on the meta device: shapes, no storage.

    ``tie=True`` re-ties shared weights after ``init_empty_weights``: under transformers 5 it leaves
    T5's ``shared`` and ``encoder.embed_tokens`` as two tensors, one tensor in the real checkpoint,
    and the footprint would count ~0.5 GiB twice (the trap notebook 01 shows).
    """
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with empty_weights():
        if component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            module = CLIPTextModel(CLIPTextConfig.from_dict(cfg))
        elif component == "text_encoder_2":
            from transformers import T5Config, T5EncoderModel

            module = T5EncoderModel(T5Config.from_dict(cfg))
        elif component == "transformer":
            from diffusers import FluxTransformer2DModel

            module = FluxTransformer2DModel.from_config(cfg)
        elif component == "vae":
            from diffusers import AutoencoderKL

            module = AutoencoderKL.from_config(cfg)
        else:
            raise UserError(f"unknown component {component!r}; the components are {', '.join(COMPONENT_ORDER)}.")
    if tie and hasattr(module, "tie_weights"):
        module.tie_weights()
    return module.eval()


def count_params(module: "torch.nn.Module") -> int:
    """Parameters, each shared tensor once (``parameters()`` skips repeats of the same tensor)."""
    return sum(p.numel() for p in module.parameters())
