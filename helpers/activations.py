"""What a forward pass holds beyond its weights, and the room a stage keeps for it.

Activations are counted on the meta device (:func:`activation_peak`): every storage an op returns,
until its last reference goes, for one forward of the real module tree with shapes but no weights,
so even the 12-billion-parameter transformer is counted in about a second. A :class:`Workload` is
what one run of a stage computes on (image size, prompts, text tokens); :func:`stage_activations`
is the most its components hold at once for it, the room the stage keeps in the tier it computes
on; :func:`largest_square` is the largest square image whose activations fit a number of bytes.
Explained in ``01_memory-footprint.ipynb`` (the counts) and ``03_bf16-diffusion.ipynb`` (the room).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from helpers.errors import UserError
from helpers.families import Family, default_family
from helpers.precision import cpu_bf16

#: what a GPU tier keeps beyond the counted activations: cuBLAS workspaces and the allocator's rounding
WORKSPACE_GPU = 64 * 2**20
MULTIPLE = 16  # image sides: the VAE halves the size 3 times, then the transformer packs 2x2 patches


@dataclass(frozen=True)
class Workload:
    """What one run of a stage computes on: image ``height`` x ``width`` (diffusion), ``batch``
    prompts, ``tokens`` T5 tokens per prompt. Made once where the run's settings are read (the
    command line, a widget, a notebook's parameters) and handed to the plan."""

    height: int = 1024
    width: int = 1024
    batch: int = 1
    tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("height", "width", "batch", "tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a whole number, 1 or more, not {value!r}.")

    def square(self, side: int) -> "Workload":
        return replace(self, height=side, width=side)

    def describe(self, stage: str = "diffusion") -> str:
        """``a 1024x1024 image``, ``3 images of 1024x1024`` (diffusion) or ``2 prompts of 512 tokens``."""
        if stage == "text_encoding":
            return f"{self.batch} prompt{'s' if self.batch != 1 else ''} of {self.tokens} tokens"
        if self.batch == 1:
            return f"a {self.height}x{self.width} image"
        return f"{self.batch} images of {self.height}x{self.width}"

    def as_dict(self) -> dict:
        return {"height": self.height, "width": self.width, "batch": self.batch, "tokens": self.tokens}


def _conv_scratch(args, out, bf16_native: bool | None = None) -> int:
    """Bytes a convolution's kernel holds while it runs, beyond its output, on this machine's CPU (the
    meta device makes none): a reordered copy of its input plus its output twice, in oneDNN's blocked
    layout, whose channels come in groups of 16 (an output of 3 channels is held as 16).

    Measured with 3x3 convs of 3 to 32 channels at 1600x1600, bf16 and float32, with oneDNN held to
    AVX2, AVX-512, AVX-512 bf16 and AMX: the kernels keep one of these pieces or two (the input's copy,
    or the output twice, or the input and a padded output), never more; counting all three is what
    holds on every CPU, with room for the per-thread scratch that grows with the thread count
    (the tiny twin's decode at 1824x1824 held 52 MiB more at 16 threads than at 2). bf16 math on a
    CPU without native bf16 has no oneDNN kernel: PyTorch unfolds the input into one copy per
    kernel tap (9 for a 3x3 conv), which is counted instead when it is larger. ``bf16_native``: whether
    the CPU that runs it has native bf16 (measured once where the plan is made and handed in; ``None``:
    this machine's, :func:`helpers.precision.cpu_bf16`).
    """
    channels = out.shape[1] if out.dim() >= 3 and out.shape[1] > 0 else 16
    blocked = out.untyped_storage().nbytes() * max(channels, 16) // channels
    held = args[0].untyped_storage().nbytes() + 2 * blocked
    if bf16_native is None and args[0].dtype == torch.bfloat16:
        bf16_native = cpu_bf16()[0]
    if args[0].dtype == torch.bfloat16 and not bf16_native:
        taps = math.prod(args[1].shape[2:])
        held = max(held, taps * args[0].untyped_storage().nbytes() + out.untyped_storage().nbytes())
    return held


#: ops whose kernels hold scratch memory while they run, and how much
_SCRATCH = {torch.ops.aten.convolution.default: _conv_scratch}


def activation_peak(module: torch.nn.Module, inputs: dict, fused_attention: bool = True,
                    kernel_scratch: bool = False, bf16_native: bool | None = None) -> int:
    """The most bytes of intermediate tensors one forward pass of ``module`` holds at once.

    Counted op by op: every new storage an op returns, until its last reference goes; with
    ``kernel_scratch`` (a CPU run) also the scratch a convolution's kernel holds while it runs (see
    :func:`_conv_scratch`). Weights, buffers and ``inputs`` are not counted. On the meta device this runs in about a second even for
    the 12B transformer, and counts what the same ops would allocate on a real device.
    ``fused_attention``: ``scaled_dot_product_attention`` is counted as the fused kernels a GPU runs
    it with (flash or memory-efficient attention: the output, no score matrix); otherwise as the
    reference path the meta device takes, which holds a heads x tokens x tokens matrix.
    """
    import weakref

    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    given = [*module.parameters(), *module.buffers(), *(v for v in inputs.values() if torch.is_tensor(v))]

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.known = {t.untyped_storage()._cdata for t in given}  # views of these are not new memory
            self.live: dict[int, int] = {}
            self.now = self.peak = 0

        def _gone(self, key: int) -> None:
            self.now -= self.live.pop(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in tree_leaves((args, kwargs)):  # tensors from before the pass (caches, nested inputs)
                if isinstance(t, torch.Tensor):
                    key = t.untyped_storage()._cdata
                    if key not in self.live:
                        self.known.add(key)
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    key = storage._cdata
                    if key not in self.live and key not in self.known:
                        self.live[key] = storage.nbytes()
                        self.now += storage.nbytes()
                        self.peak = max(self.peak, self.now)
                        weakref.finalize(storage, self._gone, key)
            if kernel_scratch and func in _SCRATCH:  # what the kernel holds while it runs, beside its output
                self.peak = max(self.peak, self.now + _SCRATCH[func](args, out, bf16_native))
            return out

    class Fused(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                q = args[0] if args else kwargs["query"]
                v = args[2] if len(args) > 2 else kwargs["value"]
                return q.new_empty((*q.shape[:-1], v.shape[-1]))
            return func(*args, **kwargs)

    with torch.no_grad(), (Fused() if fused_attention else contextlib.nullcontext()), Live() as live:
        out = module(**inputs)
    del out
    return live.peak


def counted_components(stage: str, family: Family | None = None) -> tuple[str, ...]:
    """The components whose forward passes ``stage`` runs, one after the other, while its weights stay
    loaded (FLUX.1: T5; the transformer, then the VAE's decode)."""
    family = family or default_family()
    return tuple(c for c in family.stage_models(stage) if family.component(c).activation)


def example_inputs(component: str, module: torch.nn.Module, dtype: torch.dtype, height: int = 1024,
                   width: int = 1024, tokens: int = 512, device="meta", family: Family | None = None):
    """``(module, inputs)`` for one forward of ``component`` as :func:`forward_peak` describes it,
    batch 1, tensors empty on ``device``: the family says what they are."""
    return (family or default_family()).example_inputs(component, module, dtype, height, width, tokens, device)


def _config_key(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.dumps(dict(config or {}), sort_keys=True, default=str)


#: counts made in this process, by component, config, dtype and shape (a plan asks for the same ones often)
_COUNTED: dict[tuple, int] = {}


@contextlib.contextmanager
def _two_blocks_each(block_lists: tuple[str, ...], module: torch.nn.Module):
    """The module with only the first two blocks of each list, for the time of a count.

    From the second block of a list on, each block takes the hidden states and hands on new ones
    of the same shapes, with the same tensors alive around it (the time and rotary embeddings,
    T5's position bias), so it holds the same peak as the next; the first may differ (T5's makes
    the position bias). A forward through two blocks of each list therefore peaks where one
    through all of them does (a test checks it on FLUX.1-dev and the twin), for about 14 times
    fewer ops in the Flux transformer and 12 in T5.
    """
    kept = []
    for path in block_lists:
        parent_name, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        blocks = getattr(parent, name)
        if len(blocks) > 2:
            kept.append((parent, name, blocks))
            setattr(parent, name, torch.nn.ModuleList(blocks[:2]))
    try:
        yield module
    finally:
        for parent, name, blocks in kept:
            setattr(parent, name, blocks)


def forward_peak(component: str, module: torch.nn.Module, dtype: torch.dtype, height: int = 1024, width: int = 1024,
                 tokens: int = 512, cpu: bool = False, family: Family | None = None,
                 bf16_native: bool | None = None) -> int:
    """Peak activations of one forward of ``component`` (its skeleton ``module`` on the meta device),
    batch 1, computing in ``dtype``: for ``transformer`` one denoising step of a ``height`` x
    ``width`` image with ``tokens`` text tokens; for ``vae`` the decode of that image; for
    ``text_encoder_2`` one prompt of ``tokens`` tokens. Counted through one block of each list (the
    same peak, see :func:`_two_blocks_each`); the skeleton's own blocks and dtypes are put back after;
    each shape is counted once per process. ``cpu``: the forward runs on a CPU, whose convolutions
    hold scratch memory (see :func:`_conv_scratch`; ``bf16_native``: whether that CPU has native bf16,
    ``None``: this one's)."""
    family = family or default_family()
    counted = [c.name for c in family.components if c.activation]
    if component not in counted:
        raise UserError(f"activations are estimated for {', '.join(counted)}, not {component!r}.")
    # only what the forward depends on is in the key: text, the image, or both (the split diffusion one)
    text = family.component(component).stage == "text_encoding"
    both = component == family.file_component
    size = (0, 0, tokens) if text else (height, width, tokens) if both else (height, width, 0)
    if cpu and dtype == torch.bfloat16 and bf16_native is None:
        bf16_native = cpu_bf16()[0]
    key = (component, _config_key(module), str(dtype), cpu, bf16_native if cpu else None, *size)
    if key not in _COUNTED:
        with _two_blocks_each(family.block_lists(component), module):
            floats = [(t, t.dtype) for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
            try:
                for t, _ in floats:
                    t.data = t.data.to(dtype)
                _COUNTED[key] = activation_peak(*example_inputs(component, module, dtype, height, width, tokens,
                                                                family=family),
                                                kernel_scratch=cpu, bf16_native=bf16_native)
            finally:
                for t, original in floats:
                    t.data = t.data.to(original)
    return _COUNTED[key]


def stage_activations(stage: str, skeletons: dict[str, torch.nn.Module], dtype: torch.dtype,
                      workload: Workload, cpu: bool = False, family: Family | None = None,
                      bf16_native: bool | None = None) -> dict[str, int]:
    """Bytes each component of ``stage`` holds beyond its weights at its peak for ``workload``
    (``batch`` prompts at once), in the order the stage runs them; the stage needs room for the
    largest, since they run one after the other. ``cpu``: it computes on a CPU."""
    return {c: workload.batch * forward_peak(c, skeletons[c], dtype, workload.height, workload.width, workload.tokens,
                                             cpu=cpu, family=family, bf16_native=bf16_native)
            for c in counted_components(stage, family)}


def largest_square(fits: Callable[[int], bool], above: int, guess: int | None = None) -> int | None:
    """The largest side of a square image, a multiple of 16 below ``above``, for which ``fits(side)``;
    ``None`` if not even 16 does. ``fits`` must hold for every side below one that fits (a larger
    image never needs less). ``guess``, a side, is tried first with the next one up (see
    :func:`affine_guess`): a good guess settles it in two tries, else the search halves the range."""
    if not fits(MULTIPLE):
        return None
    lo, hi = 1, max(2, above // MULTIPLE)  # in units of 16: lo fits; hi does not (or is the end of the range)
    if fits(hi * MULTIPLE):
        return hi * MULTIPLE
    if guess is not None:
        k = guess // MULTIPLE
        for probe in (k, k + 1):
            if lo < probe < hi:
                lo, hi = (probe, hi) if fits(probe * MULTIPLE) else (lo, probe)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * MULTIPLE) else (lo, mid)
    return lo * MULTIPLE


def affine_guess(count: Callable[[int], int], limit: int, above: int) -> int:
    """The side whose ``count(side)`` (activations of a square image) is about ``limit`` bytes, from the
    line through 16x16 and ``above`` x ``above``: activations grow about linearly with the pixels."""
    c_lo, c_hi = count(MULTIPLE), count(above)
    p_lo, p_hi = MULTIPLE**2, above**2
    pixels = p_lo + (limit - c_lo) * (p_hi - p_lo) / max(c_hi - c_lo, 1)
    return max(MULTIPLE, int(max(pixels, 0) ** 0.5) // MULTIPLE * MULTIPLE)
