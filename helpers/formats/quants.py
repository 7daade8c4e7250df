"""GGUF's tensor types: how many bytes a row takes, and their values back, in torch.

A GGUF file (the format of llama.cpp, and of the FLUX.1 quantizations of the ComfyUI / Forge world)
stores each tensor as rows of *blocks*: a block holds a fixed number of consecutive values of one
row (32 for the ``Q*_0`` / ``Q*_1`` types, 256 for the K-quants) as small integers and one or two
half-precision factors. A row is whole blocks, rows follow one another, so any range of rows is a
range of bytes: a reader can fetch part of a tensor by offsets, as :mod:`helpers.families.flux1.layout` needs.

:func:`dequantize` turns a tensor's bytes into values in any dtype with torch's ops, on the device
the bytes are on (CPU or GPU), one tensor at a time; it gives the values of gguf's own reference
(``gguf.quants.dequantize``) in float32. :func:`quantize_q6_k` writes the one K-quant the ``gguf``
package cannot write yet, for the files the tests and benchmarks make.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from helpers.errors import UserError


@dataclass(frozen=True)
class QuantType:
    """One GGUF tensor type: its number in the file, values per block and bytes per block."""

    name: str
    id: int
    block: int
    nbytes: int

    @property
    def bits(self) -> float:
        """Bits a value takes, scales included (Q8_0: 8.5, Q4_0: 4.5)."""
        return 8 * self.nbytes / self.block

    def row_bytes(self, columns: int) -> int:
        """The bytes of one row of ``columns`` values; a :class:`UserError` where blocks do not fit."""
        if columns % self.block:
            raise UserError(f"a row of {columns} values is not whole {self.name} blocks of {self.block}.")
        return columns // self.block * self.nbytes


#: the types this project reads (values per block, bytes per block, as ggml defines them)
TYPES: dict[str, QuantType] = {t.name: t for t in (
    QuantType("F32", 0, 1, 4),
    QuantType("F16", 1, 1, 2),
    QuantType("Q4_0", 2, 32, 18),
    QuantType("Q4_1", 3, 32, 20),
    QuantType("Q5_0", 6, 32, 22),
    QuantType("Q5_1", 7, 32, 24),
    QuantType("Q8_0", 8, 32, 34),
    QuantType("Q2_K", 10, 256, 84),
    QuantType("Q3_K", 11, 256, 110),
    QuantType("Q4_K", 12, 256, 144),
    QuantType("Q5_K", 13, 256, 176),
    QuantType("Q6_K", 14, 256, 210),
    QuantType("BF16", 30, 1, 2),
)}
BY_ID: dict[int, QuantType] = {t.id: t for t in TYPES.values()}
#: ggml's other types, by number: named in the message that refuses them
OTHER = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
         19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
         27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def quant_type(id_or_name: int | str) -> QuantType:
    """The :class:`QuantType` of a file's type number (or name); a :class:`UserError` for the others."""
    found = BY_ID.get(id_or_name) if isinstance(id_or_name, int) else TYPES.get(str(id_or_name).upper())
    if found is None:
        name = OTHER.get(id_or_name, f"type {id_or_name}") if isinstance(id_or_name, int) else id_or_name
        raise UserError(f"GGUF tensors of type {name} cannot be read here; the types read are "
                        f"{', '.join(TYPES)} (a FLUX.1 file quantized as Q8_0, Q5_K, Q4_K, Q4_0... works).")
    return found


def _f16(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The half-precision factor at byte ``at`` of every block (``raw``: blocks x bytes), as float32."""
    return raw[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes -> their low 4 bits, then their high 4 bits, along the last axis (ggml's order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` bits of 4 little-endian bytes per block (``qh``: blocks x 4), bit ``i`` at column ``i``."""
    word = qh.to(torch.int64)
    word = word[:, 0] | word[:, 1] << 8 | word[:, 2] << 16 | word[:, 3] << 24
    return (word[:, None] >> torch.arange(n, device=qh.device)) & 1


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins a Q4_K / Q5_K block packs into 12 bytes."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _blocks_q8_0(b):
    return _f16(b, 0) * b[:, 2:].view(torch.int8).float()


def _blocks_q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)


def _blocks_q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _blocks_q5_0(b):
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6], 32) << 4).to(torch.uint8)
    return _f16(b, 0) * (q.float() - 16)


def _blocks_q5_1(b):
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8], 32) << 4).to(torch.uint8)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _blocks_q2_k(b):
    n = b.shape[0]
    scales = b[:, 0:16]  # per 16 values: a 4-bit scale, then a 4-bit min
    dl = (_f16(b, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).reshape(1, 1, 4, 1)
    q = ((b[:, 16:80].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16).float()  # 2 bits a value
    return (dl * q - ml).reshape(n, 256)


def _blocks_q3_k(b):
    n = b.shape[0]
    hmask, qs, packed = b[:, 0:32], b[:, 32:96], b[:, 96:108]
    # sixteen 6-bit scales: low 4 bits in bytes 0-7 (low nibble first), high 2 bits in bytes 8-11
    low = (packed[:, 0:8].reshape(n, 1, 8) >> torch.tensor([0, 4], device=b.device, dtype=torch.uint8)
           .reshape(1, 2, 1)).reshape(n, 16)
    high = (packed[:, 8:12].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)
            .reshape(1, 4, 1)).reshape(n, 16)
    scales = (((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int16) - 32).float()
    dl = (_f16(b, 108) * scales).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)
          .reshape(1, 1, 4, 1)).reshape(n, 16, 16) & 3
    qh = ((hmask.reshape(n, 1, 1, 32) >> torch.arange(8, device=b.device, dtype=torch.uint8).reshape(1, 1, 8, 1))
          .reshape(n, 16, 16) & 1) ^ 1  # a high bit of 0 subtracts 4
    q = (ql.to(torch.int16) - (qh.to(torch.int16) << 2)).float()
    return (dl * q).reshape(n, 256)


def _blocks_q4_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 32)  # 4 runs of 32 bytes: 64 values each, low nibbles then high
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, 8, 32).float()
    return (_f16(b, 0)[:, :, None] * sc[:, :, None] * q - _f16(b, 2)[:, :, None] * mn[:, :, None]).reshape(n, 256)


def _blocks_q5_k(b):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48]  # bit j of byte l: the fifth bit of value l of group j
    qs = b[:, 48:].reshape(n, 4, 32)
    low = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, 8, 32)
    high = (qh[:, None, :] >> torch.arange(8, device=b.device, dtype=torch.uint8)[None, :, None]) & 1
    q = (low | (high << 4)).float()
    return (_f16(b, 0)[:, :, None] * sc[:, :, None] * q - _f16(b, 2)[:, :, None] * mn[:, :, None]).reshape(n, 256)


def _blocks_q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, 0:128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 32)
    scales = b[:, 192:208].view(torch.int8).float().reshape(n, 16, 1)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=-1).reshape(n, 2, 4, 32)  # per half: 4 groups of 32
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)
    high = (qh[:, :, None, :] >> shifts[None, None, :, None]) & 3
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, 16, 16).float()
    return (_f16(b, 208)[:, :, None] * scales * q).reshape(n, 256)


_BLOCKS = {"Q8_0": _blocks_q8_0, "Q2_K": _blocks_q2_k, "Q3_K": _blocks_q3_k, "Q4_0": _blocks_q4_0, "Q4_1": _blocks_q4_1, "Q5_0": _blocks_q5_0,
           "Q5_1": _blocks_q5_1, "Q4_K": _blocks_q4_k, "Q5_K": _blocks_q5_k, "Q6_K": _blocks_q6_k}


def _into_q8_0(b, out):
    values = out.view(-1, 32)
    values.copy_(b[:, 2:].view(torch.int8))  # a widening copy, then one product in place: both vectorised
    values.mul_(_f16(b, 0))


def _into_q4_0(b, out):
    qs, values = b[:, 2:], out.view(-1, 2, 16)
    q = torch.empty(values.shape, dtype=torch.uint8, device=b.device)  # the nibbles, 1 byte a value
    torch.bitwise_and(qs, 0x0F, out=q[:, 0])
    torch.bitwise_right_shift(qs, 4, out=q[:, 1])
    values.copy_(q)
    values.sub_(8).mul_(_f16(b, 0)[:, :, None])


#: the two most common types decoded straight into a float32 ``out``: the products of the same
#: float32 factors as :data:`_BLOCKS` (the same bits), without a float temporary per value (Q8_0 1.9x,
#: Q4_0 1.7x the speed of decoding then copying, on 2 cores)
_INTO = {"Q8_0": _into_q8_0, "Q4_0": _into_q4_0}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: values a CPU decodes at a time into another dtype (bfloat16): a float32 scratch of 1 MiB, reused, stays in
#: cache and is never paged in afresh, where a float32 copy of the whole tensor is (a 3072x3072 Q8_0 weight
#: into bfloat16: see docs/benchmarks/README.md)
_SCRATCH_VALUES = 1 << 18


def _through_scratch(blocks: torch.Tensor, qtype: QuantType, out: torch.Tensor) -> None:
    """Decode ``blocks`` into ``out`` (blocks x values, any float dtype) a slice at a time through one float32
    scratch: the float32 values of :data:`_INTO` / :data:`_BLOCKS`, each rounded once, as ``copy_`` rounds them."""
    step = max(1, _SCRATCH_VALUES // qtype.block)
    scratch = torch.empty(min(step, len(blocks)), qtype.block, dtype=torch.float32)
    for i in range(0, len(blocks), step):
        part, values = blocks[i:i + step], scratch[:min(step, len(blocks) - i)]
        if qtype.name in _INTO:
            _INTO[qtype.name](part, values)
        else:
            values.copy_(_BLOCKS[qtype.name](part).view(-1, qtype.block))
        out[i:i + step].copy_(values)


def tensor_bytes(qtype: QuantType, shape) -> int:
    """The bytes of a tensor of ``shape`` (rows first, as torch) stored as ``qtype``."""
    shape = list(shape)
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * qtype.row_bytes(shape[-1] if shape else 1)


def dequantize(raw: torch.Tensor, qtype: QuantType | str, shape, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The values of a tensor of ``shape`` (torch's order: rows first) whose bytes, as stored, are
    ``raw`` (uint8, on any device), in ``dtype`` (or written into ``out``). float32 values are gguf's
    own reference's; other dtypes are those rounded once."""
    qtype = quant_type(qtype.name if isinstance(qtype, QuantType) else qtype)
    shape = torch.Size(shape)
    need = tensor_bytes(qtype, shape)
    raw = raw.reshape(-1)
    if raw.dtype != torch.uint8 or raw.numel() != need:
        raise ValueError(f"{qtype.name} {tuple(shape)} takes {need} bytes, not {raw.numel()} of {raw.dtype}")
    if out is not None and qtype.name in _INTO and out.dtype == torch.float32 and out.is_contiguous():
        _INTO[qtype.name](raw.reshape(-1, qtype.nbytes), out)
        return out
    if out is not None and qtype.name not in _PLAIN and raw.device.type == "cpu" and out.is_contiguous():
        _through_scratch(raw.reshape(-1, qtype.nbytes), qtype, out.view(-1, qtype.block))
        return out
    if qtype.name in _PLAIN:
        values = raw.view(_PLAIN[qtype.name]).reshape(shape)
    else:
        values = _BLOCKS[qtype.name](raw.reshape(-1, qtype.nbytes)).reshape(shape)
    if out is None:
        return values.to(dtype)
    return out.copy_(values)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """``values`` (rows of whole 256-value blocks) as Q6_K bytes, ggml's layout: per block 128 bytes
    of low 4 bits, 64 of high 2 bits, 16 int8 scales (one per 16 values) and one float16 factor.

    Each 16 values' scale is its largest magnitude over 32 (6-bit values run -32..31), the scales
    share the block's factor (the largest over 127); values round to the nearest step. Simpler
    than llama.cpp's search for the best scale, so its error is a little larger; the layout is the
    one every reader decodes.
    """
    x = np.asarray(values, dtype=np.float32)
    if x.shape[-1] % 256:
        raise UserError(f"Q6_K needs rows of whole 256-value blocks, not {x.shape[-1]} values.")
    blocks = x.reshape(-1, 256)
    n = blocks.shape[0]
    groups = blocks.reshape(n, 16, 16)
    amax = np.abs(groups).max(axis=-1)
    step = amax / 32  # per 16 values
    d = (np.abs(step).max(axis=-1) / 127).astype(np.float16)
    df = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df[:, None] > 0, np.round(step / df[:, None]), 0).clip(-128, 127).astype(np.int8)
        unit = df[:, None] * sc.astype(np.float32)
        q = np.where(unit[:, :, None] > 0, np.round(groups / unit[:, :, None]), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # per half: 4 groups of 32
    ql = (q[:, :, 0:2, :] & 0x0F) | ((q[:, :, 2:4, :] & 0x0F) << 4)  # low nibbles: groups 0,1 | 2,3
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8),
                           d.reshape(n, 1).view(np.uint8)], axis=1).reshape(*x.shape[:-1], -1)


# --------------------------------------------------------------------------- writing Q8_0 and Q4_0 fast


def _half_away(v: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, as ggml's ``roundf`` (torch.round goes half to even)."""
    a = v.abs()
    whole = a.floor()
    return (whole + (2 * (a - whole)).floor()) * v.sign()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = _half_away(blocks * inv).to(torch.int8).view(torch.uint8)
    return torch.cat([d.to(torch.float16).view(torch.uint8), qs], dim=1)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    biggest = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # signed: the first largest magnitude
    d = biggest / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = (blocks * inv + 8.5).trunc().clamp(0, 15).to(torch.uint8).view(-1, 2, 16)
    return torch.cat([d.to(torch.float16).view(torch.uint8), q[:, 0] | (q[:, 1] << 4)], dim=1)


_QUANTIZE = {"Q8_0": _q8_0, "Q4_0": _q4_0}
#: rows of blocks quantized at a time: bounds the float32 temporaries (~40 MiB each)
_CHUNK_BLOCKS = 2**18


def quantize(values: torch.Tensor, qtype: str) -> torch.Tensor:
    """``values`` (rows of whole 32-value blocks, any float dtype, any device) as ``qtype`` bytes
    (``Q8_0`` or ``Q4_0``): uint8 rows on the same device, the bytes ``gguf.quants.quantize`` writes
    (the same float32 steps, ggml's rounding), with torch's threads (or the GPU) instead of numpy's one."""
    if qtype not in _QUANTIZE:
        raise UserError(f"{qtype} is written by gguf's own quantizer here; this one writes {', '.join(_QUANTIZE)}.")
    t = TYPES[qtype]
    shape = values.shape
    t.row_bytes(shape[-1])  # whole blocks, or a UserError
    blocks = values.reshape(-1, t.block)
    out = torch.empty(blocks.shape[0], t.nbytes, dtype=torch.uint8, device=values.device)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        part = blocks[start:start + _CHUNK_BLOCKS].to(torch.float32)
        out[start:start + _CHUNK_BLOCKS] = _QUANTIZE[qtype](part)
    return out.reshape(*shape[:-1], shape[-1] // t.block * t.nbytes)
