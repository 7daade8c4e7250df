"""What several families share: the pieces of a family module that are not any one family's."""

from __future__ import annotations

import torch


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
