import numpy as np
import pytest
import torch
from PIL import Image

from helpers.errors import UserError
from helpers.offload import load_streaming, read_safetensors_index

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


def _bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_index_reads_headers_only(tiny_folder):
    index = read_safetensors_index(tiny_folder / "transformer")
    path, offset, nbytes, dtype, shape = index["transformer_blocks.0.attn.to_q.weight"]
    assert path.suffix == ".safetensors" and dtype == "BF16" and nbytes == 2 * shape[0] * shape[1] and offset > 8


@pytest.mark.parametrize("share", [0.3, 0.6])
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
        # the RAM tier: resident weights + the two-block pool stay within the budget
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


def test_a_block_bigger_than_the_fast_tier_is_a_clear_error(tiny_folder, resident):
    with pytest.raises(UserError, match="cannot hold the model's non-block weights .* and one block"):
        load_streaming(tiny_folder / "transformer", type(resident), torch.bfloat16, 10_000, BLOCKS)


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


def test_bench_json_shape_and_equal_outputs(tmp_path):
    from helpers.bench import run

    data = run("tiny", "cpu=50%,disk=100%", steps=1, strategies=["resident", "accelerate", "stream"], progress=lambda _: None)
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


def test_bench_rejects_unknown_and_gpu_only_strategies():
    from helpers.bench import run

    with pytest.raises(UserError, match="unknown strategy"):
        run("tiny", strategies=["magic"], progress=lambda _: None)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a GPU"):
            run("tiny", strategies=["diffusers-model"], progress=lambda _: None)
