"""Block streaming: run a model bigger than RAM by reading each offloaded block just before its turn.

The method's device map keeps the first blocks in the fast tier and lets accelerate's hooks fetch
the rest one at a time, synchronously. :class:`BlockStreamer` does it with read-ahead instead, one
tier down (disk -> RAM, on a machine without a GPU): the blocks that fit the ``cpu`` budget stay
resident; the others stay in the checkpoint's own safetensors files and are read, by a background
thread, into a small fixed pool of buffers while the previous block computes. Nothing is converted
or copied to an offload folder, and RAM holds at most the resident blocks plus the pool.
Explained in ``04_offload-strategies.ipynb``.
"""

from __future__ import annotations

import json
import queue
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.errors import UserError

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
_ALIGN = 64


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
            out[name] = (path, 8 + n + begin, end - begin, entry["dtype"], entry["shape"])
    return out


@dataclass
class _Block:
    name: str
    module: torch.nn.Module
    # (parameter path inside the block, file, offset, nbytes, dtype, shape, position in the buffer)
    tensors: list = field(default_factory=list)
    nbytes: int = 0


class BlockStreamer:
    """Attach to a model whose streamed blocks are on the meta device; stream them from disk.

    ``blocks``: the block names to stream, in the order the forward pass calls them (each call of
    the model runs them all in this order). ``pool``: how many blocks may be in RAM at once
    (2: one computing, one being read).
    """

    def __init__(self, model: torch.nn.Module, folder: str | Path, blocks: list[str], pool: int = 2,
                 pool_bytes: int | None = None) -> None:
        index = read_safetensors_index(folder)
        self.blocks: list[_Block] = []
        for name in blocks:
            block = _Block(name, model.get_submodule(name))
            pos = 0
            for pname, _ in block.module.named_parameters():
                full = f"{name}.{pname}"
                if full not in index:
                    raise UserError(f"{full} is not in the checkpoint at {folder}; cannot stream {name}.")
                path, offset, nbytes, dtype, shape = index[full]
                block.tensors.append((pname, path, offset, nbytes, _DTYPES[dtype], shape, pos))
                pos += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
            block.nbytes = pos
            self.blocks.append(block)
        self.largest = max((b.nbytes for b in self.blocks), default=0)
        if pool_bytes is not None and self.largest * pool > pool_bytes:
            raise UserError(
                f"streaming needs {pool} buffers of the largest block ({self.largest:,} bytes each), more than the "
                f"{pool_bytes:,} bytes the RAM tier has left; give the cpu tier more room."
            )
        self.buffers = [torch.empty(self.largest, dtype=torch.uint8) for _ in range(pool)]
        self.free: queue.Queue = queue.Queue()
        for buf in self.buffers:
            self.free.put(buf)
        self.ready: queue.Queue = queue.Queue()
        self.bytes_read = 0
        #: (kind, block index, start, end) in perf_counter seconds: "read" by the reader, "compute" by the model
        self.events: list[tuple[str, int, float, float]] = []
        self._compute_start: dict[int, float] = {}
        self._files: dict[Path, object] = {}
        self._stop = threading.Event()
        self._handles = []
        self._originals: dict[int, dict[str, torch.nn.Parameter]] = {}
        self._current: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            self._handles.append(block.module.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(block.module.register_forward_hook(self._make_post(i)))
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="block-reader")
        self._reader.start()

    # ----------------------------------------------------------------- reading

    def _read_loop(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                buf = self.free.get(timeout=0.1)
            except queue.Empty:
                continue
            if self._stop.is_set():
                break
            block = self.blocks[i % len(self.blocks)]
            started = time.perf_counter()
            view = memoryview(buf.numpy())
            for _, path, offset, nbytes, _, _, pos in block.tensors:
                f = self._files.get(path)
                if f is None:
                    f = self._files[path] = open(path, "rb", buffering=0)
                f.seek(offset)
                f.readinto(view[pos:pos + nbytes])
            self.bytes_read += block.nbytes
            self.events.append(("read", i % len(self.blocks), started, time.perf_counter()))
            self.ready.put((i % len(self.blocks), buf))
            i += 1

    # ----------------------------------------------------------------- hooks

    def _make_pre(self, i: int):
        def pre(module, args):
            try:
                j, buf = self.ready.get(timeout=600)
            except queue.Empty:
                raise RuntimeError(
                    "block streamer: no block arrived in 10 minutes (an earlier forward pass failed midway?); "
                    "load the model again"
                ) from None
            if j != i:  # the model ran its blocks in another order than declared
                raise RuntimeError(f"block streamer expected block {self.blocks[j].name}, got {self.blocks[i].name}")
            originals = {}
            for pname, _, _, nbytes, dtype, shape, pos in self.blocks[i].tensors:
                owner_name, _, leaf = pname.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                originals[pname] = owner._parameters[leaf]
                tensor = buf[pos:pos + nbytes].view(dtype).view(shape)
                owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
            self._originals[i] = originals
            self._current[i] = buf
            self._compute_start[i] = time.perf_counter()
            return None

        return pre

    def _make_post(self, i: int):
        def post(module, args, output):
            self.events.append(("compute", i, self._compute_start.pop(i), time.perf_counter()))
            for pname, param in self._originals.pop(i).items():
                owner_name, _, leaf = pname.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                owner._parameters[leaf] = param
            self.free.put(self._current.pop(i))
            return output

        return post

    def close(self) -> None:
        """Stop reading, remove the hooks, close the files."""
        self._stop.set()
        self._reader.join(timeout=5)
        for h in self._handles:
            h.remove()
        for f in self._files.values():
            f.close()
        self._files.clear()


def load_streaming(folder: str | Path, cls, dtype: torch.dtype, cpu_bytes: int, block_lists: list[str],
                   pool: int = 2):
    """Load ``cls`` from ``folder`` keeping what fits ``cpu_bytes`` resident and streaming the rest.

    ``block_lists``: the model's lists of blocks in call order (``["transformer_blocks",
    "single_transformer_blocks"]`` for Flux). Everything outside the blocks is resident; blocks are
    made resident from the first on, while they fit next to the buffer pool; the rest stream.
    Returns ``(model, streamer)``; the streamer is ``None`` when everything fits.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    folder = Path(folder)
    config = cls.load_config(folder)
    with init_empty_weights():
        model = cls.from_config(config)
    for t in (*model.parameters(), *model.buffers()):  # on meta: cheap; sets the dtype values are cast to
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    index = read_safetensors_index(folder)
    names = [f"{lst}.{i}" for lst in block_lists for i in range(len(model.get_submodule(lst)))]
    size = {n: sum(p.numel() for p in model.get_submodule(n).parameters()) * torch.tensor([], dtype=dtype).element_size()
            for n in names}
    block_params = {f"{n}.{p}" for n in names for p, _ in model.get_submodule(n).named_parameters()}
    other = sum(p.numel() for n, p in model.named_parameters() if n not in block_params) * torch.tensor([], dtype=dtype).element_size()
    largest = max(size.values())
    if other + largest > cpu_bytes:
        raise UserError(
            f"the cpu tier ({cpu_bytes:,} bytes) cannot hold the model's non-block weights ({other:,}) and one block "
            f"({largest:,}); give it at least {other + largest:,} bytes."
        )
    room = cpu_bytes - other
    resident: list[str] = []
    for n in names:
        streamed_after = [m for m in names if m not in resident and m != n]
        need_pool = pool * max((size[m] for m in streamed_after), default=0)
        if sum(size[r] for r in resident) + size[n] + need_pool <= room:
            resident.append(n)
        else:
            break
    streamed = [n for n in names if n not in resident]
    streamed_params = {f"{n}.{p}" for n in streamed for p, _ in model.get_submodule(n).named_parameters()}
    handles = {}
    for name, p in model.named_parameters():
        if name in streamed_params:
            continue
        path = index[name][0]
        f = handles.get(path) or handles.setdefault(path, safe_open(str(path), "pt"))
        set_module_tensor_to_device(model, name, "cpu", value=f.get_tensor(name).to(dtype))
    for name, b in model.named_buffers():
        if b.device.type == "meta":
            raise UserError(f"buffer {name} has no value in the checkpoint; cannot stream this model.")
    if streamed and dtype != _DTYPES[index[next(iter(streamed_params))][3]]:
        raise UserError("streamed blocks are used in the dtype stored in the checkpoint; load in that dtype.")
    model.eval()
    streamer = BlockStreamer(model, folder, streamed, pool=pool) if streamed else None
    return model, streamer
