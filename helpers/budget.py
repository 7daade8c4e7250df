"""Memory budgets and the hardware they are drawn from.

A budget says how many bytes each memory tier may hold: accelerators by index (``0``, ``1``...),
``cpu`` RAM and ``disk``, the tiers accelerate's ``max_memory`` knows. People write budgets in a few
forms; :func:`parse_budget` accepts all of them and rejects anything else with a message that shows
the accepted forms. Sizes are read by accelerate's own parser, so a budget means here exactly what it
means to ``infer_auto_device_map``. Explained in ``00_environment-check.ipynb``.
"""

from __future__ import annotations

import ast
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from accelerate.utils import convert_file_size_to_int

from helpers.errors import UserError
from helpers.report import format_bytes

Tier = Union[int, str]

#: The method's budget: 8.5 GiB of GPU memory on a 12 GB card and 30 GiB of a 48 GB machine's RAM.
METHOD_BUDGET: dict[Tier, str] = {0: "8.5GiB", "cpu": "30GiB"}

#: Budgets for common cards, each with the method's 30 GiB of RAM. The GPU tier leaves room for the
#: CUDA context, activations and the VAE's decode: about 3 GiB on small cards (the method keeps
#: 8.5 GiB of a 12 GB card), about 10% on big ones.
PRESETS: dict[str, dict[Tier, str]] = {
    "8 GB GPU": {0: "5.5GiB", "cpu": "30GiB"},
    "12 GB GPU (the method)": {0: "8.5GiB", "cpu": "30GiB"},
    "16 GB GPU": {0: "12.5GiB", "cpu": "30GiB"},
    "24 GB GPU": {0: "20GiB", "cpu": "30GiB"},
    "80 GB GPU": {0: "72GiB", "cpu": "30GiB"},
    "no GPU": {"cpu": "30GiB"},
}

NAMED_TIERS = ("mps", "cpu", "disk")

ACCEPTED_FORMS = (
    'accepted forms: a dict like accelerate\'s max_memory {0: "8.5GiB", "cpu": "30GiB"}; '
    'the command-line form "0=8.5GiB,cpu=30GiB,disk=100GiB"; '
    'a share of the model "cpu=40%" (tiny/medium models); '
    'sizes such as "8.5GiB", "512MiB", "20GB", "512MB" or a whole number of bytes; '
    "tiers 0, 1, ... (GPUs), mps, cpu, disk"
)

_UNITS = {"gib": "GiB", "mib": "MiB", "kib": "KiB", "gb": "GB", "mb": "MB", "kb": "KB"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)?\s*$")
_SHARE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


class BudgetError(UserError, ValueError):
    """A budget that cannot be read; the message lists the accepted forms."""


def _fail(what: str) -> BudgetError:
    return BudgetError(f"{what}; {ACCEPTED_FORMS}.")


def parse_size(value: int | str) -> int:
    """Bytes from ``8.5GiB``, ``512MB``, ``1024`` (bytes) or an int, through accelerate's parser.

    Units are read without regard to case (``gib`` is ``GiB``): accelerate would otherwise take a
    lower-case ``b`` as bits, which nobody means in a memory budget.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _fail(f"size {value!r} is neither a string nor a whole number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise _fail(f"size {value} is negative")
        return value
    match = _SIZE.match(value)
    if not match:
        raise _fail(f"size {value!r} is not a number with a unit")
    number, unit = match.groups()
    if unit is None:
        if "." in number:
            raise _fail(f"size {value!r} has no unit and is not a whole number of bytes")
        return int(number)
    canonical = _UNITS.get(unit.lower())
    if canonical is None:
        raise _fail(f"size {value!r} has an unknown unit {unit!r}")
    if not math.isfinite(float(number)) or float(number) > 2**60:  # more digits than any memory has
        raise _fail(f"size {value!r} is larger than any memory")
    return convert_file_size_to_int(f"{number}{canonical}")


def _parse_tier(key: object) -> Tier:
    if isinstance(key, bool):
        raise _fail(f"tier {key!r} is not a tier name")
    if isinstance(key, int):
        if key < 0:
            raise _fail(f"tier {key} is not a GPU index")
        return key
    if isinstance(key, str):
        name = key.strip().lower()
        if name.isdigit():
            return int(name)
        if name.startswith("cuda:") and name[5:].isdigit():
            return int(name[5:])
        if name in NAMED_TIERS:
            return name
        hint = ' (write 0 for the first GPU)' if name in {"gpu", "cuda"} else ""
        raise _fail(f"unknown tier {key!r}{hint}")
    raise _fail(f"tier {key!r} is not a tier name")


def _tier_order(tier: Tier) -> tuple[int, int]:
    return (0, tier) if isinstance(tier, int) else (1, NAMED_TIERS.index(tier))


@dataclass(frozen=True)
class Budget:
    """Bytes per tier, GPUs first, then ``mps``, ``cpu``, ``disk`` (the order accelerate fills them).

    Immutable: :meth:`max_memory` hands out a fresh dict each time, because
    ``infer_auto_device_map`` rewrites the ``max_memory`` dict it is given.
    """

    tiers: tuple[tuple[Tier, int], ...]
    #: the text it was read from, for messages
    source: str = field(default="", compare=False)
    #: the tiers given as a share of the model ("cpu=40%"): they size the weights' split, so the room a
    #: stage keeps for its activations comes on top of them (see ``helpers.planner.plan_stages``)
    shares: frozenset = field(default=frozenset(), compare=False)

    def max_memory(self) -> dict[Tier, int]:
        """A new ``max_memory`` dict for accelerate (bytes per tier)."""
        return dict(self.tiers)

    def __getitem__(self, tier: Tier) -> int:
        return dict(self.tiers)[_parse_tier(tier)]

    def __contains__(self, tier: object) -> bool:
        try:
            return _parse_tier(tier) in dict(self.tiers)
        except BudgetError:
            return False

    @property
    def names(self) -> list[Tier]:
        return [t for t, _ in self.tiers]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.tiers)

    @property
    def gpu(self) -> int | None:
        """The first GPU tier (the fastest), or ``None`` for a budget of RAM and disk."""
        return next((t for t in self.names if isinstance(t, int)), None)

    @property
    def fast(self) -> Tier | None:
        """The tier the stages compute on: the first GPU, else ``mps``, else ``cpu``; ``None`` for a
        budget of disk alone."""
        return next((t for t in self.names if t != "disk"), None)

    def shifted(self, delta: Mapping[Tier, int], source: str = "") -> "Budget":
        """The budget with ``delta`` bytes added to (or, negative, taken from) its tiers; a tier left
        with nothing is dropped. Shares are kept."""
        tiers = tuple((t, b + delta.get(t, 0)) for t, b in self.tiers if b + delta.get(t, 0) > 0)
        return Budget(tiers, source=source or self.source, shares=self.shares)

    def describe(self) -> str:
        """For people: ``GPU 0 8.5 GiB, CPU RAM 30 GiB``."""
        names = {"cpu": "CPU RAM", "disk": "disk", "mps": "MPS"}
        return ", ".join(f"{names.get(t, f'GPU {t}')} {format_bytes(b)}" for t, b in self.tiers)

    def __str__(self) -> str:
        """The command-line form, exact: ``parse_budget(str(b)) == b``."""
        return ",".join(f"{t}={_exact_size(b)}" for t, b in self.tiers)


def parse_budget(spec: Budget | Mapping | str, model_bytes: int | None = None) -> Budget:
    """Read a budget from any accepted form (see :data:`ACCEPTED_FORMS`).

    ``spec`` may be a :class:`Budget`, a dict like accelerate's ``max_memory``, the command-line
    string ``"0=8.5GiB,cpu=30GiB"`` or the same dict written as text. Shares (``"cpu=40%"``) are
    taken of ``model_bytes`` (the model's size in the dtype it will be loaded in) and need it.
    """
    if isinstance(spec, Budget):
        return spec
    source = spec if isinstance(spec, str) else repr(spec)
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise _fail("the budget is empty")
        if text.startswith("{"):
            try:
                spec = ast.literal_eval(text)
            except Exception:  # ValueError, SyntaxError, TypeError (unhashable keys), MemoryError, ...
                raise _fail(f"{text!r} is not a readable dict") from None
            if not isinstance(spec, dict):
                raise _fail(f"{text!r} is not a dict")
        else:
            items = {}
            for part in text.split(","):
                if "=" not in part:
                    raise _fail(f"{part.strip()!r} in {text!r} is not TIER=SIZE")
                key, _, value = part.partition("=")
                tier = _parse_tier(key)
                if tier in items:
                    raise _fail(f"tier {tier} is given twice in {text!r}")
                items[tier] = value.strip()
            spec = items
    if not isinstance(spec, Mapping):
        raise _fail(f"a budget cannot be made from {type(spec).__name__} {spec!r}")
    if not spec:
        raise _fail("the budget names no tier")

    tiers: dict[Tier, int] = {}
    shares = set()
    for key, value in spec.items():
        tier = _parse_tier(key)
        if tier in tiers:
            raise _fail(f"tier {tier} is given twice")
        share = _SHARE.match(value) if isinstance(value, str) else None
        if share:
            shares.add(tier)
            percent = float(share.group(1))
            if not 0 < percent <= 100:
                raise _fail(f"share {value!r} for tier {tier} is not between 0% and 100%")
            if model_bytes is None:
                raise _fail(f"share {value!r} for tier {tier} needs the model's size (model_bytes)")
            nbytes = int(model_bytes * percent / 100)
        else:
            nbytes = parse_size(value)
        if nbytes <= 0:
            raise _fail(f"tier {tier} gets {value!r}, nothing; leave the tier out instead")
        tiers[tier] = nbytes
    return Budget(tuple(sorted(tiers.items(), key=lambda kv: _tier_order(kv[0]))), source=source,
                  shares=frozenset(shares))


def _exact_size(n: int) -> str:
    """The shortest size text that reads back as exactly ``n`` bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and (n * 10**4) % scale == 0:  # at most 4 decimals, none lost
            text = f"{n / scale:.4f}".rstrip("0").rstrip(".")
            if parse_size(text + unit) == n:
                return text + unit
    return str(n)


def one_tier_down(spec: Budget | Mapping | str) -> dict[Tier, object]:
    """The same budget one tier down, for a machine without a GPU: GPU 0 becomes RAM, RAM becomes disk.

    ``{0: "8.5GiB", "cpu": "30GiB"}`` becomes ``{"cpu": "8.5GiB", "disk": "30GiB"}``; shares stay
    shares. A budget with no GPU tier is returned unchanged.
    """
    if isinstance(spec, Budget):
        items = dict(spec.tiers)
    elif isinstance(spec, str):
        parse_budget(spec, model_bytes=2**40)  # reject a malformed budget here, with the usual message
        text = spec.strip()
        pairs = ast.literal_eval(text).items() if text.startswith("{") else (
            (k, v.strip()) for k, _, v in (part.partition("=") for part in text.split(",")))
        items = {_parse_tier(k): v for k, v in pairs}
    else:
        items = {_parse_tier(k): v for k, v in spec.items()}
    gpus = sorted(t for t in items if isinstance(t, int))
    if not gpus:
        return items
    if len(gpus) > 1 or "disk" in items:
        raise _fail("only a budget with one GPU and no disk tier can be moved one tier down; write the RAM + disk budget yourself")
    shifted: dict[Tier, object] = {"cpu": items[gpus[0]]}
    if "cpu" in items:
        shifted["disk"] = items["cpu"]
    return shifted


def round_up_size(n: int | float) -> str:
    """A budget-style size at least ``n`` bytes, rounded up to two significant digits: ``7.9GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            digits = 1 if value < 10 else 0
            rounded = math.ceil(value * 10**digits) / 10**digits
            return f"{rounded:g}{unit}"
    return str(math.ceil(n))


def default_budget(has_gpu: bool | None = None) -> dict[Tier, str]:
    """The method's budget, or the same one tier down (RAM + disk) on a machine without a GPU."""
    if has_gpu is None:
        has_gpu = bool(detect_hardware().gpus)
    return dict(METHOD_BUDGET) if has_gpu else one_tier_down(METHOD_BUDGET)


# --------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Hardware:
    """What this machine offers each tier."""

    gpus: tuple[GPU, ...]
    mps: bool
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int
    disk_path: str

    @property
    def accelerator(self) -> str:
        if self.gpus:
            return "cuda"
        return "mps" if self.mps else "cpu"

    def summary(self) -> list[str]:
        lines = [f"CPU: {self.cpu_count} cores"]
        for g in self.gpus:
            lines.append(f"GPU {g.index}: {g.name}, {format_bytes(g.total_bytes)} ({format_bytes(g.free_bytes)} free)")
        if not self.gpus:
            lines.append("GPU: none" + (" (Apple MPS available)" if self.mps else ""))
        lines.append(f"RAM: {format_bytes(self.ram_total_bytes)} ({format_bytes(self.ram_available_bytes)} available)")
        lines.append(f"Disk: {format_bytes(self.disk_free_bytes)} free at {self.disk_path}")
        return lines

    def tiers(self) -> list[str]:
        """The tiers a device map can use here, fastest first."""
        return [str(g.index) for g in self.gpus] + ["cpu", "disk"]

    def what_runs_where(self) -> list[str]:
        """In words: which tiers the stages will use on this machine."""
        if self.gpus:
            g = self.gpus[0]
            return [
                f"Fast tier: GPU {g.index} ({format_bytes(g.total_bytes)}); slow tier: CPU RAM "
                f"({format_bytes(self.ram_total_bytes)}); last resort: disk.",
                "This is the method's own setting: blocks that fit the GPU budget stay there, the rest wait "
                "in RAM and are moved to the GPU when their turn comes.",
            ]
        return [
            "No GPU: the lessons run one tier down. CPU RAM is the fast tier and disk (an offload folder "
            "under outputs/) the slow one; everything computes on the CPU.",
            "Device maps split the model at the same block boundaries either way, so what you learn "
            "about placing blocks carries over to a GPU machine unchanged.",
        ]


def detect_hardware(disk_path: str | os.PathLike | None = None) -> Hardware:
    """GPUs and their memory, RAM, and free disk where outputs go (or at ``disk_path``)."""
    import psutil
    import torch

    from helpers.files import outputs_dir

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            try:
                free, total = torch.cuda.mem_get_info(i)
            except RuntimeError:
                free, total = props.total_memory, props.total_memory
            gpus.append(GPU(i, props.name, int(total), int(free)))
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    where = Path(disk_path) if disk_path else outputs_dir()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    vm = psutil.virtual_memory()
    return Hardware(
        gpus=tuple(gpus),
        mps=mps,
        cpu_count=os.cpu_count() or 1,
        ram_total_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        disk_free_bytes=int(shutil.disk_usage(probe).free),
        disk_path=str(where),
    )
