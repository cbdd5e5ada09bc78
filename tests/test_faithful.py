"""Faithful on real weights: the activation OpenAI's weights need, open_clip folders as one flag, the
adapters' increment under bf16, the base-to-novel split apart from the seed, and the authors' schedule,
optimiser and batch count (checked step by step against their logs in test_authors_logs.py)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from cache.errors import UserError
from msta.method.adapters import AdaptedBlock, AdapterConfig, attach_adapters
from msta.method.backbone import ActivationWarning, BackboneError, check_adapter_fit, load_backbone
from msta.method.registry import canonical_backbone, weights_file
from msta.method.schedule import applied_factor, cosine_lr
from pipeline.commands.dag import TrainOptions, train_data
from stages.formats.datasets import Config

from .conftest import run_cli

OPENAI_MARKERS = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(32),
                  "vocab_size": torch.tensor(49408)}


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = open_clip.create_model("msta-tiny", pretrained=None)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _uses_quick_gelu(model: torch.nn.Module) -> bool:
    return any(isinstance(m, QuickGELU) for m in model.modules())


# ------------------------------------------------------------------ 1. QuickGELU


def test_openai_weights_file_gets_quick_gelu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI's checkpoints carry their marker entries; loaded as a file they must build QuickGELU."""
    state = _tiny_state()
    path = tmp_path / "openai-converted.safetensors"
    save_file({**state, **OPENAI_MARKERS}, str(path))
    loaded = load_backbone("msta-tiny", str(path))
    assert _uses_quick_gelu(loaded.model)
    assert loaded.identity.name == "msta-tiny+quickgelu"  # a different model: the keys change with it

    # Where open_clip has a `-quickgelu` sibling config (ViT-B-16-quickgelu), that model is built.
    quick_cfg = {**open_clip.get_model_config("msta-tiny"), "quick_gelu": True}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "msta-tiny-quickgelu", quick_cfg)
    sibling = load_backbone("msta-tiny", str(path))
    assert sibling.identity.name == "msta-tiny-quickgelu" and _uses_quick_gelu(sibling.model)

    # And the embeddings are those of the QuickGELU model, not of GELU with the same weights.
    tokens = loaded.tokenize(["a video of juggling."])
    gelu = open_clip.create_model("msta-tiny", pretrained=None)
    gelu.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(sibling.model.encode_text(tokens), loaded.model.encode_text(tokens))
        assert not torch.allclose(gelu.encode_text(tokens), loaded.model.encode_text(tokens), atol=1e-4)


def test_plain_weights_file_warns_where_openai_weights_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "weights.safetensors"
    save_file(_tiny_state(), str(path))
    tags = {**open_clip.pretrained._PRETRAINED.get("msta-tiny", {}), "openai": {"url": "x", "quick_gelu": True}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "msta-tiny", tags)
    with pytest.warns(ActivationWarning, match="--backbone msta-tiny-quickgelu"):
        loaded = load_backbone("msta-tiny", str(path))
    assert not _uses_quick_gelu(loaded.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit QuickGELU name is the user's word: no warning
        quick_cfg = {**open_clip.get_model_config("msta-tiny"), "quick_gelu": True}
        monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "msta-tiny-quickgelu", quick_cfg)
        assert _uses_quick_gelu(load_backbone("msta-tiny-quickgelu", str(path)).model)


# ------------------------------------------------------------------ 2. open_clip folders


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "weights" / "my-clip"
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("msta-tiny")}))
    save_file(_tiny_state(), str(path / "model.safetensors"))
    return path


def test_an_open_clip_folder_is_one_flag_in_any_spelling(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canonical = (f"local-dir:{folder}", "")
    monkeypatch.chdir(folder.parent.parent)
    for backbone, pretrained in [(f"local-dir:{folder}", None), (str(folder), None), ("weights/my-clip", None),
                                 ("local-dir:weights/my-clip", None), (None, f"local-dir:{folder}"),
                                 (None, "weights/my-clip"), (f"local-dir:{folder}", "local-dir:weights/my-clip")]:
        assert canonical_backbone(backbone, pretrained) == canonical, (backbone, pretrained)
    assert weights_file(*canonical) == folder / "model.safetensors"  # its digest enters the keys
    check_adapter_fit(f"local-dir:{folder}", AdapterConfig(layers=(2, 4)))  # no mangled path
    with pytest.raises(ValueError, match="do not fit"):
        check_adapter_fit(str(folder), AdapterConfig(layers=(8, 12)))
    with pytest.raises(BackboneError, match="drop --pretrained"):
        canonical_backbone(str(folder), "/some/file.safetensors")
    with pytest.raises(BackboneError, match="drop --backbone"):
        canonical_backbone("ViT-L-14", str(folder))
    assert canonical_backbone(None, None) == ("ViT-B-16", "openai")
    assert canonical_backbone("ViT-B/16", "random") == ("ViT-B-16", "")


def test_cli_takes_a_relative_folder_as_backbone(folder: Path) -> None:
    r = run_cli("params", "--backbone", "weights/my-clip", "--adapter-layers", "2-4", "--adapter-dim", "8",
                cwd=folder.parent.parent)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "total" in r.stdout.lower()
    r = run_cli("params", "--backbone", "local-dir:/nowhere/at/all")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "folder not found" in r.stderr


# ------------------------------------------------------------------ 3. bf16


def test_bf16_keeps_the_adapters_increment() -> None:
    """Where the residual stream is ~2, bf16 spacing (0.0156) is larger than lambda·a: the adapter's
    increment must still arrive (less than 1 % lost), as it would in fp32."""
    torch.manual_seed(0)
    model = open_clip.create_model("msta-tiny", pretrained=None)
    handle = attach_adapters(model, AdapterConfig(dim=16, layers=(4, 4), scale=0.005, temporal=False))
    block = model.transformer.resblocks[3]
    assert isinstance(block, AdaptedBlock)
    x16 = (2.0 + 0.5 * torch.randn(2, 10, 64)).bfloat16()  # the stream as bf16 autocast leaves it
    with torch.no_grad():
        a_ref = 0.005 * handle.text[4](block.block.ln_1(x16.float()))  # fp32 reference of lambda·a
        with torch.autocast("cpu", dtype=torch.bfloat16):
            on = block(x16)
            handle.state.enabled = False
            off = block(x16)
            handle.state.enabled = True
    lost = ((on.float() - off.float()) - a_ref).norm() / a_ref.norm()
    assert lost < 0.01, f"{100 * float(lost):.1f} % of lambda·a lost under bf16"  # 51 % with a bf16 sum


# ------------------------------------------------------------------ 4. split apart from the seed


def _hmdb_config(tmp_path: Path, shared_data: Path) -> Config:
    config = tmp_path / "msta.toml"
    config.write_text(f'[datasets.hmdb51]\nlabels = "{shared_data}/labels/hmdb_51_labels.csv"\n'
                      f'video_root = "{tmp_path}"\nsplits_dir = "{shared_data}/splits/hmdb_splits"\n'
                      f'base_labels = "{shared_data}/labels/hmdb_51_base_labels.csv"\n'
                      f'novel_labels = "{shared_data}/labels/hmdb_51_novel_labels.csv"\n'
                      f'b2n_splits_dir = "{shared_data}/splits/base2novel_splits/hmdb_splits"\n')
    return Config(config)


def test_base2novel_split_is_not_the_training_seed(tmp_path: Path, shared_data: Path) -> None:
    config = _hmdb_config(tmp_path, shared_data)
    ds = config.dataset("hmdb51")
    for split in (1, 2, 3):  # the default training seed 2048 reads the official list of each split
        data = train_data(config, ds, TrainOptions(protocol="base2novel", split_seed=split, seed=2048))
        assert data.list_name == f"train_s{split}" and data.selection.per_class is None
        assert data.dataset.lists[data.list_name].name == f"fs_base_s{split}_train.txt"
    with pytest.raises(UserError, match="--draw-shots"):  # a missing official list is never drawn silently
        train_data(config, ds, TrainOptions(protocol="base2novel", split_seed=7))
    drawn = train_data(config, ds, TrainOptions(protocol="base2novel", split_seed=7, draw=True))
    assert drawn.list_name == "train" and (drawn.selection.per_class, drawn.selection.seed) == (16, 7)
    with pytest.raises(UserError, match="--draw-shots"):
        train_data(config, ds, TrainOptions(protocol="few-shot", shots=3))


# ------------------------------------------------------------------ 5. schedule, optimiser, batches


def test_schedule_is_timms_cosine_over_all_steps() -> None:
    """UCF-101 K=2 (300 steps, 30 warm-up): the authors' logged rates at steps 30 / 150 / 240."""
    for step, logged in ((30, 9.758e-4), (150, 5.05e-4), (240, 1.045e-4), (0, 0.0), (6, 2e-4), (300, 1e-5)):
        assert cosine_lr(step, 1e-3, 300, 30) == pytest.approx(logged, rel=5e-4, abs=1e-12)  # 4 digits quoted


def test_torch_scheduler_shows_the_logged_rate_after_each_step() -> None:
    """The authors' loop sets lr(t) after optimiser step t (and logs it): step t runs with lr(t - 1)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.98), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, applied_factor(300, 30))
    assert opt.param_groups[0]["lr"] == 0.0  # step 0 runs at the warm-up's start, 0
    for t in range(300):
        opt.step()
        sched.step()
        assert sched.get_last_lr()[0] == pytest.approx(cosine_lr(t, 1e-3, 300, 30), rel=1e-12, abs=1e-15)


def test_the_trainer_uses_the_authors_optimiser_and_drops_the_last_partial_batch() -> None:
    from msta.method.adapters import AdapterConfig
    from msta.method.backbone import load_backbone
    from msta.method.model import MSTA
    from msta.train import Optimisation, Targets, Trainer

    clips = torch.utils.data.TensorDataset(torch.zeros(202, 1), torch.zeros(202, dtype=torch.long))  # UCF-101 K=2
    model = MSTA(load_backbone("msta-tiny", None), AdapterConfig(dim=8, layers=(3, 4)))
    trainer = Trainer(model, Optimisation(epochs=2, warmup_epochs=1), Targets(["a", "b"]), clips)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.98) and trainer.optimizer.defaults["eps"] == 1e-8
    assert (trainer.steps_per_epoch, trainer.micro, trainer.accum) == (6, 32, 1)  # 202 = 6 x 32 + 10 dropped
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0  # the warm-up starts at 0, as the logs show
    for t in range(12):
        trainer.optimizer.step()
        trainer.scheduler.step()
        assert trainer.scheduler.get_last_lr()[0] == pytest.approx(cosine_lr(t, 1e-3, 12, 6), rel=1e-12, abs=1e-15)


def test_loader_cut_to_whole_batches_per_rank() -> None:
    from msta.video.dataset import epoch_steps, make_loader

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 202  # UCF-101 K=2

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.tensor(i), 0

    for world in (1, 2, 8):
        steps = epoch_steps(202, 32, world)
        assert steps == 6
        seen: list[int] = []
        for rank in range(world):
            loader = make_loader(Items(), 32 // world, shuffle=True, seed=2048, epoch=3, rank=rank, world_size=world,
                                 steps=steps)
            batches = [b[0].tolist() for b in loader]
            assert len(batches) == steps and all(len(b) == 32 // world for b in batches)
            seen += sum(batches, [])
        assert len(seen) == len(set(seen)) == steps * 32  # 6 full batches of distinct clips; the rest dropped
    assert (epoch_steps(348, 32, 1), epoch_steps(348, 32, 8)) == (10, 11)  # SSv2 K=2: the logs show 11


# ------------------------------------------------------------------ 6. fresh frames every epoch


def test_frame_pool_draws_new_offsets_every_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import msta.video.dataset
    from msta.video.clipstore import save_clip
    from msta.video.dataset import ClipDataset
    from msta.video.decode import Sampling, decode_clip

    from .videos import read_index, write_video

    video = write_video(tmp_path / "v.mp4", 60)
    pool = decode_clip(video, Sampling("train", frames=8, pool=512, short_side=64), decoder="pyav", key="v")
    assert pool.shape[:2] == (1, 60) and [read_index(f) for f in pool[0]] == list(range(60))  # every frame
    capped = decode_clip(video, Sampling("train", frames=8, pool=16, short_side=64), decoder="pyav", key="v")
    assert [read_index(f) for f in capped[0]] == [int((i + 0.5) * 60 / 16) for i in range(16)]  # evenly spaced
    fixed = decode_clip(video, Sampling("train", frames=8, samplings=2, short_side=64), decoder="pyav", key="v")
    save_clip(tmp_path / "pool.clip", pool)
    save_clip(tmp_path / "fixed.clip", fixed)
    # Read the frame indices back, untouched by augmentation.
    monkeypatch.setattr(msta.video.dataset, "train_transform", lambda clip, *a, **k: torch.from_numpy(clip.copy()))

    def draws(name: str) -> list[tuple[int, ...]]:
        ds = ClipDataset([(str(tmp_path / name), 0)], "train", 64, seed=2048, frames=8)
        out = []
        for epoch in range(12):
            ds.set_epoch(epoch)
            out.append(tuple(read_index(f) for f in ds[0][0].numpy()))
        return out

    pooled = draws("pool.clip")
    assert pooled == draws("pool.clip")  # a function of (seed, epoch, index): resumes see the same frames
    assert len(set(pooled)) >= 11  # new offsets (almost) every epoch, against at most 2 fixed draws
    assert len(set(draws("fixed.clip"))) <= 2
    for draw in pooled:  # TSN: one frame in each of the 8 segments
        assert all(60 * t // 8 <= i < 60 * (t + 1) // 8 for t, i in enumerate(draw))
