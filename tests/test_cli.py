import os
import subprocess
import sys

import pytest


def run(*args, env_extra=None):
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
