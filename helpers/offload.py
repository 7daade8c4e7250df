"""Block streaming: run a model bigger than RAM by reading each offloaded block just before its turn.

The method's device map keeps the first blocks in the fast tier and lets accelerate's hooks fetch
the rest one at a time, synchronously. :class:`BlockStreamer` does it with read-ahead instead, one
tier down (disk -> RAM, on a machine without a GPU): the blocks that fit the ``cpu`` budget stay
resident, spread out between the streamed ones; the others stay in the checkpoint's own
safetensors files and are read, by a thread of their own, into a small fixed pool of buffers while
the previous block computes. Nothing is copied to an offload folder, and RAM holds at most the
resident blocks plus the pool, as stored (where the math's dtype is not the stored one, each layer,
resident or streamed, is decoded as it runs).
:class:`HostStreamer` is the same one tier up (RAM -> GPU): the blocks the GPU tier cannot hold
live once in pinned RAM, as stored, and are copied ahead on a side CUDA stream (and decoded there).
Streamed blocks go in their parts (attention, feed-forward...), so the pool is a few parts, not two
whole blocks.
:func:`load_streaming` builds either from a checkpoint folder and a budget. Explained in ``04_offload-strategies.ipynb``.
"""

from __future__ import annotations

import collections
import errno
import json
import math
import os
import queue
import struct
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.errors import UserError

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_PAGE = 4096  # O_DIRECT reads whole, aligned pages


#: ``auto``: ``stream`` where the budget has no GPU tier and the stream fits it (faster, the same
#: output: see notebook 04), else the method's ``accelerate`` hooks
OFFLOADS = ("auto", "accelerate", "stream")


class StreamBudgetError(UserError):
    """The budget cannot hold what streaming keeps in the fast tier (found before any weight loads)."""


def check_offload(offload: str) -> str:
    if offload not in OFFLOADS:
        raise UserError(f"unknown offload {offload!r}; use 'auto', 'accelerate' (the method's hooks) or 'stream'.")
    return offload


def choose_offload(offload: str, budget) -> str:
    """``accelerate`` or ``stream`` for this budget (``auto``: ``stream`` without a GPU tier)."""
    check_offload(offload)
    if offload == "auto":
        return "accelerate" if budget.gpu is not None else "stream"
    return offload


def stream_or_none(offload: str, budget, load):
    """``load()`` where ``offload`` means streaming under ``budget``; ``None`` for accelerate's hooks.

    With ``auto``, a stream whose resident part and pool do not fit the budget (found before any
    weight loads) also gives ``None``: the caller then loads with the hooks, which fit.
    """
    if choose_offload(offload, budget) != "stream":
        return None
    try:
        return load()
    except StreamBudgetError:
        if offload != "auto":
            raise
        return None


def stream_budget(budget, whole: dict) -> tuple[int, torch.device | None, int | None]:
    """``(cpu_bytes, device, device_bytes)`` left for the streamed model by a stage's budget.

    ``whole``: the other components of the stage that are loaded whole, ``{tier: bytes}`` (CLIP,
    the VAE); their bytes come off their tier. The first GPU tier, if any, is the fast tier.
    """
    gpu = budget.gpu
    left = {t: b for t, b in budget.tiers}
    for tier, nbytes in whole.items():
        if tier in left:
            left[tier] -= nbytes
    if gpu is None:
        return left.get("cpu", 0), None, None
    return left.get("cpu", 0), torch.device("cuda", gpu), left[gpu]


def read_safetensors_index(folder: str | Path) -> dict[str, tuple[Path, int, int, str, list[int]]]:
    """Every tensor of a (possibly sharded) safetensors checkpoint: file, byte offset, size, dtype, shape.

    Read from the files' own headers, without loading or mapping any data.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors files to stream from.")
    out = {}
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in _DTYPES:
                raise UserError(f"{path.name}: tensor {name} is stored as {entry['dtype']}, which this loader does not "
                                f"read ({', '.join(_DTYPES)}); use offload 'accelerate'.")
            expected = math.prod(entry["shape"]) * _itemsize(_DTYPES[entry["dtype"]])
            if end - begin != expected:
                raise UserError(f"{path.name}: the header gives tensor {name} {end - begin:,} bytes where its shape "
                                f"{entry['shape']} needs {expected:,}; the file is damaged: build or download it again.")
            out[name] = (path, 8 + n + begin, end - begin, entry["dtype"], entry["shape"])
    return out


def _index_of(source) -> dict:
    """A checkpoint folder's index (:func:`read_safetensors_index`), or ``source`` when it is one already
    (a transformer file's: :func:`helpers.transformer_file.stream_index`)."""
    return source if isinstance(source, dict) else read_safetensors_index(source)


def read_entry(entry) -> torch.Tensor:
    """The tensor an index entry locates: one range of a file (:func:`read_tensor`), or several
    concatenated along the rows (a tensor a single file stores in pieces)."""
    if isinstance(entry, list):
        return torch.cat([read_tensor(*piece) for piece in entry])
    return read_tensor(*entry)


def _source_path(index: dict) -> Path:
    """The file an index reads from (its first entry's), for messages."""
    entry = next(iter(index.values()))
    return Path((entry[0] if isinstance(entry, list) else entry)[0])


def entry_bytes(entry) -> int:
    return sum(piece[2] for piece in entry) if isinstance(entry, list) else entry[2]


def read_tensor(path: Path, offset: int, nbytes: int, dtype: str, shape: list[int]) -> torch.Tensor:
    """One tensor of a safetensors file, read into memory this process owns (no memory map)."""
    out = torch.empty(shape, dtype=_DTYPES[dtype])
    view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise UserError(f"{path} ends before its tensor at byte {offset + done:,}; the file is truncated: "
                                "build or download the model again.")
            done += n
    finally:
        os.close(fd)
    return out


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


def _plan_block(name: str, module: torch.nn.Module, index: dict, folder: Path, dtype: torch.dtype | None,
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
        located.append((path, offset, nbytes, _DTYPES[stored], shape, owner, leaf, param))
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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _target(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored


def _view(buf: torch.Tensor, pos: int, dtype: torch.dtype, shape) -> torch.Tensor:
    n = torch.Size(shape).numel() * _itemsize(dtype)
    return buf[pos:pos + n].view(dtype).view(shape)


def _decode(block: _Block, src: torch.Tensor, src_at: str, dst: torch.Tensor, dst_at: str,
            dtype: torch.dtype | None) -> None:
    """``block``'s stored tensors in ``src`` (at their ``src_at`` positions: ``"read_pos"`` or
    ``"stored_pos"``) into ``dst`` (at ``dst_at``) in ``dtype`` (``None``: as stored, a new layout
    only), through :func:`helpers.precision.decode_into` (fp8 with the row scales that stay resident
    beside the weights)."""
    from helpers.precision import decode_into

    for t in block.tensors:
        out = _view(dst, getattr(t, dst_at), _target(t.stored, dtype), t.shape)
        stored = _view(src, getattr(t, src_at), t.stored, t.shape)
        scale = t.owner._buffers.get(f"{t.leaf}_scale") if out.dtype != t.stored else None
        decode_into(stored, out, scale)


def _page_aligned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of uint8 in whole pages of their own (O_DIRECT reads into page-aligned memory).

    A private anonymous memory map: its storage starts on a page boundary and ends on one, so
    pinning it with ``cudaHostRegister`` covers the whole storage (``Tensor.is_pinned()`` is then
    true) and shares no page with other allocations.
    """
    import mmap

    pages = mmap.mmap(-1, max(_align(nbytes, _PAGE), _PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=torch.uint8)[:nbytes]


class _Files:
    """The checkpoint's files, open for reading blocks: one ``preadv`` per run of a block's bytes.

    ``direct``: ``O_DIRECT`` (straight from the disk, no page cache, no copy by the CPU) where the
    file system allows it; otherwise, from the first refusal on, ordinary reads.
    """

    def __init__(self, direct: bool = True) -> None:
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._fds: dict[Path, int] = {}

    def _open(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
            try:
                fd = os.open(path, flags)
            except OSError:  # e.g. tmpfs: no O_DIRECT
                self.direct = False
                fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def read_into(self, block: _Block, buf: torch.Tensor) -> int:
        """One ``preadv`` per run of adjacent bytes: the GIL is released for the whole read."""
        view = memoryview(buf.numpy())
        total = 0
        for path, offset, length, needed, pos in block.ranges:
            fd = self._open(path)
            done = 0
            while done < needed:
                try:
                    n = os.preadv(fd, [view[pos + done:pos + length]], offset + done)
                except OSError as exc:
                    if not self.direct or exc.errno != errno.EINVAL:
                        raise
                    self._reopen_buffered()  # the file system took O_DIRECT at open but not for reads
                    fd = self._open(path)
                    continue
                if n <= 0:
                    raise OSError(f"{path} ended at byte {offset + done:,}; the checkpoint changed while streaming "
                                  "(build or download the model again)")
                done += n
            total += done
        return total

    def _reopen_buffered(self) -> None:
        self.direct = False
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Streamer:
    """What both streamers share: the blocks' parameters swapped in from a pool buffer while each
    block computes (and back to meta after), the hooks that do it, the timeline, and a clean start
    over after a forward pass that failed midway.

    A subclass sets ``blocks`` and ``buffers`` and calls :meth:`_attach`; it implements
    :meth:`_acquire` (the buffer block ``i`` is in, once it is there), :meth:`_release` (block ``i``
    is done with buffer ``k``), :meth:`_stop_work` and :meth:`_resume` (around a restart), and may
    override :meth:`_healthy` and :meth:`_mark`.
    """

    blocks: list[_Block]
    buffers: list[torch.Tensor]
    #: what :attr:`bytes_streamed` counts per block: its checkpoint bytes, or its bytes in the pool
    _counted = "stored"

    def _attach(self, model: torch.nn.Module, dtype: torch.dtype | None) -> None:
        for block in self.blocks:
            for buf in self.buffers:
                block.params.append([
                    torch.nn.Parameter(_view(buf, t.pos, _target(t.stored, dtype), t.shape), requires_grad=False)
                    for t in block.tensors
                ])
        #: the bytes of the blocks the model has used so far
        self.bytes_streamed = 0
        #: (kind, block index, start, end): the fetches ("read" or "copy") and "compute"; the last two passes
        self.events: collections.deque = collections.deque(maxlen=2 * 2 * len(self.blocks))
        self._compute_start: dict[int, object] = {}
        self._current: dict[int, int] = {}  # block -> buffer, for blocks computing now
        self._next = 0  # the block the forward pass reaches next
        self._handles = [model.register_forward_pre_hook(self._restart_if_interrupted)]
        for i, block in enumerate(self.blocks):
            # first of the piece's hooks: a layer's own (the upcast) finds its weights there
            self._handles.append(block.module.register_forward_pre_hook(self._make_pre(i), prepend=True))
            self._handles.append(block.module.register_forward_hook(self._make_post(i)))

    @property
    def streamed_blocks(self) -> list[str]:
        """The model's blocks that stream (whole or in parts), in call order."""
        return list(dict.fromkeys(self._parents.get(b.name, b.name) for b in self.blocks))

    def _swap(self, i: int, params: list) -> None:
        block = self.blocks[i]
        for t, p in zip(block.tensors, params):
            t.owner._parameters[t.leaf] = p

    def _make_pre(self, i: int):
        block = self.blocks[i]

        def pre(module, args):
            if i != self._next:  # the pieces run in the order traced at load, or the fetches are wrong
                raise RuntimeError(f"streamer: expected {self.blocks[self._next].name} next, the model ran {block.name}")
            k = self._acquire(i)
            self._swap(i, block.params[k])
            self._current[i] = k
            self._next = (i + 1) % len(self.blocks)
            self.bytes_streamed += getattr(block, self._counted)
            self._compute_start[i] = self._mark()

        return pre

    def _make_post(self, i: int):
        block = self.blocks[i]

        def post(module, args, output):
            k = self._current.pop(i)
            end = self._mark()
            self.events.append(("compute", i, self._compute_start.pop(i), end))
            self._swap(i, block.meta)
            self._release(i, k, end)
            return output

        return post

    def _restart_if_interrupted(self, module, args) -> None:
        """A forward pass that failed midway left the fetches ahead of the model: start over from block 0.

        Also after a failure in the last block (``_next`` is 0 again, but a buffer was never given
        back) and after a fetch that failed (:meth:`_healthy`).
        """
        if self._next == 0 and not self._current and self._healthy():
            return
        self._stop_work()
        for i in list(self._current):
            self._swap(i, self.blocks[i].meta)
        self._current.clear()
        self._compute_start.clear()
        self._next = 0
        self._resume()

    def _healthy(self) -> bool:
        return True

    def _mark(self, stream=None):
        return time.perf_counter()

    def timeline(self) -> list[tuple[str, int, float, float]]:
        """The recorded ``(kind, block, start, end)`` spans, in seconds from the first one kept."""
        events = list(self.events)
        origin = min((e[2] for e in events), default=0.0)
        return [(k, i, a - origin, b - origin) for k, i, a, b in events]

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class BlockStreamer(_Streamer):
    """Attach to a model whose streamed blocks are on the meta device; stream them from disk.

    ``blocks``: the names of the blocks (or parts of blocks) to stream, in the order the forward
    pass calls them (each call of the model runs them all in this order). ``pool``: how many may be
    in RAM at once (2: one computing, one being read; more: reads further ahead).

    A piece computes from its bytes as read, as stored (bf16, fp8 with its row scales resident
    beside it): where the math is in another dtype, each layer is decoded as it runs, into one
    workspace, by the hooks that decode the resident layers (:func:`helpers.precision.upcast_layerwise`;
    :func:`load_streaming` sets them). Not the whole piece at its turn, and not ahead of it in a
    thread: a layer decoded just before its product is still in the CPU's cache when the product
    reads it, and a decoding thread beside the math finds every core taken by it. Measured on 2
    cores (AVX2), the medium twin at 256x256 with 512 tokens, bf16 weights, float32 math: 0.99x the
    resident model's time a step layer by layer, 1.03x with each piece decoded at its turn into a
    float32 buffer (which also took a piece's float32 bytes of the budget); at 64x64 with 64 tokens
    1.07x against 1.22x.

    ``direct``: read with ``O_DIRECT``, straight from the disk into the read buffers, so that the
    streamed weights take no page cache (RAM the budget does not have) and the read costs no CPU
    time; where the file system refuses it, reads fall back to the page cache.
    """

    def __init__(self, model: torch.nn.Module, folder: str | Path | dict, blocks: list[str], pool: int = 2,
                 pool_bytes: int | None = None, direct: bool = True,
                 parents: dict[str, str] | None = None) -> None:
        index = _index_of(folder)  # a folder, or an index already read (a transformer file's)
        folder = _source_path(index) if isinstance(folder, dict) else Path(folder)
        self._parents = dict(parents or {})
        self.blocks = [_plan_block(name, model.get_submodule(name), index, folder, None) for name in blocks]
        pool = max(1, min(pool, len(self.blocks)))  # more buffers than pieces would only read them twice
        read = max((b.read_nbytes for b in self.blocks), default=0)
        #: bytes of RAM the streamer holds: its read buffers
        self.ram_bytes = read * pool
        if pool_bytes is not None and self.ram_bytes > pool_bytes:
            raise UserError(
                f"streaming needs {pool} buffers of the largest piece as stored ({read:,} bytes each), more than "
                f"the {pool_bytes:,} bytes the RAM tier has left; give the cpu tier more room."
            )
        #: what the reader reads into and the model computes from (stored bytes, the file's layout)
        self.buffers = [_page_aligned(read) for _ in range(pool)]
        self._files = _Files(direct)
        self._free: queue.Queue = queue.Queue()  # buffers the reader may fill
        self.ready: queue.Queue = queue.Queue()  # (block, buffer) read, or (block, the exception)
        self.bytes_read = 0  # by the reader, read-ahead and page edges included
        self._stop = threading.Event()
        self._attach(model, None)  # times in perf_counter seconds; "read" spans by the reader
        self._resume()

    @property
    def direct(self) -> bool:
        """Whether reads bypass the page cache (``O_DIRECT``); see :class:`_Files`."""
        return self._files.direct

    # ----------------------------------------------------------------- reading

    def _take(self, q: queue.Queue):
        """The next item of ``q``, or ``None`` once the streamer stops."""
        while not self._stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _read_loop(self) -> None:
        i = 0
        while (k := self._take(self._free)) is not None:
            j = i % len(self.blocks)
            started = time.perf_counter()
            try:
                n = self._files.read_into(self.blocks[j], self.buffers[k])
            except Exception as exc:  # handed to the forward pass, which raises it
                self.ready.put((j, exc))
                return
            self.bytes_read += n
            self.events.append(("read", j, started, time.perf_counter()))
            self.ready.put((j, k))
            i += 1

    # ----------------------------------------------------------------- the shared hooks' parts

    def _acquire(self, i: int) -> int:
        try:
            j, k = self.ready.get(timeout=600)
        except queue.Empty:
            raise RuntimeError(
                "block streamer: no block arrived in 10 minutes (an earlier forward pass failed midway?); "
                "load the model again"
            ) from None
        if isinstance(k, Exception):
            raise RuntimeError(f"block streamer: reading {self.blocks[j].name} failed: {k}") from k
        if j != i:  # the model ran its blocks in another order than declared
            raise RuntimeError(f"block streamer expected block {self.blocks[j].name}, got {self.blocks[i].name}")
        return k

    def _release(self, i: int, k: int, end) -> None:
        self._free.put(k)

    def _healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads)  # not after a read error

    def _stop_work(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        for q in (self.ready, self._free):
            while not q.empty():
                q.get_nowait()

    def _resume(self) -> None:
        for k in range(len(self.buffers)):
            self._free.put(k)
        self._stop.clear()
        self._threads = [threading.Thread(target=self._read_loop, daemon=True, name="block-reader")]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Stop reading, remove the hooks, close the files."""
        self._stop.set()
        for t in self._threads:
            t.join()  # at most one piece's read: the files must not close under it
        self._detach()
        self._files.close()


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error (a failed ``cudaHostRegister`` leaves one behind, which the
    next kernel launch would report as its own). PyTorch does not bind ``cudaGetLastError``: it is
    called in the runtime library the process has loaded."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:
        return
    for path in paths:
        try:
            ctypes.CDLL(path).cudaGetLastError()
        except (OSError, AttributeError):
            continue


def _unregister(pointers: list[int]) -> None:
    """Unpin host buffers pinned with ``cudaHostRegister`` (and forget them), once no copy reads them."""
    if pointers:
        torch.cuda.synchronize()  # the next call's first copy may still be in flight
        cudart = torch.cuda.cudart()
        for ptr in pointers:
            cudart.cudaHostUnregister(ptr)
        pointers.clear()


class HostStreamer(_Streamer):
    """The same idea one tier up: streamed blocks held in RAM (pinned), copied to the GPU ahead of use.

    Each streamed block is read once, at load, from the checkpoint into its own page-locked host
    buffer, as stored (fp8 stays fp8: half bf16's RAM and transfer), every tensor at a 256-byte
    boundary, so a block's copy is one contiguous ``non_blocking`` transfer. The device holds a
    pool of ``pool`` buffers in the dtype it computes in; when block i starts, the copies of the
    next ``pool - 1`` blocks are queued on a side stream, each after the event that says the block
    that last used its buffer has finished; block i's compute waits on the event of its own copy.
    Where the compute dtype differs from the stored one, a copy lands in one device staging buffer
    and is decoded from there into its pool buffer on the same side stream (fp8 with its row scales,
    which stay resident on the device), ahead of its turn. (A "block" here is whatever
    :func:`load_streaming` streams: whole blocks, or their parts.) Host RAM used: the streamed
    blocks (the budget's cpu tier), once, in stored bytes. The host buffers are anonymous memory
    maps pinned with ``cudaHostRegister``: PyTorch's pinned allocator would round each up to a power
    of two (a 680 MB block would take 1 GiB). ``device`` may be the CPU (no streams, no pinning: the
    same bookkeeping, for tests). The blocks are read once, at load, through the page cache by
    default (``direct=False``): a checkpoint read or written a moment ago then comes from RAM, not
    from the disk again.
    """

    _counted = "stored_nbytes"  # what crossed to the device

    def __init__(self, model: torch.nn.Module, folder: str | Path | dict, blocks: list[str], device, pool: int = 2,
                 dtype: torch.dtype | None = None, direct: bool = False, on_read=None,
                 parents: dict[str, str] | None = None) -> None:
        index = _index_of(folder)  # a folder, or an index already read (a transformer file's)
        folder = _source_path(index) if isinstance(folder, dict) else Path(folder)
        self._parents = dict(parents or {})
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks = [_plan_block(name, model.get_submodule(name), index, folder, dtype, align=256) for name in blocks]
        self.pool_size = max(2, min(pool, len(self.blocks)))
        self.largest = max(b.nbytes for b in self.blocks)
        self.convert = any(b.converts for b in self.blocks)
        staging = max(b.stored_nbytes for b in self.blocks) if self.convert else 0
        #: bytes of host RAM held: every streamed block, once, as stored
        self.host_bytes = sum(b.stored_nbytes for b in self.blocks)
        #: bytes of device memory held: the pool, and the staging buffer when decoding
        self.device_bytes = self.largest * self.pool_size + staging
        self._dtype = dtype
        read = _page_aligned(max(b.read_nbytes for b in self.blocks))
        files = _Files(direct)
        self.host: list[torch.Tensor] = []
        self._registered: list[int] = []
        try:
            for block in self.blocks:
                host = _page_aligned(block.stored_nbytes)
                files.read_into(block, read)
                _decode(block, read, "read_pos", host, "stored_pos", None)  # laid out aligned, as stored
                if on_read is not None:
                    on_read(block.stored)
                if self.cuda:
                    self._pin(host)
                self.host.append(host)
            files.close()
            del read
            self.buffers = [torch.empty(self.largest, dtype=torch.uint8, device=self.device)
                            for _ in range(self.pool_size)]
            self.staging = torch.empty(staging, dtype=torch.uint8, device=self.device) if staging else None
        except BaseException:  # unpinned now, not when the traceback lets go of this object
            files.close()
            self._unpin()
            raise
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        if self.cuda:  # the pool's memory may have been freed by kernels still queued on the compute stream
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        self._resume()
        self.bytes_copied = 0  # queued copies, the next call's first blocks included
        # events: "copy" on the side stream (decoding included), "compute" on the model's; CUDA events
        # with timing on a GPU (see :meth:`timeline`), perf_counter seconds on the CPU
        self._attach(model, dtype)

    # ----------------------------------------------------------------- pinning and marks

    def _pin(self, host: torch.Tensor) -> None:
        cudart = torch.cuda.cudart()
        size = _align(host.numel(), _PAGE)  # whole pages: _page_aligned gives each buffer pages of its own
        err = cudart.cudaHostRegister(host.data_ptr(), size, 0)
        if int(getattr(err, "value", err)) != 0:
            _clear_cuda_error()
            raise RuntimeError(f"could not pin {size:,} bytes of RAM for streaming (cudaHostRegister: {err}); "
                               "the system may limit locked memory (ulimit -l)")
        if not self._registered:  # unpinned when the streamer goes, even without close()
            self._unpin_at_exit = weakref.finalize(self, _unregister, self._registered)
        self._registered.append(host.data_ptr())

    def _unpin(self) -> None:
        _unregister(self._registered)

    def _mark(self, stream=None):
        if not self.cuda:
            return super()._mark()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream or torch.cuda.current_stream(self.device))
        return event

    def timeline(self) -> list[tuple[str, int, float, float]]:
        """The recorded ``(kind, block, start, end)`` spans, in seconds from the first one kept."""
        events = list(self.events)
        if not events or not self.cuda:
            return super().timeline()
        torch.cuda.synchronize(self.device)
        origin = events[0][2]
        spans = [(k, i, origin.elapsed_time(a) / 1000, origin.elapsed_time(b) / 1000) for k, i, a, b in events]
        first = min(a for _, _, a, _ in spans)
        return [(k, i, a - first, b - first) for k, i, a, b in spans]

    # ----------------------------------------------------------------- copies and hooks

    def _issue(self, j: int) -> None:
        """Queue the copy of block ``j`` into the next buffer, after that buffer's last reader."""
        k = self._turn
        self._turn = (k + 1) % self.pool_size
        block = self.blocks[j]
        n = block.stored_nbytes

        def move() -> None:  # the stored bytes across, then decoded into the pool where they convert
            if self.staging is not None:  # the transfer need not wait for the pool buffer, only the decoding
                self.staging[:n].copy_(self.host[j][:n], non_blocking=self.cuda)
            if self.cuda and self._freed[k] is not None:  # the compute that last read this buffer is done
                self.copy_stream.wait_event(self._freed[k])
            if self.staging is None:
                self.buffers[k][:n].copy_(self.host[j][:n], non_blocking=self.cuda)
            else:
                _decode(block, self.staging, "stored_pos", self.buffers[k], "pos", self._dtype)

        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                started = self._mark(self.copy_stream)
                move()
                event = torch.cuda.Event(enable_timing=True)
                event.record(self.copy_stream)
                self._copied[k] = event
            self.events.append(("copy", j, started, event))
        else:
            started = time.perf_counter()
            move()
            self.events.append(("copy", j, started, time.perf_counter()))
        self._slot[j] = k
        self.bytes_copied += n

    def _acquire(self, i: int) -> int:
        count = len(self.blocks)
        if i not in self._slot:  # the first block of the first call: nothing was queued yet
            self._issue(i)
        for ahead in range(1, self.pool_size):  # keep the next blocks coming
            j = (i + ahead) % count
            if j not in self._slot and j != i:
                self._issue(j)
        k = self._slot.pop(i)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copied[k])
        return k

    def _release(self, i: int, k: int, end) -> None:
        if self.cuda:
            self._freed[k] = end  # the next copy into this buffer waits for it

    def _stop_work(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the failed pass may have run on any stream

    def _resume(self) -> None:
        self._copied: list = [None] * self.pool_size  # per buffer: the event of its latest copy
        self._freed: list = [None] * self.pool_size  # per buffer: the event of the compute that last read it
        self._slot: dict[int, int] = {}  # block -> buffer, for blocks copied or being copied
        self._turn = 0  # the buffer the next copy goes to (round robin: blocks run in order)

    def close(self) -> None:
        """Remove the hooks, wait for the copies in flight, and release the host and device buffers."""
        self._detach()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for block in self.blocks:
            block.params.clear()  # the views keep the pool alive
        self.events.clear()
        self._compute_start.clear()
        self._resume()  # drops the events
        self.buffers.clear()
        self.staging = None
        self._unpin()
        self.host.clear()


def skeleton_from_folder(folder: str | Path, cls) -> torch.nn.Module:
    """``cls`` built from the config in ``folder`` on the meta device (diffusers or transformers class).

    transformers models are re-tied after ``init_empty_weights`` (T5's ``shared`` and
    ``encoder.embed_tokens`` are one tensor in the checkpoint; see ``01_meta-footprint``).
    """
    from accelerate import init_empty_weights

    if hasattr(cls, "load_config"):  # diffusers
        config = cls.load_config(folder)
        with init_empty_weights():
            return cls.from_config(config)
    config = cls.config_class.from_pretrained(folder)
    with init_empty_weights():
        model = cls(config)
    model.tie_weights()
    return model


#: models whose blocks are streamed in parts: the component whose example forward traces the parts' order
_TRACED = {"FluxTransformer2DModel": "transformer", "T5EncoderModel": "text_encoder_2"}
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


def load_streaming(folder: str | Path, cls, dtype: torch.dtype, cpu_bytes: int, block_lists: list[str],
                   pool: int | None = None, device=None, device_bytes: int | None = None, progress: bool = False,
                   reserve: int = 0, split: bool = True, compute: torch.dtype | None = None,
                   weights: str | None = None, weights_file: str | Path | None = None):
    """Load ``cls`` from ``folder`` keeping what fits the fast tier resident and streaming the rest.

    ``block_lists``: the model's lists of blocks in call order (``["transformer_blocks",
    "single_transformer_blocks"]`` for Flux, ``["encoder.block"]`` for T5). Everything outside the
    blocks is resident; as many blocks as fit next to the buffer pool stay resident, spread over
    the largest blocks (see :func:`_choose_resident`); the rest stream, each in its parts (see
    :func:`split_blocks`; ``split=False``: whole), through a pool of ``pool`` buffers the size of
    the largest part (by default up to 4, within the bytes of two whole blocks); on a GPU the room
    left by whole blocks keeps some of their parts resident. Resident weights are held in ``dtype``
    (converted once, at load, from what the checkpoint stores); streamed pieces move in stored bytes
    and compute in ``compute`` (default ``dtype``): in RAM each layer is decoded as it runs, like the
    resident ones (:func:`helpers.precision.upcast_layerwise`, hooked here; see :class:`BlockStreamer`
    for why); on a GPU a piece is decoded ahead of its turn, on the copy stream, and the resident
    weights as they run (the caller hooks them).
    ``weights="fp8"``: a checkpoint converted to fp8 (``python -m helpers convert``): the linear
    layers' weights stay fp8 when resident, their row scales are loaded beside them, and streamed
    pieces are read and moved in fp8 and dequantized on their way into the pool (``dtype`` is then
    the dtype of the rest, bf16).

    Without ``device`` (or with the CPU) the fast tier is RAM (``cpu_bytes``) and streamed blocks
    come from the disk (:class:`BlockStreamer`, reading ahead in stored bytes). With a GPU ``device``
    the fast tier is its ``device_bytes`` (the pool in ``compute``, and one staging buffer as stored
    when converting), and streamed blocks are held in pinned RAM as stored, which must fit
    ``cpu_bytes`` (:class:`HostStreamer`).
    ``reserve``: bytes of the fast tier kept free for the forward pass's activations (a stage plan's
    :attr:`~helpers.footprint.StagePlan.reserve_bytes`), so that weights, pool and activations
    together stay within it. Returns ``(model, streamer)``; the streamer is ``None`` when everything fits.
    ``progress``: a progress bar (bytes) over what loading reads.
    ``weights_file``: the transformer's weights from one file (GGUF, single safetensors, BFL layout:
    :mod:`helpers.transformer_file`), the config from ``folder``; held and streamed as the file
    stores them (GGUF blocks as bytes, decoded layer by layer as they run).
    """
    from accelerate.utils import set_module_tensor_to_device

    device = torch.device(device or "cpu")
    on_gpu = device.type != "cpu"
    if on_gpu and device_bytes is None:
        raise UserError("streaming to a GPU needs its budget (device_bytes).")
    fast_bytes, fast_name = (device_bytes, f"GPU {device.index or 0} tier") if on_gpu else (cpu_bytes, "cpu tier")
    if reserve < 0:
        raise UserError(f"reserve must be 0 or more bytes, not {reserve!r}.")
    if pool is not None and pool < 2:
        raise UserError(f"the pool needs at least 2 buffers (one computing, one being fetched), not {pool!r}.")
    folder = Path(folder)
    compute = compute or dtype
    model = skeleton_from_folder(folder, cls)
    from helpers.precision import stored_bytes, to_storage

    for t in (*model.parameters(), *model.buffers()):  # on meta: cheap; streamed blocks keep this dtype
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    forms = None
    if weights_file is not None and hasattr(weights_file, "forms"):  # a TransformerFile, checked at the edge
        index, forms = weights_file.index, weights_file.forms
    elif weights_file is not None:
        from helpers.transformer_file import stream_index

        index, forms = stream_index(weights_file, model.config)  # checked against the model: no weight read yet
    else:
        index = read_safetensors_index(folder)
    names = [f"{lst}.{i}" for lst in block_lists for i in range(len(model.get_submodule(lst)))]
    # streamed in parts, in the order a forward calls them (traced on the meta device, before fp8:
    # the meta device has no fp8 kernels)
    component = _TRACED.get(cls.__name__)
    if component and split:
        from helpers.activations import example_inputs

        parts = split_blocks(model, names, example_inputs(component, model, dtype, 32, 32, 8)[1])
    else:
        parts = {n: [n] for n in names}
    if forms is not None:  # on meta: the file's own forms (GGUF bytes, fp8 and its scales...)
        from helpers.transformer_file import to_file_storage

        to_file_storage(model, forms, index)
    elif weights == "fp8":  # on meta: fp8 linear weights and their scales, the rest bf16
        to_storage(model, "fp8")
    size = {n: stored_bytes(model.get_submodule(n)) for n in names}  # resident, in stored bytes
    # laid out as the streamer will: pages as in the files (disk -> RAM), 256-byte tensors (RAM -> GPU)
    plans = {u: _plan_block(u, model.get_submodule(u), index, folder, compute, align=256 if on_gpu else None)
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
    if pool is None:  # up to 4 buffers, in no more room than two whole blocks would take (T5: 3)
        biggest = max(sum(plans[u].nbytes if on_gpu else plans[u].read_nbytes for u in parts[n]) for n in names)
        pool = max(2, min(4, 2 * biggest // largest))
    least = other + pool * largest + max(stage.values()) + reserve
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
    room = fast_bytes - other - reserve
    lists = [[f"{lst}.{i}" for i in range(len(model.get_submodule(lst)))] for lst in block_lists]
    resident = _choose_resident(lists, size, buffer, stage, room, pool)
    streamed = [n for n in names if n not in resident]
    # on a GPU (whose tier has the activations' room set aside) the room whole blocks leave keeps some
    # parts of the streamed blocks resident too; in RAM that room is left to the activations
    candidates = [u for n in streamed for u in parts[n] if u != n] if on_gpu else []
    used = sum(size[n] for n in resident) + pool * max((buffer[n] for n in streamed), default=0)
    used += max((stage[n] for n in streamed), default=0)
    kept = _keep_parts(candidates, {u: stored_bytes(model.get_submodule(u)) for u in candidates}, room - used)
    pieces = {u: n for n in streamed for u in parts[n] if u not in kept}  # streamed piece -> its block, call order
    pinned = sum(_align(plans[u].stored_nbytes, _PAGE) for u in pieces)  # as stored, whole pages each
    if on_gpu and pinned > cpu_bytes:
        raise StreamBudgetError(
            f"streaming to the GPU holds the {len(set(pieces.values()))} blocks it cannot keep in pinned RAM: "
            f"{pinned:,} bytes, more than the cpu tier ({cpu_bytes:,}); give the cpu tier at least {pinned:,} bytes, or use offload "
            "'accelerate', which can add a disk tier."
        )
    streamed_params = {f"{u}.{p}" for u in pieces for p, _ in model.get_submodule(u).named_parameters()}
    keys = {}  # parameter -> its name in the checkpoint
    for name, p in model.named_parameters():
        if name in streamed_params:
            continue
        if name not in index:  # a tied parameter stored under another of its names
            aliases = [a for a, q in model.named_parameters(remove_duplicate=False) if q is p and a in index]
            if not aliases:
                raise UserError(f"{name} is not in the checkpoint at {folder}; cannot load this model.")
            key = aliases[0]
        else:
            key = name
        keys[name] = key
    # what is read now: the resident weights, and with a GPU the streamed blocks into pinned RAM
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(entry_bytes(index[k]) for k in keys.values()) + (sum(plans[u].stored for u in pieces) if on_gpu else 0)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{folder.name}: loading (stream)")
    try:
        for name, key in keys.items():
            value = read_entry(index[key])  # read, not mapped: a mapped file would count in RSS twice
            stored = model.get_parameter(name).dtype  # what this tier holds: fp8 stays fp8
            set_module_tensor_to_device(model, name, device, value=value.to(device, stored), clear_cache=False)
            if bar is not None:
                bar.update(entry_bytes(index[key]))
        if hasattr(model, "tie_weights") and not hasattr(cls, "load_config"):
            model.tie_weights()
        for name, b in model.named_buffers():
            if b.device.type == "meta" and name in index:  # fp8's scales, every block's (a few bytes per row)
                set_module_tensor_to_device(model, name, device, value=read_entry(index[name]), clear_cache=False)
                continue
            if b.device.type == "meta":
                raise UserError(f"buffer {name} has no value in the checkpoint; cannot stream this model.")
            if b.device != device:
                b.data = b.data.to(device)
        model.eval()
        if not pieces:
            if forms is not None:  # GGUF bytes are decoded as their layers run, whatever the dtypes
                from helpers.precision import upcast_layerwise

                upcast_layerwise(model, compute)
            return model, None
        if on_gpu:
            host = HostStreamer(model, index, list(pieces), device, pool=pool, dtype=compute,
                                on_read=bar.update if bar is not None else None, parents=pieces)
            if forms is not None:  # GGUF pieces arrive as bytes, decoded as their layers run, on the GPU
                from helpers.precision import upcast_layerwise

                upcast_layerwise(model, compute)
            return model, host
    finally:
        if bar is not None:
            bar.close()
    # in RAM no parts are kept (see above), and pieces stream as stored: each layer is decoded as it
    # runs, by the hooks that decode the resident ones (see BlockStreamer)
    streamer = BlockStreamer(model, index, list(pieces), pool=pool, pool_bytes=room - sum(size[r] for r in resident),
                             parents=pieces)
    if compute != dtype or weights == "fp8" or forms is not None or any(plans[u].converts for u in pieces):
        from helpers.precision import upcast_layerwise

        upcast_layerwise(model, compute)
    return model, streamer
