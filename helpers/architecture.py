"""A model's architecture, as facts: configs, weightless skeletons, parameter counts (of any family).

Nothing here plans, loads or builds weights: :mod:`helpers.models` (names, twins, the trainer's
modules), :mod:`helpers.footprint` (bytes and plans) and :mod:`helpers.twins.training` all stand on it,
and it imports none of them. What each component is comes from its family (:mod:`helpers.families`);
the published configs of the real models ship with this package (``helpers/configs/``), so none of it
needs a download. Explained in ``01_memory-footprint.ipynb``.
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from helpers.errors import UserError
from helpers.families import default_family

if TYPE_CHECKING:
    import torch

def shipped_configs(name: str, family=None) -> dict[str, dict]:
    """The shipped configs of a real model (``FLUX.1-dev``: the folder under ``helpers/configs/``), per component."""
    family = family or default_family()
    root = resources.files("helpers") / "configs" / name
    return {c: json.loads((root / c / "config.json").read_text()) for c in family.models}


def folder_configs(folder: Path, family=None) -> dict[str, dict]:
    """Each component's config of a model folder of ``family``, checked to be that component's."""
    family = family or default_family()
    missing = [c for c in family.models if not (folder / c / "config.json").is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(c + '/config.json' for c in missing)}: not a {family.title} folder.")
    configs = {}
    for comp in family.models:
        path = folder / comp / "config.json"
        try:
            configs[comp] = json.loads(path.read_text())
        except (ValueError, OSError) as err:
            raise UserError(f"{path} is not readable JSON ({err}); fetch or copy that file again.") from None
        key = family.component(comp).required_key
        if not isinstance(configs[comp], dict) or (key and key not in configs[comp]):
            raise UserError(f"{path} has no {key!r}: not a {family.title} {comp} config.")
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


def skeleton(component: str, config: dict, tie: bool = True, family=None) -> "torch.nn.Module":
    """Build ``component`` from ``config`` on the meta device: shapes, no storage.

    ``tie=True`` re-ties shared weights after ``init_empty_weights``: under transformers 5 it leaves
    T5's ``shared`` and ``encoder.embed_tokens`` as two tensors, one tensor in the real checkpoint,
    and the footprint would count ~0.5 GiB twice (the trap notebook 01 shows).
    """
    family = family or default_family()
    if component not in family.models:
        raise UserError(f"unknown component {component!r}; the components are {', '.join(family.models)}.")
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with empty_weights():
        module = family.component(component).skeleton(cfg)
    if tie and hasattr(module, "tie_weights"):
        module.tie_weights()
    return module.eval()


def count_params(module: "torch.nn.Module") -> int:
    """Parameters, each shared tensor once (``parameters()`` skips repeats of the same tensor)."""
    return sum(p.numel() for p in module.parameters())
