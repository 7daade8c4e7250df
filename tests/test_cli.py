import os
import subprocess
import sys

import pytest

import commands


def run(*args, env_extra=None):
    """The command, in this process (tests/commands.py): what it says, writes and exits with."""
    return commands.run(*args, env=env_extra)


def run_process(*args, env_extra=None):
    """The command as a user types it: ``python -m helpers``, a process of its own."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True, text=True, env=env, timeout=300)


def assert_user_error(result, fragment):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one clear line
    assert "Traceback" not in result.stderr
    assert fragment in lines[0]


def test_help_lists_model():
    result = run("--help")
    assert result.returncode == 0 and "model" in result.stdout and "Exit status" in result.stdout
    assert run("model", "--help").returncode == 0


def test_no_subcommand_is_a_user_error():
    result = run()
    assert result.returncode == 2


def test_the_module_answers_as_a_process():
    """``python -m helpers`` itself: its exit status and its one line, from a process of its own."""
    assert run_process("--help").returncode == 0
    assert_user_error(run_process("model", "no-such-model"), "unknown model")


def test_model_tiny_builds_then_reuses(tmp_path):
    env = {"FLUX_OUTPUTS": str(tmp_path)}
    first = run("model", "tiny", env_extra=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(tmp_path / "models" / "tiny")
    assert "built in" in first.stderr
    second = run("model", "tiny", env_extra=env)
    assert second.returncode == 0 and second.stdout == first.stdout and "reusing" in second.stderr


def test_model_local_folder(tiny_folder):
    result = run("model", str(tiny_folder))
    assert result.returncode == 0 and result.stdout.strip() == str(tiny_folder.resolve())


@pytest.mark.parametrize("args, fragment", [
    (["model", "no-such-model"], "unknown model"),
    (["model", "tiny", "--components", "vae"], "only applies to hub models"),
    (["model", "flux-dev"], "--download"),
    (["model"], "MODEL"),
    (["bogus"], "invalid choice"),
    (["model", "tiny", "--nope"], "unrecognized arguments"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, args, fragment):
    # an empty hub cache, and offline: flux-dev cannot be found and must say how to get it
    assert_user_error(run(*args, env_extra={"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}), fragment)


def test_footprint_json_for_flux_dev_needs_no_download():
    import json

    result = run("footprint", "--model", "flux-dev", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["components"]["transformer"]["params"] == 11_901_408_320
    assert data["plan"]["text_encoding"]["fits"] and data["plan"]["diffusion"]["fits"]
    assert data["plan"]["text_encoding"]["dtype"] == "float32" and data["plan"]["diffusion"]["dtype"] == "bfloat16"


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_footprint_table_for_tiny_and_a_custom_budget():
    result = run("footprint", "--model", "tiny")
    assert result.returncode == 0 and "scaled to tiny as flux-dev would be split" in result.stdout
    assert "text_encoder_2.encoder.block.9" in result.stdout  # the same split as the real T5
    custom = run("footprint", "--model", "flux-schnell", "--max-memory", "0=24GiB,cpu=16GiB")
    assert custom.returncode == 0 and "DOES NOT FIT" not in custom.stdout
    tight = run("footprint", "--model", "flux-dev", "--max-memory", "0=4GiB,cpu=8GiB")
    assert tight.returncode == 0 and "DOES NOT FIT" in tight.stdout and "more CPU RAM" in tight.stdout


@pytest.mark.parametrize("args, fragment", [
    (["footprint", "--model", "flux-dev", "--max-memory", "gpu=8GiB"], "write 0 for the first GPU"),
    (["footprint", "--model", "nope"], "unknown model"),
    (["footprint", "--model", "flux-dev", "--like", "nope"], "unknown model"),
])
def test_footprint_user_errors(args, fragment):
    assert_user_error(run(*args), fragment)


def test_footprint_accepts_shares():
    result = run("footprint", "--model", "tiny", "--max-memory", "0=40%,cpu=100%")
    assert result.returncode == 0, result.stderr


def test_encode_prints_path_time_and_tiers(tmp_path):
    out = tmp_path / "e.safetensors"
    result = run("encode", "--model", "tiny", "--prompt", "a red cat", "--prompt", "a dog",
                 "--max-sequence-length", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out) and out.is_file()
    assert "wall time" in result.stderr and "peak RSS" in result.stderr and "disk" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["encode", "--prompt", "", "--out", "{tmp}/e.safetensors"], "the prompt is empty"),
    (["encode", "--prompt", "a", "--out", "{tmp}/no/e.safetensors"], "does not exist"),
    (["encode", "--prompt", "a", "--out", "{tmp}/e.safetensors", "--max-memory", "cpu=1KiB"], "too small"),
    (["encode", "--prompt", "a", "--out", "{tmp}/e.safetensors", "--max-memory", "0=8.5GiB;"], "accepted forms"),
    (["encode", "--prompt", "a", "--out", "{tmp}/e.safetensors", "--max-sequence-length", "9999"], "512"),
    (["encode", "--prompt", "a", "--out", "{tmp}/e.safetensors", "--model", "nope"], "unknown model"),
    (["encode", "--prompt", "a"], "--out"),
])
def test_encode_user_errors(tmp_path, args, fragment):
    assert_user_error(run(*[a.replace("{tmp}", str(tmp_path)) for a in args]), fragment)


def test_encode_keeps_an_existing_file(tmp_path):
    out = tmp_path / "e.safetensors"
    out.write_bytes(b"keep me")
    assert_user_error(run("encode", "--prompt", "a", "--out", str(out)), "already exists")
    assert out.read_bytes() == b"keep me"
    assert run("encode", "--prompt", "a", "--out", str(out), "--overwrite").returncode == 0


@pytest.mark.parametrize("args, fragment", [
    (["diffuse", "--embeddings", "{tmp}/none.safetensors", "--out", "{tmp}/x.png"], "no embeddings file"),
    (["generate", "--prompt", "a", "--out", "{tmp}/x.png", "--height", "100"], "nearest valid sizes are 96 and 112"),
    (["generate", "--prompt", "a", "--out", "{tmp}/x.png", "--steps", "0"], "1 or more"),
    (["generate", "--prompt", "", "--out", "{tmp}/x.png"], "the prompt is empty"),
    (["generate", "--prompt", "a", "--out", "{tmp}/missing/x.png"], "does not exist"),
    (["generate", "--model", "flux-schnell", "--prompt", "a", "--out", "{tmp}/x.png", "--max-sequence-length", "512"],
     "at most 256"),
    (["generate", "--model", "flux-schnell", "--prompt", "a", "--out", "{tmp}/x.png"], "not in your Hugging Face cache"),
])
def test_diffuse_and_generate_user_errors(tmp_path, args, fragment):
    assert_user_error(run(*[a.replace("{tmp}", str(tmp_path)) for a in args]), fragment)


def test_generate_refuses_to_replace_and_keeps_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"mine")
    assert_user_error(run("generate", "--prompt", "a", "--out", str(tmp_path / "x.png")), "already exists")
    assert (tmp_path / "x.png").read_bytes() == b"mine"


def test_generate_checks_the_whole_run_first(tmp_path):
    # a diffusion budget too small is refused before stage 1 runs: no embeddings file appears
    assert_user_error(run("generate", "--prompt", "a", "--out", str(tmp_path / "x.png"), "--max-memory", "cpu=2MiB",
                          "--max-sequence-length", "16", "--height", "64", "--width", "64"), "too small for diffusion")
    assert not (tmp_path / "x.safetensors").exists()
    assert_user_error(run("generate", "--prompt", "a", "--out", str(tmp_path / "x.png"), "--embeddings",
                          str(tmp_path / "x.png")), "apart from the images")


@pytest.mark.slow
def test_generate_passes_odd_prompts_and_names_the_command_that_finishes_a_run(tmp_path):
    done = run("generate", "--prompt=-a red cat", "--out", str(tmp_path / "y.png"), "--steps", "1",
               "--height", "32", "--width", "32")
    assert done.returncode == 0, done.stderr
    assert_user_error(run("generate", "--prompt=-a red cat", "--out", str(tmp_path / "y.png")), "already exists")
    (tmp_path / "y.png").unlink()  # as if stage 2 had failed: the embeddings are there, the image is not
    again = run("generate", "--prompt=-a red cat", "--out", str(tmp_path / "y.png"))
    assert_user_error(again, "python -m helpers diffuse --embeddings")


def test_folders_inside_outputs_are_made_on_demand_elsewhere_refused(tmp_path):
    """The README's commands write to outputs/embeddings/ and outputs/images/, which a fresh clone lacks."""
    outputs = tmp_path / "outputs"
    env = {"FLUX_OUTPUTS": str(outputs)}
    emb = outputs / "embeddings" / "cats.safetensors"
    done = run("encode", "--prompt", "a red cat", "--out", str(emb), env_extra=env)
    assert done.returncode == 0, done.stderr
    assert emb.is_file()
    assert_user_error(run("encode", "--prompt", "a", "--out", str(tmp_path / "typo" / "e.safetensors"), env_extra=env),
                      "does not exist")
    # bench --json: the same rule, and a result already there is kept unless --overwrite
    kept = outputs / "benchmarks" / "b.json"
    kept.parent.mkdir()
    kept.write_text("{}")
    assert_user_error(run("bench", "--model", "tiny", "--json", str(kept), env_extra=env), "already exists")
    assert kept.read_text() == "{}"
    assert_user_error(run("bench", "--model", "tiny", "--json", str(tmp_path / "typo" / "b.json"), env_extra=env),
                      "does not exist")


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_train_twin_prints_time_losses_and_its_file_and_keeps_an_existing_one(tmp_path):
    import json

    out = tmp_path / "tiny.safetensors"
    quick = ["--vae-steps", "2", "--flow-steps", "2", "--clip-steps", "2", "--scenes", "16"]  # the recipe in seconds
    done = run("train-twin", *quick, "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["file"] == str(out) and out.is_file() and summary["config"]["flow_steps"] == 2
    assert summary["config"]["clip_steps"] == 2 and summary["scenes"] == 16
    assert "final losses: VAE" in done.stderr and "minutes" in done.stderr
    before = out.read_bytes()
    assert_user_error(run("train-twin", *quick, "--out", str(out)), "already exists")
    assert out.read_bytes() == before
    assert_user_error(run("train-twin", "--scenes", "0", "--out", str(tmp_path / "none.safetensors")),
                      "--scenes must be a whole number, 1 or more")
    assert not (tmp_path / "none.safetensors").exists()


@pytest.mark.slow  # moved to the full suite: the quick one stays within 5 minutes on 2 cores
def test_train_twin_klein_with_the_vae_of_a_file_says_where_its_vae_came_from(tmp_path):
    """`--vae-from`: no VAE steps, so no VAE loss to print; the run says which file's VAE it took."""
    import json

    from helpers.twins.shipped import TRAINED_DIR

    out = tmp_path / "klein.safetensors"
    vae = TRAINED_DIR / "klein-tiny.safetensors"
    done = run("train-twin", "--twin", "klein-tiny", "--vae-from", str(vae), "--flow-steps", "2", "--clip-steps", "1",
               "--scenes", "8", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["vae_from"] == vae.name and summary["vae_loss"] is None and out.is_file()
    assert f"final losses: VAE from {vae}, flow" in done.stderr
    from safetensors import safe_open

    with safe_open(out, framework="pt") as f:  # the file names the earlier one, not where it lay
        stored = json.loads(f.metadata()["summary"])
    assert stored["config"]["vae_from"] == stored["vae_from"] == vae.name, stored["config"]
