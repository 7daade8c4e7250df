"""GGUF's tensor types decoded in torch against the gguf package's own reference, and the headers of
GGUF and safetensors files read (or refused) without reading a weight."""

import json
import struct

import numpy as np
import pytest
import torch

from helpers.errors import UserError
from helpers.formats import quants
from helpers.formats.quants import TYPES, dequantize, quant_type, quantize, quantize_q6_k
from helpers.formats.sources import read_weights_file

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as reference  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

#: where each block type keeps its float16 factors (random bytes there could be inf or NaN)
FACTORS = {"Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
           "Q6_K": [208]}


@pytest.mark.parametrize("name", sorted(FACTORS))
def test_every_block_type_decodes_to_the_reference_values(name, monkeypatch):
    """Random blocks (every bit pattern of the quants, finite factors): the same float32 values as
    gguf's numpy reference, bit for bit, and bf16 those rounded once (also decoded into a bf16 ``out``
    slice by slice through the float32 scratch, here of 2 blocks, so 15 blocks take 8 slices)."""
    t, rng = TYPES[name], np.random.default_rng(len(name))
    rows, cols = 5, 3 * t.block
    raw = rng.integers(0, 256, (rows, cols // t.block, t.nbytes), dtype=np.uint8)
    for at in FACTORS[name]:
        raw[..., at:at + 2] = rng.normal(size=raw.shape[:2]).astype(np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    raw = raw.reshape(rows, -1)
    expected = reference(raw, gguf.GGMLQuantizationType[name])
    ours = dequantize(torch.from_numpy(raw.copy()), name, (rows, cols))
    assert ours.dtype == torch.float32 and np.array_equal(ours.numpy(), expected)
    assert torch.equal(dequantize(torch.from_numpy(raw.copy()), name, (rows, cols), torch.bfloat16),
                       torch.from_numpy(expected).to(torch.bfloat16))
    out = torch.full((rows, cols), float("nan"))  # decoded straight into it (Q8_0, Q4_0) or copied: the same bits
    assert dequantize(torch.from_numpy(raw.copy()), t, (rows, cols), out=out) is out
    assert np.array_equal(out.numpy(), expected)
    monkeypatch.setattr(quants, "_SCRATCH_VALUES", 2 * t.block)
    for dtype in (torch.bfloat16, torch.float32):
        out = torch.full((rows, cols), float("nan"), dtype=dtype)
        assert dequantize(torch.from_numpy(raw.copy()), t, (rows, cols), out=out) is out
        assert torch.equal(out, torch.from_numpy(expected).to(dtype))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0"])
def test_torch_writes_the_bytes_gguf_writes(name, monkeypatch):
    """Q8_0 and Q4_0 written with torch's ops: gguf's quantizer's bytes exactly, ties, zero blocks,
    a negative largest value, halves and bf16 input included; chunked the same as whole."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 4
    x[0, :32] = 0  # a zero block
    x[1, :32] = 1.0  # every value the largest: the first one is the block's
    x[2, 7] = -x[2, :32].abs().max() - 1  # the largest magnitude negative
    x[3, :32] = torch.arange(32) / 2 - 8  # values on the halves: ggml rounds them away from zero
    x[4, :32] = torch.arange(32) * 127 / 31  # whole steps of a Q8_0 factor
    for values in (x, x.to(torch.bfloat16)):
        want = gguf_quantize(values.float().numpy(), gguf.GGMLQuantizationType[name])
        got = quantize(values, name)
        assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), want)
    monkeypatch.setattr("helpers.formats.quants._CHUNK_BLOCKS", 7)  # chunks that end mid-row
    assert np.array_equal(quantize(x, name).numpy(), gguf_quantize(x.numpy(), gguf.GGMLQuantizationType[name]))
    with pytest.raises(UserError, match="whole"):
        quantize(torch.zeros(2, 40), name)
    with pytest.raises(UserError, match="gguf's own quantizer"):
        quantize(x, "Q5_0")


def test_plain_types_and_wrong_sizes():
    x = torch.randn(4, 8).to(torch.bfloat16)
    assert torch.equal(dequantize(x.view(torch.uint8).reshape(-1), "BF16", (4, 8)), x.float())
    with pytest.raises(ValueError, match="takes 64 bytes, not 63"):
        dequantize(torch.zeros(63, dtype=torch.uint8), "BF16", (4, 8))


def test_gguf_written_quants_keep_their_measured_error():
    """Q8_0 and Q4_0 written by gguf, Q6_K by this project: each one's error on a normal weight sits
    where its bits put it (8.5, 6.56, 4.5 bits a value)."""
    x = np.random.default_rng(0).normal(size=(16, 512)).astype(np.float32)
    errors = {}
    for name in ("Q8_0", "Q4_0"):
        q = gguf_quantize(x, gguf.GGMLQuantizationType[name])
        errors[name] = np.linalg.norm(dequantize(torch.from_numpy(q), name, x.shape).numpy() - x) / np.linalg.norm(x)
    q = quantize_q6_k(x)
    assert q.shape == (16, 2 * TYPES["Q6_K"].nbytes)
    back = reference(q, gguf.GGMLQuantizationType.Q6_K)  # the reference reads what we wrote
    assert np.array_equal(dequantize(torch.from_numpy(q), "Q6_K", x.shape).numpy(), back)
    errors["Q6_K"] = np.linalg.norm(back - x) / np.linalg.norm(x)
    assert errors["Q8_0"] < 0.01 < errors["Q6_K"] < 0.03 < errors["Q4_0"] < 0.1, errors
    assert np.all(reference(quantize_q6_k(np.zeros((1, 256))), gguf.GGMLQuantizationType.Q6_K) == 0)  # no 0/0
    with pytest.raises(UserError, match="whole 256-value blocks"):
        quantize_q6_k(np.zeros((2, 100)))


def test_types_not_read_are_named():
    with pytest.raises(UserError, match="type IQ2_XXS cannot be read here.*Q8_0"):
        quant_type(16)
    assert quant_type(10).name == "Q2_K" and quant_type(11).name == "Q3_K"  # FLUX.1's 2- and 3-bit files
    with pytest.raises(UserError, match="not whole Q4_K blocks of 256"):
        TYPES["Q4_K"].row_bytes(320)
    assert TYPES["Q8_0"].bits == 8.5 and TYPES["Q4_0"].bits == 4.5


def _write_gguf(path, tensors: dict):
    w = gguf.GGUFWriter(path, "flux")
    for name, (array, kind) in tensors.items():
        w.add_tensor(name, array, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_header_gives_every_tensor_and_its_bytes(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 64)).astype(np.float32)
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = tmp_path / "t.gguf"
    _write_gguf(path, {"x.weight": (gguf_quantize(a, q8), q8), "x.bias": (a[0], None),
                       "y.weight": (a.astype(np.float16), None)})
    f = read_weights_file(path)
    assert f.format == "gguf" and f.types() == {"Q8_0": 1, "F32": 1, "F16": 1}
    e = f.tensors["x.weight"]
    assert (e.dtype, e.shape, e.nbytes) == ("Q8_0", (6, 64), 6 * 2 * 34)
    raw = path.read_bytes()
    whole = dequantize(torch.frombuffer(bytearray(raw[e.offset:e.offset + e.nbytes]), dtype=torch.uint8), e.dtype, e.shape)
    assert np.array_equal(whole.numpy(), reference(gguf_quantize(a, q8), q8))
    at, n = e.rows(2, 5)  # a range of rows is a range of bytes
    part = dequantize(torch.frombuffer(bytearray(raw[at:at + n]), dtype=torch.uint8), e.dtype, (3, 64))
    assert torch.equal(part, whole[2:5])
    b = f.tensors["x.bias"]
    assert np.array_equal(np.frombuffer(raw[b.offset:b.offset + b.nbytes], dtype=np.float32), a[0])


def test_damaged_files_are_refused_from_their_header(tmp_path):
    a = np.ones((2, 32), dtype=np.float32)
    good = tmp_path / "good.gguf"
    _write_gguf(good, {"w": (a, None)})
    raw = good.read_bytes()
    cases = {
        "cut.gguf": (raw[:-8], "ends at byte .* but tensor w runs to byte .*cut short"),
        "header.gguf": (raw[:40], "ends inside its GGUF header.*cut short"),
        "named.gguf": (b"PK\x03\x04" + raw[4:], "named .gguf but is not a GGUF file"),
        "v9.gguf": (raw[:4] + struct.pack("<I", 9) + raw[8:], "GGUF version 9; versions 2 and 3"),
        "text.safetensors": (b"hello world, not weights", "not a safetensors file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=message):
            read_weights_file(tmp_path / name)
    # a type this project does not read, named: IQ2_XXS (16) in place of F32 (0)
    at = raw.index(b"w", 24) + 1 + 4 + 2 * 8  # name, n_dims, two dims
    assert struct.unpack("<I", raw[at:at + 4])[0] == 0
    (tmp_path / "iq2.gguf").write_bytes(raw[:at] + struct.pack("<I", 16) + raw[at + 4:])
    with pytest.raises(UserError, match="IQ2_XXS cannot be read here"):
        read_weights_file(tmp_path / "iq2.gguf")
    with pytest.raises(UserError, match="no transformer's .gguf or .safetensors file at .*missing.gguf"):
        read_weights_file(tmp_path / "missing.gguf")
    with pytest.raises(UserError, match="is a folder, not a transformer's .gguf or .safetensors file"):
        read_weights_file(tmp_path)


def test_a_single_safetensors_header_and_its_refusals(tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(4, 8).to(torch.float8_e4m3fn)
    path = tmp_path / "one.safetensors"
    save_file({"a.weight": x, "a.weight_scale": torch.ones(4)}, str(path), metadata={"format": "pt"})
    f = read_weights_file(path)
    assert f.format == "safetensors" and f.metadata == {"format": "pt"}
    e = f.tensors["a.weight"]
    assert (e.dtype, e.shape, e.nbytes) == ("F8_E4M3", (4, 8), 32)
    assert path.read_bytes()[e.offset:e.offset + e.nbytes] == x.view(torch.uint8).numpy().tobytes()
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-4])
    with pytest.raises(UserError, match="cut short"):
        read_weights_file(tmp_path / "cut.safetensors")
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["a.weight"]["data_offsets"][1] -= 1
    text = json.dumps(header).encode()
    (tmp_path / "lie.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(UserError, match="takes 32 bytes, its header gives it 31"):
        read_weights_file(tmp_path / "lie.safetensors")
