"""Pre-training of the world CLIP, its evaluations, the shipped checkpoint and descriptions."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors import safe_open

from msta.world import generate as world
from msta.world import pretrain

TINY = "msta-test-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 2},
}
PACKAGE = Path(pretrain.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A two-layer config registered under a test-only name."""
    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    return TINY


@pytest.fixture(scope="module")
def trained(tiny: str) -> tuple[dict[str, torch.Tensor], dict]:
    return pretrain.pretrain(tiny, steps=30, batch_size=16, lr=2e-3, seed=0, progress=False,
                             eval_images=64)


def test_positives_are_the_captions_true_of_each_image() -> None:
    images = [
        {"size_name": "small", "colour": "red", "shape": "circle", "position": "on the left"},
        {"size_name": "large", "colour": "red", "shape": "circle", "position": "at the top"},
        {"size_name": "small", "colour": "blue", "shape": "square", "position": "on the left"},
    ]
    stated = [images[0], {"shape": "circle"}, {"colour": "blue", "shape": "square"}]
    positives = pretrain.positive_mask(images, stated)
    assert positives.tolist() == [[True, True, False], [False, True, False], [False, False, True]]


def test_multi_positive_loss_targets_on_a_hand_made_batch() -> None:
    """Equal captions (0, 2, 4) are all positives: the loss is the cross-entropy against
    targets spread evenly over them, so it is lowest when their logits are equal."""
    captions = [{"shape": s} for s in ("circle", "square", "circle", "ring", "circle")]
    positives = pretrain.positive_mask(captions, captions)
    third = 1.0 / 3.0
    targets = torch.tensor([[third, 0, third, 0, third], [0, 1, 0, 0, 0],
                            [third, 0, third, 0, third], [0, 0, 0, 1, 0],
                            [third, 0, third, 0, third]])
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    expected = 0.5 * (torch.nn.functional.cross_entropy(logits, targets)
                      + torch.nn.functional.cross_entropy(logits.T, targets))
    assert torch.allclose(pretrain.contrastive_loss(image, text, scale, positives), expected)


def test_phrase_states_shape_and_position_and_only_true_attributes() -> None:
    rng = np.random.default_rng(0)
    attrs = {"size_name": "small", "colour": "orange", "shape": "ring", "position": "at the top"}
    phrased = [pretrain.phrase(attrs, rng, partial=0.5) for _ in range(400)]
    assert "a small orange ring at the top" in {text for text, _ in phrased}
    assert any(stated == {"shape": "ring", "position": "at the top"} for _, stated in phrased)
    for text, stated in phrased:
        assert {"shape", "position"} <= stated.keys() and stated.items() <= attrs.items()
        assert all(value in text for value in stated.values())
        assert all(value not in text for key, value in attrs.items() if key not in stated)
    assert any(text.startswith("a photo of a") for text, _ in phrased)
    assert all(stated == attrs for _, stated in (pretrain.phrase(attrs, rng, 0.0)
                                                 for _ in range(20)))


@pytest.mark.parametrize("attributes", [("shape",), ("shape", "position")])
def test_hard_negatives_differ_from_their_anchor_in_one_listed_attribute(
        attributes: tuple[str, ...]) -> None:
    images, attrs = pretrain.render_batch(np.random.default_rng(0), 9, 32, attributes)
    assert images.shape == (9, 32, 32, 3) and len(attrs) == 9
    for a, b in zip(attrs[:4], attrs[5:]):
        changed = [key for key in a if a[key] != b[key]]
        assert len(changed) == 1 and changed[0] in attributes


def test_contrastive_loss_equals_clip_loss_when_captions_are_distinct() -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    scale = torch.tensor(10.0)
    ours = pretrain.contrastive_loss(image, text, scale, torch.eye(6, dtype=torch.bool))
    assert torch.allclose(ours, open_clip.ClipLoss()(image, text, scale))


def test_pretrain_lowers_the_loss_and_reports_finite_metrics(
        tiny: str, trained: tuple[dict[str, torch.Tensor], dict]) -> None:
    state, metrics = trained
    assert metrics["final_loss"] < metrics["first_loss"]
    assert math.isfinite(metrics["final_loss"]) and metrics["steps"] == 30
    assert 0.0 <= metrics["retrieval_top1"] <= 1.0
    assert metrics["retrieval_chance"] == pytest.approx(1.0 / metrics["retrieval_captions"])
    assert metrics["config"] == TINY_CONFIG
    assert set(state) == set(open_clip.create_model(tiny).state_dict())


def test_to_model_input_resizes_and_normalises(tiny: str) -> None:
    model = open_clip.create_model(tiny)
    images = np.full((2, 64, 64, 3), 255, dtype=np.uint8)
    x = pretrain.to_model_input(images, model)
    assert x.shape == (2, 3, 32, 32)
    std = torch.tensor(model.visual.preprocess_cfg["std"])
    mean = torch.tensor(model.visual.preprocess_cfg["mean"])
    assert torch.allclose(x[0, :, 0, 0], (1 - mean) / std)


def test_checkpoint_is_float16_on_disk_and_float32_when_loaded(
        tmp_path: Path, tiny: str, trained: tuple[dict[str, torch.Tensor], dict]) -> None:
    state, _ = trained
    path = tmp_path / "w.safetensors"
    pretrain.save_checkpoint(state, path, {"config": tiny})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["config"] == tiny
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    model = pretrain.load_world_clip(path, tiny)
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, state[name].half().float()), name


def test_frame_mean_is_blind_to_time_order(tiny: str,
                                          trained: tuple[dict[str, torch.Tensor], dict]) -> None:
    model = open_clip.create_model(tiny)
    model.load_state_dict(trained[0])
    model.eval()
    clip = world.render_video(0, np.random.default_rng(0), size=32)
    forward = pretrain.encode_images(model, clip).mean(dim=0)
    backward = pretrain.encode_images(model, clip[::-1].copy()).mean(dim=0)
    assert torch.allclose(forward, backward, atol=1e-5)
    result = pretrain.frame_mean_zero_shot(model, open_clip.get_tokenizer(tiny),
                                           videos_per_class=2)
    assert len(result["per_class_top1"]) == len(world.CLASSES)
    for key in ("overall_top1", "reversal_within_pair", "appearance_within"):
        assert 0.0 <= result[key] <= 1.0
    assert result["chance_overall"] == pytest.approx(1 / 12)


def test_one_cycle_rises_to_the_peak_then_decays_to_zero() -> None:
    factors = [pretrain.one_cycle(s, 100) for s in range(101)]
    assert factors[0] == pytest.approx(1 / 25) and max(factors) == factors[10] == 1.0
    assert all(a <= b for a, b in zip(factors[:10], factors[1:11]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[100] == pytest.approx(0.0, abs=1e-12)
    assert pretrain.one_cycle(0, 1) == pytest.approx(1 / 25)  # a single step still runs


def test_segment_centres_pick_the_middle_of_equal_segments() -> None:
    assert pretrain.segment_centres(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert pretrain.segment_centres(16, 16).tolist() == list(range(16))


def test_cli_writes_checkpoint_and_recipe(tmp_path: Path, tiny: str) -> None:
    out = tmp_path / "w.safetensors"
    pretrain.main(["--config", tiny, "--steps", "2", "--batch-size", "8", "--seed", "3",
                   "--out", str(out), "--eval-images", "16", "--zero-shot-videos", "1",
                   "--no-progress"])
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["command"].startswith(f"msta-pipe train --stage pretrain --backbone {tiny}")
    assert "--steps 2 --batch-size 8" in record["python_command"]
    assert record["file_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert record["seed"] == 3 and record["versions"]["torch"] == torch.__version__


# ----------------------------------------------------------------------------- shipped files

SHIPPED = PACKAGE / "weights" / "synthetic-world.safetensors"


def test_shipped_checkpoint_is_small_recorded_and_retrieves_captions() -> None:
    blob = SHIPPED.read_bytes()
    assert len(blob) < 12e6
    record = json.loads(SHIPPED.with_suffix(".json").read_text())
    assert record["file_sha256"] == hashlib.sha256(blob).hexdigest()
    assert record["command"].startswith("msta-pipe train --stage pretrain --backbone msta-world")
    config = json.loads((PACKAGE / "configs" / "msta-world.json").read_text())
    assert record["config"] == config
    assert config["vision_cfg"]["layers"] == config["text_cfg"]["layers"]
    model = pretrain.load_world_clip(SHIPPED)
    images, attrs = pretrain.render_batch(np.random.default_rng(123), 96, 64)
    result = pretrain.caption_retrieval(model, open_clip.get_tokenizer("msta-world"), images,
                                        pretrain.full_captions(attrs))
    assert result["retrieval_top1"] > 0.8


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_descriptions_follow_the_authors_frames_and_fit_the_context(kind: str) -> None:
    descriptions = json.loads((PACKAGE / "descriptions" / f"world_{kind}.json").read_text())
    assert list(descriptions) == [str(c) for c in range(len(world.CLASSES))]
    pretrain.register_configs()
    tokenizer = open_clip.get_tokenizer("msta-world")
    for class_id, sentences in descriptions.items():
        name = re.escape(world.CLASSES[int(class_id)])
        frame = (r"A video about [a-z ,]+\." if kind == "spatial" else
                 rf"A video of {name} generally involves the following step: [a-z ]+,"
                 r" which is a sub-step\.")
        assert len(sentences) == 2 and len(set(sentences)) == 2
        for sentence in sentences:
            assert re.fullmatch(frame, sentence), sentence
            # Start and end tokens included; a sentence cut at the context would lose its end.
            assert len(tokenizer.encode(sentence)) + 2 <= tokenizer.context_length - 3
