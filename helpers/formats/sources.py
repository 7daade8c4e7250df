"""Where a model's weights are, byte by byte: the headers of the files people hold, read without
reading any weight.

A file's header answers, for every tensor, its type, its shape and the range of bytes that holds
it, so that a footprint counts stored bytes and a loader or a stream reads each tensor (or a range
of its rows) by offset. This module reads GGUF files (:func:`read_gguf`), single safetensors files
(:func:`read_safetensors`) and a checkpoint folder's safetensors files (:func:`read_safetensors_index`);
every check a file can fail (not that format, cut short, a tensor past its end or overlapping
another, a type not read here) is made on its header, with a :class:`~helpers.errors.UserError`
that names the file and what is wrong.

A :class:`WeightsSource` is what a loader reads a model from: an *index* (each parameter's name ->
where its stored bytes are), the stored forms it dresses a skeleton in (:meth:`WeightsSource.dress`),
and reads by offset. Two kinds: :class:`CheckpointFolder` (a component folder's safetensors files,
bf16 or this project's fp8) and a transformer file checked against its model
(:class:`helpers.formats.transformer_file.TransformerFile`: GGUF, or one safetensors file in the BFL
layout). A new container is a new source; the stream plan (:mod:`helpers.offload.plan`) and the
loaders (:mod:`helpers.offload.streamers`) take any of them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.errors import UserError
from helpers.files import check_file
from helpers.precision import folder_format, to_storage
from helpers.formats.quants import QuantType, quant_type, tensor_bytes

GGUF_MAGIC = b"GGUF"
#: safetensors' dtype names -> torch's
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
#: GGUF's default alignment of the tensor data (``general.alignment`` overrides it)
GGUF_ALIGNMENT = 32


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: its type (a GGUF type; safetensors' plain dtypes are F32, F16, BF16, or
    its own name such as F8_E4M3), its shape (rows first, as torch), and its bytes in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int

    def rows(self, start: int | None, stop: int | None) -> tuple[int, int]:
        """(offset, nbytes) of rows ``start:stop``: whole rows are whole blocks, so a range of bytes."""
        count = self.shape[0] if self.shape else 1
        start, stop, _ = slice(start, stop).indices(count)
        row = self.nbytes // count if count else 0
        return self.offset + start * row, (stop - start) * row


@dataclass
class WeightsFile:
    """A file's tensors (:class:`Entry` by name), its metadata and its format (``gguf`` or ``safetensors``)."""

    path: Path
    format: str
    tensors: dict[str, Entry]
    metadata: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())

    def types(self) -> dict[str, int]:
        """How many tensors of each type the file holds."""
        counts: dict[str, int] = {}
        for e in self.tensors.values():
            counts[e.dtype] = counts.get(e.dtype, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class _Reader:
    """Little-endian values from a file, a :class:`UserError` where the file ends first."""

    def __init__(self, fh, path: Path, size: int) -> None:
        self.fh, self.path, self.size = fh, path, size

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise UserError(f"{self.path} ends inside its GGUF header (at byte {self.fh.tell():,}): the file was "
                            "cut short; download or write it again.")
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > self.size:
            raise UserError(f"{self.path}: a string of {n:,} bytes in a {self.size:,}-byte file; this is not a valid "
                            "GGUF file.")
        return self.take(n).decode("utf-8", errors="replace")

    _SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(self, kind: int):
        if kind in self._SCALARS:
            return self.unpack(self._SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            inner, count = self.unpack("I"), self.unpack("Q")
            if count > self.size:
                raise UserError(f"{self.path}: an array of {count:,} values in a {self.size:,}-byte file; this is "
                                "not a valid GGUF file.")
            return [self.value(inner) for _ in range(count)]
        raise UserError(f"{self.path}: metadata of unknown type {kind}; this is not a valid GGUF file.")


def read_gguf(path: str | os.PathLike) -> WeightsFile:
    """The tensors and metadata of the GGUF file ``path``, from its header alone.

    Refused with a :class:`UserError`, before any weight is read: not a GGUF file, a version other
    than 2 or 3, a header or tensor cut short by the end of the file, tensors overlapping, a type
    this project cannot read (it is named), a row that is not whole blocks.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        r = _Reader(fh, path, size)
        if fh.read(4) != GGUF_MAGIC:
            raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF').")
        version = r.unpack("I")
        if version not in (2, 3):
            raise UserError(f"{path} is GGUF version {version}; versions 2 and 3 are read here.")
        count, kvs = r.unpack("Q"), r.unpack("Q")
        metadata = {}
        for _ in range(kvs):
            key = r.string()
            metadata[key] = r.value(r.unpack("I"))
        infos = []
        for _ in range(count):
            name = r.string()
            dims = [r.unpack("Q") for _ in range(r.unpack("I"))]
            kind, offset = r.unpack("I"), r.unpack("Q")
            infos.append((name, dims, kind, offset))
        align = int(metadata.get("general.alignment", GGUF_ALIGNMENT))
        start = (fh.tell() + align - 1) // align * align
    tensors: dict[str, Entry] = {}
    for name, dims, kind, offset in infos:
        qtype: QuantType = quant_type(kind)
        shape = tuple(int(d) for d in reversed(dims))  # GGUF lists the innermost dimension first
        try:
            nbytes = tensor_bytes(qtype, shape)
        except UserError as exc:
            raise UserError(f"{path}: tensor {name} {shape}: {exc}") from None
        if name in tensors:
            raise UserError(f"{path} holds tensor {name} twice; this is not a valid GGUF file.")
        tensors[name] = Entry(name, qtype.name, shape, start + offset, nbytes)
    _check_extents(path, size, tensors)
    return WeightsFile(path, "gguf", tensors, metadata)


#: safetensors' dtypes -> the type names this project uses (plain ones as GGUF names them)
_SAFETENSORS = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F8_E4M3": "F8_E4M3", "F8_E5M2": "F8_E5M2",
                "F64": "F64", "I64": "I64", "I32": "I32", "I16": "I16", "I8": "I8", "U8": "U8", "BOOL": "BOOL"}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F64": 8, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U8": 1, "BOOL": 1}


def read_safetensors(path: str | os.PathLike) -> WeightsFile:
    """The tensors of the single safetensors file ``path``, from its header alone; refused as
    :func:`read_gguf` refuses (not safetensors, cut short, tensors past the end or overlapping)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > min(size - 8, 100 * 2**20):
            raise UserError(f"{path} is not a safetensors file (its first 8 bytes do not give a header length "
                            "within the file).")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise UserError(f"{path}: its safetensors header is not JSON; the file is damaged or not safetensors.") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: its safetensors header is not a JSON object; the file is damaged.")
    metadata = header.pop("__metadata__", {}) or {}
    tensors: dict[str, Entry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name} has no dtype, shape and data_offsets; the file is damaged.") from None
        if dtype not in _SAFETENSORS:
            raise UserError(f"{path}: tensor {name} is {dtype}, which is not read here.")
        count = 1
        for d in shape:
            count *= d
        if b - a != count * _ITEMSIZE[dtype]:
            raise UserError(f"{path}: tensor {name} {shape} in {dtype} takes {count * _ITEMSIZE[dtype]:,} bytes, "
                            f"its header gives it {b - a:,}; the file is damaged.")
        tensors[name] = Entry(name, _SAFETENSORS[dtype], shape, 8 + n + a, b - a)
    _check_extents(path, size, tensors)
    return WeightsFile(path, "safetensors", tensors, metadata)


def read_weights_file(path: str | os.PathLike) -> WeightsFile:
    """A ``.gguf`` or single ``.safetensors`` file's header (:func:`read_gguf`, :func:`read_safetensors`)."""
    path = check_file(path, "a transformer's .gguf or .safetensors file",
                      "give the transformer's .gguf or single .safetensors file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == GGUF_MAGIC:
        return read_gguf(path)
    if path.suffix == ".gguf":
        raise UserError(f"{path} is named .gguf but is not a GGUF file (it does not start with 'GGUF').")
    return read_safetensors(path)


def _check_extents(path: Path, size: int, tensors: dict[str, Entry]) -> None:
    spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in tensors.values())
    for (a, b, name), (c, _, other) in zip(spans, spans[1:]):
        if c < b:
            raise UserError(f"{path}: tensors {name} and {other} overlap; the file is damaged.")
    if spans and spans[-1][1] > size:
        end, name = spans[-1][1], spans[-1][2]
        raise UserError(f"{path} ends at byte {size:,} but tensor {name} runs to byte {end:,}: the file was cut "
                        "short; download or write it again.")


# --------------------------------------------------------------------------- a checkpoint folder, and sources


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
            if entry["dtype"] not in TORCH_DTYPES:
                raise UserError(f"{path.name}: tensor {name} is stored as {entry['dtype']}, which this loader does not "
                                f"read ({', '.join(TORCH_DTYPES)}); use offload 'accelerate'.")
            expected = math.prod(entry["shape"]) * _itemsize(TORCH_DTYPES[entry["dtype"]])
            if end - begin != expected:
                raise UserError(f"{path.name}: the header gives tensor {name} {end - begin:,} bytes where its shape "
                                f"{entry['shape']} needs {expected:,}; the file is damaged: build or download it again.")
            out[name] = (path, 8 + n + begin, end - begin, entry["dtype"], entry["shape"])
    return out


def read_entry(entry) -> torch.Tensor:
    """The tensor an index entry locates: one range of a file (:func:`read_tensor`), or several
    concatenated along the rows (a tensor a single file stores in pieces)."""
    if isinstance(entry, list):
        return torch.cat([read_tensor(*piece) for piece in entry])
    return read_tensor(*entry)


def entry_bytes(entry) -> int:
    return sum(piece[2] for piece in entry) if isinstance(entry, list) else entry[2]


def read_tensor(path: Path, offset: int, nbytes: int, dtype: str, shape: list[int]) -> torch.Tensor:
    """One tensor of a safetensors file, read into memory this process owns (no memory map)."""
    out = torch.empty(shape, dtype=TORCH_DTYPES[dtype])
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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class WeightsSource:
    """Where a loader reads a model's weights from, by offsets: :attr:`index` (parameter or buffer
    name -> ``(file, offset, bytes, dtype, stored shape)``, or a list of such pieces concatenated
    along the rows), :meth:`dress` (a skeleton on the meta device in the stored forms), and
    :meth:`read`. ``encoded``: its stored forms need decoding whatever the compute dtype (fp8 with
    scales, GGUF blocks)."""

    index: dict
    encoded: bool = False

    @property
    def where(self) -> str:
        """The folder or file, for messages."""
        raise NotImplementedError

    def dress(self, skeleton: torch.nn.Module) -> torch.nn.Module:
        """``skeleton`` (in place, on the meta device) holding its tensors as this source stores them."""
        return skeleton

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored, read into memory this process owns (not mapped)."""
        return read_entry(self.index[key])

    def bytes_of(self, key: str) -> int:
        return entry_bytes(self.index[key])


class CheckpointFolder(WeightsSource):
    """A component folder's safetensors files (sharded or not), as ``from_pretrained`` reads them;
    ``weights``: how they store the weights (by default what the folder records,
    :func:`helpers.precision.folder_format`; ``fp8``: linear weights in fp8 with their row scales)."""

    def __init__(self, folder: str | os.PathLike, weights: str | None = None) -> None:
        self.folder = Path(folder)
        self.index = read_safetensors_index(self.folder)
        self.weights = weights if weights is not None else folder_format(self.folder)
        self.encoded = self.weights == "fp8"

    @property
    def where(self) -> str:
        return str(self.folder)

    def dress(self, skeleton):
        if self.weights == "fp8":
            to_storage(skeleton, "fp8")
        return skeleton


def as_source(source) -> WeightsSource:
    """``source`` if it is a :class:`WeightsSource`, else the checkpoint folder at that path."""
    return source if isinstance(source, WeightsSource) else CheckpointFolder(source)
