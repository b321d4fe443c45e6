"""Scores of a defense: clean accuracy, attack success rate, the repaired network G, RA and DER.

Every score is a percentage (0..100) so that tables, curves and MLflow show the same numbers.
"""

from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Percentage of predictions equal to the labels (clean accuracy, or ASR against target labels)."""
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    if labels.size == 0:
        return float("nan")
    return float(np.mean(pred == labels) * 100.0)


def accuracy_per_step(pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """pred (N, S) -> percentage correct at each of the S steps."""
    return np.mean(np.asarray(pred) == np.asarray(labels)[:, None], axis=0) * 100.0


def attack_success_rate(pred: np.ndarray, target_labels: np.ndarray) -> float:
    """Percentage of poisoned inputs classified as the attacker's target label."""
    return accuracy(pred, target_labels)


def repaired_labels(pred_b: np.ndarray, pred_pruned: np.ndarray, num_classes: int) -> np.ndarray:
    """G(B, B'): B's label where B and B' agree, `num_classes` ("backdoored input") where they differ.

    `pred_pruned` may carry extra trailing axes (one column per pruning step); `pred_b` broadcasts.
    """
    pred_b = np.asarray(pred_b)
    pred_pruned = np.asarray(pred_pruned)
    pred_b = pred_b.reshape(pred_b.shape + (1,) * (pred_pruned.ndim - pred_b.ndim))
    return np.where(pred_pruned == pred_b, pred_b, num_classes)


def robust_accuracy(pred: np.ndarray, clean_label: np.ndarray | None) -> float:
    """RA: percentage of poisoned inputs classified as their true label (nan without `clean_label`)."""
    if clean_label is None:
        return float("nan")
    return accuracy(pred, clean_label)


def defense_effectiveness_rating(acc_before: float, acc_after: float, asr_before: float, asr_after: float) -> float:
    """DER (BackdoorBench): (max(0, dASR) - max(0, dACC) + 1) / 2, d = before - after, on fractions.

    Arguments are percentages; the result lies in [0, 1], 1 = attack removed at no accuracy cost.
    """
    d_asr = (asr_before - asr_after) / 100.0
    d_acc = (acc_before - acc_after) / 100.0
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0
