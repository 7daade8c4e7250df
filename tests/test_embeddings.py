import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers.embeddings import FORMAT, fingerprint, load_embeddings, read_header, save_embeddings, validate
from helpers.errors import UserError
from helpers.models import component_configs


def _tensors(batch=2, tokens=8, dim=32, pooled=32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, pooled, generator=g),
            torch.zeros(tokens, 3))


def _save(path, batch=2, tokens=8, **kw):
    pe, pooled, ids = _tensors(batch, tokens)
    args = dict(model="tiny", fingerprint="abc", prompts=[f"p{i}" for i in range(batch)], max_sequence_length=tokens)
    args.update(kw)
    return save_embeddings(path, {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "text_ids": ids}, **args)


def test_round_trip_bfloat16_with_metadata(tmp_path):
    pe, pooled, ids = _tensors()
    path = save_embeddings(tmp_path / "e.safetensors", {"prompt_embeds": pe, "pooled_prompt_embeds": pooled,
                                                        "text_ids": ids}, model="tiny", fingerprint="abc",
                           prompts=["a cat", "a dög"], max_sequence_length=8)
    tensors, header = load_embeddings(path, expected_fingerprint="abc",
                                      widths={"prompt_embeds": 32, "pooled_prompt_embeds": 32})
    assert tensors["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(tensors["prompt_embeds"], pe.to(torch.bfloat16))
    assert torch.equal(tensors["text_ids"], ids)
    assert header.prompts == ["a cat", "a dög"] and header.batch == 2 and header.max_sequence_length == 8
    meta = header.metadata
    assert meta["format"] == FORMAT and meta["format_version"] == "1" and meta["dtype"] == "bfloat16"
    assert {"torch", "diffusers", "transformers", "helpers"} <= set(json.loads(meta["versions"]))
    assert meta["created"].endswith("+00:00")
    assert header.summary()["tensors"]["prompt_embeds"] == "BF16 [2, 8, 32]"


def test_never_overwrites_unless_asked(tmp_path):
    path = _save(tmp_path / "e.safetensors")
    before = path.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        _save(path, prompts=["x", "y"])
    assert path.read_bytes() == before  # left byte-identical
    _save(path, overwrite=True, prompts=["x", "y"])
    assert read_header(path).prompts == ["x", "y"]


def test_fingerprint_tells_models_apart():
    tiny, medium, dev, schnell = (fingerprint(component_configs(m)[1]) for m in ("tiny", "medium", "flux-dev", "flux-schnell"))
    assert len({tiny, medium, dev}) == 3
    assert dev == schnell  # the same text encoders: embeddings are interchangeable


def test_the_same_shapes_with_other_weights_are_told_apart(tmp_path, tiny_folder):
    """A random twin and a trained one share every shape: the weights' identity tells them apart, and
    an embeddings file made by one is refused by the other, naming the model that made it."""
    import shutil

    from helpers.embeddings import weights_identity
    from helpers.encode import encode_prompts

    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    clip = other / "text_encoder" / "model.safetensors"
    data = bytearray(clip.read_bytes())
    data[-2:] = bytes([data[-2] ^ 1, data[-1]])  # one bit of one weight
    clip.write_bytes(bytes(data))
    mine, theirs = weights_identity(tiny_folder), weights_identity(other)
    assert mine and theirs and mine != theirs and weights_identity(tmp_path / "empty") is None
    path = encode_prompts(str(other), ["a red circle on a blue background"], tmp_path / "e.safetensors",
                          max_sequence_length=8).path
    assert read_header(path).metadata["text_encoder_weights"] == theirs
    assert validate(path, expected_weights=theirs)
    with pytest.raises(UserError, match=f"encoded by model '{other}'.* other text-encoder weights.*{theirs}.*{mine}"):
        validate(path, expected_weights=mine)
    assert validate(_save(tmp_path / "old.safetensors"), expected_weights=mine)  # a file that records none: shapes only


@pytest.mark.parametrize("check, fragment", [
    (dict(expected_fingerprint="zzz"), "encoded by model 'tiny'"),
    (dict(widths={"prompt_embeds": 4096}), "32 wide, this transformer takes 4096"),
    (dict(widths={"pooled_prompt_embeds": 768}), "pooled_prompt_embeds are 32 wide"),
    (dict(expected_family="flux2"), "holds FLUX.1 embeddings and this model is not FLUX.1"),
])
def test_mismatch_with_the_consuming_model_is_explained(tmp_path, check, fragment):
    path = _save(tmp_path / "e.safetensors")
    with pytest.raises(UserError, match=fragment) as info:
        validate(path, **check)
    assert "02_text-encoding-offload" in str(info.value)


def test_bad_files_are_explained(tmp_path):
    with pytest.raises(UserError, match="no embeddings file .*02_text-encoding-offload"):
        validate(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="is a folder"):
        validate(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        validate(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(UserError, match="not an embeddings file"):
        validate(other)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 4, 8, dtype=torch.bfloat16)}, str(wrong),
              metadata={"format": FORMAT, "format_version": "1"})
    with pytest.raises(UserError, match="lacks pooled_prompt_embeds"):
        validate(wrong)
    future = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(1)}, str(future), metadata={"format": FORMAT, "format_version": "9"})
    with pytest.raises(UserError, match="format version '9'"):
        validate(future)


def test_save_rejects_inconsistent_batches(tmp_path):
    pe, pooled, _ = _tensors(batch=2)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        save_embeddings(tmp_path / "e.safetensors", {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}, model="m",
                        fingerprint="f", prompts=["one"],
                        max_sequence_length=8)


WRITER = """
import sys, torch
from helpers.embeddings import save_embeddings
pe = torch.zeros(64, 512, 4096)  # 256 MiB in bfloat16: long enough to be killed mid-write
print("writing", flush=True)
save_embeddings(sys.argv[1], {"prompt_embeds": pe, "pooled_prompt_embeds": torch.zeros(64, 768)}, model="m", fingerprint="f",
                prompts=["p"] * 64, max_sequence_length=512)
print("done", flush=True)
"""


@pytest.mark.slow
def test_killed_writer_leaves_no_half_file(tmp_path):
    target = tmp_path / "big.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".big.") for p in tmp_path.iterdir()):
        time.sleep(0.001)  # wait until the temporary file exists: the write has begun
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()  # nothing under the final name
    assert not os.path.exists(str(target) + ".tmp")
