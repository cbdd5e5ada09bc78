"""Trainable-parameter table of MSTA adapters (msta/METHOD.md §4), counted on the built modules."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from msta.method.adapters import AdapterConfig, attach_adapters
from msta.method.backbone import load_backbone

PARTS = ("text", "video", "shared", "temporal")


@dataclass(frozen=True)
class LayerRow:
    layer: int  # 1-based
    text: int       # text down + up
    video: int      # video down + up
    shared: int     # the r->r projection(s) of this depth
    temporal: int   # the depthwise temporal conv

    @property
    def total(self) -> int:
        return self.text + self.video + self.shared + self.temporal


@dataclass(frozen=True)
class ParamTable:
    backbone_name: str
    cfg: AdapterConfig
    rows: list[LayerRow]
    trainable: int                 # every adapter parameter, shared ones once
    backbone_total: int            # the CLIP's own parameters
    token_embedding: int           # excluded from the paper's "124.3 M" full fine-tuning figure

    def part_total(self, part: str) -> int:
        return sum(getattr(row, part) for row in self.rows)

    @property
    def share(self) -> float:
        return self.trainable / self.backbone_total

    @property
    def share_without_token_embedding(self) -> float:
        return self.trainable / (self.backbone_total - self.token_embedding)


def _count(modules: Iterable[nn.Module | None]) -> int:
    unique = {id(p): p.numel() for m in modules if m is not None for p in m.parameters()}
    return sum(unique.values())


def parameter_table(backbone_name: str, cfg: AdapterConfig) -> ParamTable:
    # The meta device builds the architecture without allocating or initialising any weight.
    backbone = load_backbone(backbone_name, None, device="meta")
    model = backbone.model
    backbone_total = _count([model])
    text_tower = model if hasattr(model, "token_embedding") else model.text  # CLIP or CustomTextCLIP
    token_embedding = _count([text_tower.token_embedding])
    handle = attach_adapters(model, cfg)
    rows = []
    for j in cfg.layer_range:
        vis, txt = handle.vision.get(j), handle.text.get(j)
        rows.append(LayerRow(
            layer=j,
            text=_count([txt.down, txt.up] if txt else []),
            video=_count([vis.down, vis.up] if vis else []),
            shared=_count(handle.shared[j]),
            temporal=_count([vis.temporal] if vis else []),
        ))
    return ParamTable(backbone.identity.name, cfg, rows, _count(handle.modules()), backbone_total, token_embedding)


def format_parameter_table(table: ParamTable) -> str:
    cfg = table.cfg
    header = (
        f"MSTA adapters on {table.backbone_name}: r={cfg.dim}, layers {cfg.layers[0]}-{cfg.layers[1]}, "
        f"towers={cfg.towers}, shared={'yes' if cfg.shared else 'no'}, "
        f"temporal={cfg.temporal_branch if cfg.temporal else 'off'}"
    )
    columns = ("layer", *PARTS, "total")
    lines = [header, "".join(f"{c:>12}" for c in columns)]
    for row in table.rows:
        values = [getattr(row, p) for p in PARTS] + [row.total]
        lines.append(f"{row.layer:>12}" + "".join(f"{v:>12,}" for v in values))
    totals = [table.part_total(p) for p in PARTS] + [sum(r.total for r in table.rows)]
    lines.append(f"{'all':>12}" + "".join(f"{v:>12,}" for v in totals))
    lines.append(
        f"trainable {table.trainable:,} of {table.backbone_total:,} backbone parameters: "
        f"{100 * table.share:.2f} % ({100 * table.share_without_token_embedding:.2f} % "
        f"of the {table.backbone_total - table.token_embedding:,} outside the token embedding)"
    )
    return "\n".join(lines)
