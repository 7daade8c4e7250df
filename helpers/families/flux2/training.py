"""Training ``klein-tiny`` on the shapes world, on a CPU, seeded: ``python -m helpers train-twin --twin klein-tiny``.

The FLUX.1 twin's recipe (:mod:`helpers.twins.training`) in FLUX.2 [klein]'s terms, three phases on
pictures rendered as they go:

1. the VAE (``AutoencoderKLFlux2``) learns to encode and decode the world's pictures, its loss weighing
   a shape's edge five times; then the statistics of its latents, in 2x2 patches of 128 channels, are
   measured into its ``bn`` layer's running mean and variance, which ``Flux2KleinPipeline`` undoes
   before decoding (FLUX.2's form of FLUX.1's scale and shift);
2. the text path keeps its seeded weights (as the FLUX.1 twin's T5 does): every caption is encoded
   once, as stage 1 encodes it (the chat template, 512 tokens, hidden states 9, 18 and 27, in bfloat16
   as the twin stores it), its words one token each (the twin's tokenizer holds them whole);
3. the transformer learns rectified flow on the normalised latents (predict noise minus image), with
   the pipeline's own position ids for text and image, noise levels leaning to the top as FLUX.1's did.

The held-out colour pairs are never shown. The result is one safetensors file of bfloat16 weights
(transformer and VAE, the VAE's ``bn`` statistics included) with a summary of the run in its
metadata, which the twin's builder reads (``KleinTwinSpec.trained``).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from helpers.errors import UserError
from helpers.files import atomic_path, check_can_write
from helpers.twins import world
from helpers.twins.training import TrainConfig, bf16_round, edges, images, lr_at, noise_level

#: klein-tiny's recipe: FLUX.1's settings where they apply (no CLIP steps: its text path is not trained)
KLEIN_TRAIN = TrainConfig(vae_steps=1200, flow_steps=1600, flow_batch=8, clip_steps=0)
#: the parts whose weights the file holds (the text path keeps its seeded ones)
TRAINED_COMPONENTS = ("transformer", "vae")
TOKENS = 512
SIZE = 64


def _patchify(latents: torch.Tensor) -> torch.Tensor:
    """``[b, c, h, w]`` -> ``[b, 4c, h/2, w/2]``, as ``Flux2KleinPipeline`` groups latents in 2x2 patches."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._patchify_latents(latents)


def _train_vae(vae, config: TrainConfig, rng: random.Random, scenes: list, wrap, summary: dict, log) -> None:
    """Phase 1: reconstruction with the edges weighed up (or the VAE of an earlier file, ``vae_from``),
    then the patched latents' statistics into ``vae.bn``: each channel's mean, and one variance for all
    (as FLUX.1's one scale: a channel the VAE barely uses stays small instead of weighing as much as the
    colours and the layout in the transformer's loss)."""
    if config.vae_from:
        from safetensors.torch import load_file

        earlier = {k[4:]: v.float() for k, v in load_file(config.vae_from).items()
                   if k.startswith("vae.") and v.is_floating_point() and not k.startswith("vae.bn.")}
        wanted = {k: v.shape for k, v in vae.state_dict().items() if v.is_floating_point() and not k.startswith("bn.")}
        if {k: v.shape for k, v in earlier.items()} != wanted:
            raise UserError(f"{config.vae_from} does not hold klein-tiny's VAE (its vae.* tensors differ in names or "
                            "shapes): give a file that train-twin --twin klein-tiny wrote.")
        vae.load_state_dict(earlier, strict=False)
        summary["vae_from"] = Path(config.vae_from).name
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    losses = []
    for step in wrap(range(0 if config.vae_from else config.vae_steps), desc="1/3 VAE"):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config.vae_steps, config.vae_lr, config.warmup)
        x = images(rng.choices(scenes, k=config.vae_batch), SIZE, rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean + 0.1 * posterior.std * torch.randn_like(posterior.mean)).sample
        weight = 1 + config.vae_edge_weight * edges(x)
        loss = ((recon - x) ** 2 * weight).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    vae.eval()
    with torch.no_grad():  # in bfloat16, as the twin stores it: the statistics the pipeline will undo
        stored = {k: v.to(torch.bfloat16).float() for k, v in vae.state_dict().items() if v.is_floating_point()}
        vae.load_state_dict(stored, strict=False)
        stats = random.Random(config.seed + 1)  # its own draws: the same whether the VAE trained here or not
        z = torch.cat([_patchify(vae.encode(images(stats.choices(scenes, k=32), SIZE, stats)).latent_dist.mean)
                       for _ in range(8)])
        mean = z.mean((0, 2, 3))
        vae.bn.running_mean.copy_(mean)
        vae.bn.running_var.fill_(float((z - mean.view(1, -1, 1, 1)).var()))
    summary["vae_loss"] = float(np.mean(losses[-50:])) if losses else None
    log(f"VAE: reconstruction loss {summary['vae_loss']}, latent std {float(z.std()):.3f}")


def _zero_modulation(transformer) -> None:
    """adaLN-Zero: the shared modulations and the output layer start at zero, so every block starts as
    the identity (FLUX.2's linear layers have no bias)."""
    with torch.no_grad():
        for name in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
            getattr(transformer, name).linear.weight.zero_()
        transformer.norm_out.linear.weight.zero_()
        transformer.proj_out.weight.zero_()


def _encode_captions(parts: dict, captions: list[str], wrap) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 2: every caption as stage 1 hands it over (the text path in bfloat16, the file's bfloat16)."""
    from diffusers import Flux2KleinPipeline

    from helpers.families.flux2 import HIDDEN_STATES

    body = parts["text_encoder"].model.to(torch.bfloat16)
    pipe = Flux2KleinPipeline(scheduler=None, vae=None, transformer=None, text_encoder=body,
                              tokenizer=parts["tokenizer"])
    chunks = []
    with torch.no_grad():
        for i in wrap(range(0, len(captions), 32), desc="2/3 text path, 512 tokens"):
            embeds, _ = pipe.encode_prompt(captions[i:i + 32], device="cpu", max_sequence_length=TOKENS,
                                           text_encoder_out_layers=HIDDEN_STATES)
            chunks.append(embeds.to(torch.bfloat16))
    embeds = torch.cat(chunks)
    return embeds, Flux2KleinPipeline._prepare_text_ids(embeds[:1])


def _schedule(scheduler, steps: int, image_tokens: int) -> list[float]:
    """The sigmas ``Flux2KleinPipeline``'s sampler visits with ``steps`` steps at ``image_tokens`` tokens."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                            mu=compute_empirical_mu(image_seq_len=image_tokens, num_steps=steps))
    return [float(s) for s in scheduler.sigmas[:-1]]


def _train_flow(parts: dict, embeds: torch.Tensor, text_ids: torch.Tensor, config: TrainConfig, rng: random.Random,
                scenes: list, wrap, summary: dict, log) -> None:
    """Phase 3: rectified flow on the VAE's normalised latents, the captions' embeddings as the text."""
    from diffusers import Flux2KleinPipeline

    vae, transformer = parts["vae"], parts["transformer"]
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    _zero_modulation(transformer)
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=config.flow_lr, weight_decay=0.0)
    side = SIZE // 16
    image_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 1, side, side))
    schedule = _schedule(parts["scheduler"], 4, side * side)
    losses = []
    for step in wrap(range(config.flow_steps), desc="3/3 transformer"):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config.flow_steps, config.flow_lr, config.warmup)
        rows = [rng.randrange(len(scenes)) for _ in range(config.flow_batch)]
        with torch.no_grad():
            z = _patchify(vae.encode(images([scenes[r] for r in rows], SIZE, rng)).latent_dist.mean)
            x0 = Flux2KleinPipeline._pack_latents((z - mean) / std)
        sigma = torch.tensor([noise_level(rng, schedule, config) for _ in rows])
        noise = torch.randn_like(x0)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        n = len(rows)
        pred = transformer(hidden_states=bf16_round(xt), encoder_hidden_states=embeds[rows].float(), timestep=sigma,
                           img_ids=image_ids.expand(n, -1, -1), txt_ids=text_ids.expand(n, -1, -1),
                           return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 250 == 0:
            log(f"step {step}: flow loss {np.mean(losses[-50:]):.4f}")
    transformer.eval()
    summary["flow_loss"] = float(np.mean(losses[-100:]))


def train_klein(out: str | os.PathLike, config: TrainConfig = KLEIN_TRAIN, progress=None, log=print,
                overwrite: bool = False) -> dict:
    """Train ``klein-tiny`` and write its weights file (atomically) to ``out``; returns the summary."""
    from safetensors.torch import save_file

    from helpers.families.flux2.twin import TWINS

    out = Path(out)
    check_can_write(out, overwrite)  # before any work
    wrap = progress or (lambda it, **kw: it)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    scenes = world.scenes(held_out=False)[:config.max_scenes]
    parts = TWINS["klein-tiny"].modules(trained=False)
    summary: dict = {"config": asdict(config), "scenes": len(scenes), "torch": torch.__version__,
                     "held_out_pairs": [list(p) for p in world.HELD_OUT], "threads": torch.get_num_threads()}
    start = time.perf_counter()
    _train_vae(parts["vae"], config, rng, scenes, wrap, summary, log)
    embeds, text_ids = _encode_captions(parts, [s.caption for s in scenes], wrap)
    torch.manual_seed(config.seed + 2)  # the transformer's phase on its own draws: a VAE from an earlier file
    flow = random.Random(config.seed + 2)  # (--vae-from) gives the same weights as one trained here
    _train_flow(parts, embeds, text_ids, config, flow, scenes, wrap, summary, log)
    summary["seconds"] = round(time.perf_counter() - start, 1)

    tensors = {f"{c}.{name}": (t.detach().to(torch.bfloat16) if t.is_floating_point() else t.detach()).contiguous()
               for c in TRAINED_COMPONENTS for name, t in parts[c].state_dict().items()}
    metadata = {"format": "pt", "twin": "klein-tiny",
                "summary": json.dumps({k: v for k, v in summary.items() if not k.endswith("seconds")}, sort_keys=True)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    summary["file"] = str(out)
    summary["megabytes"] = round(out.stat().st_size / 1e6, 2)
    return summary
