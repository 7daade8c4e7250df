"""Two knobs: the bytes each weight is stored in, and the dtype the layers compute in.

The method has one dtype per stage (bfloat16 for diffusion, float32 for T5) that stands for the
bytes each tier holds, the bytes that move and the math. They are different levers:

- ``weights`` (storage): what every tier holds and what a stream moves. ``bf16`` (2 bytes per
  weight), ``fp32`` (4), or ``fp8``: every linear layer's weight in float8 e4m3fn (1 byte) with a
  float32 scale per output row beside it (``<name>.weight_scale``), the rest in bf16 (norms,
  biases, embeddings: under 1% of FLUX's bytes). A row is scaled so that its largest value is
  e4m3's largest (448), which keeps small weights out of e4m3's coarse subnormal range: notebook 06
  measures the error against plain casting. An fp8 checkpoint is made once (``python -m helpers
  convert``), its folder records the format (:data:`FORMAT_FILE`), and it is read as stored.
- ``compute``: the dtype the layers run in. A weight stored in bf16 is upcast to float32 just
  before its layer runs (:func:`upcast_layerwise`), never the whole model at once, so RAM holds
  stored bytes and the math is float32. On a CPU without native bf16 matrix instructions that is
  several times faster than computing in bf16 (notebook 06 measures it), and the result is the one
  float32 weights give: widening a bf16 value to float32 is exact.

``auto`` picks the compute dtype for the device a stage computes on (:func:`auto_compute`).
A :class:`Precision` is made once, at the edge (the CLI, a notebook's parameters cell), and goes
into the stage's plan; the loaders take it from there.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from helpers.formats.codecs import quantize_rows
from helpers.errors import UserError

#: storage formats, by the names the flags take (fp8: the linear layers' weights; see above)
WEIGHTS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
PLANNED_ONLY: dict[str, torch.dtype] = {}
#: the file in a component folder that says how its weights are stored (written by ``convert``)
FORMAT_FILE = "weights_format.json"
#: what fp8 leaves in bf16 (everything but the linear layers' weights)
FP8_REST = torch.bfloat16
#: compute dtypes (``auto`` is resolved per device by :func:`auto_compute`)
COMPUTES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: torch's names, as the plans and JSON have spelled dtypes so far
TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "float8_e4m3fn"}


def short_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bf16"``."""
    name = str(dtype).replace("torch.", "")
    for short, long in TORCH_NAMES.items():
        if name in (short, long):
            return short
    raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(TORCH_NAMES)}.")


def check_weights(weights: str) -> str:
    if weights not in WEIGHTS:
        raise UserError(f"unknown weights format {weights!r}; use one of {', '.join(WEIGHTS)} "
                        "(the bytes each weight is stored in).")
    return weights


def check_compute(compute: str) -> str:
    if compute != "auto" and compute not in COMPUTES:
        raise UserError(f"unknown compute dtype {compute!r}; use auto or one of {', '.join(COMPUTES)}.")
    return compute


@dataclass(frozen=True)
class Precision:
    """How a stage holds and computes its weights: ``weights`` (storage) and ``compute``, both
    short names (``bf16``, ``fp32``...), ``compute`` already resolved; ``why``: how ``auto`` chose."""

    weights: str = "bf16"
    compute: str = "bf16"
    why: str = ""
    #: the transformer's weights from one file (``--transformer FILE``: a
    #: :class:`helpers.formats.transformer_file.TransformerFile`), held as it stores them; ``weights`` is the rest's
    file: object = None
    #: whether the CPU that computes has native bf16 matrix math (what a bf16 convolution holds there
    #: depends on it): measured once where the plan is made (:func:`cpu_bf16`) or told (``--cpu-bf16``),
    #: never probed again on the way; ``None``: not settled (this machine's, where it matters)
    cpu_bf16: bool | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.weights not in PLANNED_ONLY:
            check_weights(self.weights)
        if self.compute not in COMPUTES:
            raise UserError(f"a precision's compute dtype must be resolved ({', '.join(COMPUTES)}), not {self.compute!r}.")

    @property
    def storage_dtype(self) -> torch.dtype:
        return {**WEIGHTS, **PLANNED_ONLY}[self.weights]

    @property
    def loadable(self) -> bool:
        """Whether the loaders read this format (fp8 is planned only, for now)."""
        return self.weights in WEIGHTS

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTES[self.compute]

    @property
    def upcasts(self) -> bool:
        """Whether weights change dtype on their way into a layer (a file's always may: GGUF blocks)."""
        return self.storage_dtype != self.compute_dtype or self.file is not None

    def with_file(self, file) -> "Precision":
        """This precision with the transformer read from ``file`` (a TransformerFile, or ``None``)."""
        from dataclasses import replace

        return replace(self, file=file)

    def describe(self) -> str:
        if self.file is not None:
            return f"{self.file.label} transformer, {self.weights} rest, {self.compute} math"
        return f"{self.weights} weights, {self.compute} math"

    def as_dict(self) -> dict:
        out = {"weights": self.weights, "compute": self.compute, "why": self.why}
        if self.file is not None:
            out["transformer_file"] = self.file.as_dict()
        return out


# --------------------------------------------------------------------------- choosing the compute dtype


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _matmul_seconds(dtype: torch.dtype, n: int = 512, reps: int = 3) -> float:
    a = torch.randn(n, 2 * n).to(dtype)
    b = torch.randn(2 * n, n).to(dtype)
    a @ b  # warm-up: kernel choice, thread pool
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 matrix products natively, and how that was found.

    The flags (``avx512_bf16``, ``amx_bf16`` on x86; ``bf16`` on Arm) say what the CPU has, not what
    PyTorch's kernels make of it, so a short timed probe decides: a 512x1024 by 1024x512 product in
    bf16 and in float32, best of 3 (tens of milliseconds, once per process). bf16 counts as native when
    it runs at least as fast as float32; without the flags it is emulated (several times slower), and
    the probe is skipped.
    """
    flags = _cpu_flags()
    have = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"})
    capability = torch.backends.cpu.get_cpu_capability()
    if not have:
        return False, f"this CPU ({capability}) lists no bf16 matrix instructions"
    fp32, bf16 = _matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)
    ratio = max(fp32, 1e-9) / max(bf16, 1e-9)
    native = ratio >= 1.0
    speed = f"{ratio:.1f}x as fast as float32" if native else f"{1 / ratio:.1f}x slower than float32"
    return native, f"this CPU ({capability}) lists {', '.join(have)}, and a probe ran a bf16 matrix product {speed}"


def auto_compute(device: str | int | torch.device | None = "cpu", stage: str = "diffusion",
                 family=None, cpu_native: bool | None = None) -> tuple[str, str]:
    """``(compute, why)`` for a stage computing on ``device`` (``"cpu"`` or a GPU index).

    Text encoding keeps T5's float32 math (T5 is known to overflow in fp16, and the method encodes in
    float32). Diffusion: on a GPU, bf16 where it has bf16 (compute capability 8.0 and up), else
    float32: fp16 has bf16's speed there but not its range (largest value 65504), and FLUX's
    activations are not kept within it; a GPU of this machine that cannot be asked (planning for a
    card elsewhere) is taken to have bf16. On a CPU, bf16 where :func:`cpu_bf16` finds it native,
    float32 otherwise (``cpu_native``: what the caller measured or was told, in place of the probe).
    """
    if stage == "text_encoding":
        return _family(family).text_compute
    if device in (None, "disk", "mps"):  # nothing else computes: the CPU does
        device = "cpu"
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type == "cuda":
        index = dev.index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            return "bf16", f"GPU {index} is not on this machine: planned as a card with bf16"
        major, minor = torch.cuda.get_device_capability(index)
        if major >= 8:
            return "bf16", f"GPU {index} (compute capability {major}.{minor}) has bf16"
        return "fp32", (f"GPU {index} (compute capability {major}.{minor}) has no bf16; fp16 does not hold FLUX's "
                        "activations (largest value 65504), so float32")
    native, why = cpu_bf16() if cpu_native is None else (cpu_native, told_cpu(cpu_native))
    return ("bf16" if native else "fp32"), why


def told_cpu(native: bool) -> str:
    """How a plan made for a CPU named by the caller (``--cpu-bf16 yes|no``) says so."""
    return f"planned for a CPU {'with' if native else 'without'} native bf16 matrix math (as told)"


def cpu_computes(device) -> bool:
    """Whether a stage whose fast tier is ``device`` computes on the CPU (no GPU index)."""
    return not isinstance(device, int) and not (isinstance(device, torch.device) and device.type == "cuda")


def _family(family):
    from helpers.families import default_family

    return family or default_family()


def stage_weights(stage: str, family=None) -> str:
    """The method's weights format for ``stage`` (FLUX.1: bf16 diffusion, float32 text encoding)."""
    return _family(family).stage_weights[stage]


def resolve(stage: str, weights: str | None = None, compute: str = "auto", device: str | int | None = "cpu",
            family=None, cpu_native: bool | None = None) -> Precision:
    """The precision of ``stage`` from the flags: ``weights`` (``None``: the method's for the stage)
    and ``compute`` (``auto``: :func:`auto_compute` for ``device``, the tier the stage computes on).
    A stage computing on the CPU records whether that CPU has native bf16 (:attr:`Precision.cpu_bf16`):
    ``cpu_native`` as the caller measured or was told, else this machine's (probed once per process)."""
    weights = check_weights(weights or stage_weights(stage, family))
    check_compute(compute)
    native = (cpu_native if cpu_native is not None else cpu_bf16()[0]) if cpu_computes(device) else None
    if compute == "auto":
        chosen, why = auto_compute(device, stage, family, cpu_native)
        return Precision(weights, chosen, f"auto: {why}", cpu_bf16=native)
    return Precision(weights, compute, "asked for", cpu_bf16=native)


def method_precision(stage: str, family=None) -> Precision:
    """The method's precision, no probe: bf16 diffusion, float32 text encoding."""
    weights = stage_weights(stage, family)
    return Precision(weights, weights, "the method's")


# --------------------------------------------------------------------------- bytes


def quantized(module: torch.nn.Module, name: str) -> bool:
    """Whether fp8 stores parameter ``name`` of ``module`` in fp8 (a linear layer's weight)."""
    return isinstance(module, torch.nn.Linear) and name == "weight"


def tensor_bytes(owner: torch.nn.Module, name: str, t: torch.Tensor, weights: str | None = None) -> int:
    """The bytes tensor ``name`` of ``owner`` (a parameter or a buffer) takes: as it is, or stored as
    ``weights``: floating tensors at the format's size; with ``fp8``, a linear layer's weight at one
    byte plus a float32 scale per row, a scale already beside one as it is, the rest at bf16's two.
    The one rule every count of bytes uses (:func:`stored_bytes`, the device maps' units)."""
    if weights is None or not t.is_floating_point():
        return t.numel() * t.element_size()
    if weights == "fp8" and name in owner._parameters and quantized(owner, name):
        return t.numel() + t.shape[0] * 4
    if weights == "fp8":
        return t.numel() * (t.element_size() if name.endswith("_scale") else FP8_REST.itemsize)
    return t.numel() * (WEIGHTS.get(weights) or COMPUTES[weights]).itemsize


def named_tensors(module: torch.nn.Module):
    """``(owner, name, tensor)`` for every parameter and buffer of ``module``, each shared tensor once."""
    seen: set[int] = set()
    for owner in module.modules():
        for name, t in [*owner._parameters.items(), *owner._buffers.items()]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                yield owner, name, t


def stored_bytes(module: torch.nn.Module, weights: str | None = None) -> int:
    """The bytes ``module`` holds: its parameters and buffers, each shared tensor once.

    ``weights``: count the module as stored in that format instead of its own dtypes (a skeleton on
    the meta device sized for a format; see :func:`tensor_bytes`).
    """
    if weights is not None:
        check_weights(weights)
    return sum(tensor_bytes(owner, name, t, weights) for owner, name, t in named_tensors(module))


def to_storage(module: torch.nn.Module, weights: str) -> torch.nn.Module:
    """``module`` (in place) with its tensors in the dtypes ``weights`` stores: on the meta device a
    skeleton to size or to load into; with values, converted (fp8: quantized, scales added)."""
    check_weights(weights)
    for owner in module.modules():
        for name, p in list(owner._parameters.items()):
            if p is None or not p.is_floating_point():
                continue
            if weights == "fp8" and quantized(owner, name):
                if p.device.type == "meta":
                    q, scale = torch.empty_like(p, dtype=torch.float8_e4m3fn), torch.empty(p.shape[0], device="meta")
                else:
                    q, scale = quantize_rows(p)
                owner._parameters[name] = torch.nn.Parameter(q, requires_grad=False)
                owner.register_buffer(f"{name}_scale", scale)
            else:
                dtype = FP8_REST if weights == "fp8" else WEIGHTS[weights]
                owner._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    return module


def folder_format(folder) -> str | None:
    """How a component folder stores its weights: what :data:`FORMAT_FILE` records, else ``None``."""
    import json
    from pathlib import Path

    path = Path(folder) / FORMAT_FILE
    if not path.is_file():
        return None
    try:
        weights = json.loads(path.read_text())["weights"]
        return check_weights(weights)
    except (ValueError, KeyError, TypeError, UserError) as err:
        raise UserError(f"{path} is damaged ({err}); convert the model again.") from None
