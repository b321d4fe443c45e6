"""The order in which channels of the pruned layer are removed (step 1 of the defense).

Every criterion sees clean validation data only (or none: `l1`, `random`); poisoned data never
chooses anything.
"""

from __future__ import annotations

import numpy as np

from defense.errors import DefenseError

CRITERIA = ("activation", "l1", "random")


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise DefenseError(f"prune.criterion={criterion!r} is not known; use one of {', '.join(CRITERIA)}")


def mean_activation_order(probe_outputs: np.ndarray) -> np.ndarray:
    """Ascending mean activation per channel (least active first), ties kept in channel order."""
    means = mean_activation(probe_outputs)
    return np.argsort(means, kind="stable")


def mean_activation(probe_outputs) -> np.ndarray:
    """Mean over images and positions of each channel (channels last); accepts a list of batches."""
    if isinstance(probe_outputs, np.ndarray):
        probe_outputs = [probe_outputs]
    total, count = None, 0
    for batch in probe_outputs:
        batch = np.asarray(batch, np.float64)
        s = batch.reshape(-1, batch.shape[-1]).sum(axis=0)
        total = s if total is None else total + s
        count += int(np.prod(batch.shape[:-1]))
    return total / max(count, 1)


def l1_order(kernel: np.ndarray) -> np.ndarray:
    """Ascending L1 norm of each output channel's kernel (kernel shape (..., C_in, C_out))."""
    norms = np.abs(np.asarray(kernel, np.float64)).reshape(-1, kernel.shape[-1]).sum(axis=0)
    return np.argsort(norms, kind="stable")


def random_order(channels: int, seed: int) -> np.ndarray:
    return np.random.default_rng(int(seed)).permutation(int(channels))


def check_stop(stop_cfg) -> None:
    """The `stop` group: a known rule, and a fraction in (0, 1] with stop=fraction."""
    if stop_cfg.rule not in ("all", "max_drop", "fraction"):
        raise DefenseError(f"stop.rule={stop_cfg.rule!r} is not known; use stop=all, stop=max_drop or stop=fraction")
    fraction = stop_cfg.get("fraction")
    if stop_cfg.rule == "fraction" and (fraction is None or not (0 < float(fraction) <= 1)):
        raise DefenseError(f"stop.fraction={fraction!r} must be a number in (0, 1] with stop=fraction")


def steps_for_stop(stop_cfg, channels: int, valid_acc: np.ndarray, drops) -> int:
    """Number of pruning steps the stop rule allows (valid_acc: clean valid accuracy per step, all steps)."""
    check_stop(stop_cfg)
    if stop_cfg.rule == "fraction":
        return max(1, int(np.ceil(float(stop_cfg.fraction) * channels)))
    if stop_cfg.rule == "max_drop":
        target = max(drops) if len(drops) else 0.0
        reached = np.nonzero(valid_acc[0] - valid_acc >= target)[0]
        return int(reached[0]) if reached.size else channels
    return channels
