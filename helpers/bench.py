"""Benchmark of offload strategies for the diffusion transformer, each in its own fresh process.

``python -m helpers bench`` runs every strategy on the same inputs (random latents and embeddings
from a fixed seed, the model's real shapes) and reports seconds per step, peak memory, the bytes
streamed per step and the largest difference from the resident output, next to the floor: the
time one step cannot beat, max(compute, bytes that must move / measured bandwidth).
Each strategy runs as ``python -m helpers.bench STRATEGY CONFIG OUT`` so that no strategy inherits
another's memory. Explained in ``05_offload-strategies.ipynb``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from helpers.errors import UserError

CPU_STRATEGIES = ("resident", "accelerate", "stream", "diffusers-group", "diffusers-resident")
#: run by default only with a transformer file (without one it is ``resident``): diffusers' own reading, held whole
FILE_ONLY = ("diffusers-resident",)
_FP32 = "reference-fp32"  # the output every result's rel_error_vs_fp32 is measured against
_IMAGE = "image"  # a child that makes one image (every step and the decode), for the PSNR against bf16
GPU_ONLY = ("diffusers-model", "diffusers-sequential")
#: the method as published, beside the others when they run in another precision: accelerate's hooks,
#: bf16 weights and bf16 math
METHOD = "method"
#: text tokens of the diffusion benchmark's embeddings unless asked (FLUX.1's pipeline pads to 512 on
#: dev, 256 on schnell: ``--tokens`` for those)
TOKENS = {"diffusion": 64, "text_encoding": 512}
#: the strategies that apply to each stage's split component (its family names it)
STRATEGIES = {"diffusion": CPU_STRATEGIES + GPU_ONLY, "text_encoding": ("resident", "accelerate", "stream")}


def _family(config: dict):
    """The benchmarked model's family (:mod:`helpers.families`)."""
    from helpers.models import resolve_model

    return resolve_model(config["model"]).family


def _main(config: dict) -> str:
    """The component the stage splits across tiers: what is benchmarked (FLUX.1: the transformer, T5)."""
    return _family(config).main(config.get("stage") or "diffusion")


def _compute_dtype(config: dict) -> torch.dtype:
    from helpers.precision import COMPUTES

    return COMPUTES[config.get("compute") or "bf16"]


def _inputs(config: dict, model) -> dict:
    """One call's inputs of the benchmarked component, seeded random values (the family says what they are)."""
    return _family(config).bench_inputs(_main(config), model, _compute_dtype(config), config.get("height"),
                                        config.get("width"), config["tokens"])


def _gpu(config: dict) -> torch.device | None:
    """The GPU the benchmark runs on: the budget's first GPU tier, or ``None`` (one tier down)."""
    return torch.device("cuda", config["gpu"]) if config.get("gpu") is not None else None


def _load_text(strategy: str, config: dict, work: Path):
    """The text stage's split encoder (FLUX.1: T5) under ``strategy``, in the method's float32."""
    main = _main(config)
    cls = _family(config).component(main).load_class()
    folder = Path(config["folder"]) / main
    gpu = _gpu(config)
    part = _family(config).component(main).computes
    if strategy == "resident" and part is not None:  # the part the stage computes (an LLM's text path), whole
        from helpers.loading import load_whole

        return load_whole(folder, cls, gpu.index if gpu is not None else "cpu", _precision(config), part), lambda: 0, None
    if strategy == "resident":  # no plan: the whole model, as the parent resolved its precision
        return _resident(cls, folder, _precision(config), gpu), lambda: 0, None
    if strategy in ("accelerate", "stream"):
        return _mapped(strategy, cls, main, folder, _plan(config), work)
    raise UserError(f"strategy {strategy!r} is not benchmarked for text encoding; use resident, accelerate or stream.")


def _plan(config: dict, model=None):
    """The stage's plan for the benchmarked call, as ``encode`` / ``diffuse`` would make it: the same
    budget (``None``: the default, translated for a twin) and room for the call's activations. A
    config carrying the parent's job (:mod:`helpers.job`) runs the plan the parent made, unplanned."""
    if config.get("job"):
        from helpers.job import job_from_dict

        return job_from_dict(config["job"]).plan
    from helpers.job import plan_job

    return plan_job(_request(config, model)).plan


def _request(config: dict, model=None):
    """What the benchmarked call asks its planner (:func:`helpers.job.plan_job`). Each strategy fetches
    offloaded blocks its own way, so the job's offload is accelerate's, the one that needs no headers read."""
    from helpers.activations import Workload
    from helpers.job import Request

    stage = config.get("stage") or "diffusion"
    workload = (Workload(tokens=config["tokens"]) if stage == "text_encoding" else
                Workload(config["height"], config["width"], 1, config["tokens"]))
    return Request(stage, model or config["model"], config["max_memory"], workload, config.get("weights"),
                   config.get("compute") or "auto", "accelerate",
                   config.get("transformer_file") if stage == "diffusion" else None)


#: why diffusers' strategies do not run an fp8 file with row scales (see ``run``)
DIFFUSERS_SCALED = ("diffusers' from_single_file knows no per-row fp8 scales (it would read the weights unscaled); "
                    "it runs GGUF files and plain single files (bf16, fp8 cast)")


def _diffusers_file(config: dict, folder: Path, path: str, compute: torch.dtype):
    """The transformer as diffusers reads a single file itself (``from_single_file``; the family says how)."""
    return _family(config).diffusers_single_file(folder, path, compute)


#: what diffusers' group offloading to disk does with a GGUF model (measured: diffusers 0.42, safetensors 0.7)
DIFFUSERS_GGUF_DISK = ("diffusers' group offloading to disk saves each group with safetensors, which cannot save "
                       "a GGUFParameter (it indexes each tensor's last element, and diffusers makes that scalar a "
                       "GGUFParameter, which has no row of blocks: IndexError in _quant_shape_from_byte_shape); "
                       "diffusers-resident is its reading of the file held whole")


def _without_file(config: dict) -> dict:
    """The config of a run on the model's own weights (the method, the float32 reference, the bf16 image):
    not the parent's job either, whose plan is of the file and the parent's precision."""
    return {k: v for k, v in config.items() if k not in ("transformer_file", "job")}


def _precision(config: dict):
    from helpers.precision import Precision

    return Precision(config["weights"], config["compute"], "as the parent resolved it")


def _source(folder: Path) -> Path:
    """The component folder an fp8 copy was converted from (recorded by ``convert``)."""
    import json

    from helpers.precision import FORMAT_FILE

    source = json.loads((folder / FORMAT_FILE).read_text()).get("source")
    if not source or not Path(source).is_dir():
        raise UserError(f"{folder} does not say which model it was converted from (or that folder is gone); "
                        "no float32 reference to measure its error against.")
    return Path(source)


def _resident(cls, folder: Path, precision, gpu, transformer_file=None, family=None):
    """The whole model in RAM (or on the GPU), stored and computed as ``precision`` says (a transformer
    file of ``family``'s: held as it stores its weights, decoded layer by layer)."""
    if transformer_file is not None:
        from helpers.formats.transformer_file import load_transformer_file

        return load_transformer_file(transformer_file, cls.load_config(folder), precision.compute_dtype,
                                     gpu if gpu is not None else "cpu", family)
    from helpers.loading import _dispatch_fp8
    from helpers.offload.upcast import upcast_layerwise
    from helpers.precision import FP8_REST, folder_format

    stored = folder_format(folder)
    if stored == "fp8" and precision.weights == "fp8":
        model = _dispatch_fp8(folder, cls, {"": gpu if gpu is not None else "cpu"}, None)
    elif stored == "fp8":  # the float32 reference of an fp8 copy: the model it was converted from
        source = _source(folder)
        model = cls.from_pretrained(source, dtype=precision.storage_dtype)
    else:
        model = cls.from_pretrained(folder, dtype=FP8_REST if precision.weights == "fp8" else precision.storage_dtype)
    model = model.to(gpu) if gpu is not None else model
    if precision.upcasts:
        upcast_layerwise(model, precision.compute_dtype)
    return model


def _mapped(strategy: str, cls, component: str, folder: Path, plan, work: Path):
    """accelerate's map or our stream, through the stages' own loader; (model, streamed, cleanup)."""
    from helpers.loading import load_mapped, whole_bytes

    other = plan.family.whole(plan.stage)
    loaded = load_mapped(folder, cls, component, plan, strategy, whole=whole_bytes(plan, other),
                         offload_folder=work / "offload", progress=False)
    if strategy == "stream":
        return loaded.model, _streamed_per_call(loaded.model, loaded.streamer), (
            loaded.streamer.close if loaded.streamer else None)
    slow = "cpu" if loaded.device.type == "cuda" else "disk"  # the tier accelerate's hooks fetch from
    comp = next(p for p in plan.components if p.component == component)
    moved = sum(u.nbytes for u in comp.units if u.tier == slow)
    return loaded.model, lambda: moved, None


def _streamed_per_call(model, streamer):
    calls = [0]
    model._bench_calls = calls

    def streamed() -> float:
        return streamer.bytes_streamed / max(calls[0], 1) if streamer is not None else 0

    return streamed


def _load(strategy: str, config: dict, work: Path):
    """The stage's model under ``strategy``; returns (model, bytes streamed per call or a callable, cleanup)."""
    if config.get("stage") == "text_encoding":
        return _load_text(strategy, config, work)
    family, main = _family(config), _main(config)
    cls = family.component(main).load_class()
    folder = Path(config["folder"])
    gpu = _gpu(config)
    precision = _precision(config)
    if strategy == "resident":  # no plan: the whole model (the float32 reference too)
        return _resident(cls, folder / main, precision, gpu,
                         config.get("transformer_file"), family), lambda: 0, None
    plan = _plan(config)
    everything = sum(u.nbytes for p in plan.components if p.component == main for u in p.units)
    if strategy in ("accelerate", "stream"):
        return _mapped(strategy, cls, main, folder / main, plan, work)
    if strategy == "diffusers-resident":  # the whole model as diffusers itself reads it
        if config.get("transformer_file"):
            model = _diffusers_file(config, folder / main, config["transformer_file"], precision.compute_dtype)
        else:
            model = _resident(cls, folder / main, precision, None)
        return (model.to(gpu) if gpu is not None else model), lambda: 0, None
    if strategy == "diffusers-group":
        from diffusers.hooks import apply_group_offloading

        from helpers.precision import stored_bytes

        if config.get("transformer_file"):  # diffusers' own reading of the file, held as it stores it
            model = _diffusers_file(config, folder / main, config["transformer_file"], precision.compute_dtype)
        else:
            model = cls.from_pretrained(folder / main, dtype=precision.storage_dtype)
        if precision.upcasts and not config.get("transformer_file"):
            # diffusers' own layerwise casting; its default skips (norms...) would mismatch
            from diffusers.hooks import apply_layerwise_casting

            apply_layerwise_casting(model, storage_dtype=precision.storage_dtype,
                                    compute_dtype=precision.compute_dtype, skip_modules_pattern=())
        # every group moves each call: the blocks, and the rest of the model as one more group
        moved = stored_bytes(model)
        if gpu is not None:  # blocks in RAM, onloaded one group ahead on a CUDA stream
            apply_group_offloading(model, onload_device=gpu, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=True)
        else:
            apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type="block_level",
                                   num_blocks_per_group=1, offload_to_disk_path=str(work / "group"))
        return model, lambda: moved, None
    if strategy in GPU_ONLY:
        from helpers.offload.upcast import upcast_layerwise

        if config.get("transformer_file"):
            model = _diffusers_file(config, folder / main, config["transformer_file"], precision.compute_dtype)
        else:
            model = cls.from_pretrained(folder / main, dtype=precision.storage_dtype)
            if precision.upcasts:
                upcast_layerwise(model, precision.compute_dtype)
        pipe = family.diffusion_pipeline(family, {"scheduler": None, "vae": None, main: model})
        if strategy == "diffusers-model":  # the whole transformer moves to the GPU at its first call and stays
            pipe.enable_model_cpu_offload(device=gpu)
            return model, lambda: 0, None
        pipe.enable_sequential_cpu_offload(device=gpu)  # every weight, every call
        return model, lambda: everything, None
    raise UserError(f"unknown strategy {strategy!r}.")


def run_one(strategy: str, config: dict, out: Path) -> dict:
    """Measure one strategy in this process (the child side of :func:`run`)."""
    from helpers.memory import return_large_blocks, rss_bytes

    return_large_blocks()  # as the stages' commands do: RSS is what the tensors hold, not glibc's arenas
    _preload()  # the baseline is a process after its imports (the server's, forked: made already), before any weight
    config = {**config, "baseline": rss_bytes()}
    name = strategy
    if strategy == METHOD:  # accelerate's hooks in the method's precision
        from helpers.precision import folder_format

        transformer = Path(config["folder"]) / _family(config).file_component
        if config.get("stage", "diffusion") == "diffusion" and folder_format(transformer) == "fp8":
            source = str(_source(transformer).parent)  # an fp8 copy: the method runs the model it was made from
            config.update(model=source, folder=source)
        config = _without_file(config)  # the method runs the model's own bf16 weights
        config.update(weights="bf16", compute="bf16")
        strategy = "accelerate"
    work = Path(tempfile.mkdtemp(prefix=f"bench-{strategy}-", dir=config.get("work_root")))
    try:
        try:
            measured = _measure(strategy, config, out, work)
        except IndexError as err:  # its first call fails; say why (the error alone names no cause)
            if strategy == "diffusers-group" and str(config.get("transformer_file", "")).endswith(".gguf") \
                    and _gpu(config) is None:
                raise UserError(f"{DIFFUSERS_GGUF_DISK} ({type(err).__name__}: {err})") from None
            raise
        return {**measured, "strategy": name, "weights": config["weights"], "compute": config["compute"]}
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _image(config: dict, out: Path) -> None:
    """One image through the whole diffusion call, resident, in the config's precision, written to
    ``out`` (PNG): every step and the VAE's decode, from the benchmark's random embeddings and seed 0,
    guidance 0 (the method's). What the precision costs in pixels (the child side of :func:`run`)."""
    from helpers.loading import load_whole
    from helpers.models import resolve_model

    folder, gpu, precision = Path(config["folder"]), _gpu(config), _precision(config)
    ref = resolve_model(config["model"])
    family, main = ref.family, ref.family.main("diffusion")
    parts = {main: _resident(family.component(main).load_class(), folder / main, precision, gpu,
                             config.get("transformer_file"), family).eval()}
    for name in family.whole("diffusion"):
        parts[name] = load_whole(folder / name, family.component(name).load_class(),
                                 config.get("gpu") if gpu is not None else "cpu", precision)
    for c in family.components:
        if c.role == "scheduler":
            parts[c.name] = c.load_class().from_pretrained(folder / c.name)
    pipe = family.diffusion_pipeline(family, parts)
    pipe.set_progress_bar_config(disable=True)
    g, dtype = torch.Generator().manual_seed(0), precision.compute_dtype
    device = gpu if gpu is not None else torch.device("cpu")
    # random embeddings in the family's shapes, drawn in order, rounded to bf16 (as the file holds them)
    tensors = {k: torch.randn(*shape, generator=g).to(torch.bfloat16).to(device, dtype)
               for k, shape in family.embedding_shapes(ref.configs, 1, config["tokens"]).items()}
    with torch.no_grad():
        image = pipe(**family.pipeline_inputs(tensors),
                     num_inference_steps=config["steps"], guidance_scale=0.0, height=config["height"],
                     width=config["width"], generator=torch.Generator("cpu").manual_seed(0)).images[0]
    image.save(out)


def _held_bytes(model) -> int:
    """The bytes of weights the loaded model holds between calls (RAM or GPU, not the meta device):
    its resident part, as stored (fp8 with its scales)."""
    from helpers.precision import named_tensors

    return sum(t.numel() * t.element_size() for _, _, t in named_tensors(model) if t.device.type != "meta")


def _measure(strategy: str, config: dict, out: Path, work: Path) -> dict:
    from helpers.memory import drop_page_cache, measure

    gpu = _gpu(config)
    if gpu is not None:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(gpu)
    baseline = config["baseline"]

    def sync() -> None:
        if gpu is not None:
            torch.cuda.synchronize(gpu)

    with measure(strategy) as m:
        model, streamed, cleanup = _load(strategy, config, work)
        model.eval()
        held = _held_bytes(model)
        inputs = {k: v.to(gpu) if gpu is not None and torch.is_tensor(v) else v
                  for k, v in _inputs(config, model).items()}
        times = []
        with torch.no_grad():
            for _ in range(config["steps"] + 1):  # the first call warms up and is not timed
                if config.get("cache", "cold") == "cold":  # the disk tier read from the disk, not from spare RAM
                    drop_page_cache(work, Path(config["folder"]) / _main(config))
                sync()
                start = time.perf_counter()
                output = model(**inputs)[0]
                sync()
                times.append(time.perf_counter() - start)
                if hasattr(model, "_bench_calls"):
                    model._bench_calls[0] += 1
    torch.save(output.cpu(), out.with_suffix(".pt"))
    result = {
        "strategy": strategy,
        "s_per_step": statistics.median(times[1:]),
        "peak_rss_bytes": m.peak_rss,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(gpu) if gpu is not None else None,
        "bytes_streamed_per_step": int(streamed()),
        "resident_bytes": held,
        "baseline_rss_bytes": baseline,
        "step_times": times[1:],
    }
    streamer = getattr(cleanup, "__self__", None)
    if streamer is not None and hasattr(streamer, "timeline"):
        result["timeline"] = streamer.timeline()  # the last two calls: reads or copies, and compute
    if cleanup:
        cleanup()
    return result


def _failure(done: subprocess.CompletedProcess) -> str:
    """One line on why a strategy's process failed: its last line of error, and how it ended."""
    last = (done.stderr.strip().splitlines() or [""])[-1]
    if done.returncode < 0:
        import signal

        name = signal.Signals(-done.returncode).name
        how = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        how = f"exit status {done.returncode}"
    return f"{last} ({how})" if last else how


def rows(data: dict) -> list[dict]:
    """The benchmark's table, one row per strategy (a failed one says so); for the CLI and notebook 05."""
    from helpers.report import format_bytes

    def size(n):
        return "" if n is None else format_bytes(n)

    out = []
    for r in data["results"]:
        row = {"strategy": r["strategy"],
               "s/step": "failed" if r.get("s_per_step") is None else round(r["s_per_step"], 4),
               "x floor": round(r["ratio_to_floor"], 2) if r.get("ratio_to_floor") else "",
               "peak RSS": size(r.get("peak_rss_bytes")), "peak GPU": size(r.get("peak_gpu_bytes")),
               "streamed/step": size(r.get("bytes_streamed_per_step")),
               "max diff vs resident": r.get("max_abs_diff_vs_resident"),
               "rel err vs fp32": "" if r.get("rel_error_vs_fp32") is None else f"{r['rel_error_vs_fp32']:.2e}"}
        if all(x.get("peak_gpu_bytes") is None for x in data["results"]):
            del row["peak GPU"]
        if len({(x.get("weights"), x.get("compute")) for x in data["results"]}) > 1:  # the method's row beside
            row["weights, math"] = f"{r.get('file_format') or r.get('weights')}, {r.get('compute')}"
        out.append(row)
    return out


def summary_rows(results: list[tuple[str, dict]]) -> list[dict]:
    """One row per saved result ``(name, data)``: what it measured, and each strategy's seconds per step
    with its ratio to the floor; the overview of ``05_offload-strategies``'s last section."""
    out = []
    for name, data in results:
        what = (f"{data.get('component_short', 'text encoder')}, {data.get('tokens')} tokens"
                if data.get("stage") == "text_encoding"
                else f"{data['height']}x{data['width']}" + (f", {data['tokens']} tok" if data.get("tokens") else ""))
        precision = data.get("precision") or {}
        row = {"file": name, "model": data["model"], "device": data["device"].split(" (")[0], "size": what,
               "weights, math": f"{precision.get('weights', 'bf16')}, {precision.get('compute', '')}".rstrip(", ")}
        for r in data["results"]:
            seconds, ratio = r.get("s_per_step"), r.get("ratio_to_floor")
            row[r["strategy"]] = ("failed" if seconds is None else
                                  f"{seconds:.3f}" + (f" ({ratio:.2f}x)" if ratio else ""))
        out.append(row)
    return out


def title(data: dict) -> str:
    """What a result is: model, device, stage and size, budget, page cache, floor."""
    what = (f"text encoding, {data.get('tokens')} tokens" if data.get("stage") == "text_encoding"
            else f"{data['height']}x{data['width']}" + (f", {data['tokens']} tokens" if data.get("tokens") else ""))
    head = f"{data['model']} on {data['device']}, {what}, {data['max_memory']}, {data.get('cache', 'warm')} cache"
    if data.get("precision"):
        file = data["precision"].get("transformer_file")
        if file:
            head += f", transformer {file['path']}"
        head += f", {data['precision']['weights']} weights, {data['precision']['compute']} math"
    if (data.get("image") or {}).get("psnr_vs_bf16_db") is not None:
        head += f" (image {data['image']['psnr_vs_bf16_db']:.1f} dB against bf16)"
    if data.get("floor") is None:  # a run stopped midway: what it measured so far
        planned = data.get("strategies") or []
        return f"{head}: stopped after {len(data['results'])} of {len(planned) or '?'} strategies, no floor"
    return f"{head}: floor {data['floor']['s_per_step']:.4f} s/step"


def plot_time_memory(data: dict, ax=None):
    """Seconds per step against peak memory, one point per strategy, with the floor and the budget.

    Peak GPU memory where the result has it (against the GPU tier), else the process's peak RSS
    (against the process after its imports plus the cpu tier, plus 10% for activations). For
    notebook 05; returns the axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        ax = plt.subplots(figsize=(8, 5))[1]
    gpu = any(r.get("peak_gpu_bytes") for r in data["results"])
    key = "peak_gpu_bytes" if gpu else "peak_rss_bytes"
    for r in data["results"]:
        if r.get("s_per_step") is None or r.get(key) is None:
            continue
        x = r[key] / 2**20
        ax.scatter(x, r["s_per_step"], s=90)
        ax.annotate(r["strategy"], (x, r["s_per_step"]), textcoords="offset points", xytext=(8, 4), fontsize=11)
    tiers = data.get("max_memory_bytes", {})
    gpu_tier = next((b for t, b in tiers.items() if t.isdigit()), None)
    if gpu and gpu_tier:
        limit, what = gpu_tier, "GPU tier"
    elif not gpu and data.get("baseline_rss_bytes") and "cpu" in tiers:  # RAM: room for activations
        limit, what = 1.1 * (data["baseline_rss_bytes"] + tiers["cpu"]), "imports + cpu tier + 10%"
    else:
        limit = None
    if limit:
        ax.axvline(limit / 2**20, linestyle=":", color="grey")
        ax.text(limit / 2**20, ax.get_ylim()[1], f" {what}", va="top", fontsize=10, color="grey")
    if data.get("floor"):
        ax.axhline(data["floor"]["s_per_step"], linestyle="--", color="black")
        ax.text(ax.get_xlim()[0], data["floor"]["s_per_step"], " floor", va="bottom", fontsize=11)
    ax.set_xlabel("peak GPU memory (MiB)" if gpu else "peak RSS of the process (MiB)", fontsize=12)
    ax.set_ylabel("seconds per step", fontsize=12)
    ax.set_title(f"{data['model']} on {data['device']}: time per step against memory", fontsize=12)
    return ax


def by_workload(results: list[dict]) -> list[dict]:
    """``bench`` results in the order to compare them: by image size, then text tokens, then bytes per
    weight (bf16 first), so that neighbours differ in one thing."""
    return sorted(results, key=lambda d: (d["height"] * d["width"], d.get("tokens") or 0,
                                          (d.get("precision") or {}).get("weights") != "bf16"))


def plot_step_times(results: list[dict], ax=None):
    """Seconds per step of every strategy, grouped by result (size, tokens, precision), with how many
    times faster ``stream`` is than the method's row where a result has one. For notebook 06; returns
    the axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        ax = plt.subplots(figsize=(11, 4.5))[1]
    results = by_workload(results)
    order = [*CPU_STRATEGIES[:2], METHOD, *CPU_STRATEGIES[2:], *GPU_ONLY]
    present = [s for s in order if any(r["strategy"] == s and r.get("s_per_step") for d in results for r in d["results"])]
    width = 0.8 / max(len(present), 1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, strategy in enumerate(present):
        heights = [next((r["s_per_step"] for r in d["results"] if r["strategy"] == strategy and r.get("s_per_step")),
                        np.nan) for d in results]
        ax.bar(np.arange(len(results)) + (k - (len(present) - 1) / 2) * width, heights, width,
               label=strategy, color=colours[k % len(colours)])
    for i, d in enumerate(results):
        times = {r["strategy"]: r["s_per_step"] for r in d["results"] if r.get("s_per_step")}
        if METHOD in times and "stream" in times:
            ax.annotate(f"{times[METHOD] / times['stream']:.1f}x", (i, max(times.values())), ha="center",
                        va="bottom", fontsize=11, xytext=(0, 3), textcoords="offset points")
    def label(d: dict) -> str:
        what = f"{d['height']}x{d['width']}" + (f"\n{d['tokens']} tokens" if d.get("tokens") else "")
        knobs = d.get("precision") or {}
        return what + (f"\n{knobs['weights']} weights\n{knobs['compute']} math" if knobs else "")

    labels = [label(d) for d in results]
    ax.set_xticks(range(len(results)), labels, fontsize=10)
    ax.set_ylabel("seconds per step", fontsize=12)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the ratios and the legend
    ax.legend(fontsize=10, ncols=len(present), loc="upper left")
    ax.set_title("seconds per step (above each group: the method's time over stream's)", fontsize=12)
    return ax


def plot_timeline(data: dict, ax=None):
    """The ``stream`` row's fetches (disk reads, or copies to the GPU) against its computes, block by
    block, over its last calls; ``None`` when the result has no stream timeline."""
    import matplotlib.pyplot as plt

    stream = next((r for r in data["results"] if r["strategy"] == "stream" and r.get("timeline")), None)
    if stream is None:
        return None
    if ax is None:
        ax = plt.subplots(figsize=(12, 2.6))[1]
    kinds = {k for k, *_ in stream["timeline"]}
    fetch = "copy" if "copy" in kinds else "read"
    lanes = [("compute", "#1f77b4"), (fetch, "#ff7f0e")]  # top to bottom: the compute, the fetch
    for row, (kind, colour) in enumerate(lanes):
        spans = [(a, b - a) for k, _, a, b in stream["timeline"] if k == kind]
        ax.broken_barh(spans, (row - 0.35, 0.7), color=colour, edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(lanes)), [k for k, _ in lanes], fontsize=12)
    ax.set_xlabel("seconds", fontsize=12)
    ax.set_title(f"stream on {data['device']}: the {fetch} of the next pieces while one computes", fontsize=12)
    return ax


def host_to_device_bandwidth(gpu: int, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Bytes per second of one ``non_blocking`` copy from pinned RAM to GPU ``gpu`` (the best of a few)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{gpu}")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(gpu)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(gpu)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def disk_bandwidth(folder: Path, cache: str = "cold", limit: int = 2**30, component: str = "transformer") -> float:
    """Bytes per second reading the checkpoint's files, as the streamer reads them.

    ``cold``: the files' cached pages dropped first and read with ``O_DIRECT`` where the file system
    allows it (the disk itself); ``warm``: through the page cache, as it is after a first read.
    """
    import mmap
    import os

    from helpers.memory import drop_page_cache

    files = sorted((folder / component).glob("*.safetensors"))
    if cache == "cold":
        drop_page_cache(*files)
    else:
        for path in files:  # bring them into the cache first
            with open(path, "rb") as f:
                while f.read(2**24):
                    pass
    chunk = 2**24
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    total, start = 0, time.perf_counter()
    for path in files:
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if cache == "cold" else 0)
        try:
            fd = os.open(path, flags)
        except OSError:
            fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while total < limit:
                try:
                    n = os.preadv(fd, [view], offset)
                except OSError:  # O_DIRECT refused at read time
                    os.close(fd)
                    fd = os.open(path, os.O_RDONLY)
                    continue
                if not n:
                    break
                offset += n
                total += n
        finally:
            os.close(fd)
    view.release()
    buf.close()
    return total / max(time.perf_counter() - start, 1e-9)


#: environment variables that cap the instruction sets the math libraries use (a CPU run as an older one)
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def machine() -> dict:
    """What ran the benchmark: the CPU's model name, its cores, the kernels PyTorch picked
    (``AVX2``, ``AVX512``...), and any instruction-set caps set in the environment (:data:`ISA_CAPS`):
    with them a CPU with native bf16 benchmarks as one without."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "isa_caps": {k: os.environ[k] for k in ISA_CAPS if k in os.environ}}


def stored_result(model: str, max_memory=None, steps: int = 3, height: int = 64, width: int = 64, strategies=None,
                  cache: str = "auto", stage: str = "diffusion", tokens: int | None = None, weights: str | None = None,
                  compute: str = "auto", folder: str | Path | None = None) -> tuple[Path, dict] | None:
    """A saved result of :func:`run` with these settings, ``(path, data)``, from ``folder`` (default the
    checkout's ``docs/benchmarks``), or None. ``None`` and ``"auto"`` settings match what the run chose
    (its strategies, its cache, its precision). ``05_offload-strategies`` reads one instead of running
    every strategy again (``FULL = False``); the file's ``machine`` says what measured it."""
    from helpers.files import project_root

    if folder is None:
        root = project_root()
        if root is None:
            return None
        folder = root / "docs" / "benchmarks"
    want = {"model": model, "max_memory": max_memory, "steps": steps, "height": height, "width": width, "stage": stage,
            "tokens": TOKENS.get(stage) if tokens is None else tokens}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not data.get("complete") or any(data.get(k) != v for k, v in want.items()):
            continue
        precision = data.get("precision") or {}
        if ((strategies is not None and data.get("strategies") != list(strategies))
                or (cache != "auto" and data.get("cache") != cache)
                or precision.get("weights") != (weights or "bf16")
                or (compute != "auto" and precision.get("compute") != compute)):
            continue
        return path, data
    return None


def resolve_cache(cache: str, budget) -> str:
    """``cold`` or ``warm`` for ``cache="auto"`` under ``budget`` (see :func:`run`); others as given."""
    if cache != "auto":
        return cache
    return "warm" if budget.gpu is not None and "disk" not in budget.names else "cold"


#: what every strategy's process imports before it measures: made once, in the server it is forked from
_PRELOAD = (("accelerate", None), ("helpers.offload.streamers", None), ("helpers.loading", None), ("helpers.memory", None),
            ("helpers.precision", None))


def _preload() -> None:
    """The imports every strategy needs, and the classes of every known family's components."""
    import importlib

    from helpers.families import families

    for module, name in _PRELOAD:
        importlib.import_module(module)
    for family in families():
        family.pipeline_class()
        for c in family.components:
            c.load_class()


class _Processes:
    """Each strategy in a process of its own, forked from one server process that made every import
    they need once (``python -m helpers.bench --serve``): a fresh interpreter spent 4-5 s of a 2-core
    machine importing torch, diffusers and transformers before it measured anything, for every
    strategy, round and reference. A forked process still has its own memory, peak RSS (reset when
    it starts measuring), exit status and GPU context (the server never touches CUDA); its baseline is
    the server's, a process after its imports, as a fresh one's was. Where ``fork`` does not exist,
    each runs as ``python -m helpers.bench STRATEGY CONFIG OUT``.

    The server and its processes form their own process group: whatever ends the benchmark (Ctrl-C
    included) ends them all (:meth:`close`)."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.server: subprocess.Popen | None = None
        self._pending = b""  # what the server said past the last full line

    def run(self, name: str, config: dict, out: Path) -> str | None:
        """Run strategy ``name`` (or the image, :data:`_IMAGE`) writing next to ``out``; ``None``, or why it failed."""
        import os

        if not hasattr(os, "fork"):
            return self._fresh(name, config, out)
        if self.server is None or self.server.poll() is not None:
            self.server = subprocess.Popen([sys.executable, "-m", "helpers.bench", "--serve"], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
            self._pending = b""
        log = out.with_suffix(".log")
        request = {"name": name, "config": config, "out": str(out), "log": str(log)}
        self.server.stdin.write((json.dumps(request) + "\n").encode())
        started = self._answer(None)
        if started is None:  # the server died before forking (its imports failed: they are on its stderr)
            return f"its process could not start (exit status {self.server.wait()})"
        pid = started["pid"]
        ended = self._answer(self.timeout)
        if ended is None:  # past the timeout: the process is stopped (not reaped yet: its pid is its own)
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
            self._answer(None)  # the server's word that it ended
            return f"ran past the {self.timeout:g} s timeout"
        text = log.read_text(errors="replace") if log.is_file() else ""
        code = ended["status"]
        return None if code == 0 else _failure(subprocess.CompletedProcess([name], code, "", text))

    def _answer(self, timeout: float | None) -> dict | None:
        """The server's next line (None: none within ``timeout`` seconds, or the server is gone)."""
        import os
        import select

        fd = self.server.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._pending:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def _fresh(self, name: str, config: dict, out: Path) -> str | None:
        try:
            done = subprocess.run([sys.executable, "-m", "helpers.bench", name, json.dumps(config), str(out)],
                                  capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return f"ran past the {self.timeout:g} s timeout"
        return None if done.returncode == 0 else _failure(done)

    def close(self) -> None:
        """End the server and any process it forked."""
        import os
        import signal

        if self.server is None:
            return
        try:
            os.killpg(self.server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.server.wait()
        for stream in (self.server.stdin, self.server.stdout):
            try:
                stream.close()
            except OSError:  # a broken pipe to a killed server
                pass
        self.server = None


def _serve() -> None:
    """The server of :class:`_Processes`: imports what every strategy needs, then for each request
    (a JSON line on stdin) forks a process that runs it with its output in the request's log, says its
    pid, waits for it and says its exit status (negative: the signal that ended it)."""
    import os
    import traceback

    _preload()
    answers = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        answers.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the strategy's process
            code = 1
            try:
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.close(log)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                _child_main(request["name"], request["config"], Path(request["out"]))
                code = 0
            except BaseException:  # noqa: BLE001 - as an interpreter would: the traceback, status 1
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        answers.write(json.dumps({"pid": pid}) + "\n")
        answers.flush()
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


def _child_main(strategy: str, config: dict, out: Path) -> None:
    """What one strategy's process does: measure it (or make the image) and write the result next to ``out``."""
    if strategy == _IMAGE:
        _image(config, out.with_suffix(".png"))
    else:
        out.with_suffix(".json").write_text(json.dumps(run_one(strategy, config, out)))


def _combine(runs: list[dict]) -> dict:
    """One strategy's result over its rounds: the median of their seconds per step (each round's is
    already a median over its steps), the most memory any round held, every step's time."""
    last = runs[-1]
    out = dict(last)
    out["s_per_step"] = statistics.median(r["s_per_step"] for r in runs)
    out["s_per_step_rounds"] = [r["s_per_step"] for r in runs]
    out["step_times"] = [t for r in runs for t in r["step_times"]]
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    gpu = [r["peak_gpu_bytes"] for r in runs if r.get("peak_gpu_bytes") is not None]
    out["peak_gpu_bytes"] = max(gpu) if gpu else None
    out["baseline_rss_bytes"] = min(r["baseline_rss_bytes"] for r in runs)
    return out


def run(model: str | None, max_memory=None, steps: int = 3, height: int = 64, width: int = 64,
        strategies=None, progress=print, cache: str = "auto", stage: str = "diffusion", tokens: int | None = None,
        timeout: float | None = None, on_result=None, weights: str | None = None, compute: str = "auto",
        rounds: int = 1, image: bool = True, transformer_file=None) -> dict:
    """Every strategy in its own process on the same inputs; the JSON of ``python -m helpers bench``.

    ``stage``: ``"diffusion"`` times the transformer on latents of ``height`` x ``width`` and
    ``tokens`` text tokens (default 64); ``"text_encoding"`` times the T5 encoder on one prompt of
    ``tokens`` token ids (default 512).
    ``cache="cold"``: before each step the page cache of the checkpoint and of every offload folder
    is dropped, so a strategy that reads from the disk tier reads from the disk, as on a machine
    whose RAM is the budget; ``"warm"`` leaves the files cached (spare RAM holds the disk tier:
    faster than the budget allows on a machine that is really that small). ``"auto"`` (default):
    cold where weights come from the disk during steps (no GPU tier: the stream reads the
    checkpoint; or a disk tier), warm with a GPU tier and no disk tier, where they move from RAM
    and dropping the cache would only slow every load.
    A strategy that fails or runs past ``timeout`` seconds is reported with its ``error``; the
    others still run. ``on_result``: called after each strategy with the report so far
    (``"complete": false``, no floor yet), so that a long run stopped midway leaves what it measured.
    ``weights`` and ``compute``: the precision every strategy runs in (see :mod:`helpers.precision`;
    ``auto`` is resolved once, here, and the children run what it chose). With ``resident`` among the
    strategies, one more resident run in float32 weights and math gives every result its
    ``rel_error_vs_fp32``: the norm of its output's difference from that one over the norm of that one.
    Where that precision is not the method's (bf16 weights and math), the diffusion stage also runs
    ``method``: accelerate's hooks in bf16, the method as published, side by side with the others;
    and ``image`` (default) makes one image (every step and the VAE's decode, resident) in each of
    the two precisions, for ``image.psnr_vs_bf16_db``.
    ``rounds``: run the strategies one after the other that many times, so that a machine whose speed
    drifts (a shared or throttled one) slows each of them alike; each result's ``s_per_step`` is the
    median of its rounds' (``s_per_step_rounds``).
    ``transformer_file``: the diffusion transformer's weights from one file (GGUF, single
    safetensors; :mod:`helpers.formats.transformer_file`) for every strategy, diffusers' reading it with its
    own ``from_single_file`` (:func:`_diffusers_file`; a row-scaled fp8 file it cannot read is
    reported as not run, :data:`DIFFUSERS_SCALED`); ``method``, the float32 reference and the bf16
    image run the model's own weights, and each result says its ``file_format``.
    """
    import math

    from helpers.budget import default_budget
    from helpers.job import plan_job
    from helpers.models import resolve_model

    ref = resolve_model(model)
    tokens = _check_run(ref, stage, steps, height, width, tokens, rounds, timeout, cache, strategies)
    name = ref.name if ref.kind != "local" else str(ref.path)
    # no budget: the default, translated for a twin as the stages translate it (so a twin still splits)
    config = {"model": name, "max_memory": max_memory, "steps": steps, "height": height, "width": width,
              "stage": stage, "tokens": tokens, "weights": weights, "compute": compute}
    if transformer_file is not None:
        if stage != "diffusion":
            raise UserError("--transformer is the diffusion transformer's file; benchmark it with --stage diffusion.")
        config["transformer_file"] = str(Path(transformer_file).expanduser().resolve())
    # checks the budget, the size, the precision and the file, before anything runs; every strategy's child
    # runs this job's plan, as made here
    job = plan_job(_request(config, ref))
    precision = job.plan.precision
    config.update(weights=precision.weights, compute=precision.compute)  # the children run what auto chose
    gpu = job.plan.budget.gpu  # the plan has refused a GPU tier on a machine without one
    cache = resolve_cache(cache, job.plan.budget)
    if cache == "cold":
        import os

        if not hasattr(os, "posix_fadvise"):
            raise UserError("this system cannot drop a file's cached pages; run the benchmark with cache 'warm'.")
    bench = _Bench(ref, job, config, _chosen_strategies(strategies, stage, gpu, precision), rounds,
                   max_memory if max_memory is not None else default_budget(torch.cuda.is_available()), cache)
    family = ref.family
    needs = [c for c in family.stage_parts(stage) if family.component(c).role != "tokenizer"]
    bench.folder = ref.folder(components=needs)
    config.update(folder=str(bench.folder), cache=cache, gpu=gpu, job=job.as_dict())
    processes = _Processes(timeout)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, contextlib.closing(processes):
        config["work_root"] = tmp  # the children's offload folders: gone with it, whatever happens to them
        if "resident" in bench.strategies:  # the float32 reference every result's error is measured against
            bench.run_reference(processes, Path(tmp), progress)
        if image and stage == "diffusion" and not bench.method and "resident" in bench.strategies:
            bench.run_image(processes, Path(tmp), progress, math.isinf)
        for round_ in range(rounds):
            bench.run_round(processes, Path(tmp), progress, round_, on_result)
    return bench.report(complete=True)


def _check_run(ref, stage: str, steps: int, height: int, width: int, tokens, rounds, timeout, cache: str,
               strategies) -> int:
    """``bench``'s settings checked before anything is planned or run; the text tokens, defaulted."""
    import math

    from helpers.diffuse import check_settings

    if stage not in STRATEGIES:
        raise UserError(f"stage must be one of {', '.join(STRATEGIES)}, not {stage!r}.")
    family, allowed = ref.family, STRATEGIES[stage]
    check_settings(height, width, steps, 0.0)
    tokens = TOKENS[stage] if tokens is None else tokens
    most = max(v.max_text_length for v in family.variants.values())
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= most:
        encoder = family.component(family.main("text_encoding")).short
        raise UserError(f"tokens must be a whole number from 1 to {most} ({encoder}'s limit), not {tokens!r}.")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= 100:
        raise UserError(f"rounds must be a whole number from 1 to 100, not {rounds!r}.")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or not timeout > 0):
        raise UserError(f"timeout must be a finite number of seconds above 0, not {timeout!r}.")
    if cache not in ("auto", "cold", "warm"):
        raise UserError(f"cache must be 'auto', 'cold' or 'warm', not {cache!r}.")
    has_gpu = torch.cuda.is_available()
    for s in strategies or ():
        if s not in CPU_STRATEGIES + GPU_ONLY + (METHOD,):
            raise UserError(f"unknown strategy {s!r}; the strategies are "
                            f"{', '.join(CPU_STRATEGIES + GPU_ONLY + (METHOD,))}.")
        if s not in allowed + ((METHOD,) if stage == "diffusion" else ()):
            raise UserError(f"strategy {s!r} is not benchmarked for {stage}; use {', '.join(allowed)}.")
        if s in GPU_ONLY and not has_gpu:
            raise UserError(f"strategy {s!r} needs a GPU; this machine has none.")
    return tokens


def _is_method(precision) -> bool:
    """Whether the bench's precision is the method's: bf16 weights and math (a transformer file never is)."""
    return (precision.weights, precision.compute) == ("bf16", "bf16") and precision.file is None


def _chosen_strategies(strategies, stage: str, gpu, precision) -> list[str]:
    """The strategies asked for, or every one this stage, budget and file has (``method`` beside
    ``accelerate`` where the precision is not the method's)."""
    for s in strategies or ():
        if s in GPU_ONLY and gpu is None:
            raise UserError(f"strategy {s!r} needs a GPU tier in the budget, e.g. \"0=8.5GiB,cpu=30GiB\".")
    if strategies:
        return list(strategies)
    everything = CPU_STRATEGIES + GPU_ONLY if gpu is not None else CPU_STRATEGIES
    chosen = [s for s in everything if s in STRATEGIES[stage] and (s not in FILE_ONLY or precision.file is not None)]
    if stage == "diffusion" and not _is_method(precision) and "accelerate" in chosen:
        chosen.insert(chosen.index("accelerate") + 1, METHOD)
    return chosen


class _Bench:
    """One benchmark's state: the job every child runs, what each strategy measured (``runs``, its
    ``outputs``), what failed (``errors``) and the image pair; :meth:`report` is its JSON."""

    def __init__(self, ref, job, config: dict, strategies: list[str], rounds: int, budget_spec, cache: str):
        from helpers.footprint import activation_bytes

        self.ref, self.job, self.config, self.strategies, self.rounds = ref, job, config, strategies, rounds
        self.budget_spec, self.cache, self.folder = budget_spec, cache, None
        self.plan, self.precision, self.family = job.plan, job.plan.precision, ref.family
        self.stage = config["stage"]
        self.component = self.family.main(self.stage)
        self.file_format = self.precision.file.label if self.precision.file is not None else None
        self.method = _is_method(self.precision)
        self.gpu = self.plan.budget.gpu
        self.runs: dict[str, list[dict]] = {s: [] for s in strategies}
        self.errors: dict[str, str] = {}
        if self.precision.file is not None and self.precision.file.scaled:  # not run: said in the results, with why
            self.errors.update({s: f"not run: {DIFFUSERS_SCALED}" for s in strategies if s.startswith("diffusers")})
        self.outputs: dict[str, torch.Tensor] = {}
        self.picture: dict = {}
        # what one call holds beyond its weights (meta-device count; a stream to a GPU keeps it free there), for
        # the report: a model whose forward the meta device cannot run still benchmarks
        try:
            self.activations = activation_bytes(self.component, ref.configs[self.component],
                                                self.precision.compute_dtype, height=config["height"],
                                                width=config["width"], tokens=config["tokens"], family=self.family)
        except Exception:  # noqa: BLE001
            self.activations = None

    def run_reference(self, processes, tmp: Path, progress) -> None:
        """The float32 resident run every result's ``rel_error_vs_fp32`` is measured against."""
        progress("float32 reference (resident, fp32 weights and math): running in its own process...")
        out = tmp / _FP32
        error = processes.run("resident", {**_without_file(self.config), "weights": "fp32", "compute": "fp32"}, out)
        if error is None:
            self.outputs[_FP32] = torch.load(out.with_suffix(".pt"))
        else:
            progress(f"float32 reference: failed, no rel_error_vs_fp32: {error}")

    def run_image(self, processes, tmp: Path, progress, infinite) -> None:
        """One image in this precision and one in the method's bf16 (resident, every step and the decode),
        for the PSNR between them."""
        from PIL import Image

        from helpers.images import psnr

        progress("image in this precision and in the method's bf16 (resident, every step and the decode)...")
        pngs = {}
        for key, knobs in (("this", {}), ("bf16", {"weights": "bf16", "compute": "bf16"})):
            out = tmp / f"{_IMAGE}-{key}"
            error = processes.run(_IMAGE, {**(_without_file(self.config) if knobs else self.config), **knobs}, out)
            if error is not None:
                progress(f"image: failed, no PSNR: {error}")
                return
            with Image.open(out.with_suffix(".png")) as img:
                pngs[key] = img.convert("RGB")
        value = psnr(pngs["this"], pngs["bf16"])
        self.picture.update(seed=0, steps=self.config["steps"], guidance=0.0, reference="bf16 weights, bf16 math",
                            psnr_vs_bf16_db=None if infinite(value) else round(value, 2), identical=infinite(value))
        progress(f"image: PSNR against bf16 {value:.2f} dB")

    def run_round(self, processes, tmp: Path, progress, round_: int, on_result) -> None:
        """Every strategy not failed yet, each in its own process, one after the other."""
        for s in self.strategies:
            if s in self.errors:
                continue
            when = f" (round {round_ + 1} of {self.rounds})" if self.rounds > 1 else ""
            progress(f"{s}: running in its own process{when}...")
            out = tmp / s
            error = processes.run(s, self.config, out)
            if error is not None:
                progress(f"{s}: failed: {error}")
                self.errors[s] = error
            else:
                self.runs[s].append(json.loads(out.with_suffix(".json").read_text()))
                self.outputs[s] = torch.load(out.with_suffix(".pt"))
                progress(f"{s}: {self.runs[s][-1]['s_per_step']:.4f} s/step")
            if on_result is not None:  # the last one too: the floor is still to be measured
                on_result(self.report(complete=False))

    def _results(self) -> list[dict]:
        method_knobs = {"weights": "bf16", "compute": "bf16"}
        return [({"strategy": s, "error": self.errors[s], "s_per_step": None, "peak_rss_bytes": None,
                  "peak_gpu_bytes": None, "bytes_streamed_per_step": None, **(method_knobs if s == METHOD else {})}
                 if not self.runs[s] else {**_combine(self.runs[s]), **({"error": self.errors[s]} if s in self.errors
                                                                          else {})})
                for s in self.strategies if s in self.errors or self.runs[s]]

    def _row(self, r: dict) -> dict:
        """A result as reported: its precision and file, and its output against resident's and float32's."""
        precision, reference, exact = self.precision, self.outputs.get("resident"), self.outputs.get(_FP32)
        r = {k: v for k, v in r.items() if k != "baseline_rss_bytes"}
        out = self.outputs.get(r["strategy"])
        r.setdefault("weights", precision.weights)
        r.setdefault("compute", precision.compute)
        r["file_format"] = self.file_format if r["strategy"] not in (METHOD, _FP32) else None
        alike = (r["weights"], r["compute"]) == (precision.weights, precision.compute)  # resident's precision
        r["max_abs_diff_vs_resident"] = (None if reference is None or out is None or not alike
                                         else float((out.float() - reference.float()).abs().max()))
        r["rel_error_vs_fp32"] = (None if exact is None or out is None
                                  else float((out.float() - exact.float()).norm() / exact.float().norm()))
        return r

    def _floor(self, rows: list[dict]) -> dict:
        """The fastest a step can be here: the larger of resident's compute and moving the bytes the
        method's map keeps off the fast tier at the measured bandwidth."""
        gpu = self.gpu
        bandwidth = (host_to_device_bandwidth(gpu) if gpu is not None
                     else disk_bandwidth(self.folder, self.cache, component=self.component))
        compute = next((r["s_per_step"] for r in rows if r["strategy"] == "resident" and r["s_per_step"]), None)
        slow = "cpu" if gpu is not None else "disk"  # where the method's map keeps the blocks that must move
        streamed = sum(u.nbytes for p in self.plan.components if p.component == self.component for u in p.units
                       if u.tier == slow)
        return {"bandwidth_bytes_per_s": bandwidth, "bytes_to_move_per_step": streamed,
                "compute_s_per_step": compute, "s_per_step": max(compute or 0.0, streamed / bandwidth)}

    def report(self, complete: bool) -> dict:
        """The JSON so far; the floor is measured once every strategy has run (none of them shares the
        machine with the measurement), so a partial report has none."""
        from helpers.budget import parse_budget

        results = self._results()
        rows_ = [self._row(r) for r in results]
        floor = self._floor(rows_) if complete else None
        for r in rows_:
            r["ratio_to_floor"] = (r["s_per_step"] / floor["s_per_step"]
                                   if floor and floor["s_per_step"] and r["s_per_step"] else None)
        baselines = [r["baseline_rss_bytes"] for r in results if r.get("baseline_rss_bytes")]
        config, gpu, spec = self.config, self.gpu, self.budget_spec
        model = Path(config["model"])  # a local folder by its name: no machine's path in a shared result
        return {
            "model": model.name if model.is_absolute() else config["model"],
            "stage": self.stage, "component": self.component,
            "component_short": self.family.component(self.component).short,
            "device": f"cuda:{gpu} ({torch.cuda.get_device_name(gpu)})" if gpu is not None else "cpu",
            "machine": machine(),
            "max_memory": spec if isinstance(spec, str) else str(parse_budget(spec)),
            "budget_scaled_like": self.family.reference_model if self.plan.reference is not None else None,
            "max_memory_bytes": {str(t): b for t, b in self.plan.budget.tiers},
            "baseline_rss_bytes": min(baselines) if baselines else None,
            "steps": config["steps"], "height": config["height"], "width": config["width"], "tokens": config["tokens"],
            "cache": self.cache, "complete": complete, "strategies": self.strategies, "rounds": self.rounds,
            "activation_bytes": self.activations,
            "precision": self.precision.as_dict(),
            "image": self.picture or None,
            "floor": floor,
            "results": rows_,
        }


if __name__ == "__main__":  # python -m helpers.bench --serve, or one strategy: STRATEGY CONFIG OUT
    __import__("helpers")  # its logging filters, as in the parent

    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        _child_main(sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]))
