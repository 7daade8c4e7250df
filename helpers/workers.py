"""Many prompts on many workers: one embeddings file shared out among processes that torchrun starts.

Stage 1 writes every prompt of a batch to one file and stage 2 only reads it, so stage 2 spreads
over workers with the standard launcher and nothing else: ``torchrun --nproc-per-node N -m helpers
diffuse ...`` (several hosts: ``--nnodes`` and a rendezvous endpoint), ``accelerate launch``
(which runs torchrun for several processes), or ``diffuse --workers N``, which runs torchrun for you.

- Who does what: each process reads its rank and the number of processes from the launcher's
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``: :func:`this_worker`) and makes its share of
  the prompts (:func:`share`: whole chunks of ``batch_size`` prompts, the first ranks one chunk more
  where they do not divide evenly, as accelerate's ``split_between_processes`` cuts). No process
  group is needed: the shares are computed, not negotiated. A process that a launcher started
  among several but that cannot tell its rank would make every image with the others; it is
  refused (:func:`this_worker`).
- The same image whatever the number of workers: prompt ``i`` is seeded with ``seed + i``
  (:func:`prompt_seed`) and made in the same chunk of ``batch_size`` prompts (default 1) whichever
  worker makes it, so the computation is the same one; bit for bit on a CPU where each worker
  has the same number of threads (``--threads``). The thread count matters: the transformer's
  float32 math gives the same bits on 1 or 2 threads (measured), but oneDNN's 1x1 convolutions in
  the VAE's decoder split their sums by thread (1.2e-6 apart, one 8-bit pixel in 2 of 8 images).
- A worker that dies: the launcher ends the others; ``--workers`` then names the prompts whose
  images are missing, and ``--resume`` makes only those (existing images kept: they are written
  atomically, so one that exists is whole).
- GPUs: with several on a host, each worker takes its own (:func:`own_gpu_budget`: the budget's
  GPU 0 becomes the worker's local rank), the budget is each worker's.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from helpers.errors import UserError
from helpers.signals import signum_of

#: environment variables that say a launcher started several processes, and which one this is
_LAUNCHERS = {"OMPI_COMM_WORLD_SIZE": "mpirun (Open MPI)", "PMI_SIZE": "an MPI launcher",
              "SLURM_NTASKS": "srun (Slurm)"}


@dataclass(frozen=True)
class Worker:
    """This process among the workers: its ``rank`` of ``world`` (all hosts), and its rank on this host."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def describe(self) -> str:
        return f"worker {self.rank + 1} of {self.world}" if self.world > 1 else "one worker"


def _int(env, name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"the environment sets {name}={value!r}, which is not a whole number.") from None


def this_worker(env=None) -> Worker:
    """This process's place among the workers, from torchrun's environment (``accelerate launch``
    sets the same). Refused where several processes were started but this one cannot tell its
    rank (each would make every image): ``WORLD_SIZE`` without ``RANK``, a rank outside the
    world, or another launcher's several processes (MPI, Slurm) without torchrun's variables."""
    env = os.environ if env is None else env
    world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
    local = _int(env, "LOCAL_RANK")
    if world is None:
        if rank is not None:
            raise UserError(f"the environment sets RANK={rank} but no WORLD_SIZE; start the workers with torchrun.")
        for name, launcher in _LAUNCHERS.items():
            if (_int(env, name) or 1) > 1:
                raise UserError(
                    f"{launcher} started {env[name]} processes ({name}), but this command shares the prompts out by "
                    "torchrun's RANK and WORLD_SIZE, which are not set: every process would make every image. "
                    "Start it with torchrun --nproc-per-node N (or --workers N), or as one process."
                )
        return Worker()
    if world < 1:
        raise UserError(f"WORLD_SIZE={world}: there must be at least one worker.")
    if rank is None:
        raise UserError(f"WORLD_SIZE={world} but no RANK: this worker cannot tell which prompts are its own, and "
                        "would make every image; start the workers with torchrun.")
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not one of the {world} workers (0 to {world - 1}).")
    return Worker(rank, world, rank if local is None else local)


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be a whole number of prompts, 1 or more, not {batch_size!r}.")
    return batch_size


def chunks(count: int, batch_size: int = 1) -> list[list[int]]:
    """The prompts ``0..count-1`` in the chunks one pipeline call makes (``batch_size`` each, the last shorter)."""
    check_batch_size(batch_size)
    return [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]


def share(count: int, worker: Worker, batch_size: int = 1) -> list[list[int]]:
    """The chunks of prompts ``worker`` makes: contiguous runs of whole chunks, the first
    ``len(chunks) % world`` workers one more (a worker may have none when there are more workers
    than chunks). Every prompt is in exactly one worker's share."""
    all_chunks = chunks(count, batch_size)
    base, extra = divmod(len(all_chunks), worker.world)
    start = worker.rank * base + min(worker.rank, extra)
    return all_chunks[start:start + base + (1 if worker.rank < extra else 0)]


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` of a file run with ``seed``: ``seed + index`` (modulo 2**64), so
    a one-prompt file keeps the seed it is given, and a prompt's image does not depend on which
    worker makes it."""
    return (seed + index) % 2**64


def missing(paths: list[Path]) -> list[int]:
    """The indices of ``paths`` with no file (images not made yet)."""
    return [i for i, p in enumerate(paths) if not Path(p).is_file()]


def own_gpu(worker: Worker, gpus: int) -> int | None:
    """The GPU ``worker`` takes on a host with ``gpus`` of them: its local rank; ``None`` alone or
    on a host with one GPU or none (then every worker has the budget as it is)."""
    if worker.world == 1 or gpus < 2:
        return None
    if worker.local_rank >= gpus:
        raise UserError(f"worker {worker.rank} is local rank {worker.local_rank} but this host has {gpus} GPUs; start "
                        f"at most {gpus} workers per host.")
    return worker.local_rank


def own_gpu_budget(spec: str | None, worker: Worker, gpus: int) -> str | None:
    """The budget of ``worker`` when its host has several GPUs: the budget names GPU 0 (the one each
    worker sees as its own) and the worker takes GPU ``local_rank``; otherwise ``spec`` as it is."""
    if spec is None or not own_gpu(worker, gpus):
        return spec
    parts = [p.strip() for p in spec.split(",")]
    keys = [p.partition("=")[0].strip() for p in parts]
    gpu_keys = [k for k in keys if re.fullmatch(r"\d+", k)]
    if gpu_keys != ["0"]:
        return spec  # a budget that names its GPUs itself is taken as it is
    return ",".join(f"{worker.local_rank}={p.partition('=')[2]}" if k == "0" else p for k, p in zip(keys, parts))


def check_workers(workers: int) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers must be a whole number, 1 or more, not {workers!r}.")
    if workers > 1 and os.environ.get("WORLD_SIZE"):
        raise UserError("--workers starts the workers itself; under torchrun or accelerate launch leave it out.")
    return workers


def check_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"--threads must be a whole number, 1 or more, not {threads!r}.")
    return threads


def launch_command(workers: int, argv: list[str], threads: int) -> tuple[list[str], dict]:
    """The torchrun command (and environment) that runs ``python -m helpers ARGV`` on ``workers``
    local processes: one host (``--standalone``), each with ``threads`` CPU threads."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               "-m", "helpers", *argv]
    return command, {**os.environ, "OMP_NUM_THREADS": str(threads)}


#: how long torchrun may take to stop its workers after a stop signal before they are killed
STOP_GRACE_S = 60.0


def run_workers(workers: int, argv: list[str], threads: int, env_extra: dict | None = None) -> int:
    """Run ``python -m helpers ARGV`` on ``workers`` processes through torchrun and wait; its status.

    torchrun and its workers are a process group of their own, so that a stop reaches them once,
    from here: Ctrl-C, SIGTERM or SIGHUP to this process is passed on to torchrun, which stops its
    workers with it (each removes its partial image); a group that has not ended within
    :data:`STOP_GRACE_S` is killed. The stop is raised again here once they are gone."""
    command, env = launch_command(workers, argv, threads)
    child = subprocess.Popen(command, env={**env, **(env_extra or {})}, process_group=0, stderr=subprocess.PIPE)
    stopping = threading.Event()
    relay = threading.Thread(target=_relay, args=(child.stderr, stopping), daemon=True)
    relay.start()
    try:
        return child.wait()
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM or SIGHUP (helpers.signals.Stopped)
        stopping.set()  # torchrun's account of the stop (a traceback of its own) is not the user's business
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum_of(err))
        try:
            child.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # whatever of the group is left: its workers too
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise
    finally:
        relay.join(timeout=10)
        child.stderr.close()


def _relay(pipe, stopping: threading.Event) -> None:
    """Pass what torchrun and the workers say on to this process's stderr as it comes; once a stop
    has begun, drop it."""
    fd = pipe.fileno()
    text = codecs.getincrementaldecoder("utf-8")("replace")  # a character may be cut between two reads
    while chunk := os.read(fd, 65536):
        if stopping.is_set():
            continue
        with contextlib.suppress(OSError, ValueError):  # SIGHUP: the terminal may be gone
            sys.stderr.write(text.decode(chunk))
            sys.stderr.flush()
