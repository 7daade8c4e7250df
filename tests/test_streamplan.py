"""The stream's three rooms: the plan decided from an index alone, the weights sources, the codecs."""

import dataclasses
from pathlib import Path

import pytest
import torch

from helpers.formats import codecs
from helpers.formats.codecs import GgufBlocks, ScaledFp8, Widen, codec_for
from helpers.offload.streamers import load_streaming, skeleton_from_folder
from helpers.formats.sources import CheckpointFolder, WeightsSource
from helpers.offload.plan import StreamBudgetError, plan_stream, trace_parts

BLOCKS = ["transformer_blocks", "single_transformer_blocks"]


def _plan(folder: Path, source: WeightsSource, cpu_bytes: int, **kw):
    from diffusers import FluxTransformer2DModel

    model = skeleton_from_folder(folder, FluxTransformer2DModel)
    for t in model.parameters():
        t.data = t.data.to(torch.bfloat16)
    names = [f"{lst}.{i}" for lst in BLOCKS for i in range(len(model.get_submodule(lst)))]
    parts = trace_parts(model, names, torch.bfloat16)
    source.dress(model)
    return plan_stream(model, BLOCKS, parts, source, cpu_bytes, torch.device("cpu"), **kw)


class _Elsewhere(WeightsSource):
    """A folder's index pointing at files that do not exist: any read fails."""

    def __init__(self, folder: Path) -> None:
        self.inner = CheckpointFolder(folder)
        self.index = {k: (Path("/nonexistent") / e[0].name, *e[1:]) for k, e in self.inner.index.items()}

    @property
    def where(self) -> str:
        return "nowhere"


def test_the_plan_reads_no_weight_and_says_what_loading_reads(tiny_folder):
    """The same plan from an index whose files are gone: deciding reads no byte of a weight. What it
    keeps and streams adds up to the checkpoint, and its budget errors come before any read."""
    folder = tiny_folder / "transformer"
    here = CheckpointFolder(folder)
    whole = sum(here.bytes_of(k) for k in here.index)
    plan = _plan(folder, here, whole // 3)
    gone = _plan(folder, _Elsewhere(folder), whole // 3)
    assert (gone.resident, gone.pieces, gone.pool, gone.keys) == (plan.resident, plan.pieces, plan.pool, plan.keys)
    assert plan.pieces and plan.resident and not plan.kept  # in RAM: no parts kept
    streamed = {k for k in here.index if any(k.startswith(u + ".") for u in plan.pieces)}
    assert plan.read_bytes(here, on_gpu=False) + sum(here.bytes_of(k) for k in streamed) == whole
    assert plan.pool_bytes >= plan.pool * max(plan.blocks[u].read_nbytes for u in plan.pieces)
    with pytest.raises(StreamBudgetError, match="give it at least"):
        _plan(folder, _Elsewhere(folder), whole // 50)


def test_loading_reads_the_resident_weights_through_its_source(tiny_folder):
    """The loader reads through its source and nothing else: a source that counts its reads sees
    every resident weight once and no tensor of a streamed piece, and the output is the folder's."""
    from diffusers import FluxTransformer2DModel

    folder = tiny_folder / "transformer"

    class Counted(CheckpointFolder):
        def read(self, key):
            self.reads.append(key)
            return super().read(key)

    source = Counted(folder)
    source.reads = []
    whole = sum(source.bytes_of(k) for k in source.index)
    model, streamer = load_streaming(folder, FluxTransformer2DModel, torch.bfloat16, whole // 3, BLOCKS, source=source)
    plain, plain_streamer = load_streaming(folder, FluxTransformer2DModel, torch.bfloat16, whole // 3, BLOCKS)
    try:
        g = torch.Generator().manual_seed(0)
        inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=g).bfloat16(),
                      encoder_hidden_states=torch.randn(1, 8, 32, generator=g).bfloat16(),
                      pooled_projections=torch.randn(1, 32, generator=g).bfloat16(),
                      timestep=torch.tensor([0.5]).bfloat16(), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                      guidance=torch.tensor([3.5]), return_dict=False)
        with torch.no_grad():
            assert torch.equal(model(**inputs)[0], plain(**inputs)[0])
        pieces = [b.name for b in streamer.blocks]
        assert pieces and len(source.reads) == len(set(source.reads))
        assert not [k for k in source.reads if any(k.startswith(u + ".") for u in pieces)]
        assert {n for n, p in model.named_parameters() if p.device.type == "cpu"} <= set(source.reads)
    finally:
        streamer.close()
        plain_streamer.close()


def test_each_stored_form_finds_its_codec():
    """GGUF bytes, fp8 with row scales, a float in another dtype, and nothing where nothing decodes."""
    from helpers.formats.quants import TYPES, dequantize

    layer = torch.nn.Linear(64, 8, bias=True)
    w = torch.randn(8, 64)
    q, scale = codecs.quantize_rows(w)
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.register_buffer("weight_scale", scale)
    found = codec_for(layer, "weight", q.dtype, torch.float32)
    assert isinstance(found, ScaledFp8)
    assert torch.equal(found.decode(q, torch.empty(8, 64)), codecs.dequantize_rows(q, scale, torch.float32))
    assert isinstance(codec_for(layer, "bias", torch.bfloat16, torch.float32), Widen)
    assert codec_for(layer, "bias", torch.float32, torch.float32) is None

    gguf = torch.nn.Linear(64, 8, bias=False)
    raw = torch.randint(0, 256, (8, 2 * 34), dtype=torch.uint8)
    raw.view(-1, 34)[:, :2] = torch.tensor([0, 0x3C], dtype=torch.uint8)  # every block's factor: 1.0 in fp16
    gguf.weight = torch.nn.Parameter(raw, requires_grad=False)
    gguf.register_buffer("weight_gguf", torch.tensor(TYPES["Q8_0"].id, dtype=torch.int32))
    found = codec_for(gguf, "weight", torch.uint8, torch.float32)
    assert isinstance(found, GgufBlocks) and found.shape(raw.shape) == (8, 64)
    assert torch.equal(found.decode(raw, torch.empty(8, 64)), dequantize(raw, "Q8_0", (8, 64)))


@dataclasses.dataclass
class _Int8Rows(codecs.Codec):
    """A form this project does not have: int8 with a float scale per row (``<name>_rowscale``)."""

    scale: torch.Tensor

    def decode(self, stored, out):
        return out.copy_(stored).mul_(self.scale.to(out.dtype)[:, None])

    @classmethod
    def of(cls, owner, name, stored, dtype):
        scale = owner._buffers.get(f"{name}_rowscale")
        return cls(scale) if stored == torch.int8 and scale is not None else None


def test_a_new_stored_form_is_a_new_codec(monkeypatch):
    """Adding a codec to the list is all the layer hooks need to compute from a new form."""
    from helpers.offload.upcast import upcast_layerwise

    monkeypatch.setattr(codecs, "CODECS", (_Int8Rows, *codecs.CODECS))
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 4)
    q = torch.randint(-127, 128, (4, 32), dtype=torch.int8)
    scale = torch.rand(4) / 100
    reference = q.float() * scale[:, None]
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.register_buffer("weight_rowscale", scale)
    assert upcast_layerwise(layer, torch.float32) == 1
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, reference, layer.bias))
    assert layer.weight.dtype == torch.int8  # stored as it was, between calls


@pytest.mark.parametrize("model", ["tiny", pytest.param("flux-dev", marks=pytest.mark.slow)])
def test_a_trace_of_two_blocks_of_each_list_is_the_trace_of_all_of_them(model):
    """What makes a trace quick (about 10x): from the second block of a list on, each calls its parts
    in the second's order; traced once per process after that, and handed out as copies."""
    from helpers.activations import example_inputs
    from helpers.footprint import footprint
    from helpers.offload.plan import _TRACES, split_blocks

    fp = footprint(model, components=("text_encoder_2", "transformer"))
    for component, lists in (("transformer", BLOCKS), ("text_encoder_2", ["encoder.block"])):
        module = fp.skeletons[component]
        names = [f"{lst}.{i}" for lst in lists for i in range(len(module.get_submodule(lst)))]
        every = split_blocks(module, names, example_inputs(component, module, torch.float32, 32, 32, 8)[1])
        _TRACES.clear()
        quick = trace_parts(module, names, torch.float32)
        assert quick == every and list(quick) == names
        assert len(module.get_submodule(lists[0])) > 2  # every block is back
        assert len({tuple(p) for p in every.values()}) > 2  # the parts differ per block and per list
        quick[names[0]].append("changed")
        assert trace_parts(module, names, torch.float32) == every  # a copy, not the cached lists
