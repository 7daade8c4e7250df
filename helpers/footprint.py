"""Measure a model before loading it: bytes per dtype of weightless skeletons, per component and block.

Each component is built as a skeleton on PyTorch's meta device (:mod:`helpers.architecture`, with
accelerate's ``init_empty_weights``): the real module tree with shapes but no storage, so even the
12-billion-parameter transformer costs nothing to build. Counting its parameters gives the bytes it
needs in any dtype. The published configs of the families' models ship with this package
(``helpers/configs/``), so this needs no download. :mod:`helpers.planner` then places every stage
under a memory budget. Explained in ``01_memory-footprint.ipynb``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from helpers.activations import forward_peak
from helpers.architecture import count_params, skeleton
from helpers.budget import Budget
from helpers.devicemap import tier_label
from helpers.errors import UserError
from helpers.families import Family, default_family
from helpers.precision import Precision, short_name, stored_bytes

#: dtypes reported for every component, by the names torch gives them
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}



@dataclass(frozen=True)
class Stage:
    """A stage of the method: which components it holds at once (its family says which).

    ``whole`` components go on the first tier with room (the method loads them without a map);
    the others are split at block boundaries by accelerate.
    """

    whole: tuple[str, ...]
    mapped: tuple[str, ...]

    @property
    def components(self) -> tuple[str, ...]:
        return self.whole + self.mapped


def stage_of(family: Family, name: str) -> Stage:
    """Stage ``name`` of ``family``: its components loaded whole, and those split across tiers."""
    return Stage(whole=family.whole(name), mapped=family.mapped(name))


# --------------------------------------------------------------------------- footprint


@dataclass
class ComponentFootprint:
    component: str
    cls: str
    params: int
    #: stored bytes per dtype of :data:`DTYPES` (parameters and buffers; fp8: the linear layers'
    #: weights at 1 byte and a float32 scale per row, the rest bf16), from
    #: :func:`helpers.precision.stored_bytes`
    bytes: dict[str, int] = field(default_factory=dict)

    def nbytes(self, dtype: str | torch.dtype) -> int:
        name = str(dtype).replace("torch.", "")
        if name not in self.bytes:
            raise UserError(f"no footprint in {name}; the footprints are in {', '.join(self.bytes)}.")
        return self.bytes[name]


@dataclass
class Footprint:
    """Parameters and bytes of every component of one model, from skeletons."""

    model: str
    components: dict[str, ComponentFootprint]
    skeletons: dict[str, torch.nn.Module] = field(repr=False, default_factory=dict)
    _stored: dict = field(repr=False, default_factory=dict)
    family: Family = field(repr=False, default_factory=default_family)

    def stage(self, name: str) -> Stage:
        return stage_of(self.family, name)

    def stored_skeleton(self, component: str, weights: str, file=None) -> torch.nn.Module:
        """The component's skeleton with its tensors in the dtypes ``weights`` stores (fp8: weights
        and scales), or in the stored forms of a transformer ``file`` (GGUF blocks...), on meta; what a
        plan places when the format is not one dtype for all. Made once per footprint (a plan asks
        for it several times: its bytes, its blocks, its placement)."""
        import copy

        from helpers.precision import to_storage

        key = (component, weights, None if file is None else (str(file.path), file.nbytes))
        if key not in self._stored:
            self._stored[key] = (file.skeleton(self.skeletons[component]) if file is not None else
                                 to_storage(copy.deepcopy(self.skeletons[component]), weights))
        return self._stored[key]

    def block_bytes(self, component: str, prec: Precision) -> list[tuple[str, int]]:
        """``(name, stored bytes)`` of the component's blocks in ``prec``'s weights format."""
        if prec.file is not None and component == self.family.file_component:
            return no_split_blocks(self.stored_skeleton(component, prec.weights, prec.file))
        return no_split_blocks(self.skeletons[component], prec.weights)

    def nbytes(self, dtype: str | torch.dtype, components=None) -> int:
        names = components or list(self.components)
        return sum(self.components[c].nbytes(dtype) for c in names)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.components.values())

    def rows(self) -> list[dict]:
        """Table rows: class, parameters, and GiB and GB per dtype."""
        rows = []
        for c in [*self.components.values(), None]:
            name, cls, params = (c.component, c.cls, c.params) if c else ("total", "", self.params)
            row = {"component": name, "class": cls, "params": params}
            for dt in DTYPES:
                nbytes = c.nbytes(dt) if c else self.nbytes(dt)
                row[f"{dt} GiB"] = round(nbytes / 2**30, 3)
            row["float32 GB"] = round((c.nbytes("float32") if c else self.nbytes("float32")) / 1e9, 3)
            rows.append(row)
        return rows

    def as_dict(self) -> dict:
        return {
            c.component: {"class": c.cls, "params": c.params, "bytes": {dt: c.nbytes(dt) for dt in DTYPES}}
            for c in self.components.values()
        }


def footprint(model=None, tie: bool = True, components=None, computed: bool = False) -> Footprint:
    """Footprint of the components of ``model`` (all by default), built on meta.

    Configs come from :func:`component_configs`: no weights, no download. ``computed``: of each
    component only the part its stage runs (:meth:`helpers.families.Component.computed`: an LLM
    encoder up to the deepest layer read), what a plan places; by default each as stored.
    """
    from helpers.models import resolve_model

    ref = resolve_model(model)
    name, configs, family = ref.name, ref.configs, ref.family
    comps, skels = {}, {}
    for comp in [c for c in family.models if components is None or c in components]:
        module = skeleton(comp, configs[comp], tie=tie, family=family)
        if computed:
            module = family.component(comp).computed(module)
        skels[comp] = module
        comps[comp] = ComponentFootprint(comp, type(module).__name__, count_params(module),
                                         {dt: stored_bytes(module, short_name(dt)) for dt in DTYPES})
    return Footprint(name, comps, skels, family=family)


# --------------------------------------------------------------------------- activations


def activation_bytes(component: str, config: dict, dtype: torch.dtype, height: int = 1024, width: int = 1024,
                     tokens: int = 512, cpu: bool = False, family: Family | None = None) -> int:
    """Peak activations of one forward of ``component`` built from ``config``, batch 1, computing in
    ``dtype``: for ``transformer`` one denoising step of a ``height`` x ``width`` image with ``tokens``
    text tokens; for ``vae`` the decode of that image; for ``text_encoder_2`` one prompt of
    ``tokens`` tokens; ``cpu``: with the scratch a CPU's convolutions hold. See
    :func:`helpers.activations.forward_peak`. No weights."""
    family = family or default_family()
    counted = [c.name for c in family.components if c.activation]
    if component not in counted:
        raise UserError(f"activations are estimated for {', '.join(counted)}, not {component!r}.")
    return forward_peak(component, skeleton(component, config, family=family), dtype, height, width, tokens, cpu=cpu,
                        family=family)


# --------------------------------------------------------------------------- plans


def no_split_blocks(module: torch.nn.Module, weights: str | None = None) -> list[tuple[str, int]]:
    """``(name, bytes)`` of the model's blocks (its no-split modules), in order, as ``weights`` stores
    them (``None``: as they are)."""
    from helpers.devicemap import model_units

    no_split = list(getattr(module, "_no_split_modules", None) or [])
    return [(u, n) for u, n in model_units(module, no_split, weights)
            if u and type(module.get_submodule(u)).__name__ in no_split]


# --------------------------------------------------------------------------- charts


def plot_footprint(fp: Footprint, budget: Budget | None = None, ax=None, title: str = ""):
    """Stacked bars of the components per dtype (GiB), with the budget's tiers as lines."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 5.5))
    names = list(DTYPES)
    bottoms = [0.0] * len(names)
    for comp in fp.components.values():
        heights = [comp.nbytes(dt) / 2**30 for dt in names]
        ax.bar(names, heights, bottom=bottoms, label=f"{comp.component} ({comp.cls})", color=fp.family.component(comp.component).colour)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, total in enumerate(bottoms):
        ax.text(i, total, f"{total:.1f} GiB", ha="center", va="bottom", fontsize=12)
    if budget is not None:
        running = 0
        styles = ["--", ":", "-."]
        for k, (tier, nbytes) in enumerate(budget.tiers):
            running += nbytes
            label = " + ".join(tier_label(t) for t, _ in budget.tiers[: k + 1])
            ax.axhline(running / 2**30, linestyle=styles[k % 3], color="black", linewidth=1.5)
            ax.text(len(names) - 0.5, running / 2**30, f" {label}: {running / 2**30:.1f} GiB", va="bottom", ha="right", fontsize=11)
    ax.set_ylabel("GiB", fontsize=12)
    ax.tick_params(labelsize=12)
    ax.set_title(title or f"{fp.model}: weights per dtype", fontsize=13)
    ax.legend(fontsize=10, loc="upper right", bbox_to_anchor=(1.0, 0.93))
    ax.spines[["top", "right"]].set_visible(False)
    return ax
