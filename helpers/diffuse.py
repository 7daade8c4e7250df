"""Stage 2, diffusion: from the embeddings file to images, in bfloat16 under the memory budget.

The steps, each a function the notebook calls in turn and :func:`diffuse_file` chains (for the
widget and ``python -m helpers diffuse``):

1. :func:`check_settings` and :func:`helpers.embeddings.validate`: sizes, steps, guidance and the
   embeddings file (header and values) checked against the model, before any weight loads;
2. :func:`diffusion_plan`: the transformer skeleton placed under the budget in bfloat16 (the VAE
   whole on the fastest tier), room kept there for the activations of the image size and batch; a
   budget too small is refused with the smallest one that works, a size too large with the largest
   square one that fits;
3. :func:`load_diffusion`: transformer loaded with that device map (accelerate's hooks, or the
   offloaded blocks streamed ahead: ``offload="stream"``), VAE whole, a ``FluxPipeline``
   without encoders or tokenizers;
4. :func:`generate`: the pipeline called with the embeddings moved to the transformer's dtype and
   device, a CPU generator seeded for the same image on any device, a progress bar, time per step.

Explained in ``03_bf16-diffusion.ipynb``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.activations import MULTIPLE, Workload
from helpers.errors import UserError
from helpers.families import default_family
from helpers.files import check_can_write, check_writable, outputs_dir, remove_folder

#: guidance beyond this is no setting of any family (FLUX.1: 3.5 for dev, 0 for schnell); the transformer
#: multiplies it by 1000 in bfloat16, which overflows to infinity from about 3e35
MAX_GUIDANCE = 1000.0


def image_path(name: str) -> Path:
    """``outputs/images/<name>.png``."""
    return outputs_dir() / "images" / f"{name}.png"


# --------------------------------------------------------------------------- 1. checks


def nearest_sizes(n: int) -> tuple[int, int]:
    """The valid sizes (multiples of 16) just below and just above ``n``."""
    low = max(MULTIPLE, n // MULTIPLE * MULTIPLE)
    return low, low + MULTIPLE if low < n or n < MULTIPLE else low


def check_seed(seed: int) -> int:
    """A seed a CPU generator takes: a whole number from 0 to 2**64 - 1."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise UserError(f"seed must be a whole number from 0 to 2**64 - 1, not {seed!r}.")
    return seed


def check_settings(height: int, width: int, steps: int, guidance: float, variant: str | None = None,
                   max_sequence_length: int | None = None, family=None) -> list[str]:
    """Reject sizes, steps and guidance FLUX cannot use; return notes on unusual but valid choices."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < MULTIPLE:
            raise UserError(f"{name} must be a whole number of pixels, at least {MULTIPLE}, not {value!r}.")
        if value % MULTIPLE:
            low, high = nearest_sizes(value)
            raise UserError(f"{name} {value} is not a multiple of {MULTIPLE}; the nearest valid sizes are {low} and {high}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a whole number, 1 or more, not {steps!r}.")
    try:
        guidance = float(guidance)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"guidance must be a number, not {guidance!r}.") from None
    if not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise UserError(f"guidance must be a finite number from 0 to {MAX_GUIDANCE:g} (usual: 3.5 for FLUX.1-dev, "
                        f"0 for schnell), not {guidance}.")
    if variant is None:
        return []
    family = family or default_family()
    return family.setting_notes(variant, steps, guidance, max_sequence_length)


def diffusion_plan(model=None, max_memory=None, like: str | None = "auto",
                   workload: Workload | None = None, weights: str | None = None, compute: str = "auto",
                   transformer_file=None):
    """The transformer split and the VAE whole under the budget; nothing is loaded.

    ``weights``: how they are stored (``None``: the method's bf16); ``compute``: their math
    (``auto``: bf16 where the device has it natively, float32 otherwise); see :mod:`helpers.precision`.

    ``transformer_file``: the transformer's weights from one file (``--transformer``: a ``.gguf`` or
    single ``.safetensors`` in the BFL layout), the rest from ``model``; see :mod:`helpers.formats.transformer_file`.

    ``workload`` (:class:`helpers.activations.Workload`: image size, prompts, text tokens; default
    one 1024x1024 image): room for the larger of a denoising step's and the VAE decode's activations
    is kept on the fast tier, and a size whose activations alone exceed it is refused, naming the
    largest square size that fits. See :func:`helpers.planner.plan_stage`.
    """
    from helpers.planner import plan_stage

    return plan_stage("diffusion", model, max_memory, like, workload=workload, weights=weights, compute=compute,
                      transformer_file=transformer_file)


def expected_inputs(model) -> dict:
    """What an embeddings file must match for ``model`` (a name or a resolved
    :class:`helpers.models.ModelRef`): text-encoder fingerprint, their weights' identity where the
    model's folder is here (nothing is built or fetched for it), its family and each tensor's width."""
    from helpers.embeddings import weights_identity
    from helpers.models import local_folder, resolve_model

    ref = resolve_model(model)
    return {
        "expected_fingerprint": ref.fingerprint,
        "expected_weights": weights_identity(local_folder(ref), ref.family),
        "widths": {name: shape[-1] for name, shape in ref.family.embedding_shapes(ref.configs, 1, 1).items()},
        "expected_family": ref.family.name,
    }


# --------------------------------------------------------------------------- 2. load


@dataclass
class Diffusion:
    """The loaded transformer and VAE, the pipeline around them, and the plan they follow."""

    pipe: object
    plan: object
    applied: dict
    differences: list[str]
    device: torch.device
    offload_folder: Path | None = None
    temporary: bool = False
    streamer: object = None
    offload: str = "accelerate"  # how the offloaded blocks are fetched: "accelerate" or "stream"

    def close(self) -> None:
        """Drop the models and remove a temporary offload folder (its files are this run's copies)."""
        self.pipe = None
        if self.streamer is not None:
            self.streamer.close()
        if self.temporary and self.offload_folder is not None:
            remove_folder(self.offload_folder)


def load_diffusion(folder: str | os.PathLike, plan, offload_folder: str | os.PathLike | None = None,
                   offload: str = "accelerate", progress: bool = True, variant: str | None = None) -> Diffusion:
    """Load the transformer split as the plan says and the VAE whole, in the plan's precision.

    The transformer is loaded with an explicit device map (diffusers' ``device_map="auto"`` fails on
    a budget with a disk tier: "Expected one of cpu, cuda, ... device string: disk"). Blocks mapped to
    disk are written to ``offload_folder`` (created if missing) as one file per tensor; without one,
    a fresh folder under ``outputs/offload/`` is used and :meth:`Diffusion.close` removes it.

    ``offload="stream"``: without a GPU tier, the blocks that do not fit the cpu tier are read
    straight from the checkpoint by :mod:`helpers.offload.streamers`, a few parts of a block ahead, into a
    small pool (with a GPU tier: held in pinned RAM, copied ahead on a side stream), keeping the
    plan's room for the activations free; ``"auto"`` picks it where the budget has no GPU tier and
    the stream fits the budget, else ``"accelerate"``. The weights are stored as the plan's
    precision says and upcast layer by layer to its compute dtype (:mod:`helpers.loading`).
    ``progress``: a progress bar while a stream loads. ``variant``: the model's (:attr:`helpers.models.ModelRef.variant`),
    where a family's pipeline runs differently by variant (FLUX.2 [klein]'s base models guide, the
    distilled ones never do).
    """
    from helpers.loading import load_stage

    loaded, parts = load_stage(folder, plan, offload, offload_folder, progress)
    pipe = plan.family.diffusion_pipeline(plan.family, parts, variant)
    return Diffusion(pipe=pipe, plan=plan, applied=loaded.applied, differences=loaded.differences,
                     device=loaded.device, offload_folder=loaded.offload_folder, temporary=loaded.temporary,
                     streamer=loaded.streamer, offload=loaded.offload)


# --------------------------------------------------------------------------- 3. generate


@dataclass
class Generation:
    images: list
    step_times: list[float] = field(default_factory=list)

    @property
    def s_per_step(self) -> float:
        return sum(self.step_times) / len(self.step_times) if self.step_times else 0.0


@torch.no_grad()
def generate(diffusion: Diffusion, tensors: dict[str, torch.Tensor], seed: int, steps: int, guidance: float,
             height: int, width: int, progress: bool = True, batch_size: int = 1, first: int = 0) -> Generation:
    """The method's diffusion call: embeddings in, images out; one image per prompt in the file.

    The embeddings are moved to the plan's compute dtype and the execution device (the pipeline does not
    do it). Prompt ``i`` is seeded with ``seed + i`` (:func:`helpers.workers.prompt_seed`; ``first``:
    the index of the first of ``tensors``' prompts in its file), each on a CPU generator of its own, so
    a prompt's image is the same on any device and whichever worker makes it; the pipeline makes
    ``batch_size`` prompts per call (default one: the image does not depend on what else is made).
    """
    from helpers.workers import check_batch_size, chunks, prompt_seed

    check_seed(seed)
    check_settings(height, width, steps, guidance)
    check_batch_size(batch_size)
    pipe = diffusion.pipe
    dtype = diffusion.plan.precision.compute_dtype  # the weights may be stored in another
    inputs = {k: v.to(diffusion.device, dtype) for k, v in diffusion.plan.family.pipeline_inputs(tensors).items()}
    count = next(iter(inputs.values())).shape[0]
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step_end(_pipe, _step, _timestep, kwargs):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        return kwargs

    images = []
    calls = chunks(count, batch_size)
    for chunk in calls:
        a, b = first + chunk[0] + 1, first + chunk[-1] + 1  # as the files number them
        what = "" if len(calls) == 1 and first == 0 else f" image {a}" if a == b else f" images {a}-{b}"
        pipe.set_progress_bar_config(disable=not progress, desc=f"denoising{what}")
        last[0] = time.perf_counter()
        out = pipe(
            **{k: v[chunk[0]:chunk[-1] + 1] for k, v in inputs.items()},
            num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
            generator=[torch.Generator("cpu").manual_seed(prompt_seed(int(seed), first + i)) for i in chunk],
            callback_on_step_end=on_step_end,
        )
        images += list(out.images)
    return Generation(images=images, step_times=times)


def grid(images: list, columns: int | None = None):
    """The images side by side (a gallery), in rows of ``columns``."""
    from PIL import Image

    columns = columns or min(4, len(images))
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        sheet.paste(img, ((i % columns) * w, (i // columns) * h))
    return sheet


# --------------------------------------------------------------------------- all of it


def output_paths(out: str | os.PathLike, batch: int) -> list[Path]:
    """``out`` for one image; ``<stem>-1.png`` ... ``<stem>-N.png`` for a batch of N."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out.name}: images are saved as PNG; use a .png name.")
    if batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}.png") for i in range(1, batch + 1)]


@dataclass
class DiffuseResult:
    paths: list[Path]
    images: list
    plan: object
    applied: dict
    differences: list[str]
    notes: list[str]
    measurement: object
    step_times: list[float]
    header: object
    offload: str = "accelerate"  # how the transformer's offloaded blocks were fetched
    warnings: list[str] = field(default_factory=list)  # the plan's: a size that leaves weights little room

    @property
    def s_per_step(self) -> float:
        return sum(self.step_times) / len(self.step_times) if self.step_times else 0.0

    def per_tier(self) -> list[dict]:
        """Peak use per tier against the budget (see :func:`helpers.devicemap.tier_usage`)."""
        from helpers.devicemap import tier_usage

        return tier_usage(self.plan, self.measurement)


def check_image_outputs(paths: list[Path], overwrite: bool = False, create_folder: bool = True,
                        several: bool = False) -> None:
    """The images a run will write: each in a folder that exists (or may be made) and takes files, none
    replaced unless ``overwrite`` (``several``: one of a file's many images, where --resume is the way)."""
    for p in paths:
        if not p.parent.exists() and not create_folder:
            raise UserError(f"the folder {p.parent} does not exist; create it or choose another --out.")
        if p.parent.exists() and not p.parent.is_dir():
            raise UserError(f"{p.parent} is not a folder; choose another --out.")
        if p.parent.exists():
            check_writable(p.parent)
        if p.is_file() and not overwrite and several:
            raise UserError(f"{p} already exists; --resume makes only the images of this file that are missing, "
                            "--overwrite makes them all again.")
        check_can_write(p, overwrite)


@dataclass(frozen=True)
class Images:
    """The images one diffusion run is to make, every input checked (the embeddings file read and
    validated against the model, the settings, where the images go) and nothing loaded:
    :func:`check_images` makes one, :func:`run_diffusion` makes its images with a job."""

    model: object  # the resolved helpers.models.ModelRef
    header: object  # the embeddings file's (helpers.embeddings)
    tensors: dict
    paths: list  # one per prompt of the file
    calls: list  # this worker's pipeline calls still to make (prompt indices)
    todo: list  # the prompts whose images this run writes
    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    batch_size: int
    notes: list
    overwrite: bool = False

    @property
    def workload(self) -> Workload:
        """What one pipeline call computes on: the plan keeps room for it on the fast tier."""
        return Workload(self.height, self.width, min(self.batch_size, self.header.batch),
                        self.header.max_sequence_length)


def check_images(embeddings: str | os.PathLike, out: str | os.PathLike, model=None, *, seed: int = 0,
                 steps: int | None = None, guidance: float | None = None, height: int = 1024, width: int = 1024,
                 batch_size: int = 1, overwrite: bool = False, create_folder: bool = True, resume: bool = False,
                 worker=None) -> Images:
    """Every check of a diffusion run that needs no plan, in the order a user fixes them: the file, the
    settings, then the file's tensors against the model and where the images go. ``model`` defaults to
    the one that made the embeddings; ``steps`` and ``guidance`` to the variant's usual values. Prompt
    ``i``'s image goes to :func:`output_paths` ``[i]``; ``worker`` (:class:`helpers.workers.Worker`,
    default the only one): this process's share; ``resume``: images already there are kept."""
    from helpers.embeddings import load_embeddings, read_header
    from helpers.models import resolve_model
    from helpers.workers import Worker, check_batch_size, share

    worker = worker or Worker()
    header = read_header(embeddings)  # missing or unreadable files fail here, naming what makes them
    check_seed(seed)
    check_batch_size(batch_size)
    if resume and overwrite:
        raise UserError("--resume keeps the images already made and --overwrite makes them again: choose one.")
    if model is None:
        model = header.metadata.get("model") or None
        try:
            resolve_model(model)
        except UserError as err:
            raise UserError(f"{header.path} names model {model!r}, which is not usable here ({err}); pass --model.") from None
    ref = resolve_model(model)  # once: the plan, the folder and the file's checks all ask this object
    steps = ref.usual.steps if steps is None else steps
    guidance = ref.usual.guidance if guidance is None else guidance
    check_settings(height, width, steps, guidance)  # sizes and guidance, before the file is read
    # header, names, shapes, dtypes, fingerprint, then every value finite: still no weight loaded
    tensors, header = load_embeddings(embeddings, **expected_inputs(ref))
    notes = check_settings(height, width, steps, guidance, ref.variant, header.max_sequence_length, ref.family)
    refusal = ref.family.embeddings_check(ref.variant, guidance, tensors) if ref.family.embeddings_check else None
    if refusal:
        raise UserError(f"{header.path}: {refusal}")
    paths = output_paths(out, header.batch)
    calls = share(header.batch, worker, batch_size)
    if resume:  # a call whose images are all there is not made again
        calls = [c for c in calls if any(not paths[i].is_file() for i in c)]
    todo = [i for c in calls for i in c if not (resume and paths[i].is_file())]
    check_image_outputs([paths[i] for i in todo], overwrite, create_folder, several=header.batch > 1)
    return Images(ref, header, tensors, paths, calls, todo, seed, steps, guidance, height, width, batch_size,
                  notes, overwrite)


def diffuse_file(
    embeddings: str | os.PathLike,
    out: str | os.PathLike,
    model: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance: float | None = None,
    height: int = 1024,
    width: int = 1024,
    max_memory=None,
    overwrite: bool = False,
    create_folder: bool = True,
    progress: bool = True,
    offload: str = "auto",
    weights: str | None = None,
    compute: str = "auto",
    transformer_file: str | os.PathLike | None = None,
    batch_size: int = 1,
    resume: bool = False,
    check_only: bool = False,
) -> DiffuseResult | tuple[list[Path], object]:
    """Stage 2 in one call, for a notebook or a widget: :func:`check_images`, the job planned
    (:func:`helpers.job.plan_job`), then :func:`run_diffusion`. Every check (file, settings, budget,
    output) runs before any weight loads.

    ``model`` defaults to the one that made the embeddings; ``steps`` and ``guidance`` to the
    variant's usual values (FLUX.1-dev: 28 and 3.5; schnell: 4 and 0). ``offload``: see
    :func:`load_diffusion` (``auto``: ``stream`` without a GPU tier, else ``accelerate``, settled when
    planning). ``weights``, ``compute`` and ``transformer_file``: see :func:`diffusion_plan`.
    Prompt ``i`` is seeded with ``seed + i`` and made ``batch_size`` prompts per pipeline call (see
    :func:`generate`); each image is saved as soon as it is made. ``resume``: images already there are
    kept and only the missing ones are made. ``check_only``: every check and the plan, then ``(the
    images this call would write, its job)`` without loading anything; the job
    (:class:`helpers.job.Job`: model, plan, precision, offload) is what a worker runs.
    """
    from helpers.job import Request, plan_job
    from helpers.offload.streamers import check_offload

    images = check_images(embeddings, out, model, seed=seed, steps=steps, guidance=guidance, height=height,
                          width=width, batch_size=batch_size, overwrite=overwrite, create_folder=create_folder,
                          resume=resume)
    check_offload(offload)
    job = plan_job(Request("diffusion", images.model, max_memory, images.workload, weights, compute, offload,
                           transformer_file))
    if check_only:
        return [images.paths[i] for i in images.todo], job
    return run_diffusion(job, images, progress=progress)


def run_diffusion(job, images: Images, progress: bool = True) -> DiffuseResult:
    """Run a diffusion job (:class:`helpers.job.Job`, as its planner decided it: the budget, precision,
    transformer file and offload are the job's) on checked :class:`Images`, which must be what it was
    planned for (the model, the image size and the batch per call). Each image is saved as soon as it is
    made; ``progress``: progress bars while weights stream and steps run."""
    from helpers.images import save_image
    from helpers.job import Job
    from helpers.memory import measure
    from helpers.workers import prompt_seed

    if not isinstance(job, Job) or job.stage != "diffusion":
        raise UserError("run_diffusion runs a diffusion job (helpers.job.plan_job, or load_job of a saved one).")
    if images.model.label != job.model.label:
        raise UserError(f"the job is for model {job.model.label}, and the images are checked against "
                        f"{images.model.label}: check them against the job's model.")
    job.check_workload(images.workload)
    ref, family, plan, header = job.model, job.model.family, job.plan, images.header
    if not images.todo:  # all made already, or more workers than prompts: nothing is loaded
        return DiffuseResult(paths=[], images=[], plan=plan, applied={}, differences=[], notes=images.notes,
                             measurement=None, step_times=[], header=header, offload="none", warnings=plan.warnings)
    # a transformer file brings the weights: of the model's transformer only its config is needed
    from_file = job.transformer_file is not None
    parts = [c for c in family.stage_parts("diffusion") if not (from_file and c == family.file_component)]
    folder = ref.folder(components=parts, configs=[family.file_component] if from_file else [])
    for i in images.todo:  # only now, when the run can go ahead
        images.paths[i].parent.mkdir(parents=True, exist_ok=True)

    fp = header.metadata.get("fingerprint", "")
    settings = {"seed": images.seed, "steps": images.steps, "guidance": images.guidance, "height": images.height,
                "width": images.width}
    made, pictures, times = [], [], []
    wanted = set(images.todo)
    with measure("diffusion") as m:
        diffusion = load_diffusion(folder, plan, offload=job.offload, progress=progress, variant=ref.variant)
        try:
            for chunk in images.calls:
                part = {k: v[chunk[0]:chunk[-1] + 1] for k, v in family.pipeline_inputs(images.tensors).items()}
                result = generate(diffusion, part, **settings, progress=progress, batch_size=len(chunk),
                                  first=chunk[0])
                times += result.step_times
                for i, image in zip(chunk, result.images):
                    if i not in wanted:
                        continue
                    path = images.paths[i]
                    save_image(image, path, overwrite=images.overwrite, metadata={
                        "prompt": header.prompts[i], **settings, "seed": prompt_seed(images.seed, i),
                        "model": ref.name, "embeddings": str(header.path), "embeddings_fingerprint": fp,
                        "batch_index": i, "batch_size": header.batch,
                        **({"transformer_file": plan.precision.file.path.name} if from_file else {}),
                    })
                    made.append(path)
                    pictures.append(image)
        finally:
            applied, differences, used = diffusion.applied, diffusion.differences, diffusion.offload
            diffusion.close()
    return DiffuseResult(paths=made, images=pictures, plan=plan, applied=applied,
                         differences=differences, notes=images.notes, measurement=m,
                         step_times=times, header=header, offload=used, warnings=plan.warnings)
