"""How a weight as a tier holds it becomes the numbers a layer computes with.

A weight is held in its *stored* form (what a file gives and what a stream moves: bf16, fp8 with a
float32 scale per row, GGUF blocks as bytes) and decoded into the *compute* dtype just before its
layer runs (:func:`helpers.offload.upcast.upcast_layerwise`), or, on a GPU, as it arrives on the copy
stream (:mod:`helpers.offload.streamers`). A :class:`Codec` is one such rule:

- :class:`Widen`: a plain float in another dtype (bf16 -> float32 is exact);
- :class:`ScaledFp8`: fp8 e4m3fn times its row's scale, held beside it as ``<name>_scale``
  (this project's fp8, ``python -m helpers convert --weights fp8``, and scaled single files);
- :class:`GgufBlocks`: GGUF blocks held as rows of bytes, their type's number beside them as
  ``<name>_gguf`` (:mod:`helpers.formats.quants` decodes them).

:func:`codec_for` finds the rule of one tensor from what its module holds beside it, asking each
codec of :data:`CODECS` in turn: a new stored form is a new codec in that list, not a new branch in
every loader.
"""

from __future__ import annotations

import torch

from helpers.formats.quants import BY_ID, QuantType, dequantize

#: e4m3fn's largest finite value: each row's largest weight is scaled to it
FP8_MAX = 448.0
#: the buffer beside a weight held as GGUF blocks: ``<name>_gguf``, its type's number (helpers.formats.quants)
GGUF_SUFFIX = "_gguf"
#: the buffer beside an fp8 weight: ``<name>_scale``, a float32 per row
SCALE_SUFFIX = "_scale"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fp8 weight, float32 scale per row)``: each row divided by its largest magnitude / 448."""
    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None):
    """The weight in ``dtype`` from its fp8 values and row scales: each value times its row's scale,
    both in ``dtype``, rounded once. The definition every path gives bit for bit (see :func:`decode_into`).
    With ``out``, written there without a temporary the size of the weight (every e4m3 value is
    exact in bf16, fp16 and float32, so the cast first and the product in place round once, the same)."""
    if out is None:
        return torch.mul(q.to(dtype), scale.to(dtype)[:, None])
    return out.copy_(q).mul_(scale.to(dtype)[:, None])


#: 2**120: an e4m3 value's bits moved into a float32's place read as 2**-120 times the value
_E4M3_SHIFT = 2.0 ** 120


#: how an e4m3fn byte, sign-extended into the integer view of each output dtype, lands in its place: the
#: left shift that puts its exponent's low bits on the dtype's, and the mask that keeps the sign and 7 bits
_E4M3_PLACE = {torch.float32: (torch.int32, 20, -0x78100000),  # 0x87F00000
               torch.bfloat16: (torch.int16, 4, -0x7810)}  # 0x87F0


def _e4m3_bits(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> bool:
    """fp8 e4m3fn -> float32 or bfloat16 times the row scales, by moving bits: a memory pass instead of
    torch's fp8 conversion on a CPU (float32: about 4x faster; bfloat16: about 26x, 1.5 ms against 40 ms
    for a 3072x3072 weight on a CPU with native bf16), and the same bits as :func:`dequantize_rows`.

    An e4m3fn byte is sign, 4 exponent bits (bias 7), 3 mantissa bits. Shifted left (by 20 into a
    float32, by 4 into a bfloat16: both have float32's 8 exponent bits), the sign kept in the top bit, it
    reads as the value times 2**-120, exactly, subnormals included (they land on the dtype's subnormals);
    times ``scale * 2**120`` (in the output dtype, as the formula rounds the scale) it is the value times
    the scale, rounded once, as :func:`dequantize_rows` rounds it. e4m3fn's NaN (0x7F, 0xFF) would read
    as 480: a quantized weight never holds it. ``False`` (nothing written, the caller falls back to the
    formula) for another dtype, where a scale times 2**120 would not be finite (rows past 2**7 in
    magnitude: not weights), and where this thread flushes subnormals to zero (a library built with
    fast-math can set that), which would zero e4m3's subnormals here and not in torch's cast.
    """
    place = _E4M3_PLACE.get(out.dtype)
    if place is None or q.dim() != 2 or scale.dtype != torch.float32:
        return False
    factors = _row_factors(scale, out.dtype)
    if factors is None or bool(_TINY.mul(1.0).eq(0)):
        return False
    view, shift, mask = place
    bits = out.view(view)
    bits.copy_(q.view(torch.int8))  # sign-extended
    bits.bitwise_left_shift_(shift).bitwise_and_(mask)
    out.mul_(factors)
    return True


#: a float32 subnormal: a product of it that reads zero says this thread flushes subnormals
_TINY = torch.tensor(1e-39)


def _row_factors(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``scale * 2**120`` rounded as the formula rounds the scale, ``[rows, 1]`` in ``dtype``; ``None``
    where a row's scale is past the trick's range. Kept on the scale tensor for its next decode (the
    same layer's, every step), until that tensor changes (its version counter) or another dtype asks:
    working it out again cost about as much as moving a small layer's bits."""
    try:
        key = (dtype, scale._version, scale.device, scale.data_ptr())
    except RuntimeError:  # an inference-mode tensor keeps no version: worked out each time
        key = None
    kept = getattr(scale, "_e4m3_factors", None)
    if key is not None and kept is not None and kept[0] == key:
        return kept[1]
    factors = None
    if bool((scale.abs() < 2.0 ** 7).all()):
        factors = (scale.to(dtype).to(torch.float32) * _E4M3_SHIFT).to(dtype)[:, None]
    if key is not None:
        scale._e4m3_factors = (key, factors)
    return factors


def gguf_shape(stored_shape, qtype: QuantType) -> tuple[int, ...]:
    """The values' shape of a weight held as GGUF bytes of ``stored_shape`` (rows x row bytes)."""
    *rows, row_bytes = stored_shape
    return (*rows, row_bytes // qtype.nbytes * qtype.block)


class Codec:
    """One stored form's way to the compute dtype: the values' shape, and their decoding into a
    tensor of that shape (in ``out``'s dtype, on ``out``'s device, with torch's ops)."""

    def shape(self, stored_shape) -> tuple[int, ...]:
        return tuple(stored_shape)

    def decode(self, stored: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def of(cls, owner: torch.nn.Module, name: str, stored: torch.dtype, dtype: torch.dtype) -> "Codec | None":
        """This codec for tensor ``name`` of ``owner`` stored as ``stored`` and computed in ``dtype``,
        or ``None`` where it is not this codec's form."""
        raise NotImplementedError


class Widen(Codec):
    """A float stored in another dtype than the math's: copied across (bf16 -> float32 is exact)."""

    def decode(self, stored, out):
        return out.copy_(stored)

    @classmethod
    def of(cls, owner, name, stored, dtype):
        return cls() if stored.is_floating_point and stored != dtype else None


class ScaledFp8(Codec):
    """fp8 e4m3fn with a float32 scale per row: :func:`dequantize_rows`, on a CPU into float32 or
    bfloat16 by moving bits (:func:`_e4m3_bits`, the same bits)."""

    def __init__(self, scale: torch.Tensor) -> None:
        self.scale = scale

    def decode(self, stored, out):
        if out.device.type == "cpu" and _e4m3_bits(stored, self.scale, out):
            return out
        return dequantize_rows(stored, self.scale, out.dtype, out=out)

    @classmethod
    def of(cls, owner, name, stored, dtype):
        scale = owner._buffers.get(f"{name}{SCALE_SUFFIX}")
        return cls(scale) if stored == torch.float8_e4m3fn and scale is not None else None


class GgufBlocks(Codec):
    """GGUF blocks held as rows of bytes (:func:`helpers.formats.quants.dequantize`)."""

    def __init__(self, qtype: QuantType | None) -> None:
        self.qtype = qtype  # None: not known yet (see :meth:`of`); a layer's hook asks again when it runs

    def shape(self, stored_shape):
        return gguf_shape(stored_shape, self.qtype)

    def decode(self, stored, out):
        return dequantize(stored, self.qtype, out.shape, out=out)

    @classmethod
    def of(cls, owner, name, stored, dtype):
        kind = owner._buffers.get(f"{name}{GGUF_SUFFIX}")
        if kind is None:
            return None
        if kind.device.type == "meta":  # offloaded with its weight (accelerate): its type arrives with it
            return cls(None)
        return cls(BY_ID[int(kind)])


#: asked in this order: the forms with their own record beside the weight first
CODECS: tuple[type[Codec], ...] = (GgufBlocks, ScaledFp8, Widen)


def codec_for(owner: torch.nn.Module, name: str, stored: torch.dtype, dtype: torch.dtype) -> Codec | None:
    """How tensor ``name`` of ``owner``, held as ``stored``, becomes ``dtype``; ``None``: it is
    used as it is (already ``dtype``, or not a float)."""
    for codec in CODECS:
        found = codec.of(owner, name, stored, dtype)
        if found is not None:
            return found
    return None


def decode_into(stored: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``stored`` (a plain float, or fp8 with its row ``scale``) written into ``out`` in ``out``'s
    dtype: :class:`ScaledFp8` or :class:`Widen`, the rules the layer hooks and the stream use."""
    if scale is not None and stored.dtype == torch.float8_e4m3fn:
        return ScaledFp8(scale).decode(stored, out)
    return Widen().decode(stored, out)
