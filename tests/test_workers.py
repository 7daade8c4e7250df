"""Stage 2 on several workers: shares, seeds, the launcher's environment, and real torchrun runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers.errors import UserError
from helpers.workers import Worker, chunks, own_gpu_budget, prompt_seed, share, this_worker

PROMPTS = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")]
SETTINGS = ["--height=64", "--width=64", "--steps=6", "--max-memory=cpu=50%,disk=100%"]


def test_every_prompt_is_in_exactly_one_share():
    for count in range(0, 11):
        for world in range(1, 5):
            for batch in (1, 2, 3):
                shares = [share(count, Worker(r, world), batch) for r in range(world)]
                made = [i for s in shares for c in s for i in c]
                assert made == list(range(count))  # each once, in order, contiguous per worker
                assert all(c in chunks(count, batch) for s in shares for c in s)  # whole pipeline calls
                sizes = [len(s) for s in shares]
                assert max(sizes) - min(sizes) <= 1


def test_seeds_follow_the_prompt_not_the_worker():
    assert prompt_seed(7, 0) == 7 and prompt_seed(7, 3) == 10 and prompt_seed(2**64 - 1, 1) == 0


def test_the_launchers_environment():
    assert this_worker({}) == Worker()
    assert this_worker({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Worker(1, 2, 1)
    assert this_worker({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == Worker(3, 4, 0)  # second host
    with pytest.raises(UserError, match="no RANK"):
        this_worker({"WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="not one of the 2 workers"):
        this_worker({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="no WORLD_SIZE"):
        this_worker({"RANK": "0"})
    # several processes that would each make every image: refused, not run
    with pytest.raises(UserError, match="every process would make every image"):
        this_worker({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
    with pytest.raises(UserError, match="srun"):
        this_worker({"SLURM_NTASKS": "4", "SLURM_PROCID": "1"})
    assert this_worker({"SLURM_NTASKS": "1"}) == Worker()


def test_each_worker_takes_its_own_gpu():
    spec = "0=11GiB,cpu=30GiB"
    assert own_gpu_budget(spec, Worker(1, 2, 1), gpus=2) == "1=11GiB,cpu=30GiB"
    assert own_gpu_budget(spec, Worker(0, 2, 0), gpus=2) == spec
    assert own_gpu_budget(spec, Worker(1, 2, 1), gpus=1) == spec  # one card: shared, as given
    assert own_gpu_budget("0=11GiB,1=11GiB,cpu=30GiB", Worker(1, 2, 1), gpus=2) == "0=11GiB,1=11GiB,cpu=30GiB"
    with pytest.raises(UserError, match="at most 2 workers per host"):
        own_gpu_budget(spec, Worker(2, 3, 2), gpus=2)


# --------------------------------------------------------------------------- real runs


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def eight(tiny_folder, tmp_path_factory):
    """An 8-prompt embeddings file, and its images made by one worker on one thread (the reference)."""
    root = tmp_path_factory.mktemp("workers")
    emb = root / "eight.safetensors"
    done = _run("encode", f"--model={tiny_folder}", *[f"--prompt={p}" for p in PROMPTS], f"--out={emb}")
    assert done.returncode == 0, done.stderr
    (root / "one").mkdir()
    start = time.perf_counter()
    done = _run("diffuse", f"--embeddings={emb}", f"--out={root / 'one' / 'img.png'}", *SETTINGS, "--threads=1")
    assert done.returncode == 0, done.stderr
    print(f"1 worker: {time.perf_counter() - start:.1f} s")
    return emb, [root / "one" / f"img-{i}.png" for i in range(1, 9)]


def _pixels(path):
    return np.asarray(Image.open(path))


def _same_images(paths, reference):
    for got, want in zip(paths, reference):
        assert np.array_equal(_pixels(got), _pixels(want)), got


@pytest.mark.slow
def test_two_workers_make_the_same_images_each_prompt_once(eight, tmp_path):
    emb, reference = eight
    (tmp_path / "two").mkdir()
    report = tmp_path / "report.json"
    start = time.perf_counter()
    done = _run("diffuse", f"--embeddings={emb}", f"--out={tmp_path / 'two' / 'img.png'}", *SETTINGS, "--workers=2",
                f"--report={report}")
    assert done.returncode == 0, done.stderr
    print(f"2 workers: {time.perf_counter() - start:.1f} s")
    paths = [tmp_path / "two" / f"img-{i}.png" for i in range(1, 9)]
    _same_images(paths, reference)  # pixel for pixel
    made_by = json.loads(report.read_text())["made_by"]
    assert len(made_by) == 2 and all(made_by)
    assert sorted(p for w in made_by for p in w) == sorted(str(p) for p in paths)  # each made once
    meta = [Image.open(p).text for p in paths]
    assert [int(m["seed"]) for m in meta] == [prompt_seed(0, i) for i in range(8)]
    # nothing left to make: --resume loads nothing
    again = _run("diffuse", f"--embeddings={emb}", f"--out={tmp_path / 'two' / 'img.png'}", *SETTINGS, "--workers=2",
                 "--resume")
    assert again.returncode == 0 and "nothing to make" in again.stderr


def _children(pid):
    import psutil

    return psutil.Process(pid).children(recursive=True)


@pytest.mark.slow
def test_a_killed_worker_is_named_and_resume_makes_only_what_is_missing(eight, tmp_path):
    emb, reference = eight
    (tmp_path / "k").mkdir()
    out = tmp_path / "k" / "img.png"
    paths = [tmp_path / "k" / f"img-{i}.png" for i in range(1, 9)]
    run = subprocess.Popen([sys.executable, "-m", "helpers", "diffuse", f"--embeddings={emb}", f"--out={out}",
                            *SETTINGS, "--workers=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(p.exists() for p in paths) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = [c for c in _children(run.pid) if c.environ().get("RANK") == "1"]
    assert victim, "the second worker was not found"
    victim[0].send_signal(signal.SIGKILL)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2, err
    last = err.strip().splitlines()[-1]
    assert "were not made" in last and "--resume" in last and "8 ('a yellow square')" in last
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths if p.exists()}
    assert 0 < len(kept) < 8
    assert not list((tmp_path / "k").glob("*.tmp*"))  # no half-written image left
    refused = _run("diffuse", f"--embeddings={emb}", f"--out={out}", *SETTINGS, "--threads=1")
    assert refused.returncode == 2 and "--resume" in refused.stderr
    done = _run("diffuse", f"--embeddings={emb}", f"--out={out}", *SETTINGS, "--threads=1", "--resume")
    assert done.returncode == 0, done.stderr
    made = [line for line in done.stdout.splitlines() if line.endswith(".png")]
    assert sorted(made) == sorted(str(p) for p in paths if p not in kept)  # only the missing ones
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept  # the others untouched
    _same_images(paths, reference)


@pytest.mark.slow
def test_two_nodes_on_loopback(eight, tmp_path):
    """Two torchrun launches of one node each, meeting at a rendezvous on 127.0.0.1: the same images."""
    emb, reference = eight
    (tmp_path / "n").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=loopback",
               "-m", "helpers", "diffuse", f"--embeddings={emb}", f"--out={tmp_path / 'n' / 'img.png'}", *SETTINGS,
               "--threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], results
    paths = [tmp_path / "n" / f"img-{i}.png" for i in range(1, 9)]
    _same_images(paths, reference)
    said = "".join(err for _, err in results)
    assert "worker 1 of 2" in said and "worker 2 of 2" in said


def test_one_transformer_over_two_gpus_in_one_budget():
    """Two cards in one budget: accelerate's map puts FLUX.1-dev's blocks on both (planned on the meta
    device here; loaded where two GPUs exist), each card within its share, the activations' room on
    the card that computes first."""
    from helpers.activations import Workload
    from helpers.planner import plan_stage

    plan = plan_stage("diffusion", "flux-dev", "0=11GiB,1=11GiB,cpu=30GiB", workload=Workload(1024, 1024, 1, 512),
                      runnable=False)
    transformer = next(c for c in plan.components if c.component == "transformer")
    assert {0, 1} <= set(transformer.device_map.values())
    used = plan.tier_bytes()
    assert used[0] + plan.reserve_bytes <= 11 * 2**30 and used[1] <= 11 * 2**30
    assert used[1] > 10 * 2**30  # the second card is filled: it keeps no activations' room
