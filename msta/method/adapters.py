"""MSTA adapters (msta/METHOD.md §1), attached by wrapping an open_clip model's transformer blocks.

For each adapted block j of a tower m (vision or text), with x the block's input:

    h     = ReLU(W_shared_j · ReLU(W_down_j^m · ln_1(x)))
    a     = W_up^t h                          (text)
    a     = u + TConv_j(u),  u = W_up^v h     (video; TConv mixes the T frames of a clip)
    x_out = Block_j(x) + lambda · a

The wrapper calls the original open_clip block unchanged and adds the adapter branch, so the
frozen path is exactly open_clip's. Blocks before the first adapted layer run under no_grad:
nothing below them is trainable, so recording autograd state there is pure waste.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TEMPORAL_BRANCHES = ("paper", "bottleneck")
TOWERS = ("vision", "text", "both")


def parse_layers(spec: str) -> tuple[int, int]:
    """'8-12' -> (8, 12); '12' -> (12, 12). Layers are 1-based and inclusive."""
    parts = spec.strip().split("-")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"adapter layers must look like '8-12' or '12', got {spec!r}")
    start, end = int(parts[0]), int(parts[-1])
    if not 1 <= start <= end:
        raise ValueError(f"adapter layers {spec!r}: need 1 <= start <= end")
    return start, end


@dataclass(frozen=True)
class AdapterConfig:
    dim: int = 128                      # bottleneck r
    layers: tuple[int, int] = (8, 12)   # 1-based, inclusive
    scale: float = 0.005                # lambda
    shared: bool = True                 # one r->r projection per depth shared by both towers
    temporal: bool = True               # depthwise temporal conv on the video side
    temporal_branch: str = "paper"      # "paper": on the up-projection; "bottleneck": on ReLU(W_down x)
    towers: str = "both"                # "vision" | "text" | "both"

    def __post_init__(self) -> None:
        # JSON gives lists; keep the field hashable and comparable.
        object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"adapter dim must be a positive integer, got {self.dim!r}")
        if len(self.layers) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.layers):
            raise ValueError(f"adapter layers must be two integers (start, end), got {self.layers!r}")
        if not 1 <= self.layers[0] <= self.layers[1]:
            raise ValueError(f"adapter layers {self.layers}: need 1 <= start <= end (1-based, inclusive)")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"adapter scale must be a finite number >= 0, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))  # 0 and 0.0 serialise alike
        if self.temporal_branch not in TEMPORAL_BRANCHES:
            raise ValueError(f"temporal_branch must be one of {TEMPORAL_BRANCHES}, got {self.temporal_branch!r}")
        if self.towers not in TOWERS:
            raise ValueError(f"towers must be one of {TOWERS}, got {self.towers!r}")

    @property
    def layer_range(self) -> range:
        return range(self.layers[0], self.layers[1] + 1)

    @property
    def adapts_vision(self) -> bool:
        return self.towers in ("vision", "both")

    @property
    def adapts_text(self) -> bool:
        return self.towers in ("text", "both")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown adapter config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, factor)


@dataclass
class AdapterState:
    """Run-time switches shared by every wrapped block of one attachment."""
    enabled: bool = True
    num_frames: int | None = None   # frames per clip, set by the video encoder; never guessed from shapes


class TemporalConv(nn.Module):
    """Depthwise Conv1d (kernel 3, padding 1) over the T frames of each clip, at every token position.

    Tokens come frame-batched, (B*T, N, C), from an image CLIP; or `joint`, one sequence per clip,
    (B, 1 + N*T, C) = [CLS] + N patches x T frames in (n t) order, from a video CLIP (ViCLIP). There
    the clip's one CLS token has no time axis: it is convolved as a sequence of one step (the centre
    tap and the bias), which is what every token of a one-frame clip gets on an image CLIP.
    """

    def __init__(self, channels: int, joint: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=True)
        self.joint = joint
        # Zero init: the branch starts as a no-op, so the model at init is the image adapter.
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def _joint(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        b, length, c = x.shape
        if (length - 1) % num_frames:
            raise ValueError(f"{length - 1} patch tokens do not split into clips of {num_frames} frames")
        n = (length - 1) // num_frames
        patches = self.conv(x[:, 1:].reshape(b * n, num_frames, c).transpose(1, 2))  # (B*N, C, T)
        cls = self.conv(x[:, :1].transpose(1, 2))                                      # (B, C, 1)
        return torch.cat([cls.transpose(1, 2), patches.transpose(1, 2).reshape(b, n * num_frames, c)], dim=1)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if self.joint:
            return self._joint(x, num_frames)
        bt, n, c = x.shape  # frames batched: (B*T, N, C)
        if bt % num_frames:
            raise ValueError(f"{bt} frames do not split into clips of {num_frames} frames")
        b = bt // num_frames
        y = x.reshape(b, num_frames, n, c).permute(0, 2, 3, 1).reshape(b * n, c, num_frames)
        y = self.conv(y)
        return y.reshape(b, n, c, num_frames).permute(0, 3, 1, 2).reshape(bt, n, c)


def _kaiming_linear(d_in: int, d_out: int) -> nn.Linear:
    layer = nn.Linear(d_in, d_out)
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")  # as MMA
    nn.init.zeros_(layer.bias)
    return layer


class TowerAdapter(nn.Module):
    """One tower's adapter at one depth: down -> shared -> up, plus the temporal branch on video."""

    def __init__(
        self,
        width: int,
        dim: int,
        shared: nn.Linear,
        state: AdapterState,
        temporal_branch: str | None = None,  # None: no temporal conv (text, or temporal=False)
        joint_frames: bool = False,          # tokens of a clip in one sequence (see TemporalConv)
    ):
        super().__init__()
        self.down = _kaiming_linear(width, dim)
        self.shared = shared  # the same module object in both towers when cfg.shared
        self.up = _kaiming_linear(dim, width)
        self.temporal_branch = temporal_branch
        self.temporal = None
        if temporal_branch is not None:
            self.temporal = TemporalConv(dim if temporal_branch == "bottleneck" else width, joint_frames)
        self.state = state

    def _frames(self) -> int:
        if self.state.num_frames is None:
            raise RuntimeError(
                "the video adapters need the number of frames per clip: encode frames inside "
                "`with adapters.frames(T):` (MSTA.encode_video does this)"
            )
        return self.state.num_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x = ln_1(block input), (batch, tokens, width)
        d = F.relu(self.down(x))
        if self.temporal_branch == "bottleneck":
            d = d + self.temporal(d, self._frames())
        a = self.up(F.relu(self.shared(d)))
        if self.temporal_branch == "paper":
            a = a + self.temporal(a, self._frames())
        return a


def _call_block(
    block: nn.Module,
    q_x: torch.Tensor,
    k_x: torch.Tensor | None,
    v_x: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
) -> torch.Tensor:
    # CustomResidualAttentionBlock takes (x, attn_mask) only; pass k/v just when given.
    if k_x is None and v_x is None:
        return block(q_x, attn_mask=attn_mask)
    return block(q_x, k_x, v_x, attn_mask=attn_mask)


class FrozenBlock(nn.Module):
    """A block below every adapter: runs under no_grad so it records no autograd state."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer.get_cast_dtype asks block 0
        return self.block.get_weight_dtype()

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        with torch.no_grad():
            return _call_block(self.block, q_x, k_x, v_x, attn_mask)


class AdaptedBlock(nn.Module):
    """x_out = Block(x) + lambda · adapter(ln_1(x)), with MMA's gradient scaling."""

    def __init__(self, block: nn.Module, adapter: TowerAdapter, scale: float, batch_first: bool, state: AdapterState):
        super().__init__()
        self.block = block
        self.adapter = adapter
        self.scale = scale
        self.batch_first = batch_first
        self.state = state

    def get_weight_dtype(self) -> torch.dtype:
        return self.block.get_weight_dtype()

    def forward(
        self,
        q_x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = _call_block(self.block, q_x, k_x, v_x, attn_mask)
        if not self.state.enabled or self.scale == 0:
            return out  # exactly the frozen block; also avoids 1/0 below
        # Under bf16 autocast the residual stream is bf16, whose spacing (0.0078 at 1, 0.0156 at 2)
        # is larger than lambda·a (~0.002-0.005 at lambda 0.005): added there, most of the adapter's
        # increment would round away. So the small adapter runs in fp32 and its sum with the stream
        # is fp32; the stream then stays fp32 in the blocks above (their bf16 branch outputs add to
        # it by type promotion), while every large matmul still runs in bf16.
        with torch.autocast(device_type=q_x.device.type, enabled=False):
            x = self.block.ln_1(q_x.float())
            if not self.batch_first:  # older open_clip hands blocks (tokens, batch, width)
                x = x.transpose(0, 1)
            if torch.is_grad_enabled():
                # The adapter's weights see unscaled gradients; the frozen stream's gradient through
                # the adapter is damped by lambda (MMA).
                a = scale_grad(self.scale * self.adapter(scale_grad(x, self.scale)), 1.0 / self.scale)
            else:  # same values; skips two autograd Function calls per block at inference
                a = self.scale * self.adapter(x)
            if not self.batch_first:
                a = a.transpose(0, 1)
            return out.float() + a


@dataclass
class AttachedAdapters:
    """Handle on the adapters attached to one open_clip model (the modules live inside it)."""
    cfg: AdapterConfig
    state: AdapterState
    vision: dict[int, TowerAdapter]   # 1-based layer -> adapter
    text: dict[int, TowerAdapter]
    shared: dict[int, list[nn.Linear]]  # one module per depth, or one per tower when not cfg.shared

    def modules(self) -> Iterator[nn.Module]:
        yield from self.vision.values()
        yield from self.text.values()

    def temporal_parameters(self) -> list[nn.Parameter]:
        """The temporal branches' filters and biases (an optimiser group of their own, see MSTA.parameter_groups)."""
        return [p for module in self.modules() for sub in module.modules() if isinstance(sub, TemporalConv)
                for p in sub.parameters()]

    def parameters(self) -> list[nn.Parameter]:
        """Every adapter parameter once (the shared projections are reachable from both towers)."""
        seen: dict[int, nn.Parameter] = {}
        for module in self.modules():
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    @contextlib.contextmanager
    def frames(self, num_frames: int) -> Iterator[None]:
        """Tell the temporal branch how many consecutive frames of the batch form one clip."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        previous, self.state.num_frames = self.state.num_frames, num_frames
        try:
            yield
        finally:
            self.state.num_frames = previous


def vision_transformer(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    transformer = getattr(visual, "transformer", None)
    if not hasattr(transformer, "resblocks"):
        raise ValueError(
            f"MSTA needs a ViT vision tower with transformer blocks; {type(visual).__name__} has none "
            "(ResNet and timm towers are not supported)"
        )
    return transformer


def text_transformer(model: nn.Module) -> nn.Module:
    # CLIP keeps the text transformer at the top level; CustomTextCLIP under model.text.
    transformer = getattr(model, "transformer", None)
    if transformer is None:
        transformer = getattr(getattr(model, "text", None), "transformer", None)
    if not hasattr(transformer, "resblocks"):
        raise ValueError("MSTA needs an open_clip text transformer with blocks (HF text towers are not supported)")
    return transformer


def _check_depth(cfg: AdapterConfig, tower: str, depth: int) -> None:
    if cfg.layers[1] > depth:
        raise ValueError(
            f"adapter layers {cfg.layers[0]}-{cfg.layers[1]} do not fit the {tower} tower, "
            f"which has {depth} blocks (layers are 1-based)"
        )


def _wrap_tower(
    transformer: nn.Module,
    adapters: dict[int, TowerAdapter],
    cfg: AdapterConfig,
    state: AdapterState,
) -> None:
    # open_clip >= 2.24 sets batch_first; older versions hand blocks (tokens, batch, width).
    batch_first = getattr(transformer, "batch_first", False)
    first_adapted = min(adapters, default=len(transformer.resblocks) + 1)
    for j in range(1, len(transformer.resblocks) + 1):
        block = transformer.resblocks[j - 1]
        if j in adapters:
            transformer.resblocks[j - 1] = AdaptedBlock(block, adapters[j], cfg.scale, batch_first, state)
        elif j < first_adapted:
            transformer.resblocks[j - 1] = FrozenBlock(block)


def is_attached(model: nn.Module) -> bool:
    return any(isinstance(m, (AdaptedBlock, FrozenBlock)) for m in model.modules())


def attach_adapters(model: nn.Module, cfg: AdapterConfig) -> AttachedAdapters:
    """Freeze `model` and wrap its blocks with MSTA adapters; returns a handle on them."""
    if is_attached(model):
        raise ValueError("adapters are already attached to this model; load a fresh backbone")
    vis_tf, txt_tf = vision_transformer(model), text_transformer(model)
    if cfg.adapts_vision:
        _check_depth(cfg, "vision", len(vis_tf.resblocks))
    if cfg.adapts_text:
        _check_depth(cfg, "text", len(txt_tf.resblocks))
    for p in model.parameters():
        p.requires_grad_(False)

    state = AdapterState()
    handle = AttachedAdapters(cfg=cfg, state=state, vision={}, text={}, shared={})
    ref = next(model.parameters())
    for j in cfg.layer_range:
        common = _kaiming_linear(cfg.dim, cfg.dim) if cfg.shared else None
        handle.shared[j] = [common] if common is not None else []
        towers = [("vision", vis_tf, handle.vision)] if cfg.adapts_vision else []
        towers += [("text", txt_tf, handle.text)] if cfg.adapts_text else []
        for tower, transformer, out in towers:
            shared = common
            if shared is None:
                shared = _kaiming_linear(cfg.dim, cfg.dim)
                handle.shared[j].append(shared)
            temporal = cfg.temporal_branch if (tower == "vision" and cfg.temporal) else None
            joint = getattr(transformer, "joint_frames", False)  # a video CLIP's vision tower (msta/method/viclip.py)
            out[j] = TowerAdapter(transformer.width, cfg.dim, shared, state, temporal, joint)
    for adapter in handle.modules():
        adapter.to(device=ref.device, dtype=ref.dtype)

    _wrap_tower(vis_tf, handle.vision, cfg, state)
    _wrap_tower(txt_tf, handle.text, cfg, state)
    return handle


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as the frozen CLIP, whatever adapters are attached to it."""
    states = {id(m.state): m.state for m in model.modules() if isinstance(m, AdaptedBlock)}
    previous = {k: s.enabled for k, s in states.items()}
    for s in states.values():
        s.enabled = False
    try:
        yield
    finally:
        for k, s in states.items():
            s.enabled = previous[k]
