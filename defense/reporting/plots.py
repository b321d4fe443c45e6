"""`prune_result.png`: clean accuracy and attack success rate against the fraction pruned."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_prune_result(curves: list[dict], thresholds: list[dict], path: str | Path, title: str,
                      extra_points: list[dict] | None = None) -> Path:
    """Accuracy/ASR curves of B' (valid) and G(B, B') (test) with the thresholds marked.

    `extra_points`: optional markers, dicts with x, y, label, color, marker (e.g. fine-pruned B'').
    """
    x = [100.0 * row["fraction_pruned"] for row in curves]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    ax.plot(x, [r["valid_acc"] for r in curves], color="tab:blue", lw=2, label="B' clean accuracy (valid)")
    ax.plot(x, [r["test_acc"] for r in curves], color="tab:blue", lw=1.5, ls="--", label="G(B, B') clean accuracy (test)")
    if not all(math.isnan(r["valid_asr"]) for r in curves):
        ax.plot(x, [r["valid_asr"] for r in curves], color="tab:red", lw=2, label="B' attack success rate (valid)")
        ax.plot(x, [r["test_asr"] for r in curves], color="tab:red", lw=1.5, ls="--", label="G(B, B') attack success rate (test)")
    for t in thresholds:
        if t.get("reached"):
            xt = 100.0 * t["fraction_pruned"]
            ax.axvline(xt, color="grey", ls=":", lw=1)
            ax.annotate(f"-{t['drop']:g} pt", (xt, 102), ha="center", fontsize=8, color="dimgrey",
                        annotation_clip=False)
    for p in extra_points or []:
        ax.scatter([p["x"]], [p["y"]], color=p.get("color", "black"), marker=p.get("marker", "o"), s=40,
                   label=p.get("label"), zorder=5)
    ax.set_xlabel("channels pruned (% of the layer)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 105)
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title, pad=18)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="lower left", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
