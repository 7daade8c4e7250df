"""The shapes world, its detector, and training the tiny twin on it: pictures read back, training that repeats, a twin built from trained weights."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch

from helpers.twins import world
from helpers.errors import UserError
from helpers.families.flux1.twin import TRAINED_COMPONENTS, TWINS, twin_modules

#: the notebooks' default image size
SIZE = 64


def test_the_detector_reads_every_scene_of_the_world_back():
    rng = random.Random(0)
    results = [(s, world.detect(world.render(s, SIZE, SIZE, rng))) for s in world.scenes()]
    results += [(s, world.detect(world.render(s, 128, 96, rng))) for s in world.scenes()[::7]]
    assert world.score(results) == {"background": 1.0, "shape_colour": 1.0, "shape": 1.0, "place": 1.0}
    assert all(d.caption == s.caption for s, d in results if s.place)  # read back in the world's words


def test_the_detector_says_when_a_picture_is_not_the_scene():
    scene = world.Scene("circle", "red", "blue", "on the left")
    wrong = world.detect(world.render(world.Scene("square", "green", "white", "at the top")))
    assert wrong.matches(scene) == {"background": False, "shape_colour": False, "shape": False, "place": False}
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    assert not all(world.detect(noise).matches(scene).values())
    plain = world.detect(np.full((SIZE, SIZE, 3), world.COLOURS["blue"], dtype=np.uint8))
    assert plain.background == "blue" and plain.shape is None and plain.caption == "a plain blue background"


def test_captions_round_trip_and_other_text_is_refused():
    for scene in world.scenes()[::11]:
        assert world.parse(scene.caption) == scene
    assert world.parse("A Yellow Triangle on a black background, at the bottom.").place == "at the bottom"
    for text, message in [("a photo of a red cat", "not a caption"), ("a red circle on a red background", "cannot be seen"),
                          ("a pink circle on a blue background", "unknown colour"),
                          ("a red star on a blue background", "unknown shape")]:
        with pytest.raises(UserError, match=message):
            world.parse(text)


def test_held_out_pairs_are_never_trained_on_yet_every_colour_is():
    train = world.scenes(held_out=False)
    assert len(train) + len(world.scenes(held_out=True)) == len(world.scenes()) == 3 * 8 * 7 * 6
    assert not [s for s in train if (s.shape_colour, s.background) in world.HELD_OUT]
    for colour in world.COLOURS:  # each colour is seen as a shape and as a background
        assert any(s.shape_colour == colour for s in train) and any(s.background == colour for s in train)


def test_the_worlds_words_are_whole_tokens(tiny_folder):
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(tiny_folder / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(tiny_folder / "tokenizer_2")
    for word in world.WORDS:
        assert clip.tokenize(word) == [word + "</w>"], word
        assert t5.tokenize(word) == ["\u2581" + word], word
    assert clip.eos_token_id == max(clip.get_vocab().values())  # CLIP still pools at <|endoftext|>


#: a run of the trainer small enough for a test (seconds): the same code as `train-twin`, fewer steps
QUICK = dict(vae_steps=3, clip_steps=3, flow_steps=3, vae_batch=2, flow_batch=2, max_scenes=8, warmup=1, flux_heads=None)


@pytest.fixture(scope="module")
def quick_weights(tmp_path_factory):
    from helpers.twins.training import TrainConfig, train_twin

    out = tmp_path_factory.mktemp("trained") / "tiny.safetensors"
    summary = train_twin(out, TrainConfig(**QUICK), log=lambda _: None)
    return out, summary


@pytest.mark.slow
def test_training_repeats_byte_for_byte(tmp_path, quick_weights):
    from helpers.twins.training import TrainConfig, same_weights, train_twin

    first, summary = quick_weights
    again = train_twin(tmp_path / "again.safetensors", TrainConfig(**QUICK), log=lambda _: None)
    assert same_weights(first, tmp_path / "again.safetensors")  # every tensor and the metadata
    other = train_twin(tmp_path / "seed1.safetensors", TrainConfig(**{**QUICK, "seed": 1}), log=lambda _: None)
    assert not same_weights(first, tmp_path / "seed1.safetensors") and other["flow_loss"] != summary["flow_loss"]
    assert np.isfinite([summary["vae_loss"], summary["flow_loss"]]).all() and summary["flow_loss"] == again["flow_loss"]
    assert summary["scenes"] == 8 and summary["megabytes"] < 20
    with pytest.raises(UserError, match="already exists"):  # refused before any work
        train_twin(first, TrainConfig(**QUICK), log=lambda _: None)


@pytest.mark.slow
def test_a_twin_builds_from_trained_weights_and_says_so(tmp_path, quick_weights, monkeypatch):
    """The builder's real path for a trained twin: modules from the seeds, then the file's weights
    loaded strictly into all four models (CLIP learns with the transformer, T5 keeps its seeded weights), the VAE's
    measured scale and shift in its config, the file's hash in the marker."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from helpers.families.flux1 import twin as flux1_twin
    from helpers.twins import builder, shipped

    file, summary = quick_weights
    spec = replace(TWINS["tiny"], trained=str(file))
    monkeypatch.setitem(flux1_twin.TWINS, "tiny", spec)
    trained, seeded = twin_modules(spec), twin_modules(spec, trained=False)
    stored = load_file(str(file))
    for component in TRAINED_COMPONENTS:
        for name, tensor in trained[component].state_dict().items():
            assert torch.equal(tensor, stored[f"{component}.{name}"].float()), (component, name)
    assert not all(torch.equal(v, seeded["text_encoder"].state_dict()[k])  # CLIP learned
                   for k, v in trained["text_encoder"].state_dict().items())
    assert all(torch.equal(v, seeded["text_encoder_2"].state_dict()[k].bfloat16().float())  # T5 did not
               for k, v in trained["text_encoder_2"].state_dict().items())
    assert trained["vae"].config.scaling_factor == pytest.approx(summary["vae_scaling_factor"])

    folder = builder.build_twin("tiny", tmp_path / "tiny")
    marker = json.loads((folder / builder.MARKER).read_text())
    assert marker["weights_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert "shapes world" in marker["note"]
    out = world.draw(folder, ["a red circle on a blue background"], seeds=(0,), steps=1)
    assert out[0].image.size == (SIZE, SIZE)

    monkeypatch.setitem(flux1_twin.TWINS, "tiny", replace(spec, trained=str(tmp_path / "missing.safetensors")))
    with pytest.raises(UserError, match="trained weights of this twin are missing"):
        flux1_twin.twin_configs(flux1_twin.TWINS["tiny"])


#: what the shipped twin must draw right, at least (the detector on 24 prompts x 3 seeds)
BARS = {"background": 0.95, "shape_colour": 0.90, "shape": 0.80, "place": 0.90}
#: measured with the shipped weights: 1.0, 0.944, 0.833, 0.984 (the VAE trained with its edges weighted:
#: its own reconstructions read back 97% of shapes at 64x64, 90% without)


@pytest.mark.slow
def test_the_shipped_twin_draws_what_it_is_told(tiny_folder):
    """The shipped weights at the notebooks' defaults (64x64, 4 steps, guidance 3.5, bfloat16, T5 padded
    to 512 tokens): 24 prompts of the grammar, any colour pair (held-out ones included, as a user
    types any), 3 seeds each, read back by the detector; then 12 prompts of held-out pairs alone."""
    prompts = world.sample_prompts(24, seed=1)
    drawn = world.draw(tiny_folder, prompts, seeds=(0, 1, 2), dtype=torch.bfloat16)
    scores = world.score([(d.scene, d.detection) for d in drawn])
    held = world.draw(tiny_folder, world.sample_prompts(12, seed=2, held_out=True), seeds=(0, 1, 2),
                      dtype=torch.bfloat16)
    held_scores = world.score([(d.scene, d.detection) for d in held])
    print("all pairs:", scores, "| held-out pairs:", held_scores)
    for part, bar in BARS.items():
        assert scores[part] >= bar, (part, scores)
    # pairs never seen: the background and the place still land (measured 1.0 and 0.75), the shape's colour
    # mostly not (0.44: the transformer learned colours as pairs)
    assert held_scores["background"] >= BARS["background"] and held_scores["place"] >= 0.75, held_scores
    # the same seed draws the same picture
    again = world.draw(tiny_folder, prompts, seeds=(1,), dtype=torch.bfloat16)
    assert [np.asarray(d.image).tobytes() for d in again] == [np.asarray(d.image).tobytes() for d in drawn[24:48]]


def test_the_shipped_weights_load_and_build_the_same_twin(tmp_path):
    from helpers.families.flux1 import twin as flux1_twin
    from helpers.twins import builder, shipped

    shipped = shipped.trained_weights_path(TWINS["tiny"])
    assert shipped.is_file() and shipped.stat().st_size < 20e6
    a = builder.build_twin("tiny", tmp_path / "a")
    b = builder.build_twin("tiny", tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    marker = json.loads((a / builder.MARKER).read_text())
    assert marker["weights_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
