"""The MSTA video classifier: exactness at zero scale, temporal modelling, training, save/load."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from msta.method.adapters import AdapterConfig, adapters_disabled
from msta.method.backbone import Backbone, load_backbone
from msta.method.model import MSTA, AdapterLoadError, VideoCLIP, full_finetune, read_adapter_info

CLASSES = ["pouring water", "folding paper", "opening a door"]
TINY_CFG = AdapterConfig(dim=8, layers=(3, 4))


def tiny_backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)  # the same random weights for the same seed
    return load_backbone("msta-tiny")


def clips(b: int = 2, t: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def frozen_references(backbone: Backbone, frames: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
    """Image, video and text embeddings straight from open_clip, before any adapter is attached."""
    b, t = frames.shape[:2]
    with torch.no_grad():
        per_frame = backbone.model.encode_image(frames.flatten(0, 1))
        text = backbone.model.encode_text(backbone.tokenize(texts).to(frames.device))
    return {
        "image": F.normalize(per_frame, dim=-1),
        "video": F.normalize(per_frame.view(b, t, -1).mean(1), dim=-1),
        "text": F.normalize(text, dim=-1),
    }


def assert_reproduces_frozen_clip(model: MSTA, frames: torch.Tensor, ref: dict[str, torch.Tensor]) -> None:
    names = CLASSES[: ref["text"].shape[0]]
    with torch.no_grad():
        image = model.encode_video(frames.flatten(0, 1).unsqueeze(1))  # every frame a one-frame clip
        video = model.encode_video(frames)
        text = model.encode_classes(names)
    assert torch.allclose(image, ref["image"], atol=1e-6, rtol=0)
    assert torch.allclose(video, ref["video"], atol=1e-6, rtol=0)
    assert torch.allclose(text, ref["text"], atol=1e-6, rtol=0)


def zero_up_projections(model: MSTA) -> None:
    with torch.no_grad():
        for adapter in model.adapters.modules():
            adapter.up.weight.zero_()
            adapter.up.bias.zero_()


@pytest.mark.parametrize("layers", [(3, 4), (1, 4)])
def test_zero_scale_and_zero_up_projections_reproduce_the_frozen_clip(layers: tuple[int, int]) -> None:
    frames = clips()
    texts = [f"a video of {c}." for c in CLASSES]
    backbone = tiny_backbone()
    ref = frozen_references(backbone, frames, texts)
    assert_reproduces_frozen_clip(MSTA(backbone, AdapterConfig(dim=8, layers=layers, scale=0.0)), frames, ref)

    backbone = tiny_backbone()
    model = MSTA(backbone, AdapterConfig(dim=8, layers=layers, scale=0.005))
    zero_up_projections(model)
    assert_reproduces_frozen_clip(model, frames, ref)


@pytest.mark.slow
def test_vit_b16_architecture_reproduces_the_frozen_clip_at_zero_scale() -> None:
    def vit_b16() -> Backbone:
        torch.manual_seed(0)
        return load_backbone("ViT-B-16")

    backbone = vit_b16()
    frames = clips(b=1, t=2, size=224)
    ref = frozen_references(backbone, frames, ["a video of pouring water.", "a video of folding paper."])
    assert_reproduces_frozen_clip(MSTA(backbone, AdapterConfig(scale=0.0)), frames, ref)
    model = MSTA(vit_b16(), AdapterConfig())  # the paper's lambda, with zero up-projections
    zero_up_projections(model)
    assert_reproduces_frozen_clip(model, frames, ref)


def test_adapters_disabled_is_the_zero_shot_model_on_the_same_object() -> None:
    frames = clips()
    backbone = tiny_backbone()
    ref = frozen_references(backbone, frames, [f"a video of {c}." for c in CLASSES])
    model = MSTA(backbone, AdapterConfig(dim=8, layers=(1, 4), scale=0.5))
    with torch.no_grad():
        assert not torch.allclose(model.encode_video(frames), ref["video"], atol=1e-3)  # adapters act
        with adapters_disabled(model.clip):
            assert torch.allclose(model.encode_video(frames), ref["video"], atol=1e-6)
            assert torch.allclose(model.encode_classes(CLASSES), ref["text"], atol=1e-6)
        assert not torch.allclose(model.encode_video(frames), ref["video"], atol=1e-3)  # back on


def _randomise_temporal(model: MSTA) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for adapter in model.adapters.vision.values():
            adapter.temporal.conv.weight.normal_()
            adapter.temporal.conv.bias.normal_()


@pytest.mark.parametrize("branch", ["paper", "bottleneck"])
def test_temporal_branch_sees_frame_order(branch: str) -> None:
    model = MSTA(tiny_backbone(), AdapterConfig(dim=8, layers=(3, 4), scale=0.5, temporal_branch=branch))
    _randomise_temporal(model)
    frames = clips()
    with torch.no_grad():
        forward, backward = model.encode_video(frames), model.encode_video(frames.flip(1))
    assert (forward - backward).abs().max() > 1e-4


def test_without_temporal_branch_the_model_is_order_invariant() -> None:
    model = MSTA(tiny_backbone(), AdapterConfig(dim=8, layers=(3, 4), scale=0.5, temporal=False))
    assert all(a.temporal is None for a in model.adapters.vision.values())
    frames = clips()
    with torch.no_grad():
        assert torch.allclose(model.encode_video(frames), model.encode_video(frames.flip(1)), atol=1e-6)


def test_only_adapters_train() -> None:
    model = MSTA(tiny_backbone(), TINY_CFG)
    model.train()
    assert not model.clip.training  # the frozen CLIP stays in eval mode
    trainable = model.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in model.adapters.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    before = {n: p.clone() for n, p in model.clip.named_parameters()}
    logits = model(clips(), CLASSES)
    assert logits.shape == (2, 3)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    opt.step()
    changed = {n for n, p in model.clip.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapter." in n for n in changed)



def test_parameter_groups_put_the_temporal_filters_apart() -> None:
    model = MSTA(tiny_backbone(), TINY_CFG)
    groups = model.parameter_groups(1e-3, 30.0)
    assert [g["lr"] for g in groups] == [1e-3, 3e-2]
    temporal = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in model.clip.named_parameters() if id(p) in temporal}
    # one depthwise filter (3 taps per channel) and bias per adapted vision layer, nothing else
    assert names and all(".temporal.conv." in n and "visual" in n for n in names)
    assert len(names) == 2 * len(range(*TINY_CFG.layers)) + 2
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.trainable_parameters())  # each once
    flat = MSTA(tiny_backbone(), AdapterConfig(dim=8, layers=(3, 4), temporal=False)).parameter_groups(1e-3, 30.0)
    assert len(flat) == 1
    assert len(full_finetune(tiny_backbone()).parameter_groups(1e-3, 30.0)) == 1

def test_logits_are_scaled_cosines_and_class_tokens_are_cached() -> None:
    model = MSTA(tiny_backbone(), TINY_CFG)
    tokens = model.class_tokens(CLASSES)
    assert model.class_tokens(list(CLASSES)) is tokens
    with torch.no_grad():
        video, text = model.encode_video(clips()), model.encode_classes(CLASSES)
        expected = model.clip.logit_scale.exp() * F.cosine_similarity(video[:, None], text[None], dim=-1)
        assert torch.allclose(model.logits(video, text), expected, atol=1e-5)
    with pytest.raises(ValueError, match="template"):
        MSTA(tiny_backbone(), TINY_CFG, template="a video")


def test_forward_and_backward_under_bf16_autocast() -> None:
    model = MSTA(tiny_backbone(), TINY_CFG)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(clips(), CLASSES)
    F.cross_entropy(logits.float(), torch.tensor([1, 0])).backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_full_finetune_baseline_trains_every_backbone_parameter() -> None:
    backbone = tiny_backbone()
    model = full_finetune(backbone)
    assert isinstance(model, VideoCLIP) and not isinstance(model, MSTA)
    total = sum(p.numel() for p in backbone.model.parameters())
    assert sum(p.numel() for p in model.trainable_parameters()) == total
    logits = model(clips(), CLASSES)
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert backbone.model.visual.conv1.weight.grad is not None
    assert backbone.model.token_embedding.weight.grad is not None


# ---------------------------------------------------------------- save / load


def _trained(cfg: AdapterConfig = TINY_CFG, backbone: Backbone | None = None) -> MSTA:
    model = MSTA(backbone or tiny_backbone(), cfg)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p))  # as if trained: no parameter at its init
    return model


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _trained()
    path = tmp_path / "run" / "adapters.safetensors"
    model.save_adapters(path, extra_metadata={"epoch": "7"})
    assert os.listdir(path.parent) == ["adapters.safetensors"]  # no temporary file left behind
    info = read_adapter_info(path)
    assert info.config == TINY_CFG and info.backbone_name == "msta-tiny" and info.extra == {"epoch": "7"}

    fresh = MSTA(tiny_backbone(), TINY_CFG)
    assert fresh.load_adapters(path) == {"epoch": "7"}
    saved, loaded = model.adapter_state_dict(), fresh.adapter_state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    shared = [k for k in saved if ".shared." in k]
    assert len(shared) == 2 * 2  # weight + bias per depth, once although both towers use them
    frames = clips()
    with torch.no_grad():
        assert torch.equal(model(frames, CLASSES), fresh(frames, CLASSES))


def test_reserved_metadata_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        _trained().save_adapters(tmp_path / "a.safetensors", extra_metadata={"adapter_config": "{}"})


def test_loading_onto_another_config_names_both(tmp_path: Path) -> None:
    path = tmp_path / "adapters.safetensors"
    _trained().save_adapters(path)
    other = MSTA(tiny_backbone(), AdapterConfig(dim=16, layers=(3, 4)))
    with pytest.raises(AdapterLoadError, match="'dim': 8.*'dim': 16"):
        other.load_adapters(path)


def test_loading_onto_other_backbone_weights_names_both(tmp_path: Path) -> None:
    path = tmp_path / "adapters.safetensors"
    _trained().save_adapters(path)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone().model.state_dict().items()}, str(weights))
    other = MSTA(load_backbone("msta-tiny", str(weights)), TINY_CFG)
    names_both = r"msta-tiny \(weights random-init:\).*msta-tiny \(weights [0-9a-f]{12}\)"
    with pytest.raises(AdapterLoadError, match=names_both):
        other.load_adapters(path)


def test_unreadable_adapter_files_are_clear(tmp_path: Path) -> None:
    model = MSTA(tiny_backbone(), TINY_CFG)
    with pytest.raises(AdapterLoadError, match="not found"):
        model.load_adapters(tmp_path / "absent.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(AdapterLoadError, match="not an MSTA adapter file"):
        model.load_adapters(plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_zero_scale_is_exact_and_bf16_training_runs() -> None:
    device = torch.device("cuda")
    frames = clips().to(device)
    backbone = tiny_backbone().to(device)
    ref = frozen_references(backbone, frames, [f"a video of {c}." for c in CLASSES])
    assert_reproduces_frozen_clip(MSTA(backbone, AdapterConfig(dim=8, layers=(3, 4), scale=0.0)), frames, ref)

    model = MSTA(tiny_backbone().to(device), TINY_CFG)
    assert all(p.device.type == "cuda" for p in model.trainable_parameters())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(frames, CLASSES)
    F.cross_entropy(logits.float(), torch.tensor([0, 2], device=device)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trainable_parameters())
