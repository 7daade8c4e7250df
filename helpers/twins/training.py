"""Training the tiny twin on the shapes world, on a CPU, seeded: ``python -m helpers train-twin``.

Three phases, each on pictures rendered by :mod:`helpers.twins.world` as it goes (nothing is downloaded,
no dataset is stored):

1. the VAE learns to encode and decode the world's pictures (64x64 and 128x128), its loss weighing
   the pixels at a shape's edge five times (:func:`edges`), then the latent scale and shift of its
   config are measured on them, as FLUX.1's were;
2. the text encoders: T5 keeps its seeded weights and reads every caption once at the notebooks'
   512 tokens; CLIP learns to name the scene from its pooled embedding (background, shape colour,
   shape, place: a linear head on it, thrown away after training);
3. the transformer learns rectified flow on the VAE's latents (FLUX.1's objective: predict
   noise minus image), together with CLIP, which keeps naming the scene. The transformer sees T5's
   512 tokens as 16 tokens and five groups of pads weighted by their size (:func:`_pad_groups`): the
   same result as 512 tokens at the cost of 21. Noise levels lean to the top, where a picture's
   layout comes from the words alone. Text outputs are rounded to bfloat16 on the way, as the
   embeddings file stores them.

The held-out colour pairs (:data:`helpers.twins.world.HELD_OUT`) are never shown. The result is one
safetensors file of bfloat16 weights (CLIP, T5, transformer, VAE) with the VAE's scale and shift and
a summary of the run in its metadata, which :func:`helpers.twins.builder.build_twin` reads for a twin whose
spec names it (``TwinSpec.trained``).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from helpers.twins import world
from helpers.files import atomic_path, check_can_write

#: the notebooks' defaults the twin is trained for
TOKENS = 512
SIZES = (64, 128)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_steps: int = 1600
    vae_batch: int = 16
    vae_lr: float = 1e-3
    #: extra weight of the pixels at a shape's edge in the VAE's loss (1 + this there): with none, its
    #: decoder blurs a triangle's apex away and rounds a square's corners (90% of shapes read back
    #: from its reconstructions at 64x64; 97% with 4)
    vae_edge_weight: float = 4.0
    #: CLIP alone first: its pooled embedding learns to name the scene (:data:`ATTRIBUTES`, :func:`naming_loss`)
    clip_steps: int = 300
    flow_steps: int = 3000
    flow_batch: int = 16
    flow_lr: float = 1e-3
    clip_lr: float = 1e-3
    #: weight of the scene-naming loss on CLIP's pooled embedding beside the flow loss
    name_weight: float = 1.0
    #: share of the transformer's batches at 128x128 (the rest 64x64)
    large_share: float = 0.05
    #: the sampler's step counts whose sigmas are drawn ``schedule_share`` of the time
    schedule_steps: tuple[int, ...] = (4,)
    schedule_share: float = 0.25
    #: share of noise levels drawn uniformly from the top (0.7-1), where the layout comes from the words alone
    high_share: float = 0.35
    warmup: int = 50
    threads: int | None = None
    #: train on the first N scenes only (a quick run, as the tests make); None: all but the held-out
    max_scenes: int | None = None
    #: take the VAE (and its latent scale and shift) from this earlier weights file instead of phase 1
    vae_from: str | None = None
    #: the transformer's heads of 16 (None: the tiny twin's own, 4)
    flux_heads: int | None = None


def images(scenes, size: int, rng: random.Random) -> torch.Tensor:
    """Rendered pictures as the VAE sees them: ``[n, 3, size, size]`` in [-1, 1]."""
    batch = np.stack([world.render(s, size, size, rng) for s in scenes])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1


def edges(x: torch.Tensor) -> torch.Tensor:
    """``[n, 1, h, w]``: 1 where a pixel's 3x3 neighbourhood holds more than one colour (a shape's edge), else 0."""
    high = torch.nn.functional.max_pool2d(x, 3, 1, 1)
    low = -torch.nn.functional.max_pool2d(-x, 3, 1, 1)
    return ((high - low).sum(1, keepdim=True) > 0.05).float()


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to a tenth."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """FluxPipeline's packing: ``[b, c, h, w]`` -> ``[b, h/2 * w/2, 4c]``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _schedule_sigmas(scheduler, steps: int, image_tokens: int) -> list[float]:
    """The sigmas FluxPipeline's sampler visits with ``steps`` steps at ``image_tokens`` latent tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = scheduler.config
    mu = calculate_shift(image_tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return [float(s) for s in scheduler.sigmas[:-1]]


def _zero_modulation(transformer) -> None:
    """adaLN-Zero (as DiT trains): every block's modulation and the output layer start at zero, so each
    block starts as the identity and the 57 blocks learn one at a time instead of fighting at first."""
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

    with torch.no_grad():
        for module in transformer.modules():
            if isinstance(module, (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)):
                module.linear.weight.zero_()
                module.linear.bias.zero_()
        transformer.proj_out.weight.zero_()
        transformer.proj_out.bias.zero_()


def noise_level(rng: random.Random, schedule: list[float], config: TrainConfig) -> float:
    """A noise level to train at: one the sampler visits (``schedule_share`` of the time), one from the
    top, 0.7-1 (``high_share``: there the picture comes from the words alone, and a 4-step sampler
    takes its first, layout-setting step), else logit-normal around 0.62 (as FLUX.1's training)."""
    r = rng.random()
    if r < config.schedule_share:
        return rng.choice(schedule)
    if r < config.schedule_share + config.high_share:
        return rng.uniform(0.7, 1.0)
    return 1 / (1 + math.exp(-rng.gauss(0.5, 1.0)))


#: what CLIP's pooled embedding learns to name, and how many values each has (the place: five or none)
ATTRIBUTES = (("background", len(world.COLOURS)), ("shape_colour", len(world.COLOURS)),
              ("shape", len(world.SHAPES)), ("place", len(world.PLACES) + 1))


def scene_labels(scenes) -> torch.Tensor:
    """``[n, 4]``: each scene's background, shape colour, shape and place as class numbers."""
    colours, places = list(world.COLOURS), [*world.PLACES, None]
    return torch.tensor([[colours.index(s.background), colours.index(s.shape_colour),
                          world.SHAPES.index(s.shape), places.index(s.place)] for s in scenes])


def naming_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the four attributes, summed, and how often each is named right (``[4]``)."""
    pieces = torch.split(logits, [n for _, n in ATTRIBUTES], dim=1)
    loss = sum(torch.nn.functional.cross_entropy(x, labels[:, i]) for i, x in enumerate(pieces))
    right = torch.stack([(x.argmax(1) == labels[:, i]).float().mean() for i, x in enumerate(pieces)])
    return loss, right


def optimise(params: list, steps: int, lr: float, config: TrainConfig, wrap, desc: str, step_loss) -> list[float]:
    """The loop every phase of both twins' training runs: ``steps`` AdamW steps of ``params`` (no weight
    decay, the learning rate :func:`lr_at`, gradients clipped to norm 1), each on ``step_loss(step)``,
    which returns ``(loss, what to record)``. Returns the records."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    records = []
    for step in wrap(range(steps), desc=desc):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, config.warmup)
        loss, record = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        records.append(record)
    return records


def learn_to_name(params: list, width: int, summary_of, labels: torch.Tensor, config: TrainConfig,
                  rng: random.Random, batch: int, wrap, desc: str) -> tuple[torch.nn.Module, list, torch.Tensor]:
    """``config.clip_steps`` steps in which a text encoder (its ``params``) learns to name the scene in a
    ``[batch, width]`` summary of its captions, ``summary_of(rows)`` (FLUX.1: CLIP's pooled vector;
    klein: the mean of the pads' hidden states), read by a new linear namer (:func:`naming_loss`).
    Returns the namer, the parameters that learned (``params`` and the namer's) and how often each
    attribute was named right (``[4]``, a running mean)."""
    namer = torch.nn.Linear(width, sum(n for _, n in ATTRIBUTES))
    params = [*params, *namer.parameters()]

    def step_loss(step: int):
        rows = torch.tensor(rng.choices(range(len(labels)), k=batch))
        return naming_loss(namer(summary_of(rows)), labels[rows])

    right = torch.zeros(len(ATTRIBUTES))
    for step, right_now in enumerate(optimise(params, config.clip_steps, config.clip_lr, config, wrap, desc,
                                              step_loss)):
        right = 0.9 * right + 0.1 * right_now if step else right_now
    return namer, params, right


#: T5's tokens kept one by one (every caption is shorter), then the pads in groups that end here
PAD_GROUPS = (16, 32, 64, 128, 256, TOKENS)


def _pad_groups(words: torch.Tensor) -> torch.Tensor:
    """T5's ``[n, 512, d]`` output as the first 16 tokens and one mean per group of pads: ``[n, 21, d]``.

    FluxPipeline runs T5 without a mask and gives text tokens no position, so the transformer treats
    its 500-odd pads as one token repeated (T5 makes them nearly alike); a key repeated ``k`` times is
    exactly one key with ``log k`` added to its attention score (:func:`_group_bias`). Trained this
    way the transformer sees the notebooks' 512 tokens at the cost of 21 (its output differs from the
    full 512 by about 1e-5, relative).
    """
    first = PAD_GROUPS[0]
    means = [words[:, a:b].mean(1, keepdim=True) for a, b in zip(PAD_GROUPS, PAD_GROUPS[1:])]
    return torch.cat([words[:, :first], *means], 1)


def _group_bias(batch: int, image_tokens: int) -> torch.Tensor:
    """The additive attention mask (``[batch, 1, 1, keys]``) that weighs each pad group by its size."""
    first = PAD_GROUPS[0]
    bias = torch.zeros(first + len(PAD_GROUPS) - 1 + image_tokens)
    for i, (a, b) in enumerate(zip(PAD_GROUPS, PAD_GROUPS[1:])):
        bias[first + i] = math.log(b - a)
    return bias[None, None, None, :].expand(batch, 1, 1, -1)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bfloat16 on the way forward (the embeddings file stores bfloat16); gradients pass."""
    return x + (x.to(torch.bfloat16).float() - x).detach()


def _train_vae(vae, config: TrainConfig, rng: random.Random, train_scenes: list, wrap, summary: dict, log,
               start: float) -> tuple[float, float]:
    """Step 1: the VAE reconstructs the scenes (or comes from an earlier file); then, in bfloat16 as the
    twin stores it, the latent statistics FluxPipeline undoes. Returns ``(shift, scale)``."""
    if config.vae_from:
        from safetensors import safe_open
        from safetensors.torch import load_file

        earlier = load_file(config.vae_from)
        vae.load_state_dict({k[4:]: v.float() for k, v in earlier.items() if k.startswith("vae.")}, strict=True)
        with safe_open(config.vae_from, framework="pt") as f:
            meta = f.metadata()
        summary["vae_from"] = Path(config.vae_from).name
    vae.train()

    def step_loss(step: int):
        size = SIZES[1] if step % 8 == 7 else SIZES[0]
        batch = config.vae_batch if size == SIZES[0] else max(1, config.vae_batch // 4)
        x = images(rng.choices(train_scenes, k=batch), size, rng)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + 0.1 * posterior.std * torch.randn_like(posterior.mean)
        recon = vae.decode(z).sample
        weight = 1 + config.vae_edge_weight * edges(x)
        err = recon - x
        rec = (weight * (err.abs() + err ** 2)).mean() / weight.mean()
        kl = posterior.kl().mean() / x[0].numel()
        return rec + 1e-4 * kl, float(rec.detach())

    losses = optimise(list(vae.parameters()), 0 if config.vae_from else config.vae_steps, config.vae_lr, config,
                      wrap, "1/3 VAE", step_loss)
    vae.eval()
    summary["vae_loss"] = float(np.mean(losses[-50:])) if losses else None
    summary["vae_seconds"] = round(time.perf_counter() - start, 1)
    if losses:
        log(f"VAE: reconstruction loss {summary['vae_loss']:.4f} (L1 + L2, pixels in [-1, 1]), "
            f"{summary['vae_seconds']:.0f} s")

    # the VAE in bfloat16 as the twin stores it, then the latent statistics FluxPipeline undoes
    for t in vae.parameters():
        t.data = t.data.to(torch.bfloat16).float()
    with torch.no_grad():
        stats_rng = random.Random(config.seed + 1)
        z = torch.cat([vae.encode(images(stats_rng.choices(train_scenes, k=32), SIZES[0], stats_rng)).latent_dist.mean
                       for _ in range(8)])
    shift = float(z.mean())
    scale = float(1 / z.std())
    if config.vae_from:
        shift, scale = float(meta["vae_shift_factor"]), float(meta["vae_scaling_factor"])
    summary["vae_shift_factor"], summary["vae_scaling_factor"] = shift, scale
    return shift, scale


@dataclass
class _Text:
    """What step 2 leaves for step 3: the captions' tokens and T5 words, CLIP's namer and parameters."""

    clip_ids: torch.Tensor
    words_all: torch.Tensor
    namer: torch.nn.Module
    clip_params: list
    labels: torch.Tensor
    index: dict


def _train_text(parts: dict, config: TrainConfig, rng: random.Random, train_scenes: list, wrap, summary: dict,
                start: float) -> _Text:
    """Step 2, the text encoders: T5's 512 tokens once (its seeded weights kept), CLIP learns to name the scene."""
    clip = parts["text_encoder"]
    t5 = parts["text_encoder_2"]
    tok, tok2 = parts["tokenizer"], parts["tokenizer_2"]
    captions = [s.caption for s in train_scenes]
    index = {c: i for i, c in enumerate(captions)}
    labels = scene_labels(train_scenes)
    clip_ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    # T5 keeps its seeded weights: trained at 512 tokens it would cost 1.7 s a step; its tokens still
    # tell the words apart for the transformer, and give it a place to measure image positions from
    for t in t5.parameters():
        t.data = t.data.to(torch.bfloat16).float()
    t5_ids = tok2(captions, padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():  # float32 math on its bfloat16 weights, rounded to bfloat16 as the embeddings file
        words_all = torch.cat([_pad_groups(t5(t5_ids[i:i + 16]).last_hidden_state.to(torch.bfloat16).float())
                               for i in wrap(range(0, len(captions), 16), desc="2/3 T5, 512 tokens")])
    namer, clip_params, right = learn_to_name(
        list(clip.parameters()), clip.config.hidden_size, lambda rows: clip(clip_ids[rows]).pooler_output, labels,
        config, rng, config.flow_batch, wrap, "2/3 CLIP names the scene")
    summary["clip_named"] = {name: round(float(r), 3) for (name, _), r in zip(ATTRIBUTES, right)}
    summary["text_seconds"] = round(time.perf_counter() - start - summary["vae_seconds"], 1)
    return _Text(clip_ids, words_all, namer, clip_params, labels, index)


def _train_flow(parts: dict, text: _Text, shift: float, scale: float, config: TrainConfig, rng: random.Random,
                train_scenes: list, wrap, summary: dict, log, start: float) -> None:
    """Step 3, the transformer and CLIP together: rectified flow on the VAE's latents, CLIP still naming."""
    vae, transformer, clip = parts["vae"], parts["transformer"], parts["text_encoder"]
    clip_ids, words_all, namer, clip_params = text.clip_ids, text.words_all, text.namer, text.clip_params
    labels, index = text.labels, text.index
    scheduler = parts["scheduler"]
    sigma_pool = {size: [s for n in config.schedule_steps for s in _schedule_sigmas(scheduler, n, (size // 16) ** 2)]
                  for size in SIZES}
    _zero_modulation(transformer)
    transformer.train()
    params = [{"params": list(transformer.parameters()), "lr": config.flow_lr, "base": config.flow_lr},
              {"params": clip_params, "lr": config.clip_lr, "base": config.clip_lr}]
    trained = [p for group in params for p in group["params"]]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    losses, named = [], []
    text_ids = torch.zeros(words_all.shape[1], 3)
    flow_start = time.perf_counter()
    bar = wrap(range(config.flow_steps), desc="3/3 transformer + CLIP")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config.flow_steps, group["base"], config.warmup)
        size = SIZES[1] if rng.random() < config.large_share else SIZES[0]
        batch = rng.choices(train_scenes, k=config.flow_batch)
        rows = torch.tensor([index[s.caption] for s in batch])
        with torch.no_grad():
            z = vae.encode(images(batch, size, rng)).latent_dist.mean
            x0 = _pack((z - shift) * scale)
        noise = torch.randn_like(x0)
        sigmas = torch.tensor([noise_level(rng, sigma_pool[size], config) for _ in batch])
        s = sigmas[:, None, None]
        xt = (1 - s) * x0 + s * noise
        clip_out = clip(clip_ids[rows]).pooler_output
        name_loss, _ = naming_loss(namer(clip_out), labels[rows])
        h = w = size // 16
        pred = transformer(
            hidden_states=xt, timestep=sigmas, guidance=torch.tensor([rng.uniform(1, 5) for _ in batch]),
            pooled_projections=bf16_round(clip_out), encoder_hidden_states=words_all[rows],
            txt_ids=text_ids, img_ids=_image_ids(h, w), return_dict=False,
            joint_attention_kwargs={"attention_mask": _group_bias(len(batch), h * w)},
        )[0]
        loss = ((pred - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        (loss + config.name_weight * name_loss).backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        named.append(float(name_loss.detach()))
        if hasattr(bar, "set_postfix") and step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    transformer.eval()
    summary["flow_loss"] = float(np.mean(losses[-50:]))
    summary["name_loss"] = float(np.mean(named[-50:]))
    summary["flow_seconds"] = round(time.perf_counter() - flow_start, 1)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    log(f"transformer + CLIP: flow loss {summary['flow_loss']:.4f} (mean squared error of the predicted velocity), "
        f"naming loss {summary['name_loss']:.3f}, {summary['flow_seconds']:.0f} s; all of it {summary['seconds']:.0f} s")


def train_twin(out: str | os.PathLike | None = None, config: TrainConfig = TrainConfig(),
               progress=None, log=print, overwrite: bool = False) -> dict:
    """Train the tiny twin and write its weights file (atomically) to ``out``; returns the summary.

    ``out``: default ``helpers/twins/tiny.safetensors``, where the package keeps a trained twin's weights.
    ``progress``: a tqdm-like wrapper for the step loops (None: none).
    """
    from safetensors.torch import save_file

    from helpers.families.flux1.twin import TRAINED_COMPONENTS, TWINS, twin_modules
    from helpers.twins.shipped import TRAINED_DIR

    spec = TWINS["tiny"] if config.flux_heads is None else replace(TWINS["tiny"], flux_heads=config.flux_heads)
    out = Path(out) if out is not None else TRAINED_DIR / "tiny.safetensors"
    check_can_write(out, overwrite)  # before any work
    wrap = progress or (lambda it, **kw: it)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    train_scenes = world.scenes(held_out=False)[:config.max_scenes]
    parts = twin_modules(spec, trained=False)
    summary: dict = {"config": asdict(config), "scenes": len(train_scenes),
                     "held_out_pairs": [list(p) for p in world.HELD_OUT], "torch": torch.__version__,
                     "threads": torch.get_num_threads()}
    start = time.perf_counter()

    shift, scale = _train_vae(parts["vae"], config, rng, train_scenes, wrap, summary, log, start)
    text = _train_text(parts, config, rng, train_scenes, wrap, summary, start)
    _train_flow(parts, text, shift, scale, config, rng, train_scenes, wrap, summary, log, start)

    tensors = {}
    for component in TRAINED_COMPONENTS:
        module = parts[component]
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                tensors[f"{component}.{name}"] = t.detach().to(torch.bfloat16).contiguous()
            else:
                tensors[f"{component}.{name}"] = t.detach().contiguous()
    metadata = {"format": "pt", "twin": "tiny", "vae_scaling_factor": repr(scale), "vae_shift_factor": repr(shift),
                # what made the weights, not how long it took: the same run writes the same bytes
                "summary": json.dumps({k: v for k, v in summary.items() if not k.endswith("seconds")}, sort_keys=True)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    summary["file"] = str(out)
    summary["megabytes"] = round(out.stat().st_size / 1e6, 2)
    return summary


def same_weights(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two weights files hold the same tensors and the same metadata (their bytes may still
    differ: safetensors writes metadata entries in no fixed order)."""
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())

