"""Load a stage's components as its plan says: where each block goes, how it moves, in what precision.

One path for every stage and the benchmark: a component split across tiers is loaded with the
method's accelerate map (:func:`load_mapped`, ``offload="accelerate"``) or streamed
(``"stream"``, :mod:`helpers.offload.streamers`); one loaded whole goes to its tier (:func:`load_whole`).
Both store the weights in the plan's :attr:`~helpers.planner.StagePlan.precision` and, where
its compute dtype differs, upcast them layer by layer as they run
(:func:`helpers.offload.upcast.upcast_layerwise`). Before any weight loads, the checkpoint's header is
checked for what the loaders cannot read right (fp8 weights with scales).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.budget import Tier
from helpers.errors import UserError
from helpers.files import check_free_space, remove_folder, run_folder
from helpers.formats.sources import CheckpointFolder
from helpers.precision import FP8_REST


def torch_device(tier: Tier) -> torch.device:
    """The device that computes for a tier: GPU ``i`` for tier ``i``, else the CPU."""
    return torch.device("cuda", tier) if isinstance(tier, int) else torch.device("cpu")


def check_checkpoint(folder: str | os.PathLike) -> None:
    """Refuse, from the headers alone, weights the loaders would read wrong: fp8 tensors stored with
    scales beside them (``*_scale``, ``*.scale_weight``) by another tool, which a plain cast to bf16
    would ignore. A folder ``convert`` made records its format and is read with its scales."""
    from helpers.formats.sources import read_safetensors_index
    from helpers.precision import folder_format

    folder = Path(folder)
    if not any(folder.glob("*.safetensors")) or folder_format(folder) == "fp8":
        return  # from_pretrained says what is missing; our own fp8 is read right
    index = read_safetensors_index(folder)
    fp8 = [n for n, (_, _, _, dtype, _) in index.items() if dtype.startswith("F8")]
    scales = [n for n in index if n.endswith(("_scale", ".scale_weight", ".weight_scale", ".scale_input"))]
    if fp8 and scales:
        raise UserError(
            f"{folder} stores {len(fp8)} tensors in fp8 with {len(scales)} scales beside them (e.g. {scales[0]}), in a "
            "layout these loaders do not know, and would compute with wrong weights: use a bf16 checkpoint, or make "
            "an fp8 copy of one with `python -m helpers convert --weights fp8`."
        )


def _check_loadable(precision) -> None:
    if not precision.loadable:
        raise UserError(f"{precision.weights} weights are counted by the plans, not loaded yet: use --weights bf16 or fp32.")


def compare_maps(planned: dict[str, Tier], applied: dict[str, Tier]) -> list[str]:
    """What differs between the planned device map and ``model.hf_device_map``; empty when they agree.

    accelerate may condense or expand entries (a whole ``encoder`` vs its blocks), so both maps are
    compared module by module: each name of either map gets the tier of its longest prefix in each.
    """

    def tier(name: str, mapping: dict[str, Tier]) -> Tier | None:
        best, found = -1, None
        for key, value in mapping.items():
            if key == "" or name == key or name.startswith(key + "."):
                if len(key) > best:
                    best, found = len(key), value
        return found

    every = set(planned) | set(applied)
    # compare at the finest level either map names: skip a name that another name refines
    names = sorted(n for n in every if not any(o != n and (n == "" or o.startswith(n + ".")) for o in every))
    out = []
    for name in names:
        a, b = tier(name, planned), tier(name, applied)
        if a != b:
            out.append(f"{name or '(whole model)'}: planned {a}, applied {b}")
    return out


@dataclass
class Loaded:
    """A component loaded by its plan: the model, the map applied, and what to clean up after."""

    model: torch.nn.Module
    applied: dict[str, Tier]
    device: torch.device  # where it computes
    offload: str  # "accelerate" or "stream"
    streamer: object | None = None
    offload_folder: Path | None = None
    temporary: bool = False  # the offload folder is this run's own, removed by close()
    differences: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        if self.temporary and self.offload_folder is not None:
            remove_folder(self.offload_folder)
            self.temporary = False


def _streamed_units(model: torch.nn.Module, block_lists: list[str]) -> list[str]:
    """The model's units as a device map names them: its children, the block lists' members in
    their place, each tied tensor once."""
    units: list[str] = []
    seen: set[int] = set()

    def walk(prefix: str, module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full in block_lists:
                units.extend(f"{full}.{i}" for i in range(len(child)))
            elif any(b.startswith(full + ".") for b in block_lists):
                walk(full + ".", child)
            else:
                params = {id(p) for p in child.parameters()}
                if params and params <= seen:  # T5's embed_tokens is its shared embedding
                    continue
                units.append(full)
            seen.update(id(p) for p in child.parameters())

    walk("", model)
    return units


def settle_offload(offload: str, plan, folder: str | os.PathLike) -> tuple[str, str, dict]:
    """``(offload, why, stream)`` for a stage's plan, settled before anything loads: ``auto`` becomes
    ``stream`` where the budget has no GPU tier and the stream of each split component fits it (planned
    from the checkpoint's headers in ``folder``, no weight read), else ``accelerate``; ``stream``: each
    streamed component's choice (resident blocks, kept parts, pool: :meth:`StreamPlan.choice
    <helpers.offload.plan.StreamPlan.choice>`). What a planner records in the job, so that the job says
    what runs (:func:`load_mapped` does the same for an unsettled one)."""
    from helpers.offload.streamers import StreamBudgetError, check_offload, choose_offload, plan_streaming, stream_budget

    asked = check_offload(offload)
    if asked == "accelerate" or (asked == "auto" and choose_offload(offload, plan.budget) != "stream"):
        return "accelerate", "asked for" if asked != "auto" else "auto: a GPU tier computes, fed by accelerate's hooks", {}
    family, precision, folder = plan.family, plan.precision, Path(folder)
    choices = {}
    stage = plan.stage
    for component in family.mapped(stage):
        file = precision.file if component == family.file_component else None
        if file is None:
            try:
                check_checkpoint(folder / component)
            except UserError:  # its weights are not (all) here yet: the loader settles it, as it reads them
                if asked == "stream":
                    return "stream", "asked for", {}
                return "auto", f"auto: {component}'s weights are not all on this machine yet; settled as they load", {}
        cpu, device, device_bytes = stream_budget(plan.budget, whole_bytes(plan, family.whole(stage)))
        source = file if file is not None else CheckpointFolder(folder / component, precision.weights)
        dtype = FP8_REST if precision.weights == "fp8" else precision.storage_dtype
        try:
            spec = family.component(component)
            _, streamed = plan_streaming(folder / component, spec.load_class(), dtype, cpu, list(spec.block_lists),
                                         device=device, device_bytes=device_bytes, reserve=plan.reserve_bytes,
                                         compute=precision.compute_dtype, source=source, part=spec.computes)
        except StreamBudgetError as err:
            if asked == "stream":
                raise
            return "accelerate", f"auto: the stream does not fit ({str(err).split(';')[0]}), so accelerate's hooks", {}
        choices[component] = streamed.choice()
    if asked == "stream":
        return "stream", "asked for", choices
    return "stream", "auto: no GPU tier, and the stream fits the fast tier", choices


def load_mapped(folder: str | os.PathLike, cls, component: str, plan, offload: str = "accelerate",
                whole: dict[Tier, int] | None = None, offload_folder: str | os.PathLike | None = None,
                progress: bool = True) -> Loaded:
    """Load ``component`` of stage ``plan`` from its ``folder``: split across the plan's tiers.

    ``offload="auto"``: ``stream`` where the budget has no GPU tier and the stream fits it, else
    ``accelerate``. ``"accelerate"``: the plan's device map, applied by accelerate (blocks on disk go to
    ``offload_folder``, by default a fresh one of this run's own, removed by :meth:`Loaded.close`).
    ``"stream"``: what the fast tier cannot hold is streamed (:func:`helpers.offload.streamers.load_streaming`;
    raises :class:`helpers.offload.streamers.StreamBudgetError` before any weight loads when it cannot),
    keeping the plan's room for activations free; ``whole``: the stage's components loaded whole,
    ``{tier: bytes}``, whose bytes come off their tier. The weights are stored in the plan's precision
    and upcast layer by layer to its compute dtype.
    """
    from helpers.offload.streamers import StreamBudgetError, check_offload, choose_offload, load_streaming, stream_budget
    from helpers.offload.upcast import upcast_layerwise

    folder = Path(folder)
    _check_loadable(plan.precision)
    family = plan.family
    file = plan.precision.file if component == family.file_component else None  # --transformer FILE: weights from it
    if file is None:
        check_checkpoint(folder)
    if choose_offload(check_offload(offload), plan.budget) == "stream" and offload != "stream":
        try:  # auto: the stream where it fits the budget (found before any weight loads), else the hooks
            return load_mapped(folder, cls, component, plan, "stream", whole, offload_folder, progress)
        except StreamBudgetError:
            offload = "accelerate"
    elif offload == "auto":
        offload = "accelerate"
    precision = plan.precision
    if offload == "stream":
        cpu, device, device_bytes = stream_budget(plan.budget, whole or {})
        blocks = list(family.block_lists(component))
        fp8 = precision.weights == "fp8"
        source = file if file is not None else CheckpointFolder(folder, precision.weights)
        model, streamer = load_streaming(folder, cls, FP8_REST if fp8 else precision.storage_dtype, cpu, blocks,
                                         device=device, device_bytes=device_bytes, reserve=plan.reserve_bytes,
                                         progress=progress, compute=precision.compute_dtype, source=source,
                                         choice=plan.stream.get(component), part=family.component(component).computes)
        streamed = set(streamer.streamed_blocks) if streamer else set()
        fast, slow = (device.index, "cpu") if device is not None else ("cpu", "disk")
        applied = {u: slow if u in streamed else fast for u in _streamed_units(model, blocks)}
        loaded = Loaded(model.eval(), applied, device if device is not None else torch.device("cpu"), "stream",
                        streamer=streamer)
    elif offload == "accelerate":
        loaded = _load_accelerate(folder, cls, component, plan, file, offload_folder)
    else:
        raise UserError(f"unknown offload {offload!r}; use 'accelerate' or 'stream'.")
    if precision.upcasts:
        upcast_layerwise(loaded.model, precision.compute_dtype)
    return loaded


def _load_accelerate(folder: Path, cls, component: str, plan, file, offload_folder) -> Loaded:
    """``component`` under the plan's device map, applied by accelerate's hooks (blocks on disk copied to
    ``offload_folder``, by default a fresh one of this run's own); the map applied checked against the plan."""
    precision, family = plan.precision, plan.family
    comp_plan = next(p for p in plan.components if p.component == component)
    if precision.weights == "fp8" and family.component(component).fp8_stream_only:
        raise UserError(family.component(component).fp8_stream_only)
    device_map = dict(comp_plan.device_map)
    temporary = False
    if "disk" in device_map.values():
        if offload_folder is None:
            offload_folder, temporary = run_folder(component), True
        offload_folder = Path(offload_folder)
        offload_folder.mkdir(parents=True, exist_ok=True)
        on_disk = sum(u.nbytes for u in comp_plan.units if u.tier == "disk")
        try:  # accelerate writes the disk tier's copies there before the first step: room for them first
            check_free_space(offload_folder, on_disk, f"the disk tier's copies of {component}")
        except UserError:
            if temporary:
                remove_folder(offload_folder)
            raise
    else:
        offload_folder = None
    part = family.component(component).computes
    try:
        if file is not None or part is not None:  # read by offsets: of a cut part, only what it computes
            source = file if file is not None else CheckpointFolder(folder, precision.weights)
            model = _dispatch_source(source, _stored_skeleton(folder, cls, part, source, precision), device_map,
                                     offload_folder)
        elif precision.weights == "fp8":
            model = _dispatch_fp8(folder, cls, device_map, offload_folder)
        else:
            model = cls.from_pretrained(folder, dtype=precision.storage_dtype, device_map=device_map,
                                        offload_folder=offload_folder)
    except BaseException:  # Ctrl-C or a failure while loading: this run's copies go too
        if temporary:
            remove_folder(offload_folder)
        raise
    applied = dict(getattr(model, "hf_device_map", None) or (device_map if part is not None else {"": "cpu"}))
    used = set(device_map.values())
    fastest = next((t for t in plan.budget.names if t in used and t != "disk"), "cpu")  # the budget's order
    return Loaded(model.eval(), applied, torch_device(fastest), "accelerate", offload_folder=offload_folder,
                  temporary=temporary, differences=compare_maps(device_map, applied))


def load_whole(folder: str | os.PathLike, cls, tier: Tier, precision, part=None) -> torch.nn.Module:
    """A component the plan loads whole on ``tier`` (CLIP, the VAE), in ``precision``; in an fp8
    stage one that was not converted (the VAE, by default) is stored in bf16. ``part``: of it only the
    part a stage computes (:attr:`helpers.families.Component.computes`), read by offsets."""
    from helpers.precision import folder_format
    from helpers.offload.upcast import upcast_layerwise

    folder = Path(folder)
    _check_loadable(precision)
    check_checkpoint(folder)
    if part is not None:
        source = CheckpointFolder(folder, precision.weights)
        model = _dispatch_source(source, _stored_skeleton(folder, cls, part, source, precision), {"": tier}, None)
    elif precision.weights == "fp8" and folder_format(folder) == "fp8":
        model = _dispatch_fp8(folder, cls, {"": tier}, None)
    else:
        dtype = FP8_REST if precision.weights == "fp8" else precision.storage_dtype
        model = cls.from_pretrained(folder, dtype=dtype).to(torch_device(tier))
    model = model.eval()
    if precision.upcasts:
        upcast_layerwise(model, precision.compute_dtype)
    return model


def _checkpoint(folder: Path) -> Path:
    """The file accelerate reads a component from: its shards' index, or its one file."""
    index = next(folder.glob("*.safetensors.index.json"), None)
    if index is not None:
        return index
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise UserError(f"{folder} has {len(files)} .safetensors files and no index; convert the model again.")
    return files[0]


def _dispatch_fp8(folder: Path, cls, device_map: dict, offload_folder) -> torch.nn.Module:
    """An fp8 folder (``convert``) loaded as stored: a skeleton with fp8 linear weights and scale
    buffers, filled from the checkpoint and dispatched by accelerate with the plan's map (diffusers'
    ``from_pretrained`` would cast the fp8 weights and drop the scales)."""
    from accelerate import load_checkpoint_and_dispatch

    from helpers.offload.streamers import skeleton_from_folder
    from helpers.precision import to_storage

    model = to_storage(skeleton_from_folder(folder, cls), "fp8")
    model = load_checkpoint_and_dispatch(model, str(_checkpoint(folder)), device_map=device_map,
                                         offload_folder=str(offload_folder) if offload_folder else None,
                                         dtype=None, strict=True, offload_buffers=True)  # scales go with their weights
    if hasattr(model, "tie_weights") and not hasattr(cls, "load_config"):
        model.tie_weights()
    return model


def _stored_skeleton(folder: Path, cls, part, source, precision) -> torch.nn.Module:
    """``cls``'s skeleton from ``folder`` (cut to ``part``, the component's computed part), its parameters in the
    dtype they are held in and dressed in ``source``'s stored forms (fp8 and its scales, GGUF blocks)."""
    from helpers.offload.streamers import skeleton_from_folder

    model = skeleton_from_folder(folder, cls)
    if part is not None:
        model = part(model)
    if isinstance(source, CheckpointFolder):  # a file's stored forms name every tensor's dtype themselves
        dtype = FP8_REST if precision.weights == "fp8" else precision.storage_dtype
        for t in model.parameters():  # on meta; a tensor read is held in its parameter's dtype (fp8: as stored)
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    return source.dress(model)


def _dispatch_source(source, model: torch.nn.Module, device_map: dict, offload_folder) -> torch.nn.Module:
    """``model`` (a skeleton in ``source``'s stored forms) filled from ``source`` (a transformer file,
    :class:`helpers.formats.transformer_file.TransformerFile`, or a checkpoint folder) as stored and
    dispatched by accelerate with the plan's map: each tensor read by offset straight to its tier, the
    disk tier's written to ``offload_folder`` one at a time (RAM never holds the whole file; tensors
    the model does not hold are never read), GGUF types and fp8 scales beside their weights
    (``offload_buffers``)."""
    from accelerate import dispatch_model
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device

    # the plan's units (no-split blocks, or "" for the whole model): a tensor goes where its unit does
    units = sorted(device_map, key=len, reverse=True)
    fastest = next((t for t in device_map.values() if t != "disk"), "cpu")

    def tier_of(name: str):
        unit = next((u for u in units if u == "" or name == u or name.startswith(u + ".")), None)
        return fastest if unit is None else device_map[unit]

    offloaded: dict = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        tier = tier_of(name)
        value = source.read(name) if name in source.index else t
        if value.device.type == "meta":
            raise UserError(f"{name} has no value in {source.where}; cannot load this model.")
        if tier == "disk":
            offload_weight(value, name, str(offload_folder), index=offloaded)
            set_module_tensor_to_device(model, name, "meta")
        else:
            set_module_tensor_to_device(model, name, torch_device(tier), value=value)
    save_offload_index(offloaded, str(offload_folder))
    main = torch_device(fastest)
    if set(device_map.values()) == {"cpu"} or device_map == {"": "cpu"}:
        return model
    model = dispatch_model(model, device_map={u: (t if t == "disk" else torch_device(t)) for u, t in device_map.items()},
                           main_device=main, offload_dir=str(offload_folder) if offloaded else None,
                           offload_buffers=True)
    model.hf_device_map = dict(device_map)  # what was applied, in the plan's tier names (0, "cpu", "disk")
    return model


def load_stage(folder: str | os.PathLike, plan, offload: str = "accelerate",
               offload_folder: str | os.PathLike | None = None, progress: bool = True) -> tuple[Loaded, dict]:
    """Every part of the plan's stage from ``folder``, as its family says: the split component as the
    plan maps it (:func:`load_mapped`), the ones loaded whole on their tier (:func:`load_whole`), and the
    parts without weights (tokenizers, the scheduler). ``(the split one's Loaded, {part: object})``; a
    failure after the split one loaded closes it."""
    folder, family, stage = Path(folder), plan.family, plan.stage
    main, whole = family.main(stage), family.whole(stage)
    loaded = load_mapped(folder / main, family.component(main).load_class(), main, plan, offload,
                         whole=whole_bytes(plan, whole), offload_folder=offload_folder, progress=progress)
    parts = {main: loaded.model}
    try:
        for name in whole:
            tier = next(p for p in plan.components if p.component == name).device_map[""]
            parts[name] = load_whole(folder / name, family.component(name).load_class(), tier, plan.precision)
        for c in family.components:
            if c.stage == stage and c.role != "model":
                parts[c.name] = c.load_class().from_pretrained(folder / c.name)
    except BaseException:
        loaded.close()
        raise
    return loaded, {c: parts[c] for c in family.stage_parts(stage)}


def whole_bytes(plan, components) -> dict[Tier, int]:
    """``{tier: bytes}`` of the plan's components loaded whole (what a stream budget leaves them)."""
    out: dict[Tier, int] = {}
    for p in plan.components:
        if p.component in components:
            tier = p.device_map[""]
            out[tier] = out.get(tier, 0) + sum(u.nbytes for u in p.units)
    return out
