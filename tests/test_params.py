"""Trainable-parameter counts of msta/METHOD.md §4, counted on the built modules."""
from __future__ import annotations

import pytest

from msta.method.adapters import AdapterConfig
from msta.method.params import format_parameter_table, parameter_table

VIT_B16_TOTAL = 149_620_737


def test_paper_configuration_is_exactly_the_logged_total() -> None:
    table = parameter_table("ViT-B-16", AdapterConfig(dim=128, layers=(8, 12)))
    assert table.trainable == 1_744_000
    assert [row.layer for row in table.rows] == [8, 9, 10, 11, 12]
    for row in table.rows:
        assert (row.text, row.video, row.shared, row.temporal, row.total) == (131_712, 197_504, 16_512, 3_072, 348_800)
    assert table.part_total("video") == 5 * 197_504
    assert table.backbone_total == VIT_B16_TOTAL
    assert table.share == pytest.approx(1_744_000 / VIT_B16_TOTAL)


def test_r256_all_layers_is_the_papers_8_7_million() -> None:
    table = parameter_table("ViT-B-16", AdapterConfig(dim=256, layers=(1, 12)))
    assert table.trainable == 8_712_192
    assert all(row.total == 726_016 for row in table.rows)
    # The paper's "7.0 % of 124.3 M": the backbone without its 25.3 M token embedding.
    assert table.backbone_total - table.token_embedding == 124_323_841
    assert round(100 * table.share_without_token_embedding, 1) == 7.0


@pytest.mark.parametrize(
    ("change", "per_layer_delta"),
    [
        ({"shared": False}, +16_512),                 # each tower its own r->r
        ({"temporal": False}, -3_072),
        ({"temporal_branch": "bottleneck"}, -3_072 + 4 * 128),  # conv on r channels: 3r + r
        ({"towers": "vision"}, -131_712),             # no text adapters; the shared projection stays
        ({"towers": "text"}, -197_504 - 3_072),
    ],
)
def test_ablations_change_the_count_as_they_should(change: dict[str, object], per_layer_delta: int) -> None:
    table = parameter_table("ViT-B-16", AdapterConfig(**change))
    assert table.trainable == 1_744_000 + 5 * per_layer_delta
    assert table.trainable == sum(row.total for row in table.rows)


def test_formatted_table_is_aligned_with_thousands_separators() -> None:
    text = format_parameter_table(parameter_table("ViT-B-16", AdapterConfig()))
    lines = text.splitlines()
    assert "1,744,000" in text and "149,620,737" in text and "348,800" in text
    table_lines = lines[1:-1]  # header row, one row per layer, the totals row
    assert len(table_lines) == 1 + 5 + 1
    assert len({len(line) for line in table_lines}) == 1  # fixed width
    assert table_lines[-1].split()[-1] == "1,744,000"
