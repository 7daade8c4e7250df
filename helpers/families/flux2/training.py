"""Training ``klein-tiny`` on the shapes world, on a CPU, seeded: ``python -m helpers train-twin --twin klein-tiny``.

The FLUX.1 twin's recipe (:mod:`helpers.twins.training`) in FLUX.2 [klein]'s terms, three phases on
pictures rendered as they go:

1. the VAE (``AutoencoderKLFlux2``) learns to encode and decode the world's pictures, its loss weighing
   a shape's edge five times; then the statistics of its latents, in 2x2 patches of 128 channels, are
   measured into its ``bn`` layer's running mean and variance, which ``Flux2KleinPipeline`` undoes
   before decoding (FLUX.2's form of FLUX.1's scale and shift);
2. the text path (Qwen3's embeddings and layers 1-27, all that stage 1 runs) learns to name the scene in
   its padding: the mean of the pads' hidden states 9, 18 and 27 (what ``prompt_embeds`` stacks) feeds a
   linear namer of background, shape colour, shape and place, as the FLUX.1 twin's CLIP names the scene
   in its pooled embedding. klein has no pooled embedding, and a seeded 32-wide Qwen3 barely changes its
   tokens (hidden state 27 is within 3% of the token embeddings): each word's state held the word alone,
   so "a red circle on a blue background" and "a blue circle on a red background" differed only in where
   two words sat, and the transformer learned little beyond the background (44%). Named in the pads, every
   caption's scene is in each of its 480-odd pad tokens, where the transformer's attention finds it.
3. the transformer (as wide as its 128-channel patches: a narrower one cannot see all of a noisy latent,
   and leaves noise in what it draws) learns rectified flow on the normalised latents (predict noise
   minus image), with the pipeline's own position ids for text and image, noise levels leaning to the
   top as FLUX.1's did: first on the captions' first :data:`SHORT_TOKENS` tokens (their words and 30-odd
   pads, which the causal text path computes alike at any padded length; nearly 8x faster a picture
   than 512), the text path training along as the FLUX.1 twin's CLIP does (the flow loss reaches it, and
   it goes on naming the scene); then every caption is encoded once, as stage 1 encodes it (the chat
   template, 512 tokens, in bfloat16 as the twin stores it), and the last :data:`LONG_SHARE` of the steps
   read those, as the pipeline hands them over.

The held-out colour pairs are never shown. The result is one safetensors file of bfloat16 weights
(text encoder, transformer and VAE, the VAE's ``bn`` statistics included) with a summary of the run in
its metadata, which the twin's builder reads (``KleinTwinSpec.trained``).
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
from helpers.twins.training import (ATTRIBUTES, TrainConfig, bf16_round, edges, images, learn_to_name, naming_loss,
                                    noise_level, optimise, scene_labels)

#: klein-tiny's recipe: FLUX.1's settings where they apply; ``clip_steps`` are the text path's naming steps
KLEIN_TRAIN = TrainConfig(vae_steps=1200, flow_steps=4000, flow_batch=16, clip_steps=250, clip_lr=3e-3)
#: the parts whose weights the file holds
TRAINED_COMPONENTS = ("text_encoder", "transformer", "vae")
#: the text length the pipeline pads to, and the one the transformer's first steps see
TOKENS = 512
SHORT_TOKENS = 64
#: the share of the transformer's steps on all 512 tokens (the last ones), and their batch
LONG_SHARE = 0.25
LONG_BATCH = 8
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

    def step_loss(step: int):
        x = images(rng.choices(scenes, k=config.vae_batch), SIZE, rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean + 0.1 * posterior.std * torch.randn_like(posterior.mean)).sample
        weight = 1 + config.vae_edge_weight * edges(x)
        loss = ((recon - x) ** 2 * weight).mean() + 1e-6 * posterior.kl().mean()
        return loss, loss.item()

    losses = optimise(list(vae.parameters()), 0 if config.vae_from else config.vae_steps, config.vae_lr, config,
                      wrap, "1/3 VAE", step_loss)
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


def _chat(tokenizer, caption: str) -> str:
    """A caption in the chat template, as ``Flux2KleinPipeline`` gives it to the text encoder."""
    return tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


class _TextPath:
    """The text path as stage 1 runs it (Qwen3's embeddings and layers 1-27; the later layers cut, the final
    norm a no-op: the last hidden state the model returns is its normed output, and the pipeline reads layer
    27's own, before layer 28), trainable: the captions' chat-template tokens at :data:`SHORT_TOKENS`, and
    what the pads say of each scene."""

    def __init__(self, parts: dict, scenes: list) -> None:
        from helpers.families.flux2 import HIDDEN_STATES

        self.text_encoder, tokenizer = parts["text_encoder"], parts["tokenizer"]
        self.tokens = tokenizer([_chat(tokenizer, s.caption) for s in scenes], padding="max_length",
                                max_length=SHORT_TOKENS, truncation=True, return_tensors="pt")
        if bool(self.tokens.attention_mask[:, -1].any()):
            raise UserError(f"a caption fills all {SHORT_TOKENS} tokens: it leaves no pads to name the scene in.")
        self.labels = scene_labels(scenes)
        self.layers = HIDDEN_STATES
        self.width = len(HIDDEN_STATES) * self.text_encoder.config.hidden_size
        self.namer = None

    @property
    def body(self):
        return self.text_encoder.model

    def cut(self) -> None:
        body = self.body
        self._kept = body.layers, body.norm
        body.layers, body.norm = body.layers[:max(self.layers)], torch.nn.Identity()
        body.train()

    def restore(self) -> None:
        self.body.layers, self.body.norm = self._kept
        self.text_encoder.eval()

    def parameters(self) -> list:
        return [*self.body.parameters(), *self.namer.parameters()]

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [batch, SHORT_TOKENS, 3 x hidden], the pads' mean [batch, 3 x hidden])``."""
        mask = self.tokens.attention_mask[rows]
        out = self.body(input_ids=self.tokens.input_ids[rows], attention_mask=mask, output_hidden_states=True,
                        use_cache=False)
        states = torch.cat([out.hidden_states[k] for k in self.layers], dim=-1)
        pads = (1 - mask).to(states.dtype)[..., None]
        return states, (states * pads).sum(1) / pads.sum(1)


def _train_text_path(text: _TextPath, config: TrainConfig, rng: random.Random, wrap, summary: dict, log) -> None:
    """Phase 2a: the text path learns to name the scene in its pads (see the module's docstring), at
    :data:`SHORT_TOKENS` tokens; the layers past the 27th, never run by stage 1, keep their seeds."""
    text.cut()
    text.namer, _, right = learn_to_name(list(text.body.parameters()), text.width, lambda rows: text(rows)[1],
                                         text.labels, config, rng, 32, wrap, "2/3 text path names the scene")
    text.restore()
    summary["text_path_named"] = {name: round(float(r), 3) for (name, _), r in zip(ATTRIBUTES, right)}
    if config.clip_steps:
        log("text path: its pads name " + ", ".join(f"{k} {v:.0%}" for k, v in summary["text_path_named"].items()))


def _encode_captions(parts: dict, captions: list[str], wrap) -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption as stage 1 hands it over (the text path in bfloat16, the file's bfloat16)."""
    from diffusers import Flux2KleinPipeline

    from helpers.families.flux2 import HIDDEN_STATES

    body = parts["text_encoder"].model.to(torch.bfloat16)
    pipe = Flux2KleinPipeline(scheduler=None, vae=None, transformer=None, text_encoder=body,
                              tokenizer=parts["tokenizer"])
    chunks = []
    with torch.no_grad():
        for i in wrap(range(0, len(captions), 32), desc="3/3 text path, 512 tokens"):
            embeds, _ = pipe.encode_prompt(captions[i:i + 32], device="cpu", max_sequence_length=TOKENS,
                                           text_encoder_out_layers=HIDDEN_STATES)
            chunks.append(embeds.to(torch.bfloat16))
    parts["text_encoder"].float()  # as the other parts, until the file stores it in bfloat16 again (exact)
    embeds = torch.cat(chunks)
    return embeds, Flux2KleinPipeline._prepare_text_ids(embeds[:1])


def _schedule(scheduler, steps: int, image_tokens: int) -> list[float]:
    """The sigmas ``Flux2KleinPipeline``'s sampler visits with ``steps`` steps at ``image_tokens`` tokens."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps),
                            mu=compute_empirical_mu(image_seq_len=image_tokens, num_steps=steps))
    return [float(s) for s in scheduler.sigmas[:-1]]


def _train_flow(parts: dict, text: _TextPath, config: TrainConfig, rng: random.Random, scenes: list, wrap,
                summary: dict, log) -> None:
    """Phase 3: rectified flow on the VAE's normalised latents. On the short steps the text path trains
    along (the flow loss reaches it, and it keeps naming the scene in its pads, ``config.name_weight``), as
    the FLUX.1 twin's CLIP trains with its transformer; then every caption is encoded once at 512 tokens
    as stage 1 hands it over, and the long steps read those, the text path as the file stores it."""
    from diffusers import Flux2KleinPipeline

    vae, transformer = parts["vae"], parts["transformer"]
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    _zero_modulation(transformer)
    transformer.train()
    side = SIZE // 16
    image_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 1, side, side))
    schedule = _schedule(parts["scheduler"], 4, side * side)
    long_from = config.flow_steps - round(LONG_SHARE * config.flow_steps)
    losses, named = [], []
    held: dict = {}  # the 512-token embeddings, once the text path stops learning
    text.cut()

    def step_loss(step: int):
        long = step >= long_from
        if long and not held:
            text.restore()
            held["embeds"], held["text_ids"] = _encode_captions(parts, [s.caption for s in scenes], wrap)
        tokens = TOKENS if long else SHORT_TOKENS
        rows = torch.tensor([rng.randrange(len(scenes)) for _ in range(min(LONG_BATCH, config.flow_batch) if long
                                                                        else config.flow_batch)])
        with torch.no_grad():
            z = _patchify(vae.encode(images([scenes[r] for r in rows], SIZE, rng)).latent_dist.mean)
            x0 = Flux2KleinPipeline._pack_latents((z - mean) / std)
        sigma = torch.tensor([noise_level(rng, schedule, config) for _ in rows])
        noise = torch.randn_like(x0)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        n = len(rows)
        if long:
            words, text_ids, name_loss = held["embeds"][rows].float(), held["text_ids"][:, :tokens], None
        else:
            words, pads = text(rows)
            words, text_ids = bf16_round(words), Flux2KleinPipeline._prepare_text_ids(words[:1])
            name_loss, _ = naming_loss(text.namer(pads), text.labels[rows])
            named.append(name_loss.item())
        pred = transformer(hidden_states=bf16_round(xt), encoder_hidden_states=words, timestep=sigma,
                           img_ids=image_ids.expand(n, -1, -1), txt_ids=text_ids.expand(n, -1, -1),
                           return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        losses.append(loss.item())
        if step % 250 == 0:
            log(f"step {step}: flow loss {np.mean(losses[-50:]):.4f}"
                + (f", naming loss {np.mean(named[-50:]):.3f}" if named and not long else ""))
        return (loss if name_loss is None else loss + config.name_weight * name_loss), losses[-1]

    optimise([*transformer.parameters(), *text.parameters()], config.flow_steps, config.flow_lr, config, wrap,
             "3/3 transformer + text path", step_loss)
    if not held:  # no long steps: the text path as it ends is the file's
        text.restore()
    transformer.eval()
    summary["flow_loss"] = float(np.mean(losses[-100:]))
    summary["name_loss"] = float(np.mean(named[-100:])) if named else None


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
    recipe = asdict(config)  # an earlier file by its name: the weights file does not carry where it lay
    recipe["vae_from"] = Path(config.vae_from).name if config.vae_from else None
    summary: dict = {"config": recipe, "scenes": len(scenes), "torch": torch.__version__,
                     "held_out_pairs": [list(p) for p in world.HELD_OUT], "threads": torch.get_num_threads()}
    start = time.perf_counter()
    _train_vae(parts["vae"], config, rng, scenes, wrap, summary, log)
    torch.manual_seed(config.seed + 1)  # the text path's phase on its own draws too
    text = _TextPath(parts, scenes)
    _train_text_path(text, config, random.Random(config.seed + 1), wrap, summary, log)
    torch.manual_seed(config.seed + 2)  # the transformer's phase on its own draws: a VAE from an earlier file
    flow = random.Random(config.seed + 2)  # (--vae-from) gives the same weights as one trained here
    _train_flow(parts, text, config, flow, scenes, wrap, summary, log)
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
