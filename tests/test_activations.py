"""What a forward pass holds beyond its weights, counted on the meta device, and the room the plans
keep for it on the fast tier (helpers.activations, helpers.footprint's plans)."""

import pytest
import torch

from helpers.errors import UserError



class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)

    def forward(self, x):
        h = self.up(x)
        h = torch.nn.functional.gelu(h)  # up's output goes when h is rebound: two 100 x 256 at once, at most
        return self.down(h)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_activation_peak_counts_what_is_alive_at_once(device):
    from helpers.activations import activation_peak

    mlp = _MLP().to(device)
    x = torch.zeros(100, 64, device=device)
    assert activation_peak(mlp, {"x": x}) == 2 * 100 * 256 * 4  # weights and the input are not counted


class _Attention(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)

@pytest.fixture
def native_bf16(monkeypatch):
    """Plan as for a CPU with bf16 kernels (what these figures were written for), on any CPU: without
    them a bf16 convolution unfolds its input per kernel tap, and the VAE's decode needs more (see
    ``_conv_scratch`` and its own test)."""
    from helpers import activations

    monkeypatch.setattr(activations, "cpu_bf16", lambda: (True, "assumed by the test"))
    monkeypatch.setattr(activations, "_COUNTED", {})


def test_on_a_cpu_a_convolution_counts_the_scratch_its_kernel_holds():
    """oneDNN reorders a conv's input and writes its output twice, in a blocked layout of 16 channels,
    while it runs (which of these a kernel keeps depends on the CPU: all of them are counted); the
    meta device makes none."""
    from helpers.activations import activation_peak

    conv = torch.nn.Conv2d(16, 32, 3, padding=1, device="meta")
    x = torch.empty(1, 16, 64, 64, device="meta")
    out = 32 * 64 * 64 * 4
    assert activation_peak(conv, {"input": x}) == out
    assert activation_peak(conv, {"input": x}, kernel_scratch=True) == out + x.numel() * 4 + 2 * out
    narrow = torch.nn.Conv2d(16, 3, 3, padding=1, device="meta")  # 3 channels held as 16
    assert activation_peak(narrow, {"input": x}, kernel_scratch=True) == (3 * 64 * 64 * 4 + x.numel() * 4
                                                                           + 2 * 16 * 64 * 64 * 4)


def test_bf16_math_on_a_cpu_without_native_bf16_counts_the_unfolded_input(monkeypatch):
    """Without native bf16 there is no oneDNN kernel: PyTorch unfolds the input once per kernel tap
    (measured: 703 MiB beside a 78 MiB input for a 3x3 conv at 1600x1600)."""
    import helpers.activations as activations

    conv = torch.nn.Conv2d(16, 16, 3, padding=1, device="meta", dtype=torch.bfloat16)
    x = torch.empty(1, 16, 64, 64, device="meta", dtype=torch.bfloat16)
    size = x.numel() * 2
    monkeypatch.setattr(activations, "cpu_bf16", lambda: (True, "native"))
    assert activations.activation_peak(conv, {"input": x}, kernel_scratch=True) == size + size + 2 * size
    monkeypatch.setattr(activations, "cpu_bf16", lambda: (False, "emulated"))
    assert activations.activation_peak(conv, {"input": x}, kernel_scratch=True) == size + 9 * size + size
    fp32 = torch.nn.Conv2d(16, 16, 3, padding=1, device="meta")  # float32 keeps its oneDNN kernel
    assert activations.activation_peak(fp32, {"input": x.float()}, kernel_scratch=True) == 4 * 2 * size


def test_activation_peak_counts_attention_as_a_fused_kernel_or_with_its_score_matrix():
    from helpers.activations import activation_peak

    x = torch.zeros(1, 4, 512, 32, device="meta")
    assert activation_peak(_Attention(), {"x": x}) == x.numel() * 4  # the output alone
    assert activation_peak(_Attention(), {"x": x}, fused_attention=False) >= 4 * 512 * 512 * 4  # heads x n x n


def test_activation_bytes_on_meta_match_a_real_forward_of_the_tiny_twin():
    """The meta count is what the same forward holds with real weights and inputs (here on the CPU)."""
    from diffusers import FluxTransformer2DModel

    from helpers.activations import activation_peak
    from helpers.footprint import activation_bytes
    from helpers.models import component_configs, model_path

    _, configs = component_configs("tiny")
    model = FluxTransformer2DModel.from_pretrained(model_path("tiny") / "transformer", dtype=torch.bfloat16).eval()
    n, tokens, cfg = (128 // 16) ** 2, 16, model.config
    inputs = dict(hidden_states=torch.zeros(1, n, cfg.in_channels, dtype=torch.bfloat16),
                  encoder_hidden_states=torch.zeros(1, tokens, cfg.joint_attention_dim, dtype=torch.bfloat16),
                  pooled_projections=torch.zeros(1, cfg.pooled_projection_dim, dtype=torch.bfloat16),
                  timestep=torch.zeros(1, dtype=torch.bfloat16), img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(tokens, 3),
                  guidance=torch.zeros(1), return_dict=False)
    real = activation_peak(model, inputs)
    meta = activation_bytes("transformer", configs["transformer"], torch.bfloat16, height=128, width=128, tokens=tokens)
    assert real == meta > 0
    # more pixels, more activations; T5 too
    assert activation_bytes("transformer", configs["transformer"], torch.bfloat16, 256, 256, tokens) > 3 * meta
    assert activation_bytes("text_encoder_2", configs["text_encoder_2"], torch.float32, tokens=64) > 0
    assert activation_bytes("vae", configs["vae"], torch.bfloat16, 128, 128) > 0
    with pytest.raises(UserError, match="activations are estimated for text_encoder_2, transformer, vae, not .text_encoder."):
        activation_bytes("text_encoder", configs["text_encoder"], torch.float32)


def test_flux_dev_activations_at_1024_are_about_half_a_gib():
    """The full-size transformer on meta: a second, no weights. What a stream keeps free on a GPU."""
    from helpers.architecture import shipped_configs
    from helpers.footprint import activation_bytes

    configs = shipped_configs("FLUX.1-dev")
    step = activation_bytes("transformer", configs["transformer"], torch.bfloat16, 1024, 1024, 512)
    assert 0.3 * 2**30 < step < 0.8 * 2**30  # 4096 + 512 tokens x 3072, the MLP 4x wider; no 4608^2 score matrix


class _Cached(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cache = None

    def forward(self, x):
        if self.cache is None:
            self.cache = x * 2  # made by the first call, kept by the module
        return self.cache[: len(x) // 2] + 1  # a view of it, then one new tensor


def test_activation_peak_does_not_count_tensors_from_before_the_pass():
    from helpers.activations import activation_peak

    module, x = _Cached(), torch.zeros(1000)
    assert activation_peak(module, {"x": x}) == 1000 * 4 + 500 * 4  # the cache is made in this pass
    assert activation_peak(module, {"x": x}) == 500 * 4  # now it is old: only the sum is new


# --------------------------------------------------------------------------- the workload and the search


def test_a_workload_is_whole_numbers_and_says_what_it_is():
    from helpers.activations import Workload

    assert Workload().describe() == "a 1024x1024 image"
    assert Workload(64, 128, batch=3).describe() == "3 images of 64x128"
    assert Workload(batch=2, tokens=77).describe("text_encoding") == "2 prompts of 77 tokens"
    assert Workload(64, 64).square(96) == Workload(96, 96)
    for bad in (dict(height=0), dict(batch=1.5), dict(tokens=True), dict(width="64")):
        with pytest.raises(UserError, match="must be a whole number, 1 or more"):
            Workload(**bad)


@pytest.mark.parametrize("answer", [None, 16, 32, 496, 1008, 2432])
@pytest.mark.parametrize("guess", [None, 16, 512, 2400, 4000])
def test_largest_square_finds_the_last_side_that_fits_whatever_the_guess(answer, guess):
    from helpers.activations import largest_square

    tried = []

    def fits(side):
        assert side % 16 == 0 and 16 <= side <= 4096
        tried.append(side)
        return answer is not None and side <= answer

    assert largest_square(fits, 4096, guess) == answer
    assert len(tried) <= 16  # a bisection of 256 sides, and the guess
    if answer and guess == answer:
        assert len(tried) <= 4  # a right guess settles it: 16, the end, the guess and the one after


def test_affine_guess_is_close_for_real_activations():
    from helpers.activations import affine_guess
    from helpers.footprint import activation_bytes
    from helpers.models import component_configs

    vae = component_configs("tiny")[1]["vae"]
    count = lambda side: activation_bytes("vae", vae, torch.bfloat16, side, side)  # noqa: E731
    limit = count(720)
    assert abs(affine_guess(count, limit, 4096) - 720) <= 32


def test_counting_in_another_dtype_leaves_the_skeleton_as_it_was():
    """The plans count bfloat16 activations on the same skeletons they size in float32."""
    from helpers.activations import forward_peak
    from helpers.footprint import footprint
    from helpers.planner import plan_stages

    fp = footprint("tiny", components=("transformer", "vae"))
    before = {n: p.dtype for n, p in fp.skeletons["transformer"].named_parameters()}
    fp32 = plan_stages(fp, "cpu=50%,disk=100%", dtypes={"diffusion": "float32"}, stages=("diffusion",))["diffusion"]
    forward_peak("transformer", fp.skeletons["transformer"], torch.bfloat16, 64, 64, 16)
    assert {n: p.dtype for n, p in fp.skeletons["transformer"].named_parameters()} == before
    again = plan_stages(fp, "cpu=50%,disk=100%", dtypes={"diffusion": "float32"}, stages=("diffusion",))["diffusion"]
    assert again.tier_bytes() == fp32.tier_bytes()


# --------------------------------------------------------------------------- the room the plans keep


def _tiny(components=("transformer", "vae")):
    from helpers.footprint import footprint

    return footprint("tiny", components=components)


def test_a_plan_keeps_the_larger_of_step_and_decode_on_the_fast_tier_and_places_weights_in_the_rest(native_bf16):
    from helpers.activations import Workload, forward_peak
    from helpers.planner import plan_stages

    fp = _tiny()
    work = Workload(128, 128, batch=2, tokens=16)
    # computed on a CPU, the convolutions' scratch is counted; on a GPU it is not
    step, decode = (forward_peak(c, fp.skeletons[c], torch.bfloat16, 128, 128, 16, cpu=True)
                    for c in ("transformer", "vae"))
    plan = plan_stages(fp, "cpu=8MiB,disk=100MiB", stages=("diffusion",), workload=work)["diffusion"]
    assert plan.activations == {"transformer": 2 * step, "vae": 2 * decode}
    assert plan.reserve == {"cpu": 2 * max(step, decode)}  # in RAM: no GPU workspace
    assert plan.budget["cpu"] == 8 * 2**20  # an absolute tier is the whole room, activations included
    assert plan.tier_bytes()["cpu"] <= 8 * 2**20 - plan.reserve_bytes
    assert plan.weights_budget()["cpu"] == 8 * 2**20 - plan.reserve_bytes
    weights_only = plan_stages(fp, "cpu=8MiB,disk=100MiB", stages=("diffusion",))["diffusion"]
    assert weights_only.reserve == {} and weights_only.tier_bytes()["cpu"] >= plan.tier_bytes()["cpu"]
    # on a GPU tier (planned anywhere) the workspace of cuBLAS and the allocator comes on top
    from helpers.activations import WORKSPACE_GPU

    step, decode = (forward_peak(c, fp.skeletons[c], torch.bfloat16, 128, 128, 16) for c in ("transformer", "vae"))
    gpu = plan_stages(fp, "0=300MiB,cpu=1GiB", stages=("diffusion",), workload=work)["diffusion"]
    assert gpu.reserve == {0: 2 * max(step, decode) + WORKSPACE_GPU}
    assert "kept for activations" in gpu.advice


def test_a_share_sizes_the_weights_and_the_activations_come_on_top():
    from helpers.activations import Workload
    from helpers.planner import plan_stages

    fp = _tiny()
    weights = plan_stages(fp, "cpu=50%,disk=100%", stages=("diffusion",))["diffusion"]
    plan = plan_stages(fp, "cpu=50%,disk=100%", stages=("diffusion",), workload=Workload(256, 256))["diffusion"]
    assert plan.tier_bytes() == weights.tier_bytes()  # the same split
    assert plan.budget["cpu"] == weights.budget["cpu"] + plan.reserve_bytes
    assert not plan.warnings  # the share says how much room the weights get


def test_a_translated_budget_splits_the_twin_like_the_reference_and_judges_in_its_bytes(native_bf16):
    from helpers.activations import Workload
    from helpers.footprint import footprint
    from helpers.planner import plan_stages

    fp, dev = _tiny(), footprint("flux-dev", components=("transformer", "vae"))
    spec = "cpu=8.5GiB,disk=30GiB"
    work = Workload(1024, 1024)
    plan = plan_stages(fp, spec, like=dev, stages=("diffusion",), workload=work)["diffusion"]
    ref = plan_stages(dev, spec, stages=("diffusion",), workload=work)["diffusion"]
    assert plan.reference.reserve == ref.reserve and ref.reserve_bytes > 1.4 * 2**30  # the real decode: 1.5 GiB
    assert plan.reserve_bytes == max(plan.activations.values()) < 256 * 2**20  # the twin's own room
    # unit for unit the twin's split is the reference's
    assert [u.tier for c in plan.components for u in c.units] == [u.tier for c in ref.components for u in c.units]
    too_big = plan_stages(fp, spec, like=dev, stages=("diffusion",), workload=Workload(4096, 4096))["diffusion"]
    # on a CPU: 24 GiB of tensors plus the scratch of the convolutions at full size
    assert not too_big.fits and "as flux-dev under" in too_big.advice and "need 46 GiB" in too_big.advice


@pytest.mark.slow
def test_a_size_whose_activations_alone_exceed_the_tier_is_refused_naming_the_largest_that_runs(tiny_folder, native_bf16):
    """The stage's check, at its edge: the named size is accepted, the next one up refused."""
    import re

    from helpers.activations import Workload
    from helpers.diffuse import diffusion_plan

    budget = "cpu=64MiB,disk=100%"
    with pytest.raises(UserError, match=r"the activations of a 16384x16384 image \(the VAE's decode\) alone need 56 GiB") as info:
        diffusion_plan(str(tiny_folder), budget, workload=Workload(16384, 16384), compute="bf16")
    # the activations are in the dtype of the math: float32 math (the default on a CPU without
    # native bf16) doubles them, and the largest size shrinks by about 1/sqrt(2)
    with pytest.raises(UserError, match=r"16384x16384 image \(the VAE's decode\) alone need 112 GiB") as wide:
        diffusion_plan(str(tiny_folder), budget, workload=Workload(16384, 16384), compute="fp32")
    side32 = int(re.search(r"the largest square image that fits is (\d+)x\1", str(wide.value)).group(1))
    side = int(re.search(r"the largest square image that fits is (\d+)x\1", str(info.value)).group(1))
    assert 500 < side < 560  # the VAE's decode on a CPU: 224 bytes a pixel against 64 MiB
    assert 0.65 < side32 / side < 0.75
    plan = diffusion_plan(str(tiny_folder), budget, workload=Workload(side, side), compute="bf16")
    assert plan.budget["cpu"] - plan.reserve_bytes >= plan.tier_bytes()["cpu"]
    with pytest.raises(UserError, match=f"the largest square image that fits is {side}x{side}"):
        diffusion_plan(str(tiny_folder), budget, workload=Workload(side + 16, side + 16), compute="bf16")
    # a batch: the same room for fewer pixels, and the message says fewer prompts would do too
    with pytest.raises(UserError, match="or fewer prompts per file"):
        diffusion_plan(str(tiny_folder), budget, workload=Workload(side, side, batch=2), compute="bf16")


def test_a_size_that_leaves_the_weights_little_room_is_warned(native_bf16):
    from helpers.activations import Workload
    from helpers.diffuse import diffusion_plan

    # the VAE's decode on a CPU: 115.72 MiB at 736x736 in bf16 math, leaving 12.28 MiB of 128 MiB for
    # the tiny twin's 11 MiB of weights; 57.86 MiB at 368x368 in float32 math (the largest that fits 64 MiB)
    near = diffusion_plan("tiny", "cpu=128MiB,disk=100%", workload=Workload(736, 736), compute="bf16")
    assert len(near.warnings) == 1 and "leaving 12.28 MiB for weights: they fit" in near.warnings[0]
    edge = diffusion_plan("tiny", "cpu=64MiB,disk=100%", workload=Workload(368, 368), compute="fp32")
    assert len(edge.warnings) == 1 and "leaving 6.14 MiB for weights" in edge.warnings[0]
    assert "are fetched from a slower tier every step" in edge.warnings[0]
    assert not diffusion_plan("tiny", "cpu=64MiB,disk=100%", workload=Workload(256, 256), compute="bf16").warnings


def test_too_many_prompts_at_once_are_refused_naming_how_many_fit():
    import re

    from helpers.activations import Workload
    from helpers.encode import text_encoding_plan

    with pytest.raises(UserError, match=r"the activations of 8 prompts of 512 tokens \(the T5 encoder\) alone") as info:
        text_encoding_plan("tiny", "cpu=64MiB,disk=100%", workload=Workload(batch=8, tokens=512))
    most = int(re.search(r"at most (\d+) prompt", str(info.value)).group(1))
    assert 1 <= most < 8
    text_encoding_plan("tiny", "cpu=64MiB,disk=100%", workload=Workload(batch=most, tokens=512))
    with pytest.raises(UserError):
        text_encoding_plan("tiny", "cpu=64MiB,disk=100%", workload=Workload(batch=most + 1, tokens=512))


def test_activations_beyond_this_machine_are_refused_even_under_a_share():
    """A share has no size of its own: the machine's memory is the limit the activations meet."""
    import psutil

    from helpers.activations import Workload
    from helpers.diffuse import diffusion_plan

    side = int((psutil.virtual_memory().total / 160) ** 0.5 * 1.5) // 16 * 16  # 160 bytes a pixel: 2.25x the RAM
    with pytest.raises(UserError, match="more than this machine's CPU RAM"):
        diffusion_plan("tiny", "cpu=50%,disk=100%", workload=Workload(side, side))


def test_footprint_json_reports_the_activations_of_the_chosen_size():
    from helpers.activations import Workload
    from helpers.footprint import footprint
    from helpers.planner import plan_stages, report

    fp = footprint("tiny")
    data = report(fp, plan_stages(fp, "cpu=50%,disk=100%", workload=Workload(256, 256, tokens=64)))
    assert data["activations"]["workload"] == {"height": 256, "width": 256, "batch": 1, "tokens": 64}
    assert set(data["activations"]["bytes"]) == {"text_encoder_2", "transformer", "vae"}
    assert data["plan"]["diffusion"]["activations"]["reserve_bytes"] == {"cpu": max(
        data["activations"]["bytes"]["transformer"], data["activations"]["bytes"]["vae"])}


@pytest.mark.parametrize("budget", [pytest.param({0: "8.5GiB", "cpu": "30GiB"}, id="method", marks=pytest.mark.slow),
                                    pytest.param({0: "5.5GiB", "cpu": "30GiB"}, id="8 GB GPU", marks=pytest.mark.slow),
                                    pytest.param({"cpu": "8.5GiB", "disk": "30GiB"}, id="one tier down",
                                                 marks=pytest.mark.slow)])
def test_the_twin_splits_like_the_real_model_with_the_activations_room_too(budget):
    """Up to the edge: at the largest size the CPU budget runs, the reference keeps little more than
    its VAE and the transformer's modules outside the blocks; the twin must keep the same."""
    from helpers.activations import Workload
    from helpers.families import STAGES
    from helpers.footprint import footprint
    from helpers.planner import plan_stages

    dev, tiny = footprint("flux-dev"), footprint("tiny")
    for work in (Workload(64, 64, tokens=16), Workload(1024, 1024, batch=2), Workload(2288, 2288)):
        real, twin = plan_stages(dev, budget, workload=work), plan_stages(tiny, budget, like=dev, workload=work)
        for stage in STAGES:
            assert twin[stage].fits == real[stage].fits, (stage, work)
            for a, b in zip(real[stage].components, twin[stage].components):
                assert [u.tier for u in a.units] == [u.tier for u in b.units], (stage, work, a.component)


@pytest.mark.parametrize("model", ["tiny", pytest.param("flux-dev", marks=pytest.mark.slow)])
def test_two_blocks_of_each_list_have_the_peak_of_all_of_them(model):
    """What makes a count quick: from the second block of a list on the blocks are alike."""
    from helpers.activations import activation_peak, example_inputs, forward_peak
    from helpers.footprint import footprint

    fp = footprint(model, components=("text_encoder_2", "transformer"))
    for component, dtype, size in (("transformer", torch.bfloat16, (256, 256, 64)),
                                   ("transformer", torch.bfloat16, (1024, 1024, 512)),
                                   ("text_encoder_2", torch.float32, (0, 0, 77)),
                                   ("text_encoder_2", torch.float32, (0, 0, 512))):
        module = fp.skeletons[component]
        for t in (*module.parameters(), *module.buffers()):
            t.data = t.data.to(dtype)
        whole = activation_peak(*example_inputs(component, module, dtype, *size))
        assert forward_peak(component, module, dtype, *size) == whole > 0, component
        assert len(list(module.modules())) > 100  # the skeleton has all its blocks again
