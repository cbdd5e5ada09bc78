"""ViCLIP (InternVid's video CLIP) as a backbone: the released checkpoint layout, the joint space-time
encoder, MSTA on it (exact at zero scale, the 1,744,000 of the authors' logs), and the pipeline around it.

The layout below is written from InternVid's public source (Data/InternVid/viclip/viclip_vision.py,
viclip_text.py, viclip.py), independently of msta/method/viclip.py, so that the two check each other.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msta.method.adapters import AdapterConfig, TemporalConv
from msta.method.backbone import BackboneError, load_backbone
from msta.method.model import MSTA, VideoCLIP, full_finetune
from msta.method.params import parameter_table
from msta.method.registry import canonical_backbone, weights_file
from msta.method.viclip import CONFIGS, Attention, ViCLIPConfig

from .conftest import catalog_rows, run_cli

TINY = CONFIGS["ViCLIP-tiny"]
CLASSES = ["pouring water", "folding paper", "opening a door"]


def released_layout(c: ViCLIPConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a released ViCLIP state dict (`torch.load(f)['model']`)."""
    v, t, grid = c.vision_width, c.text_width, c.image_size // c.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "temp": (),
        "vision_encoder.conv1.weight": (v, 3, 1, c.patch_size, c.patch_size),  # Conv3d, no bias
        "vision_encoder.class_embedding": (v,),
        "vision_encoder.positional_embedding": (grid * grid + 1, v),
        "vision_encoder.temporal_positional_embedding": (1, c.num_frames, v),
        "vision_encoder.proj": (v, c.embed_dim),
        "text_encoder.token_embedding.weight": (c.vocab_size, t),
        "text_encoder.positional_embedding": (c.context_length, t),
        "text_encoder.text_projection": (t, c.embed_dim),
    }
    for name, width in (("vision_encoder.ln_pre", v), ("vision_encoder.ln_post", v), ("text_encoder.ln_final", t)):
        shapes.update({f"{name}.weight": (width,), f"{name}.bias": (width,)})
    for tower, width, layers in (("vision_encoder", v, c.vision_layers), ("text_encoder", t, c.text_layers)):
        for i in range(layers):
            b = f"{tower}.transformer.resblocks.{i}."
            shapes.update({  # nn.MultiheadAttention, LayerNorms, the MLP (c_fc, QuickGELU, c_proj)
                b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                b + "ln_1.weight": (width,), b + "ln_1.bias": (width,), b + "ln_2.weight": (width,),
                b + "ln_2.bias": (width,), b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,),
                b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,)})
    return shapes


def random_release(c: ViCLIPConfig = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: 0.05 * torch.randn(shape, generator=g) for k, shape in released_layout(c).items()}
    for k in state:
        if "ln_" in k and k.endswith("weight"):
            state[k] += 1
    state["temp"] = torch.tensor(0.02)
    return state


@pytest.fixture
def release(tmp_path: Path) -> Path:
    """A ViCLIP-tiny checkpoint saved as InternVid saves theirs: {'model': state dict, ...}."""
    path = tmp_path / "ViClip-tiny.pth"
    torch.save({"model": random_release(), "epoch": 7}, path)
    return path


def clips(b: int = 2, t: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- checkpoints


def test_released_layout_loads_strictly_and_its_digest_is_the_files(release: Path) -> None:
    loaded = load_backbone("ViCLIP-tiny", str(release))
    expected = random_release()
    got = loaded.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    digest = hashlib.sha256(release.read_bytes()).hexdigest()
    assert loaded.identity.weights_digest == digest and loaded.identity.pretrained == str(release)
    assert loaded.identity.tokenizer == "open_clip:SimpleTokenizer:ctx32"
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert (loaded.mean, loaded.std, loaded.image_size) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32)
    assert loaded.model.logit_scale.exp().item() == pytest.approx(50.0)  # 1 / temp
    # The folder holding the file is the same weights, and the same file enters the stage keys.
    name, weights = canonical_backbone("ViCLIP-tiny", str(release.parent))
    assert weights == str(release.resolve()) and weights_file(name, weights) == release.resolve()
    assert load_backbone("ViCLIP-tiny", str(release.parent)).identity.weights_digest == digest


def test_module_prefix_and_safetensors_load_too(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.save({"model": {f"module.{k}": v for k, v in random_release().items()}}, tmp_path / "ddp.pth")
    save_file({k: v.contiguous() for k, v in random_release().items()}, str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "ddp.pth", tmp_path / "w.safetensors"):
        assert torch.equal(load_backbone("ViCLIP-tiny", str(path)).model.temp, torch.tensor(0.02))


def test_a_file_of_another_layout_names_its_keys_in_one_line(tmp_path: Path) -> None:
    state = random_release()
    del state["vision_encoder.ln_post.bias"]
    state["vision_encoder.head.weight"] = torch.zeros(3)
    state["vision_encoder.proj"] = torch.zeros(64, 16)
    path = tmp_path / "wrong.pth"
    torch.save({"model": state}, path)
    with pytest.raises(BackboneError) as info:
        load_backbone("ViCLIP-tiny", str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: not a ViCLIP-tiny checkpoint")
    assert "missing keys: vision_encoder.ln_post.bias" in message
    assert "unexpected keys: vision_encoder.head.weight" in message
    assert "vision_encoder.proj (64, 16) != (64, 32)" in message
    # An image CLIP's weights: every key is wrong, the lists are cut short with their counts.
    from safetensors.torch import save_file

    clip = load_backbone("msta-tiny")
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(BackboneError, match=r"missing keys: .*\(\d+ in all\); unexpected keys: .*\(\d+ in all\)"):
        load_backbone("ViCLIP-tiny", str(tmp_path / "clip.safetensors"))
    # And the other way round: a ViCLIP file given to an open_clip name says which flag it needs.
    torch.save({"model": random_release()}, tmp_path / "viclip.pth")
    with pytest.raises(BackboneError, match="a ViCLIP checkpoint .*--backbone ViCLIP-B-16"):
        load_backbone("msta-tiny", str(tmp_path / "viclip.pth"))


class _Config:
    """Not a tensor: InternVid-style config objects in a checkpoint need pickle to load."""


def test_pickle_code_missing_files_and_unknown_names_are_refused(tmp_path: Path) -> None:
    torch.save({"model": random_release(), "config": _Config()}, tmp_path / "pickled.pth")
    with pytest.raises(BackboneError, match="pickle"):
        load_backbone("ViCLIP-tiny", str(tmp_path / "pickled.pth"))
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("ViCLIP-tiny", str(tmp_path / "absent.pth"))
    with pytest.raises(BackboneError, match="unknown ViCLIP model 'ViCLIP-B-32'.*ViCLIP-B-16"):
        load_backbone("ViCLIP-B-32")
    with pytest.raises(BackboneError, match="meta device holds no weights"):
        load_backbone("ViCLIP-tiny", str(tmp_path / "pickled.pth"), device="meta")


@pytest.mark.parametrize("name", ["ViCLIP-B-16", "ViCLIP-L-14"])
def test_the_real_configs_have_the_released_layout(name: str) -> None:
    meta = load_backbone(name, device="meta")
    got = {k: tuple(v.shape) for k, v in meta.model.state_dict().items()}
    assert got == released_layout(CONFIGS[name])
    if name == "ViCLIP-B-16":
        assert (meta.vision_width, meta.text_width, meta.vision_layers, meta.text_layers) == (768, 512, 12, 12)
        assert (meta.embed_dim, meta.context_length, meta.image_size) == (512, 32, 224)


def test_msta_on_viclip_b_16_has_the_logged_trainable_total() -> None:
    assert parameter_table("ViCLIP-B-16", AdapterConfig()).trainable == 1_744_000  # "1.744 MB" in every log


def test_params_cli_prints_the_logged_total() -> None:
    r = run_cli("params", "--backbone", "ViCLIP-B-16")
    assert r.returncode == 0, r.stderr
    assert "MSTA adapters on ViCLIP-B-16" in r.stdout and "trainable 1,744,000 of" in r.stdout


# ---------------------------------------------------------------- the encoder


@pytest.mark.parametrize("causal", [False, True])
def test_attention_is_multihead_attention_maths_through_sdpa(causal: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    ours, reference = Attention(16, 4, causal), nn.MultiheadAttention(16, 4, batch_first=True)
    reference.load_state_dict(ours.state_dict())  # the same parameter names
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        reference.in_proj_bias.copy_(ours.in_proj_bias)
    x = torch.randn(3, 7, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(7) if causal else None
    calls: list[int] = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        got = ours(x)
    assert calls == [1]
    expected = reference(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_the_clip_is_one_joint_sequence_and_frame_order_matters() -> None:
    model = load_backbone("ViCLIP-tiny", None).model
    with torch.no_grad():
        model.vision_encoder.temporal_positional_embedding.normal_()
        x = clips()
        forward, backward = model.encode_image(x), model.encode_image(x.flip(1))
        assert forward.shape == (2, TINY.embed_dim)
        assert not torch.allclose(forward, backward, atol=1e-4)  # a frame mean could not tell them apart
        # An image is a one-frame clip (InternVid's encode_vision), with the mean temporal embedding.
        assert torch.equal(model.encode_image(x[:, 0]), model.encode_image(x[:, :1]))


def test_the_temporal_embedding_adapts_to_the_clip_length() -> None:
    vision = load_backbone("ViCLIP-tiny", None).model.vision_encoder
    with torch.no_grad():
        vision.temporal_positional_embedding.copy_(torch.arange(8.0).view(1, 8, 1).expand(1, 8, 64))
    e = vision.temporal_positional_embedding
    assert vision.temporal_embedding(8) is e
    assert torch.equal(vision.temporal_embedding(3), e[:, :3])               # fewer frames: the first ones
    assert torch.allclose(vision.temporal_embedding(1), e.mean(1, keepdim=True))  # an image: the mean
    sixteen = vision.temporal_embedding(16)[0, :, 0]                        # more: linear interpolation
    assert sixteen.shape == (16,) and sixteen[0] == 0 and sixteen[-1] == 7 and bool((sixteen.diff() >= 0).all())
    for t in (1, 3, 16):
        assert vision(clips(1, t)).shape == (1, TINY.embed_dim)


def test_a_checkpoint_trained_on_other_clip_lengths_loads(tmp_path: Path) -> None:
    state = random_release()
    state["vision_encoder.temporal_positional_embedding"] = torch.randn(1, 4, 64)
    torch.save({"model": state}, tmp_path / "t4.pth")
    model = load_backbone("ViCLIP-tiny", str(tmp_path / "t4.pth")).model
    assert model.vision_encoder.temporal_positional_embedding.shape == (1, 4, 64)
    assert model.encode_image(clips(1, 8)).shape == (1, TINY.embed_dim)


# ---------------------------------------------------------------- MSTA on ViCLIP


def test_joint_temporal_conv_convolves_each_patch_over_its_frames() -> None:
    torch.manual_seed(0)
    conv = TemporalConv(5, joint=True)
    with torch.no_grad():
        conv.conv.weight.normal_()
        conv.conv.bias.normal_()
    b, n, t = 2, 3, 4
    x = torch.randn(b, 1 + n * t, 5)
    got = conv(x, t)
    w, bias = conv.conv.weight[:, 0], conv.conv.bias  # (C, 3), (C,)
    for i in range(n):
        seq = x[:, 1 + i * t: 1 + (i + 1) * t]                  # patch i over the T frames: (n t) order
        padded = F.pad(seq.transpose(1, 2), (1, 1))            # (B, C, T + 2)
        expected = sum(w[:, k, None] * padded[:, :, k:k + t] for k in range(3)) + bias[:, None]
        assert torch.allclose(got[:, 1 + i * t: 1 + (i + 1) * t], expected.transpose(1, 2), atol=1e-5)
    assert torch.allclose(got[:, 0], x[:, 0] * w[:, 1] + bias, atol=1e-6)  # CLS: a one-step sequence
    with pytest.raises(ValueError, match="do not split"):
        conv(x, 5)


def test_msta_at_zero_scale_reproduces_the_frozen_viclip_exactly(release: Path) -> None:
    backbone = load_backbone("ViCLIP-tiny", str(release))
    x = clips()
    with torch.no_grad():
        frozen_video = F.normalize(backbone.model.encode_image(x), dim=-1)
        frozen_text = F.normalize(backbone.model.encode_text(backbone.tokenize([f"a video of {c}." for c in CLASSES])),
                                  dim=-1)
        frozen_logits = VideoCLIP(backbone)(x, CLASSES)
    model = MSTA(backbone, AdapterConfig(dim=8, layers=(2, 4), scale=0.0))
    for adapter in model.adapters.modules():  # a scale of 0 must hide even a trained-looking adapter
        for p in adapter.parameters():
            nn.init.normal_(p)
    with torch.no_grad():
        assert torch.equal(model.encode_video(x), frozen_video)
        assert torch.equal(model.encode_classes(CLASSES), frozen_text)
        assert torch.equal(model(x, CLASSES), frozen_logits)


def test_msta_on_viclip_trains_only_the_adapters_and_moves_with_the_temporal_branch() -> None:
    backbone = load_backbone("ViCLIP-tiny")
    model = MSTA(backbone, AdapterConfig(dim=8, layers=(3, 4), scale=0.5))
    x, y = clips(), torch.tensor([0, 2])
    loss = F.cross_entropy(model(x, CLASSES), y)
    loss.backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(p.grad is None for p in model.clip.parameters() if id(p) not in trainable)
    temporal = model.adapters.temporal_parameters()
    assert len(temporal) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in temporal)
    with torch.no_grad():
        before = model.encode_video(x)
        for p in temporal:
            p.normal_()
        assert not torch.allclose(model.encode_video(x), before)  # the conv acts on the joint sequence
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x, CLASSES)).all()


@pytest.mark.parametrize("cfg", [
    AdapterConfig(dim=8, layers=(3, 4), scale=0.5, temporal_branch="bottleneck"),
    AdapterConfig(dim=8, layers=(3, 4), scale=0.5, shared=False),
    AdapterConfig(dim=8, layers=(3, 4), scale=0.5, temporal=False),
    AdapterConfig(dim=8, layers=(4, 4), scale=0.5, towers="vision"),
    AdapterConfig(dim=8, layers=(1, 4), scale=0.5, towers="text"),
], ids=["bottleneck", "no-shared", "no-temporal", "vision-only", "text-only"])
def test_every_ablation_trains_on_viclip(cfg: AdapterConfig) -> None:
    model = MSTA(load_backbone("ViCLIP-tiny"), cfg)
    with torch.no_grad():
        for p in model.adapters.temporal_parameters():
            p.normal_()  # a non-zero temporal branch, so that its gradient reaches the layers below
    F.cross_entropy(model(clips(), CLASSES), torch.tensor([0, 1])).backward()
    assert model.trainable_parameters() and all(p.grad is not None for p in model.trainable_parameters())


def test_full_finetune_and_adapter_files_work_on_viclip(tmp_path: Path) -> None:
    full = full_finetune(load_backbone("ViCLIP-tiny"))
    assert sum(p.numel() for p in full.trainable_parameters()) == sum(p.numel() for p in full.clip.parameters())
    model = MSTA(load_backbone("ViCLIP-tiny"), AdapterConfig(dim=8, layers=(3, 4)))
    model.save_adapters(tmp_path / "a.safetensors")
    again = MSTA(load_backbone("ViCLIP-tiny"), AdapterConfig(dim=8, layers=(3, 4)))
    again.load_adapters(tmp_path / "a.safetensors")
    x = clips(1)
    with torch.no_grad():
        assert torch.equal(model.encode_video(x), again.encode_video(x))


# ---------------------------------------------------------------- the pipeline


def small_world(tmp_path: Path, home: Path) -> Path:
    """The synthetic world (3 training and 1 test video per class) with its descriptions imported; its config."""
    from msta.world.generate import write_dataset
    from pipeline.commands.demo import world_descriptions

    world = write_dataset(tmp_path / "world", 3, 1, seed=0)
    files = world_descriptions(world)
    config = world / "msta.toml"
    for kind in ("spatial", "temporal"):
        r = run_cli("describe", "-d", "world", "--kind", kind, "--from-file", files[kind], "--config", config,
                    "--home", home)
        assert r.returncode == 0, r.stderr
    return config


TRAIN = ["train", "-d", "world", "--protocol", "few-shot", "--shots", "2", "--epochs", "1", "--batch-size", "8",
         "--adapter-dim", "8", "--adapter-layers", "3-4", "--warmup-epochs", "0", "--workers", "0",
         "--heldout-per-class", "1"]


@pytest.mark.slow
def test_train_and_evaluate_on_viclip_from_a_released_file(tmp_path: Path, home: Path, release: Path) -> None:
    """describe -> embed -> frames -> train -> evaluate -> predict on the synthetic world, from a ViCLIP file."""
    config = small_world(tmp_path, home)
    world = config.parent
    common = ["--backbone", "ViCLIP-tiny", "--pretrained", str(release), "--config", config, "--home", home]
    r = run_cli(*TRAIN, *common)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli("evaluate", "-d", "world", "--config", config, "--home", home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert catalog_rows(home, "SELECT count(*) FROM results WHERE metric = 'top1'")[0][0] > 0
    digest = hashlib.sha256(release.read_bytes()).hexdigest()
    for stage in ("embed", "train"):
        (params, inputs), = catalog_rows(home, f"SELECT params, inputs FROM runs WHERE stage = '{stage}' "
                                               "AND status = 'done'")
        assert json.loads(params)["backbone"] == "ViCLIP-tiny"
        assert json.loads(inputs)["weights"] == digest  # the file's sha256 is part of the stage key
    (dim,), = catalog_rows(home, "SELECT DISTINCT len(embedding) FROM text_embeddings")
    assert dim == TINY.embed_dim
    video = sorted(world.rglob("*.mp4"))[0]
    r = run_cli("predict", video, "--dataset", "world", "--format", "jsonl", "--config", config, "--home", home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(json.loads(r.stdout.splitlines()[0])["top"]) == 5


@pytest.mark.slow
def test_torchrun_trains_msta_on_viclip(tmp_path: Path, home: Path, release: Path) -> None:
    """DDP over gloo on the CPU, two processes: one completed run (bf16 autocast is CUDA's: on the CPU
    `--precision bf16` is refused, since the run would be fp32 under a key that says bf16)."""
    import subprocess
    import sys

    from .conftest import ROOT, cli_env

    config = small_world(tmp_path, home)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29573",
           "-m", "pipeline", *TRAIN, "--device", "cpu", "--precision", "fp32", "--no-progress",
           "--backbone", "ViCLIP-tiny", "--pretrained", str(release), "--config", str(config), "--home", str(home)]
    r = subprocess.run(cmd, cwd=ROOT, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert catalog_rows(home, "SELECT status, count(*) FROM runs WHERE stage = 'train' GROUP BY ALL") == [("done", 1)]


def test_readme_viclip_recipe_dry_runs(tmp_path: Path, home: Path, shared_data: Path) -> None:
    """The README's ViCLIP-B recipe (HMDB-51, K=2) plans every stage against the real label and split files,
    with the authors' description files imported (the recipe's DeepSeek endpoint is not reachable here)."""
    from .test_train import readme_commands

    config = tmp_path / "msta.toml"
    config.write_text(f'[datasets.hmdb51]\nlabels = "{shared_data}/labels/hmdb_51_labels.csv"\n'
                      f'video_root = "{tmp_path}/videos"\nsplits_dir = "{shared_data}/splits/hmdb_splits"\n')
    weights = tmp_path / "ViClip-InternVid-10M-FLT.pth"
    weights.write_bytes(b"not read by a dry run")
    params, describe, train, evaluate = readme_commands("ViCLIP-B")[:4]
    assert params[0] == "params" and describe[0] == "describe" and evaluate[0] == "evaluate"
    r = run_cli(*params)
    assert r.returncode == 0 and "trainable 1,744,000 of" in r.stdout, r.stderr
    common = ["--config", config, "--home", home]
    for kind in ("s", "t"):
        r = run_cli("describe", "-d", "hmdb51", "--kind", {"s": "spatial", "t": "temporal"}[kind], "--from-file",
                    shared_data / "msta_descriptions" / f"2_{kind}_description_hmdb.json", *common)
        assert r.returncode == 0, r.stderr
    train = [str(weights) if a == "/weights/ViClip-InternVid-10M-FLT.pth" else a for a in train]
    assert str(weights) in train and "ViCLIP-B-16" in train
    r = run_cli(*train, "--dry-run", *common)
    assert r.returncode == 0, r.stderr
    assert "would run frames:hmdb51:few_shot_2:train" in r.stdout and "would run embed:hmdb51:ViCLIP-B-16" in r.stdout
    assert "train adapter on hmdb51 (few-shot) for 50 epochs, batch 32, lr 0.001, on cuda" in r.stdout
    for line in ('backbone: "ViCLIP-B-16"', f'pretrained: "{weights}"', 'template: "a photo of a {}."',
                 "n_descriptions: 2", "seed: 2048", 'precision: "fp32"'):
        assert line in r.stdout, line
    assert not catalog_rows(home, "SELECT * FROM runs WHERE stage IN ('train', 'embed', 'frames')")
