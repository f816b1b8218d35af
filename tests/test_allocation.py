"""MixLLM's bit allocation: the per-bit (knapsack) ranking against a float64 reference, the budget
counted in bits, and the per-type / per-block breakdown of where the budget went."""

import numpy as np
import pytest
from torch import nn

from mixllm.methods.mixllm import MixLLMConfig, allocate
from mixllm.report import budget_breakdown


def _layers(shapes):
    # (name, in_features, out_features): an odd mix of widths, as in a transformer block
    return [(n, nn.Linear(k, o, bias=False)) for n, k, o in shapes]


SHAPES = [
    ("model.layers.0.self_attn.q_proj", 48, 40),
    ("model.layers.0.mlp.down_proj", 150, 37),
    ("model.layers.1.self_attn.q_proj", 48, 40),
    ("model.layers.1.mlp.down_proj", 150, 37),
]


def _greedy_reference(layers, sal, fraction, per_bit):
    """Rows in order of S (or S / in_features), taken while their weights fit the budget (float64)."""
    items = []
    for n, m in layers:
        for c in range(m.out_features):
            key = sal[n][c] / m.in_features if per_bit else sal[n][c]
            items.append((-float(key), n, c, m.in_features))
    items.sort(key=lambda t: t[0])  # stable: ties keep layer order, as argsort(kind="stable")
    budget = fraction * sum(m.in_features * m.out_features for _, m in layers)
    out, used = {n: [] for n, _ in layers}, 0.0
    for _, n, c, k in items:
        if used + k > budget:
            break
        used += k
        out[n].append(c)
    return {n: sorted(v) for n, v in out.items()}


@pytest.mark.parametrize("selection", ["global", "per_bit"])
@pytest.mark.parametrize("fraction", [0.03, 0.1, 0.37])
def test_ranking_matches_reference_and_budget_is_counted_in_bits(rng, selection, fraction):
    layers = _layers(SHAPES)
    sal = {n: rng.gamma(0.5, size=m.out_features) * (3 if "down" in n else 1) for n, m in layers}
    got = allocate(layers, sal, fraction, selection)
    ref = _greedy_reference(layers, sal, fraction, selection == "per_bit")
    assert {n: v.tolist() for n, v in got.items()} == ref
    total = sum(m.in_features * m.out_features for _, m in layers)
    w8 = sum(m.in_features * len(got[n]) for n, m in layers)
    assert w8 <= fraction * total < w8 + 150  # within one (widest) row of the budget
    if selection == "per_bit":  # every 8-bit row is worth at least as much per bit as every 4-bit row
        dens = {n: sal[n] / m.in_features for n, m in layers}
        lo = min(dens[n][got[n]].min() for n in got if len(got[n]))
        hi = max(np.delete(dens[n], got[n]).max() for n in got)
        assert lo >= hi or w8 + 150 > fraction * total


def test_per_bit_prefers_narrow_rows_at_equal_salience():
    layers = _layers(SHAPES)
    sal = {n: np.ones(m.out_features) for n, m in layers}
    g = allocate(layers, sal, 0.1, "per_bit")
    assert all(len(g[n]) == 0 for n in g if "down" in n)
    assert sum(len(g[n]) for n in g) == int(0.1 * 2 * (48 * 40 + 150 * 37)) // 48  # only 48-wide rows
    with pytest.raises(ValueError, match="selection"):
        MixLLMConfig(selection="per_weight")


def test_budget_breakdown_per_type_and_block():
    rep = {"layers": {n: {"in": k, "out": o, "n8": n8} for (n, k, o), n8 in zip(SHAPES, [4, 10, 0, 2])}}
    b = budget_breakdown(rep)
    w8 = 48 * 4 + 150 * 10 + 0 + 150 * 2
    assert b["type"]["down_proj"]["budget_pct"] == pytest.approx(100 * 150 * 12 / w8)
    assert b["type"]["q_proj"]["rows8_pct"] == pytest.approx(100 * 4 / 80)
    assert b["block"]["0"]["weights8"] == 48 * 4 + 150 * 10 and b["block"]["1"]["rows8"] == 2
    for axis in b.values():
        assert sum(d["budget_pct"] for d in axis.values()) == pytest.approx(100)
