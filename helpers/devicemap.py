"""Device maps: which blocks of a model go to which memory tier under a budget.

:func:`plan_component` asks accelerate's ``infer_auto_device_map`` for a placement of a model
(a weightless skeleton is enough) with the model's own ``_no_split_modules``, then expands the map
to the model's blocks so that each block has a tier and a size. :func:`draw_plan` pictures it.
Explained in ``01_memory-footprint.ipynb``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from helpers.budget import Budget, Tier
from helpers.report import format_bytes

#: colours of the tiers in every chart: GPUs green, mps teal, cpu blue, disk orange, overflow red
TIER_COLOURS = {"gpu": "#2ca02c", "mps": "#17becf", "cpu": "#1f77b4", "disk": "#ff7f0e", "overflow": "#d62728"}


def tier_label(tier: Tier) -> str:
    return f"GPU {tier}" if isinstance(tier, int) else {"cpu": "CPU RAM", "disk": "disk", "mps": "MPS"}.get(tier, str(tier))


def tier_colour(tier: Tier | str) -> str:
    if isinstance(tier, int) or (isinstance(tier, str) and tier.isdigit()):
        return TIER_COLOURS["gpu"]
    return TIER_COLOURS.get(str(tier), "#7f7f7f")


@dataclass
class Unit:
    """One placeable piece of a model: a block, or a small module outside the blocks."""

    name: str
    nbytes: int
    tier: Tier


@dataclass
class ComponentPlan:
    """Where one component's units go."""

    component: str
    dtype: torch.dtype
    units: list[Unit] = field(default_factory=list)
    #: accelerate's own (condensed) device map, as it would be passed to ``from_pretrained``
    device_map: dict[str, Tier] = field(default_factory=dict)

    def tier_bytes(self) -> dict[Tier, int]:
        out: dict[Tier, int] = {}
        for u in self.units:
            out[u.tier] = out.get(u.tier, 0) + u.nbytes
        return out


@contextlib.contextmanager
def _quiet_missing_gpu() -> Iterator[None]:
    """accelerate warns 'Device 0 is not available' when planning for a GPU this machine lacks.

    Planning for a GPU tier needs no GPU: the plan is arithmetic on sizes. The notebooks say so
    once instead of showing the warning on every call.
    """

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "is not available, available devices are" not in record.getMessage()

    log = logging.getLogger("accelerate.utils.modeling")
    flt = _Drop()
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


def model_units(model: torch.nn.Module, no_split: list[str] | tuple[str, ...],
                weights: str | None = None) -> list[tuple[str, int]]:
    """The model's placeable units in order, each with its bytes (shared tensors once).

    A unit is a module of a no-split class (a block), or a module with parameters that holds no
    block. Tensors counted by an earlier unit (tied weights) are not counted again. Bytes: parameters
    and buffers, in their own dtypes (``weights=None``: a skeleton as it is, fp8 weights and scales
    included) or as the format ``weights`` stores them (:func:`helpers.precision.tensor_bytes`).
    """
    from helpers.precision import tensor_bytes

    no_split = set(no_split)

    def holds_block(module: torch.nn.Module) -> bool:
        return any(type(m).__name__ in no_split for m in module.modules())

    names: list[str] = []

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if type(child).__name__ in no_split or not holds_block(child):
                if any(True for _ in child.parameters()):
                    names.append(name)
            else:
                walk(f"{name}.", child)

    walk("", model)
    seen: set[int] = set()

    def size(module: torch.nn.Module, recurse: bool = True) -> int:
        n = 0
        for owner in (module.modules() if recurse else [module]):
            for leaf, t in [*owner._parameters.items(), *owner._buffers.items()]:
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    n += tensor_bytes(owner, leaf, t, weights)
        return n

    counts = [(name, size(model.get_submodule(name))) for name in names]
    own = size(model, recurse=False)
    if own:
        counts.insert(0, ("", own))
    return counts


def _tier_of(unit: str, device_map: dict[str, Tier]) -> Tier:
    best, tier = -1, "disk"
    for key, value in device_map.items():
        if key == "" or unit == key or unit.startswith(key + "."):
            if len(key) > best:
                best, tier = len(key), value
    return tier


def _buffers_on_the_fast_tier(model: torch.nn.Module, device_map: dict, budget: Budget) -> None:
    """A module the map names that holds no parameters (an LLM's rotary tables, a norm made a no-op)
    goes to the fastest tier the map uses, not where accelerate's order left it (after the last
    block: the disk, whose hooks would have no value for a buffer made at build time)."""
    used = set(device_map.values())
    fast = next((t for t in budget.names if t in used and t != "disk"), None)
    for key, tier in device_map.items():
        if fast is not None and tier != fast and key and not any(True for _ in model.get_submodule(key).parameters()):
            device_map[key] = fast


def plan_component(
    model: torch.nn.Module,
    budget: Budget,
    dtype: torch.dtype | None,
    component: str = "",
    whole: bool = False,
) -> ComponentPlan:
    """Place ``model`` under ``budget`` in ``dtype``; ``whole`` puts it on the first tier with room.

    ``dtype=None``: in the model's own dtypes, buffers included (a skeleton converted to a storage
    format, fp8 weights with their scales: :func:`helpers.precision.to_storage`).

    Uses ``infer_auto_device_map`` with the model's ``_no_split_modules`` (blocks are never cut) and a
    fresh ``max_memory`` dict (accelerate rewrites the one it gets). Units that fit no budgeted tier
    land on ``"disk"``, as accelerate does; whether that is allowed is the caller's call.
    """
    from accelerate import infer_auto_device_map

    from helpers.precision import short_name, tensor_bytes

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    weights = None if dtype is None else short_name(dtype)
    units = model_units(model, no_split, weights)
    if whole:
        total = sum(b for _, b in units)
        tier = next((t for t, room in budget.tiers if room >= total and t != "disk"), "disk")
        device_map: dict[str, Tier] = {"": tier}
    else:
        with _quiet_missing_gpu():
            device_map = infer_auto_device_map(
                model, max_memory=budget.max_memory(), no_split_module_classes=no_split, dtype=dtype
            )
        _buffers_on_the_fast_tier(model, device_map, budget)
    plan = ComponentPlan(component=component, dtype=dtype, device_map=dict(device_map))
    seen: set[int] = set()
    for name, nbytes in units:
        finer = [k for k in device_map if name == "" or k.startswith(name + ".")]
        if not finer:
            pieces = [(name, nbytes, _tier_of(name, device_map))]
        else:
            # accelerate split this small module further: place its parameters one by one
            pieces_by_key: dict[str, list] = {}
            module = model.get_submodule(name) if name else model
            for owner_name, owner in module.named_modules():
                for leaf, p in [*owner._parameters.items(), *owner._buffers.items()]:
                    if p is None or id(p) in seen:
                        continue
                    seen.add(id(p))
                    full_param = ".".join(x for x in (name, owner_name, leaf) if x)
                    key = max((k for k in device_map if k == "" or full_param.startswith(k + ".")), key=len,
                              default=name)
                    entry = pieces_by_key.setdefault(key or name, [0, _tier_of(full_param, device_map)])
                    entry[0] += tensor_bytes(owner, leaf, p, weights)
            pieces = [(key, b, tier) for key, (b, tier) in pieces_by_key.items()]
        if not finer:
            module = model.get_submodule(name) if name else model
            seen.update(id(p) for p in [*module.parameters(), *module.buffers()])
        for piece, b, tier in pieces:
            full = f"{component}.{piece}" if component and piece else (component or piece)
            plan.units.append(Unit(full, b, tier))
    return plan


def misplaced(model: torch.nn.Module, device_map: dict[str, Tier]) -> tuple[list[str], list[str]]:
    """What is wrong with ``device_map`` for ``model``: the names it places that are not modules of
    the model, and the model's parameters that no name places (a map read from a file is checked
    with this before accelerate is handed it)."""
    modules = {name for name, _ in model.named_modules()}
    unknown = [k for k in device_map if k not in modules]
    keys = set(device_map) - set(unknown)
    if "" in keys:
        return unknown, []
    unplaced = []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if not any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1)):
            unplaced.append(name)
    return unknown, unplaced


def remaining(budget: Budget, used: dict[Tier, int]) -> Budget:
    """What is left of ``budget`` after ``used``; tiers with nothing left are dropped."""
    left = tuple((t, b - used.get(t, 0)) for t, b in budget.tiers if b - used.get(t, 0) > 0)
    return Budget(left, source=f"{budget} minus what is placed")


def draw_plan(plans: list[ComponentPlan], title: str = "", ax=None, budget: Budget | None = None):
    """One row per component, one box per unit (width = bytes), coloured by tier."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if ax is None:
        _, ax = plt.subplots(figsize=(12, 0.9 + 0.75 * len(plans)))
    overflow = set()
    if budget is not None:
        overflow = {"disk"} - set(budget.names)
    tiers_seen: dict[str, str] = {}
    longest = max((sum(u.nbytes for u in p.units) for p in plans), default=0)
    unit_name, scale = next((n, s) for n, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
                            if longest >= s or s == 1)
    for row, plan in enumerate(reversed(plans)):
        x = 0.0
        for unit in plan.units:
            gib = unit.nbytes / scale
            key = "overflow" if unit.tier in overflow else unit.tier
            colour = TIER_COLOURS["overflow"] if key == "overflow" else tier_colour(unit.tier)
            label = "does not fit" if key == "overflow" else tier_label(unit.tier)
            tiers_seen[label] = colour
            ax.barh(row, gib, left=x, color=colour, edgecolor="white", linewidth=0.6, height=0.7)
            x += gib
    ax.set_yticks(range(len(plans)), [p.component for p in reversed(plans)], fontsize=12)
    ax.set_xlabel(f"{unit_name} (each box is one block or module)", fontsize=12)
    ax.tick_params(axis="x", labelsize=11)
    if title:
        ax.set_title(title, fontsize=13)
    ax.legend(handles=[Patch(color=c, label=l) for l, c in tiers_seen.items()], loc="center left",
              bbox_to_anchor=(1.01, 0.5), fontsize=11, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return ax


def summarise(plans: list[ComponentPlan]) -> list[dict]:
    """Rows per component and tier: how many units and bytes land there, and which range of blocks."""
    rows = []
    for plan in plans:
        by_tier: dict[Tier, list[Unit]] = {}
        for u in plan.units:
            by_tier.setdefault(u.tier, []).append(u)
        for tier, units in by_tier.items():
            rows.append({
                "component": plan.component,
                "tier": tier_label(tier),
                "units": len(units),
                "bytes": sum(u.nbytes for u in units),
                "from": units[0].name,
                "to": units[-1].name,
            })
    return rows


def format_tier_bytes(tiers: dict[Tier, int]) -> str:
    return ", ".join(f"{tier_label(t)} {format_bytes(b)}" for t, b in tiers.items())


def tier_usage(plan, measurement) -> list[dict]:
    """Per tier of a stage's budget: what was planned, and what a measured run used.

    GPU tiers: peak memory allocated by PyTorch; ``cpu``: the rise of the process's resident memory
    over the start of the run; ``disk``: the weights the plan keeps there. ``beyond the weights`` is
    the measured use less the weights planned on the tier: activations, buffers and, in RAM, the
    process's own bookkeeping (tokenizers, hooks, allocator pages), a few MiB whatever the model.
    For a twin, whose budget is itself a few MiB, that alone can exceed the budget; ``reading`` says
    so next to the figure rather than leaving it to look like a broken budget.
    """
    tiers = plan.tier_bytes()
    rows = []
    for tier, allowed in plan.budget.tiers:
        weights = tiers.get(tier, 0)
        if isinstance(tier, int):
            used, what = measurement.peak_gpu.get(tier, 0), "peak allocated"
        elif tier == "cpu":
            used, what = measurement.peak_rss_delta, "peak RSS rise"
        else:
            used, what = weights, "weights kept on disk"
        rows.append({"tier": str(tier), "budget": format_bytes(allowed), "planned weights": format_bytes(weights),
                     "measured": format_bytes(used), "beyond the weights": format_bytes(max(used - weights, 0)),
                     "what": what, "reading": _reading(used, weights, allowed, tier)})
    return rows


def _reading(used: int, weights: int, allowed: int, tier) -> str:
    """One line that says whether a tier's measured use is within its budget, and if not, why."""
    if used <= allowed:
        return "within the budget"
    if weights > allowed:
        return "over the budget: the weights do not fit"
    if tier == "cpu":
        return ("over by the process's own memory (libraries, tokenizers, buffers), not the weights: "
                "a few MiB, which only a budget of a few MiB notices")
    return "over the budget by activations and buffers: keep more room for them (a smaller size or batch)"
