"""The sweep's scores from its predicted labels: one curve row per evaluated step and one threshold row per
accuracy drop. The sweep (defense/pipeline/sweep.py) and a criterion's operating point
(defense/pipeline/operating_point.py) score their labels with the same rows.
"""

from __future__ import annotations

import logging

import numpy as np

from defense.core import metrics
from defense.pipeline.load import Split

log = logging.getLogger("defense.sweep")


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def curve_rows(preds, valid: Split, test: Split, names, evaluated: list[int], channels: int, num_classes: int,
               holdout=None) -> list[dict]:
    """One row per evaluated step (column j of the predictions is step evaluated[j]; column 0 is B).

    holdout: the held-out clean validation images (defense/pipeline/select.py); with their labels in
    preds["holdout_clean"], each row gets `holdout_acc`, B' alone on them."""
    valid_acc = metrics.accuracy_per_step(preds["valid_clean"], valid.clean.y)
    holdout_acc = (metrics.accuracy_per_step(preds["holdout_clean"], holdout.y)
                   if holdout is not None and "holdout_clean" in preds else None)
    valid_asr = {n: metrics.accuracy_per_step(preds[f"valid_{n}"], valid.poisoned[n].y) for n in names}
    clean_test = preds["test_clean"]
    g_clean = metrics.repaired_labels(clean_test[:, 0], clean_test, num_classes)
    test_acc = metrics.accuracy_per_step(g_clean, test.clean.y)
    pruned_test_acc = metrics.accuracy_per_step(clean_test, test.clean.y)
    test_asr, pruned_test_asr = {}, {}
    for n in names:
        p = preds[f"test_{n}"]
        test_asr[n] = metrics.accuracy_per_step(metrics.repaired_labels(p[:, 0], p, num_classes), test.poisoned[n].y)
        pruned_test_asr[n] = metrics.accuracy_per_step(p, test.poisoned[n].y)
    rows = []
    for s, step in enumerate(evaluated):
        row = {
            "channels_pruned": step,
            "fraction_pruned": step / channels,
            "valid_acc": float(valid_acc[s]),
            "valid_asr": _mean([float(valid_asr[n][s]) for n in names]),
            "test_acc": float(test_acc[s]),
            "test_asr": _mean([float(test_asr[n][s]) for n in names]),
            "pruned_test_acc": float(pruned_test_acc[s]),
            "pruned_test_asr": _mean([float(pruned_test_asr[n][s]) for n in names]),
        }
        if holdout_acc is not None:
            row["holdout_acc"] = float(holdout_acc[s])
        if len(names) > 1:
            for n in names:
                row[f"valid_asr_{n}"] = float(valid_asr[n][s])
                row[f"test_asr_{n}"] = float(test_asr[n][s])
        rows.append(row)
    return rows


def threshold_rows(curves: list[dict], drops: list[float]) -> list[dict]:
    """One row per drop: the first step whose clean valid accuracy fell by at least the drop."""
    base = curves[0]["valid_acc"]
    rows = []
    for drop in drops:
        hit = next((row for row in curves if base - row["valid_acc"] >= drop - 1e-9), None)
        if hit is None:
            nan = float("nan")
            rows.append({"drop": drop, "reached": False, "channels_pruned": -1, "fraction_pruned": nan,
                         **{k: nan for k in curves[0] if k not in ("channels_pruned", "fraction_pruned")}})
            log.warning(
                "accuracy drop of %g points never reached (largest drop %.2f points after %d steps)",
                drop, base - min(r["valid_acc"] for r in curves), curves[-1]["channels_pruned"],
            )
        else:
            rows.append({"drop": drop, "reached": True, **hit})
    return rows
