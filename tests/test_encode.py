import torch
import pytest

from helpers.embeddings import fingerprint, load_embeddings, read_header
from helpers.encode import (
    compare_maps,
    encode,
    encode_prompts,
    load_text_encoders,
    text_encoding_plan,
    token_report,
    truncation_warnings,
)
from helpers.errors import UserError
from helpers.models import component_configs

PROMPTS = ["a photo of a red cat sitting on a window", "a dog on a bridge at night"]
ONE_TIER_DOWN = {"cpu": "8.5GiB", "disk": "30GiB"}  # the method's budget without a GPU, translated to the twin


@pytest.fixture(scope="module")
def plan():
    return text_encoding_plan(None, None)  # the default on this CPU machine: one tier down, as the real T5


def test_default_plan_splits_t5_over_ram_and_disk(plan):
    t5 = next(p for p in plan.components if p.component == "text_encoder_2")
    tiers = [u.tier for u in t5.units]
    assert set(tiers) == {"cpu", "disk"}
    # the real T5 under the method's budget: shared + embed_tokens + 9 blocks on the fast tier
    assert tiers.count("cpu") == 11 and t5.units[10].name == "text_encoder_2.encoder.block.8"


def test_device_mapped_encoding_equals_the_one_piece_pipeline(tiny_folder, plan, tmp_path):
    from diffusers import FluxPipeline

    encoders = load_text_encoders(tiny_folder, plan, offload_folder=tmp_path / "offload")
    assert encoders.differences == []  # the applied map is the plan
    assert set(encoders.applied.values()) == {"cpu", "disk"}
    ours = encode(encoders, PROMPTS, max_sequence_length=64)

    pipe = FluxPipeline.from_pretrained(tiny_folder, dtype=torch.float32, transformer=None, vae=None)
    theirs = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=64)
    assert list(ours) == ["prompt_embeds", "pooled_prompt_embeds", "text_ids"]
    for a, b in zip(ours.values(), theirs):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert ours["prompt_embeds"].shape == (2, 64, 32) and ours["pooled_prompt_embeds"].shape == (2, 32)


def test_compare_maps():
    assert compare_maps({"encoder": "cpu"}, {"encoder.block.0": "cpu", "encoder.block.1": "cpu"}) == []
    diff = compare_maps({"a": "cpu", "b": "disk"}, {"a": "cpu", "b": "cpu"})
    assert diff == ["b: planned disk, applied cpu"]


def test_encode_prompts_writes_a_valid_file(tmp_path):
    out = tmp_path / "e.safetensors"
    result = encode_prompts("tiny", PROMPTS, out, max_sequence_length=64)
    assert result.path == out and result.differences == [] and result.warnings == []
    tensors, header = load_embeddings(out, expected_fingerprint=fingerprint(component_configs("tiny")[1]),
                                      widths={"prompt_embeds": 32, "pooled_prompt_embeds": 32})
    assert header.prompts == PROMPTS and tensors["prompt_embeds"].shape == (2, 64, 32)
    assert {row["tier"] for row in result.per_tier()} == {"cpu", "disk"}
    assert result.measurement.wall_s > 0
    # the twin's RAM budget is a few hundred KiB: the reading says whether the process's own memory
    # (not the weights) took the measured use past it, next to the figure
    cpu = next(row for row in result.per_tier() if row["tier"] == "cpu")
    rss, budget = result.measurement.peak_rss_delta, result.plan.budget["cpu"]
    assert cpu["reading"].startswith("within") == (rss <= budget)
    assert rss <= budget or "not the weights" in cpu["reading"]


def test_long_prompt_is_warned_with_token_counts(tmp_path):
    long = "a photo of a cat " * 20
    result = encode_prompts("tiny", [long], tmp_path / "long.safetensors", max_sequence_length=16)
    assert len(result.warnings) == 1
    n = result.tokens[0]["t5 tokens"]
    assert n > 16 and f"is {n} T5 tokens; only the first 16 are used" in result.warnings[0]


def test_token_report_flags_clip_cut(tiny_folder):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(tiny_folder / "tokenizer_2")
    rows = token_report(["word " * 100], {"tokenizer": clip, "tokenizer_2": t5}, 512)
    assert rows[0]["cut"] == "CLIP" and "CLIP reads only the first 77" in truncation_warnings(rows, 512)[0]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(model="/no/such/model"), "unknown model"),
    (dict(prompts=""), "the prompt is empty"),
    (dict(prompts=["ok", "  "]), "prompt 2 of 2 is empty"),
    (dict(prompts=[]), "no prompt given"),
    (dict(max_memory="cpu=lots"), "not a number with a unit"),
    (dict(max_memory="cpu=1KiB"), r"too small for text encoding: the activations of 1 prompt of 512 tokens \(the T5 encoder\) alone"),
    (dict(max_memory="cpu=100KiB", max_sequence_length=8), "too small for text encoding: does not fit: needs"),
    (dict(max_sequence_length=0), "from 1 to 512"),
    (dict(max_sequence_length=600), "more than T5's 512"),
])
def test_rejections_before_any_load(tmp_path, monkeypatch, kwargs, fragment):
    import helpers.encode as enc

    def must_not_load(*a, **k):
        raise AssertionError("loaded weights before rejecting the input")

    monkeypatch.setattr(enc, "load_text_encoders", must_not_load)
    args = dict(model="tiny", prompts=["a cat"], out=tmp_path / "e.safetensors")
    args.update(kwargs)
    with pytest.raises(UserError, match=fragment):
        encode_prompts(args.pop("model"), args.pop("prompts"), args.pop("out"), **args)


def test_too_small_budget_names_the_smallest_that_works(tmp_path):
    # 8 tokens: T5's activations fit 100 KiB, its weights do not; the advice counts both
    with pytest.raises(UserError) as info:
        encode_prompts("tiny", ["a cat"], tmp_path / "e.safetensors", max_memory="cpu=100KiB", max_sequence_length=8)
    smallest = str(info.value).split("(cpu=")[1].split(")")[0]
    encode_prompts("tiny", ["a cat"], tmp_path / "e.safetensors", max_memory=f"cpu={smallest}",
                   max_sequence_length=8)  # and it does


def test_output_rejections(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        encode_prompts("tiny", ["a cat"], tmp_path / "missing" / "e.safetensors", create_folder=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        encode_prompts("tiny", ["a cat"], tmp_path / "afile" / "e.safetensors")
    existing = tmp_path / "e.safetensors"
    existing.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists"):
        encode_prompts("tiny", ["a cat"], existing)
    assert existing.read_bytes() == b"precious"


def test_schnell_takes_at_most_256_tokens(tmp_path):
    from helpers.encode import check_max_sequence_length

    assert check_max_sequence_length(256, "schnell") == 256
    with pytest.raises(UserError, match="FLUX.1-schnell takes at most 256"):
        check_max_sequence_length(512, "schnell")


def test_header_records_the_run(tmp_path):
    out = encode_prompts("tiny", ["a cat"], tmp_path / "e.safetensors", max_sequence_length=32).path
    meta = read_header(out).metadata
    assert meta["model"] == "tiny" and meta["max_sequence_length"] == "32"


def test_widget_encodes_and_reports_errors_in_the_page(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_OUTPUTS", str(tmp_path))
    from helpers.widgets import encode_panel

    panel = encode_panel("tiny", ["a cat", "a dog"], 32, "from-widget")
    panel.click()
    assert (tmp_path / "embeddings" / "from-widget.safetensors").is_file()
    assert panel.status.value.startswith("done in") and not panel.button.disabled
    assert panel.button.description == "Encode"
    panel.children[0].value = "   "  # an empty prompt box
    panel.click()
    assert "failed" in panel.status.value and not panel.button.disabled


def test_a_gpu_tier_on_a_machine_without_one_is_refused_before_loading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="puts weights on GPU 0, and this machine has no GPU; without a GPU run one tier down"):
        encode_prompts("tiny", ["a cat"], tmp_path / "e.safetensors", max_memory="0=8GiB,cpu=30GiB")


@pytest.mark.parametrize("budget", ["disk=100GiB", "cpu=1KiB,disk=100GiB"])
def test_a_budget_with_nothing_to_compute_on_is_refused(tmp_path, budget):
    with pytest.raises(UserError, match="on disk with no RAM or GPU to compute on|too small"):
        encode_prompts("tiny", ["a cat"], tmp_path / "e.safetensors", max_memory=budget)


def test_schnell_like_models_default_to_256_tokens(tmp_path, tiny_folder):
    import json
    import shutil

    schnell = tmp_path / "schnell-like"
    shutil.copytree(tiny_folder, schnell)
    cfg = json.loads((schnell / "transformer" / "config.json").read_text())
    cfg["guidance_embeds"] = False
    (schnell / "transformer" / "config.json").write_text(json.dumps(cfg))
    out = encode_prompts(str(schnell), ["a cat"], tmp_path / "e.safetensors").path
    assert read_header(out).max_sequence_length == 256
    assert read_header(out).metadata["model"] == str(schnell.resolve())  # a local model is stored absolute


def test_output_must_be_safetensors_and_files_are_shareable(tmp_path):
    import os
    import stat

    with pytest.raises(UserError, match="end.* .safetensors|ending in .safetensors"):
        encode_prompts("tiny", ["a cat"], tmp_path / "e.png")
    out = encode_prompts("tiny", ["a cat"], tmp_path / "e.safetensors", max_sequence_length=8).path
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def controls(widget):
    """Every control inside a panel (its button too), depth first."""
    for child in getattr(widget, "children", ()):
        if getattr(child, "description", None) is not None and not getattr(child, "children", None):
            yield child
        yield from controls(child)


def test_widget_shows_every_default_with_its_whole_label():
    from helpers.widgets import EXAMPLE_PROMPT, LABELS, chosen_weights, encode_panel
    from helpers.twins.world import parse

    panel = encode_panel("tiny", ["a red circle on a blue background"], 512, "shapes")
    boxes = {c.description: c for c in controls(panel) if c.description and c is not panel.button}
    assert {"Prompts", "Max tokens", "File name", "Weights", "Math", "replace a file of the same name"} <= set(boxes)
    # weights=None is a named choice, shown, not an empty box; it still asks for the default
    assert boxes["Weights"].label == "method's default (fp32)" and chosen_weights(boxes["Weights"]) is None
    assert boxes["Math"].value == "auto" and boxes["Max tokens"].value == 512 and boxes["File name"].value == "shapes"
    for box in boxes.values():  # one label column, wider than the 80 px that cut "Embeddin..."
        assert box.style.description_width == LABELS["description_width"] == "7.5em", box.description
    assert boxes["replace a file of the same name"].layout.width == "auto"  # the checkbox's label whole
    parse(EXAMPLE_PROMPT)  # the example in the prompt box is one the twin can draw
    assert EXAMPLE_PROMPT in boxes["Prompts"].placeholder
    panel = encode_panel("tiny", ["a red circle on a blue background"], 512, "shapes", weights="bf16")
    weights = next(c for c in controls(panel) if c.description == "Weights")
    assert weights.label == "bf16" and chosen_weights(weights) == "bf16"


def test_widget_refuses_names_with_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX_OUTPUTS", str(tmp_path))
    from helpers.widgets import embeddings_choices, encode_panel

    panel = encode_panel("tiny", ["a cat"], 8, "../escaped")
    panel.click()
    assert "failed" in panel.status.value and not (tmp_path / "escaped.safetensors").exists()
    (tmp_path / "embeddings").mkdir(exist_ok=True)
    (tmp_path / "embeddings" / ".half.tmp.safetensors").write_bytes(b"")
    (tmp_path / "embeddings" / "real.safetensors").write_bytes(b"")
    assert embeddings_choices() == ["real"]
