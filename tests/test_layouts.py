"""The BFL key layout of FLUX.1's transformer against diffusers' own conversion and the twins."""

import torch

from helpers.families.flux1.layout import PREFIX, bfl_layout, from_bfl, to_bfl

FLUX_WIDTH = {"num_attention_heads": 24, "attention_head_dim": 128, "mlp_ratio": 4.0,
              "num_layers": 2, "num_single_layers": 3, "guidance_embeds": True}


def _fake_bfl(config, columns: int = 1) -> dict:
    """A BFL state dict in ``config``'s widths with ``columns`` columns (rows are what the layout
    reads): small enough to hold FLUX.1's own 3072-wide row counts."""
    layout = bfl_layout(config)
    rows: dict[str, int] = {}
    for pieces in layout.values():
        for p in pieces:
            rows[p.key] = max(rows.get(p.key, 5), p.stop or 0)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, columns, generator=g) for k, n in sorted(rows.items())}


def test_the_layout_is_diffusers_conversion_at_flux_width():
    """At FLUX.1's width (3072, where diffusers' converter works) both give the same tensors."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    bfl = _fake_bfl(FLUX_WIDTH)
    theirs = convert_flux_transformer_checkpoint_to_diffusers({PREFIX + k: v for k, v in bfl.items()})
    ours = from_bfl(bfl, FLUX_WIDTH)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(to_bfl(ours, FLUX_WIDTH)["final_layer.adaLN_modulation.1.weight"],
                       bfl["final_layer.adaLN_modulation.1.weight"])


def test_a_twin_round_trips_through_the_bfl_layout(tiny_folder):
    """Any width: every tensor of the tiny twin's transformer has a place in the layout, and back."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_folder / "transformer")
    state = model.state_dict()
    layout = bfl_layout(model.config)
    assert set(layout) == set(state)
    bfl = to_bfl(state, model.config)
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape[0] == 3 * inner
    assert bfl["single_blocks.0.linear1.weight"].shape[0] == 3 * inner + 4 * inner  # diffusers: MLP ratio 4
    back = from_bfl({PREFIX + k: v for k, v in bfl.items()}, model.config)
    assert all(torch.equal(back[k], state[k]) for k in state)
    schnell = {**dict(model.config), "guidance_embeds": False}  # no guidance_in: another variant
    assert not any("guidance" in r.key for pieces in bfl_layout(schnell).values() for r in pieces)


def test_a_file_of_another_model_is_named_as_such():
    import pytest

    from helpers.errors import UserError

    bfl = _fake_bfl(FLUX_WIDTH)
    bfl.pop("single_blocks.2.linear2.weight")
    bfl["some.other.tensor"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing \['single_blocks.2.linear2.weight'\].*unexpected \['some.other"):
        from_bfl(bfl, FLUX_WIDTH)
