"""The pictures of the method draw the footprint's numbers, and the script writes them, byte-stable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from helpers.report import format_bytes  # noqa: E402
from helpers.diagrams import draw_memory_over_time, draw_stages, method_bytes  # noqa: E402
from helpers.footprint import footprint  # noqa: E402

GiB = 2**30
ROOT = Path(__file__).resolve().parent.parent
TEXT = ("text_encoder", "text_encoder_2")
DIFFUSION = ("transformer", "vae")


@pytest.fixture(scope="module")
def dev():
    return footprint("flux-dev")


@pytest.fixture(scope="module")
def stage_totals(dev):
    """Each stage's bytes as the method loads it, counted here from the footprint: T5 and CLIP in
    float32, the transformer and the VAE in bfloat16."""
    return dev.nbytes(torch.float32, list(TEXT)), dev.nbytes(torch.bfloat16, list(DIFFUSION))


@pytest.fixture(autouse=True)
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_the_method_in_numbers(dev, stage_totals):
    text, diffusion = stage_totals
    sizes = method_bytes(dev)
    assert sizes.stages["text_encoding"].total == text and sizes.stages["diffusion"].total == diffusion
    assert sizes.one_piece == text + diffusion and sizes.decoupled == max(text, diffusion) == diffusion
    # the lesson itself: all of it does not fit the method's 38.5 GiB, the larger stage does
    assert sizes.one_piece > 38.5 * GiB > sizes.decoupled
    assert 40 * GiB < sizes.one_piece < 41 * GiB and 22 * GiB < sizes.decoupled < 23 * GiB
    # one prompt of 512 tokens in bfloat16: 4 MiB and 1.5 KiB
    assert sizes.embeddings == {"prompt_embeds": ((1, 512, 4096), 2 * 512 * 4096),
                                "pooled_prompt_embeds": ((1, 768), 2 * 768)}


def test_memory_peaks_are_the_stage_totals_and_their_sum(dev, stage_totals):
    text, diffusion = stage_totals
    ax = draw_memory_over_time(dev)
    drawn = texts(ax)
    assert f"one-piece peak: {format_bytes(text + diffusion)} (the sum), " \
           f"{format_bytes(text + diffusion - int(38.5 * GiB))} over the budget" in drawn
    assert f"decoupled peak: {format_bytes(max(text, diffusion))}\n(the larger stage)" in drawn
    assert format_bytes(min(text, diffusion)) in drawn  # stage 1's level, labelled too
    assert "budget: GPU 0 8.5 GiB + CPU RAM 30 GiB = 38.5 GiB" in drawn
    steps = {line.get_label(): max(line.get_ydata()) for line in ax.lines if not line.get_label().startswith("_")}
    one_piece = next(v for k, v in steps.items() if k.startswith("one piece"))
    decoupled = next(v for k, v in steps.items() if k.startswith("decoupled"))
    assert one_piece == pytest.approx((text + diffusion) / GiB) and decoupled == pytest.approx(diffusion / GiB)
    budget = [line for line in ax.lines if set(line.get_ydata()) == {38.5}]
    assert len(budget) == 1
    assert any("float32" in label and "bfloat16" in label for label in steps), "the dtypes are not stated"
    assert ax.get_ylabel() == "weights held (GiB)"


def test_memory_without_a_budget_or_with_a_share(dev, stage_totals):
    ax = draw_memory_over_time(dev, budget=None)
    assert not any(t.startswith("budget:") for t in texts(ax))
    assert not any("over the budget" in t for t in texts(ax))
    ax = draw_memory_over_time(dev, budget="cpu=60%")  # of the one-piece total: the decoupled peak fits
    share = int(sum(stage_totals) * 0.6)
    assert f"budget: CPU RAM {format_bytes(share)} = {format_bytes(share)}" in texts(ax)


def test_stages_show_each_component_in_its_stage_dtype(dev, stage_totals):
    import matplotlib.pyplot as plt

    text, diffusion = stage_totals
    _, given = plt.subplots(figsize=(10, 4.6))
    ax = draw_stages(dev, ax=given)
    assert ax is given
    drawn = texts(ax)
    for component, dtype in [("text_encoder", "float32"), ("text_encoder_2", "float32"),
                             ("transformer", "bfloat16"), ("vae", "bfloat16")]:
        assert format_bytes(dev.components[component].nbytes(dtype)) in drawn, component
    assert f"float32, peak {format_bytes(text)}" in drawn and f"bfloat16, peak {format_bytes(diffusion)}" in drawn
    assert {"prompt_embeds", "pooled_prompt_embeds", "[1, 512, 4096]", "[1, 768]", "latents"} <= set(drawn)
    assert f"safetensors, bfloat16, {format_bytes(2 * (512 * 4096 + 768))}" in drawn
    assert "CLIP 77, T5 512 tokens" in drawn


def test_the_variant_sets_the_tokens():
    sizes = method_bytes("flux-schnell")
    assert sizes.embeddings["prompt_embeds"][0] == (1, 256, 4096) and sizes.tokens == 256


def test_the_script_writes_both_pictures_the_same_each_time(tmp_path, dev, monkeypatch):
    from PIL import Image

    spec = importlib.util.spec_from_file_location("diagrams_script", ROOT / "scripts" / "diagrams.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr("helpers.footprint.footprint", lambda model: dev)  # built once for the module
    assert script.main(["--out", str(tmp_path / "a")]) == 0
    assert script.main(["--out", str(tmp_path / "b")]) == 0
    sizes = {"stages.png": (1100, 506), "memory-over-time.png": (1100, 594)}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(sizes)
    for name, size in sizes.items():
        first, again = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert first == again, f"{name} differs between two runs"
        with Image.open(tmp_path / "a" / name) as image:
            assert image.size == size and "Software" not in image.info
