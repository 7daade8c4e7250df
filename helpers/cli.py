"""The command line: ``python -m helpers SUBCOMMAND``.

Each subcommand calls the same helper functions the notebooks use, so a stage can run as its own
process: in a script, a test, or on a GPU machine. Exit status: 0 on success, 2 on a user error
(one line on stderr, no traceback), 130 when interrupted (Ctrl-C), 143 when stopped by SIGTERM and
129 by SIGHUP (each: one line, no partial file, no child process left), 1 on anything unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.errors import UserError
from helpers.files import in_outputs, write_error
from helpers.signals import StopSignals, Stopped, exit_status, said, signum_of, stopped_by

_EPILOG = ("Exit status: 0 success, 2 user error (one line, no traceback), 130 interrupted (Ctrl-C), "
           "143 stopped by SIGTERM, 129 by SIGHUP, 1 unexpected error.")
#: set in the environment of `generate`'s stages: the parent says "interrupted" for the whole run
_STAGE_CHILD = "FLUX_HELPERS_STAGE_CHILD"
#: how long a stage may take to clean up after a stop (Ctrl-C, SIGTERM, SIGHUP) before `generate` kills it
_STAGE_GRACE_S = 60.0


def _finite(text: str) -> float:
    """argparse type: a finite number (``inf`` and ``nan`` are refused as any other typo)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _cmd_model(args: argparse.Namespace) -> int:
    from helpers.report import format_bytes
    from helpers.files import folder_size
    from helpers.models import resolve_model
    from helpers.twins.builder import twin_folder, twin_is_built, twin_specs

    ref = resolve_model(args.name)
    if args.components and ref.kind != "hub":
        raise UserError("--components only applies to hub models; a twin or a local folder is used whole.")
    fresh = ref.kind == "twin" and (args.rebuild or not twin_is_built(ref.name, twin_folder(ref.name)))
    start = time.perf_counter()
    if fresh:
        weights = "trained on the shapes world" if twin_specs()[ref.name].trained else "random weights"
        print(f"building the {ref.name} twin ({weights}, FLUX.1 layout)...", file=sys.stderr)
    path = ref.folder(components=args.components or None, download=args.download, rebuild=args.rebuild)
    if fresh:
        took = time.perf_counter() - start
        print(f"built in {took:.1f} s, {format_bytes(folder_size(path))} on disk", file=sys.stderr)
    elif ref.name in twin_specs():
        print(f"reusing the {ref.name} twin ({format_bytes(folder_size(path))})", file=sys.stderr)
    print(path)
    return 0


def _cmd_footprint(args: argparse.Namespace) -> int:
    import json

    from helpers.activations import Workload
    from helpers.budget import METHOD_BUDGET, parse_budget
    from helpers.report import Table, format_bytes
    from helpers.devicemap import summarise, tier_label
    from helpers.diffuse import check_settings
    from helpers.encode import check_max_sequence_length
    from helpers.footprint import footprint
    from helpers.planner import plan_stages, report
    from helpers.models import resolve_model
    from helpers.precision import resolve

    ref = resolve_model(args.model)
    spec = args.max_memory if args.max_memory is not None else METHOD_BUDGET
    parse_budget(spec, model_bytes=2**40)  # reject a bad budget before building anything (shares: any size)
    length = args.max_sequence_length or ref.usual.text_length
    check_max_sequence_length(length, ref.variant, ref.family)
    check_settings(args.height, args.width, 1, 0.0)
    workload = Workload(args.height, args.width, args.batch, length)
    like_name = args.like or (ref.family.reference_model if ref.kind == "twin" and args.max_memory is None
                              and not args.transformer else None)
    like_ref = resolve_model(like_name) if like_name else None
    if like_ref is not None:
        like_ref.configs  # a bad --like fails here, before any skeleton is built
    fp = footprint(ref)  # each component as stored; the plans place what each stage runs of it
    trims = any(c.computes is not None for c in ref.family.components)
    planned = footprint(ref, computed=True) if trims else fp
    like = footprint(like_ref, computed=True) if like_ref is not None else None
    fast = parse_budget(spec, model_bytes=2**40).fast
    precisions = {"text_encoding": resolve("text_encoding", args.weights, "auto", fast, ref.family, cpu_native(args)),
                  "diffusion": resolve("diffusion", args.weights, args.compute, fast, ref.family, cpu_native(args))}
    if args.transformer:  # its header alone: the bytes it stores, block by block
        from helpers.formats.transformer_file import open_transformer_file

        if like is not None:
            raise UserError("--like translates a budget between models; a transformer file is planned in its own bytes.")
        file = open_transformer_file(args.transformer, fp.skeletons[fp.family.file_component].config, fp.family)
        precisions["diffusion"] = precisions["diffusion"].with_file(file)
    plans = plan_stages(planned, spec, like=like, workload=workload, precisions=precisions)
    data = report(fp, plans)
    data["max_memory"] = str(spec) if isinstance(spec, str) else str(parse_budget(spec))
    if like is not None:
        data["budget_scaled_like"] = like.model
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(Table(fp.rows(), title=f"{fp.model}: parameters and weights per dtype (GiB = 2**30 bytes, GB = 10**9)"))
    print()
    rows = [{"stage": name, "component": c, "dtype": str(plan.dtype).replace("torch.", ""),
             "weights": format_bytes(fp.components[c].nbytes(plan.dtype)), "activations": format_bytes(n)}
            for name, plan in plans.items() for c, n in plan.activations.items()]
    print(Table(rows, title=f"{fp.model}: what each forward pass holds beyond its weights, at its peak "
                            f"({workload.describe()}, {length} text tokens; counted on the meta device)"))
    print()
    scaled = f", scaled to {fp.model} as {like.model} would be split" if like is not None else ""
    print(f"plan under max_memory {data['max_memory']}{scaled}:")
    for name, plan in plans.items():
        tiers = ", ".join(f"{tier_label(t)} {format_bytes(b)}" for t, b in plan.tier_bytes().items())
        print(f"  {name} ({plan.precision.describe()}): {'fits' if plan.fits else 'DOES NOT FIT'}; {tiers}")
        print(f"    {plan.advice}")
        for warning in plan.warnings:
            print(f"    warning: {warning}")
    print()
    rows = [r for plan in plans.values() for r in summarise(plan.components)]
    print(Table(rows, formats={"bytes": format_bytes}, title="where the blocks go (from / to: first and last unit on the tier)"))
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    from helpers.report import Table, format_bytes
    from helpers.encode import encode_prompts, run_text_encoding
    from helpers.job import check_job_alone

    job = _read_job(args, "text_encoding")
    create_folder = in_outputs(Path(args.out).parent)
    if job is not None:  # the planner's job, run as it says: the flags it fixes are refused beside it
        check_job_alone(job, "text_encoding", args.model, max_memory=args.max_memory, weights=args.weights,
                        compute=args.compute, offload=args.offload, cpu_bf16=args.cpu_bf16)
        if args.max_sequence_length is not None and job.workload is not None:
            from dataclasses import replace

            job.check_workload(replace(job.workload, tokens=args.max_sequence_length))
        result = run_text_encoding(job, args.prompt, args.out, overwrite=args.overwrite, create_folder=create_folder)
    else:
        result = encode_prompts(
            args.model, args.prompt, args.out, max_memory=args.max_memory,
            max_sequence_length=args.max_sequence_length, overwrite=args.overwrite, create_folder=create_folder,
            offload=args.offload, weights=args.weights, compute=args.compute, check_only=bool(args.save_job),
            cpu_bf16=cpu_native(args),
        )
    if args.save_job:
        return _save_job(result, args)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for difference in result.differences:
        print(f"note: the applied device map differs from the plan: {difference}", file=sys.stderr)
    m = result.measurement
    print(result.path)
    print(f"wall time {m.wall_s:.2f} s, peak RSS {format_bytes(m.peak_rss)} (+{format_bytes(m.peak_rss_delta)})"
          + "".join(f", peak GPU {i} {format_bytes(b)}" for i, b in m.peak_gpu.items())
          + f"; offload {result.offload}", file=sys.stderr)
    print(Table(result.per_tier(), title=f"per tier, budget {result.plan.budget.describe()}"), file=sys.stderr)
    _write_report(args.report, m)
    return 0


def _read_job(args: argparse.Namespace, stage: str):
    """The job of ``--job FILE`` (refused beside --save-job), or None; a ``--save-job FILE`` that
    cannot be written is refused here, before any planning."""
    from helpers.files import check_can_write, check_writable
    from helpers.job import load_job

    if getattr(args, "job", None) and getattr(args, "save_job", None):
        raise UserError("--job runs a saved plan and --save-job saves a new one: give one of them.")
    if getattr(args, "save_job", None):
        path = Path(args.save_job)
        if path.suffix != ".json":
            raise UserError(f"{path.name}: a job is saved as JSON; give --save-job a name ending in .json.")
        if not path.parent.is_dir():
            raise UserError(f"the folder {path.parent} does not exist; create it or choose another --save-job.")
        check_writable(path.parent, "--save-job")
        check_can_write(path, args.overwrite)
    return load_job(args.job, stage) if getattr(args, "job", None) else None


def _settle_workload(args: argparse.Namespace, job=None) -> None:
    """``--height``, ``--width`` and ``--batch-size`` as given; where left out, what ``job`` was planned
    for (a job runs by itself), else 1024, 1024 and 1. A flag that disagrees with the job is refused
    where the job is checked against the run."""
    planned = job.workload if job is not None else None
    for name, field, default in (("height", "height", 1024), ("width", "width", 1024), ("batch_size", "batch", 1)):
        if getattr(args, name) is None:
            setattr(args, name, getattr(planned, field) if planned is not None else default)


def _save_job(job, args: argparse.Namespace) -> int:
    """``--save-job FILE``: the stage checked and planned, its job written; nothing loaded."""
    from helpers.report import format_bytes

    path = job.save(args.save_job, overwrite=args.overwrite)
    tiers = ", ".join(f"{t} {format_bytes(b)}" for t, b in job.plan.tier_bytes().items())
    print(f"{job.stage.replace('_', ' ')} of {job.model.label}: {job.precision.describe()}, weights {tiers}; "
          f"run it with --job {path}", file=sys.stderr)
    print(path)
    return 0


def _write_report(path: str | None, measurement, **extra) -> None:
    """For `generate`: the child stage's measurement, as JSON."""
    if path:
        import json

        Path(path).write_text(json.dumps({**measurement.as_dict(), **extra}))


def _diffuse_argv(args: argparse.Namespace, embeddings, out, job: Path | None = None) -> list[str]:
    """``diffuse``'s arguments for the images of ``args`` (a ``diffuse`` or ``generate`` command),
    as ``--opt=value`` throughout (a prompt or path may start with "-"); ``--workers`` left out.
    ``job``: the saved job the child runs, in place of the model, budget, precision and offload."""
    argv = [f"--embeddings={embeddings}", f"--out={out}", f"--seed={args.seed}", f"--height={args.height}",
            f"--width={args.width}", f"--batch-size={args.batch_size}"]
    if job is not None:
        argv += [f"--job={job}"]
    else:
        argv += [*([f"--model={args.model}"] if args.model else []), f"--offload={args.offload}",
                 f"--compute={args.compute}", f"--cpu-bf16={args.cpu_bf16}"]
        argv += [f"--max-memory={args.max_memory}"] if args.max_memory else []
        argv += [f"--weights={args.weights}"] if args.weights else []
        argv += [f"--transformer={args.transformer}"] if args.transformer else []
    argv += ["--overwrite"] if args.overwrite else []
    argv += ["--resume"] if getattr(args, "resume", False) else []
    argv += [f"--threads={args.threads}"] if args.threads else []
    argv += [f"--steps={args.steps}"] if args.steps is not None else []
    argv += [f"--guidance={args.guidance!r}"] if args.guidance is not None else []
    return argv


def _diffusion_job(args: argparse.Namespace, job=None, worker=None):
    """``diffuse``'s images checked and its job: ``job`` (``--job``: the flags it fixes refused beside
    it), else one planned here from the flags. Nothing is loaded."""
    from helpers.diffuse import check_images
    from helpers.job import Request, check_job_alone, plan_job
    from helpers.offload.streamers import check_offload

    if job is not None:
        check_job_alone(job, "diffusion", args.model, max_memory=args.max_memory, weights=args.weights,
                        compute=args.compute, offload=args.offload, transformer_file=args.transformer,
                        cpu_bf16=args.cpu_bf16)
    images = check_images(args.embeddings, args.out, job.model if job is not None else args.model, seed=args.seed,
                          steps=args.steps, guidance=args.guidance, height=args.height, width=args.width,
                          batch_size=args.batch_size, overwrite=args.overwrite,
                          create_folder=in_outputs(Path(args.out).parent), resume=args.resume, worker=worker)
    if job is None:
        check_offload(args.offload)
        job = plan_job(Request("diffusion", images.model, args.max_memory, images.workload, args.weights,
                               args.compute, args.offload, args.transformer, cpu_bf16=cpu_native(args)))
    else:
        job.check_workload(images.workload)
    return images, job


def _cmd_diffuse(args: argparse.Namespace) -> int:
    from helpers.report import Table, format_bytes
    from helpers.diffuse import run_diffusion
    from helpers.workers import check_threads, check_workers, own_gpu, own_gpu_budget, this_worker

    job = _read_job(args, "diffusion")
    _settle_workload(args, job)
    if args.save_job:
        return _save_job(_diffusion_job(args, job)[1], args)
    if check_workers(args.workers) > 1:
        return _diffuse_on_workers(args, job)
    worker = this_worker()  # under torchrun: this process's share of the prompts
    import torch

    if args.threads is not None:
        torch.set_num_threads(check_threads(args.threads))
    gpu = own_gpu(worker, torch.cuda.device_count())
    if job is not None:  # the planner's job: on this worker's own card where the host has several
        job = job.on_gpu(gpu) if gpu else job
    elif worker.world > 1:
        args.max_memory = own_gpu_budget(args.max_memory, worker, torch.cuda.device_count())
    images, job = _diffusion_job(args, job, worker)
    result = run_diffusion(job, images, progress=True)
    who = f"{worker.describe()}: " if worker.world > 1 else ""
    report = f"{args.report}.{worker.rank}" if args.report and worker.world > 1 else args.report
    if result.measurement is None:
        print(f"{who}nothing to make: " + ("every image of this file is there already" if args.resume
                                             else "more workers than pipeline calls"), file=sys.stderr)
        if report:
            Path(report).write_text('{"wall_s": 0, "peak_rss_bytes": 0, "peak_gpu_bytes": null, "paths": []}')
        return 0
    for note in result.notes:
        print(f"{who}note: {note}", file=sys.stderr)
    for warning in result.warnings:
        print(f"{who}warning: {warning}", file=sys.stderr)
    for difference in result.differences:
        print(f"{who}note: the applied device map differs from the plan: {difference}", file=sys.stderr)
    for path in result.paths:
        print(path)
    m = result.measurement
    print(f"{who}wall time {m.wall_s:.2f} s ({result.s_per_step:.2f} s per step), peak RSS {format_bytes(m.peak_rss)} "
          f"(+{format_bytes(m.peak_rss_delta)})" + "".join(f", peak GPU {i} {format_bytes(b)}" for i, b in m.peak_gpu.items())
          + f"; offload {result.offload}", file=sys.stderr)
    if worker.world == 1:
        print(Table(result.per_tier(), title=f"per tier, budget {result.plan.budget.describe()}"), file=sys.stderr)
    _write_report(report, m, s_per_step=result.s_per_step, paths=[str(p) for p in result.paths])
    return 0


def _diffuse_on_workers(args: argparse.Namespace, job=None) -> int:
    """``diffuse --workers N``: every check and the plan here, then torchrun runs N workers on this
    host, each making its share with that plan (a job file: none of them plans again); the prompts
    whose images are missing after (a worker that died) are named."""
    import json
    import tempfile

    from helpers.workers import check_threads, run_workers

    start = time.perf_counter()
    images, job = _diffusion_job(args, job)  # every check and the plan, once, here
    header, paths = images.header, images.paths
    todo = [paths[i] for i in images.todo]
    if not todo:
        print("nothing to make: every image of this file is there already", file=sys.stderr)
        return 0
    threads = check_threads(args.threads) if args.threads else max(1, (os.cpu_count() or 1) // args.workers)
    print(f"{len(todo)} images on {args.workers} workers of {threads} CPU threads each (torchrun)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="diffuse-job-") as tmp:
        plan = job.save(Path(tmp) / "job.json")
        argv = ["diffuse", *_diffuse_argv(args, args.embeddings, args.out, job=plan)]
        argv += [] if args.threads else [f"--threads={threads}"]
        argv += [f"--report={args.report}"] if args.report else []
        code = run_workers(args.workers, argv, threads, env_extra={_STAGE_CHILD: "1"})  # this process says it
    wanted = {Path(p).resolve() for p in todo}
    left = [i for i, p in enumerate(paths) if p.resolve() in wanted and not p.is_file()]
    if stopped_by(code) is not None:  # the workers were stopped (and this process was not)
        raise Stopped(stopped_by(code))
    if left:
        named = "; ".join(f"{i + 1} ({header.prompts[i][:40]!r})" for i in left[:8]) + ("; ..." if len(left) > 8 else "")
        raise UserError(f"{len(left)} of the {len(todo)} images were not made (the workers ended with status {code}): "
                        f"prompts {named}. Run the same command with --resume to make only those.")
    if code != 0:
        return code
    for p in paths:
        if p.resolve() in wanted:
            print(p)
    wall = time.perf_counter() - start
    print(f"wall time {wall:.2f} s on {args.workers} workers", file=sys.stderr)
    if args.report:  # for generate: the workers' reports in one
        parts = [Path(f"{args.report}.{r}") for r in range(args.workers)]
        reports = [json.loads(p.read_text()) for p in parts if p.is_file()]
        for p in parts:
            p.unlink(missing_ok=True)
        gpus: dict = {}
        for r in reports:
            for k, v in (r.get("peak_gpu_bytes") or {}).items():
                gpus[k] = max(gpus.get(k, 0), v)
        Path(args.report).write_text(json.dumps({
            "wall_s": wall, "peak_rss_bytes": max((r["peak_rss_bytes"] for r in reports), default=0),
            "peak_gpu_bytes": gpus or None, "workers": args.workers, "paths": [str(p) for p in todo],
            "made_by": [r.get("paths", []) for r in reports]}))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import json

    from helpers.report import format_bytes
    from helpers.formats.convert import convert
    from helpers.precision import FORMAT_FILE, WEIGHTS

    from helpers.models import resolve_model

    ref = resolve_model(args.model)
    components = args.components or [ref.family.file_component]
    if Path(args.out).suffix in (".gguf", ".safetensors"):  # the transformer as one file, BFL layout
        from helpers.formats.sources import read_weights_file
        from helpers.formats.transformer_file import write_transformer_file

        if components != [ref.family.file_component]:
            raise UserError("a .gguf or .safetensors --out holds the transformer alone; drop --components, or give "
                            "a folder.")
        path = write_transformer_file(args.model, args.weights, args.out)
        wf = read_weights_file(path)
        kinds = ", ".join(f"{n} {k}" for k, n in wf.types().items())
        print(f"transformer: {args.weights}, {format_bytes(path.stat().st_size)} ({kinds})", file=sys.stderr)
        print(path)
        return 0
    if args.weights not in WEIGHTS:
        raise UserError(f"--weights {args.weights} writes a transformer file: give --out a .gguf name (or .safetensors "
                        "for fp8-cast); a model folder is stored as one of " + ", ".join(WEIGHTS) + ".")
    out = convert(ref, args.weights, args.out, components=components)
    for comp in components:
        record = json.loads((out / comp / FORMAT_FILE).read_text())
        print(f"{comp}: {record['weights']}, {format_bytes(record['bytes'])} ({record['scheme']})", file=sys.stderr)
    print(out)
    return 0


def _run_stage(name: str, argv: list[str], report: str, outputs: list[Path]) -> None:
    """Run ``python -m helpers NAME ARGV`` as a child and wait for it.

    On Ctrl-C the child has the interrupt too (a terminal signals the whole command; otherwise it
    is passed on), so it removes its partial files and ends; one that takes longer than
    :data:`_STAGE_GRACE_S` is killed, and what it left half-written among ``outputs`` is removed.
    A child that was interrupted interrupts the run; one that failed ends it with its status.
    """
    from helpers.files import remove_partial

    child = subprocess.Popen([sys.executable, "-m", "helpers", name, *argv, "--report", report],
                             env={**os.environ, _STAGE_CHILD: "1"})
    try:
        code = child.wait()
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM or SIGHUP: the same one to the stage (once more is ignored)
        if child.poll() is None:
            child.send_signal(signum_of(err))
            try:
                child.wait(_STAGE_GRACE_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                for path in outputs:
                    remove_partial(path)
        raise
    if stopped_by(code) is not None:  # the stage was stopped (by the terminal, a scheduler, or on its own)
        raise Stopped(stopped_by(code))
    if code < 0:
        raise UserError(f"stage {name} ended by signal {signal.Signals(-code).name}; nothing more was made.")
    if code != 0:
        raise SystemExit(code)  # the stage said why


def _generate_outputs(args: argparse.Namespace, count: int) -> tuple[Path, list[Path], Path]:
    """``generate``'s files, checked before anything runs: the images (one per prompt, none replaced
    unless --overwrite) and the embeddings file between the stages (apart from them)."""
    from helpers.diffuse import output_paths
    from helpers.files import check_can_write

    out = Path(args.out)
    if not out.parent.is_dir() and not in_outputs(out.parent):
        raise UserError(f"the folder {out.parent} does not exist; create it or choose another --out.")
    images = output_paths(out, count)
    for p in images:
        check_can_write(p, args.overwrite)
    embeddings = Path(args.embeddings) if args.embeddings else out.with_suffix(".safetensors")
    if embeddings.suffix != ".safetensors" or embeddings.resolve() in {p.resolve() for p in images}:
        raise UserError(f"--embeddings {embeddings} must be a .safetensors file apart from the images.")
    if embeddings.exists() and not args.overwrite:
        raise UserError(
            f"{embeddings} already exists; to make images from it again: python -m helpers diffuse --embeddings "
            f"{embeddings} --out {out}; or pass --overwrite to encode again."
        )
    return out, images, embeddings


def _cmd_generate(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from helpers.activations import Workload
    from helpers.report import format_bytes
    from helpers.diffuse import check_seed, check_settings
    from helpers.encode import check_max_sequence_length, check_prompts
    from helpers.models import resolve_model

    # everything is checked before the first stage starts: inputs, outputs, and both stages' plans
    _settle_workload(args)
    ref = resolve_model(args.model)
    prompts = check_prompts(args.prompt)
    length = args.max_sequence_length or ref.usual.text_length
    check_max_sequence_length(length, ref.variant, ref.family)
    check_seed(args.seed)
    check_settings(args.height, args.width, 1 if args.steps is None else args.steps,
                   0.0 if args.guidance is None else args.guidance)
    out, images, embeddings = _generate_outputs(args, len(prompts))
    from helpers.job import Request, plan_job
    from helpers.offload.streamers import check_offload
    from helpers.workers import check_batch_size, check_workers

    check_batch_size(args.batch_size)
    check_workers(args.workers)
    check_offload(args.offload)
    # both plans with their activations: a budget, a batch or an image size too large is refused before the
    # weights are fetched or a twin built; each child runs its job as made here, planning nothing again
    requests = {
        "encode": Request("text_encoding", ref, args.max_memory, Workload(batch=len(prompts), tokens=length),
                          args.weights, "auto", args.offload, cpu_bf16=cpu_native(args)),
        "diffuse": Request("diffusion", ref, args.max_memory,
                           Workload(args.height, args.width, min(args.batch_size, len(prompts)), length),
                           args.weights, args.compute, args.offload, args.transformer, cpu_bf16=cpu_native(args)),
    }
    jobs = {name: plan_job(request) for name, request in requests.items()}
    folder = ref.folder(components=list(ref.family.subfolders))  # the weights are there (or the twin is built)
    jobs = {name: job.settled(folder) for name, job in jobs.items()}  # auto settled on these weights

    def stage(name: str, argv: list[str], outputs: list[Path]) -> dict:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            report = f.name
        try:
            _run_stage(name, argv, report, outputs)
            return json.loads(Path(report).read_text())
        finally:
            Path(report).unlink(missing_ok=True)

    with tempfile.TemporaryDirectory(prefix="generate-jobs-") as tmp:
        saved = {name: job.save(Path(tmp) / f"{name}.json") for name, job in jobs.items()}
        overwrite = ["--overwrite"] if args.overwrite else []
        # --opt=value throughout: a prompt or path may start with "-"
        encode_argv = [*[f"--prompt={p}" for p in prompts], f"--max-sequence-length={length}",
                       f"--out={embeddings}", *overwrite, f"--job={saved['encode']}"]
        diffuse_argv = [*_diffuse_argv(args, embeddings, out, job=saved["diffuse"]), f"--workers={args.workers}"]
        print("stage 1: text encoding (its own process)", file=sys.stderr)
        first = stage("encode", encode_argv, [embeddings])
        print("stage 2: diffusion (its own process" + (f", {args.workers} workers)" if args.workers > 1 else ")"),
              file=sys.stderr)
        second = stage("diffuse", diffuse_argv, images)
    print("\nstage          wall time  peak RSS", file=sys.stderr)
    for name, r in (("text encoding", first), ("diffusion", second)):
        gpu = "".join(f", peak GPU {k} {format_bytes(v)}" for k, v in (r.get("peak_gpu_bytes") or {}).items())
        print(f"{name:14} {r['wall_s']:8.2f} s  {format_bytes(r['peak_rss_bytes'])}{gpu}", file=sys.stderr)
    print(f"{'total':14} {first['wall_s'] + second['wall_s']:8.2f} s  (model work only; each process also pays "
          "its imports)", file=sys.stderr)
    return 0


def _cmd_train_twin(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from tqdm.auto import tqdm

    from helpers.families.flux2.training import KLEIN_TRAIN, train_klein
    from helpers.files import check_can_write, check_file, outputs_dir
    from helpers.twins.builder import twin_specs
    from helpers.twins.shipped import trained_weights_path
    from helpers.twins.training import TrainConfig, same_weights, train_twin

    klein = args.twin == "klein-tiny"
    shipped = trained_weights_path(twin_specs()[args.twin])
    out = Path(args.out) if args.out else outputs_dir() / "twins" / f"{args.twin}.safetensors"
    if shipped is not None and out.resolve() == shipped.resolve() and not args.overwrite:
        raise UserError(f"{out} is the file the package ships; add --overwrite to replace it.")
    check_can_write(out, args.overwrite)  # before any work, and before saying it starts
    for flag, value, least in (("--vae-steps", args.vae_steps, 1), ("--flow-steps", args.flow_steps, 1),
                               ("--clip-steps", args.clip_steps, 0), ("--scenes", args.scenes, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be a whole number, {least} or more, not {value}.")
    defaults = KLEIN_TRAIN if klein else TrainConfig()
    if args.vae_from and not klein:
        raise UserError("--vae-from is for --twin klein-tiny.")
    if args.vae_from:
        check_file(Path(args.vae_from), "a weights file of train-twin", "give the .safetensors an earlier run wrote")
    config = replace(defaults, seed=args.seed, max_scenes=args.scenes, vae_from=args.vae_from,
                     **{k: v for k, v in (("vae_steps", args.vae_steps), ("flow_steps", args.flow_steps),
                                          ("clip_steps", args.clip_steps)) if v is not None})
    log = lambda text: print(text, file=sys.stderr)  # noqa: E731
    log(f"training the {args.twin} twin on the shapes world: {config.vae_steps} VAE steps, {config.flow_steps} "
        f"transformer steps, seed {config.seed}, {os.cpu_count()} CPU cores "
        f"({'about an hour' if klein else '25-32 minutes'} on 2)")
    if klein:
        summary = train_klein(out, config, progress=tqdm, log=log, overwrite=args.overwrite)
    else:
        summary = train_twin(out, config, progress=tqdm, log=log, overwrite=args.overwrite)
    vae = f"VAE {summary['vae_loss']:.4f}" if summary.get("vae_loss") is not None else f"VAE from {args.vae_from}"
    log(f"final losses: {vae}, flow {summary['flow_loss']:.4f}; "
        f"{summary['seconds'] / 60:.1f} minutes; {summary['megabytes']:.1f} MB")
    if shipped is not None and shipped.is_file() and out.resolve() != shipped.resolve():
        log("the same weights as the package's" if same_weights(out, shipped) else
            "other weights than the package's (another seed, step count, machine or torch build: floating-point "
            "sums need not round alike)")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(out)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from helpers.bench import rows, run, title
    from helpers.report import Table, format_bytes
    from helpers.files import atomic_path, check_can_write, check_writable

    def save(data: dict) -> None:
        with atomic_path(args.json, overwrite=True) as tmp:  # replaced whole or not at all
            tmp.write_text(json.dumps(data, indent=2))

    def save_partial(data: dict) -> None:
        try:
            save(data)
        except (OSError, UserError) as err:  # the benchmark goes on; the final write says so again if it still fails
            print(f"warning: could not write {args.json} ({err})", file=sys.stderr)

    if args.json:  # before any work: a result already there stays unless --overwrite, a mistyped folder is not made
        check_can_write(args.json, overwrite=args.overwrite)
        if not Path(args.json).expanduser().parent.is_dir() and not in_outputs(Path(args.json).parent):
            raise UserError(f"the folder {Path(args.json).parent} does not exist; create it or choose another --json.")
        if Path(args.json).expanduser().parent.is_dir():
            check_writable(Path(args.json).expanduser().parent, "--json")
    # with --json the file holds each strategy's result as soon as it is measured ("complete": false
    # until the last): a run stopped midway keeps what it measured
    data = run(args.model, args.max_memory, steps=args.steps, height=args.height, width=args.width,
               strategies=args.strategies, progress=lambda line: print(line, file=sys.stderr), cache=args.cache,
               stage=args.stage, tokens=args.tokens, timeout=args.timeout,
               on_result=save_partial if args.json else None, weights=args.weights, compute=args.compute,
               rounds=args.rounds, image=not args.no_image, transformer_file=args.transformer)
    floor = data["floor"]
    print(f"floor: {floor['s_per_step']:.3f} s/step = max(compute {floor['compute_s_per_step'] or 0:.3f} s, "
          f"{format_bytes(floor['bytes_to_move_per_step'])} at {format_bytes(floor['bandwidth_bytes_per_s'])}/s)")
    print(Table(rows(data), title=title(data)))
    failed = [r for r in data["results"] if r.get("error")]
    for r in failed:
        print(f"{r['strategy']} failed: {r['error']}", file=sys.stderr)
    if args.json:
        save(data)
        print(f"wrote {args.json}", file=sys.stderr)
    if len(failed) == len(data["results"]):
        print("error: every strategy failed (see above)", file=sys.stderr)
        return 1
    return 0


def _offload_arg(q: argparse.ArgumentParser) -> None:
    from helpers.offload.streamers import OFFLOADS

    q.add_argument("--offload", choices=OFFLOADS, default="auto",
                   help="how blocks outside the fast tier are fetched. accelerate: the method's device map and "
                   "hooks, one block at a time; stream: a few parts of blocks ahead while one computes, from the "
                   "checkpoint (no GPU tier) or from pinned RAM (GPU tier); the same output (see notebook 05). "
                   "auto (default): stream where the budget has no GPU tier and the stream fits it, else accelerate")


def _precision_args(q: argparse.ArgumentParser, what: str) -> None:
    from helpers.precision import COMPUTES, WEIGHTS

    q.add_argument("--weights", choices=list(WEIGHTS), default=None,
                   help=f"how {what} stores its weights: the bytes each tier holds and a stream moves (default: the "
                   "method's, bf16 for the transformer and the VAE, fp32 for the text encoders)")
    q.add_argument("--compute", choices=["auto", *COMPUTES], default="auto",
                   help=f"the dtype {what} computes in; weights stored otherwise are upcast layer by layer as they "
                   "run. auto (default): bf16 on a GPU that has it and on a CPU with native bf16 matrix instructions "
                   "(found by a short timed probe), else fp32; the text encoders compute in fp32 unless asked")


def _cpu_arg(q: argparse.ArgumentParser) -> None:
    q.add_argument("--cpu-bf16", choices=["auto", "yes", "no"], default="auto",
                   help="whether the CPU that computes has native bf16 matrix math: what --compute auto picks there "
                   "and what a bf16 convolution holds (without it, an unfolded copy per kernel tap). auto (default): "
                   "this machine's, measured once when planning; yes/no: plan for another host's CPU (a saved job)")


def cpu_native(args: argparse.Namespace) -> bool | None:
    """``--cpu-bf16`` as the planner takes it: ``None`` (this machine's), ``True`` or ``False``."""
    return {"yes": True, "no": False}.get(getattr(args, "cpu_bf16", "auto"))


def _job_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--save-job", metavar="FILE",
                   help="check everything and plan the stage, write the plan (model, budget, precision, offload: JSON) "
                   "to FILE and stop, loading nothing; then --job FILE runs it, here or on other hosts")
    q.add_argument("--job", metavar="FILE",
                   help="run the stage exactly as planned in FILE (--save-job; generate and --workers hand their "
                   "children one): no planning, and --model, --max-memory, --weights, --compute, --offload and "
                   "--transformer come from it")


def _transformer_arg(q: argparse.ArgumentParser) -> None:
    q.add_argument("--transformer", default=None, metavar="FILE",
                   help="the transformer's weights from one file, as the ComfyUI / Forge world holds them: a .gguf "
                   "(Q8_0, Q6_K, Q5_K, Q4_K, Q4_0...) or a single .safetensors (bf16, fp8) in the BFL key layout; "
                   "the rest comes from --model. Checked against the model from its header before any weight "
                   "loads, planned in the bytes it stores, held and streamed as stored, decoded layer by layer")


def build_parser() -> argparse.ArgumentParser:
    from helpers.families.flux2.training import KLEIN_TRAIN
    from helpers.twins.training import TrainConfig

    TRAIN_DEFAULTS = TrainConfig()
    parser = _Parser(
        prog="python -m helpers",
        description="Run FLUX.1 in decoupled stages on small hardware. The notebooks teach each stage; "
        "these commands run the same code as separate processes.",
        epilog=_EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "model",
        help="resolve a model name to a local folder (builds the tiny/medium twin on first use)",
        description="Print the local folder of MODEL in the diffusers layout. tiny and medium are built "
        "here on first use (random weights, FLUX.1's block structure; a twin with trained weights in the package "
        "builds from them) and "
        "reused after; hub models come "
        "from the Hugging Face cache, fetched only with --download.",
        epilog=_EPILOG,
    )
    p.add_argument("name", metavar="MODEL", help="tiny, medium, klein-tiny, klein-medium, flux-dev, flux-schnell, "
                   "flux2-klein-4b (-9b, -base-4b, -base-9b), flux-dev-random or flux2-klein-4b-random (GPU "
                   "benchmarks: random weights, 7 GiB and more), a hub id, or a local folder")
    p.add_argument("--download", action="store_true", help="fetch a hub model that is not cached yet")
    p.add_argument("--rebuild", action="store_true", help="build a twin again even if it exists")
    p.add_argument("--components", nargs="+", metavar="NAME", help="hub models: fetch only these components")
    p.set_defaults(func=_cmd_model)

    p = sub.add_parser(
        "footprint",
        help="measure every component without weights, and plan each stage under a memory budget",
        description="Build each component of MODEL as a skeleton on the meta device (no weights, no download "
        "for flux-dev/flux-schnell, whose configs ship with this package), report parameters and bytes per "
        "dtype, and place each stage (text encoding in float32, diffusion in bfloat16) under the budget. "
        "Planning for a GPU tier works on a machine without one.",
        epilog=_EPILOG,
    )
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="tiny, medium, klein-tiny, klein-medium, flux-dev, flux-schnell, flux2-klein-4b (-9b, "
                   "-base-4b, -base-9b), flux-dev-random, flux2-klein-4b-random, a hub id or a local folder (default: "
                   "$FLUX_MODEL or tiny)")
    p.add_argument("--max-memory", metavar="SPEC",
                   help='budget per tier, e.g. "0=8.5GiB,cpu=30GiB" (default: the method\'s) or shares "0=40%%,cpu=100%%"')
    p.add_argument("--like", metavar="MODEL",
                   help="scale the budget from this model's sizes (default for tiny/medium without --max-memory: flux-dev)")
    p.add_argument("--height", type=int, default=1024, metavar="H",
                   help="the image size whose activations are counted and kept room for (default 1024)")
    p.add_argument("--width", type=int, default=1024, metavar="W", help="(default 1024)")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="prompts at once (default 1)")
    p.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="T5 tokens per prompt (default: 512; FLUX.1-schnell: 256)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _precision_args(p, "each stage (--compute: diffusion)")
    _cpu_arg(p)
    _transformer_arg(p)
    p.set_defaults(func=_cmd_footprint)

    p = sub.add_parser(
        "encode",
        help="stage 1: encode prompts with CLIP + T5 under a memory budget, into an embeddings file",
        description="Load CLIP whole and the T5 encoder split across memory tiers by the budget (float32; "
        "the slow tier's blocks fetched as --offload says), encode the prompts, and save the embeddings (bfloat16) to --out with their metadata. "
        "Prints the file's path on stdout, time and peak memory per tier on stderr.",
        epilog=_EPILOG,
    )
    p.add_argument("--model", default=None, metavar="MODEL", help="as for `model` (default: $FLUX_MODEL or tiny)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a prompt; repeat for a batch in one file")
    p.add_argument("--max-memory", metavar="SPEC",
                   help='budget per tier, e.g. "0=8.5GiB,cpu=30GiB" (default: that, or "cpu=8.5GiB,disk=30GiB" '
                   "without a GPU; scaled to the twins as the real model would be split)")
    p.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="T5 tokens per prompt, 1 to 512 (default: 512; FLUX.1-schnell: 256, its most)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the .safetensors file to write (a missing folder is made inside outputs/, refused elsewhere)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--report", help=argparse.SUPPRESS)
    _offload_arg(p)
    _precision_args(p, "CLIP and T5")
    _cpu_arg(p)
    _job_args(p)
    p.set_defaults(func=_cmd_encode)

    def image_knobs(q: argparse.ArgumentParser) -> None:
        q.add_argument("--steps", type=int, default=None, metavar="N",
                       help="denoising steps (default: 28 for FLUX.1-dev-like models, 4 for schnell)")
        q.add_argument("--seed", type=int, default=0, metavar="S", help="seeds a CPU generator: same image on any device")
        q.add_argument("--guidance", type=_finite, default=None, metavar="G",
                       help="guidance scale, 0 to 1000 (default: 3.5 for dev-like models, 0 for schnell)")
        q.add_argument("--height", type=int, default=None, metavar="H",
                       help="pixels, a multiple of 16 (default 1024, or the size --job was planned for)")
        q.add_argument("--width", type=int, default=None, metavar="W",
                       help="pixels, a multiple of 16 (default 1024, or the size --job was planned for)")
        q.add_argument("--max-memory", metavar="SPEC",
                       help='budget per tier (default: "0=8.5GiB,cpu=30GiB", or "cpu=8.5GiB,disk=30GiB" without a GPU)')
        q.add_argument("--overwrite", action="store_true", help="replace existing files")
        q.add_argument("--workers", type=int, default=1, metavar="N",
                       help="share the prompts out among N processes on this host, started with torchrun (default 1; "
                       "each has the whole budget: on a host with several GPUs each takes its own)")
        q.add_argument("--batch-size", type=int, default=None, metavar="B",
                       help="prompts per pipeline call (default 1, or the batch --job was planned for); an image is "
                       "the same for any --workers at one B")
        q.add_argument("--threads", type=int, default=None, metavar="T",
                       help="CPU threads of each worker (default: all cores, shared among --workers); on a CPU an "
                       "image is bit for bit the same for any --workers at one T")

    p = sub.add_parser(
        "diffuse",
        help="stage 2: make images from an embeddings file, the transformer in bfloat16 under a budget",
        description="Check the embeddings file against the model (before any weight loads), load the "
        "bfloat16 transformer split by the budget (offloaded blocks fetched as --offload says) and the VAE whole, and save one PNG per prompt "
        "(a batch of N writes OUT-1.png ... OUT-N.png), with the settings in its metadata.",
        epilog=_EPILOG,
    )
    p.add_argument("--embeddings", required=True, metavar="FILE", help="made by `encode` or notebook 02")
    p.add_argument("--out", required=True, metavar="PNG",
                   help="the image to write (a missing folder is made inside outputs/, refused elsewhere)")
    p.add_argument("--model", default=None, metavar="MODEL", help="default: the model that made the embeddings")
    _offload_arg(p)
    _precision_args(p, "the transformer and the VAE")
    _cpu_arg(p)
    _transformer_arg(p)
    image_knobs(p)
    p.add_argument("--resume", action="store_true",
                   help="keep the images of this file already made and make only the missing ones")
    _job_args(p)
    p.add_argument("--report", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_diffuse)

    p = sub.add_parser(
        "generate",
        help="encode then diffuse, each stage in its own process, the embeddings file in between",
        description="Run `encode` and then `diffuse` as two child processes (a fresh process each, as a "
        "fresh kernel is for the notebooks), handing over the embeddings through a file (default: OUT with "
        "the suffix .safetensors). Prints each stage's wall time and peak memory, and the total.",
        epilog=_EPILOG,
    )
    p.add_argument("--model", default=None, metavar="MODEL", help="as for `model` (default: $FLUX_MODEL or tiny)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt; repeat for a batch")
    p.add_argument("--out", required=True, metavar="PNG",
                   help="the image to write (a missing folder is made inside outputs/, refused elsewhere)")
    p.add_argument("--embeddings", metavar="FILE", help="where to keep the embeddings (default: OUT as .safetensors)")
    p.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="T5 tokens, 1 to 512 (default: 512; FLUX.1-schnell: 256, its most)")
    _offload_arg(p)
    _precision_args(p, "each stage (--compute: diffusion)")
    _cpu_arg(p)
    _transformer_arg(p)
    image_knobs(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "convert",
        help="copy a model with some components stored in another format (fp8: half the bytes of bf16)",
        description="Write a copy of MODEL in the diffusers layout at --out with --components stored as --weights: "
        "fp8 keeps every linear layer's weight in float8 e4m3fn with a float32 scale per output row beside it "
        "(<name>.weight_scale) and the rest in bf16; the folder records its format, and `--model OUT` then plans "
        "and loads it as stored (the stream reads its bytes). Written in a temporary folder and renamed into "
        "place; an existing --out is never replaced. Prints the new folder on stdout. With a .gguf or .safetensors "
        "--out, writes the transformer alone as one file in the BFL key layout, as the ComfyUI / Forge world holds "
        "it: GGUF quantized (q8_0, q6_k, q5_1, q5_0, q4_1, q4_0; rows that are not whole blocks stay bf16, 1-D "
        "tensors f32), or safetensors in bf16, fp8 (row scales) or fp8-cast (no scales).",
        epilog=_EPILOG,
    )
    p.add_argument("--model", default=None, metavar="MODEL", help="as for `model` (default: $FLUX_MODEL or tiny)")
    from helpers.formats.convert import convertible
    from helpers.precision import WEIGHTS

    from helpers.formats.transformer_file import GGUF_FORMATS, SAFETENSORS_FORMATS

    p.add_argument("--weights", required=True, choices=list(dict.fromkeys([*WEIGHTS, *GGUF_FORMATS, *SAFETENSORS_FORMATS])),
                   help="the format to store in: a folder takes " + ", ".join(WEIGHTS) + "; a .gguf file "
                   + ", ".join(GGUF_FORMATS) + "; a .safetensors file " + ", ".join(SAFETENSORS_FORMATS))
    p.add_argument("--components", nargs="+", default=None, metavar="NAME",
                   choices=list(convertible()),
                   help="what to convert (default: transformer); the rest is copied as it is")
    p.add_argument("--out", required=True, metavar="FOLDER|FILE",
                   help="the new model folder (must not exist); or a .gguf / .safetensors file: the transformer "
                   "alone, in the BFL key layout the ComfyUI / Forge world uses (must not exist)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "bench",
        help="time the offload strategies of the transformer (or T5), each in its own process, on the same inputs",
        description="Run each offload strategy of the diffusion transformer (or, with --stage text_encoding, of the "
        "T5 encoder) in a fresh process on the same random inputs in the model's shapes, and report seconds per "
        "step, peak RSS and GPU memory, bytes streamed per step and the largest difference from the resident "
        "output, with the floor: max(compute, bytes to move / measured bandwidth: disk to RAM, or pinned RAM to "
        "GPU). Strategies: resident, accelerate, stream, diffusers-group; with --transformer FILE also "
        "diffusers-resident (diffusers' own reading of the file, held whole); with a GPU tier in the budget also "
        "diffusers-model and diffusers-sequential; and, where --weights/--compute is not the method's bf16, "
        "method (accelerate's hooks in bf16 weights and math, side by side), with one image in each precision "
        "for the PSNR against bf16.",
        epilog=_EPILOG,
    )
    p.add_argument("--model", default=None, metavar="MODEL", help="as for `model` (default: $FLUX_MODEL or tiny)")
    p.add_argument("--max-memory", metavar="SPEC", help='budget (default "cpu=8.5GiB,disk=30GiB" translated for twins)')
    p.add_argument("--steps", type=int, default=3, metavar="N", help="timed transformer calls (after one warm-up)")
    p.add_argument("--height", type=int, default=64, metavar="H")
    p.add_argument("--width", type=int, default=64, metavar="W")
    p.add_argument("--strategies", nargs="+", metavar="NAME", help="default: all that run on this machine")
    p.add_argument("--stage", choices=["diffusion", "text_encoding"], default="diffusion",
                   help="diffusion: the transformer (default); text_encoding: the T5 encoder on one prompt of "
                   "--tokens token ids")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="text tokens: of the diffusion step's embeddings (default 64; FluxPipeline pads to 512 on "
                   "FLUX.1-dev), or per prompt for text_encoding (default 512)")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run the strategies one after the other N times and report the median of each one's "
                   "rounds: on a machine whose speed drifts, each strategy meets the same drift (default 1)")
    p.add_argument("--no-image", action="store_true",
                   help="skip the two images (this precision and the method's bf16) behind image.psnr_vs_bf16_db")
    p.add_argument("--timeout", type=_finite, default=None, metavar="S",
                   help="give up on a strategy after S seconds (it is reported as failed; the others still run)")
    p.add_argument("--cache", choices=["auto", "cold", "warm"], default="auto",
                   help="cold: drop the page cache of the weight files before each step, so the disk tier is read "
                   "from the disk as on a machine whose RAM is the budget; warm: leave them cached; auto (default): "
                   "cold unless the budget has a GPU tier and no disk tier (weights then move from RAM)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON, after each strategy (\"complete\": "
                   "false until the last, so a run stopped midway keeps what it measured)")
    p.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    _precision_args(p, "the benchmarked model")
    _transformer_arg(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "train-twin",
        help="train a twin on the shapes world (CPU, seeded; on 2 cores tiny about 25 minutes, klein-tiny about an hour)",
        description="Train the tiny twin: its VAE, then its transformer with CLIP, on pictures of the shapes "
        "world rendered as it goes (helpers.twins.world; the held-out colour pairs never shown), seeded, and write CLIP, "
        "transformer and VAE in bfloat16 to --out. Prints the time and the final losses on stderr and the file on "
        "stdout; where the package ships trained weights, says whether this run made the same bytes. Nothing is "
        "downloaded; `tiny` builds from the package's file, never from this command's.",
        epilog=_EPILOG,
    )
    p.add_argument("--twin", choices=["tiny", "klein-tiny"], default="tiny",
                   help="tiny (FLUX.1: VAE, CLIP and transformer learn) or klein-tiny (FLUX.2 [klein]: VAE, the Qwen3 "
                   "text path and the transformer learn) (default tiny)")
    p.add_argument("--out", metavar="FILE",
                   help="the .safetensors file to write (default: outputs/twins/TWIN.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seeds the weights' start and the pictures (default 0)")
    p.add_argument("--vae-steps", type=int, default=None, metavar="N",
                   help=f"VAE training steps (default {TRAIN_DEFAULTS.vae_steps}; klein-tiny {KLEIN_TRAIN.vae_steps})")
    p.add_argument("--flow-steps", type=int, default=None, metavar="N",
                   help=f"transformer (+ CLIP) training steps (default {TRAIN_DEFAULTS.flow_steps}; klein-tiny "
                   f"{KLEIN_TRAIN.flow_steps})")
    p.add_argument("--clip-steps", type=int, default=None, metavar="N",
                   help=f"CLIP's steps alone (klein-tiny: the text path's), learning to name the scene, before the "
                   f"transformer's (default {TRAIN_DEFAULTS.clip_steps}; klein-tiny {KLEIN_TRAIN.clip_steps})")
    p.add_argument("--vae-from", default=None, metavar="FILE",
                   help="klein-tiny: take the VAE from an earlier weights file of this command instead of training "
                   "it (the transformer's phase draws from its own seed, so only the VAE's 4-5 minutes are skipped)")
    p.add_argument("--scenes", type=int, default=None, metavar="N",
                   help="train on the first N scenes of the world only: a quick run that shows the whole "
                   "recipe in seconds (default: every scene but the held-out pairs)")
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON on stdout")
    # no budget to hold, and handing every freed block back to the system doubles a training step's time
    p.set_defaults(func=_cmd_train_twin, holds_budget=False)
    return parser


def interrupted(signum: int = signal.SIGINT) -> int:
    """Say so once (a stage of `generate` leaves it to its parent) and give the status of ``signum``
    (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""
    if not os.environ.get(_STAGE_CHILD):
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            print(said(signum), file=sys.stderr)
    return exit_status(signum)


def main(argv: list[str] | None = None) -> int:
    interrupts: StopSignals | None = None
    try:
        interrupts = StopSignals()
        with interrupts.held():  # the first second or two of any command; Ctrl-C is answered right after
            import torch  # noqa: F401
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        if getattr(args, "holds_budget", True):
            from helpers.memory import return_large_blocks

            return_large_blocks()  # the process holds what its tensors hold: the RAM tier means what it says
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        return interrupted(signum_of(err))
    except Exception as err:
        # Ctrl-C in the middle of a library's import can surface as another error (a half-imported
        # module): once interrupted, the run ends as interrupted, whatever the library made of it
        if interrupts is not None and interrupts.times:
            return interrupted(interrupts.signum)
        said = write_error(err)  # a full or read-only disk met by a write no stage named: still one line
        if said is not None:
            print(f"error: {said}", file=sys.stderr)
            return 2
        raise
