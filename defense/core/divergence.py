"""One rule for a learning loop that collapsed: every loop of the package (fine-tuning, ANP's mask learning,
RNP's unlearning and recovery, the scenario training) asks `divergence` and reports what it answers.

A loop diverged when its loss is not a finite number (NaN or infinite), or when its clean accuracy is at
chance: at most CHANCE_FACTOR x 100 / num_classes percent, what a network that answers one class for every
input (NaN weights answer class 0) or answers at random gets. A loop that learns the clean task is far
above it; a backdoored network B still classifies clean inputs well.
"""

from __future__ import annotations

import math

CHANCE_FACTOR = 1.5  # clean accuracy at or below 1.5 x chance counts as collapsed


def chance_accuracy(num_classes: int) -> float:
    """Accuracy (%) of answering one class (or at random) among `num_classes`."""
    return 100.0 / max(1, int(num_classes))


def divergence(loss=None, clean_acc=None, num_classes: int | None = None) -> str | None:
    """Why a learning loop counts as diverged, or None when it does not.

    loss: the loop's last loss (None: not watched); clean_acc: its clean accuracy in percent on images it did
    not learn from where it has them (None: not watched); num_classes: needed with clean_acc.
    """
    if loss is not None:
        try:
            value = float(loss)
        except (TypeError, ValueError):
            value = float("nan")
        if not math.isfinite(value):
            return f"loss is {value}"
    if clean_acc is not None and num_classes is not None:
        acc = float(clean_acc)
        floor = CHANCE_FACTOR * chance_accuracy(num_classes)
        if not math.isfinite(acc) or acc <= floor:
            return f"clean accuracy {acc:.2f} % is at chance (<= {floor:.2f} % for {int(num_classes)} classes)"
    return None
