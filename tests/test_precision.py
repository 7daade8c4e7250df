"""The two knobs: weights stored in one dtype, layers computing in another, planned and loaded."""

import copy
import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import commands
from helpers.errors import UserError
from helpers.offload.upcast import upcast_layerwise
from helpers.precision import (Precision, auto_compute, check_compute, check_weights, cpu_bf16, resolve,
                               stored_bytes)


def _flux_inputs(cfg, n=16, tokens=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, n, cfg.in_channels, generator=g).to(dtype),
                  encoder_hidden_states=torch.randn(1, tokens, cfg.joint_attention_dim, generator=g).to(dtype),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dtype),
                  timestep=torch.tensor([0.5], dtype=dtype), img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(tokens, 3),
                  return_dict=False)
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])
    return inputs


@pytest.fixture(scope="module")
def transformer(tiny_folder):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_folder / "transformer", dtype=torch.bfloat16).eval()


def test_bf16_stored_fp32_math_equals_fp32_weights_bit_for_bit(transformer):
    """Widening bf16 to float32 is exact, so upcasting each layer as it runs is float32 weights' math."""
    model = copy.deepcopy(transformer)
    reference = copy.deepcopy(transformer).to(torch.float32)
    before = stored_bytes(model)
    assert upcast_layerwise(model, torch.float32) > 100  # every linear layer and norm of the twin
    inputs = _flux_inputs(model.config)
    with torch.no_grad():
        ours, theirs = model(**inputs)[0], reference(**inputs)[0]
        bf16 = transformer(**_flux_inputs(model.config, dtype=torch.bfloat16))[0]
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    assert not torch.equal(ours, bf16.float())  # and the bf16 math is another result
    # the weights stay stored: bf16, the same bytes, after the forward as before
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and stored_bytes(model) == before


def test_upcast_vae_whose_decoder_casts_to_its_weights_dtype(tiny_folder):
    """diffusers' decoder casts its input to its parameters' dtype (bf16): the hooks cast it back."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_folder / "vae", dtype=torch.bfloat16).eval()
    reference = copy.deepcopy(vae).to(torch.float32)
    upcast_layerwise(vae, torch.float32)
    z = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, reference.decode(z).sample)


def test_upcast_after_accelerate_fetches_offloaded_weights(tiny_folder, tmp_path):
    """Blocks accelerate keeps on disk are fetched by its hook; the upcast runs after it and leaves
    nothing behind in RAM (the block goes back to meta)."""
    from diffusers import FluxTransformer2DModel

    folder = tiny_folder / "transformer"
    device_map = {"": "cpu"}
    skeleton = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
    device_map = {name: "cpu" for name, _ in skeleton.named_children()}
    device_map["single_transformer_blocks"] = "disk"
    model = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16, device_map=device_map,
                                                   offload_folder=tmp_path / "off").eval()
    upcast_layerwise(model, torch.float32)
    reference = skeleton.to(torch.float32).eval()
    inputs = _flux_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], reference(**inputs)[0])
    block = model.single_transformer_blocks[0]
    assert {p.device.type for p in block.parameters()} == {"meta"}  # back in its offload, not kept upcast


def test_stored_bytes_counts_parameters_and_buffers_once():
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    module[0].to(torch.bfloat16)
    params = 4 * 3 * 2 + 3 * 2 + 3 * 4 * 2  # the linear in bf16, the norm's weight and bias in fp32
    buffers = 3 * 4 * 2 + 8  # running mean and var, and the int64 count
    assert stored_bytes(module) == params + buffers
    tied = torch.nn.Sequential(torch.nn.Embedding(5, 2), torch.nn.Linear(2, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert stored_bytes(tied) == 5 * 2 * 4
    assert stored_bytes(tied, "bf16") == 5 * 2 * 2  # sized for a format: a skeleton on meta works too


def test_knobs_refuse_what_they_do_not_know():
    assert check_weights("bf16") == "bf16" and check_compute("auto") == "auto"
    with pytest.raises(UserError, match="unknown weights format 'int3'.*bf16, fp32"):
        check_weights("int3")
    with pytest.raises(UserError, match="unknown compute dtype 'fp64'"):
        check_compute("fp64")
    with pytest.raises(UserError, match="must be resolved"):
        Precision("bf16", "auto")


def test_auto_compute_per_device_and_stage():
    assert resolve("text_encoding").compute == "fp32"  # T5 keeps float32 math
    assert resolve("text_encoding", compute="bf16").compute == "bf16"  # unless asked
    assert resolve("diffusion", "fp32", "fp16") == Precision("fp32", "fp16", "asked for")
    native, why = cpu_bf16()
    chosen = resolve("diffusion")
    assert chosen.weights == "bf16" and chosen.compute == ("bf16" if native else "fp32") and why in chosen.why
    if not torch.cuda.is_available():  # planning for a card elsewhere: one with bf16
        assert auto_compute(0) == ("bf16", "GPU 0 is not on this machine: planned as a card with bf16")


def test_the_plan_carries_the_precision_and_counts_activations_in_its_compute_dtype():
    from helpers.activations import Workload
    from helpers.diffuse import diffusion_plan

    work = Workload(256, 256, 1, 64)
    bf16 = diffusion_plan("tiny", "cpu=50%,disk=100%", workload=work, compute="bf16")
    fp32 = diffusion_plan("tiny", "cpu=50%,disk=100%", workload=work, compute="fp32")
    wide = diffusion_plan("tiny", "cpu=50%,disk=100%", workload=work, weights="fp32", compute="fp32")
    assert bf16.precision == Precision("bf16", "bf16", "asked for") and fp32.dtype == torch.bfloat16
    # float32 activations: about twice the bytes of bf16's (the transformer's: its norms keep some float32)
    assert fp32.activations["transformer"] > 1.6 * bf16.activations["transformer"]
    if cpu_bf16()[0]:  # the VAE's convolutions too, where oneDNN has bf16 kernels
        assert fp32.activations["vae"] > 1.8 * bf16.activations["vae"]
    else:  # without them PyTorch unfolds a bf16 conv's input once per kernel tap: more than float32 holds
        assert bf16.activations["vae"] >= fp32.activations["vae"]
    assert fp32.reserve_bytes == max(fp32.activations.values())
    weights = lambda plan: sum(u.nbytes for p in plan.components for u in p.units)  # noqa: E731
    assert weights(fp32) == weights(bf16) and weights(wide) == 2 * weights(bf16)  # stored bytes
    assert fp32.as_dict()["precision"] == {"weights": "bf16", "compute": "fp32", "why": "asked for"}


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_load_diffusion_stores_bf16_and_computes_fp32_for_both_offloads(tiny_folder):
    from helpers.activations import Workload
    from helpers.diffuse import diffusion_plan, generate, load_diffusion

    plan = diffusion_plan(str(tiny_folder), "cpu=50%,disk=100%", workload=Workload(64, 64, 1, 8), compute="fp32")
    tensors = {"prompt_embeds": torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16),
               "pooled_prompt_embeds": torch.randn(1, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)}
    images = {}
    for offload in ("accelerate", "stream"):
        diffusion = load_diffusion(tiny_folder, plan, offload=offload, progress=False)
        try:
            transformer = diffusion.pipe.transformer
            assert transformer.x_embedder.weight.dtype == torch.bfloat16  # resident: stored bytes
            if offload == "stream":
                streamer = diffusion.streamer  # pieces stream as stored, their layers upcast as they run
                assert streamer is not None and {p.dtype for b in streamer.blocks for p in b.params[0]} == {torch.bfloat16}
            out = generate(diffusion, tensors, seed=0, steps=2, guidance=3.5, height=64, width=64, progress=False)
            images[offload] = torch.from_numpy(np.asarray(out.images[0]).copy())
        finally:
            diffusion.close()
    assert torch.equal(images["accelerate"], images["stream"])


def test_fp8_checkpoint_with_scales_is_refused_before_loading(tmp_path):
    from helpers.loading import check_checkpoint

    header = {"blocks.0.weight": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]},
              "blocks.0.weight_scale": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(12))
    with pytest.raises(UserError, match="fp8 with 1 scales beside them.*blocks.0.weight_scale"):
        check_checkpoint(tmp_path)


@pytest.mark.parametrize("flag, value", [("--weights", "int4"), ("--compute", "fp64")])
def test_cli_refuses_unknown_precision(flag, value, tmp_path):
    done = commands.run("diffuse", "--embeddings", tmp_path / "e.safetensors", "--out", tmp_path / "x.png", flag, value)
    assert done.returncode == 2 and f"invalid choice: '{value}'" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- fp8


@pytest.fixture(scope="module")
def tiny_fp8(tiny_folder, tmp_path_factory):
    from helpers.formats.convert import convert

    return convert(str(tiny_folder), "fp8", tmp_path_factory.mktemp("fp8") / "tiny-fp8", progress=False)


def test_row_scales_beat_plain_casting():
    """Per-row scales against casting straight to e4m3, on FLUX.1-dev-sized linear weights as
    flux-dev-random draws them (uniform in +-1/sqrt(3072), where plain e4m3 is coarse: its normal
    range starts at 2**-6), and on weights four times smaller (a layer of a wider model)."""
    from helpers.twins.random import random_weight
    from helpers.formats.codecs import dequantize_rows, quantize_rows

    for shrink, better in ((1, 1.8), (4, 3.0)):
        w = random_weight("block.weight", [3072, 3072], torch.bfloat16, 0).float() / shrink
        q, s = quantize_rows(w)
        scaled = ((dequantize_rows(q, s, torch.float32) - w).norm() / w.norm()).item()
        plain = ((w.to(torch.float8_e4m3fn).float() - w).norm() / w.norm()).item()
        print(f"relative error of a 3072x3072 weight (/{shrink}): per-row scaled {scaled:.4f}, plain cast {plain:.4f}")
        assert scaled < 0.03 and plain > better * scaled


def test_convert_writes_fp8_with_scales_and_records_it(tiny_folder, tiny_fp8):
    from helpers.formats.sources import read_safetensors_index
    from helpers.precision import folder_format

    assert folder_format(tiny_fp8 / "transformer") == "fp8" and folder_format(tiny_fp8 / "vae") is None
    assert not (tiny_fp8 / "twin.json").exists()  # a folder of its own, not the twin
    index = read_safetensors_index(tiny_fp8 / "transformer")
    assert index["x_embedder.weight"][3] == "F8_E4M3" and index["x_embedder.weight_scale"][3] == "F32"
    assert index["x_embedder.bias"][3] == "BF16"
    before = sum(e[2] for e in read_safetensors_index(tiny_folder / "transformer").values())
    after = sum(e[2] for e in index.values())
    assert after < 0.6 * before  # the twin is narrow: its biases and scales weigh more than FLUX.1-dev's
    with pytest.raises(UserError, match="never replaces"):
        from helpers.formats.convert import convert

        convert(str(tiny_folder), "fp8", tiny_fp8)


def test_fp8_planned_in_stored_bytes():
    from helpers.footprint import footprint
    from helpers.planner import plan_stages

    dev = footprint("flux-dev", components=("transformer", "vae"))
    fp8 = dev.components["transformer"].nbytes("float8_e4m3fn")
    assert dev.components["transformer"].params < fp8 < 1.01 * dev.components["transformer"].params
    plan = plan_stages(dev, "0=12GiB,cpu=30GiB", stages=("diffusion",),
                       precisions={"diffusion": Precision("fp8", "bf16")})["diffusion"]
    assert plan.fits and plan.advice.startswith("fits whole on GPU 0")  # 11.1 GiB: whole on a 12 GiB card
    bf16 = plan_stages(dev, "0=12GiB,cpu=30GiB", stages=("diffusion",))["diffusion"]
    assert "across tiers" in bf16.advice


@pytest.mark.slow
def test_fp8_folder_runs_the_same_with_both_offloads_and_streams_fewer_bytes(tiny_folder, tiny_fp8):
    from diffusers import FluxTransformer2DModel

    from helpers.activations import Workload
    from helpers.diffuse import diffusion_plan
    from helpers.loading import load_mapped

    plan = diffusion_plan(str(tiny_fp8), "cpu=50%,disk=100%", workload=Workload(64, 64, 1, 8), compute="fp32")
    assert plan.precision.weights == "fp8"  # as the folder stores it
    bf16_plan = diffusion_plan(str(tiny_folder), "cpu=50%,disk=100%", workload=Workload(64, 64, 1, 8), compute="fp32")
    inputs = _flux_inputs(SimpleNamespace(**FluxTransformer2DModel.load_config(tiny_fp8 / "transformer")))
    second = dict(inputs, timestep=torch.tensor([0.3]))
    outs, streamed = {}, {}
    for name, folder, p in (("stream", tiny_fp8, plan), ("accelerate", tiny_fp8, plan), ("bf16", tiny_folder, bf16_plan)):
        offload = "accelerate" if name == "accelerate" else "stream"
        loaded = load_mapped(folder / "transformer", FluxTransformer2DModel, "transformer", p, offload, progress=False)
        try:
            with torch.no_grad():  # twice: a second call must fetch the offloaded layers with their scales again
                outs[name] = (loaded.model(**inputs)[0], loaded.model(**second)[0])
            if loaded.streamer is not None:
                streamed[name] = loaded.streamer.bytes_streamed / 2
        finally:
            loaded.close()
    assert all(torch.equal(a, b) for a, b in zip(outs["stream"], outs["accelerate"]))
    error = ((outs["stream"][0] - outs["bf16"][0]).norm() / outs["bf16"][0].norm()).item()
    print(f"fp8 against bf16 weights, one step: relative error {error:.4f}; "
          f"streamed per step {streamed['stream']:.0f} vs {streamed['bf16']:.0f} bytes")
    assert 0 < error < 0.2
    assert streamed["stream"] < 0.65 * streamed["bf16"]


def test_fp8_refused_where_the_folder_does_not_store_it(tiny_folder, tiny_fp8):
    from helpers.diffuse import diffusion_plan

    with pytest.raises(UserError, match="fp8 weights are read from an fp8 copy: `python -m helpers convert"):
        diffusion_plan(str(tiny_folder), "cpu=50%,disk=100%", weights="fp8")
    with pytest.raises(UserError, match="stores its transformer in fp8 and is read as stored"):
        diffusion_plan(str(tiny_fp8), "cpu=50%,disk=100%", weights="bf16")
    from helpers.planner import plan_stage

    planned = plan_stage("diffusion", str(tiny_folder), "cpu=50%,disk=100%", weights="fp8", runnable=False)
    assert planned.precision.weights == "fp8"  # a plan alone may count any format


@pytest.mark.slow
def test_generate_from_an_fp8_folder(tiny_fp8, tmp_path):
    done = commands.run("generate", "--model", tiny_fp8, "--prompt", "a red circle", "--out", tmp_path / "x.png",
                        "--steps", "2", "--height", "64", "--width", "64", "--max-sequence-length", "16",
                        "--max-memory", "cpu=50%,disk=100%")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "x.png").is_file()


def test_convert_command_and_its_refusals(tiny_folder, tmp_path):
    out = tmp_path / "copy"
    args = ["convert", "--model", str(tiny_folder), "--weights", "fp8", "--out", str(out)]
    done = commands.run(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(out) and "transformer: fp8" in done.stderr
    listing = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    again = commands.run(*args)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "never replaces" in again.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == listing  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary folder left behind
    wrong = commands.run(*args[:-1], tmp_path / "nowhere" / "x")
    assert wrong.returncode == 2 and "does not exist" in wrong.stderr


def test_advice_names_fp8_where_it_would_make_the_stage_fit():
    from helpers.footprint import footprint
    from helpers.planner import plan_stages

    dev = footprint("flux-dev", components=("transformer", "vae"))
    tight = plan_stages(dev, "cpu=14GiB", stages=("diffusion",))["diffusion"]  # 22 GiB of bf16, no disk tier
    assert not tight.fits and "store the transformer in fp8 (`python -m helpers convert --weights fp8" in tight.advice
    hopeless = plan_stages(dev, "cpu=4GiB", stages=("diffusion",))["diffusion"]  # 11.1 GiB of fp8 does not fit either
    assert not hopeless.fits and "fp8" not in hopeless.advice


@pytest.mark.parametrize("offload", ["stream", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_t5_stored_in_bf16_encodes_bit_for_bit_as_the_method(tmp_path, offload):
    """Half T5's bytes, the same embeddings: its feed-forward reads ``wo.weight.dtype`` outside ``wo``,
    so its layers are upcast as a group (a layer-by-layer upcast let it round to bf16 there)."""
    from helpers.encode import encode_prompts
    from helpers.embeddings import load_embeddings

    out = {}
    for weights in (None, "bf16"):
        path = tmp_path / f"{weights}.safetensors"
        result = encode_prompts("tiny", ["a red circle on a blue background"], path, max_sequence_length=32,
                                max_memory="cpu=50%,disk=100%", offload=offload, weights=weights)
        assert result.plan.precision.weights == (weights or "fp32") and result.plan.precision.compute == "fp32"
        out[weights] = load_embeddings(path)[0]
    assert all(torch.equal(out[None][k], out["bf16"][k]) for k in out[None])


# --------------------------------------------------------------------------- decoding on the way in


def test_decode_into_gives_the_formulas_bits():
    """fp8 by moving bits equals ``dequantize_rows`` bit for bit: every e4m3fn byte (subnormals, both
    zeros), rows of every size of scale, and a scale too large for the trick (the formula then)."""
    from helpers.formats.codecs import _e4m3_bits, decode_into, dequantize_rows

    codes = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)  # not the NaNs
    q = codes.repeat(7, 3).view(torch.float8_e4m3fn)
    scale = torch.tensor([1e-30, 3e-7, 1e-4, 0.01, 1.0, 100.0, 1000.0])  # the last: past the trick's range
    odd = torch.tensor([1.17e-38, 0.0123457, 3.3333333e-3, 0.7071068, 1.9921875, 7.77, 127.9])  # bf16 rounds them
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.empty(q.shape, dtype=dtype)
        decode_into(q, out, scale)
        assert torch.equal(out, dequantize_rows(q, scale, dtype)), dtype
        for rows in (scale[:-1], odd):  # within range: the bits are moved (float16 has no room for 2**-120)
            moved = torch.empty(len(rows), q.shape[1], dtype=dtype)
            assert _e4m3_bits(q[:len(rows)], rows, moved) == (dtype != torch.float16)
            if dtype != torch.float16:
                want = dequantize_rows(q[:len(rows)], rows, dtype)
                assert torch.equal(moved.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                   want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), dtype
    w = torch.randn(33, 17).to(torch.bfloat16)
    assert torch.equal(decode_into(w, torch.empty(33, 17)), w.float())  # exact widening
    assert torch.equal(decode_into(w, torch.empty(33, 17, dtype=torch.bfloat16)), w)


def test_the_row_factors_kept_for_the_next_decode_follow_the_scales():
    """The bit decode keeps each layer's row factors on its scale tensor: a second decode reads them,
    and scales changed in place (a load into the same buffer) or another dtype are worked out again."""
    from helpers.formats.codecs import decode_into, dequantize_rows, quantize_rows

    q, scale = quantize_rows(torch.randn(8, 40))
    for dtype in (torch.bfloat16, torch.float32, torch.bfloat16):
        first, again = torch.empty(8, 40, dtype=dtype), torch.empty(8, 40, dtype=dtype)
        decode_into(q, first, scale)
        decode_into(q, again, scale)
        assert torch.equal(first, again) and torch.equal(first, dequantize_rows(q, scale, dtype))
    assert scale._e4m3_factors[0][0] == torch.bfloat16
    scale.mul_(3)  # in place: the kept factors are stale
    now = torch.empty(8, 40, dtype=torch.bfloat16)
    decode_into(q, now, scale)
    assert torch.equal(now, dequantize_rows(q, scale, torch.bfloat16)) and not torch.equal(now, first)


def test_fp8_moves_to_the_device_as_stored_and_is_decoded_there(tiny_fp8):
    """RAM -> device (the CPU standing in for the GPU): pinned RAM and every copy hold fp8 bytes, and
    the pieces are dequantized from the staging buffer into the pool, giving the disk stream's output."""
    from diffusers import FluxTransformer2DModel

    from helpers.offload.streamers import HostStreamer, load_streaming

    folder = tiny_fp8 / "transformer"
    blocks = ["transformer_blocks", "single_transformer_blocks"]
    inputs = _flux_inputs(SimpleNamespace(**FluxTransformer2DModel.load_config(folder)))
    from helpers.formats.sources import read_safetensors_index

    whole = sum(entry[2] for entry in read_safetensors_index(folder).values())
    model, disk = load_streaming(folder, FluxTransformer2DModel, torch.bfloat16, whole // 2, blocks,
                                 compute=torch.float32)  # the folder says fp8
    assert upcast_layerwise(model, torch.float32) == 0  # hooked once, by the loader, for every layer
    try:
        assert {p.dtype for b in disk.blocks for p in b.params[0]} >= {torch.float8_e4m3fn}  # computed from as read
        with torch.no_grad():
            expected = model(**inputs)[0]
        names = [b.name for b in disk.blocks]
    finally:
        disk.close()
    host = HostStreamer(model, folder, names, "cpu", dtype=torch.float32)
    try:
        linear = [t for b in host.blocks for t in b.tensors if t.stored == torch.float8_e4m3fn]
        assert linear and host.convert and host.staging is not None
        stored, computed = sum(b.stored_nbytes for b in host.blocks), sum(b.nbytes for b in host.blocks)
        assert host.host_bytes == stored < 0.5 * computed  # fp8 (and bf16 biases) against float32
        with torch.no_grad():
            assert torch.equal(model(**inputs)[0], expected)
        assert host.bytes_copied >= stored  # what crossed: stored bytes
    finally:
        host.close()
