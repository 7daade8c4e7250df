"""Plan a stage under a memory budget: where each block goes, what room the activations keep, and
what to change when it does not fit.

A :class:`StagePlan` is made from a model's :class:`~helpers.footprint.Footprint` (bytes of weightless
skeletons) and a :class:`~helpers.budget.Budget`: the stage's whole components on the fastest tier,
its split ones block by block (:mod:`helpers.devicemap`), the fast tier's room for the activations of a
:class:`~helpers.activations.Workload` kept free, a budget written for the real model translated for a
twin (``like``), and advice where it does not fit (the extra bytes a tier needs, bf16 or fp8 weights,
the largest square image or the most prompts that do). :func:`plan_stages` plans footprints;
:func:`plan_stage` plans one stage of a model for a run (:func:`helpers.job.plan_job` makes the job).
Nothing is loaded. Explained in ``01_memory-footprint.ipynb``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from helpers.activations import WORKSPACE_GPU, Workload, affine_guess, largest_square, stage_activations
from helpers.budget import METHOD_BUDGET, Budget, Tier, parse_budget, round_up_size
from helpers.report import format_bytes
from helpers.devicemap import ComponentPlan, plan_component, remaining, tier_label
from helpers.errors import UserError
from helpers.families import STAGES, Family, default_family
from helpers.footprint import Footprint, Stage, footprint, no_split_blocks, stage_of
from helpers.precision import Precision, method_precision, short_name, stored_bytes


@dataclass
class StagePlan:
    """Where each component of a stage goes under a budget, and whether it fits.

    ``budget`` is every byte the stage may use per tier; ``reserve`` the part of the fast tier (the
    one it computes on) kept for the activations of ``workload``, so the weights are placed in
    :meth:`weights_budget`. ``activations``: what each component holds at its peak (batch included).
    """

    stage: str
    precision: Precision
    budget: Budget
    components: list[ComponentPlan]
    fits: bool = False
    overflow: int = 0
    advice: str = ""
    reserve: dict[Tier, int] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)
    workload: Workload | None = None
    #: things that work but are worth knowing before the run (printed by the commands, shown by the widgets)
    warnings: list[str] = field(default_factory=list)
    #: with a translated budget: the reference model's plan under the budget as written (see plan_stages)
    reference: "StagePlan | None" = field(default=None, repr=False)
    #: the model family whose components the plan places (what the loaders ask how to load them)
    family: Family = field(default_factory=default_family, repr=False, compare=False)
    #: offload ``stream``, settled when planning: each streamed component's resident blocks, kept parts and
    #: pool (:meth:`helpers.offload.plan.StreamPlan.choice`), which the loader keeps as they are
    stream: dict[str, dict] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (what each tier holds)."""
        return self.precision.storage_dtype

    @property
    def reserve_bytes(self) -> int:
        """Bytes of the fast tier kept for activations (0 when the plan was made without a workload)."""
        return sum(self.reserve.values())

    def weights_budget(self) -> Budget:
        """The budget the weights are placed in: :attr:`budget` less the activations' room."""
        return self.budget.shifted({t: -b for t, b in self.reserve.items()}, source=f"{self.budget} less activations")

    def tier_bytes(self) -> dict[Tier, int]:
        """Bytes of weights per tier, fastest tier first."""
        out: dict[Tier, int] = {}
        for plan in self.components:
            for tier, nbytes in plan.tier_bytes().items():
                out[tier] = out.get(tier, 0) + nbytes
        order = [*self.budget.names, "disk"]
        return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))

    def as_dict(self) -> dict:
        tiers: dict[str, dict] = {}
        for plan in self.components:
            for unit in plan.units:
                entry = tiers.setdefault(str(unit.tier), {"bytes": 0, "modules": []})
                entry["bytes"] += unit.nbytes
                entry["modules"].append(unit.name)
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            "precision": self.precision.as_dict(),
            "tiers": tiers,
            "fits": self.fits,
            "advice": self.advice,
            "max_memory_bytes": {str(t): b for t, b in self.budget.tiers},
            "activations": {"workload": self.workload.as_dict() if self.workload else None,
                            "bytes": self.activations, "reserve_bytes": {str(t): b for t, b in self.reserve.items()}},
            "warnings": self.warnings,
        }


def _place(fp: Footprint, stage: Stage, budget: Budget, prec: Precision, name: str,
           reserve: dict[Tier, int] | None = None) -> StagePlan:
    """Place the stage's components one after another, each in what the earlier ones left of
    ``budget`` less ``reserve`` (the activations' room)."""
    reserve = dict(reserve or {})
    left, plans = budget.shifted({t: -b for t, b in reserve.items()}), []
    order = [(c, True) for c in stage.whole] + [(c, False) for c in stage.mapped]
    for comp, whole in order:
        if prec.file is not None and comp == fp.family.file_component:  # a file's own forms (GGUF blocks...), header-only
            plan = plan_component(fp.stored_skeleton(comp, prec.weights, prec.file), left, None, component=comp,
                                  whole=whole)
        elif prec.weights == "fp8":  # not one dtype for all: placed in the skeleton's own stored dtypes
            plan = plan_component(fp.stored_skeleton(comp, "fp8"), left, None, component=comp, whole=whole)
        else:
            plan = plan_component(fp.skeletons[comp], left, prec.storage_dtype, component=comp, whole=whole)
        plans.append(plan)
        left = remaining(left, {t: b for t, b in plan.tier_bytes().items() if t != "disk"})
    # show components in pipeline order
    plans.sort(key=lambda p: fp.family.models.index(p.component))
    result = StagePlan(name, prec, budget, plans, reserve=reserve, family=fp.family)
    on_disk = result.tier_bytes().get("disk", 0)
    result.overflow = max(0, on_disk - (budget["disk"] if "disk" in budget else 0))
    result.fits = result.overflow == 0
    return result


def _budget_like(fp: Footprint, stage: Stage, like_plan: StagePlan, like_budget: Budget) -> Budget:
    """The budget that, for ``fp``, means what ``like_budget`` means for the model of ``like_plan``.

    Both models have the same blocks under the same names. Each tier gets the bytes, in ``fp``, of
    the units the reference put there, plus the reference's unused room on that tier, measured in
    the unit that did not fit there (the room is what decides whether one more unit fits): scaled
    by that unit's size ratio, or by the split components' where no unit was left over. On the
    tiers accelerate computes on (the first GPU, the CPU) the room also holds the largest block,
    which accelerate keeps free there for a block fetched from a slower tier: that part is the
    twin's own largest block. ``like_budget`` is the room the reference's weights had (its
    activations' room taken out).
    """
    from helpers.devicemap import model_units

    weights = like_plan.precision.weights
    own_units: dict[str, int] = {}
    for comp in stage.components:
        module = fp.skeletons[comp]
        for unit, n in model_units(module, list(getattr(module, "_no_split_modules", None) or []), weights):
            own_units[f"{comp}.{unit}" if unit else comp] = n
    blocks = {f"{c}.{u}" for c in stage.mapped for u, _ in no_split_blocks(fp.skeletons[c])}
    ref_largest = max((u.nbytes for p in like_plan.components for u in p.units if u.name in blocks), default=0)
    own_largest = max((own_units[u] for u in blocks), default=0)
    main = {like_budget.gpu if like_budget.gpu is not None else "cpu", "cpu"}
    ratio = (fp.nbytes(like_plan.dtype, list(stage.mapped)), like_plan_bytes(like_plan, stage.mapped))
    left_over: dict[Tier, tuple[int, int]] = {}  # tier -> (own, reference) bytes of the first unit that did not fit
    for plan in like_plan.components:
        if plan.component in stage.mapped:
            for before, after in zip(plan.units, plan.units[1:]):
                if after.tier != before.tier and before.tier not in left_over and own_units.get(after.name):
                    left_over[before.tier] = (own_units[after.name], after.nbytes)
    tiers = []
    for tier, nbytes in like_budget.tiers:
        ref_units = [u for p in like_plan.components for u in p.units if u.tier == tier]
        ref_bytes = sum(u.nbytes for u in ref_units)
        own_bytes = sum(own_units.get(u.name, 0) for u in ref_units)
        own_next, ref_next = left_over.get(tier, ratio)
        room = max(0, nbytes - ref_bytes)
        if tier in main and room >= ref_largest:
            room = (room - ref_largest) * own_next // ref_next + own_largest
        else:
            room = room * own_next // ref_next
        tiers.append((tier, max(1, own_bytes + room)))
    return Budget(tuple(tiers), source=f"{like_budget} as {fp.model} sees it")


def like_plan_bytes(plan: StagePlan, components) -> int:
    return sum(u.nbytes for p in plan.components if p.component in components for u in p.units)


def _extra_needed(fp: Footprint, stage: Stage, budget: Budget, prec: Precision, tier: Tier,
                  reserve: dict[Tier, int] | None = None) -> int | None:
    """The least extra room on ``tier`` (to 1/4096 of the stage's size) that makes it fit; by bisection.

    ``None`` when no amount on that tier helps.
    """
    step = max(1, fp.nbytes(prec.storage_dtype, list(stage.components)) // 4096)
    base = dict(budget.tiers)

    def fits(extra: int) -> bool:
        trial = dict(base)
        trial[tier] = trial.get(tier, 0) + extra
        return _place(fp, stage, parse_budget(trial), prec, "", reserve).fits

    hi = step
    while not fits(hi):
        hi *= 2
        if hi > 2**50:
            return None
    lo = 0
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _advice(fp: Footprint, stage: Stage, plan: StagePlan) -> str:
    tiers = plan.tier_bytes()
    order = [*plan.budget.names, "disk"]
    kept = "".join(f"; {format_bytes(b)} of {tier_label(t)} kept for activations" for t, b in plan.reserve.items())
    if plan.fits:
        used = sorted((t for t in tiers if tiers[t] > 0), key=lambda t: order.index(t) if t in order else len(order))
        if len(used) == 1:
            return f"fits whole on {tier_label(used[0])} ({format_bytes(tiers[used[0]])}{kept})."
        parts = ", ".join(f"{tier_label(t)} {format_bytes(tiers[t])}" for t in used)
        return (
            f"fits across tiers ({parts}{kept}): blocks off the fastest tier wait on a slower one and are moved "
            f"to {tier_label(used[0])} when their turn comes."
        )
    slow = "cpu" if "cpu" in plan.budget else next((t for t in plan.budget.names if t != "disk"), "cpu")
    extra = _extra_needed(fp, stage, plan.budget, plan.precision, slow, plan.reserve)
    have = plan.budget[slow] if slow in plan.budget else 0
    options = []
    if extra is not None:
        options.append(f"give {tier_label(slow)} {format_bytes(extra)} more ({slow}={round_up_size(have + extra)})")
    if "disk" not in plan.budget:
        options.append(f"add a disk tier (disk={round_up_size(plan.overflow * 1.1)}; slow)")
    if plan.dtype == torch.float32:
        half = fp.nbytes(torch.bfloat16, list(stage.components))
        options.append(f"store the weights in bf16 (--weights bf16; the stage then needs {format_bytes(half)})")
    if plan.precision.weights != "fp8" and _fp8_fits(fp, stage, plan):
        eight = fp.nbytes(torch.float8_e4m3fn, list(stage.mapped))
        options.append(f"store the {' and '.join(stage.mapped)} in fp8 (`python -m helpers convert --weights fp8 "
                       f"--components {' '.join(stage.mapped)}`, then --model FOLDER: {format_bytes(eight)}, and the "
                       "stage fits)")
    need = f"needs {format_bytes(extra)} more {tier_label(slow)}" if extra is not None else (
        f"more {tier_label(slow)} alone does not help")
    return f"does not fit: {need}; " + ", or ".join(options) + "."


def _fp8_fits(fp: Footprint, stage: Stage, plan: StagePlan) -> bool:
    """Whether the stage would fit the same budget with its split components stored in fp8."""
    prec = Precision("fp8", plan.precision.compute, "the advice's what-if")
    return _place(fp, stage, plan.budget, prec, "", plan.reserve).fits


def _activations_need(fp: Footprint, name: str, prec: Precision, workload: Workload, fast: Tier) -> int:
    """The room ``name`` keeps on ``fast`` for ``workload``: its largest component's activations
    (batch included, in the compute dtype; a CPU's convolution scratch counted), plus a GPU's workspace."""
    gpu = isinstance(fast, int)
    return max(stage_activations(name, fp.skeletons, prec.compute_dtype, workload, cpu=not gpu,
                                 family=fp.family, bf16_native=prec.cpu_bf16).values()) + (
        WORKSPACE_GPU if gpu else 0)


def _least_fast(fp: Footprint, stage: Stage, prec: Precision) -> int:
    """The weights the fast tier must hold for a stage to compute at all: its whole components, the
    split components' modules outside their blocks, and room for their largest block (accelerate
    keeps that free there for each block it fetches from a slower tier; a stream, its pool)."""
    dtype = prec.storage_dtype
    least = sum(fp.components[c].nbytes(dtype) for c in stage.whole)
    for comp in stage.mapped:
        blocks = [b for _, b in fp.block_bytes(comp, prec)]
        least += fp.components[comp].nbytes(dtype) - sum(blocks) + max(blocks, default=0)
    return least


def _activation_verdict(fp: Footprint, name: str, prec: Precision, budget: Budget, need: int) -> str | None:
    """Why ``need`` bytes of activations on the fast tier leave ``budget`` unable to run stage
    ``name`` (a sentence), or ``None``: they exceed the tier, or leave less than the weights must have
    there (see :func:`_least_fast`; a share sizes the weights' room itself, on top of the activations)."""
    fast = budget.fast
    if need > budget[fast]:
        return f"alone need {format_bytes(need)}, more than {tier_label(fast)} ({format_bytes(budget[fast])})"
    least = _least_fast(fp, fp.stage(name), prec)
    # the activations are why it does not run: without them the tier would hold what must compute there
    if fast not in budget.shares and budget[fast] - need < least <= budget[fast]:
        return (f"take {format_bytes(need)} of {tier_label(fast)} ({format_bytes(budget[fast])}), leaving "
                f"{format_bytes(budget[fast] - need)}, less than the {format_bytes(least)} of weights it must hold "
                "to compute (the components loaded whole, the split one's modules outside its blocks, and one "
                "block at a time)")
    return None


def _runs(fp: Footprint, name: str, prec: Precision, budget: Budget, workload: Workload) -> bool:
    """Whether stage ``name`` can run under ``budget`` at ``workload``: its activations leave the fast
    tier room for what must compute there, its weights fit with the slower tiers, and nothing is left
    on disk alone."""
    fast = budget.fast
    need = _activations_need(fp, name, prec, workload, fast)
    if fast in budget.shares:
        budget = budget.shifted({fast: need})
    if _activation_verdict(fp, name, prec, budget, need) is not None:
        return False
    plan = _place(fp, fp.stage(name), budget, prec, name, {fast: need})
    return plan.fits and not _stranded(plan, name, fp.family)


def _fewer(fp: Footprint, name: str, prec: Precision, workload: Workload, budget: Budget) -> str:
    """What does run under ``budget``: the largest square image (diffusion) or the most prompts at
    once (text encoding), for the message that refuses ``workload``."""
    fast = budget.fast
    if name == "text_encoding":
        lo, hi = 0, workload.batch  # lo runs (0: none known), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _runs(fp, name, prec, budget, replace(workload, batch=mid)) else (lo, mid)
        if not lo:
            return (f"not even one prompt of {workload.tokens} tokens fits; lower max_sequence_length, or give "
                    f"{tier_label(fast)} more room")
        return (f"at most {lo} prompt(s) of {workload.tokens} tokens fit at once: split the prompts over several "
                "files, or lower max_sequence_length")
    above = max(workload.height, workload.width)
    whole = sum(fp.components[c].nbytes(prec.storage_dtype) for c in fp.stage(name).whole)
    room = (budget[fast] if fast not in budget.shares else 2**62) - whole
    guess = affine_guess(lambda s: _activations_need(fp, name, prec, workload.square(s), fast), room, above)
    side = largest_square(lambda s: _runs(fp, name, prec, budget, workload.square(s)), above, guess)
    if side is None:
        least = _activations_need(fp, name, prec, workload.square(16), fast) + _least_fast(fp, fp.stage(name), prec)
        return f"not even a 16x16 image fits; give {tier_label(fast)} at least {round_up_size(least)}"
    fewer = ", or fewer prompts per file" if workload.batch > 1 else ""
    return f"the largest square image that fits is {side}x{side}{fewer}"


def _count(fp: Footprint, name: str, prec: Precision, workload: Workload | None,
           fast: Tier | None) -> tuple[dict[str, int], int, list[str]]:
    """``(activations per component, room kept on fast, warnings)`` for ``workload``; nothing
    without one, and a warning where the meta device cannot run the forward (weights alone then)."""
    if workload is None or fast is None:
        return {}, 0, []
    try:
        return (stage_activations(name, fp.skeletons, prec.compute_dtype, workload, cpu=not isinstance(fast, int),
                                  family=fp.family, bf16_native=prec.cpu_bf16),
                _activations_need(fp, name, prec, workload, fast), [])
    except Exception as err:  # noqa: BLE001 - a forward the meta device cannot run: plan weights alone
        return {}, 0, [f"the activations of {fp.model} could not be counted on the meta device "
                       f"({type(err).__name__}: {err}); {tier_label(fast)} is planned for weights alone."]


def _plan(fp: Footprint, name: str, prec: Precision, budget: Budget, workload: Workload | None) -> StagePlan:
    """Place stage ``name`` under ``budget``, keeping the fast tier's room for ``workload``'s activations.

    A size whose activations alone exceed the fast tier does not fit (the advice names the largest
    square image that does); one that leaves the weights less than a tenth of it is warned. A tier
    given as a share sizes the weights' split: the activations' room is added on top of it.
    """
    stage, fast = fp.stage(name), budget.fast
    counted, need, warnings = _count(fp, name, prec, workload, fast)
    if need and fast in budget.shares:
        budget = budget.shifted({fast: need})
    plan = _place(fp, stage, budget, prec, name, {fast: need} if need else None)
    plan.activations, plan.workload, plan.warnings = counted, workload, warnings
    what = workload.describe(name) if workload is not None else ""
    top = max(counted, key=counted.get) if counted else None
    verdict = _activation_verdict(fp, name, prec, budget, need) if need else None
    if verdict is not None:
        plan.fits = False
        plan.advice = (f"the activations of {what} ({fp.family.component(top).activation}) {verdict}; "
                       f"{_fewer(fp, name, prec, workload, budget)}.")
        return plan
    if need and fast not in budget.shares and budget[fast] - need < budget[fast] / 10:
        slower = sum(b for t, b in plan.tier_bytes().items() if t != fast)
        then = (f"{format_bytes(slower)} of them are fetched from a slower tier every step; a smaller "
                f"{'batch' if name == 'text_encoding' else 'image'} or a larger {tier_label(fast)} tier runs faster."
                if slower else "they fit, with little to spare.")
        plan.warnings.append(
            f"the activations of {what} ({fp.family.component(top).activation}) take {format_bytes(need)} of the {format_bytes(budget[fast])} "
            f"{tier_label(fast)} tier, leaving {format_bytes(budget[fast] - need)} for weights: {then}")
    plan.advice = _advice(fp, stage, plan)
    return plan


def plan_stages(
    fp: Footprint,
    max_memory=METHOD_BUDGET,
    dtypes: dict[str, torch.dtype | str] | None = None,
    like: Footprint | None = None,
    stages=STAGES,
    workload: Workload | None = None,
    precisions: dict[str, Precision] | None = None,
) -> dict[str, StagePlan]:
    """Place the method's ``stages`` (all by default) under ``max_memory``.

    Each stage in the method's precision unless ``precisions`` gives one (weights and compute dtype,
    see :mod:`helpers.precision`), or ``dtypes`` one dtype for both (``{"diffusion": "float32"}``).

    Shares in the budget (``"0=40%"``) are of the stage's size. With ``like`` (say the real
    FLUX.1-dev), the budget is read against that model and translated into this model's bytes
    (see :func:`_budget_like`), so that a twin splits its blocks the way the real model does.
    With a ``workload`` (image size, prompts, tokens) each plan keeps room on the fast tier for the
    activations (see :func:`_plan`); a translated budget keeps the reference's room when it places
    the reference, and gives this model room for its own activations on top, so the verdict and the
    largest size are the reference's and the split is the same. Without one, weights alone.
    """
    if like is not None and like.family.name != fp.family.name:
        raise UserError(f"{fp.model} cannot be planned like {like.model}: they are of different families "
                        f"({fp.family.title}, {like.family.title}), so their blocks do not correspond. Give a twin of "
                        f"{like.family.title} ({', '.join(like.family.twins)}).")
    plans = {}
    for name in stages:
        stage = fp.stage(name)
        dt = _stage_precision(fp, name, dtypes, precisions)
        if like is None:
            plans[name] = _plan(fp, name, dt, parse_budget(max_memory, model_bytes=_stage_bytes(fp, stage, dt)), workload)
            continue
        like_budget = parse_budget(max_memory, model_bytes=like.nbytes(dt.storage_dtype, list(stage.components)))
        ref = _plan(like, name, dt, like_budget, workload)
        budget = _budget_like(fp, stage, ref, ref.weights_budget())
        fast = budget.fast
        own, need, warnings = _count(fp, name, dt, workload, fast)
        plan = _place(fp, stage, budget.shifted({fast: need}) if need else budget, dt, name,
                      {fast: need} if need else None)
        plan.activations, plan.workload = own, workload
        plan.warnings = [f"as {like.model} under {like_budget}: {w}" for w in ref.warnings] + warnings
        plan.fits = plan.fits and ref.fits
        plan.reference = ref
        # advice in the reference's bytes: the budget the user wrote is the reference's
        plan.advice = f"as {like.model} under {like_budget}: {ref.advice}"
        plans[name] = plan
    return plans


def _stage_bytes(fp: Footprint, stage: Stage, prec: Precision) -> int:
    """The stage's weights in ``prec`` (what a share of the budget is of); a transformer file's as it stores them."""
    comps, main = list(stage.components), fp.family.file_component
    if prec.file is not None and main in comps:
        rest = [c for c in comps if c != main]
        return stored_bytes(fp.stored_skeleton(main, prec.weights, prec.file)) + (
            fp.nbytes(prec.storage_dtype, rest) if rest else 0)
    return fp.nbytes(prec.storage_dtype, comps)


def _stage_precision(fp: Footprint, name: str, dtypes, precisions) -> Precision:
    if precisions and name in precisions:
        return precisions[name]
    if dtypes and name in dtypes:
        short = short_name(dtypes[name])
        math = short if short in ("bf16", "fp16", "fp32") else "bf16"  # fp8 weights compute in bf16
        return Precision(short, math, "one dtype for weights and math" if math == short else "fp8 planned, bf16 math")
    return method_precision(name, fp.family)


def check_tiers_exist(budget: Budget) -> None:
    """Refuse, before loading, a budget whose GPU tier this machine does not have, or an ``mps`` tier.

    Planning for such a tier is fine anywhere (notebook 01); running a stage on it is not. The
    stages load onto CUDA GPUs and the CPU; an Apple GPU (``mps``) is refused here rather than
    planned and then computed on the CPU.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for tier in budget.names:
        if isinstance(tier, int) and tier >= gpus:
            have = f"GPUs 0 to {gpus - 1}" if gpus else "no GPU"
            raise UserError(
                f"the budget ({budget.describe()}) puts weights on GPU {tier}, and this machine has {have}; "
                'without a GPU run one tier down, e.g. "cpu=8.5GiB,disk=30GiB" (or leave the budget out).'
            )
        if tier == "mps":
            raise UserError(
                f"the budget ({budget.describe()}) names the mps tier (an Apple GPU), which the stages do not load "
                'onto: they compute on CUDA GPUs or the CPU. Run one tier down, e.g. "cpu=8.5GiB,disk=30GiB" '
                "(or leave the budget out)."
            )


def _machine_bytes(tier: Tier) -> int | None:
    """The memory this machine has for a tier: a GPU's total, or the RAM; ``None`` for disk."""
    if isinstance(tier, int):
        return int(torch.cuda.get_device_properties(tier).total_memory)
    if tier == "cpu":
        import psutil

        return int(psutil.virtual_memory().total)
    return None


def plan_stage(stage: str, model=None, max_memory=None, like: str | None = "auto",
               runnable: bool = True, workload: Workload | None = None, weights: str | None = None,
               compute: str = "auto", transformer_file=None, cpu_native: bool | None = None) -> StagePlan:
    """Plan one stage of ``model`` under a budget, refusing one that is too small; builds only skeletons.

    ``max_memory=None`` is the method's budget (one tier down without a GPU). ``like="auto"``
    translates that default budget for a twin, so it splits where the real model does; a budget
    you give is used as given (shares are of the stage). ``workload``: what the run computes on
    (default: one 1024x1024 image, one prompt of 512 tokens), whose activations keep room on the
    fast tier (see :func:`plan_stages`). ``runnable`` (the default) also refuses tiers this machine
    lacks, and activations more than this machine's memory for the tier, since the plan is about
    to be loaded. ``weights`` and ``compute``: the precision (:func:`helpers.precision.resolve`;
    ``auto`` is chosen for the budget's fast tier, the one the stage computes on), planned in stored
    bytes and carried by the plan to the loaders. ``transformer_file`` (diffusion): the transformer's
    weights from one file (GGUF, single safetensors, BFL layout), checked against the model from its
    header and planned in the bytes it stores (:mod:`helpers.formats.transformer_file`). ``cpu_native``:
    whether the CPU that computes has native bf16 (``None``: this machine's, probed once), recorded in the
    plan's precision (``auto``'s choice and a CPU convolution's scratch depend on it).
    """
    from helpers.budget import default_budget
    from helpers.precision import check_compute, check_weights, resolve
    from helpers.models import resolve_model

    ref = resolve_model(model)
    workload = workload or Workload()
    family = ref.family
    if like == "auto":
        like = family.reference_model if ref.kind == "twin" and max_memory is None else None
    if max_memory is None:
        max_memory = default_budget()
    checked = parse_budget(max_memory, model_bytes=2**40)  # malformed budgets fail here, before any work
    check_weights(weights or "bf16")
    check_compute(compute)
    weights = _stored_weights(ref, stage, weights, runnable)
    if runnable:
        check_tiers_exist(checked)
    precision = resolve(stage, weights, compute, checked.fast, family, cpu_native)
    comps = stage_of(family, stage).components
    fp = footprint(ref, components=comps, computed=True)  # what the stage runs
    if transformer_file is not None:
        if family.file_component not in comps:
            raise UserError(f"--transformer is a file of the diffusion stage's {family.file_component}, not of {stage}.")
        from helpers.formats.transformer_file import open_transformer_file

        file = transformer_file if hasattr(transformer_file, "forms") else open_transformer_file(
            transformer_file, fp.skeletons[family.file_component].config, family)
        precision = precision.with_file(file)
        like = None  # a file's bytes are its own: the budget is used as given
    like_fp = footprint(like, components=comps, computed=True) if like else None
    plan = plan_stages(fp, max_memory, like=like_fp, stages=(stage,), workload=workload,
                       precisions={stage: precision})[stage]
    what = stage.replace("_", " ")
    # judged in the terms the budget was written in: for a translated one, the reference's
    judged, judged_fp = (plan.reference, like_fp) if plan.reference is not None else (plan, fp)
    if not plan.fits:
        raise UserError(f"the budget ({judged.budget.describe()}) is too small for {what}: {plan.advice}")
    if not runnable:
        return plan
    _check_runnable(plan, fp, judged, judged_fp, stage, workload, precision, family)
    return plan


def _check_runnable(plan: StagePlan, fp: Footprint, judged: StagePlan, judged_fp: Footprint, stage: str,
                    workload: Workload, precision: Precision, family: Family) -> None:
    """Refuse, before loading, a plan this machine cannot run: activations past its memory for the fast
    tier, or a component left on disk with nothing to compute on (with the smallest cpu tier that gives
    it a place). ``judged``: the plan in the terms the budget was written in (a translated one: the
    reference's)."""
    what = stage.replace("_", " ")
    fast = plan.budget.fast
    have = _machine_bytes(fast) if plan.reserve else None
    if have is not None and plan.reserve_bytes > have:
        top = max(plan.activations, key=plan.activations.get)
        machine = Budget(tuple((t, have if t == fast else b) for t, b in plan.budget.tiers))
        raise UserError(
            f"{what} of {workload.describe(stage)} needs {format_bytes(plan.reserve_bytes)} for its activations "
            f"alone ({fp.family.component(top).activation}), more than this machine's {tier_label(fast)} ({format_bytes(have)}); "
            f"{_fewer(fp, stage, plan.precision, workload, machine).replace('that fits', 'that fits this machine')}."
        )
    if judged is not plan and not _stranded(judged, stage, family) and _stranded(plan, stage, family):  # rounding at the edge
        raise UserError(
            f"the budget ({judged.budget.describe()}) leaves {_stranded(plan, stage, family)[0]} of {fp.model} on disk with no "
            f"RAM or GPU to compute on, where {judged_fp.model} would just fit; give the cpu tier a little more.")
    stranded = _stranded(judged, stage, family)
    if stranded:
        # the smallest cpu tier that gives it a place (others fill the tier first): grow until one does
        given = dict(judged.budget.tiers)
        step = max(stranded[1], 1)
        for k in range(1, 64):
            trial = {**given, "cpu": given.get("cpu", 0) + k * step}
            again = plan_stages(judged_fp, trial, like=None, stages=(stage,), workload=workload,
                                precisions={stage: precision})[stage]
            if again.fits and not _stranded(again, stage, family):
                break
        raise UserError(
            f"the budget ({judged.budget.describe()}) leaves {stranded[0]} on disk with no RAM or GPU to "
            f"compute on; give the cpu tier at least {format_bytes(trial['cpu'])}."
        )


def _stored_weights(ref, stage: str, weights: str | None, runnable: bool) -> str | None:
    """The weights format to plan: as asked, or as the model's folder stores it (an fp8 copy made by
    ``convert``). fp8 is read as stored, so a run refuses fp8 of a folder that holds bf16, and the
    other way round, before anything loads (a plan alone may count any format)."""
    from helpers.precision import folder_format

    main = ref.family.main(stage)  # the component whose folder says how the stage's weights are stored
    stored = folder_format(ref.path / main) if ref.kind == "local" else None
    if weights is None:
        return stored
    if runnable and weights == "fp8" and stored != "fp8":
        raise UserError(
            f"{ref.name} stores its {main} in {stored or 'bf16'}; fp8 weights are read from an fp8 copy: "
            f"`python -m helpers convert --model {ref.name} --weights fp8 --out FOLDER`, then --model FOLDER.")
    if runnable and stored == "fp8" and weights != "fp8":
        raise UserError(f"{ref.name} stores its {main} in fp8 and is read as stored: leave --weights out "
                        f"(or give fp8), or use the model it was converted from for {weights}.")
    return weights


def _stranded(plan, stage: str, family: Family) -> tuple[str, int] | None:
    """A component the plan leaves on disk with nothing to compute on, and the bytes it needs in RAM."""
    for comp in plan.components:
        whole = comp.component in family.whole(stage)
        if all(u.tier == "disk" for u in comp.units) or (whole and any(u.tier == "disk" for u in comp.units)):
            return comp.component, (sum(u.nbytes for u in comp.units) if whole else max(u.nbytes for u in comp.units))
    return None


def report(fp: Footprint, plans: dict[str, StagePlan]) -> dict:
    """The JSON of ``python -m helpers footprint --json``."""
    workload = next((p.workload for p in plans.values() if p.workload is not None), None)
    return {
        "model": fp.model,
        "components": fp.as_dict(),
        "activations": {"workload": workload.as_dict() if workload else None,
                        "bytes": {c: n for p in plans.values() for c, n in p.activations.items()}},
        "plan": {name: plan.as_dict() for name, plan in plans.items()},
    }
