"""The workshop, as a person does it: JupyterLab in a real browser, Run All, type, click, look.

Starts ``jupyter lab`` on localhost (a free port, a random token, no browser of its own, settings
and outputs in a temporary folder), drives Debian's Chromium with Playwright, and checks that the
widgets render with every label whole, work, show progress and show mistakes as readable messages,
and that the pictures drawn are the prompts' shapes; then Run All of notebook 04. Screenshots go to
``outputs/screenshots/``; the README's are copies of some of them, in ``docs/screenshots/``. Run with
``make test-browser`` (needs the ``chromium`` package).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "outputs" / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage",
]
RUN_TIMEOUT_S = 600
#: prompts the tiny twin draws (its shapes world; see docs/gallery/), so the screenshots show them
PROMPTS = ["a yellow circle on a green background, in the middle",
           "a black square on a white background, on the left"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(folder: Path) -> None:
    """Lab settings for a test: no autosave (the stored notebooks stay untouched), every cell in the
    page (no windowing), no news or update checks."""
    for plugin, values in {
        "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
        "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    }.items():
        path = folder / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on the project's notebooks; shut down whatever happens."""
    work = tmp_path_factory.mktemp("lab")
    _settings(work / "settings")
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, FLUX_OUTPUTS=str(work / "outputs"), FLUX_MODEL="tiny",
               JUPYTERLAB_SETTINGS_DIR=str(work / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(work / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(work / "runtime"))
    argv = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT / 'notebooks'}",
            "--MultiKernelManager.default_kernel_name=flux-decoupled", "--ServerApp.open_browser=False",
            # checkpoints in the temporary folder, not beside the stored notebooks
            f"--FileCheckpoints.checkpoint_dir={work / 'checkpoints'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-root")
    log = open(work / "server.log", "w")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"jupyter lab did not start: {(work / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "outputs": work / "outputs"}
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def page(lab):
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


# --------------------------------------------------------------------------- what a person does


def notebook(page):
    """The notebook on screen (other notebooks stay open in hidden tabs)."""
    return page.locator(".jp-NotebookPanel:visible").last


def kernel_state(lab, name: str) -> str | None:
    """The server's view of the kernel of notebook ``name``: "idle", "busy", "starting"... or None."""
    url = f"{lab['url']}/api/sessions?token={lab['token']}"
    for session in json.loads(urllib.request.urlopen(url, timeout=5).read()):
        if session.get("path", "").endswith(name) and session.get("kernel"):
            return session["kernel"].get("execution_state")
    return None


def open_notebook(page, lab, name: str) -> None:
    page.goto(f"{lab['url']}/lab/tree/{name}?token={lab['token']}")
    page.wait_for_function("() => document.title.includes('%s')" % name.split(".")[0][:10], timeout=120_000)
    # the cells of this notebook: those opened before stay in the page, in hidden tabs
    notebook(page).locator(".jp-CodeCell").first.wait_for(timeout=120_000)
    # the kernel must be up before Run All. The status bar's "Idle" can still be another notebook's
    # (a Run All sent then stays queued, "[*]", with an idle kernel): wait for this notebook's own
    # kernel, as the server sees it and as its toolbar shows it
    deadline = time.time() + 120
    while kernel_state(lab, name) != "idle":
        if time.time() > deadline:
            raise AssertionError(f"the kernel of {name} did not become idle in 120 s: {kernel_state(lab, name)}")
        time.sleep(0.5)
    notebook(page).locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=120_000)


def run_all(page, lab, name: str) -> list[str]:
    """Run > Run All Cells, then wait until no cell is running; return the input prompts."""

    def click_run_all():
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click()

    click_run_all()
    prompts = notebook(page).locator(".jp-CodeCell .jp-InputPrompt")
    start = time.time()
    deadline = start + RUN_TIMEOUT_S
    started = retried = False
    stable = 0
    while time.time() < deadline:
        texts = [t.strip() for t in prompts.all_inner_texts()]
        running = any("*" in t for t in texts)
        done_any = any(re.match(r"\[\d+\]", t) for t in texts)
        started = started or running or done_any
        stable = stable + 1 if started and not running else 0
        if stable >= 3:
            return texts
        if not done_any and not retried and time.time() - start > 60 and kernel_state(lab, name) == "idle":
            # queued for a minute, nothing ran, the kernel idle: the requests never reached it
            print(f"{name}: Run All queued the cells but the kernel ran none; running them again")
            retried = True
            click_run_all()
        time.sleep(0.5)
    cells = notebook(page).locator(".jp-CodeCell")
    stuck = []
    for i, t in enumerate(prompts.all_inner_texts()):
        if "*" in t:  # which cell hung, and what it had printed: enough to start looking
            cell = cells.nth(i)
            source = cell.locator(".jp-InputArea-editor").inner_text()[:300]
            output = cell.locator(".jp-OutputArea").inner_text()[-600:]
            stuck.append(f"cell {i}:\n{source}\n--- its output so far:\n{output}")
    raise AssertionError(f"cells still running after {RUN_TIMEOUT_S} s (kernel {kernel_state(lab, name)})\n"
                         + "\n\n".join(stuck[:2]))


def assert_no_errors(page, prompts: list[str]) -> None:
    """Every code cell ran (Run All stops at an error) and no output holds a traceback."""
    not_run = [i for i, t in enumerate(prompts) if not re.match(r"\[\d+\]", t)]
    stderr = notebook(page).locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    errors = [t for t in stderr.all_inner_texts()
              if "Traceback" in t or re.search(r"^\w*(Error|Exception)\b", t, re.M)]
    assert not errors, f"error output in the page: {errors[0][:1500]}"
    assert not not_run, f"cells {not_run} did not run"


def assert_widgets_render(page) -> None:
    outputs = " ".join(notebook(page).locator(".jp-OutputArea-output").all_inner_texts())
    assert "Panel(children=" not in outputs, "a widget shows as its text repr: the front end did not render it"
    assert notebook(page).locator(".jp-OutputArea-output .jupyter-widgets").count() > 0


def watch_button(page, panel, label: str) -> None:
    """Record whether the panel's button ``label`` is ever disabled (busy) after this call."""
    panel.locator(f"button:has-text('{label}')").evaluate(
        """b => { window.__sawDisabled = false;
                 new MutationObserver(() => { if (b.disabled) window.__sawDisabled = true; })
                   .observe(b, {attributes: true}); }""")


def field(panel, label: str):
    return panel.locator(f".widget-inline-hbox:has(> label.widget-label:text-is('{label}'))").locator(
        "input, textarea, select").first


def assert_labels_whole(panel) -> None:
    """No label of the panel is cut short (an ellipsis where its text does not fit)."""
    cut = panel.locator(".widget-label, .widget-label-basic").evaluate_all(
        "labels => labels.filter(l => l.offsetWidth > 0 && l.scrollWidth > l.clientWidth).map(l => l.textContent)")
    assert not cut, f"labels cut short: {cut}"


def assert_no_empty_choice(panel) -> None:
    """Every dropdown shows a value: none starts blank."""
    blank = panel.locator("select").evaluate_all(
        "boxes => boxes.filter(b => b.selectedIndex < 0 || !b.options[b.selectedIndex].text.trim()).length")
    assert blank == 0, f"{blank} dropdown(s) show no value"


def assert_clean_error(panel) -> None:
    """A user's mistake reads as one message and a 'failed' status, not a traceback."""
    text = panel.inner_text()
    assert "Traceback" not in text and "failed" in text, text[-1500:]


def shot(locator, name: str) -> Path:
    locator.scroll_into_view_if_needed()
    path = SHOTS / name
    locator.screenshot(path=str(path))
    return path


def assert_draws_the_prompts(folder: Path, stem: str) -> None:
    """The images ``stem-1.png``, ``stem-2.png``... show the shapes :data:`PROMPTS` ask for, as the
    shapes world's detector reads them back."""
    from PIL import Image

    from helpers.twins import world

    for i, prompt in enumerate(PROMPTS, start=1):
        with Image.open(folder / f"{stem}-{i}.png") as image:
            seen = world.detect(image.convert("RGB"))
        wrong = [part for part, right in seen.matches(world.parse(prompt)).items() if not right]
        assert not wrong, f"{stem}-{i}.png: asked for {prompt!r}, the detector reads {seen.caption!r}"


# --------------------------------------------------------------------------- the workshop


def _stored_notebooks() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}


def test_encode_then_generate_in_the_browser(page, lab):
    started = time.time()
    stored = _stored_notebooks()

    # notebook 02: run everything, then encode a new prompt from the widget
    open_notebook(page, lab, "02_text-encoding-offload.ipynb")
    assert_no_errors(page, run_all(page, lab, "02_text-encoding-offload.ipynb"))
    assert_widgets_render(page)
    page.screenshot(path=str(SHOTS / "02-notebook.png"))
    encode = notebook(page).locator(".widget-vbox:has(button:has-text('Encode'))").last
    assert_labels_whole(encode)
    assert_no_empty_choice(encode)
    field(encode, "Prompts").fill("\n".join(PROMPTS))
    field(encode, "File name").fill("browser-test")
    watch_button(page, encode, "Encode")
    encode.locator("button:has-text('Encode')").click()
    encode.get_by_text(re.compile(r"saved .*browser-test\.safetensors")).wait_for(timeout=180_000)
    assert page.evaluate("window.__sawDisabled"), "the button was not disabled while encoding"
    assert (lab["outputs"] / "embeddings" / "browser-test.safetensors").is_file()
    shot(encode, "02-encode-widget.png")

    field(encode, "Prompts").fill("")  # a mistake: an empty prompt box
    encode.locator("button:has-text('Encode')").click()
    encode.get_by_text("error: the prompt is empty").wait_for(timeout=60_000)
    assert_clean_error(encode)
    shot(encode, "02-encode-empty-prompt.png")

    # notebook 03: run everything, pick the new file, change the seed, generate
    open_notebook(page, lab, "03_bf16-diffusion.ipynb")
    assert_no_errors(page, run_all(page, lab, "03_bf16-diffusion.ipynb"))
    assert_widgets_render(page)
    generate = notebook(page).locator(".widget-vbox:has(button:has-text('Generate'))").last
    assert_labels_whole(generate)
    assert_no_empty_choice(generate)
    generate.locator("button[title='list outputs/embeddings/ again']").click()
    field(generate, "Embeddings").select_option("browser-test")
    field(generate, "Seed").fill("7")
    field(generate, "Seed").press("Tab")
    watch_button(page, generate, "Generate")
    generate.locator("button:has-text('Generate')").click()
    generate.locator(".jp-OutputArea-output img").first.wait_for(timeout=300_000)
    assert page.evaluate("window.__sawDisabled"), "the button was not disabled while generating"
    assert generate.get_by_text(re.compile(r"saved .*browser-test-seed7-1\.png")).count() == 1
    assert (lab["outputs"] / "images" / "browser-test-seed7-2.png").is_file()
    assert_draws_the_prompts(lab["outputs"] / "images", "browser-test-seed7")
    shot(generate, "03-generate-widget.png")

    field(generate, "Height").fill("72")  # a mistake: not a multiple of 16
    field(generate, "Height").press("Tab")
    generate.locator("button:has-text('Generate')").click()
    generate.get_by_text(re.compile("height 72 is not a multiple of 16; the nearest valid sizes are 64 and 80")).wait_for(
        timeout=60_000)
    assert_clean_error(generate)
    shot(generate, "03-generate-bad-size.png")
    assert _stored_notebooks() == stored, "the stored notebooks changed"
    print(f"browser workshop run: {time.time() - started:.1f} s")


def test_the_method_on_one_page_runs_in_the_browser(page, lab):
    started = time.time()
    stored = _stored_notebooks()
    name = "04_method-on-one-page.ipynb"
    open_notebook(page, lab, name)
    assert_no_errors(page, run_all(page, lab, name))
    # the first picture the notebook shows, in view, with the cells around it
    pictures = notebook(page).locator(".jp-OutputArea-output img")
    assert pictures.count() > 0, "notebook 04 shows no picture"
    pictures.first.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "04-method-on-one-page.png"))
    assert _stored_notebooks() == stored, "the stored notebooks changed"
    print(f"notebook 04 in the browser: {time.time() - started:.1f} s")
