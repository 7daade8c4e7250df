"""The stream plan: which blocks of a model stay in the fast tier, which stream and in what pieces,
and where each streamed tensor sits in the files and in the buffers, decided from a skeleton and
a weights source's index alone (no weight is read, no buffer made).

:func:`plan_stream` takes a skeleton on the meta device, dressed in its source's stored forms
(:meth:`helpers.formats.sources.WeightsSource.dress`), its blocks' pieces (:func:`split_blocks`: whole
blocks or their parts, in call order) and the fast tier's budget, and returns a :class:`StreamPlan`,
or raises :class:`StreamBudgetError` saying what the tier must hold. :func:`plan_block` lays out one
piece: runs of adjacent bytes read a page at a time, its read buffer, its host buffer (RAM -> GPU)
and its pool buffer in the compute dtype. The streamers of :mod:`helpers.offload.streamers` carry it out.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.errors import UserError
from helpers.families import family_of_class
from helpers.formats.sources import TORCH_DTYPES, WeightsSource, _itemsize

_PAGE = 4096  # O_DIRECT reads whole, aligned pages


class StreamBudgetError(UserError):
    """The budget cannot hold what streaming keeps in the fast tier (found before any weight loads)."""


@dataclass
class _Tensor:
    owner: torch.nn.Module  # the module holding the parameter
    leaf: str  # its name there
    read_pos: int  # where the stored bytes land in the read buffer (the file's layout)
    nbytes: int  # stored bytes
    stored: torch.dtype
    shape: list[int]
    pos: int = 0  # where the values the model computes with sit in a pool buffer
    stored_pos: int = 0  # where the stored bytes sit in a host buffer (RAM -> GPU: aligned, as stored)


@dataclass
class _Block:
    name: str
    module: torch.nn.Module
    tensors: list[_Tensor] = field(default_factory=list)
    # runs of adjacent bytes in one file, widened to whole pages:
    # (file, page-aligned offset, bytes to read, bytes that matter, page-aligned position in the read buffer)
    ranges: list[tuple[Path, int, int, int, int]] = field(default_factory=list)
    read_nbytes: int = 0  # the read buffer's size for this block
    stored: int = 0  # the block's bytes in the checkpoint
    stored_nbytes: int = 0  # its stored bytes laid out aligned (a host buffer: what crosses to a GPU)
    nbytes: int = 0  # the pool buffer's size for this block (in the dtype it computes in)
    converts: bool = False  # computes in another dtype than stored: decoded on its way into the pool
    #: per pool buffer: the parameters (views of that buffer) swapped in while the block computes
    params: list[list[torch.nn.Parameter]] = field(default_factory=list)
    meta: list[torch.nn.Parameter] = field(default_factory=list)  # what is swapped back after


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


def _lay_out(tensors: list[_Tensor], dtype: torch.dtype | None, align: int) -> list[int]:
    """Positions of ``tensors`` one after another at ``align`` bytes, in ``dtype`` (``None``: as
    stored), and the total as the last item."""
    positions, pos = [], 0
    for t in tensors:
        pos = _align(pos, align)
        positions.append(pos)
        pos += _align(torch.Size(t.shape).numel() * _itemsize(_target(t.stored, dtype)), align)
    return positions + [pos]


def plan_block(name: str, module: torch.nn.Module, source: WeightsSource, dtype: torch.dtype | None,
               align: int | None = None) -> _Block:
    """Where each tensor of a block is in the files and where it goes in the buffers.

    The block's tensors are grouped into runs of adjacent bytes in the same file (safetensors keeps a
    block's tensors together: names are sorted), so that one read brings a whole run. A run is read
    from the page before it to the page after it into a page-aligned place, so every tensor sits at
    the same address modulo 4096 as in the file (aligned as its dtype needs) and the read can bypass
    the page cache. Three layouts: the read buffer's (the file's, ``read_pos``); ``align`` given, a
    host buffer's, tensors one by one at that alignment as stored (``stored_pos``: RAM -> GPU, filled
    once through a staging read); and the pool's, in ``dtype`` (``pos``), which is the read buffer's
    (disk) or the host buffer's (GPU) where nothing converts, else its own, 64-byte aligned (disk) or
    ``align``-ed (GPU).
    """
    block = _Block(name, module)
    index, folder = source.index, source.where
    located = []
    for pname, param in module.named_parameters():
        full = f"{name}.{pname}"
        if full not in index:
            raise UserError(f"{full} is not in the checkpoint at {folder}; cannot stream {name}.")
        if isinstance(index[full], list):
            raise UserError(f"{full} is stored in pieces in {folder}; {name} cannot stream (keep it resident).")
        path, offset, nbytes, stored, shape = index[full]
        owner_name, _, leaf = pname.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        located.append((path, offset, nbytes, TORCH_DTYPES[stored], shape, owner, leaf, param))
    located.sort(key=lambda t: (str(t[0]), t[1]))
    runs: list[list] = []  # [path, start, end, tensors]
    for path, offset, nbytes, stored, shape, owner, leaf, param in located:
        if not runs or runs[-1][0] != path or runs[-1][2] != offset:
            runs.append([path, offset, offset, []])
        runs[-1][2] = offset + nbytes
        runs[-1][3].append((offset, _Tensor(owner, leaf, 0, nbytes, stored, shape), param))
    cursor = 0
    for path, start, end, members in runs:
        # read whole pages from a page boundary (what O_DIRECT needs), into a page-aligned place
        first = start - start % _PAGE
        pos = _align(cursor, _PAGE)
        length = _align(end - first, _PAGE)
        block.ranges.append((path, first, length, end - first, pos))
        for offset, tensor, param in members:
            tensor.read_pos = pos + offset - first
            block.tensors.append(tensor)
            block.meta.append(param)
        cursor = pos + length
    block.read_nbytes = cursor
    block.stored = sum(t.nbytes for t in block.tensors)
    block.converts = any(_target(t.stored, dtype) != t.stored for t in block.tensors)
    if align is not None:
        *positions, block.stored_nbytes = _lay_out(block.tensors, None, align)
        for t, p in zip(block.tensors, positions):
            t.stored_pos = p
    if not block.converts:  # the pool holds the bytes as they arrive
        for t in block.tensors:
            t.pos = t.read_pos if align is None else t.stored_pos
        block.nbytes = block.read_nbytes if align is None else block.stored_nbytes
    else:
        *positions, block.nbytes = _lay_out(block.tensors, dtype, align or 64)
        for t, p in zip(block.tensors, positions):
            t.pos = p
    return block


def _target(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


#: what a block's own code may read of a part's parameter while the part is not there (its placeholder has them)
_HARMLESS = {"dtype", "shape", "device", "ndim", "is_cuda", "is_meta", "requires_grad", "layout"}


def _parts(block: torch.nn.Module) -> list[str]:
    """The submodules of ``block`` that hold its parameters: its children, and the members of its
    module lists (T5's ``layer.0``, ``layer.1``). Empty when the block holds parameters itself."""
    if next(block.parameters(recurse=False), None) is not None:
        return []
    found: list[str] = []

    def walk(prefix: str, module: torch.nn.Module) -> bool:
        for name, child in module.named_children():
            if next(child.parameters(), None) is None:
                continue
            if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                if next(child.parameters(recurse=False), None) is not None or not walk(f"{prefix}{name}.", child):
                    return False
            else:
                found.append(f"{prefix}{name}")
        return True

    return found if walk("", block) else []


def split_blocks(model: torch.nn.Module, blocks: list[str], inputs: dict | None) -> dict[str, list[str]]:
    """Each block's parts (full names) in the order one forward pass calls them: the pieces it is streamed in.

    A whole block needs a pool buffer the size of the block; its parts need one the size of its
    largest part (Flux: 151 MB instead of 680 MB), and the room saved keeps more blocks resident.
    The order comes from one forward of ``model`` with ``inputs`` (on the meta device: no weights,
    about a second for FLUX.1-dev), because it is the forward's, not the order the parts were declared in (a Flux single
    block declares ``proj_out`` before ``attn`` and calls it after). A block stays whole (``[block]``)
    when it has no such parts, when a part is not called exactly once, or when the block's own
    code uses a part's parameter outside that part's call (it would find the parameter not there).
    Without ``inputs`` every block stays whole.
    """
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    found = {b: [f"{b}.{p}" for p in _parts(model.get_submodule(b))] for b in blocks}
    if inputs is None or not any(found.values()):
        return {b: [b] for b in blocks}
    owner: dict[int, tuple[str, str]] = {}  # parameter -> (block, part)
    for b, parts in found.items():
        for part in parts:
            for p in model.get_submodule(part).parameters():
                owner[id(p)] = (b, part)
    calls: dict[str, list[str]] = {b: [] for b in blocks}
    active: set[str] = set()
    misused: set[str] = set()

    class Uses(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            harmless = (getattr(func, "__name__", "") == "__get__"
                        and getattr(getattr(func, "__self__", None), "__name__", "") in _HARMLESS)
            if not harmless:  # .T, .data, any op: a use of the values
                for leaf in tree_leaves((args, kwargs or {})):
                    b, part = owner.get(id(leaf), (None, None))
                    if part is not None and part not in active:
                        misused.add(b)
            return func(*args, **(kwargs or {}))

    sequence: list[str] = []  # every part's call, in order

    def enter(b, part):
        def pre(module, args):
            calls[b].append(part)
            sequence.append(part)
            active.add(part)
        return pre

    def leave(part):
        def post(module, args, output):
            active.discard(part)
        return post

    handles = []
    try:
        for b, parts in found.items():
            for part in parts:
                module = model.get_submodule(part)
                handles += [module.register_forward_pre_hook(enter(b, part)), module.register_forward_hook(leave(part))]
        with torch.no_grad(), Uses():
            model(**inputs)
    except Exception as exc:  # noqa: BLE001 - a model the meta device cannot run is streamed by whole blocks
        warnings.warn(f"streaming whole blocks: a forward on the meta device failed ({exc})", stacklevel=2)
        return {b: [b] for b in blocks}
    finally:
        for h in handles:
            h.remove()
    if sequence != [part for b in blocks for part in calls[b]]:  # blocks interleaved: their parts cannot stream
        return {b: [b] for b in blocks}
    return {b: calls[b] if found[b] and b not in misused and sorted(calls[b]) == sorted(found[b]) else [b]
            for b in blocks}


def _spread(names: list[str], m: int) -> list[str]:
    """``m`` of ``names``, evenly spaced (the middle one of each of ``m`` equal stretches)."""
    return [names[int((k + 0.5) * len(names) / m)] for k in range(m)]


def _choose_resident(lists: list[list[str]], size: dict, buffer: dict, stage: dict, room: int, pool: int) -> set[str]:
    """The blocks that stay in the fast tier: as many as fit ``room`` next to the pool the others need.

    Not the first blocks (the method's map): a stretch of resident blocks computes while the pool,
    already full, lets no copy start, and the copies fall behind. Spread out, each resident block
    computes while the next streamed one is being fetched. They are taken among the largest blocks
    first (Flux: the double blocks, 2.4x the bytes of a single block for about the same compute):
    there a fetch takes longest against its compute, so that is where the cover is needed; streaming
    the smaller blocks also keeps the pool small once all the largest are resident. ``lists``: the
    model's block lists, each in call order. ``size``: a block's bytes when resident; ``buffer``: the
    pool buffer its largest piece needs when streamed; ``stage``: what a converting stream adds for
    it (the decoded buffer, or a staging buffer).
    """
    lists = sorted((names for names in lists if names), key=lambda names: -max(size[n] for n in names))
    everything = [n for names in lists for n in names]

    def pick(count: int) -> set[str]:
        chosen: set[str] = set()
        for names in lists:
            take = min(count, len(names))
            chosen.update(_spread(names, take) if take else [])
            count -= take
        return chosen

    best: set[str] = set()
    for count in range(1, len(everything) + 1):  # all counts: the pool shrinks when the last large block stays
        chosen = pick(count)
        streamed = [n for n in everything if n not in chosen]
        need = pool * max((buffer[n] for n in streamed), default=0) + max((stage[n] for n in streamed), default=0)
        if sum(size[n] for n in chosen) + need <= room:
            best = chosen
    return best


def _keep_parts(candidates: list[str], size: dict, room: int) -> set[str]:
    """Parts of streamed blocks to keep resident in ``room``: as many as fit, spread over ``candidates``."""
    for count in range(len(candidates), 0, -1):
        chosen = _spread(candidates, count)
        if sum(size[u] for u in chosen) <= room:
            return set(chosen)
    return set()


@dataclass
class StreamPlan:
    """What a stream keeps and moves, decided before any weight is read (:func:`plan_stream`)."""

    resident: set[str]  # whole blocks kept in the fast tier
    pieces: dict[str, str]  # streamed piece -> its block, in call order
    kept: set[str]  # parts of streamed blocks kept in the fast tier (GPU)
    blocks: dict[str, _Block]  # every piece's layout, by name
    pool: int  # buffers in the pool
    room: int  # bytes of the fast tier for weights and the pool (the activations' room taken off)
    resident_bytes: int  # the resident blocks' bytes, as stored
    keys: dict[str, str] = field(default_factory=dict)  # resident parameter -> its name in the source
    order: list[str] = field(default_factory=list)  # every block, in call order

    @property
    def streamed(self) -> list[str]:
        """The blocks that stream (whole or in parts), in call order."""
        return list(dict.fromkeys(self.pieces.values()))

    @property
    def pinned_bytes(self) -> int:
        """Host RAM the streamed pieces take when held pinned, as stored (RAM -> GPU)."""
        return sum(_align(self.blocks[u].stored_nbytes, _PAGE) for u in self.pieces)

    @property
    def pool_bytes(self) -> int:
        """What the fast tier has left for the pool once the resident blocks are in."""
        return self.room - self.resident_bytes

    def choice(self) -> dict:
        """What the planner chose, as a job records it: the resident blocks and kept parts (call order)
        and the pool's buffers; :func:`plan_stream` given it makes the same plan, choosing nothing."""
        order = {n: i for i, n in enumerate(self.order)}

        def place(name: str) -> tuple:  # a part sorts after its block's place, by name
            block = next((b for b in (name, *(name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)))
                          if b in order), "")
            return order.get(block, len(order)), name

        return {"resident": sorted(self.resident, key=place), "kept": sorted(self.kept, key=place), "pool": self.pool}

    def read_bytes(self, source: WeightsSource, on_gpu: bool) -> int:
        """The bytes loading reads: the resident weights, and on a GPU the streamed pieces (pinned)."""
        return sum(source.bytes_of(k) for k in self.keys.values()) + (
            sum(self.blocks[u].stored for u in self.pieces) if on_gpu else 0)


#: traced pieces by the model's structure (its class and config), the block names and the dtype: a trace
#: reads no weight and depends on nothing else, so a process that loads one model several times (a
#: notebook's kernel, a benchmark's rounds) traces it once (about a second each time otherwise)
_TRACES: dict[tuple, dict[str, list[str]]] = {}


def _structure(model: torch.nn.Module) -> str | None:
    """The model's class and config as one string (None: a model without a config, never cached)."""
    import json

    config = getattr(model, "config", None)
    if config is None:
        return None
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return f"{type(model).__module__}.{type(model).__qualname__}:" + json.dumps(as_dict, sort_keys=True, default=str)


def _split_as_run(model: torch.nn.Module, blocks: list[str], example: tuple) -> dict[str, list[str]]:
    """:func:`split_blocks` with a family's example ``(runner, inputs)``: where the stage runs a part of
    the model (an LLM's body, its head never run), that part is traced and its names given back in the
    model's."""
    runner, inputs = example
    prefix = next((n for n, m in model.named_modules() if m is runner), None)
    if prefix is None or not all(b.startswith(prefix + ".") or not prefix for b in blocks):
        return {b: [b] for b in blocks}  # the forward runs something else: whole blocks
    cut = len(prefix) + 1 if prefix else 0
    found = split_blocks(runner, [b[cut:] for b in blocks], inputs)
    return {prefix + "." * bool(prefix) + b: [prefix + "." * bool(prefix) + p for p in parts] for b, parts in found.items()}


def trace_parts(model: torch.nn.Module, names: list[str], dtype: torch.dtype, split: bool = True) -> dict[str, list[str]]:
    """Each block's pieces in call order (:func:`split_blocks`), traced with the example inputs of the
    model's component (on the meta device, before any stored form: it has no fp8 kernels); whole
    blocks for a model without them, or with ``split=False``. A model of the same structure is traced
    once per process (:data:`_TRACES`)."""
    # models whose blocks are streamed in parts: their family's example forward traces the parts' order
    found = family_of_class(type(model).__name__)
    family, component = (found[0], found[1].name) if found and found[1].block_lists else (None, None)
    if not (component and split):
        return {n: [n] for n in names}
    structure = _structure(model)
    key = (structure, tuple(names), str(dtype))
    if structure is None or key not in _TRACES:
        from helpers.activations import example_inputs

        with _first_two_of_each_list(model, names) as (traced, alike):
            parts = _split_as_run(model, traced, example_inputs(component, model, dtype, 32, 32, 8, family=family))
        for blocks in alike:  # the rest of a list of alike blocks is split as its second block is
            second = blocks[1]
            parts.update({b: [b + p[len(second):] for p in parts[second]] for b in blocks[2:]})
        parts = {b: parts[b] for b in names}
        if structure is None:
            return parts
        _TRACES[key] = parts
    return {b: list(p) for b, p in _TRACES[key].items()}


@contextlib.contextmanager
def _first_two_of_each_list(model: torch.nn.Module, names: list[str]):
    """The model with only the first two blocks of each list of alike blocks among ``names``, for the
    time of a trace; yields the names still there and those lists (each a list of block names).

    A list qualifies when ``names`` hold all of its blocks, in order, and each is of one class with
    the same parts: its blocks then run the same code on hidden states of the same shapes, so from the
    second on each calls its parts in the second's order (the first may differ: T5's makes the
    position bias). Tracing two blocks of each takes about 14 times fewer ops for the Flux
    transformer (a test checks it gives what a trace of every block gives)."""
    lists: dict[str, list[str]] = {}
    for name in names:
        parent, _, index = name.rpartition(".")
        lists.setdefault(parent, []).append(name)
    alike, kept = [], []
    for path, blocks in lists.items():
        owner_name, _, attr = path.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        modules = getattr(owner, attr, None)
        if (not isinstance(modules, torch.nn.ModuleList) or len(blocks) <= 2
                or blocks != [f"{path}.{i}" for i in range(len(modules))]):
            continue
        shapes = {(type(m), tuple(_parts(m))) for m in modules}
        if len(shapes) == 1:
            alike.append(blocks)
            kept.append((owner, attr, modules))
            setattr(owner, attr, torch.nn.ModuleList(modules[:2]))
    try:
        dropped = {b for blocks in alike for b in blocks[2:]}
        yield [n for n in names if n not in dropped], alike
    finally:
        for owner, attr, modules in kept:
            setattr(owner, attr, modules)


def plan_stream(model: torch.nn.Module, block_lists: list[str], parts: dict[str, list[str]], source: WeightsSource,
                cpu_bytes: int, device: torch.device, device_bytes: int | None = None,
                compute: torch.dtype | None = None, reserve: int = 0, pool: int | None = None,
                choice: dict | None = None) -> StreamPlan:
    """What stays in the fast tier and what streams, for ``model`` (a skeleton in ``source``'s stored
    forms) under its budget: ``cpu_bytes`` (RAM; the fast tier without a GPU ``device``), the GPU's
    ``device_bytes``, ``reserve`` bytes of the fast tier left for the activations, ``compute`` the
    dtype the math runs in. Pure: reads the source's index, no weight.

    Everything outside the blocks is resident; as many blocks as fit next to the buffer pool stay
    resident, spread over the largest blocks (see :func:`_choose_resident`); the rest stream in
    ``parts`` through ``pool`` buffers the size of the largest piece (by default up to 4, within
    the bytes of two whole blocks); on a GPU the room left by whole blocks keeps some of their parts
    resident, and the streamed pieces must fit pinned RAM (``cpu_bytes``). ``choice``: what a planner
    chose before (:meth:`StreamPlan.choice`, recorded in a job), used as it is and checked against the
    budget, so that what runs is what the job says.
    """
    from helpers.precision import stored_bytes

    on_gpu = device.type != "cpu"
    if on_gpu and device_bytes is None:
        raise UserError("streaming to a GPU needs its budget (device_bytes).")
    fast_bytes, fast_name = (device_bytes, f"GPU {device.index or 0} tier") if on_gpu else (cpu_bytes, "cpu tier")
    if reserve < 0:
        raise UserError(f"reserve must be 0 or more bytes, not {reserve!r}.")
    if pool is not None and pool < 2:
        raise UserError(f"the pool needs at least 2 buffers (one computing, one being fetched), not {pool!r}.")
    names = [f"{lst}.{i}" for lst in block_lists for i in range(len(model.get_submodule(lst)))]
    size = {n: stored_bytes(model.get_submodule(n)) for n in names}  # resident, in stored bytes
    # laid out as the streamer will: pages as in the files (disk -> RAM), 256-byte tensors (RAM -> GPU)
    plans = {u: plan_block(u, model.get_submodule(u), source, compute, align=256 if on_gpu else None)
             for n in names for u in parts[n]}
    converted = any(p.converts for p in plans.values())
    if on_gpu:  # pool buffers in the compute dtype; one staging buffer (stored) to decode from when converting
        buffer = {n: max(plans[u].nbytes for u in parts[n]) for n in names}
        stage = {n: max(plans[u].stored_nbytes for u in parts[n]) if converted else 0 for n in names}
    else:  # read buffers as stored (whole pages), computed from as they are (decoded layer by layer)
        buffer = {n: max(plans[u].read_nbytes for u in parts[n]) for n in names}
        stage = dict.fromkeys(names, 0)
    other = stored_bytes(model) - sum(size.values())  # outside the blocks (tied tensors once)
    largest = max(buffer.values())
    if choice is not None:
        pool = _checked_choice(choice, names)
    if pool is None:  # up to 4 buffers, in no more room than two whole blocks would take (T5: 3)
        biggest = max(sum(plans[u].nbytes if on_gpu else plans[u].read_nbytes for u in parts[n]) for n in names)
        pool = max(2, min(4, 2 * biggest // largest))
    _check_least(other, pool, largest, max(stage.values()), reserve, fast_bytes, fast_name)
    room = fast_bytes - other - reserve
    lists = [[f"{lst}.{i}" for i in range(len(model.get_submodule(lst)))] for lst in block_lists]
    resident = set(choice["resident"]) if choice is not None else _choose_resident(lists, size, buffer, stage, room, pool)
    streamed = [n for n in names if n not in resident]
    # on a GPU (whose tier has the activations' room set aside) the room whole blocks leave keeps some
    # parts of the streamed blocks resident too; in RAM that room is left to the activations
    candidates = [u for n in streamed for u in parts[n] if u != n] if on_gpu else []
    used = sum(size[n] for n in resident) + pool * max((buffer[n] for n in streamed), default=0)
    used += max((stage[n] for n in streamed), default=0)
    kept_size = {u: stored_bytes(model.get_submodule(u)) for u in candidates}
    if choice is None:
        kept = _keep_parts(candidates, kept_size, room - used)
    else:
        kept = _recorded_parts(choice, kept_size, room - used, f"{len(resident)} resident blocks, a {pool}-buffer "
                               f"pool", f"{fast_name} of {fast_bytes:,} bytes")
    pieces = {u: n for n in streamed for u in parts[n] if u not in kept}  # streamed piece -> its block, call order
    plan = StreamPlan(resident, pieces, kept, plans, pool, room, sum(size[r] for r in resident), order=names)
    if on_gpu and plan.pinned_bytes > cpu_bytes:
        raise StreamBudgetError(
            f"streaming to the GPU holds the {len(plan.streamed)} blocks it cannot keep in pinned RAM: "
            f"{plan.pinned_bytes:,} bytes, more than the cpu tier ({cpu_bytes:,}); give the cpu tier at least "
            f"{plan.pinned_bytes:,} bytes, or use offload 'accelerate', which can add a disk tier."
        )
    plan.keys = _source_keys(model, source, pieces)
    return plan


def _check_least(other: int, pool: int, largest: int, staging: int, reserve: int, fast_bytes: int,
                 fast_name: str) -> None:
    """Refuse a fast tier that cannot hold the least a stream needs: the non-block weights, a pool of
    ``pool`` buffers of the ``largest`` piece, one ``staging`` buffer and the activations' ``reserve``."""
    least = other + pool * largest + staging + reserve
    if largest > fast_bytes:
        raise StreamBudgetError(
            f"one piece of this model ({largest:,} bytes) is larger than the whole {fast_name} ({fast_bytes:,} bytes); "
            f"a block's largest part is the smallest piece that can be streamed: give the {fast_name} at least "
            f"{least:,} bytes."
        )
    if least > fast_bytes:
        kept = f", the {pool}-buffer pool ({least - other - reserve:,})"
        raise StreamBudgetError(
            f"the {fast_name} ({fast_bytes:,} bytes) cannot hold the model's non-block weights ({other:,})"
            + (f"{kept} and room for its activations ({reserve:,})" if reserve else f" and{kept[1:]}")
            + f"; give it at least {least:,} bytes."
        )


def _recorded_parts(choice: dict, size: dict[str, int], room: int, what: str, where: str) -> set[str]:
    """The parts a recorded stream keeps beside its blocks (those of ``size``: the candidates), refused
    where they are not candidates or do not fit the ``room`` the blocks and pool leave (nor that room)."""
    kept = set(choice["kept"])
    if room < 0 or not kept <= set(size) or sum(size[u] for u in kept) > room:
        raise StreamBudgetError(f"the stream a job recorded ({what}, {len(kept)} kept parts) does not fit the {where} "
                                "with these weights; plan the stage again.")
    return kept


def _checked_choice(choice, names: list[str]) -> int:
    """The pool of a recorded stream choice whose names are this model's blocks (a job read back)."""
    known = set(names)
    try:
        resident, kept, pool = list(choice["resident"]), list(choice["kept"]), choice["pool"]
    except (KeyError, TypeError):
        raise UserError("a job's stream is malformed (want resident, kept and pool); plan the stage again.") from None
    unknown = [n for n in resident if n not in known]
    if unknown or not all(isinstance(n, str) for n in kept) or not isinstance(pool, int) or isinstance(pool, bool) \
            or pool < 2:
        raise UserError(f"a job's stream names blocks this model does not have ({', '.join(unknown[:3])}) or a "
                        f"pool of {pool!r}; plan the stage again.")
    return pool


def _source_keys(model: torch.nn.Module, source: WeightsSource, pieces: dict[str, str]) -> dict[str, str]:
    """Each parameter loaded at load time (not in a streamed piece) -> its name in ``source``: its
    own, or for a tied parameter another of its names that the source holds."""
    streamed = {f"{u}.{p}" for u in pieces for p, _ in model.get_submodule(u).named_parameters()}
    keys = {}
    for name, p in model.named_parameters():
        if name in streamed:
            continue
        if name not in source.index:  # a tied parameter stored under another of its names
            aliases = [a for a, q in model.named_parameters(remove_duplicate=False) if q is p and a in source.index]
            if not aliases:
                raise UserError(f"{name} is not in the checkpoint at {source.where}; cannot load this model.")
            keys[name] = aliases[0]
        else:
            keys[name] = name
    return keys
