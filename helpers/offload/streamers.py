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
:func:`load_streaming` builds either from a weights source (:mod:`helpers.formats.sources`: a checkpoint folder, a
transformer file) and a budget, through the stream plan (:mod:`helpers.offload.plan`); each stored form
is decoded by its codec (:mod:`helpers.formats.codecs`). Explained in ``05_offload-strategies.ipynb``.
"""

from __future__ import annotations

import collections
import errno
import os
import queue
import threading
import time
import weakref
from pathlib import Path

import torch

from helpers.formats.codecs import codec_for
from helpers.errors import UserError
from helpers.formats.sources import WeightsSource, _itemsize, as_source
from helpers.offload.plan import (_PAGE, StreamBudgetError, StreamPlan, _align, _Block, _target, plan_block, plan_stream,
                                trace_parts)



#: ``auto``: ``stream`` where the budget has no GPU tier and the stream fits it (faster, the same
#: output: see notebook 05), else the method's ``accelerate`` hooks
OFFLOADS = ("auto", "accelerate", "stream")


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


def _view(buf: torch.Tensor, pos: int, dtype: torch.dtype, shape) -> torch.Tensor:
    n = torch.Size(shape).numel() * _itemsize(dtype)
    return buf[pos:pos + n].view(dtype).view(shape)


def _decode(block: _Block, src: torch.Tensor, src_at: str, dst: torch.Tensor, dst_at: str,
            dtype: torch.dtype | None) -> None:
    """``block``'s stored tensors in ``src`` (at their ``src_at`` positions: ``"read_pos"`` or
    ``"stored_pos"``) into ``dst`` (at ``dst_at``) in ``dtype`` (``None``: as stored, a new layout
    only), each by its codec (:func:`helpers.formats.codecs.codec_for`: fp8 with the row scales that stay
    resident beside the weights, bf16 widened; GGUF bytes stay bytes here, decoded as their layer runs)."""
    for t in block.tensors:
        target = _target(t.stored, dtype)
        out = _view(dst, getattr(t, dst_at), target, t.shape)
        stored = _view(src, getattr(t, src_at), t.stored, t.shape)
        codec = codec_for(t.owner, t.leaf, t.stored, target) if target != t.stored else None
        if codec is None:
            out.copy_(stored)
        else:
            codec.decode(stored, out)


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
    workspace, by the hooks that decode the resident layers (:func:`helpers.offload.upcast.upcast_layerwise`;
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

    def __init__(self, model: torch.nn.Module, source: WeightsSource | str | Path, blocks: list[str], pool: int = 2,
                 pool_bytes: int | None = None, direct: bool = True,
                 parents: dict[str, str] | None = None) -> None:
        source = as_source(source)  # a checkpoint folder, or a transformer file
        self._parents = dict(parents or {})
        self.blocks = [plan_block(name, model.get_submodule(name), source, None) for name in blocks]
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

    def __init__(self, model: torch.nn.Module, source: WeightsSource | str | Path, blocks: list[str], device,
                 pool: int = 2, dtype: torch.dtype | None = None, direct: bool = False, on_read=None,
                 parents: dict[str, str] | None = None) -> None:
        source = as_source(source)  # a checkpoint folder, or a transformer file
        self._parents = dict(parents or {})
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.blocks = [plan_block(name, model.get_submodule(name), source, dtype, align=256) for name in blocks]
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
    from helpers.architecture import empty_weights

    if hasattr(cls, "load_config"):  # diffusers
        config = cls.load_config(folder)
        with empty_weights():
            return cls.from_config(config)
    config = cls.config_class.from_pretrained(folder)
    with empty_weights():
        model = cls(config)
    model.tie_weights()
    return model


def plan_streaming(folder: str | Path, cls, dtype: torch.dtype, cpu_bytes: int, block_lists: list[str],
                   pool: int | None = None, device=None, device_bytes: int | None = None, reserve: int = 0,
                   split: bool = True, compute: torch.dtype | None = None, source: WeightsSource | None = None,
                   choice: dict | None = None, part=None):
    """``(skeleton, plan)``: what :func:`load_streaming` would keep resident and stream, from the
    checkpoint's headers alone (no weight read); raises :class:`StreamBudgetError` where the budget
    cannot hold it. What a planner asks to settle ``auto`` before anything loads (and records:
    ``choice``, :meth:`helpers.offload.plan.StreamPlan.choice`, makes that plan again). ``part``: the
    cut of the skeleton that is computed (:attr:`helpers.families.Component.computes`): only its
    weights are planned and read."""
    device = torch.device(device or "cpu")
    source = as_source(source if source is not None else folder)
    model = skeleton_from_folder(folder, cls)
    if part is not None:
        model = part(model)
    for t in (*model.parameters(), *model.buffers()):  # on meta: cheap; streamed blocks keep this dtype
        if t.is_floating_point() and t.device.type == "meta":  # a buffer made real (rotary tables) keeps its own
            t.data = t.data.to(dtype)
    names = [f"{lst}.{i}" for lst in block_lists for i in range(len(model.get_submodule(lst)))]
    parts = trace_parts(model, names, dtype, split)  # before the stored forms: meta has no fp8 kernels
    source.dress(model)
    plan = plan_stream(model, block_lists, parts, source, cpu_bytes, device, device_bytes, compute or dtype, reserve,
                       pool, choice)
    return model, plan


def load_streaming(folder: str | Path, cls, dtype: torch.dtype, cpu_bytes: int, block_lists: list[str],
                   pool: int | None = None, device=None, device_bytes: int | None = None, progress: bool = False,
                   reserve: int = 0, split: bool = True, compute: torch.dtype | None = None,
                   source: WeightsSource | None = None, choice: dict | None = None, part=None):
    """Load ``cls`` (its config from ``folder``; of it only ``part``, see :func:`plan_streaming`) keeping what fits the fast tier resident and streaming
    the rest; returns ``(model, streamer)``, the streamer ``None`` when everything fits.

    Four steps, each in its own room: the skeleton on the meta device, in ``dtype`` and traced into
    its pieces (:func:`helpers.offload.plan.trace_parts`), then dressed in the stored forms of its
    weights ``source`` (by default ``folder``'s safetensors files, :class:`helpers.formats.sources.CheckpointFolder`;
    a transformer file, :class:`helpers.formats.transformer_file.TransformerFile`); the plan
    (:func:`helpers.offload.plan.plan_stream`: what stays resident, what streams in which pieces,
    checked against the budget before any weight is read); the resident weights read as stored;
    the streamer, and the layers' codecs hooked (:func:`helpers.offload.upcast.upcast_layerwise`) where
    the math runs in ``compute`` (default ``dtype``) or the stored forms need decoding (fp8 and its
    scales, GGUF blocks).

    Without ``device`` (or with the CPU) the fast tier is RAM (``cpu_bytes``) and streamed pieces
    come from the disk (:class:`BlockStreamer`, reading ahead in stored bytes, each layer decoded
    as it runs). With a GPU ``device`` the fast tier is its ``device_bytes`` (the pool in
    ``compute``, and one staging buffer as stored when converting), and streamed pieces are held in
    pinned RAM as stored, which must fit ``cpu_bytes`` (:class:`HostStreamer`, decoding each ahead
    of its turn on the copy stream). ``reserve``: bytes of the fast tier kept free for the forward
    pass's activations (a stage plan's :attr:`~helpers.planner.StagePlan.reserve_bytes`);
    ``pool``: buffers in the pool (by default up to 4); ``split=False``: stream whole blocks;
    ``progress``: a progress bar (bytes) over what loading reads; ``choice``: the resident set and pool
    a planner recorded in the job (:func:`helpers.loading.settle_offload`), kept as it is.
    """
    device = torch.device(device or "cpu")
    on_gpu = device.type != "cpu"
    compute = compute or dtype
    source = as_source(source if source is not None else folder)
    model, plan = plan_streaming(folder, cls, dtype, cpu_bytes, block_lists, pool, device, device_bytes, reserve,
                                 split, compute, source, choice, part)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.read_bytes(source, on_gpu), unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"{Path(folder).name}: loading (stream)")
    try:
        _load_resident(model, cls, source, plan, device, bar)
        streamer = None
        if plan.pieces and on_gpu:
            streamer = HostStreamer(model, source, list(plan.pieces), device, pool=plan.pool, dtype=compute,
                                    on_read=bar.update if bar is not None else None, parents=plan.pieces)
    finally:
        if bar is not None:
            bar.close()
    if plan.pieces and not on_gpu:
        # in RAM no parts are kept, and pieces stream as stored: each layer is decoded as it runs, by
        # the hooks that decode the resident ones (see BlockStreamer)
        streamer = BlockStreamer(model, source, list(plan.pieces), pool=plan.pool, pool_bytes=plan.pool_bytes,
                                 parents=plan.pieces)
    if compute != dtype or source.encoded or any(plan.blocks[u].converts for u in plan.pieces):
        from helpers.offload.upcast import upcast_layerwise

        upcast_layerwise(model, compute)
    return model, streamer


def _load_resident(model: torch.nn.Module, cls, source: WeightsSource, plan: StreamPlan, device: torch.device,
                   bar=None) -> None:
    """The weights ``plan`` keeps resident, read from ``source`` as stored onto ``device`` (read, not
    mapped: a mapped file would count in RSS twice), with the buffers the source holds (fp8's row
    scales, every block's) and those the skeleton made."""
    from accelerate.utils import set_module_tensor_to_device

    for name, key in plan.keys.items():
        stored = model.get_parameter(name).dtype  # what this tier holds: fp8 stays fp8
        set_module_tensor_to_device(model, name, device, value=source.read(key).to(device, stored), clear_cache=False)
        if bar is not None:
            bar.update(source.bytes_of(key))
    if hasattr(model, "tie_weights") and not hasattr(cls, "load_config"):
        model.tie_weights()
    for name, b in model.named_buffers():
        if b.device.type == "meta" and name in source.index:
            set_module_tensor_to_device(model, name, device, value=source.read(name), clear_cache=False)
        elif b.device.type == "meta":
            raise UserError(f"buffer {name} has no value in {source.where}; cannot stream this model.")
        elif b.device != device:
            b.data = b.data.to(device)
    model.eval()
