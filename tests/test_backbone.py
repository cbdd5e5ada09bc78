"""Loading the frozen CLIP backbone offline: configs, checkpoints, folders, tags, identity."""
from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import msta.method.backbone as backbone_module
from msta.method.adapters import AdapterConfig, attach_adapters
from msta.method.backbone import Backbone, BackboneError, load_backbone


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    torch.manual_seed(0)
    return load_backbone("msta-tiny")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test loudly instead of waiting."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backbone loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in backbone.model.state_dict().items()}


def _same_weights(a: Backbone, b: Backbone) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_packaged_config_is_registered() -> None:
    for path in backbone_module.CONFIG_DIR.glob("*.json"):
        assert path.stem in open_clip.list_models()


def test_tiny_backbone_is_frozen_and_described(tiny: Backbone) -> None:
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert (tiny.embed_dim, tiny.vision_width, tiny.text_width) == (32, 64, 64)
    assert (tiny.vision_layers, tiny.text_layers, tiny.image_size, tiny.context_length) == (4, 4, 32, 32)
    assert tiny.mean == open_clip.OPENAI_DATASET_MEAN and tiny.std == open_clip.OPENAI_DATASET_STD
    assert tiny.identity.to_dict() == {
        "name": "msta-tiny",
        "pretrained": "",
        "weights_digest": "random-init:seed0",
        "tokenizer": "open_clip:SimpleTokenizer:ctx32",
    }


def test_random_init_is_one_model_and_leaves_the_callers_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = load_backbone("msta-tiny"), load_backbone("msta-tiny")
    assert torch.rand(1) == expected_next
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_tokenize_and_count_tokens(tiny: Backbone) -> None:
    tokens = tiny.tokenize(["a video of a dog.", "hi"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 32)
    counts = tiny.count_tokens(["a video of a dog.", "hi", "word " * 50])
    assert counts[:2] == [int((t != 0).sum()) for t in tokens]  # start + words + end
    assert counts[2] == 52  # not truncated to the context length of 32


def test_encode_text_frozen_is_normalised_batched_and_ignores_adapters() -> None:
    torch.manual_seed(0)
    backbone = load_backbone("msta-tiny")
    texts = [f"a video of action number {i}." for i in range(5)]
    expected = torch.nn.functional.normalize(backbone.model.encode_text(backbone.tokenize(texts)), dim=-1)
    handle = attach_adapters(backbone.model, AdapterConfig(dim=8, layers=(1, 4), scale=1.0))
    for adapter in handle.modules():
        torch.nn.init.normal_(adapter.up.weight)  # the adapted text tower now differs from the frozen one
    emb = backbone.encode_text_frozen(texts, batch_size=2)
    assert emb.dtype == torch.float32 and emb.shape == (5, 32) and emb.device.type == "cpu"
    assert torch.allclose(emb, expected.detach(), atol=1e-6)
    assert not emb.is_inference()  # usable as a constant in a training graph
    assert backbone.encode_text_frozen([]).shape == (0, 32)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_with_digest(tmp_path: Path, tiny: Backbone, suffix: str) -> None:
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(_state(tiny), str(path))
    else:
        torch.save({"state_dict": _state(tiny)}, path)
    loaded = load_backbone("msta-tiny", str(path))
    assert _same_weights(loaded, tiny)
    assert loaded.identity.weights_digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.identity.pretrained == str(path)
    assert not any(p.requires_grad for p in loaded.model.parameters())


class _Anything:
    """Not a tensor: loading it needs pickle to import and run this class."""


def test_checkpoint_that_needs_pickle_is_refused(tmp_path: Path, tiny: Backbone) -> None:
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": _state(tiny), "extra": _Anything()}, path)
    with pytest.raises(BackboneError, match="pickle") as info:
        load_backbone("msta-tiny", str(path))
    assert "safetensors" in str(info.value)


def test_wrong_architecture_and_missing_files_are_clear(tmp_path: Path, tiny: Backbone) -> None:
    path = tmp_path / "tiny.safetensors"
    save_file(_state(tiny), str(path))
    with pytest.raises(BackboneError, match="do not fit model 'ViT-B-32'"):
        load_backbone("ViT-B-32", str(path))
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("msta-tiny", str(tmp_path / "absent.safetensors"))
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(BackboneError, match="unsupported checkpoint type"):
        load_backbone("msta-tiny", str(tmp_path / "weights.npz"))


def test_local_dir_as_name_or_pretrained(tmp_path: Path, tiny: Backbone) -> None:
    folder = tmp_path / "my-clip"
    folder.mkdir()
    config = open_clip.get_model_config("msta-tiny")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    with pytest.raises(BackboneError, match="no weights file"):
        load_backbone(f"local-dir:{folder}")
    save_file(_state(tiny), str(folder / "open_clip_model.safetensors"))
    for loaded in (load_backbone(f"local-dir:{folder}"), load_backbone("", f"local-dir:{folder}")):
        assert _same_weights(loaded, tiny)
        assert loaded.identity.name == "local-dir:my-clip"
        assert loaded.identity.weights_digest == hashlib.sha256(
            (folder / "open_clip_model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(BackboneError, match="folder not found"):
        load_backbone(f"local-dir:{tmp_path / 'nowhere'}")


def test_unknown_model_says_how_to_list_names() -> None:
    with pytest.raises(BackboneError, match="unknown model 'ViT-B-61'") as info:
        load_backbone("ViT-B-61")
    assert "known_models()" in str(info.value) and "ViT-B-16" in str(info.value)  # a close match
    assert "ViT-B-16" in backbone_module.known_models()


def test_unknown_tag_lists_the_known_ones() -> None:
    with pytest.raises(BackboneError, match="laion2b_s34b_b88k"):
        load_backbone("ViT-B-16", "no-such-tag")


def test_pretrained_tag_fails_at_once_when_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for tag in ("openai", "laion2b_s34b_b88k"):
        with pytest.raises(BackboneError, match="not on this machine") as info:
            load_backbone("ViT-B-16", tag)
        message = str(info.value)
        assert "--pretrained /path/to/weights" in message and "--backbone local-dir:" in message
        assert "--model" not in message and ("Hugging Face repository" in message or "https://" in message)


def test_pretrained_tag_loads_from_the_local_hf_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: Backbone, no_network: None
) -> None:

    # A tag for the tiny config whose file sits in a HF hub cache laid out as huggingface_hub does.
    tags = dict(open_clip.pretrained._PRETRAINED.get("msta-tiny", {}))
    tags["cached"] = {"hf_hub": "acme/msta-tiny/", "quick_gelu": False}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "msta-tiny", tags)
    snapshot = tmp_path / "hub" / "models--acme--msta-tiny" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_file(_state(tiny), str(snapshot / "open_clip_model.safetensors"))
    (tmp_path / "hub" / "models--acme--msta-tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--msta-tiny" / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_backbone("msta-tiny", "cached")
    assert _same_weights(loaded, tiny)
    assert loaded.identity.pretrained == "cached"


def test_shipped_weights_by_short_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: Backbone) -> None:
    assert backbone_module.SHIPPED["synthetic-world"] == ("msta-world", "synthetic-world.safetensors")
    monkeypatch.setitem(backbone_module.SHIPPED, "tiny-demo", ("msta-tiny", "tiny-demo.safetensors"))
    monkeypatch.setattr(backbone_module, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(BackboneError, match="'tiny-demo' are not in this installation"):
        load_backbone("msta-tiny", "tiny-demo")
    save_file(_state(tiny), str(tmp_path / "tiny-demo.safetensors"))
    loaded = load_backbone("", "tiny-demo")  # the short name implies its architecture
    assert loaded.identity.name == "msta-tiny"
    assert _same_weights(loaded, tiny) and loaded.identity.pretrained == "tiny-demo"
    digest = hashlib.sha256((tmp_path / "tiny-demo.safetensors").read_bytes()).hexdigest()
    assert loaded.identity.weights_digest == digest
    with pytest.raises(BackboneError, match="is for model 'msta-tiny', not 'ViT-B-16'"):
        load_backbone("ViT-B-16", "tiny-demo")


def test_meta_device_builds_without_weights() -> None:
    meta = load_backbone("ViT-B-16", device="meta")
    assert next(meta.model.parameters()).is_meta
    assert sum(p.numel() for p in meta.model.parameters()) == 149_620_737
    assert (meta.vision_width, meta.text_width, meta.vision_layers, meta.embed_dim) == (768, 512, 12, 512)
