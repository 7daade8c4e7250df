"""FLUX.2 [klein]'s twins: klein's real structure at tiny widths, built in code in the real diffusers layout.

``klein-tiny``: ``Flux2Transformer2DModel`` with klein's 5 double and 20 single blocks, a ``Qwen3ForCausalLM``
with Qwen3-4B's 36 layers and tied embeddings, an ``AutoencoderKLFlux2`` with 32 latent channels (2x2
patches: the transformer's 128 input channels), klein's scheduler, and a byte-level BPE tokenizer written
here with a chat template that renders a user's prompt as the real one does (thinking off). Random
weights from fixed seeds (its images are noise): it is what the stages, the loaders and the one-piece
pipeline are checked against; :mod:`helpers.twins.builder` builds it into a folder on first use.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: the chat template's rendering of one user message, thinking off (the pipeline asks for that)
CHAT_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def byte_chars() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes as themselves, the
    others moved past 255 in order (so every byte is one visible symbol of the vocabulary)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, moved = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + moved)
            moved += 1
    return out


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE of one pre-token (its bytes' stand-ins): merge the best-ranked adjacent pair until none applies."""
    pieces = list(word)
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == math.inf:
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def word_merges() -> list[tuple[str, str]]:
    """Merges that make every word of the shapes world one token, after a space (``Ġred``) and without
    one (a prompt's first word), whatever the other words' merges do: each word gets merges, ranked after
    all earlier ones, for the pieces the earlier merges leave it in."""
    from helpers.twins.world import WORDS

    space = byte_chars()[ord(" ")]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in (*(space + w for w in WORDS), *WORDS):
        while len(pieces := _bpe(word, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
    return merges


def tokenizer():
    """A ``Qwen2TokenizerFast`` of the 256 bytes, the shapes world's words whole (:func:`word_merges`: a
    caption is a dozen tokens, as a real tokenizer makes it) and the chat's special tokens, 512 tokens
    long at most, padded with ``<|endoftext|>``, with the chat template above."""
    from transformers import Qwen2TokenizerFast

    vocab = {ch: i for i, ch in enumerate(byte_chars().values())}
    merges = word_merges()
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[SPECIAL[0]] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL[1:])})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@dataclass(frozen=True)
class KleinTwinSpec:
    """Widths of a klein twin; depths are klein 4B's own."""

    hidden: int = 32  # Qwen3's; the transformer's joint attention takes three of its hidden states
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    intermediate: int = 64
    layers: int = 36
    flux_heads: int = 4  # 128 wide, as wide as its 128-channel patches (see flux_head_dim)
    flux_head_dim: int = 32  # four rope axes of a quarter of it; narrower than the patches, the transformer
    # cannot see all of a noisy latent, and the noise it cannot see stays in the picture it draws
    double: int = 5
    single: int = 20
    vae_channels: tuple[int, int, int, int] = (16, 16, 32, 32)
    vae_groups: int = 8
    seed: int = 0
    distilled: bool = True
    trained: str | None = None
    family: str = "flux2"

    @property
    def variant(self) -> str:
        return "klein" if self.distilled else "klein-base"

    def note(self, trained: bool) -> str:
        if trained:
            return ("Trained on the shapes world (helpers.families.flux2.training): draws a coloured circle, square or "
                    "triangle on a coloured background where its prompt says; its text path names the scene in its pads.")
        return "Random weights in the FLUX.2 [klein] layout, built offline; its images are noise."

    def configs(self, trained: bool = True) -> dict[str, dict]:
        """Its components' configs: klein 4B's with these widths."""
        shipped = resources.files("helpers") / "configs" / "FLUX.2-klein-4B"
        te = json.loads((shipped / "text_encoder" / "config.json").read_text())
        tok = tokenizer()
        te.update(hidden_size=self.hidden, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                  head_dim=self.head_dim, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                  layer_types=["full_attention"] * self.layers, max_window_layers=self.layers,
                  vocab_size=len(tok), max_position_embeddings=1024,  # <|endoftext|> and <|im_end|>, as the real ones
                  bos_token_id=tok.convert_tokens_to_ids(SPECIAL[0]), eos_token_id=tok.convert_tokens_to_ids(SPECIAL[2]))
        tr = json.loads((shipped / "transformer" / "config.json").read_text())
        tr.update(num_layers=self.double, num_single_layers=self.single, num_attention_heads=self.flux_heads,
                  attention_head_dim=self.flux_head_dim, axes_dims_rope=[self.flux_head_dim // 4] * 4,
                  joint_attention_dim=3 * self.hidden, timestep_guidance_channels=32)
        vae = json.loads((shipped / "vae" / "config.json").read_text())
        vae.update(block_out_channels=list(self.vae_channels), norm_num_groups=self.vae_groups)
        scheduler = json.loads((shipped / "scheduler" / "scheduler_config.json").read_text())
        return {"text_encoder": te, "transformer": tr, "vae": vae, "scheduler": scheduler}

    def modules(self, trained: bool = True) -> dict:
        """Every part in memory, float32, from fixed seeds: the models, the tokenizer and the scheduler;
        a trained twin's text encoder, transformer and VAE from its shipped weights (unless ``trained=False``)."""
        import torch
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import Qwen3Config, Qwen3ForCausalLM

        configs = self.configs()
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            torch.manual_seed(self.seed)
            text_encoder = Qwen3ForCausalLM(Qwen3Config.from_dict(configs["text_encoder"])).eval()
            # token embeddings of unit scale (the default's 0.02 leaves a word's identity a few hundredths
            # of the hidden states the pipeline reads: with random layers, captions that differ by a word
            # came out nearly alike), so the seeded text path tells the world's words apart
            torch.nn.init.normal_(text_encoder.model.embed_tokens.weight, std=1.0)
            torch.manual_seed(self.seed + 1)
            transformer = Flux2Transformer2DModel.from_config(configs["transformer"]).eval()
            torch.manual_seed(self.seed + 2)
            vae = AutoencoderKLFlux2.from_config(
                {k: v for k, v in configs["vae"].items() if k != "force_upcast"}).eval()
        if trained and self.trained:
            from safetensors.torch import load_file

            from helpers.twins.shipped import trained_weights_info, trained_weights_path

            trained_weights_info(self)  # a clear error if the file is missing
            state = load_file(str(trained_weights_path(self)))
            for name, module in (("text_encoder", text_encoder), ("transformer", transformer), ("vae", vae)):
                mine = {k[len(name) + 1:]: v.float() if v.is_floating_point() else v for k, v in state.items()
                        if k.startswith(name + ".")}
                module.load_state_dict(mine, strict=True)
        return dict(text_encoder=text_encoder, transformer=transformer, vae=vae, tokenizer=tokenizer(),
                    scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]))

    def write(self, folder: Path) -> None:
        """Save it in ``folder`` in the diffusers layout, weights in bfloat16 as the real checkpoints."""
        import torch
        from diffusers import Flux2KleinPipeline

        parts = self.modules()
        for component in ("text_encoder", "transformer", "vae"):
            for tensor in (*parts[component].parameters(), *parts[component].buffers()):
                if tensor.is_floating_point():
                    tensor.data = tensor.data.to(torch.bfloat16)
        Flux2KleinPipeline(**parts, is_distilled=self.distilled).save_pretrained(folder)


TWINS = {
    # trained on the shapes world (helpers.families.flux2.training): its text path, transformer and VAE
    "klein-tiny": KleinTwinSpec(trained="klein-tiny.safetensors"),
    # about 1.1 GB in bfloat16 (a 0.84 GB transformer 1024 wide, a 0.25 GB Qwen3 512 wide): the CPU benchmarks' model
    "klein-medium": KleinTwinSpec(hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1536, flux_heads=8,
                                  flux_head_dim=128, vae_channels=(32, 64, 128, 128), vae_groups=32),
}
