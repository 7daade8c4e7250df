"""A stage's work, described once: the model, the budget, the plan, the precision, the offload.

The process that plans a stage (``generate``, ``diffuse --workers``, ``bench``, or ``--save-job``)
writes its :class:`Job` as JSON; each process that runs it (``generate``'s children, every worker,
every benchmarked strategy; ``--job FILE`` on the command line) reads it and loads exactly that plan,
planning nothing again. What could differ between the two processes is checked when the job is read:
the model's configs (its fingerprint), a transformer file's header, and the workload the plan kept
room for, each refused with a message that says to plan again.

The JSON (``"job": 1``)::

    {"job": 1, "stage": "diffusion", "offload": "auto",
     "model": {"name", "kind", "repo_id", "label", "fingerprint"},
     "budget": "cpu=12GiB,disk=100GiB",          # the command-line form, exact
     "precision": {"weights", "compute", "why", "transformer_file": PATH or null,
                   "cpu_bf16": true/false where the stage computes on a CPU (its bf16 math native or not)},
     "workload": {"height", "width", "batch", "tokens"},
     "plan": {... every placement: see plan_as_dict}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from helpers.activations import Workload
from helpers.budget import Budget, Tier, _parse_tier
from helpers.devicemap import ComponentPlan, Unit
from helpers.errors import UserError
from helpers.files import atomic_path, check_file
from helpers.planner import StagePlan
from helpers.families import default_family
from helpers.models import ModelRef, resolve_model
from helpers.precision import Precision

JOB_VERSION = 1
STAGE_NAMES = ("text_encoding", "diffusion")


# --------------------------------------------------------------------------- the plan as JSON


_EDITED = "plan the stage again (--save-job) rather than edit a job by hand"


def _tier(value) -> Tier:
    try:
        return _parse_tier(value)
    except UserError as err:
        raise UserError(f"a job names a tier that is not one: {str(err).split(';')[0]}; {_EDITED}.") from None


def _named(tier: Tier) -> str:
    return f"GPU {tier}" if isinstance(tier, int) else tier


def _size(value, what: str, least: int = 0) -> int:
    """A size a job records, as the flags are checked: a whole number of bytes (``least`` or more)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"a job's {what} is {value!r}, not a whole number of bytes "
                        f"{'above 0' if least else '0 or more'}; {_EDITED}.")
    return value


def _budget_dict(budget: Budget) -> dict:
    return {"tiers": [[t, b] for t, b in budget.tiers], "source": budget.source,
            "shares": sorted(str(t) for t in budget.shares)}


def _budget_from(d: dict) -> Budget:
    tiers = tuple((tier, _size(b, f"budget for {_named(tier)}", least=1)) for tier, b in
                  ((_tier(t), b) for t, b in d["tiers"]))
    return Budget(tiers, source=d.get("source", ""), shares=frozenset(_tier(t) for t in d.get("shares", ())))


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:  # a component held as a file stores it (GGUF blocks: no one dtype)
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"a job names dtype {name!r}, which this torch does not have; plan the stage again.")
    return value


def _precision_dict(p: Precision) -> dict:
    return {"weights": p.weights, "compute": p.compute, "why": p.why,
            "transformer_file": str(p.file.path) if p.file is not None else None,
            **({"cpu_bf16": p.cpu_bf16} if p.cpu_bf16 is not None else {})}


def plan_as_dict(plan: StagePlan) -> dict:
    """Every field of ``plan`` as JSON, so that :func:`plan_from_dict` makes an equal plan. (The
    report's :meth:`StagePlan.as_dict` is a summary for people and tools; this is the plan itself.)"""
    return {
        "stage": plan.stage,
        "precision": _precision_dict(plan.precision),
        "budget": _budget_dict(plan.budget),
        "components": [{"component": c.component,
                        "dtype": None if c.dtype is None else str(c.dtype).replace("torch.", ""),
                        "units": [[u.name, u.nbytes, u.tier] for u in c.units],
                        "device_map": [[k, t] for k, t in c.device_map.items()]} for c in plan.components],
        "fits": plan.fits, "overflow": plan.overflow, "advice": plan.advice,
        "reserve": [[t, b] for t, b in plan.reserve.items()],
        "activations": dict(plan.activations),
        "workload": plan.workload.as_dict() if plan.workload is not None else None,
        "warnings": list(plan.warnings),
        "reference": plan_as_dict(plan.reference) if plan.reference is not None else None,
        "stream": {c: dict(choice) for c, choice in plan.stream.items()},
    }


def plan_from_dict(d: dict, precision: Precision, family=None) -> StagePlan:
    """The plan :func:`plan_as_dict` wrote, in ``precision`` (whose transformer file is already open),
    of a model of ``family`` (its components are the only ones a plan may name)."""
    known = (family or default_family()).models
    unknown = [c["component"] for c in d["components"] if c["component"] not in known]
    if unknown:
        raise UserError(f"a job names component(s) {', '.join(map(repr, unknown))}, which a model does not have "
                        f"(it has {', '.join(known)}); {_EDITED}.")
    components = [ComponentPlan(c["component"], _dtype(c["dtype"]),
                                [Unit(str(n), _size(b, f"unit {n!r}"), _tier(t)) for n, b, t in c["units"]],
                                {str(k): _tier(t) for k, t in c["device_map"]}) for c in d["components"]]
    ref = d.get("reference")
    stream = d.get("stream") or {}
    if not isinstance(stream, dict) or any(c not in known or not isinstance(v, dict) for c, v in stream.items()):
        raise UserError(f"a job's stream names components a model does not have or is malformed; {_EDITED}.")
    return StagePlan(
        stage=d["stage"], precision=precision, budget=_budget_from(d["budget"]), components=components,
        fits=bool(d["fits"]), overflow=_size(d["overflow"], "overflow"), advice=d["advice"],
        reserve={_tier(t): _size(b, f"reserve on {_named(t)}") for t, b in d["reserve"]},
        activations={k: _size(v, f"activations {k!r}") for k, v in d["activations"].items()},
        workload=Workload(**d["workload"]) if d.get("workload") else None, warnings=list(d["warnings"]),
        reference=plan_from_dict(ref, _precision_from(ref["precision"], None), family) if ref else None,
        family=family or default_family(), stream={c: dict(v) for c, v in stream.items()},
    )


def _precision_from(d: dict, file) -> Precision:
    native = d.get("cpu_bf16")
    if native is not None and not isinstance(native, bool):
        raise UserError(f"a job's precision says cpu_bf16 {native!r}: true or false; {_EDITED}.")
    return Precision(d["weights"], d["compute"], d.get("why", ""), file=file, cpu_bf16=native)


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Job:
    """One stage's work as its planner decided it: run it with the loaders, or save it for a process
    that will (:meth:`save`, :func:`load_job`)."""

    stage: str
    model: ModelRef
    plan: StagePlan
    offload: str = "auto"
    #: why the offload is what it is (``auto`` settled when planning: :func:`plan_job`)
    offload_why: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGE_NAMES:
            raise UserError(f"a job's stage is one of {', '.join(STAGE_NAMES)}, not {self.stage!r}.")
        if self.plan.stage != self.stage:
            raise UserError(f"a job for {self.stage} holds a plan for {self.plan.stage}.")
        from helpers.offload.streamers import check_offload

        check_offload(self.offload)

    @property
    def budget(self) -> Budget:
        return self.plan.budget

    @property
    def precision(self) -> Precision:
        return self.plan.precision

    @property
    def workload(self) -> Workload | None:
        return self.plan.workload

    @property
    def transformer_file(self) -> Path | None:
        return self.precision.file.path if self.precision.file is not None else None

    def as_dict(self) -> dict:
        return {"job": JOB_VERSION, "stage": self.stage, "offload": self.offload, "offload_why": self.offload_why,
                "model": self.model.as_dict(),
                "budget": str(self.budget), "precision": _precision_dict(self.precision),
                "workload": self.workload.as_dict() if self.workload is not None else None,
                "plan": plan_as_dict(self.plan)}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the job to ``path`` (JSON, atomically: a reader never sees half of it); an existing
        file is replaced only with ``overwrite``."""
        path = Path(path)
        with atomic_path(path, overwrite=overwrite) as tmp:
            Path(tmp).write_text(self.to_json())
        return path

    def settled(self, folder) -> "Job":
        """The job with its offload settled on the weights in ``folder``: ``auto`` decided, and a stream's
        resident blocks and pool chosen and recorded in the plan (:func:`plan_job` could not where they
        were not here when it planned); a settled job as it is."""
        if self.offload == "accelerate" or self.plan.stream:
            return self
        from helpers.loading import settle_offload

        offload, why, stream = settle_offload(self.offload, self.plan, folder)
        why = self.offload_why if self.offload != "auto" else why
        return replace(self, offload=offload, offload_why=why, plan=replace(self.plan, stream=stream))

    def check_workload(self, workload: Workload) -> None:
        """Refuse to run a job planned for other activations (another size, batch or prompt length)."""
        if self.workload is not None and self.workload != workload:
            raise UserError(
                f"the job was planned for {self.workload.describe(self.stage)} ({self.workload.as_dict()}), and this "
                f"run computes {workload.describe(self.stage)} ({workload.as_dict()}): plan the stage again for it.")

    def on_gpu(self, gpu: int) -> "Job":
        """The job with its one GPU tier, GPU 0, moved to GPU ``gpu`` (a worker's own card on a host
        with several: the same plan, on another card of the same size). A plan naming several GPUs,
        or none, is kept as it is."""
        gpus = [t for t in self.budget.names if isinstance(t, int)]
        if gpus != [0] or gpu == 0:
            return self
        return replace(self, plan=_moved(self.plan, gpu))


@dataclass(frozen=True)
class Request:
    """What the edge parsed for one stage (the command line, a widget, a notebook's parameters cell):
    everything its plan depends on, nothing decided yet. :func:`plan_job` turns it into a :class:`Job`."""

    stage: str
    model: object = None  # a name, a folder or a resolved ModelRef
    max_memory: object = None  # None: the method's budget (one tier down without a GPU, translated for a twin)
    workload: Workload | None = None
    weights: str | None = None
    compute: str = "auto"
    offload: str = "auto"
    transformer_file: object = None
    like: str | None = "auto"
    #: whether the CPU that will compute has native bf16 (``None``: this machine's, measured once here)
    cpu_bf16: bool | None = None


def plan_job(request: Request) -> Job:
    """The one planner of a stage's work: the model resolved, the stage placed under the budget (a budget
    too small refused here), and ``auto`` offload settled where the weights are on this machine (the
    stream planned from the checkpoint's headers: :func:`helpers.loading.settle_offload`), all recorded
    in the job, which then says what runs. Nothing is loaded."""
    from helpers.planner import plan_stage
    from helpers.models import local_folder
    from helpers.offload.streamers import check_offload

    check_offload(request.offload)
    ref = resolve_model(request.model)
    plan = plan_stage(request.stage, ref, request.max_memory, request.like, workload=request.workload,
                      weights=request.weights, compute=request.compute, transformer_file=request.transformer_file,
                      cpu_native=request.cpu_bf16)
    job = Job(request.stage, ref, plan, request.offload, "asked for" if request.offload != "auto" else
              "auto: the weights are not on this machine yet; settled as they load (stream where it fits a budget "
              "without a GPU)")
    folder = local_folder(ref)
    return job.settled(folder) if folder is not None else job


def _moved(plan: StagePlan, gpu: int) -> StagePlan:
    def m(t):
        return gpu if t == 0 and isinstance(t, int) else t

    budget = Budget(tuple((m(t), b) for t, b in plan.budget.tiers), source=plan.budget.source,
                    shares=frozenset(m(t) for t in plan.budget.shares))
    components = [ComponentPlan(c.component, c.dtype, [Unit(u.name, u.nbytes, m(u.tier)) for u in c.units],
                                {k: m(t) for k, t in c.device_map.items()}) for c in plan.components]
    return replace(plan, budget=budget, components=components, reserve={m(t): b for t, b in plan.reserve.items()},
                   reference=None)


def job_from_dict(d: dict) -> Job:
    """The job :meth:`Job.as_dict` wrote, checked against what is here now: the model (its configs'
    fingerprint) and a transformer file (its header, against the model)."""
    if not isinstance(d, dict) or d.get("job") != JOB_VERSION:
        raise UserError(f"not a job this version reads (want \"job\": {JOB_VERSION}); plan the stage again.")
    try:
        saved = d["model"]
        model = resolve_model(saved["label"])
        if model.kind != saved["kind"] or model.fingerprint != saved["fingerprint"]:
            raise UserError(f"the model {saved['label']} is not the one the job was planned for (fingerprint "
                            f"{model.fingerprint}, planned {saved['fingerprint']}); plan the stage again.")
        p = d["precision"]
        file = None
        if p.get("transformer_file"):
            from helpers.formats.transformer_file import open_transformer_file

            file = open_transformer_file(p["transformer_file"], model.configs[model.family.file_component], model.family)
        plan = plan_from_dict(d["plan"], _precision_from(p, file), model.family)
        job = Job(d["stage"], model, plan, d.get("offload", "auto"), str(d.get("offload_why", "")))
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"a job file is incomplete or malformed ({type(err).__name__}: {err}); plan the stage "
                        "again.") from None
    return job


def _tiers_here() -> set:
    """The tiers this machine has: its GPUs' indices, MPS where it runs, CPU RAM and disk."""
    here = {"cpu", "disk", *range(torch.cuda.device_count())}
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        here.add("mps")
    return here


def check_tiers_here(job: Job) -> None:
    """Refuse a job that places weights on a tier this machine lacks (planned on a host with a GPU,
    read on one without), before any weight loads."""
    placed = {u.tier for c in job.plan.components for u in c.units} | {
        t for c in job.plan.components for t in c.device_map.values()}
    missing = sorted(placed - _tiers_here(), key=str)
    if missing:
        names = ", ".join(map(_named, missing))
        gpus = torch.cuda.device_count()
        raise UserError(
            f"the job places weights on {names}, which this machine does not have ("
            f"{f'{gpus} GPU(s)' if gpus else 'no GPU'}); it was planned for the budget {job.budget.describe()}: "
            "plan the stage again here (--save-job), or run the job on a machine with those tiers.")


def check_device_maps(job: Job) -> None:
    """Refuse a job whose device maps name modules its model does not have, or leave some of its
    weights unplaced (an edited or damaged job), before accelerate is handed one."""
    from helpers.architecture import skeleton
    from helpers.devicemap import misplaced

    configs = job.model.configs
    for comp in job.plan.components:
        if comp.component not in configs:
            raise UserError(f"a job places {comp.component}, which model {job.model.label} does not have; {_EDITED}.")
        unknown, unplaced = misplaced(skeleton(comp.component, configs[comp.component], family=job.model.family), comp.device_map)
        if unknown or unplaced:
            what = (f"names {', '.join(map(repr, unknown[:3]))}{' ...' if len(unknown) > 3 else ''}, which "
                    f"{comp.component} of {job.model.label} does not have" if unknown else
                    f"leaves {len(unplaced)} of its weights unplaced ({', '.join(unplaced[:2])} ...)")
            raise UserError(f"a job's device map for {comp.component} {what}; {_EDITED}.")


def load_job(path: str | os.PathLike, stage: str | None = None) -> Job:
    """Read a job file to run it here (see :meth:`Job.save`), checked as input from elsewhere: every
    field as the flags are checked, and its tiers against this machine's; ``stage``: the stage that is
    about to run it."""
    path = check_file(path, "a job file", "write one with --save-job (or let generate / --workers do it)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a job file ({type(err).__name__}); write one with --save-job.") from None
    job = job_from_dict(data)
    if stage is not None and job.stage != stage:
        raise UserError(f"{path} is a job for {job.stage.replace('_', ' ')}, not {stage.replace('_', ' ')}.")
    check_tiers_here(job)  # read to run here: its tiers must be this machine's
    check_device_maps(job)
    return job


def check_job_alone(job: Job, stage: str, model=None, *, max_memory=None, weights=None, compute: str = "auto",
                    offload: str = "auto", transformer_file=None, cpu_bf16: str = "auto") -> None:
    """Refuse knobs given beside a job (it fixes them: a run would otherwise not be the one planned)
    and a job for another stage or model."""
    if not isinstance(job, Job):
        raise UserError(f"job must be a helpers.job.Job (load one with load_job), not {type(job).__name__}.")
    if job.stage != stage:
        raise UserError(f"the job is for {job.stage.replace('_', ' ')}, not {stage.replace('_', ' ')}.")
    given = [flag for flag, value, default in (("--max-memory", max_memory, None), ("--weights", weights, None),
                                               ("--compute", compute, "auto"), ("--offload", offload, "auto"),
                                               ("--transformer", transformer_file, None),
                                               ("--cpu-bf16", cpu_bf16, "auto")) if value != default]
    if given:
        raise UserError(f"a job fixes the budget, the precision (and the CPU it was planned for), the transformer "
                        f"file and the offload; leave out "
                        f"{', '.join(given)}, or plan again without --job.")
    if model is not None and resolve_model(model).label != job.model.label:
        raise UserError(f"the job is for model {job.model.label}, not {resolve_model(model).label}.")
