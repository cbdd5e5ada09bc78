"""MSTA adapters: config, gradient scaling, temporal conv, wrapping of open_clip blocks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from safetensors.torch import save_file
from torch import nn

from msta.method.adapters import (
    AdaptedBlock,
    AdapterConfig,
    AdapterState,
    FrozenBlock,
    TemporalConv,
    TowerAdapter,
    attach_adapters,
    parse_layers,
    scale_grad,
)
from msta.method.backbone import load_backbone

# A CLIP as deep as ViT-B/16 (12 blocks per tower) but tiny, to check layers 8-12 quickly.
DEEP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 12, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 12},
}


@pytest.fixture
def deep_tiny_dir(tmp_path: Path) -> Path:
    """An open_clip local-dir folder (config + random weights) of a 12-block tiny CLIP."""
    folder = tmp_path / "deep-tiny"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": DEEP_TINY}))
    import open_clip

    model = open_clip.CLIP(**DEEP_TINY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


# ---------------------------------------------------------------- config


def test_parse_layers() -> None:
    assert parse_layers("8-12") == (8, 12)
    assert parse_layers(" 12 ") == (12, 12)
    for bad in ("12-8", "0-3", "a-b", "1-2-3", ""):
        with pytest.raises(ValueError):
            parse_layers(bad)


def test_config_round_trip_and_validation() -> None:
    cfg = AdapterConfig(dim=64, layers=(3, 4), scale=0.05, shared=False, temporal_branch="bottleneck", towers="vision")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-safe
    assert AdapterConfig.from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="unknown adapter config keys"):
        AdapterConfig.from_dict({**d, "rank": 3})
    for kwargs, message in [
        ({"dim": 0}, "dim"),
        ({"layers": (5, 4)}, "start <= end"),
        ({"layers": (0, 4)}, "start <= end"),
        ({"scale": -1.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"temporal_branch": "conv"}, "temporal_branch"),
        ({"towers": "audio"}, "towers"),
    ]:
        with pytest.raises(ValueError, match=message):
            AdapterConfig(**kwargs)


def test_layers_must_fit_the_backbone() -> None:
    backbone = load_backbone("msta-tiny")  # 4 blocks per tower
    with pytest.raises(ValueError, match="do not fit the vision tower, which has 4 blocks"):
        attach_adapters(backbone.model, AdapterConfig(layers=(8, 12)))


# ---------------------------------------------------------------- building blocks


def test_scale_grad_is_identity_forward_and_scales_backward() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.25))


def test_temporal_conv_mixes_frames_of_one_clip_at_each_token() -> None:
    b, t, n, c = 2, 5, 3, 4
    conv = TemporalConv(c)
    with torch.no_grad():
        conv.conv.weight.normal_()
        conv.conv.bias.normal_()
    x = torch.randn(b * t, n, c)
    out = conv(x, num_frames=t)
    # Reference: per clip, token and channel, a 3-tap filter over the frames with zero padding.
    clips = x.view(b, t, n, c)
    padded = torch.nn.functional.pad(clips, (0, 0, 0, 0, 1, 1))
    w = conv.conv.weight[:, 0, :]  # (c, 3)
    expected = sum(padded[:, k:k + t] * w[:, k] for k in range(3)) + conv.conv.bias
    assert torch.allclose(out, expected.reshape(b * t, n, c), atol=1e-6)
    with pytest.raises(ValueError, match="do not split"):
        conv(torch.randn(7, n, c), num_frames=t)


def test_init_follows_mma_and_temporal_starts_as_a_no_op() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(64, 64)
    adapter = TowerAdapter(768, 64, shared, AdapterState(), temporal_branch="paper")
    for layer in (adapter.down, adapter.up):
        assert torch.count_nonzero(layer.bias) == 0
        fan_out = layer.weight.shape[0]
        expected_std = (2.0 / fan_out) ** 0.5  # kaiming normal, fan_out, relu
        assert abs(layer.weight.std().item() / expected_std - 1) < 0.05
    assert torch.count_nonzero(adapter.temporal.conv.weight) == 0
    assert torch.count_nonzero(adapter.temporal.conv.bias) == 0


def _block_and_adapter(width: int = 16, dim: int = 4, scale: float = 0.01) -> tuple[AdaptedBlock, TowerAdapter]:
    torch.manual_seed(0)
    block = ResidualAttentionBlock(width, 2).eval()
    for p in block.parameters():
        p.requires_grad_(False)
    state = AdapterState()
    adapter = TowerAdapter(width, dim, nn.Linear(dim, dim), state)
    return AdaptedBlock(block, adapter, scale, batch_first=True, state=state), adapter


def _grads(wrapped: AdaptedBlock, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    x = x.clone().requires_grad_(True)
    for p in wrapped.adapter.parameters():
        p.grad = None
    (wrapped(x) * g).sum().backward()  # linear in the output: the same upstream gradient g for any scale
    return x.grad, [p.grad for p in wrapped.adapter.parameters()]


def test_gradient_scaling_keeps_adapter_grads_unscaled_and_damps_the_stream() -> None:
    lam = 0.01
    wrapped, _ = _block_and_adapter(scale=lam)
    x, g = torch.randn(2, 5, 16), torch.randn(2, 5, 16)

    x_grad, w_grads = _grads(wrapped, x, g)
    wrapped.scale = 1.0  # lambda = 1: no scaling anywhere, plain autograd
    x_grad_unit, w_grads_unit = _grads(wrapped, x, g)
    wrapped.state.enabled = False  # the frozen block alone
    x_grad_frozen, _ = _grads(wrapped, x, g)

    for got, unit in zip(w_grads, w_grads_unit):
        assert torch.allclose(got, unit, rtol=1e-5, atol=1e-7)  # as if unscaled
    through_adapter = x_grad - x_grad_frozen
    through_adapter_unit = x_grad_unit - x_grad_frozen
    assert through_adapter_unit.abs().max() > 1e-3  # the adapter path is not negligible at lambda = 1
    assert torch.allclose(through_adapter, lam * through_adapter_unit, rtol=1e-4, atol=1e-7)


def test_forward_adds_lambda_times_the_adapter() -> None:
    lam = 0.3
    wrapped, adapter = _block_and_adapter(scale=lam)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = wrapped.block(x) + lam * adapter(wrapped.block.ln_1(x))
        assert torch.allclose(wrapped(x), expected, atol=1e-6)
        wrapped.scale = 0.0
        assert torch.equal(wrapped(x), wrapped.block(x))


def test_sequence_first_blocks_get_the_same_result() -> None:
    wrapped, adapter = _block_and_adapter(scale=0.5)
    lnd_block = ResidualAttentionBlock(16, 2, batch_first=False).eval()
    lnd_block.load_state_dict(wrapped.block.state_dict())
    lnd = AdaptedBlock(lnd_block, adapter, 0.5, batch_first=False, state=wrapped.state)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.allclose(lnd(x.transpose(0, 1)).transpose(0, 1), wrapped(x), atol=1e-6)


def test_wrappers_accept_custom_blocks_and_the_checkpoint_call_form() -> None:
    torch.manual_seed(0)
    block = CustomResidualAttentionBlock(16, 2).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        reference = block(x)
        assert torch.equal(FrozenBlock(block)(x, None, None, None), reference)  # checkpoint(r, x, None, None, mask)
        state = AdapterState()
        adapted = AdaptedBlock(block, TowerAdapter(16, 4, nn.Linear(4, 4), state), 0.0, True, state)
        assert torch.equal(adapted(x, None, None, None), reference)


# ---------------------------------------------------------------- attached to a CLIP


def test_shared_projection_is_one_module_in_both_towers() -> None:
    backbone = load_backbone("msta-tiny")
    handle = attach_adapters(backbone.model, AdapterConfig(dim=8, layers=(3, 4)))
    for j in (3, 4):
        assert handle.vision[j].shared is handle.text[j].shared
        assert handle.shared[j] == [handle.vision[j].shared]
    per_tower = sum(p.numel() for m in handle.modules() for p in m.parameters())
    assert sum(p.numel() for p in handle.parameters()) == per_tower - 2 * (8 * 8 + 8)  # counted once
    trainable = [p for p in backbone.model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in handle.parameters()}


def test_unshared_and_single_tower_variants() -> None:
    unshared = attach_adapters(load_backbone("msta-tiny").model, AdapterConfig(dim=8, layers=(4, 4), shared=False))
    assert unshared.vision[4].shared is not unshared.text[4].shared
    vision_only = attach_adapters(load_backbone("msta-tiny").model,
                                  AdapterConfig(dim=8, layers=(4, 4), towers="vision"))
    assert vision_only.text == {} and set(vision_only.vision) == {4}
    text_only = attach_adapters(load_backbone("msta-tiny").model, AdapterConfig(dim=8, layers=(4, 4), towers="text"))
    assert text_only.vision == {} and text_only.text[4].temporal is None


def test_attaching_twice_is_refused() -> None:
    backbone = load_backbone("msta-tiny")
    attach_adapters(backbone.model, AdapterConfig(dim=8, layers=(3, 4)))
    with pytest.raises(ValueError, match="already attached"):
        attach_adapters(backbone.model, AdapterConfig(dim=8, layers=(3, 4)))


def test_video_adapters_need_the_frame_count() -> None:
    backbone = load_backbone("msta-tiny")
    handle = attach_adapters(backbone.model, AdapterConfig(dim=8, layers=(3, 4)))
    images = torch.randn(4, 3, 32, 32)
    with pytest.raises(RuntimeError, match="number of frames per clip"):
        backbone.model.encode_image(images)
    with handle.frames(2):
        assert backbone.model.encode_image(images).shape == (4, 32)
    assert handle.state.num_frames is None  # restored


def test_blocks_below_the_first_adapter_record_no_autograd_state(deep_tiny_dir: Path) -> None:
    backbone = load_backbone(f"local-dir:{deep_tiny_dir}")
    handle = attach_adapters(backbone.model, AdapterConfig(dim=8, layers=(8, 12)))
    blocks = backbone.model.visual.transformer.resblocks
    assert [type(b).__name__ for b in blocks] == ["FrozenBlock"] * 7 + ["AdaptedBlock"] * 5

    current: list[int] = []
    saved_in: list[int] = []
    outputs: dict[int, torch.Tensor] = {}
    def enter(j: int) -> None:
        current.append(j)

    def leave(j: int, output: torch.Tensor) -> None:  # hooks must return None to keep the output
        current.pop()
        outputs[j] = output

    for j, wrapper in enumerate(blocks, start=1):
        wrapper.register_forward_pre_hook(lambda m, a, j=j: enter(j))
        wrapper.register_forward_hook(lambda m, a, o, j=j: leave(j, o))

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_in.append(current[-1] if current else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), handle.frames(2):
        backbone.model.encode_image(torch.randn(2, 3, 16, 16)).sum().backward()

    assert not [j for j in saved_in if 1 <= j <= 7], "blocks 1-7 saved tensors for backward"
    assert {8, 12} <= set(saved_in)  # the adapted part does record what backward needs
    assert outputs[7].grad_fn is None and not outputs[7].requires_grad
    assert outputs[9].grad_fn is not None  # block 8 added a trainable branch
    assert all(p.grad is not None for p in handle.vision[8].parameters())


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    backbone = load_backbone("msta-tiny")
    handle = attach_adapters(backbone.model, AdapterConfig(dim=8, layers=(2, 4), scale=0.1))
    tokens = backbone.tokenize(["a video of pouring water.", "a video of folding paper."])

    def grads() -> list[torch.Tensor]:
        for p in handle.parameters():
            p.grad = None
        backbone.model.encode_text(tokens).square().sum().backward()
        return [p.grad.clone() for p in handle.parameters() if p.grad is not None]

    plain = grads()
    backbone.model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-6)


def test_custom_text_clip_keeps_its_text_transformer_under_text() -> None:
    import open_clip

    model = open_clip.CustomTextCLIP(**open_clip.get_model_config("msta-tiny")).eval()
    tokens = open_clip.get_tokenizer("msta-tiny")(["a video of folding paper."])
    with torch.no_grad():
        reference = model.encode_text(tokens)
    handle = attach_adapters(model, AdapterConfig(dim=8, layers=(3, 4), scale=0.0))
    assert isinstance(model.text.transformer.resblocks[3], AdaptedBlock)
    assert model.text.transformer.resblocks[3].adapter is handle.text[4]
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), reference)
