"""What the studies over finished runs share (defense/compare.py, defense/analysis/leaderboard.py): numbers
read back from MLflow and csv files, and the defended network's scores of one summary.csv row."""

from __future__ import annotations

import math

NAN = float("nan")

# summary.csv: a criterion with its own operating point (CLP, ANP, RNP) adds a row whose `point` is
# `operating_point`; the rows of accuracy-drop thresholds have `point` = `drop` (or no such column)
POINT_COLUMN = "point"
OWN_POINT = "operating_point"


def as_float(value) -> float:
    """A number read back from MLflow or a csv cell; nan when it is none."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return NAN


def finite(*values) -> bool:
    """All of `values` are finite floats."""
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


def is_own_point(row: dict) -> bool:
    """A summary.csv row of the criterion's own operating point (CLP, ANP, RNP), not of a drop threshold."""
    return str(row.get(POINT_COLUMN, "") or "").strip() == OWN_POINT


def defended_scores(row: dict, base_acc: float, base_asr: float) -> dict | None:
    """The defended network of one summary.csv row: the fine-tuned B'' where the row has fine-tuning
    columns (ft_test_acc, ft_test_asr, ft_der), else G(B, B') (test_acc, test_asr; DER against the
    unpruned B's `base_acc` / `base_asr`, defense/core/metrics.py). None where the row's B' was not reached or
    its learning diverged (`diverged` true)."""
    from defense.core.metrics import defense_effectiveness_rating

    channels = as_float(row.get("channels_pruned"))
    if str(row.get("reached", "True")) != "True" or not math.isfinite(channels) or channels < 0:
        return None
    if str(row.get("diverged", "False")) == "True":  # a collapsed learning is no defense's score
        return None
    if str(row.get("ft_der", "")).strip():
        return {"defended": "B''", "channels_pruned": int(channels), "test_acc": as_float(row.get("ft_test_acc")),
                "test_asr": as_float(row.get("ft_test_asr")), "der": as_float(row["ft_der"])}
    acc, asr = as_float(row.get("test_acc")), as_float(row.get("test_asr"))
    der = defense_effectiveness_rating(base_acc, acc, base_asr, asr) if finite(base_acc, acc, base_asr, asr) else NAN
    return {"defended": "G(B,B')", "channels_pruned": int(channels), "test_acc": acc, "test_asr": asr, "der": der}
