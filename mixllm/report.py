"""The report of a MixLLM quantization: achieved bits, per-layer 8-bit shares, sizes."""

from __future__ import annotations

import re
from typing import Any, Dict

from torch import nn

from .nn import MixedLinear

__all__ = ["make_report", "budget_breakdown", "format_breakdown"]


def make_report(model: nn.Module, per_layer: Dict[str, Dict[str, int]], config=None) -> Dict[str, Any]:
    """Achieved bits, per-layer 8-bit fractions and sizes in bytes."""
    w_total = sum(v["in"] * v["out"] for v in per_layer.values())
    w8 = sum(v["in"] * v["n8"] for v in per_layer.values())
    feats = sum(v["out"] for v in per_layer.values())
    f8 = sum(v["n8"] for v in per_layer.values())
    qbytes = sum(m.weight_bytes() for m in model.modules() if isinstance(m, MixedLinear))
    total = 0
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:  # tied embeddings count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    for v in per_layer.values():
        v["frac8"] = v["n8"] / v["out"]
    return {
        "avg_bits": 4 + 4 * w8 / max(w_total, 1),
        "frac8_weights": w8 / max(w_total, 1),
        "frac8_features": f8 / max(feats, 1),
        "quantized_params": w_total,
        "quantized_linear_bytes": qbytes,
        "quantized_linear_bits_incl_scales": 8 * qbytes / max(w_total, 1),
        "fp16_linear_bytes": 2 * w_total,
        "model_bytes": total,
        "layers": per_layer,
    }


def budget_breakdown(report: Dict[str, Any]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Where the 8-bit budget went, from a report's ``layers``: per layer type (the name's last part,
    e.g. ``q_proj`` / ``down_proj``) and per transformer block (the first ``.<number>.`` in the name;
    -1: none). For each: ``weights``, ``weights8`` (weights in 8-bit rows), ``budget_pct`` (share of
    all 8-bit weights, i.e. of the extra bits spent), ``rows8_pct`` (share of its rows in 8 bits)."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {"type": {}, "block": {}}
    for name, v in report["layers"].items():
        m = re.search(r"\.(\d+)\.", name)
        for axis, key in (("type", name.rsplit(".", 1)[-1]), ("block", str(int(m.group(1)) if m else -1))):
            d = out[axis].setdefault(key, {"weights": 0, "weights8": 0, "rows": 0, "rows8": 0})
            d["weights"] += v["in"] * v["out"]
            d["weights8"] += v["in"] * v["n8"]
            d["rows"] += v["out"]
            d["rows8"] += v["n8"]
    w8 = sum(d["weights8"] for d in out["type"].values())
    for axis in out.values():
        for d in axis.values():
            d["budget_pct"] = 100 * d["weights8"] / max(w8, 1)
            d["rows8_pct"] = 100 * d["rows8"] / max(d["rows"], 1)
    return out


def format_breakdown(report: Dict[str, Any]) -> str:
    """:func:`budget_breakdown` as two small text tables (per layer type, per block)."""
    b = budget_breakdown(report)
    lines = []
    for axis, head in (("type", "layer type"), ("block", "block")):
        lines.append(f"  {head:12s} {'share of 8-bit budget':>22s} {'rows in 8-bit':>14s} {'in_features':>12s}")
        for key, d in b[axis].items():
            k_in = d["weights"] / max(d["rows"], 1)
            lines.append(f"  {key:12s} {d['budget_pct']:21.1f}% {d['rows8_pct']:13.1f}% {k_in:12.0f}")
    return "\n".join(lines)
