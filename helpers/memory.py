"""Measure what a block of work costs, and give memory back between experiments.

``with measure("encode") as m: ...`` records wall time, the peak resident memory (RSS) of this
process during the block and, where there is a GPU, the peak GPU memory allocated by PyTorch.
:func:`free_memory` runs the garbage collector, empties PyTorch's GPU cache and asks the C allocator
to return freed pages, and reports memory before and after, so a notebook can show that it was freed.
Explained in ``00_environment-check.ipynb``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from helpers.report import format_bytes

_STATUS = Path("/proc/self/status")
_ACTIVE: list["Measurement"] = []
_ACTIVE_LOCK = threading.Lock()
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return int(psutil.Process().memory_info().rss)


def _reset_kernel_peak() -> bool:
    """Reset Linux's high-water mark of RSS (VmHWM) so it measures from now; False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _kernel_peak() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cuda():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return torch.cuda if torch.cuda.is_available() else None


@dataclass
class Measurement:
    """Time and memory of one measured block; filled in when the block ends."""

    label: str = ""
    wall_s: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    peak_rss: int = 0
    #: peak bytes allocated by PyTorch per GPU index, empty without a GPU
    peak_gpu: dict[int, int] = field(default_factory=dict)
    #: how the RSS peak was read: "kernel" (exact, Linux VmHWM) or "sampled" (polled)
    rss_method: str = "sampled"
    # peaks handed over by blocks nested inside this one (they reset the shared counters)
    _carried_rss: int = field(default=0, repr=False)
    _carried_gpu: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def peak_rss_delta(self) -> int:
        """How far the peak rose above where the block started."""
        return max(0, self.peak_rss - self.rss_before)

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "wall_s": self.wall_s,
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "peak_rss_bytes": self.peak_rss,
            "peak_gpu_bytes": {str(k): v for k, v in self.peak_gpu.items()} or None,
        }

    def __str__(self) -> str:
        head = f"{self.label}: " if self.label else ""
        text = (
            f"{head}{self.wall_s:.2f} s, peak RSS {format_bytes(self.peak_rss)} "
            f"(+{format_bytes(self.peak_rss_delta)} over the start)"
        )
        for i, b in self.peak_gpu.items():
            text += f", peak GPU {i} {format_bytes(b)}"
        return text

    def _repr_pretty_(self, p, cycle) -> None:  # IPython shows the readable line
        p.text(str(self))


@contextlib.contextmanager
def measure(label: str = "", interval_s: float = 0.005) -> Iterator[Measurement]:
    """Measure wall time, peak RSS and peak GPU memory of the ``with`` block.

    On Linux the peak comes from the kernel's own high-water mark, reset at the start of the block,
    so short spikes are not missed; elsewhere a background thread samples RSS every ``interval_s``.
    GPU peaks come from ``torch.cuda.max_memory_allocated`` after resetting its statistics.
    Blocks may nest (or run in several threads): a block that resets the counters first hands the
    peaks so far to the blocks around it.
    """
    m = Measurement(label=label)
    proc = psutil.Process()
    cuda = _cuda()
    with _ACTIVE_LOCK:
        # resetting the counters would erase the peaks of enclosing blocks: hand them over first
        kernel_now = _kernel_peak()
        for outer in _ACTIVE:
            outer._carried_rss = max(outer._carried_rss, kernel_now or 0)
            if cuda is not None:
                for i in range(cuda.device_count()):
                    outer._carried_gpu[i] = max(outer._carried_gpu.get(i, 0), int(cuda.max_memory_allocated(i)))
        if cuda is not None:
            for i in range(cuda.device_count()):
                cuda.reset_peak_memory_stats(i)
        exact = _reset_kernel_peak()
        _ACTIVE.append(m)
    m.rss_before = int(proc.memory_info().rss)
    sampled = [m.rss_before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            sampled[0] = max(sampled[0], int(proc.memory_info().rss))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield m
    finally:
        m.wall_s = time.perf_counter() - start
        stop.set()
        sampler.join()
        with _ACTIVE_LOCK:
            _ACTIVE.remove(m)
            m.rss_after = int(proc.memory_info().rss)
            peak = max(sampled[0], m.rss_after, m._carried_rss)
            kernel = _kernel_peak() if exact else None
            if kernel is not None:
                peak = max(peak, kernel)
                m.rss_method = "kernel"
            m.peak_rss = peak
            if cuda is not None:
                m.peak_gpu = {i: max(int(cuda.max_memory_allocated(i)), m._carried_gpu.get(i, 0))
                              for i in range(cuda.device_count())}


@dataclass
class FreeReport:
    """Memory before and after :func:`free_memory`."""

    rss_before: int
    rss_after: int
    gpu_before: dict[int, int] = field(default_factory=dict)
    gpu_after: dict[int, int] = field(default_factory=dict)

    @property
    def freed(self) -> int:
        return self.rss_before - self.rss_after

    def __str__(self) -> str:
        text = (
            f"RSS {format_bytes(self.rss_before)} -> {format_bytes(self.rss_after)} "
            f"(freed {format_bytes(max(0, self.freed))})"
        )
        for i in self.gpu_before:
            text += f"; GPU {i} allocated {format_bytes(self.gpu_before[i])} -> {format_bytes(self.gpu_after[i])}"
        return text

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


#: blocks of this many bytes or more get a mapping of their own from the C allocator (see below)
MAP_ON_THEIR_OWN = 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_blocks(threshold: int = MAP_ON_THEIR_OWN) -> bool:
    """Have the C allocator give every block of ``threshold`` bytes or more back to the system as
    soon as it is freed, so that the process holds what it uses; ``False`` where it cannot (not glibc).

    glibc maps large blocks on their own and unmaps them when freed, but after the first such free
    it raises that size up to 32 MiB, and the activations of a forward pass (MBs each, freed op by
    op) then stay in its arenas: a CPU stage's peak RSS rose 0.8 to 1.3 GiB from one run of the same
    command to the next, where its activations were 0.8 GiB. Fixing the threshold keeps RSS at what
    the tensors alive hold, so the RAM tier a plan keeps for activations is what the process uses.
    The stages' command line sets it; a notebook's kernel keeps the allocator's own behaviour.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def free_memory() -> FreeReport:
    """Collect garbage, empty PyTorch's GPU cache, return freed pages to the OS; report before/after.

    Only memory nothing refers to can be freed: ``del`` the models first (in a notebook, also
    ``Out`` and ``_`` may hold them).
    """
    cuda = _cuda()
    before = rss_bytes()
    gpu_before = {i: int(cuda.memory_allocated(i)) for i in range(cuda.device_count())} if cuda else {}
    gc.collect()
    if cuda is not None:
        cuda.synchronize()
        cuda.empty_cache()
    _malloc_trim()
    gpu_after = {i: int(cuda.memory_allocated(i)) for i in range(cuda.device_count())} if cuda else {}
    return FreeReport(before, rss_bytes(), gpu_before, gpu_after)


def drop_page_cache(*paths: str | Path) -> int:
    """Ask the kernel to forget its cached copy of these files (or every file under these folders).

    A budget's disk tier means the weights there are not in RAM; on a machine with RAM to spare the
    page cache would still keep them, and every read from "disk" would be a copy from memory. The
    benchmark drops the cache before each step so that disk reads come from the disk, as they would
    on a machine whose RAM is the budget. Written pages are flushed first (only clean pages can go).
    Returns the bytes of the files handled; raises :class:`OSError` where the system cannot do it.
    """
    import os

    if not hasattr(os, "posix_fadvise"):
        raise OSError("this system cannot drop a file's cached pages (no posix_fadvise)")
    total = 0
    for root in paths:
        root = Path(root)
        if not root.exists():  # a wrong path must not quietly leave the cache warm
            raise FileNotFoundError(f"no file or folder {root} to drop from the page cache")
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # renamed or removed since it was listed
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total
