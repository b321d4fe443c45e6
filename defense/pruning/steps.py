"""Which pruning steps a sweep evaluates: the stop rule (`stop` group) and `prune.eval_steps`.

Step s prunes the first s (layer, channel) pairs of the ranking. The sweep evaluates

- `prune.eval_steps: null` (the default): every step from 0 to the last one the stop rule allows when
  one layer is pruned (`defense.pruning.masked.MaskedSweep` computes every step in one pass anyway) or when
  the ranking has at most EVERY_STEP_UP_TO = 100 steps; with several layers and a longer ranking
  (e.g. DeepID's four conv layers, 200 channels, `prune.layer=all`), DEFAULT_EVAL_STEPS = 101 evenly
  spaced steps, because each evaluated step of `defense.pruning.channel_masks.ChannelMasks` costs a forward
  pass over every image (from the earliest layer whose mask changed since the step before);
- `prune.eval_steps` = N >= 2: N evenly spaced steps including 0 and that last step (every step when
  N exceeds the number of steps).

The drop thresholds and the `max_drop` stop rule then use the evaluated steps only: a threshold is
reached at the first evaluated step whose clean validation accuracy fell by at least that much.
"""

from __future__ import annotations

import numpy as np

from defense.core.errors import DefenseError

EVERY_STEP_UP_TO = 100  # with several layers and prune.eval_steps=null: every step up to this many
DEFAULT_EVAL_STEPS = 101  # ... else this many evenly spaced steps (0 and the last included)


def check_stop(stop_cfg) -> None:
    """The `stop` group: a known rule, and a fraction in (0, 1] with stop=fraction."""
    if stop_cfg.rule not in ("all", "max_drop", "fraction"):
        raise DefenseError(f"stop.rule={stop_cfg.rule!r} is not known; use stop=all, stop=max_drop or stop=fraction")
    fraction = stop_cfg.get("fraction")
    if stop_cfg.rule == "fraction" and (fraction is None or not (0 < float(fraction) <= 1)):
        raise DefenseError(f"stop.fraction={fraction!r} must be a number in (0, 1] with stop=fraction")


def check_eval_steps(value) -> int | None:
    """`prune.eval_steps`: null (every step) or a whole number >= 2."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise DefenseError(
            f"prune.eval_steps={value!r} must be null (evaluate every step) or a whole number >= 2 of evenly spaced "
            "steps including the first and the last, e.g. prune.eval_steps=50"
        )
    return int(value)


def last_step(stop_cfg, channels: int) -> int:
    """The largest step the stop rule can reach before any accuracy is known."""
    check_stop(stop_cfg)
    if stop_cfg.rule == "fraction":
        return min(channels, max(1, int(np.ceil(float(stop_cfg.fraction) * channels))))
    return channels


def evaluated_steps(stop_cfg, channels: int, eval_steps, several_layers: bool = False) -> np.ndarray:
    """The steps to evaluate on the clean validation data, ascending, 0 and `last_step` included."""
    last = last_step(stop_cfg, channels)
    n = check_eval_steps(eval_steps)
    if n is None and several_layers and last > EVERY_STEP_UP_TO:
        n = DEFAULT_EVAL_STEPS
    if n is None or n >= last + 1:
        return np.arange(last + 1)
    return np.unique(np.round(np.linspace(0, last, n)).astype(np.int64))


def cut_at_stop(stop_cfg, steps: np.ndarray, valid_acc: np.ndarray, drops) -> int:
    """How many of the evaluated `steps` the stop rule keeps (valid_acc: clean valid accuracy at each).

    `max_drop` stops at the first evaluated step whose accuracy fell by the largest threshold of
    prune.drops; the other rules keep every evaluated step.
    """
    check_stop(stop_cfg)
    if stop_cfg.rule == "max_drop":
        target = max(drops) if len(drops) else 0.0
        reached = np.nonzero(valid_acc[0] - valid_acc >= target)[0]
        return int(reached[0]) + 1 if reached.size else len(steps)
    return len(steps)
