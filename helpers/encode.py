"""Stage 1, text encoding: the text encoders under a budget (FLUX.1: CLIP whole, the big T5 split
across memory tiers), embeddings to a file.

The steps, each a function the notebook calls in turn and :func:`encode_prompts` chains (for the
widget and ``python -m helpers encode``):

1. :func:`text_encoding_plan`: the encoders' skeletons on meta, placed under the budget (no weights);
   a budget too small is refused here, before anything loads, with the smallest one that works;
2. :func:`load_text_encoders`: the real weights, loaded with that device map (tiers on disk read
   from an offload folder), and the map accelerate actually applied checked against the plan;
3. :func:`encode`: the pipeline's own ``encode_prompt`` with only the encoders and tokenizers (the
   family says which, :mod:`helpers.families`);
4. :func:`helpers.embeddings.save_embeddings`: bfloat16, atomically.

Explained in ``02_text-encoding-offload.ipynb``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.budget import Tier
from helpers.errors import UserError
from helpers.families import default_family
from helpers.files import check_can_write, check_free_space, check_writable, outputs_dir, remove_folder
from helpers.loading import compare_maps, torch_device  # noqa: F401 - the notebooks' names



def embeddings_path(name: str) -> Path:
    """``outputs/embeddings/<name>.safetensors``."""
    return outputs_dir() / "embeddings" / f"{name}.safetensors"


# --------------------------------------------------------------------------- 1. plan


def text_encoding_plan(model=None, max_memory=None, like: str | None = "auto", workload=None,
                       weights: str | None = None, compute: str = "auto"):
    """Place CLIP (whole) and T5 (split) under the budget; refuse a budget that is too small.

    ``weights``: how the encoders are stored (``None``: the method's float32; ``bf16`` halves them);
    ``compute``: their math (``auto``: float32, the method's); see :mod:`helpers.precision`.

    ``workload`` (:class:`helpers.activations.Workload`: prompts and tokens; default one prompt of
    512 tokens): T5's activations for it keep room on the fast tier, and a batch whose activations
    alone exceed it is refused with the most prompts that fit. See
    :func:`helpers.planner.plan_stage`: only skeletons are built, nothing is loaded.
    """
    from helpers.planner import plan_stage

    return plan_stage("text_encoding", model, max_memory, like, workload=workload, weights=weights, compute=compute)


# --------------------------------------------------------------------------- 2. load


@dataclass
class TextEncoders:
    """The loaded text encoders and tokenizers (``parts``, by component: ``encoders.text_encoder_2``
    reads one), with the plan they were loaded by and the map that was applied to the split one."""

    parts: dict
    plan: object
    applied: dict[str, Tier]
    device: torch.device
    offload_folder: Path | None = None
    differences: list[str] = field(default_factory=list)
    streamer: object = None  # offload "stream": the reader of the split encoder's streamed blocks
    offload: str = "accelerate"  # how the split encoder's offloaded blocks are fetched: "accelerate" or "stream"
    temporary: bool = False  # the offload folder is this run's own, removed by close()

    def __getattr__(self, name: str):
        parts = self.__dict__.get("parts") or {}
        if name in parts:
            return parts[name]
        raise AttributeError(name)

    @property
    def family(self):
        return self.plan.family

    def close(self) -> None:
        """Stop the block reader, if any, drop the models, and remove this run's offload folder."""
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        self.parts = {}
        if self.temporary and self.offload_folder is not None:
            remove_folder(self.offload_folder)


def load_text_encoders(folder: str | os.PathLike, plan, offload_folder: str | os.PathLike | None = None,
                       offload: str = "accelerate", progress: bool = True) -> TextEncoders:
    """Load the stage's encoders as the plan says (FLUX.1: CLIP whole, T5 split), in the plan's
    precision, and their tokenizers; check what was applied.

    A plan that puts blocks on ``disk`` needs an offload folder: ``offload_folder`` (created if
    missing: accelerate expects it to exist), or by default a fresh one of this run's own under
    ``outputs/offload/``, removed by :meth:`TextEncoders.close`. ``offload="stream"``: the split
    encoder's blocks that do not fit the fast tier are read ahead, in parts (:mod:`helpers.offload.streamers`;
    from the checkpoint without a GPU tier, converted to the compute dtype as they arrive; from pinned
    RAM to the GPU with one), keeping the plan's room for activations free; ``"auto"`` picks it where
    the budget has no GPU tier and the stream fits the budget, else ``"accelerate"``. The weights are
    stored as :attr:`plan.precision <helpers.planner.StagePlan.precision>` says and upcast layer by
    layer to its compute dtype (:mod:`helpers.loading`). ``progress``: a progress bar while a
    stream loads.
    """
    from helpers.loading import load_stage

    mapped, parts = load_stage(folder, plan, offload, offload_folder, progress)
    return TextEncoders(
        parts=parts, plan=plan, applied=mapped.applied,
        device=mapped.device, offload_folder=mapped.offload_folder, differences=mapped.differences,
        streamer=mapped.streamer, offload=mapped.offload, temporary=mapped.temporary,
    )


# --------------------------------------------------------------------------- 3. encode


def check_prompts(prompts: str | list[str]) -> list[str]:
    """A list of non-empty prompts, or a :class:`UserError` saying which one is empty."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise UserError("no prompt given; write at least one.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            where = "the prompt" if len(prompts) == 1 else f"prompt {i + 1} of {len(prompts)}"
            raise UserError(f"{where} is empty; write what the image should show.")
    return prompts


def check_max_sequence_length(n: int, variant: str | None = None, family=None) -> int:
    """1 token to the most the family's text encoder takes (FLUX.1: T5's 512); a variant may take
    fewer (FLUX.1-schnell was trained with at most 256)."""
    family = family or default_family()
    most = max(v.max_text_length for v in family.variants.values())
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"max_sequence_length must be a whole number of tokens from 1 to {most}, not {n!r}.")
    if n > most:
        encoder = family.component(family.main("text_encoding")).short
        raise UserError(f"max_sequence_length {n} is more than {encoder}'s {most} tokens; use {most} or less.")
    refusal = family.checks(variant, n) if family.checks else None
    if refusal:
        raise UserError(refusal)
    return n


def token_report(prompts: list[str], tokenizers: dict, max_sequence_length: int, family=None) -> list[dict]:
    """Tokens per prompt for each tokenizer of the text stage (``tokenizers``, by component), and
    which of them cuts the prompt (FLUX.1: CLIP at 77, T5 at ``max_sequence_length``)."""
    return (family or default_family()).token_report(tokenizers, prompts, max_sequence_length)


def truncation_warnings(rows: list[dict], max_sequence_length: int, family=None) -> list[str]:
    """A sentence for each prompt :func:`token_report` found cut."""
    return (family or default_family()).truncation_warnings(rows, max_sequence_length)


def encode(encoders: TextEncoders, prompts: list[str], max_sequence_length: int,
           variant: str | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's ``encode_prompt`` with only the encoders and tokenizers: the method's stage 1.

    Returns the family's embeddings by name (FLUX.1: ``prompt_embeds``, ``pooled_prompt_embeds`` and
    ``text_ids``, in float32; FLUX.2 [klein]'s base ``variant`` adds the empty prompt's embeddings, its
    classifier-free guidance's negative).
    """
    family = encoders.family
    return family.encode(family, encoders.parts, prompts, encoders.device, max_sequence_length, variant)


# --------------------------------------------------------------------------- all of it


@dataclass
class EncodeResult:
    path: Path
    plan: object
    applied: dict
    differences: list[str]
    tokens: list[dict]
    warnings: list[str]
    measurement: object
    shapes: dict
    offload: str = "accelerate"  # how T5's offloaded blocks were fetched

    def per_tier(self) -> list[dict]:
        """Peak use per tier against the budget (see :func:`helpers.devicemap.tier_usage`)."""
        from helpers.devicemap import tier_usage

        return tier_usage(self.plan, self.measurement)


def check_embeddings_out(out: str | os.PathLike, overwrite: bool = False, create_folder: bool = True) -> Path:
    """Where an embeddings file may be written: a ``.safetensors`` name, in a folder that exists (or may
    be made) and takes files, not replacing one unless ``overwrite``."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"{out.name}: embeddings are saved as .safetensors; use a name ending in .safetensors.")
    if not out.parent.exists():
        if not create_folder:
            raise UserError(f"the folder {out.parent} does not exist; create it or choose another --out.")
    elif not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder; choose another output path.")
    else:
        check_writable(out.parent)
    check_can_write(out, overwrite)
    return out


def encode_prompts(
    model: str | None,
    prompts: str | list[str],
    out: str | os.PathLike,
    max_memory=None,
    max_sequence_length: int | None = None,
    overwrite: bool = False,
    create_folder: bool = True,
    offload: str = "auto",
    weights: str | None = None,
    compute: str = "auto",
    check_only: bool = False,
    cpu_bf16: bool | None = None,
) -> EncodeResult:
    """Stage 1 in one call, for a notebook or a widget: check the inputs, plan the job
    (:func:`helpers.job.plan_job`), then run it (:func:`run_text_encoding`). Every check runs before
    any load.

    ``offload``: see :func:`load_text_encoders` (``auto``: ``stream`` without a GPU tier, else
    ``accelerate``, settled when planning). ``weights`` and ``compute``: see :func:`text_encoding_plan`.
    ``check_only``: every check and the plan, then the job (:class:`helpers.job.Job`), nothing loaded.
    ``cpu_bf16``: whether the CPU that computes has native bf16 (``None``: this machine's, measured once).
    """
    from helpers.job import Request, plan_job
    from helpers.models import resolve_model
    from helpers.offload.streamers import check_offload

    ref = resolve_model(model)  # once: the plan, the folder and the file's fingerprint all ask this object
    workload = _text_workload(ref, prompts, max_sequence_length)
    check_embeddings_out(out, overwrite, create_folder)
    check_offload(offload)
    job = plan_job(Request("text_encoding", ref, max_memory, workload, weights, compute, offload, cpu_bf16=cpu_bf16))
    if check_only:
        return job
    return run_text_encoding(job, prompts, out, overwrite=overwrite, create_folder=create_folder)


def _text_workload(ref, prompts, max_sequence_length: int | None):
    """The prompts and text length checked for ``ref``'s family, as the activations they make: the
    split encoder keeps room for them on the fast tier (too many at once are refused when planning)."""
    from helpers.activations import Workload

    prompts = check_prompts(prompts)
    if max_sequence_length is None:  # the variant's usual: 512 tokens, FLUX.1-schnell 256
        max_sequence_length = ref.usual.text_length
    check_max_sequence_length(max_sequence_length, ref.variant, ref.family)
    return Workload(batch=len(prompts), tokens=max_sequence_length)


def run_text_encoding(job, prompts: str | list[str], out: str | os.PathLike, *, overwrite: bool = False,
                      create_folder: bool = True) -> EncodeResult:
    """Run a text-encoding job (:class:`helpers.job.Job`, as its planner decided it: the model, budget,
    precision and offload are the job's) on ``prompts``, which must be what it was planned for (their
    count and the text length), and save the embeddings to ``out``. Every check runs before any load."""
    from helpers.embeddings import save_embeddings, weights_identity
    from helpers.job import Job
    from helpers.memory import measure

    if not isinstance(job, Job) or job.stage != "text_encoding":
        raise UserError("run_text_encoding runs a text-encoding job (helpers.job.plan_job, or load_job of a saved one).")
    ref, family = job.model, job.model.family
    length = job.workload.tokens if job.workload is not None else None
    workload = _text_workload(ref, prompts, length)
    job.check_workload(workload)
    prompts, max_sequence_length = check_prompts(prompts), workload.tokens
    out = check_embeddings_out(out, overwrite, create_folder)
    check_free_space(out.parent, family.embeddings_bytes(ref.configs, workload.batch, workload.tokens),
                     "the embeddings file")
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = job.plan
    folder = ref.folder(components=list(family.stage_parts("text_encoding")))

    with measure("text encoding") as m:
        encoders = load_text_encoders(folder, plan, offload=job.offload)
        try:
            tokens = token_report(prompts, encoders.parts, max_sequence_length, family)
            embeds = encode(encoders, prompts, max_sequence_length, ref.variant)
            facts = family.embeddings_facts(encoders.parts) if family.embeddings_facts else {}
            path = save_embeddings(
                out, embeds, model=ref.label, family=family,
                fingerprint=ref.fingerprint, weights=weights_identity(folder, family),
                prompts=prompts, max_sequence_length=max_sequence_length, overwrite=overwrite, extra=facts,
            )
        finally:
            used = encoders.offload
            encoders.close()
    result = EncodeResult(
        path=path, plan=plan, applied=encoders.applied, differences=encoders.differences, tokens=tokens,
        warnings=plan.warnings + truncation_warnings(tokens, max_sequence_length, family), measurement=m,
        shapes={k: list(embeds[k].shape) for k in family.embedding_names},
        offload=used,
    )
    del encoders
    return result
