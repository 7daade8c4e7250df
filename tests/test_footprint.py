import json

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from helpers.budget import METHOD_BUDGET, PRESETS, parse_budget
from helpers.devicemap import draw_plan, model_units, plan_component, remaining, summarise
from helpers.errors import UserError
from helpers.precision import stored_bytes
from helpers.families import default_family
from helpers.footprint import DTYPES, footprint, plot_footprint, skeleton, stage_of
from helpers.planner import report
from helpers.families import STAGES
from helpers.models import component_configs
from helpers.planner import plan_stages

COMPONENT_ORDER = default_family().models

GiB = 2**30

# Parameter counts of the real components, from the shipped configs (each shared tensor once).
REAL_PARAMS = {
    "text_encoder": 123_060_480,
    "text_encoder_2": 4_762_310_656,
    "vae": 83_819_683,
}
TRANSFORMER_PARAMS = {"flux-dev": 11_901_408_320, "flux-schnell": 11_891_178_560}  # schnell: no guidance embedder
T5_SHARED = 32128 * 4096  # the embedding T5 shares between `shared` and `encoder.embed_tokens`


@pytest.fixture(scope="module")
def dev():
    return footprint("flux-dev")


@pytest.fixture(scope="module")
def tiny():
    return footprint("tiny")


@pytest.mark.parametrize("model", ["flux-dev", "flux-schnell"])
def test_real_parameter_counts(model):
    fp = footprint(model)
    assert {c: fp.components[c].params for c in REAL_PARAMS} == REAL_PARAMS
    assert fp.components["transformer"].params == TRANSFORMER_PARAMS[model]
    assert [c.cls for c in fp.components.values()] == [
        "CLIPTextModel", "T5EncoderModel", "FluxTransformer2DModel", "AutoencoderKL"]


def test_published_figures(dev):
    clip, t5, flux = (dev.components[c].nbytes("float32") for c in ("text_encoder", "text_encoder_2", "transformer"))
    assert 0.45 * GiB < clip < 0.46 * GiB  # the method's "under 460 MB" is ~0.46 GiB (492 MB)
    assert t5 > 17 * GiB
    assert round(flux / GiB, 1) == 44.3
    assert dev.nbytes("float32") > 61 * GiB


def test_bytes_are_what_each_format_stores(dev):
    """Parameters and buffers, in one rule (CLIP's one buffer: 77 int64 position ids)."""
    buffers = {"text_encoder": 77 * 8}
    for comp in dev.components.values():
        assert comp.nbytes("float32") == 4 * comp.params + buffers.get(comp.component, 0)
        assert comp.nbytes("bfloat16") == 2 * comp.params + buffers.get(comp.component, 0)
        assert comp.nbytes("float32") == stored_bytes(dev.skeletons[comp.component], "fp32")
        # fp8 as stored: linear weights at 1 byte plus a float32 scale per row, the rest (CLIP's and
        # T5's embeddings, norms, biases) in bf16
        assert comp.nbytes("float8_e4m3fn") == stored_bytes(dev.skeletons[comp.component], "fp8")
        assert comp.params < comp.nbytes("float8_e4m3fn") < 2 * comp.params
    assert set(DTYPES) == {"float32", "bfloat16", "float8_e4m3fn"}


def test_tied_t5_embedding_counted_once(dev):
    untied = footprint("flux-dev", tie=False)
    t5, t5_untied = dev.components["text_encoder_2"].params, untied.components["text_encoder_2"].params
    # the trap: init_empty_weights under transformers 5 leaves them as two tensors
    assert t5_untied - t5 == T5_SHARED
    module = dev.skeletons["text_encoder_2"]
    assert module.shared.weight is module.encoder.embed_tokens.weight


def test_skeletons_hold_no_storage(dev):
    for module in dev.skeletons.values():
        assert {p.device.type for p in module.parameters()} == {"meta"}


def test_twin_configs_match_a_built_twin(tiny_folder, tiny):
    local = footprint(str(tiny_folder))
    assert {c: local.components[c].params for c in COMPONENT_ORDER} == {c: tiny.components[c].params for c in COMPONENT_ORDER}


def test_unknown_hub_model_without_config(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="no config shipped"):
        component_configs("someone/unknown-flux")
    with pytest.raises(UserError, match="not a FLUX.1 folder"):
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
        component_configs(str(tmp_path / "m"))
    for comp in COMPONENT_ORDER:
        (tmp_path / "m" / comp).mkdir()
        (tmp_path / "m" / comp / "config.json").write_text('{"_class_name": "X"}')
    with pytest.raises(UserError, match="has no 'hidden_size'"):
        component_configs(str(tmp_path / "m"))
    (tmp_path / "m" / "text_encoder" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        component_configs(str(tmp_path / "m"))


# --------------------------------------------------------------------------- plans


def _tiers_of(plan, component):
    return {u.tier for p in plan.components if p.component == component for u in p.units}


def test_method_budget_reproduces_the_method(dev):
    plans = plan_stages(dev, METHOD_BUDGET)
    enc, diff = plans["text_encoding"], plans["diffusion"]
    assert enc.dtype == torch.float32 and diff.dtype == torch.bfloat16
    assert enc.fits and _tiers_of(enc, "text_encoder_2") == {0, "cpu"}  # T5 split between GPU and RAM
    assert _tiers_of(enc, "text_encoder") == {0}  # CLIP whole on the GPU
    assert diff.fits and _tiers_of(diff, "transformer") == {0, "cpu"}
    assert _tiers_of(diff, "vae") == {0}
    for plan in plans.values():
        tiers = plan.tier_bytes()
        assert tiers[0] <= 8.5 * GiB and tiers["cpu"] <= 30 * GiB


def test_transformer_does_not_fit_in_float32_and_advice_says_what_to_do(dev):
    plan = plan_stages(dev, METHOD_BUDGET, dtypes={"diffusion": "float32"})["diffusion"]
    assert not plan.fits and plan.overflow > 0
    assert "does not fit" in plan.advice and "--weights bf16" in plan.advice and "disk" in plan.advice
    # the extra RAM the advice names is enough, and 2/64 GiB less is not
    extra = float(plan.advice.split("needs ")[1].split(" GiB")[0]) * GiB
    more = plan_stages(dev, {0: "8.5GiB", "cpu": int(30 * GiB + extra + 2**24)}, dtypes={"diffusion": "float32"})
    less = plan_stages(dev, {0: "8.5GiB", "cpu": int(30 * GiB + extra - 2**25)}, dtypes={"diffusion": "float32"})
    assert more["diffusion"].fits and not less["diffusion"].fits


def test_presets(dev):
    outcome = {name: {s: p.fits for s, p in plan_stages(dev, spec).items()} for name, spec in PRESETS.items()}
    assert outcome["80 GB GPU"] == {"text_encoding": True, "diffusion": True}
    big = plan_stages(dev, PRESETS["80 GB GPU"])["diffusion"]
    assert big.tier_bytes().keys() == {0}  # bf16 transformer whole on an 80 GB card
    nogpu = plan_stages(dev, PRESETS["no GPU"])
    assert all(p.tier_bytes().keys() == {"cpu"} for p in nogpu.values())


def test_modules_accelerate_splits_further_are_placed_not_lost(dev):
    # at ~820 MiB of GPU accelerate splits the small time_text_embed module into its children
    plan = plan_stages(dev, {0: "820MiB", "cpu": "100GiB"})["diffusion"]
    assert plan.fits and "disk" not in plan.tier_bytes()
    names = [u.name for p in plan.components for u in p.units]
    assert any(n.startswith("transformer.time_text_embed.") for n in names)
    assert sum(plan.tier_bytes().values()) == dev.nbytes("bfloat16", ["transformer", "vae"])


def test_advice_names_the_fastest_tier_first(dev):
    plan = plan_stages(dev, {0: "760MiB", "cpu": "100GiB"})["diffusion"]
    assert list(plan.tier_bytes()) == [0, "cpu"]
    assert "moved to GPU 0" in plan.advice


def test_twin_advice_speaks_in_the_real_model_bytes(dev, tiny):
    plan = plan_stages(tiny, {0: "5.5GiB", "cpu": "14GiB"}, like=dev)["diffusion"]
    assert not plan.fits and plan.advice.startswith("as flux-dev under 0=5.5GiB,cpu=14GiB: does not fit")
    assert "(cpu=18GiB)" in plan.advice


def test_disk_tier_absorbs_overflow(dev):
    plan = plan_stages(dev, {0: "8.5GiB", "cpu": "30GiB", "disk": "100GiB"}, dtypes={"diffusion": "float32"})
    assert plan["diffusion"].fits and plan["diffusion"].tier_bytes()["disk"] > 0


@pytest.mark.parametrize("budget", [METHOD_BUDGET, *PRESETS.values(), {"cpu": "8.5GiB", "disk": "30GiB"}],
                         ids=["method", *PRESETS, "one tier down"])
def test_tiny_splits_exactly_like_the_real_model(dev, tiny, budget):
    real, twin = plan_stages(dev, budget), plan_stages(tiny, budget, like=dev)
    for stage in STAGES:
        assert twin[stage].fits == real[stage].fits
        for a, b in zip(real[stage].components, twin[stage].components):
            assert [u.name for u in a.units] == [u.name for u in b.units]
            assert [u.tier for u in a.units] == [u.tier for u in b.units], (stage, a.component)
        for tier, nbytes in twin[stage].tier_bytes().items():  # and the twin's usage is within its budget
            assert tier == "disk" or nbytes <= twin[stage].budget[tier]


def test_klein_tiny_splits_like_klein_4b_and_a_twin_of_another_family_is_refused(tiny):
    real, twin = footprint("flux2-klein-4b"), footprint("klein-tiny")
    dtypes = {"text_encoding": "fp32", "diffusion": "bf16"}  # notebook 01's: the text path splits GPU 0 and RAM
    planned, like = plan_stages(real, METHOD_BUDGET, dtypes=dtypes), plan_stages(twin, METHOD_BUDGET, dtypes=dtypes, like=real)
    for stage in STAGES:
        for a, b in zip(planned[stage].components, like[stage].components):
            assert [u.tier for u in a.units] == [u.tier for u in b.units], (stage, a.component)
    assert set(planned["text_encoding"].tier_bytes()) == {0, "cpu"}
    with pytest.raises(UserError, match="different families .*Give a twin of FLUX.2 \\[klein\\] \\(klein-tiny"):
        plan_stages(tiny, METHOD_BUDGET, like=real)  # FLUX.1's twin has no Qwen3 to split like klein's


def test_shares_are_of_the_stage(tiny):
    plans = plan_stages(tiny, "0=40%,cpu=100%")
    for name, plan in plans.items():
        stage_bytes = tiny.nbytes(plan.dtype, list(stage_of(default_family(), name).components))
        assert plan.budget[0] == int(stage_bytes * 0.4)
        assert plan.fits and plan.tier_bytes()[0] <= plan.budget[0]


def test_report_json_shape_and_exact_integers(dev):
    data = json.loads(json.dumps(report(dev, plan_stages(dev))))
    assert set(data) == {"model", "components", "activations", "plan"} and data["model"] == "flux-dev"
    assert data["activations"] == {"workload": None, "bytes": {}}  # planned for weights alone
    for comp, entry in data["components"].items():
        assert set(entry) == {"class", "params", "bytes"} and isinstance(entry["params"], int)
        skeleton = dev.skeletons[comp]
        assert entry["bytes"] == {"float32": stored_bytes(skeleton, "fp32"), "bfloat16": stored_bytes(skeleton, "bf16"),
                                  "float8_e4m3fn": stored_bytes(skeleton, "fp8")}
    for name, stage in data["plan"].items():
        assert {"dtype", "tiers", "fits", "advice"} <= set(stage)
        assert isinstance(stage["fits"], bool) and stage["advice"]
        total = sum(data["components"][c]["bytes"][stage["dtype"]] for c in stage_of(default_family(), name).components)
        assert sum(t["bytes"] for t in stage["tiers"].values()) == total  # every byte placed once
        assert set(stage["tiers"]) == {"0", "cpu"}
        assert all(isinstance(m, str) for t in stage["tiers"].values() for m in t["modules"])


# --------------------------------------------------------------------------- devicemap and charts


def test_model_units_are_blocks(tiny):
    t5 = [name for name, _ in model_units(tiny.skeletons["text_encoder_2"], ["T5Block"])]
    assert t5[0] == "shared" and t5[-1] == "encoder.final_layer_norm"
    assert [n for n in t5 if n.startswith("encoder.block.")] == [f"encoder.block.{i}" for i in range(24)]
    flux_units = model_units(tiny.skeletons["transformer"], ["FluxTransformerBlock", "FluxSingleTransformerBlock"])
    assert sum(n for _, n in flux_units) == tiny.components["transformer"].nbytes("float32")  # as the skeleton is
    bf16 = model_units(tiny.skeletons["transformer"], ["FluxTransformerBlock", "FluxSingleTransformerBlock"], "bf16")
    assert [n for _, n in bf16] == [n // 2 for _, n in flux_units]
    assert sum(1 for name, _ in flux_units if name.startswith("single_transformer_blocks.")) == 38


def test_plan_component_whole_and_remaining(tiny):
    budget = parse_budget({"cpu": "1MiB", "disk": "1GiB"})
    whole = plan_component(tiny.skeletons["vae"], budget, torch.float32, "vae", whole=True)
    assert {u.tier for u in whole.units} == {"disk"}  # 1.4 MiB in float32 does not fit 1 MiB of RAM
    left = remaining(parse_budget(METHOD_BUDGET), {0: int(8.5 * GiB)})
    assert left.names == ["cpu"]
    rows = summarise([whole])
    assert rows[0]["units"] == len(whole.units) and rows[0]["tier"] == "disk"


def test_charts_draw(dev):
    import matplotlib.pyplot as plt

    ax = plot_footprint(dev, parse_budget(METHOD_BUDGET))
    heights = sum(p.get_height() for p in ax.patches[:: len(DTYPES)])  # the float32 bar, stacked
    assert heights == pytest.approx(dev.nbytes("float32") / GiB)
    plans = plan_stages(dev, dtypes={"diffusion": "float32"})
    ax = draw_plan(plans["diffusion"].components, "diffusion", budget=plans["diffusion"].budget)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "does not fit" in labels and "GPU 0" in labels
    plt.close("all")


def test_skeleton_rejects_unknown_component():
    with pytest.raises(UserError, match="unknown component"):
        skeleton("unet", {})


# ----------------------------------------------------------------------------- activations
