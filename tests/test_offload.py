import copy

import numpy as np
import pytest
import torch
from PIL import Image

import commands

from helpers.errors import UserError
from helpers.offload.streamers import load_streaming
from helpers.formats.sources import read_safetensors_index

BLOCKS = ["transformer_blocks", "single_transformer_blocks"]


@pytest.fixture(scope="module")
def resident(tiny_folder):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_folder / "transformer", dtype=torch.bfloat16).eval()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g).bfloat16(),
                pooled_projections=torch.randn(1, 32, generator=g).bfloat16(), timestep=torch.tensor([0.5]).bfloat16(),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)


def _inputs_in(dtype, seed=0):
    """:func:`_inputs` with its floating tensors in ``dtype`` (the same values: drawn in bf16)."""
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in _inputs(seed).items()}


def _bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_index_reads_headers_only(tiny_folder):
    index = read_safetensors_index(tiny_folder / "transformer")
    path, offset, nbytes, dtype, shape = index["transformer_blocks.0.attn.to_q.weight"]
    assert path.suffix == ".safetensors" and dtype == "BF16" and nbytes == 2 * shape[0] * shape[1] and offset > 8


@pytest.mark.parametrize("share", [0.3, pytest.param(0.6, marks=pytest.mark.slow)])
def test_streamed_output_equals_resident(tiny_folder, resident, share):
    budget = int(_bytes(resident) * share)
    model, streamer = load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, budget, BLOCKS)
    try:
        with torch.no_grad():
            for seed in (0, 1, 2):  # several calls: the reader cycles through the blocks again
                expected = resident(**_inputs(seed))[0]
                got = model(**_inputs(seed))[0]
                assert torch.equal(expected, got)  # tolerance: none, bit for bit
        assert streamer is not None and len(streamer.blocks) > 0
        # resident blocks: spread over the double blocks (the larger), then over the single blocks
        streamed = set(streamer.streamed_blocks)
        assert all(b.name.rpartition(".")[0] in streamed for b in streamer.blocks)  # streamed in parts
        # in RAM the room whole blocks leave is the activations': no part of a streamed block is resident
        assert not any(p.device.type == "cpu" for b in streamed for p in model.get_submodule(b).parameters())
        double, single = ([f"{lst}.{i}" for i in range(len(model.get_submodule(lst)))] for lst in BLOCKS)
        kept_double, kept_single = [n for n in double if n not in streamed], [n for n in single if n not in streamed]
        assert kept_double and (kept_double == double or not kept_single)
        for names, kept in ((double, kept_double), (single, kept_single)):
            assert kept == names or names[0] not in kept  # not the first ones
        # the RAM tier: resident weights + the pool stay within the budget
        resident_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
        assert resident_bytes + sum(b.numel() for b in streamer.buffers) <= budget
        assert streamer.bytes_read >= 3 * sum(b.nbytes for b in streamer.blocks) * 0.9
    finally:
        if streamer:
            streamer.close()


def test_everything_resident_when_it_fits(tiny_folder, resident):
    model, streamer = load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16,
                                     2 * _bytes(resident), BLOCKS)
    assert streamer is None
    with torch.no_grad():
        assert torch.equal(resident(**_inputs())[0], model(**_inputs())[0])


def test_room_kept_for_activations_comes_off_the_resident_blocks(tiny_folder, resident):
    budget = int(_bytes(resident) * 0.6)
    whole = load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, budget, BLOCKS)[1]
    kept = load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, budget, BLOCKS,
                          reserve=int(_bytes(resident) * 0.15))[1]
    try:
        assert len(kept.blocks) > len(whole.blocks)  # fewer blocks stay: their room is the activations'
    finally:
        whole.close(), kept.close()
    with pytest.raises(UserError, match=r"cannot hold .* and room for its activations \("):
        load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, budget, BLOCKS, reserve=budget)


def test_resident_blocks_are_spread_over_the_largest_blocks():
    """Not the first blocks: resident ones sit between streamed ones, where their compute covers the
    next fetch, and among the largest blocks first (their fetches take longest)."""
    from helpers.offload.plan import _choose_resident

    big, small = [f"d{i}" for i in range(10)], [f"s{i}" for i in range(20)]
    size = {**{n: 10 for n in big}, **{n: 4 for n in small}}
    zero = dict.fromkeys(size, 0)
    # room for 4 large blocks next to a pool of two large buffers
    chosen = _choose_resident([small, big], size, size, zero, room=4 * 10 + 2 * 10, pool=2)
    assert chosen == {"d1", "d3", "d6", "d8"}  # evenly spaced: never two in a row, nor the first ones
    # the pool shrinks to two small buffers once no large block streams: 10 large blocks fit in 108
    # (100 + 2 x 4) where 9 did not (90 + 2 x 10)
    assert _choose_resident([big, small], size, size, zero, room=108, pool=2) == set(big)
    assert _choose_resident([big, small], size, size, zero, room=107, pool=2) == set(big) - {"d2", "d7"}
    # then the smaller blocks, spread the same way
    assert _choose_resident([big, small], size, size, zero, room=116, pool=2) == set(big) | {"s5", "s15"}
    assert _choose_resident([big, small], size, size, zero, room=2 * 10, pool=2) == set()


def test_blocks_stream_in_their_parts_in_the_order_a_forward_calls_them():
    from helpers.activations import example_inputs
    from helpers.architecture import skeleton
    from helpers.models import component_configs
    from helpers.offload.plan import split_blocks

    _, configs = component_configs("tiny")
    flux = skeleton("transformer", configs["transformer"])
    names = ["transformer_blocks.0", "single_transformer_blocks.0"]
    parts = split_blocks(flux, names, example_inputs("transformer", flux, torch.float32, 32, 32, 8)[1])
    assert parts["transformer_blocks.0"] == [f"transformer_blocks.0.{p}" for p in
                                             ("norm1", "norm1_context", "attn", "ff", "ff_context")]
    # declared norm, proj_mlp, proj_out, attn; called norm, proj_mlp, attn, proj_out
    assert [n for n, _ in flux.single_transformer_blocks[0].named_children() if n in ("attn", "proj_out")] == [
        "proj_out", "attn"]
    assert parts["single_transformer_blocks.0"] == [f"single_transformer_blocks.0.{p}" for p in
                                                    ("norm", "proj_mlp", "attn", "proj_out")]
    t5 = skeleton("text_encoder_2", configs["text_encoder_2"])
    parts = split_blocks(t5, ["encoder.block.0"], example_inputs("text_encoder_2", t5, torch.float32, tokens=8)[1])
    assert parts == {"encoder.block.0": ["encoder.block.0.layer.0", "encoder.block.0.layer.1"]}  # inside a ModuleList
    assert split_blocks(t5, ["encoder.block.0"], None) == {"encoder.block.0": ["encoder.block.0"]}


class _Toy(torch.nn.Module):
    """Blocks of two parts: block 1 reads its part's weight itself, block 2 calls a part twice, block 3
    reads a part's transpose (a property, but a use of the values), block 4 only its dtype."""

    def __init__(self, interleave=False):
        super().__init__()
        self.interleave = interleave
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
                                          for _ in range(5))

    def forward(self, x):
        if self.interleave:  # block 0's second part after block 1's first: no block can stream alone
            return self.blocks[0][1](self.blocks[1][0](self.blocks[0][0](x)))
        x = self.blocks[0](x)
        x = self.blocks[1](x) + self.blocks[1][0].weight.sum()  # a use outside the part's own call
        x = self.blocks[2][1](self.blocks[2][1](self.blocks[2][0](x)))  # a part called twice
        x = self.blocks[3](x) @ self.blocks[3][1].weight.T
        return self.blocks[4](x.to(self.blocks[4][0].weight.dtype))


def test_a_block_whose_parts_cannot_stream_alone_stays_whole():
    from helpers.offload.plan import split_blocks

    with torch.device("meta"):
        toy, interleaved = _Toy(), _Toy(interleave=True)
    names = [f"blocks.{i}" for i in range(5)]
    parts = split_blocks(toy, names, {"x": torch.empty(2, 4, device="meta")})
    assert parts == {"blocks.0": ["blocks.0.0", "blocks.0.1"], "blocks.1": ["blocks.1"], "blocks.2": ["blocks.2"],
                     "blocks.3": ["blocks.3"], "blocks.4": ["blocks.4.0", "blocks.4.1"]}
    assert split_blocks(interleaved, names[:2], {"x": torch.empty(2, 4, device="meta")}) == {
        "blocks.0": ["blocks.0"], "blocks.1": ["blocks.1"]}
    with pytest.warns(UserWarning, match="streaming whole blocks: a forward on the meta device failed"):
        assert split_blocks(toy, names, {"x": torch.empty(2, 5, device="meta")}) == {n: [n] for n in names}


def test_pieces_run_out_of_the_traced_order_are_a_clear_error(tiny_folder, resident):
    from helpers.offload.streamers import HostStreamer

    model, disk = load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16,
                                 int(_bytes(resident) * 0.3), BLOCKS)
    names = [b.name for b in disk.blocks]
    disk.close()
    single = [n for n in names if n.startswith("single_transformer_blocks.") and n.endswith((".attn", ".proj_out"))]
    assert len(single) >= 2
    i, j = names.index(single[0]), names.index(single[1])  # declared order: proj_out before attn
    names[i], names[j] = names[j], names[i]
    streamer = HostStreamer(model, tiny_folder / "transformer", names, "cpu", dtype=torch.bfloat16)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError,
                                            match=r"streamer: expected .*proj_out next, the model ran .*attn"):
            model(**_inputs())
    finally:
        streamer.close()


def test_a_block_bigger_than_the_fast_tier_is_a_clear_error(tiny_folder, resident):
    with pytest.raises(UserError, match="larger than the whole cpu tier"):
        load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, 10_000, BLOCKS)
    with pytest.raises(UserError, match="the pool needs at least 2 buffers"):
        load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, 10**9, BLOCKS, pool=1)


@pytest.mark.slow
def test_diffuse_with_stream_gives_the_same_image(tmp_path):
    from helpers.diffuse import diffuse_file
    from helpers.encode import encode_prompts

    emb = encode_prompts("tiny", ["a red cat"], tmp_path / "e.safetensors", max_sequence_length=16).path
    args = dict(steps=2, seed=4, height=64, width=64, max_memory="cpu=50%,disk=100%", progress=False)
    a = diffuse_file(emb, tmp_path / "accelerate.png", offload="accelerate", **args)
    b = diffuse_file(emb, tmp_path / "stream.png", offload="stream", **args)
    assert np.array_equal(np.asarray(Image.open(a.paths[0])), np.asarray(Image.open(b.paths[0])))
    with pytest.raises(UserError, match="unknown offload"):
        diffuse_file(emb, tmp_path / "x.png", offload="magic", **args)


def _descendants() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_bench_json_shape_and_equal_outputs(tmp_path):
    from helpers.bench import rows, run, title

    partial, before = [], _descendants()
    data = run("tiny", "cpu=50%,disk=100%", steps=1, strategies=["resident", "accelerate", "stream"],
               progress=lambda _: None, on_result=partial.append, image=False)
    assert _descendants() <= before  # the strategies' processes and their server are gone
    # a report after each strategy but the last, so a run stopped midway keeps what it measured
    assert [len(p["results"]) for p in partial] == [1, 2, 3] and not any(p["complete"] for p in partial)
    assert partial[1]["floor"] is None and partial[1]["results"][1]["max_abs_diff_vs_resident"] == 0.0
    assert "stopped after 2 of 3 strategies, no floor" in title(partial[1]) and len(rows(partial[1])) == 2
    assert data["complete"] and "baseline_rss_bytes" not in data["results"][0]
    assert data["cache"] == "cold"  # auto: the stream reads the checkpoint during steps
    assert {"model", "device", "max_memory", "max_memory_bytes", "baseline_rss_bytes", "steps", "height", "width",
            "results"} <= set(data)
    assert data["device"] == "cpu" and set(data["max_memory_bytes"]) == {"cpu", "disk"}
    assert [r["strategy"] for r in data["results"]] == ["resident", "accelerate", "stream"]
    for r in data["results"]:
        assert {"strategy", "s_per_step", "peak_rss_bytes", "peak_gpu_bytes", "bytes_streamed_per_step",
                "max_abs_diff_vs_resident"} <= set(r)
        assert r["max_abs_diff_vs_resident"] == 0.0 and r["peak_gpu_bytes"] is None and r["s_per_step"] > 0
    assert data["results"][0]["bytes_streamed_per_step"] == 0 and data["results"][2]["bytes_streamed_per_step"] > 0
    assert data["floor"]["s_per_step"] > 0
    # the resident part: all of it resident, less where half the stage is the budget (the rest on disk)
    held = [r["resident_bytes"] for r in data["results"]]
    assert held[0] > held[1] > 0 and held[0] > held[2] > 0
    assert data["machine"]["cores"] >= 1 and data["machine"]["capability"]


@pytest.mark.slow
def test_bench_puts_the_method_beside_another_precision_and_measures_its_image():
    """bf16 weights with fp32 math: the method's row (accelerate, bf16 math) runs beside the others in
    the same report, each strategy in every round, and one image per precision gives the PSNR."""
    from helpers.bench import rows, run

    lines = []
    data = run("tiny", "cpu=50%,disk=100%", steps=1, strategies=["resident", "stream", "method"], compute="fp32",
               rounds=2, progress=lines.append)
    resident, stream, method = data["results"]
    assert data["rounds"] == 2 and sum("(round 2 of 2)" in line for line in lines) == 3
    assert all(len(r["s_per_step_rounds"]) == 2 and len(r["step_times"]) == 2 for r in data["results"])
    assert (stream["weights"], stream["compute"]) == ("bf16", "fp32") and stream["rel_error_vs_fp32"] == 0.0
    assert stream["max_abs_diff_vs_resident"] == 0.0 and stream["bytes_streamed_per_step"] > 0
    assert (method["weights"], method["compute"]) == ("bf16", "bf16") and method["bytes_streamed_per_step"] > 0
    assert method["max_abs_diff_vs_resident"] is None and method["rel_error_vs_fp32"] > 1e-3  # bf16 math rounds
    assert 20 < data["image"]["psnr_vs_bf16_db"] < 100 and not data["image"]["identical"]
    assert rows(data)[2]["weights, math"] == "bf16, bf16"


def test_bench_drops_the_page_cache_only_where_weights_come_from_the_disk():
    from helpers.bench import resolve_cache
    from helpers.budget import parse_budget

    for spec, expected in (("cpu=1GiB", "cold"), ("cpu=1GiB,disk=9GiB", "cold"), ("0=1GiB,cpu=9GiB", "warm"),
                           ("0=1GiB,cpu=2GiB,disk=9GiB", "cold")):
        assert resolve_cache("auto", parse_budget(spec)) == expected
        assert resolve_cache("warm", parse_budget(spec)) == "warm"


def test_bench_rejects_unknown_and_gpu_only_strategies():
    from helpers.bench import run

    with pytest.raises(UserError, match="unknown strategy"):
        run("tiny", strategies=["magic"], progress=lambda _: None)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a GPU"):
            run("tiny", strategies=["diffusers-model"], progress=lambda _: None)


def test_ram_use_of_the_streamer_is_counted_in_the_budget(tiny_folder, resident):
    budget = int(_bytes(resident) * 0.4)
    model, streamer = load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, budget, BLOCKS)
    try:
        resident_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
        held = sum(b.untyped_storage().nbytes() for b in streamer.buffers)  # with the page-alignment slack
        assert streamer.ram_bytes == sum(b.numel() for b in streamer.buffers)
        assert resident_bytes + streamer.ram_bytes <= budget
        assert held - streamer.ram_bytes <= 4096 * len(streamer.buffers)
        for b in streamer.buffers:  # page-aligned, as O_DIRECT needs
            assert b.data_ptr() % 4096 == 0
    finally:
        streamer.close()


@pytest.mark.parametrize("refusal", ["at open", "at read"])
def test_where_o_direct_is_refused_reads_fall_back_to_the_page_cache(tiny_folder, resident, monkeypatch, refusal):
    """Some file systems refuse O_DIRECT when the file is opened, others at the first read (EINVAL)."""
    import errno
    import os

    from helpers.offload.streamers import BlockStreamer

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here: reads are ordinary from the start")
    budget = int(_bytes(resident) * 0.3)
    model, streamer = load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, budget, BLOCKS)
    names = [b.name for b in streamer.blocks]
    streamer.close()
    real_open, real_preadv, refused = os.open, os.preadv, []

    def fake_open(path, flags, *args):
        if refusal == "at open" and flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, *args)

    def fake_preadv(fd, buffers, offset):
        if refusal == "at read" and fcntl_flags(fd) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    def fcntl_flags(fd):
        import fcntl

        return fcntl.fcntl(fd, fcntl.F_GETFL)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "preadv", fake_preadv)
    fallback = BlockStreamer(model, tiny_folder / "transformer", names)
    try:
        with torch.no_grad():
            assert torch.equal(resident(**_inputs(5))[0], model(**_inputs(5))[0])
        assert refused and fallback.direct is False and fallback.bytes_read > 0
    finally:
        fallback.close()


def test_t5_streams_in_float32_from_a_bfloat16_checkpoint(tiny_folder):
    """T5 is stored in bfloat16 and encodes in float32: pieces stream as stored, each layer decoded as it runs."""
    from transformers import T5EncoderModel

    folder = tiny_folder / "text_encoder_2"
    whole = T5EncoderModel.from_pretrained(folder, dtype=torch.float32).eval()
    budget = int(_bytes(whole) * 0.5)
    model, streamer = load_streaming(folder, T5EncoderModel, torch.float32, budget, ["encoder.block"])
    try:
        # bf16 -> fp32: read ahead as stored into the pool, computed from there by the layers' hooks
        assert streamer is not None and [t.name for t in streamer._threads] == ["block-reader"]
        assert {t.stored for b in streamer.blocks for t in b.tensors} == {torch.bfloat16}
        assert {p.dtype for b in streamer.blocks for p in b.params[0]} == {torch.bfloat16}
        assert model._upcast_to == torch.float32
        assert streamer.ram_bytes == sum(b.numel() for b in streamer.buffers)
        assert model.shared.weight is model.encoder.embed_tokens.weight  # tied, loaded once
        resident_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
        assert resident_bytes + streamer.ram_bytes <= budget
        ids = torch.randint(0, whole.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(whole(ids).last_hidden_state, model(ids).last_hidden_state)
    finally:
        streamer.close()


@pytest.mark.parametrize("where", [pytest.param(1, marks=pytest.mark.slow), -1])  # a middle block (full suite), and the last (the next pass starts at block 0 anyway)
@pytest.mark.parametrize("kind", ["disk -> RAM", "RAM -> device", "disk -> RAM, decoded to float32"])
def test_a_forward_pass_that_fails_midway_does_not_wedge_the_streamer(tiny_folder, resident, where, kind):
    budget = int(_bytes(resident) * 0.3)
    dtype = torch.float32 if kind.endswith("float32") else torch.bfloat16
    if dtype == torch.float32:  # the reader starts over; the layers are decoded as they run
        resident = copy.deepcopy(resident).float()
        model, streamer = load_streaming(tiny_folder / "transformer", type(resident), dtype, 2 * budget, BLOCKS)
        assert model._upcast_to == torch.float32
    else:
        load = load_streaming if kind == "disk -> RAM" else _host_streamed
        model, streamer = load(tiny_folder / "transformer", type(resident), dtype, budget, BLOCKS)
    try:
        victim = model.get_submodule(streamer.blocks[where].name)
        handle = victim.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        with torch.no_grad(), pytest.raises(KeyboardInterrupt):
            model(**_inputs_in(dtype, 0))
        handle.remove()
        with torch.no_grad():  # the next calls start over from the first streamed block
            for seed in (0, 1):
                assert torch.equal(resident(**_inputs_in(dtype, seed))[0], model(**_inputs_in(dtype, seed))[0])
        assert all(p.device.type == "meta" for b in streamer.blocks for p in b.module.parameters())
    finally:
        streamer.close()


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.slow), torch.float32])  # float32: decoded layer by layer
def test_a_checkpoint_that_changes_under_the_reader_is_a_clear_error(tmp_path, tiny_folder, resident, dtype):
    import shutil

    from helpers.offload.streamers import BlockStreamer

    resident = resident if dtype == torch.bfloat16 else copy.deepcopy(resident).to(dtype)
    budget = int(_bytes(resident) * 0.3)
    model, streamer = load_streaming(tiny_folder / "transformer", type(resident), dtype, budget, BLOCKS)
    streamer.close()
    folder = tmp_path / "transformer"
    shutil.copytree(tiny_folder / "transformer", folder)
    for f in folder.glob("*.safetensors"):  # cut every shard short
        with open(f, "r+b") as fh:
            fh.truncate(fh.seek(0, 2) // 8)
    broken = BlockStreamer(model, folder, [b.name for b in streamer.blocks])
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="reading .* failed: .*ended at byte"):
            model(**_inputs_in(dtype, 0))
        for f in folder.glob("*.safetensors"):  # the files come back: the next call reads again
            shutil.copyfile(tiny_folder / "transformer" / f.name, f)
        with torch.no_grad():
            assert torch.equal(resident(**_inputs_in(dtype, 0))[0], model(**_inputs_in(dtype, 0))[0])
    finally:
        broken.close()


def test_drop_page_cache_handles_files_and_folders(tmp_path, monkeypatch):
    from helpers.memory import drop_page_cache

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"1" * 10_000)
    (tmp_path / "y.bin").write_bytes(b"2" * 5_000)
    assert drop_page_cache(tmp_path) == 15_000
    assert drop_page_cache(tmp_path / "y.bin") == 5_000
    with pytest.raises(FileNotFoundError):  # a wrong folder must not quietly turn "cold" into warm
        drop_page_cache(tmp_path / "missing")
    import os

    (tmp_path / "gone.tmp").write_bytes(b"3" * 100)  # renamed away between listing and opening: skipped
    real_open = os.open

    def vanishing_open(path, *args):
        if str(path).endswith("gone.tmp"):
            raise FileNotFoundError(path)
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", vanishing_open)
    assert drop_page_cache(tmp_path) == 15_000


def test_encode_with_stream_equals_accelerate(tmp_path):
    from safetensors.torch import load_file

    from helpers.encode import encode_prompts

    prompts = ["a red cat", "a lighthouse at dusk, oil painting"]
    budget = "cpu=50%,disk=100%"
    a = encode_prompts("tiny", prompts, tmp_path / "a.safetensors", budget, max_sequence_length=32, offload="accelerate")
    b = encode_prompts("tiny", prompts, tmp_path / "b.safetensors", budget, max_sequence_length=32, offload="stream")
    ta, tb = load_file(str(a.path)), load_file(str(b.path))
    assert set(ta) == set(tb)
    for k in ta:  # bit for bit on an AVX-512 CPU (2026-12-07); on an AVX2 one the accelerate path's T5 sums
        # differed in the last float32 bits (2026-12-06, 1 in 1e7 of the sum): to within one bf16 step
        assert torch.allclose(ta[k].float(), tb[k].float(), rtol=2**-7, atol=0), k
    assert "disk" in b.applied.values() and "cpu" in b.applied.values()
    with pytest.raises(UserError, match="unknown offload"):
        encode_prompts("tiny", prompts, tmp_path / "c.safetensors", budget, offload="magic")
    assert not (tmp_path / "c.safetensors").exists()


def test_auto_picks_stream_without_a_gpu_tier():
    from helpers.budget import parse_budget
    from helpers.offload.streamers import choose_offload

    cpu_only, with_gpu = parse_budget("cpu=8GiB,disk=30GiB"), parse_budget("0=8GiB,cpu=30GiB")
    assert choose_offload("auto", cpu_only) == "stream" and choose_offload("auto", with_gpu) == "accelerate"
    assert choose_offload("accelerate", cpu_only) == "accelerate" and choose_offload("stream", with_gpu) == "stream"
    with pytest.raises(UserError, match="unknown offload 'fast'"):
        choose_offload("fast", cpu_only)


# ----------------------------------------------------------------------------- RAM -> device (the GPU path)


def _host_streamed(folder, cls, dtype, share, block_lists, device="cpu"):
    """A model whose streamed blocks go through :class:`HostStreamer` (to ``device``)."""
    from helpers.offload.streamers import HostStreamer

    model, disk = load_streaming(folder, cls, dtype, share, block_lists)
    names = [b.name for b in disk.blocks]
    disk.close()
    return model, HostStreamer(model, folder, names, device, dtype=dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_host_streamer_equals_resident(tiny_folder, resident, device):
    """The RAM -> device streamer: every block held once in (pinned) RAM, copied one ahead into a pool."""
    if device == "cuda":  # the real path: resident part on the GPU, the rest pinned in RAM
        model, streamer = load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, 10**9, BLOCKS,
                                         device="cuda", device_bytes=int(_bytes(resident) * 0.3))
    else:  # the same bookkeeping with the CPU as the "device"
        model, streamer = _host_streamed(tiny_folder / "transformer", type(resident), torch.bfloat16,
                                         int(_bytes(resident) * 0.3), BLOCKS)
    # the reference runs on the same device: CPU and GPU kernels round differently
    reference = resident if device == "cpu" else copy.deepcopy(resident).to(device)
    try:
        assert streamer.host_bytes == sum(b.stored_nbytes for b in streamer.blocks)
        assert streamer.device_bytes == streamer.pool_size * streamer.largest  # largest part, not block
        assert streamer.staging is None  # bf16 math on bf16 weights: nothing to decode
        if device == "cuda":
            assert all(h.is_pinned() for h in streamer.host)
            assert all(p.device.type == "cuda" for p in model.parameters() if p.device.type != "meta")
        with torch.no_grad():
            for seed in (0, 1, 2):
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in _inputs(seed).items()}
                expected, got = reference(**inputs)[0], model(**inputs)[0]
                assert torch.equal(expected, got), f"max diff {(expected.float() - got.float()).abs().max()}"  # none
        assert streamer.bytes_copied >= 3 * streamer.host_bytes
        assert all(p.device.type == "meta" for b in streamer.blocks for p in b.module.parameters())
        spans = streamer.timeline()  # copies and computes of the last two calls, in order on each side
        assert {k for k, *_ in spans} == {"copy", "compute"} and all(0 <= a <= b for _, _, a, b in spans)
        computes = [(i, a, b) for k, i, a, b in spans if k == "compute"]
        assert [i for i, *_ in computes] == list(range(len(streamer.blocks))) * 2
        assert all(b1 <= a2 + 1e-6 for (_, _, b1), (_, a2, _) in zip(computes, computes[1:]))
    finally:
        streamer.close()
        del reference


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_host_streamer_holds_t5_as_stored_and_decodes_it_on_the_way(tiny_folder, device):
    """T5 stored in bf16, computing in float32: pinned RAM and the copies hold bf16, decoded on the
    device (its copy stream) from a staging buffer into the pool."""
    from transformers import T5EncoderModel

    folder = tiny_folder / "text_encoder_2"
    whole = T5EncoderModel.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    if device == "cuda":
        model, streamer = load_streaming(folder, T5EncoderModel, torch.float32, 10**9, ["encoder.block"],
                                         device="cuda", device_bytes=int(_bytes(whole) * 0.5))
    else:
        model, streamer = _host_streamed(folder, T5EncoderModel, torch.float32, int(_bytes(whole) * 0.5),
                                         ["encoder.block"])
    try:
        assert all(h.dtype == torch.uint8 for h in streamer.host)
        for block in streamer.blocks:  # every tensor 256-byte aligned in the pool, whatever its file offset
            assert all(t.pos % 256 == 0 and t.stored_pos % 256 == 0 for t in block.tensors)
            assert block.stored <= block.stored_nbytes < block.nbytes  # as stored (bf16), half of float32
        assert streamer.host_bytes == sum(b.stored_nbytes for b in streamer.blocks)
        assert streamer.staging is not None and streamer.device_bytes == (
            streamer.pool_size * streamer.largest + streamer.staging.numel())
        ids = torch.randint(0, whole.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1)).to(device)
        with torch.no_grad():
            assert torch.equal(whole(ids).last_hidden_state, model(ids).last_hidden_state)
    finally:
        streamer.close()


def test_streaming_to_a_gpu_checks_both_tiers_before_loading(tiny_folder, resident):
    """The GPU tier must hold the resident part and the pool; pinned RAM every streamed block."""
    cls = type(resident)
    with pytest.raises(UserError, match="needs its budget"):
        load_streaming(tiny_folder / "transformer", cls, torch.bfloat16, 10**9, BLOCKS, device="cuda:0")
    with pytest.raises(UserError, match="larger than the whole GPU 0 tier"):
        load_streaming(tiny_folder / "transformer", cls, torch.bfloat16, 10**9, BLOCKS, device="cuda:0",
                       device_bytes=10_000)
    with pytest.raises(UserError, match="holds the .* blocks it cannot keep in pinned RAM: .* use offload 'accelerate'"):
        load_streaming(tiny_folder / "transformer", cls, torch.bfloat16, 1000, BLOCKS, device="cuda:0",
                       device_bytes=int(_bytes(resident) * 0.3))


def test_stream_budget_takes_the_whole_components_off_their_tier():
    from helpers.budget import parse_budget
    from helpers.offload.streamers import stream_budget

    assert stream_budget(parse_budget("cpu=1000,disk=5000"), {"cpu": 300}) == (700, None, None)
    cpu, device, fast = stream_budget(parse_budget("0=2000,cpu=9000"), {0: 500})
    assert (cpu, device, fast) == (9000, torch.device("cuda", 0), 1500)


@pytest.mark.slow
def test_bench_text_encoding_stage_streams_t5_exactly():
    from helpers.bench import run

    data = run("tiny", "cpu=50%,disk=100%", steps=1, strategies=["resident", "accelerate", "stream"],
               stage="text_encoding", tokens=16, progress=lambda _: None)
    assert data["stage"] == "text_encoding" and data["tokens"] == 16
    assert [r["max_abs_diff_vs_resident"] for r in data["results"]] == [0.0, 0.0, 0.0]
    assert data["results"][2]["bytes_streamed_per_step"] > 0 and data["floor"]["bytes_to_move_per_step"] > 0
    with pytest.raises(UserError, match="not benchmarked for text_encoding"):
        run("tiny", strategies=["diffusers-group"], stage="text_encoding", progress=lambda _: None)
    with pytest.raises(UserError, match="stage must be one of"):
        run("tiny", stage="vae", progress=lambda _: None)


@pytest.mark.slow
def test_bench_reports_a_failed_strategy_and_runs_the_others(tmp_path):
    """Here the budget fits accelerate's map but not stream's resident part and pool."""
    import json

    from helpers.bench import rows, run

    lines = []
    data = run("tiny", "cpu=10%,disk=100%", steps=1, strategies=["accelerate", "stream"], progress=lines.append)
    ok, failed = data["results"]
    assert ok["s_per_step"] > 0 and "error" not in ok
    assert failed["s_per_step"] is None and failed["max_abs_diff_vs_resident"] is None
    assert "cannot hold the model's non-block weights" in failed["error"] and "(exit status 1)" in failed["error"]
    assert lines[-1].startswith("stream: failed: ") and rows(data)[1]["s/step"] == "failed"
    # every strategy failing: the JSON is still written, and the command exits 1 with one line
    out = tmp_path / "b.json"
    done = commands.run("bench", "--model", "tiny", "--strategies", "resident", "--timeout", "0.01", "--json", out)
    assert done.returncode == 1 and "every strategy failed" in done.stderr and "Traceback" not in done.stderr
    assert json.loads(out.read_text())["results"][0]["error"] == "ran past the 0.01 s timeout"


@pytest.mark.slow
def test_bench_without_fork_runs_each_strategy_in_a_fresh_interpreter(monkeypatch):
    """Where os.fork does not exist, each strategy's process is `python -m helpers.bench STRATEGY
    CONFIG OUT`: the same result."""
    import os

    from helpers.bench import run

    monkeypatch.delattr(os, "fork")
    data = run("tiny", "cpu=50%,disk=100%", steps=1, strategies=["resident", "stream"], progress=lambda _: None,
               image=False)
    assert [r["strategy"] for r in data["results"]] == ["resident", "stream"]
    assert all(r.get("error") is None and r["s_per_step"] > 0 for r in data["results"])
    assert data["results"][1]["max_abs_diff_vs_resident"] == 0.0


def test_bench_refuses_bad_settings_before_running():
    from helpers.bench import run

    quiet = dict(progress=lambda _: None)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="this machine has no GPU"):
            run("tiny", "0=1GiB,cpu=1GiB", **quiet)
    with pytest.raises(UserError, match="cache must be 'auto', 'cold' or 'warm'"):
        run("tiny", cache="hot", **quiet)
    for timeout in (0, float("inf"), float("nan")):
        with pytest.raises(UserError, match="timeout must be a finite number of seconds above 0"):
            run("tiny", timeout=timeout, **quiet)
    with pytest.raises(UserError, match="tokens must be a whole number from 1 to 512"):
        run("tiny", stage="text_encoding", tokens=600, **quiet)
    with pytest.raises(UserError, match="tokens must be a whole number from 1 to 512"):
        run("tiny", tokens=0, **quiet)
    for rounds in (0, 1.5, True):
        with pytest.raises(UserError, match="rounds must be a whole number from 1 to 100"):
            run("tiny", rounds=rounds, **quiet)
    with pytest.raises(UserError, match="not benchmarked for text_encoding"):
        run("tiny", stage="text_encoding", strategies=["method"], **quiet)


@pytest.mark.slow
def test_auto_falls_back_to_accelerate_when_the_stream_does_not_fit(tmp_path):
    from helpers.diffuse import diffuse_file
    from helpers.encode import encode_prompts

    emb = encode_prompts("tiny", ["a red cat"], tmp_path / "e.safetensors", max_sequence_length=16).path
    args = dict(steps=1, seed=1, height=64, width=64, max_memory="cpu=10%,disk=100%", progress=False)
    assert diffuse_file(emb, tmp_path / "a.png", offload="auto", **args).offload == "accelerate"
    with pytest.raises(UserError, match="cannot hold the model's non-block weights"):
        diffuse_file(emb, tmp_path / "s.png", offload="stream", **args)
    assert not (tmp_path / "s.png").exists()


def _cached_fraction(path) -> float:
    """How much of a file the page cache holds, from mincore(2) on a private mapping of it."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        buf = (ctypes.c_char * size).from_buffer(mm)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        del buf
        return sum(v & 1 for v in vec) / pages
    finally:
        mm.close()


def _file_system(path) -> str:
    best, kind = "", ""
    for line in open("/proc/self/mounts"):
        _, mount, fs = line.split()[:3]
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fs
    return kind


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="mincore and fadvise: Linux")
def test_drop_page_cache_really_empties_the_cache(tmp_path):
    """What "cold" rests on: after the drop, the file's pages are no longer in RAM."""
    from helpers.memory import drop_page_cache

    path = tmp_path / "weights.bin"
    path.write_bytes(np.random.default_rng(0).bytes(8 * 2**20))
    path.read_bytes()
    assert _cached_fraction(path) > 0.9
    drop_page_cache(path)
    after = _cached_fraction(path)
    if after > 0.5 and _file_system(tmp_path) in ("tmpfs", "ramfs", "overlay"):
        pytest.skip(f"{_file_system(tmp_path)} keeps files in RAM: nothing to drop")
    assert after < 0.1


def test_stream_buffers_are_whole_pages_of_their_own():
    """O_DIRECT reads into them, and cudaHostRegister pins them whole: Tensor.is_pinned() looks at the
    storage's start, which must be the start of the pinned range."""
    from helpers.offload.streamers import _page_aligned

    for n in (1, 4096, 300_001):
        buf = _page_aligned(n)
        storage = buf.untyped_storage()
        assert buf.numel() == n and storage.data_ptr() == buf.data_ptr()
        assert storage.data_ptr() % 4096 == 0 and storage.nbytes() % 4096 == 0


def test_loading_a_stream_shows_its_progress_in_bytes(tiny_folder, resident, capsys):
    from tqdm import tqdm

    model, streamer = load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16,
                                     int(_bytes(resident) * 0.5), BLOCKS, progress=True)
    streamer.close()
    err = capsys.readouterr().err
    resident_bytes = sum(p.numel() * 2 for p in model.parameters() if p.device.type != "meta")
    size = tqdm.format_sizeof(resident_bytes, divisor=1024)  # every resident weight, read once
    assert "transformer: loading (stream): 100%|" in err and f"{size}/{size}" in err


def test_bench_plots_read_a_saved_result_cpu_or_gpu():
    """Notebook 05 draws every saved result: RSS against the cpu tier, or GPU memory against the GPU tier."""
    import copy as copy_
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.bench import plot_step_times, plot_time_memory, plot_timeline

    cpu = json.loads((Path(__file__).parent.parent / "docs" / "benchmarks" / "medium-cpu2-64x64-cold.json").read_text())
    ax = plot_time_memory(cpu)
    assert ax.get_xlabel() == "peak RSS of the process (MiB)" and len(ax.collections) == 4
    limit = 1.1 * (cpu["baseline_rss_bytes"] + cpu["max_memory_bytes"]["cpu"]) / 2**20
    assert any(line.get_xdata()[0] == limit for line in ax.lines)  # the RSS criterion's line
    assert "read" in plot_timeline(cpu).get_title()
    # bf16 weights, float32 math: decoded layer by layer within the compute, no lane of its own
    decoded = json.loads((Path(__file__).parent.parent / "docs" / "benchmarks" /
                          "medium-avx2-64x64-t64-bf16-weights-auto-math.json").read_text())
    lanes = [t.get_text() for t in plot_timeline(decoded).get_yticklabels()]
    assert lanes == ["compute", "read"]
    assert plot_step_times([decoded, cpu]).get_legend() is not None
    gpu = copy_.deepcopy(cpu)
    gpu.update(device="cuda:0 (a card)", max_memory_bytes={"0": 9 * 2**30, "cpu": 30 * 2**30}, floor=None)
    for r in gpu["results"]:
        r["peak_gpu_bytes"] = 8 * 2**30
        if r["strategy"] == "stream":
            r["timeline"] = [["copy", 1, 0.0, 0.01], ["compute", 0, 0.0, 0.02]]
    gpu["results"][1].update(s_per_step=None, error="ran past the 150 s timeout")  # a failed row: no point
    ax = plot_time_memory(gpu)
    assert ax.get_xlabel() == "peak GPU memory (MiB)" and len(ax.collections) == 3
    assert any(line.get_xdata()[0] == 9 * 1024 for line in ax.lines)
    assert "copy" in plot_timeline(gpu).get_title()
    gpu["results"] = [r for r in gpu["results"] if r["strategy"] != "stream"]
    assert plot_timeline(gpu) is None
    plt.close("all")
    from helpers.bench import summary_rows

    cpu_row, gpu_row = summary_rows([("cpu.json", cpu), ("gpu.json", gpu)])  # the overview: a line per file
    assert cpu_row["file"] == "cpu.json" and cpu_row["device"] == "cpu" and cpu_row["size"].startswith("64x64")
    assert cpu_row["stream"].startswith(f"{cpu['results'][2]['s_per_step']:.3f} (") and cpu_row["stream"].endswith("x)")
    assert gpu_row["device"] == "cuda:0" and gpu_row["accelerate"] == "failed" and "stream" not in gpu_row


def test_the_gpu_tier_plan_keeps_weights_pool_and_reserve_within_it(tiny_folder, resident, capsys):
    """load_streaming's GPU branch, run with the meta device standing in for the GPU (no CUDA needed):
    resident weights + the pool + the reserve fit the GPU tier; the streamed blocks fit the cpu tier."""
    from helpers.offload.streamers import HostStreamer

    whole = _bytes(resident)
    tier, reserve = int(whole * 0.5), int(whole * 0.1)
    model, streamer = load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, whole, BLOCKS,
                                     device="meta", device_bytes=tier, reserve=reserve, progress=True)
    try:
        assert isinstance(streamer, HostStreamer) and streamer.blocks
        # the room whole blocks leave in the GPU tier keeps some parts of streamed blocks there
        pieces = {b.name for b in streamer.blocks}
        kept = [n for n, m in model.named_modules() if n.rpartition(".")[0] in streamer.streamed_blocks
                and n not in pieces and next(m.parameters(), None) is not None]
        assert kept
        streamed = {id(p) for b in streamer.blocks for p in b.meta}
        kept = sum(p.numel() * 2 for p in model.parameters() if id(p) not in streamed)
        assert kept + streamer.device_bytes + reserve <= tier
        assert streamer.host_bytes <= whole and all(t.pos % 256 == 0 for b in streamer.blocks for t in b.tensors)
    finally:
        streamer.close()
    from tqdm import tqdm

    everything = tqdm.format_sizeof(sum(p.numel() * 2 for p in resident.parameters()), divisor=1024)
    assert f"{everything}/{everything}" in capsys.readouterr().err  # resident weights, then the blocks into RAM
    with pytest.raises(UserError, match="holds the .* blocks it cannot keep in pinned RAM"):
        load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, 1000, BLOCKS, device="meta",
                       device_bytes=tier, reserve=reserve)
