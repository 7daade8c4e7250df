"""What the user hands us is input from elsewhere: paths that are not files, jobs made on another
machine or by hand, folders of other pipelines. Each is refused through the command line a user
types, at once, with status 2 and one line naming the problem, and nothing the user had is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

import commands
from test_refusals import MINE, _embeddings, _pause_hook, _Run, _said_once, assert_refused, offload_folders

SIZE = ["--height", "32", "--width", "32", "--steps", "1"]


@contextlib.contextmanager
def unblocked_after(fifo: Path, seconds: float = 20):
    """A command that opened ``fifo`` to read would wait for a writer forever: after ``seconds`` a
    writer opens it and writes junk, so that such a command fails its test instead of hanging the suite."""
    done = threading.Event()

    def writer():
        if done.wait(seconds):
            return
        with contextlib.suppress(OSError):  # ENXIO: nobody reads it, which is what the test wants
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.write(fd, b"junk")
            os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _not_a_file(tmp_path: Path, kind: str) -> Path:
    if kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
        return path
    return Path("/dev/zero")


@pytest.fixture
def good(tmp_path) -> Path:
    return _embeddings(tmp_path / "good.safetensors")


@pytest.fixture
def mine(tmp_path) -> Path:
    path = tmp_path / "x.png"
    path.write_bytes(MINE)
    return path


@pytest.mark.parametrize("kind, said", [("fifo", "a FIFO (named pipe)"), ("device", "a character device")])
@pytest.mark.parametrize("argument, expected", [("--embeddings", "an embeddings file"),
                                                ("--transformer", "a transformer's .gguf or .safetensors file"),
                                                ("--job", "a job file")])
def test_a_path_that_is_not_a_file_is_refused_at_once(tmp_path, good, mine, kind, said, argument, expected):
    odd = _not_a_file(tmp_path, kind)
    args = ["--embeddings", odd] if argument == "--embeddings" else ["--embeddings", good, argument, odd]
    start = time.perf_counter()
    with unblocked_after(odd):
        done = commands.run("diffuse", *args, "--out", mine, "--overwrite", *([] if argument == "--job" else SIZE))
    assert time.perf_counter() - start < 15
    assert_refused(done, f"{odd} is {said}, not {expected}")
    assert mine.read_bytes() == MINE


def test_a_model_folder_holds_files_only(tmp_path, tiny_folder, good, mine):
    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    weights = sorted((model / "transformer").glob("*.safetensors"))[0]
    weights.unlink()
    os.mkfifo(weights)
    with unblocked_after(weights):
        done = commands.run("diffuse", "--embeddings", good, "--model", model, "--out", mine, "--overwrite", *SIZE)
    assert_refused(done, f"{weights} is a FIFO (named pipe), not a file")
    weights.unlink()
    weights.symlink_to(tmp_path / "gone.safetensors")
    assert_refused(commands.run("footprint", "--model", model), f"{weights} is a link to nothing")
    assert mine.read_bytes() == MINE


@pytest.mark.parametrize("index, said", [({"_class_name": "StableDiffusionPipeline"}, "holds a StableDiffusionPipeline"),
                                         ({}, "holds no pipeline (no _class_name)"),
                                         ("[1, 2]", "is not readable JSON")])
def test_a_folder_is_the_pipeline_its_model_index_names(tmp_path, tiny_folder, good, mine, index, said):
    model = tmp_path / "model"
    shutil.copytree(tiny_folder, model)
    (model / "model_index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    for command in (["footprint", "--model", model],
                    ["diffuse", "--embeddings", good, "--model", model, "--out", mine, "--overwrite", *SIZE]):
        done = commands.run(*command)
        assert_refused(done, said)
        assert "FluxPipeline" in done.stderr or "JSON" in said
    assert mine.read_bytes() == MINE


# --------------------------------------------------------------------------- jobs from elsewhere


@pytest.fixture(scope="module")
def saved_job(tmp_path_factory):
    """Embeddings and the job `diffuse --save-job` planned for them at 32x32, as JSON."""
    folder = tmp_path_factory.mktemp("job")
    good = _embeddings(folder / "good.safetensors")
    done = commands.run("diffuse", "--embeddings", good, "--out", folder / "x.png", "--height", "32", "--width", "32",
                        "--save-job", folder / "job.json")
    assert done.returncode == 0, done.stderr
    return good, json.loads((folder / "job.json").read_text())


def test_a_job_runs_by_itself_at_the_size_it_was_planned_for(saved_job, tmp_path):
    from PIL import Image

    good, job = saved_job
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = commands.run("diffuse", "--embeddings", good, "--job", tmp_path / "job.json", "--out", tmp_path / "y.png",
                        "--steps", "1")
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "y.png").size == (32, 32)
    wrong = commands.run("diffuse", "--embeddings", good, "--job", tmp_path / "job.json", "--out", tmp_path / "z.png",
                         "--steps", "1", "--width", "64")
    assert_refused(wrong, "the job was planned for a 32x32 image")
    assert not (tmp_path / "z.png").exists()


def _on_a_gpu(job: dict) -> None:
    """What a host with one more GPU than this one planned: the RAM tier's weights on that GPU."""
    import torch

    gpu = torch.cuda.device_count()
    plan = job["plan"]
    plan["budget"]["tiers"] = [[gpu, 8 << 30], *plan["budget"]["tiers"]]
    for component in plan["components"]:
        component["units"] = [[n, b, gpu if t == "cpu" else t] for n, b, t in component["units"]]
        component["device_map"] = [[k, gpu if t == "cpu" else t] for k, t in component["device_map"]]


def _set(path: str, value):
    def edit(job: dict) -> None:
        *where, last = path.split("/")
        node = job
        for key in where:
            node = node[int(key) if key.isdigit() else key]
        node[int(last) if last.isdigit() else last] = value
    return edit


@pytest.mark.parametrize("edit, fragment", [
    (_on_a_gpu, "places weights on GPU"),
    (_set("plan/budget/tiers/0/1", -5), "a job's budget for cpu is -5, not a whole number of bytes above 0"),
    (_set("plan/budget/tiers/0/1", 0), "a job's budget for cpu is 0"),
    (_set("plan/budget/tiers/0/1", "5GiB"), "a job's budget for cpu is '5GiB'"),
    (_set("plan/budget/tiers/0/0", "gpu"), "a job names a tier that is not one: unknown tier 'gpu'"),
    (_set("plan/components/0/units/0/1", -1), "not a whole number of bytes 0 or more"),
    (_set("plan/components/0/component", "unet"), "a job names component(s) 'unet'"),
    (_set("plan/reserve", [["cpu", -1]]), "a job's reserve on cpu is -1"),
    (_set("offload", "magic"), "magic"),
    (_set("plan/components/0/device_map/1/0", "transformer_blocks.99"), "names 'transformer_blocks.99', which"),
    (_set("plan/components/1/device_map", []), "a job's device map for vae leaves"),
    (_set("plan/workload/height", -32), "height must be a whole number"),
], ids=["gpu", "negative", "zero", "text", "tier", "unit", "component", "reserve", "offload", "unknown module",
        "unplaced", "workload"])
def test_a_job_is_read_as_untrusted_input(saved_job, tmp_path, mine, edit, fragment):
    good, job = saved_job
    job = json.loads(json.dumps(job))
    edit(job)
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = commands.run("diffuse", "--embeddings", good, "--job", tmp_path / "job.json", "--out", mine, "--overwrite")
    assert_refused(done, fragment)
    assert mine.read_bytes() == MINE


# --------------------------------------------------------------------------- full and read-only disks


@pytest.fixture
def disk(tmp_path):
    """A small disk of its own (a 256 KiB tmpfs, which mounting needs root for), holding the file the
    user already has; unmounted after."""
    import subprocess

    where = tmp_path / "disk"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


def _read_only(disk: Path) -> None:
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


def _commands(good: Path, tiny_folder: Path, disk: Path, other: Path) -> dict:
    """Each command that writes, its output on ``disk`` (where the user's own file has that name)."""
    return {
        "diffuse": (["diffuse", "--embeddings", good, "--out", disk / "x.png", "--overwrite", *SIZE], "x.png"),
        "encode": (["encode", "--prompt", "a red circle", "--max-sequence-length", "16", "--overwrite",
                    "--out", disk / "e.safetensors"], "e.safetensors"),
        "convert": (["convert", "--model", tiny_folder, "--weights", "fp8", "--out", disk / "fp8"], None),
        "convert-file": (["convert", "--model", tiny_folder, "--weights", "q8_0", "--out", disk / "t.gguf"], None),
        "save-job": (["diffuse", "--embeddings", good, "--out", other / "y.png", *SIZE, "--overwrite",
                      "--save-job", disk / "job.json"], "job.json"),
    }


@pytest.mark.parametrize("state, said", [
    ("full", ("no space left on the disk", "free space there, or write elsewhere", " free; free space there")),
    ("read-only", ("the file system is read-only",)),
])
@pytest.mark.parametrize("command", ["diffuse", "encode", "convert", "convert-file", "save-job"])
def test_a_full_or_read_only_disk_is_one_line_and_the_users_file_stays(disk, tmp_path, tiny_folder, good, state, said,
                                                                       command):
    args, name = _commands(good, tiny_folder, disk, tmp_path)[command]
    if name:
        (disk / name).write_bytes(MINE)
    _fill(disk) if state == "full" else _read_only(disk)
    before = sorted(p.name for p in disk.iterdir())
    done = commands.run(*args)
    assert done.returncode == 2, done.stderr[-3000:]
    # one line (after the progress bars of work whose output size could not be known before it ran)
    lines = done.stderr.replace("\r", "\n").strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert any(s in errors[0] for s in said) and str(disk) in errors[0], errors[0]
    assert sorted(p.name for p in disk.iterdir()) == before  # no temporary left
    if name:
        assert (disk / name).read_bytes() == MINE


def test_a_librarys_write_that_meets_a_full_disk_is_one_line_and_leaves_no_temporary(disk):
    import torch
    from safetensors.torch import save_file

    from helpers.embeddings import save_embeddings
    from helpers.errors import UserError
    from helpers.files import write_error

    (disk / "e.safetensors").write_bytes(MINE)
    _fill(disk)
    with pytest.raises(Exception) as raw:  # safetensors (Rust) says ENOSPC in its own error type
        save_file({"x": torch.zeros(1 << 16)}, str(disk / "t.safetensors"))
    assert not isinstance(raw.value, OSError)
    assert "no space left on the disk" in str(write_error(raw.value, disk / "t.safetensors"))
    (disk / "t.safetensors").unlink(missing_ok=True)
    with pytest.raises(UserError, match=f"cannot write {disk / 'e.safetensors'}: no space left on the disk"):
        save_embeddings(disk / "e.safetensors", {"prompt_embeds": torch.zeros(1, 512, 32),
                                                 "pooled_prompt_embeds": torch.zeros(1, 32)}, model="tiny",
                        fingerprint="x", prompts=["a"], max_sequence_length=512, overwrite=True)
    assert sorted(p.name for p in disk.iterdir()) == ["e.safetensors", "filler"]
    assert (disk / "e.safetensors").read_bytes() == MINE
    assert write_error(ValueError("not a disk's")) is None and write_error(FileNotFoundError(2, "gone")) is None


def test_the_disk_tiers_copies_need_room_before_they_are_written(disk, tmp_path, tiny_folder, good):
    _fill(disk)
    done = commands.run("diffuse", "--embeddings", good, "--model", tiny_folder, "--offload", "accelerate",
                        "--max-memory", "cpu=50%,disk=100%", "--out", tmp_path / "x.png", *SIZE,
                        env={"FLUX_OUTPUTS": disk})
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.replace("\r", "\n").strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:] and "Traceback" not in done.stderr
    assert "the disk tier's copies of transformer needs about" in lines[-1] and "0 B free" in lines[-1], lines[-1]
    assert not (tmp_path / "x.png").exists() and sorted(p.name for p in disk.iterdir()) == ["filler", "offload"]
    assert not list((disk / "offload").iterdir())  # this run's folder removed


# --------------------------------------------------------------------------- a scheduler's stop


STOPS = {"SIGTERM": (signal.SIGTERM, "stopped (SIGTERM)"),
         "SIGHUP": (signal.SIGHUP, "stopped (SIGHUP: the terminal or session closed)")}


@pytest.mark.slow
@pytest.mark.parametrize("stop, group", [
    ("SIGTERM", False),  # `timeout`, `kill PID`: the parent alone, whose stage used to be left running
    ("SIGTERM", True),  # systemd, Slurm, Kubernetes: every process
    ("SIGHUP", True),  # the terminal closed
    ("SIGHUP", False),
], ids=["SIGTERM-parent", "SIGTERM-group", "SIGHUP-group", "SIGHUP-parent"])
def test_a_stop_signal_ends_generate_as_ctrl_c_does(tmp_path, stop, group):
    signum, said = STOPS[stop]
    run_ = _Run(tmp_path, "--height", "128", "--width", "128", "--max-sequence-length", "16", "--steps", "2000")
    run_.wait_for("stage 2: diffusion")
    run_.wait_for("/2000")  # the stage's progress bar counts steps
    _said_once(run_.interrupt(group, signum), said)
    assert run_.nothing_left() == ["x.safetensors"]  # stage 1's file kept, no partial image, no stage left


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_ends_encode_while_it_loads(tmp_path, stop):
    signum, said = STOPS[stop]
    where = "helpers.formats.sources:read_tensor"
    before = offload_folders()
    run_ = _Run(tmp_path, command=["encode", "--prompt", "a red circle", "--max-sequence-length", "16",
                                   "--out", tmp_path / "out" / "e.safetensors"],
                env_extra={"PYTHONPATH": str(_pause_hook(tmp_path)), "TEST_PAUSE_IN": where, "TEST_PAUSE_STAGE": "encode"})
    run_.wait_for(f"TEST: paused in {where}")
    _said_once(run_.interrupt(False, signum), said)
    assert run_.nothing_left() == []
    assert offload_folders() <= before


@pytest.mark.slow
@pytest.mark.parametrize("stop, group", [("SIGTERM", False), ("SIGHUP", True)], ids=["SIGTERM-parent", "SIGHUP-group"])
def test_a_stop_signal_ends_every_worker(tmp_path, good, stop, group):
    import psutil

    signum, said = STOPS[stop]
    two = tmp_path / "two.safetensors"
    done = commands.run("encode", "--prompt", "a red circle", "--prompt", "a blue square", "--max-sequence-length",
                        "16", "--out", two)
    assert done.returncode == 0, done.stderr
    run_ = _Run(tmp_path, command=["diffuse", "--embeddings", two, "--out", tmp_path / "out" / "img.png",
                                   "--height", "128", "--width", "128", "--steps", "2000", "--workers", "2"])
    run_.wait_for("/2000")
    family = psutil.Process(run_.proc.pid).children(recursive=True)  # torchrun and its workers
    assert len(family) >= 3
    err = run_.interrupt(group, signum)
    _said_once(err, said)
    assert "SignalException" not in err and "death signal" not in err  # torchrun's own account is not shown
    assert run_.nothing_left() == []
    psutil.wait_procs(family, timeout=5)
    assert not [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_a_killed_convert_leaves_a_temporary_that_the_next_run_removes(tmp_path, tiny_folder):
    import subprocess
    import sys

    where = "helpers.formats.convert:_convert_component"
    env = {**os.environ, "PYTHONPATH": str(_pause_hook(tmp_path)), "TEST_PAUSE_IN": where, "TEST_PAUSE_STAGE": "convert"}
    out = tmp_path / "copies"
    out.mkdir()
    killed = subprocess.Popen([sys.executable, "-m", "helpers", "convert", "--model", str(tiny_folder), "--weights",
                               "fp8", "--out", str(out / "fp8")], stderr=subprocess.PIPE, env=env)
    said = b""
    while b"TEST: paused" not in said:
        chunk = os.read(killed.stderr.fileno(), 4096)
        assert chunk, said.decode()
        said += chunk
    killed.kill()  # SIGKILL: nothing of its own cleanup runs
    killed.wait()
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".fp8.") and str(killed.pid) in left[0], left
    live = out / f".fp8.{socket.gethostname()}-{os.getpid()}.x"  # a run still writing: kept
    live.mkdir()
    done = commands.run("convert", "--model", tiny_folder, "--weights", "fp8", "--out", out / "fp8")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(["fp8", live.name])
