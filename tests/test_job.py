"""A model resolved once, and a stage's work described once: the job's JSON round trip and its checks."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import commands
import helpers.models as models
from helpers.activations import Workload
from helpers.diffuse import diffuse_file, diffusion_plan
from helpers.encode import encode_prompts, text_encoding_plan
from helpers.errors import UserError
from helpers.planner import plan_stage
from helpers.job import Job, job_from_dict, load_job
from helpers.models import resolve_model

SMALL = Workload(64, 64, 2, 32)


def _again(job: Job) -> Job:
    return job_from_dict(json.loads(job.to_json()))


def test_a_model_is_resolved_once_and_handed_down(tiny_folder):
    ref = resolve_model(str(tiny_folder))
    assert resolve_model(ref) is ref
    assert ref.label == str(tiny_folder.resolve()) and ref.variant == "dev"
    first = ref.configs
    first["transformer"]["num_layers"] = -1  # a caller's copy: the object's configs are not changed
    assert ref.configs["transformer"]["num_layers"] != -1
    assert resolve_model(ref.label).fingerprint == ref.fingerprint


def test_stage_plans_round_trip_through_json(tiny_folder):
    ref = resolve_model("tiny")
    text = Job("text_encoding", ref, text_encoding_plan(ref, workload=Workload(batch=2, tokens=32)), "stream")
    diffusion = Job("diffusion", ref, diffusion_plan(ref, "cpu=50%,disk=100%", workload=SMALL))
    translated = Job("diffusion", ref, diffusion_plan(ref, workload=SMALL))  # the default budget, scaled like flux-dev
    assert translated.plan.reference is not None
    for job in (text, diffusion, translated):
        back = _again(job)
        assert back.plan == job.plan and back.offload == job.offload and back.model == job.model
        assert back.plan.budget.shares == job.plan.budget.shares
        assert back.as_dict() == job.as_dict()
    data = diffusion.as_dict()
    assert data["job"] == 1 and data["stage"] == "diffusion" and data["budget"] == str(diffusion.plan.budget)
    assert data["model"]["label"] == "tiny" and data["workload"] == SMALL.as_dict()
    # the CPU it computes on was measured once, when planning, and goes with the job (it is not probed again)
    assert set(data["precision"]) == {"weights", "compute", "why", "transformer_file", "cpu_bf16"}
    assert _again(diffusion).precision.cpu_bf16 == diffusion.precision.cpu_bf16 is not None
    told = Job("diffusion", ref, plan_stage("diffusion", ref, "cpu=50%,disk=100%", workload=SMALL, cpu_native=False))
    assert _again(told).precision.cpu_bf16 is False and "as told" in told.precision.why


def test_a_gpu_plan_round_trips_and_moves_to_a_workers_own_card():
    ref = resolve_model("flux-dev")
    one = Job("diffusion", ref, plan_stage("diffusion", ref, "0=11GiB,cpu=30GiB", runnable=False,
                                           workload=Workload(1024, 1024, 1, 512)))
    assert _again(one).plan == one.plan
    assert "cpu_bf16" not in one.as_dict()["precision"]  # a GPU computes: no CPU to say anything of
    moved = one.on_gpu(1)
    assert moved.budget.names == [1, "cpu"] and moved.plan.reserve.keys() == {1}
    assert {u.tier for c in moved.plan.components for u in c.units} <= {1, "cpu"}
    assert [u.nbytes for c in moved.plan.components for u in c.units] == \
        [u.nbytes for c in one.plan.components for u in c.units]
    assert _again(moved).plan == moved.plan
    two = Job("diffusion", ref, plan_stage("diffusion", ref, "0=11GiB,1=11GiB,cpu=30GiB", runnable=False,
                                           workload=Workload(1024, 1024, 1, 512)))
    assert two.on_gpu(1) is two  # a plan over two cards is every worker's as it is
    assert _again(two).plan == two.plan


def test_a_transformer_file_travels_by_path_and_is_checked_again(tiny_folder, tmp_path):
    from helpers.formats.transformer_file import write_transformer_file

    path = write_transformer_file(tiny_folder, "q8_0", tmp_path / "t.gguf", progress=False)
    ref = resolve_model(str(tiny_folder))
    job = Job("diffusion", ref, diffusion_plan(ref, "cpu=50%,disk=100%", workload=SMALL, transformer_file=path))
    back = _again(job)
    assert back.plan == job.plan and back.transformer_file == path.resolve()
    assert back.precision.file.index.keys() == job.precision.file.index.keys()
    path.write_bytes(b"GGUF but not one")  # the file changed after planning
    with pytest.raises(UserError):
        _again(job)


def test_a_job_is_refused_for_another_model_or_a_broken_file(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    ref = resolve_model(str(folder))
    job = Job("text_encoding", ref, plan_stage("text_encoding", ref, "cpu=50%,disk=100%", runnable=False,
                                               workload=Workload(batch=1, tokens=32)))
    with pytest.raises(UserError, match="unknown offload"):
        job_from_dict({**json.loads(job.to_json()), "offload": "sometimes"})
    config = folder / "text_encoder_2" / "config.json"
    changed = json.loads(config.read_text())
    changed["d_model"] += 8
    config.write_text(json.dumps(changed))
    with pytest.raises(UserError, match="not the one the job was planned for"):
        _again(job)
    bad = tmp_path / "bad.json"
    bad.write_text('{"job": 1, "stage": "diffusion"}')
    with pytest.raises(UserError, match="malformed"):
        load_job(bad)
    bad.write_text("{")
    with pytest.raises(UserError, match="not a job file"):
        load_job(bad)
    with pytest.raises(UserError, match="no job file"):
        load_job(tmp_path / "none.json")


def test_a_stage_resolves_its_model_and_reads_its_configs_once(tiny_folder, tmp_path, monkeypatch):
    label = str(tiny_folder.resolve())
    reads = []
    real = models._read_configs

    def counted(ref):
        if ref.label == label:
            reads.append(ref.name)
        return real(ref)

    monkeypatch.setattr(models, "_read_configs", counted)
    emb = tmp_path / "two.safetensors"
    encode_prompts(str(tiny_folder), ["a red circle", "a blue square"], emb, max_memory="cpu=50%,disk=100%",
                   max_sequence_length=32)
    assert len(reads) == 1
    reads.clear()
    result = diffuse_file(emb, tmp_path / "img.png", height=64, width=64, steps=2, max_memory="cpu=50%,disk=100%",
                          progress=False)
    assert len(result.paths) == 2 and len(reads) == 1


def test_a_bench_child_runs_the_parents_plan_without_planning(monkeypatch):
    import helpers.planner
    from helpers.bench import _plan

    ref = resolve_model("tiny")
    job = Job("diffusion", ref, diffusion_plan(ref, "cpu=50%,disk=100%", workload=Workload(64, 64, 1, 64)))
    config = {"model": "tiny", "max_memory": None, "stage": "diffusion", "height": 64, "width": 64, "tokens": 64,
              "job": json.loads(job.to_json())}

    def refuse(*args, **kwargs):
        raise AssertionError("a child planned again")

    monkeypatch.setattr(helpers.planner, "plan_stage", refuse)
    assert _plan(config) == job.plan
    with pytest.raises(AssertionError, match="planned again"):
        _plan({k: v for k, v in config.items() if k != "job"})


def _cli(*args):
    return commands.run(*args)  # in this process (tests/commands.py)


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_save_job_then_job_runs_that_plan_and_refuses_what_would_change_it(tiny_folder, tmp_path):
    emb = tmp_path / "e.safetensors"
    done = _cli("encode", f"--model={tiny_folder}", "--prompt=a green circle", "--max-sequence-length=32",
                f"--out={emb}", "--max-memory=cpu=50%,disk=100%")
    assert done.returncode == 0, done.stderr
    size = ["--height=64", "--width=64", "--steps=2"]
    plain = _cli("diffuse", f"--embeddings={emb}", f"--out={tmp_path / 'plain.png'}", *size,
                 "--max-memory=cpu=50%,disk=100%", "--offload=accelerate")
    assert plain.returncode == 0, plain.stderr
    job = tmp_path / "job.json"
    saved = _cli("diffuse", f"--embeddings={emb}", f"--out={tmp_path / 'job.png'}", *size,
                 "--max-memory=cpu=50%,disk=100%", "--offload=accelerate", f"--save-job={job}")
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.strip() == str(job) and not (tmp_path / "job.png").exists()
    data = json.loads(job.read_text())
    assert data["offload"] == "accelerate" and data["model"]["label"] == str(tiny_folder.resolve())
    again = _cli("diffuse", f"--embeddings={emb}", f"--save-job={job}", f"--out={tmp_path / 'job.png'}", *size)
    assert again.returncode == 2 and "already exists" in again.stderr  # a saved job is not replaced silently
    ran = _cli("diffuse", f"--embeddings={emb}", f"--out={tmp_path / 'job.png'}", *size, f"--job={job}")
    assert ran.returncode == 0, ran.stderr
    # the job's budget as planned (without --job and without --max-memory, the default would be planned)
    from helpers.budget import Budget

    planned = Budget(tuple((t, b) for t, b in data["plan"]["budget"]["tiers"]))
    assert "offload accelerate" in ran.stderr and f"budget {planned.describe()}" in ran.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "job.png")), np.asarray(Image.open(tmp_path / "plain.png")))
    for extra, said in ((["--height=128", "--width=128"], "planned for"), (["--max-memory=cpu=1GiB"], "leave out"),
                        (["--offload=stream"], "leave out"), (["--cpu-bf16=yes"], "leave out"),
                        ([f"--save-job={tmp_path / 'x.json'}"], "give one")):
        refused = _cli("diffuse", f"--embeddings={emb}", f"--out={tmp_path / 'no.png'}", *size, *extra,
                       f"--job={job}")
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
    for where, said in ((tmp_path / "none" / "job.json", "does not exist"), (tmp_path / "job.txt", "ending in .json")):
        refused = _cli("encode", "--prompt=x", f"--out={tmp_path / 'x.safetensors'}", f"--save-job={where}")
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
    wrong = _cli("encode", "--prompt=x", f"--out={tmp_path / 'x.safetensors'}", f"--job={job}")
    assert wrong.returncode == 2 and "a job for diffusion, not text encoding" in wrong.stderr


def test_plan_job_settles_auto_offload_and_says_why(tiny_folder):
    """``auto`` is decided when planning, from the checkpoint's headers, and recorded: the job says what runs."""
    from helpers.job import Request, plan_job

    small = Workload(64, 64, 1, 16)
    roomy = plan_job(Request("diffusion", str(tiny_folder), "cpu=50%,disk=100%", small))
    assert (roomy.offload, roomy.offload_why) == ("stream", "auto: no GPU tier, and the stream fits the fast tier")
    tight = plan_job(Request("diffusion", str(tiny_folder), "cpu=10%,disk=100%", small))
    assert tight.offload == "accelerate" and "the stream does not fit" in tight.offload_why
    with pytest.raises(UserError, match="give it at least"):  # a stream asked for that cannot fit: refused now
        plan_job(Request("diffusion", str(tiny_folder), "cpu=10%,disk=100%", small, offload="stream"))
    asked = plan_job(Request("diffusion", str(tiny_folder), "cpu=50%,disk=100%", small, offload="stream"))
    assert asked.offload_why == "asked for" and asked.plan.stream == roomy.plan.stream
    again = _again(tight)  # the decision travels with the job
    assert (again.offload, again.offload_why) == (tight.offload, tight.offload_why)
    from helpers.loading import settle_offload

    on_card = plan_stage("diffusion", str(tiny_folder), "0=1GiB,cpu=1GiB", runnable=False, workload=small)
    assert settle_offload("auto", on_card, tiny_folder)[0] == "accelerate"  # a GPU tier: accelerate's hooks


def test_a_jobs_stream_is_chosen_when_planning_and_loaded_as_recorded(tiny_folder):
    """The stream's resident blocks and pool are chosen by the planner and recorded in the job; the loader
    keeps them as they are (an edited choice loads as edited), and refuses one the budget cannot hold."""
    from dataclasses import replace

    from helpers.diffuse import load_diffusion
    from helpers.job import Request, plan_job
    from helpers.offload.plan import StreamBudgetError

    job = plan_job(Request("diffusion", str(tiny_folder), "cpu=50%,disk=100%", Workload(64, 64, 1, 16)))
    choice = job.plan.stream["transformer"]
    assert set(choice) == {"resident", "kept", "pool"} and choice["pool"] >= 2 and len(choice["resident"]) > 1
    assert _again(job).plan.stream == job.plan.stream  # it travels with the job
    fewer = {**choice, "resident": choice["resident"][:1]}
    edited = replace(job.plan, stream={"transformer": fewer})
    diffusion = load_diffusion(tiny_folder, edited, offload="stream", progress=False)
    try:
        streamed = set(diffusion.streamer.streamed_blocks)
        model = diffusion.pipe.transformer
        names = {f"{lst}.{i}" for lst in job.plan.family.block_lists("transformer")
                 for i in range(len(model.get_submodule(lst)))}
        assert streamed == names - set(fewer["resident"])  # every block but the one left resident streams
    finally:
        diffusion.close()
    greedy = replace(job.plan, stream={"transformer": {**choice, "resident": [*choice["resident"], *sorted(streamed)]}})
    with pytest.raises(StreamBudgetError, match="plan the stage again"):
        load_diffusion(tiny_folder, greedy, offload="stream", progress=False)


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_a_job_runs_through_the_runners_with_run_time_options_only(tiny_folder, tmp_path):
    """The edge plans (``plan_job``); ``run_text_encoding`` and ``run_diffusion`` take the job and what only the
    run knows (prompts, outputs, progress), refuse inputs the job was not planned for before loading, and
    make what the one-call functions make."""
    from helpers.diffuse import check_images, run_diffusion
    from helpers.encode import run_text_encoding
    from helpers.job import Request, plan_job

    budget, prompts = "cpu=50%,disk=100%", ["a red square", "a blue circle"]
    text = plan_job(Request("text_encoding", str(tiny_folder), budget, Workload(batch=2, tokens=32)))
    with pytest.raises(UserError, match="planned for"):  # three prompts: not the two it kept room for
        run_text_encoding(text, [*prompts, "a third"], tmp_path / "no.safetensors")
    emb = run_text_encoding(text, prompts, tmp_path / "e.safetensors").path
    one_call = encode_prompts(str(tiny_folder), prompts, tmp_path / "f.safetensors", max_memory=budget,
                              max_sequence_length=32)
    from safetensors.torch import load_file

    a, b = load_file(emb), load_file(one_call.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    images = check_images(emb, tmp_path / "i.png", seed=3, steps=2, height=64, width=64)
    assert images.workload == Workload(64, 64, 1, 32) and images.todo == [0, 1] and not images.paths[0].exists()
    with pytest.raises(UserError, match="run_diffusion runs a diffusion job"):
        run_diffusion(text, images)
    big = plan_job(Request("diffusion", images.model, budget, Workload(128, 128, 1, 32)))
    with pytest.raises(UserError, match="planned for"):
        run_diffusion(big, images)
    assert not images.paths[0].exists()  # refused before anything was made
    job = plan_job(Request("diffusion", images.model, budget, images.workload))
    made = run_diffusion(job, images, progress=False)
    assert made.paths == images.paths and made.offload == job.offload
    same = diffuse_file(emb, tmp_path / "j.png", seed=3, steps=2, height=64, width=64, max_memory=budget,
                        progress=False)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(made.images, same.images))


def test_planning_takes_the_cpu_it_is_told_and_probes_nothing(monkeypatch):
    """Native bf16 or not is measured once where the plan is made (or told), recorded in the plan's precision
    and never probed again on the way: what a bf16 convolution holds on a CPU depends on it."""
    from helpers import precision
    from helpers.planner import plan_stage

    def probed(*_args, **_kwargs):
        raise AssertionError("probed the CPU")

    precision.cpu_bf16.cache_clear()
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512_bf16"})  # a probe would run here
    monkeypatch.setattr(precision, "_matmul_seconds", probed)
    try:
        told = {n: plan_stage("diffusion", "tiny", "cpu=8.5GiB,disk=30GiB", workload=Workload(256, 256, 1, 16),
                              compute="bf16", cpu_native=n) for n in (True, False)}
        assert told[True].precision.cpu_bf16 is True and told[False].precision.cpu_bf16 is False
        # without native bf16 a 3x3 convolution unfolds its input once per kernel tap
        assert told[False].activations["vae"] > told[True].activations["vae"]
        auto = plan_stage("diffusion", "tiny", "cpu=8.5GiB,disk=30GiB", workload=Workload(64, 64, 1, 16),
                          cpu_native=False)
        assert auto.precision.compute == "fp32" and "as told" in auto.precision.why
        with pytest.raises(AssertionError, match="probed the CPU"):  # not told: this machine's, measured
            plan_stage("diffusion", "tiny", "cpu=8.5GiB,disk=30GiB", workload=Workload(64, 64, 1, 16))
    finally:
        precision.cpu_bf16.cache_clear()
