"""The transformer as one file (GGUF, single safetensors, BFL layout): written from the tiny twin,
read back equal to the gguf package's own dequantization, held as stored and decoded layer by layer
to the same output, and refused before any weight is read when it does not fit the model."""

import os

import numpy as np
import pytest
import torch

import commands
from helpers.errors import UserError
from helpers.families.flux1.layout import PREFIX, from_bfl, to_bfl
from helpers.formats.transformer_file import (check_transformer_file, load_transformer_file, open_transformer_file,
                                      read_transformer_state, write_transformer_file)

gguf = pytest.importorskip("gguf")

FILES = [("q8_0", "gguf"), ("q4_0", "gguf"), ("q6_k", "gguf"), ("bf16", "gguf"), ("bf16", "safetensors"),
         ("fp8", "safetensors"), ("fp8-cast", "safetensors")]


@pytest.fixture(scope="module")
def twin(tiny_folder):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_folder / "transformer", dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="module")
def files(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer-files")
    return {(fmt, ext): write_transformer_file(tiny_folder, fmt, root / f"tiny-{fmt}.{ext}", progress=False)
            for fmt, ext in FILES}


def _inputs(config):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3),
                txt_ids=torch.zeros(8, 3), return_dict=False)


def _reference(path, config) -> dict:
    """The file read by the libraries themselves: gguf's reader and dequantization, or safetensors,
    then the BFL layout's inverse."""
    if path.suffix == ".gguf":
        reader = gguf.GGUFReader(path)
        bfl = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
               .reshape(tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors}
    else:
        from safetensors.torch import load_file

        raw = load_file(str(path))
        bfl = {k: (v.float() * raw[k + "_scale"][:, None]) if k + "_scale" in raw else v.float()
               for k, v in raw.items() if not k.endswith("_scale")}
    return {k: v.float() for k, v in from_bfl(bfl, config).items()}


@pytest.mark.parametrize("fmt,ext", FILES)
def test_a_file_reads_as_the_libraries_read_it_and_runs_held_as_stored(files, twin, fmt, ext):
    from diffusers import FluxTransformer2DModel

    from helpers.precision import stored_bytes

    path = files[fmt, ext]
    state = read_transformer_state(path, twin.config)
    reference = _reference(path, twin.config)
    assert set(state) == set(twin.state_dict())
    assert all(torch.equal(state[k], reference[k]) for k in state)  # bit for bit
    decoded = FluxTransformer2DModel.from_config(dict(twin.config)).eval()
    decoded.load_state_dict(state)
    held = load_transformer_file(path, twin.config, torch.float32)
    with torch.no_grad():
        expected, out = decoded(**_inputs(twin.config))[0], held(**_inputs(twin.config))[0]
        full = twin(**_inputs(twin.config))[0]
    assert torch.equal(out, expected)  # decoded layer by layer: the same weights, the same output
    ratio = stored_bytes(held) / (stored_bytes(twin) / 2)  # against the twin in bf16
    error = ((out - full).norm() / full.norm()).item()
    # bytes held as the file stores them (the tiny twin's narrow rows keep some tensors in bf16)
    expected_ratio = {"q8_0": (0.5, 0.6), "q4_0": (0.25, 0.35), "q6_k": (0.9, 1.0), "bf16": (0.99, 1.02),
                      "fp8": (0.5, 0.6), "fp8-cast": (0.45, 0.55)}[fmt]
    assert expected_ratio[0] <= ratio <= expected_ratio[1], ratio
    assert error < {"q8_0": 0.02, "q4_0": 0.2, "q6_k": 0.01, "bf16": 0.01, "fp8": 0.06, "fp8-cast": 0.06}[fmt], error


def test_the_prefix_of_full_model_saves_is_read(tmp_path, twin):
    from safetensors.torch import save_file

    state = {PREFIX + k: v.to(torch.bfloat16).contiguous() for k, v in to_bfl(twin.state_dict(), twin.config).items()}
    save_file(state, str(tmp_path / "comfy.safetensors"))
    read = read_transformer_state(tmp_path / "comfy.safetensors", twin.config)
    assert all(torch.equal(read[k], v.to(torch.bfloat16).float()) for k, v in twin.state_dict().items())


def test_files_that_do_not_fit_the_model_are_refused_before_any_weight(files, twin, tmp_path, monkeypatch):
    import helpers.formats.transformer_file as tf

    read = []
    monkeypatch.setattr(tf, "read_piece", lambda *a, **k: read.append(a) or (_ for _ in ()).throw(AssertionError))
    path = files["q8_0", "gguf"]
    schnell = {**dict(twin.config), "guidance_embeds": False}
    with pytest.raises(UserError, match="FLUX.1-dev transformer .*has guidance_in.* the model is FLUX.1-schnell"):
        load_transformer_file(path, schnell)
    narrower = {**dict(twin.config), "attention_head_dim": twin.config.attention_head_dim // 2,
                "axes_dims_rope": [d // 2 for d in twin.config.axes_dims_rope]}
    with pytest.raises(UserError, match="is of a model of another size"):
        load_transformer_file(path, narrower)
    from safetensors.torch import save_file  # another model's file: a CLIP text encoder's names

    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(UserError, match="not a FLUX.1 transformer in the BFL layout: missing"):
        load_transformer_file(tmp_path / "clip.safetensors", twin.config)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="cut short"):
        check_transformer_file(cut, twin.config)
    assert read == []


def test_a_file_written_on_many_cores_is_the_same_file(files, tiny_folder, tmp_path):
    """Q8_0 and Q4_0 quantized with torch (a GPU, or 4 threads or more) write the bytes gguf's writer does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for fmt in ("q8_0", "q4_0"):
            path = write_transformer_file(tiny_folder, fmt, tmp_path / f"many-{fmt}.gguf", progress=False)
            assert path.read_bytes() == files[(fmt, "gguf")].read_bytes()
    finally:
        torch.set_num_threads(threads)


def test_writing_never_replaces_a_file(files, tiny_folder, tmp_path):
    path = files["q4_0", "gguf"]
    before = path.stat().st_mtime_ns
    with pytest.raises(UserError, match="exists; a transformer file is never replaced"):
        write_transformer_file(tiny_folder, "q4_0", path, progress=False)
    assert path.stat().st_mtime_ns == before
    with pytest.raises(UserError, match=r"a \.safetensors file is written as bf16, fp8, fp8-cast, not 'q8_0'"):
        write_transformer_file(tiny_folder, "q8_0", tmp_path / "x.safetensors", progress=False)
    with pytest.raises(UserError, match=r"ends in \.gguf or \.safetensors"):
        write_transformer_file(tiny_folder, "q8_0", tmp_path / "x.bin", progress=False)
    assert sorted(os.listdir(tmp_path)) == []  # nothing left behind


@pytest.mark.parametrize("fmt,ext", [("q4_0", "gguf"), ("q8_0", "gguf"), ("fp8", "safetensors")])
def test_the_stream_reads_a_file_as_stored_and_gives_the_held_output(files, twin, tiny_folder, fmt, ext):
    """Streamed from the file by offsets (the stored bytes, GGUF blocks included) under a budget of a
    third of the file: the output of the whole file held in RAM, bit for bit."""
    from diffusers import FluxTransformer2DModel

    from helpers.offload.streamers import load_streaming
    from helpers.precision import stored_bytes

    path = files[fmt, ext]
    held = load_transformer_file(path, twin.config, torch.float32)
    whole = stored_bytes(held)
    model, streamer = load_streaming(tiny_folder / "transformer", FluxTransformer2DModel, torch.bfloat16, whole // 3,
                                     ["transformer_blocks", "single_transformer_blocks"], compute=torch.float32,
                                     source=open_transformer_file(path, twin.config))
    try:
        assert streamer is not None and len(streamer.blocks) > 10
        with torch.no_grad():
            expected = held(**_inputs(twin.config))[0]
            before = streamer.bytes_streamed
            assert torch.equal(model(**_inputs(twin.config))[0], expected)
            moved = streamer.bytes_streamed - before
        streamed = sum(p.numel() * p.element_size() for b in streamer.blocks for p in held.get_submodule(b.name).parameters())
        assert moved == streamed  # the file's bytes, not decoded ones
        kinds = {t.stored for b in streamer.blocks for t in b.tensors}
        assert (torch.uint8 in kinds) == (ext == "gguf")
        assert stored_bytes(model) <= whole  # resident part as stored (streamed parts on meta count as stored too)
    finally:
        streamer.close()


def test_convert_command_writes_a_transformer_file(tiny_folder, tmp_path):
    out = tmp_path / "tiny-Q8_0.gguf"
    args = ["convert", "--model", str(tiny_folder), "--weights", "q8_0", "--out", str(out)]
    done = commands.run(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(out) and "transformer: q8_0" in done.stderr and "Q8_0" in done.stderr
    wrong = commands.run(*args[:-1], tmp_path / "copy")
    assert wrong.returncode == 2 and "give --out a .gguf name" in wrong.stderr
    again = commands.run(*args)
    assert again.returncode == 2 and "never replaced" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-Q8_0.gguf"]


@pytest.mark.slow
def test_the_plan_counts_a_file_from_its_header_and_both_offloads_run_it(files, tiny_folder, twin, tmp_path):
    """--transformer FILE: planned in the file's stored bytes (shares of the budget are of those), then
    loaded with accelerate's map (disk tier in an offload folder) and streamed: the same image. The
    model's own transformer weights are never read: a folder with its transformer's config alone (what
    a hub model fetches for a file) runs it."""
    import shutil

    from helpers.activations import Workload
    from helpers.diffuse import diffusion_plan, generate, load_diffusion
    from helpers.precision import stored_bytes

    shutil.copytree(tiny_folder, tmp_path / "model", ignore=lambda d, names: [
        n for n in names if d.endswith("transformer") and n != "config.json"])
    tiny_folder = tmp_path / "model"
    assert [p.name for p in (tiny_folder / "transformer").iterdir()] == ["config.json"]
    path = files["q4_0", "gguf"]
    plan = diffusion_plan(str(tiny_folder), "cpu=50%,disk=100%", workload=Workload(64, 64, 1, 8), compute="fp32",
                          transformer_file=path)
    file = plan.precision.file
    assert file is not None and file.label == "Q4_0 GGUF" and file.variant == "dev"
    assert plan.as_dict()["precision"]["transformer_file"]["types"]["Q4_0"] > 100
    transformer = next(p for p in plan.components if p.component == "transformer")
    placed = sum(u.nbytes for u in transformer.units)
    assert placed == stored_bytes(file.skeleton(twin)) < 0.4 * stored_bytes(twin) / 2  # Q4_0, against bf16
    assert "disk" in {u.tier for u in transformer.units}
    g = torch.Generator().manual_seed(2)
    tensors = {"prompt_embeds": torch.randn(1, 8, twin.config.joint_attention_dim, generator=g).to(torch.bfloat16),
               "pooled_prompt_embeds": torch.randn(1, twin.config.pooled_projection_dim, generator=g).to(torch.bfloat16)}
    images = {}
    for offload in ("accelerate", "stream"):
        diffusion = load_diffusion(tiny_folder, plan, offload=offload, progress=False)
        try:
            if offload == "stream":
                assert diffusion.streamer is not None
                assert torch.uint8 in {t.stored for b in diffusion.streamer.blocks for t in b.tensors}
            else:
                assert "disk" in set(diffusion.applied.values())
            out = generate(diffusion, tensors, seed=0, steps=2, guidance=3.5, height=64, width=64, progress=False)
            images[offload] = np.asarray(out.images[0]).copy()
        finally:
            diffusion.close()
    assert np.array_equal(images["accelerate"], images["stream"])
    assert images["stream"].std() > 1  # a picture, not a flat field


@pytest.mark.slow
def test_generate_takes_a_transformer_file_and_refuses_a_foreign_one_before_stage_1(files, tiny_folder, tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    base = ["generate", "--model", str(tiny_folder), "--prompt", "a red circle on a blue background", "--height", "64",
            "--width", "64", "--steps", "2", "--max-memory", "cpu=50%,disk=100%"]
    out = tmp_path / "circle.png"
    done = commands.run(*base, "--out", out, "--transformer", files["q8_0", "gguf"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert Image.open(out).info["transformer_file"] == files["q8_0", "gguf"].name
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, str(tmp_path / "clip.safetensors"))
    refused = commands.run(*base, "--out", tmp_path / "no.png", "--transformer", tmp_path / "clip.safetensors")
    assert refused.returncode == 2 and "not a FLUX.1 transformer" in refused.stderr
    assert "stage 1" not in refused.stderr and not (tmp_path / "no.safetensors").exists()


@pytest.mark.slow
def test_bench_runs_a_file_and_says_so_per_result(files, tiny_folder):
    """bench --transformer FILE: our strategies on the file (its format per result, its stored bytes
    streamed), the method and the float32 reference on the model's own weights; diffusers' own reading of
    the file (from_single_file with its GGUF quantizer) held whole, and its group offloading to disk,
    which fails on a GGUF model, with why; an fp8 file with row scales, which diffusers cannot read,
    reported as not run, with why."""
    from helpers.bench import run

    path = files["q4_0", "gguf"]
    data = run(str(tiny_folder), "cpu=50%,disk=100%", steps=1, strategies=["resident", "stream", "method",
               "diffusers-group", "diffusers-resident"], compute="fp32", transformer_file=path, image=False, progress=lambda _: None)
    by = {r["strategy"]: r for r in data["results"]}
    assert data["precision"]["transformer_file"]["path"] == path.name  # a name, no folder
    assert data["model"] == tiny_folder.name  # the model folder by its name too
    assert by["resident"]["file_format"] == by["stream"]["file_format"] == "Q4_0 GGUF"
    assert by["method"]["file_format"] is None and by["method"]["weights"] == "bf16"
    assert by["stream"]["max_abs_diff_vs_resident"] == 0.0  # the file streamed = the file held
    assert 0.02 < by["stream"]["rel_error_vs_fp32"] < 0.3  # Q4_0 against the model's float32
    theirs = by["diffusers-resident"]
    assert theirs["file_format"] == "Q4_0 GGUF" and theirs["s_per_step"] > 0 and "error" not in theirs
    # diffusers dequantizes the same blocks: the same output as the file held, to float32 rounding
    assert theirs["rel_error_vs_fp32"] == pytest.approx(by["stream"]["rel_error_vs_fp32"], rel=1e-3)
    group = by["diffusers-group"]
    assert "cannot save a GGUFParameter" in group["error"] and group["s_per_step"] is None
    scaled = run(str(tiny_folder), "cpu=50%,disk=100%", steps=1, compute="fp32",
                 strategies=["diffusers-group", "diffusers-resident"],
                 transformer_file=files["fp8", "safetensors"], image=False, progress=lambda _: None)
    assert all("per-row fp8 scales" in r["error"] and r["s_per_step"] is None for r in scaled["results"])


def test_footprint_plans_a_file_from_its_header(files, tiny_folder):
    import json

    args = ["footprint", "--model", str(tiny_folder), "--max-memory", "cpu=50%,disk=100%", "--height", "64",
            "--width", "64", "--json"]
    plain = commands.run(*args)
    assert plain.returncode == 0, plain.stderr[-2000:]
    plain = json.loads(plain.stdout)
    done = commands.run(*args, "--transformer", files["q4_0", "gguf"])
    assert done.returncode == 0, done.stderr[-2000:]
    q4 = json.loads(done.stdout)
    weights = {name: sum(t["bytes"] for t in data["plan"]["diffusion"]["tiers"].values())
               for name, data in (("bf16", plain), ("q4_0", q4))}
    assert q4["plan"]["diffusion"]["precision"]["transformer_file"]["types"]["Q4_0"] == 314
    assert weights["q4_0"] < 0.5 * weights["bf16"]  # the transformer's Q4_0 bytes, the VAE's bf16
