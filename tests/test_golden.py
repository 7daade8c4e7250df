"""Golden outputs: what the planner, the saved jobs and the tiny twin's image were before a restructuring,
held byte for byte so that moving code cannot move a result.

``tests/golden/`` holds ``footprint --json`` of tiny, medium, flux-dev and flux-schnell under the method's
budget and one tier down, the saved job of each stage on the tiny twin, and one image of ``generate`` on
it. A change that alters one of them on purpose writes them again (``GOLDEN_WRITE=1 pytest
tests/test_golden.py``) and says in its commit which and why.

Machine-bound parts are pinned so the files hold on any CPU: budgets are explicit (no probe of this
machine's GPU or RAM), diffusion one tier down computes in bf16 by flag (``auto`` would ask the CPU) on a
CPU said to lack native bf16 (``--cpu-bf16 no``: what a bf16 convolution holds depends on it), the jobs
are planned for that CPU too, and the image is made in float32. The image's pixels (not the PNG's bytes: its metadata holds the time) are compared byte for byte where the CPU is of the kind that
wrote it (native bf16 or not: the matmul kernels differ) and to within one level in 255 elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from commands import run

GOLDEN = Path(__file__).parent / "golden"
WRITE = bool(os.environ.get("GOLDEN_WRITE"))

BUDGETS = {"method": ["--max-memory", "0=8.5GiB,cpu=30GiB"],
           "one-tier-down": ["--max-memory", "cpu=8.5GiB,disk=30GiB", "--compute", "bf16", "--cpu-bf16", "no"]}
MODELS = ("tiny", "medium", "flux-dev", "flux-schnell")
PROMPT = "a red circle on a blue background, on the left"


def _cpu_kind() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return "avx512_bf16" if "avx512_bf16" in flags else "no-native-bf16"


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if WRITE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"{path} is missing: write the golden files with GOLDEN_WRITE=1 before a restructuring"
    assert text == path.read_text(), f"{name} differs from the golden file"


def _footprint(model: str, budget: str) -> str:
    like = ["--like", "flux-dev"] if model in ("tiny", "medium") else []
    done = run("footprint", "--model", model, *BUDGETS[budget], *like, "--json")
    assert done.returncode == 0, done.stderr
    return json.dumps(json.loads(done.stdout), indent=1, sort_keys=True) + "\n"


@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_footprint_is_golden(budget):
    _check(f"footprint-tiny-{budget}.json", _footprint("tiny", budget))


@pytest.mark.slow
@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("model", ["medium", "flux-dev", "flux-schnell"])
def test_footprint_is_golden_more_models(model, budget):
    _check(f"footprint-{model}-{budget}.json", _footprint(model, budget))


def _job_text(path: Path, tmp_path: Path) -> str:
    """The saved job, with this run's temporary folder written as ``TMP``."""
    return path.read_text().replace(str(tmp_path), "TMP")


def test_saved_jobs_are_golden(tmp_path):
    assert run("model", "tiny").returncode == 0  # built: the jobs settle their offload on its weights
    emb, job1, job2 = tmp_path / "e.safetensors", tmp_path / "encode.json", tmp_path / "diffuse.json"
    done = run("encode", "--model", "tiny", "--prompt", PROMPT, "--out", emb, "--max-memory",
               "cpu=8.5GiB,disk=30GiB", "--cpu-bf16", "no", "--save-job", job1)
    assert done.returncode == 0, done.stderr
    _check("job-text_encoding-tiny.json", _job_text(job1, tmp_path))
    done = run("encode", "--model", "tiny", "--prompt", PROMPT, "--out", emb)
    assert done.returncode == 0, done.stderr
    done = run("diffuse", "--embeddings", emb, "--out", tmp_path / "i.png", "--max-memory", "cpu=8.5GiB,disk=30GiB",
               "--compute", "fp32", "--cpu-bf16", "no", "--height", "64", "--width", "64", "--save-job", job2)
    assert done.returncode == 0, done.stderr
    _check("job-diffusion-tiny.json", _job_text(job2, tmp_path))


@pytest.mark.slow
def test_generate_image_is_golden(tmp_path):
    out = tmp_path / "g.png"
    done = run("generate", "--model", "tiny", "--prompt", PROMPT, "--out", out, "--seed", "7", "--steps", "4",
               "--height", "64", "--width", "64", "--compute", "fp32")
    assert done.returncode == 0, done.stderr
    pixels = np.asarray(Image.open(out).convert("RGB"))
    record = GOLDEN / "generate-tiny.json"
    if WRITE:
        np.save(GOLDEN / "generate-tiny.npy", pixels)
        record.write_text(json.dumps({"sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
                                      "cpu": _cpu_kind()}, indent=1) + "\n")
        return
    want = json.loads(record.read_text())
    golden = np.load(GOLDEN / "generate-tiny.npy")
    assert pixels.shape == golden.shape
    if want["cpu"] == _cpu_kind():
        assert hashlib.sha256(pixels.tobytes()).hexdigest() == want["sha256"], "the image differs from the golden one"
    else:  # another kind of CPU: other matmul kernels, the same picture to within one level
        assert np.abs(pixels.astype(int) - golden.astype(int)).max() <= 1
