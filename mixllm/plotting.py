"""Plots of quantization reports (matplotlib, imported on use)."""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Union

__all__ = ["plot_fractions", "plot_budget"]


def plot_fractions(report: Dict[str, Any], path: Union[str, os.PathLike], title: str = "") -> str:
    """PNG of the per-layer share of 8-bit output features (cf. the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    kinds: Dict[str, List] = {}
    for name, v in layers.items():
        m = re.search(r"\.(\d+)\.", name)
        blk = int(m.group(1)) if m else -1
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append((blk, 100 * v["n8"] / v["out"]))
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(len(kinds), 1)
    for i, (kind, pts) in enumerate(kinds.items()):
        pts.sort()
        ax.bar([p[0] + (i - len(kinds) / 2) * width for p in pts], [p[1] for p in pts], width, label=kind)
    ax.set_xlabel("transformer block")
    ax.set_ylabel("8-bit output features (%)")
    ax.set_title(title or f"MixLLM: 8-bit share per layer (average {report['avg_bits']:.2f} bits)")
    ax.legend(ncol=min(len(kinds), 7), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_budget(report: Dict[str, Any], path: Union[str, os.PathLike], title: str = "") -> str:
    """PNG: share of the 8-bit budget per layer type and per block (:func:`budget_breakdown`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import budget_breakdown

    b = budget_breakdown(report)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 3]})
    for ax, axis, xlabel in ((axes[0], "type", "layer type"), (axes[1], "block", "transformer block")):
        keys = list(b[axis])
        ax.bar(range(len(keys)), [b[axis][k]["budget_pct"] for k in keys], color="tab:blue")
        ax.set_xticks(range(len(keys)), keys, rotation=45 if axis == "type" else 0, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("share of 8-bit weights (%)")
    fig.suptitle(title or f"Where the 8-bit budget went (average {report['avg_bits']:.2f} bits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
