"""ViCLIP (InternVid, Wang et al., ICLR 2024): the video CLIP every published MSTA number was measured on.

Our own code, written from the public description of the model (OpenGVLab/InternVideo,
Data/InternVid/viclip). What differs from an image CLIP is the vision tower alone:

    video (B, T, 3, H, W) --Conv3d, kernel (1, p, p)--> N patches per frame
    tokens = [CLS + pos_0] + [patch(n, t) + pos_n + temporal_t for n in 1..N for t in 1..T]   # (n t) order
    ln_pre -> ONE transformer over the 1 + N*T tokens of the clip -> ln_post(CLS) @ proj

so frames attend to each other inside every block, and the clip's embedding is its joint CLS
(no mean over frames). The text tower is OpenAI CLIP's (QuickGELU, causal) with a 32-token context,
and logits are cos / temp. Parameter names follow the released checkpoints (`vision_encoder.*`,
`text_encoder.*`, `temp`; attention as nn.MultiheadAttention's `in_proj_*` / `out_proj`), so those
load strictly; attention itself runs through F.scaled_dot_product_attention (same maths).

The module also answers to the part of open_clip's CLIP that the rest of the project uses
(`visual`, `transformer`, `token_embedding`, `context_length`, `logit_scale`, `encode_image`,
`encode_text`), so Backbone, the adapters and MSTA take it as they take an open_clip model.
"""
from __future__ import annotations

import difflib
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from msta.method.registry import VICLIP_PREFIX, BackboneError

# ImageNet statistics: what InternVid's demo and its training data pipeline normalise with.
VICLIP_MEAN = (0.485, 0.456, 0.406)
VICLIP_STD = (0.229, 0.224, 0.225)
TEMPORAL_EMBEDDING = "vision_encoder.temporal_positional_embedding"


@dataclass(frozen=True)
class ViCLIPConfig:
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    embed_dim: int = 512        # both towers project to it
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 32
    vocab_size: int = 49408
    num_frames: int = 8         # length of the temporal embedding the weights were trained with


CONFIGS: dict[str, ViCLIPConfig] = {
    "ViCLIP-B-16": ViCLIPConfig(),
    "ViCLIP-L-14": ViCLIPConfig(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, embed_dim=768,
                                text_width=768, text_layers=12, text_heads=12),
    # Small enough for CPU tests in seconds.
    "ViCLIP-tiny": ViCLIPConfig(image_size=32, patch_size=8, vision_width=64, vision_layers=4, vision_heads=2,
                                embed_dim=32, text_width=64, text_layers=4, text_heads=2),
}


def is_viclip(name: str) -> bool:
    return name.startswith(VICLIP_PREFIX)


def viclip_config(name: str) -> ViCLIPConfig:
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, list(CONFIGS), n=2)
        hint = f"; did you mean {', '.join(close)}?" if close else "."
        raise BackboneError(f"unknown ViCLIP model {name!r}{hint} Known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """nn.MultiheadAttention's parameters and maths (batch first), computed by scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of {heads} heads")
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # `attn_mask` is the adapters' wrapper calling convention (open_clip's); masking is fixed per tower.
        if attn_mask is not None:
            raise ValueError("ViCLIP blocks take no attention mask: the text tower is causal by construction")
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    batch_first = True  # read by the adapters' wrappers, as on open_clip

    def __init__(self, width: int, layers: int, heads: int, causal: bool, joint_frames: bool):
        super().__init__()
        self.width = width
        # The adapters' temporal branch reads this: one sequence per clip, [CLS] + N x T tokens in (n t) order.
        self.joint_frames = joint_frames
        self.resblocks = nn.ModuleList(Block(width, heads, causal) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViCLIPConfig):
        super().__init__()
        width, p = cfg.vision_width, cfg.patch_size
        grid = cfg.image_size // p
        self.image_size = cfg.image_size
        self.preprocess_cfg = {"mean": VICLIP_MEAN, "std": VICLIP_STD}
        self.conv1 = nn.Conv3d(3, width, kernel_size=(1, p, p), stride=(1, p, p), bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.temporal_positional_embedding = nn.Parameter(torch.zeros(1, cfg.num_frames, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, cfg.vision_heads, causal=False, joint_frames=True)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def temporal_embedding(self, frames: int) -> torch.Tensor:
        """(1, frames, d), adapted to the clip length as InternVid adapts theirs (load_temp_embed_with_mismatch
        with interpolation): fewer frames take the first ones, more a linear interpolation, and a single
        frame (an image) the mean, as their forward does."""
        e = self.temporal_positional_embedding
        trained = e.shape[1]
        if frames == trained:
            return e
        if frames == 1:
            return e.mean(1, keepdim=True)
        if frames < trained:
            return e[:, :frames]
        return F.interpolate(e.transpose(1, 2), size=frames, mode="linear").transpose(1, 2)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, embed_dim): the projected joint CLS of each clip."""
        b, t = video.shape[:2]
        x = self.conv1(video.transpose(1, 2))                      # (B, d, T, g, g)
        x = x.flatten(3).permute(0, 3, 2, 1)                        # (B, N, T, d)
        pos = self.positional_embedding.to(x.dtype)
        x = x + pos[1:, None] + self.temporal_embedding(t).to(x.dtype)
        cls = (self.class_embedding.to(x.dtype) + pos[0]).expand(b, 1, -1)
        x = torch.cat([cls, x.reshape(b, -1, x.shape[-1])], dim=1)  # [CLS] + patches in (n t) order
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class TextTransformer(nn.Module):
    def __init__(self, cfg: ViCLIPConfig):
        super().__init__()
        width = cfg.text_width
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, width))
        self.transformer = Transformer(width, cfg.text_layers, cfg.text_heads, causal=True, joint_frames=False)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, cfg.embed_dim))
        # OpenAI CLIP's init (the released file overwrites all of it).
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x))
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection  # EOT


class ViCLIP(nn.Module):
    joint_space_time = True  # the clip embedding comes from one joint encoder, not a mean over frames

    def __init__(self, cfg: ViCLIPConfig):
        super().__init__()
        self.context_length = cfg.context_length
        self.vision_encoder = VisionTransformer(cfg)
        self.text_encoder = TextTransformer(cfg)
        self.temp = nn.Parameter(torch.tensor(1 / 100))

    # open_clip's CLIP surface (aliases, so that state-dict names stay the released ones)
    @property
    def visual(self) -> VisionTransformer:
        return self.vision_encoder

    @property
    def transformer(self) -> Transformer:
        return self.text_encoder.transformer

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_encoder.token_embedding

    @property
    def logit_scale(self) -> torch.Tensor:
        return -self.temp.log()  # exp(logit_scale) * cos = cos / temp

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) clips -> (B, E); (B, 3, H, W) images are one-frame clips, as in InternVid's code."""
        return self.vision_encoder(images if images.ndim == 5 else images.unsqueeze(1))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(tokens)


def _listing(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def fit_frames(cfg: ViCLIPConfig, state: dict[str, torch.Tensor] | None) -> ViCLIPConfig:
    """The config with the temporal-embedding length of a checkpoint (which clips of any length then adapt)."""
    embedding = (state or {}).get(TEMPORAL_EMBEDDING)
    if embedding is not None and embedding.ndim == 3:
        return replace(cfg, num_frames=int(embedding.shape[1]))
    return cfg


def released_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a released file, without a DDP `module.` prefix."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_released(model: ViCLIP, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Load strictly; a file that does not fit raises one line naming its missing, unexpected and misshapen keys."""
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    misshapen = sorted(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                       for k in own.keys() & state.keys() if state[k].shape != own[k].shape)
    problems = [f"{label} keys: {_listing(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
    if problems:
        raise BackboneError(f"{source}: not a {name} checkpoint (InternVid's layout: ['model'] with vision_encoder.*, "
                            f"text_encoder.*, temp); {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
