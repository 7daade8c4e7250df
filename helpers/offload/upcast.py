"""Weights stored in one dtype, computed in another, layer by layer: each layer's floating weights (and
stored forms with a codec: fp8 with row scales, GGUF blocks) are decoded into the compute dtype just
before the layer runs and dropped after, in one reused workspace, so RAM holds the stored bytes and the
math runs in the compute dtype (:func:`upcast_layerwise`). The runtime side of :mod:`helpers.precision`,
which says what to store and compute in.
"""

from __future__ import annotations

import torch

from helpers.formats.codecs import codec_for

def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value


class _Workspace:
    """Where the upcast copies live: one buffer per dtype, reused layer after layer, taken and given
    back in call order (a layer inside a layer takes the next stretch). Allocating a fresh copy per
    layer instead costs page faults on every call, since the stages' commands return large freed
    blocks to the system (:func:`helpers.memory.return_large_blocks`): 2.7x slower steps measured."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.top: dict[torch.dtype, int] = {}

    def take(self, dtype: torch.dtype, shape, device) -> torch.Tensor:
        n = torch.Size(shape).numel()
        start = self.top.get(dtype, 0)
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < start + n or buf.device != device:
            # grown once to the largest layer (views of an old buffer still in use keep it alive)
            buf = torch.empty(max(start + n, 2 * buf.numel() if buf is not None else 0), dtype=dtype, device=device)
            self.buffers[dtype] = buf
        self.top[dtype] = start + n
        return buf[start:start + n].view(shape)

    def give(self, dtype: torch.dtype, n: int) -> None:
        self.top[dtype] -= n


def upcast_groups() -> set[str]:
    """Module classes whose own code reads a child's weight dtype, upcast as one, all their layers at
    once: each family names its own (FLUX.1: T5's feed-forward, which casts its input to
    ``wo.weight.dtype``, the stored bf16 outside ``wo``)."""
    from helpers.families import families

    return {g for f in families() for c in f.components for g in c.upcast_groups}


class _Upcast:
    """Hooks of one module: the floating weights of ``members`` (the module itself, or a group's
    layers) upcast while it runs, its inputs cast to match."""

    def __init__(self, dtype: torch.dtype, workspace: _Workspace, members: list[torch.nn.Module]) -> None:
        self.dtype = dtype
        self.workspace = workspace
        self.members = members
        self.saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter, torch.nn.Parameter]] = []

    def pre(self, module, args, kwargs):
        for owner in self.members:
            for name, p in owner._parameters.items():
                if p is None:
                    continue
                if (p.is_floating_point() and p.dtype != self.dtype and p.device.type == "meta"
                        and owner is not module and f"{name}_scale" not in owner._buffers):
                    # a layer of the group that accelerate fetches when it runs: its placeholder in the
                    # math's dtype, so the group's code reads that dtype and the fetch is widened into it
                    # (exact from bf16; fp8 with scales is not grouped this way: see helpers.loading)
                    owner._parameters[name] = torch.nn.Parameter(torch.empty_like(p, dtype=self.dtype),
                                                                 requires_grad=False)
                    continue
                codec = codec_for(owner, name, p.dtype, self.dtype) if p.device.type != "meta" else None
                if codec is not None:  # stored otherwise (bf16, fp8 and its scales, GGUF blocks): decoded
                    value = self.workspace.take(self.dtype, codec.shape(p.shape), p.device)
                    codec.decode(p, value)
                    copy = torch.nn.Parameter(value, requires_grad=False)
                    self.saved.append((owner, name, p, copy))
                    owner._parameters[name] = copy
        return _cast(args, self.dtype), {k: _cast(v, self.dtype) for k, v in kwargs.items()}

    def post(self, module, args, output):
        for owner, name, stored, copy in reversed(self.saved):
            self.workspace.give(self.dtype, copy.numel())
            current = owner._parameters.get(name)
            if current is copy:
                owner._parameters[name] = stored
            elif current is not None and current.device.type == "meta" and current.dtype != stored.dtype:
                # accelerate sent the layer back to its offload, as a placeholder in the upcast dtype: it
                # would cast the next fetch to it (fp8 without its scales); keep the stored dtype instead
                owner._parameters[name] = torch.nn.Parameter(torch.empty_like(stored, device="meta"),
                                                             requires_grad=False)
        self.saved.clear()
        return output


def upcast_layerwise(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Compute ``model`` in ``dtype`` while its weights stay stored as they are; returns how many
    modules were hooked.

    Every module holding weights of its own (a linear layer, a norm, an embedding) gets a hook that,
    just before it runs, replaces those weights by copies in ``dtype`` and casts its floating inputs
    to ``dtype``, and one that puts the stored weights back after. The copies share one workspace,
    reused from layer to layer: the model holds its stored bytes plus its largest layer upcast.
    Unlike diffusers' layerwise casting, norms are upcast too (the math is all ``dtype``, so a norm
    that reads its weight's dtype does not cast its input back down), and inputs are cast, so code
    that casts to a parameter's stored dtype (the VAE's decoder does) still meets a matching layer.
    Weights already in ``dtype`` (a streamed block arrives upcast: see :mod:`helpers.offload.streamers`) are
    left alone. On a module with accelerate's hook (which fetches offloaded weights as it runs) the
    upcast is chained after that hook, so it sees the fetched weights.
    """
    if getattr(model, "_upcast_to", None) is not None:
        if model._upcast_to != dtype:
            raise ValueError(f"this model already computes in {model._upcast_to}; load it again for {dtype}.")
        return 0  # hooked already (a streaming loader does it for its streamed pieces)
    hooked = 0
    workspace = _Workspace()
    grouped: set[int] = set()
    groups = upcast_groups()
    for module in model.modules():
        if id(module) in grouped:
            continue
        if type(module).__name__ in groups:
            members = list(module.modules())
            grouped.update(id(m) for m in members)
        elif any(p is not None and (p.is_floating_point() or codec_for(module, name, p.dtype, dtype) is not None)
                 for name, p in module._parameters.items()):  # a float, or a stored form with a codec (GGUF)
            members = [module]
        else:
            continue
        hook = _Upcast(dtype, workspace, members)
        if hasattr(module, "_hf_hook"):
            _chain_after_accelerate(module, hook)
        else:
            module.register_forward_pre_hook(hook.pre, with_kwargs=True)
            module.register_forward_hook(hook.post, always_call=True)
        hooked += 1
    report_compute_dtype(model, dtype)
    model._upcast_to = dtype
    return hooked


def report_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make a diffusers model's ``.dtype`` say ``dtype``, the dtype it computes in, not its first
    weight's stored one: pipelines make their inputs in ``model.dtype`` (FluxPipeline's text ids),
    which must not be fp8. diffusers reads it from a hook registered under the name its own layerwise
    casting uses; this one does nothing else."""
    try:
        from diffusers.hooks.hooks import HookRegistry, ModelHook
    except ImportError:  # not a diffusers model's world
        return
    if not hasattr(model, "config") or not hasattr(type(model), "from_pretrained") or not hasattr(
            type(model), "load_config"):
        return

    class ComputeDtype(ModelHook):
        def __init__(self) -> None:
            super().__init__()
            self.compute_dtype = dtype

    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.get_hook("layerwise_casting") is None:
        registry.register_hook(ComputeDtype(), "layerwise_casting")


def _chain_after_accelerate(module: torch.nn.Module, hook: _Upcast) -> None:
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Chained(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            return hook.pre(module, args, kwargs)

        def post_forward(self, module, output):
            return hook.post(module, None, output)

    add_hook_to_module(module, Chained(), append=True)
