"""What several families share: the pieces of a family module that are not any one family's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helpers.errors import UserError


class VaeDecode(torch.nn.Module):
    """A VAE's decode as a forward pass (what a pipeline calls after the last step), for the activation count."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def vae_decode_inputs(vae: torch.nn.Module, dtype: torch.dtype, height: int, width: int,
                      device: torch.device) -> tuple[torch.nn.Module, dict]:
    """``(module, inputs)`` of one decode of a ``height`` x ``width`` image: latents empty on ``device``,
    the VAE's latent channels at its downsampling (2 to the number of levels less one)."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.empty(1, vae.config.latent_channels, height // scale, width // scale, dtype=dtype, device=device)
    return VaeDecode(vae), dict(latents=latents)


# --------------------------------------------------------------------------- BFL key layouts


@dataclass(frozen=True)
class Rows:
    """Rows ``start:stop`` (the first dimension) of the BFL tensor ``key``: a diffusers tensor of a
    transformer in Black Forest Labs' key layout is one or more of these, concatenated in order."""

    key: str
    start: int | None = None
    stop: int | None = None


def gather_rows(state: dict, layout: dict[str, list[Rows]], prefix: str, what: str) -> dict:
    """A BFL state dict (``prefix`` allowed before every key) in diffusers' names, by ``layout``; missing
    or unexpected keys are a :class:`UserError` naming them and ``what`` the layout is of."""
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    wanted = {p.key for pieces in layout.values() for p in pieces}
    missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or extra:
        raise UserError(f"these weights are not {what} of this model's widths in the BFL layout: "
                        f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                        f"{extra[:3]}{'...' if len(extra) > 3 else ''}; use the file made for this model.")
    return {name: torch.cat([state[p.key][p.start:p.stop] for p in pieces]) if len(pieces) > 1
            else state[pieces[0].key][pieces[0].start:pieces[0].stop]
            for name, pieces in layout.items()}


def scatter_rows(state: dict, layout: dict[str, list[Rows]]) -> dict:
    """A diffusers state dict in BFL's names and fused tensors: the inverse of :func:`gather_rows`."""
    parts: dict[str, list[tuple[int, object]]] = {}
    for name, pieces in layout.items():
        tensor, at = state[name], 0
        for p in pieces:
            n = (p.stop - p.start) if p.stop is not None else tensor.shape[0]
            parts.setdefault(p.key, []).append((p.start or 0, tensor[at:at + n]))
            at += n
    return {key: torch.cat([t for _, t in sorted(pieces, key=lambda x: x[0])]) if len(pieces) > 1 else pieces[0][1]
            for key, pieces in parts.items()}
