"""Stage `sweep`: rank the channels and prune them step by step (defense/pipeline/sweep.py); writes
curves.csv, channel_scores.csv and the criterion's history, and logs them."""

from __future__ import annotations

import logging

from defense.config import warn_if_near_chance
from defense.core.errors import DefenseError
from defense.pipeline import sweep
from defense.reporting import channel_record, report

ORDER = 20
log = logging.getLogger("defense.run")

UNPRUNED_DEFENSES = ("none", "fine_tuning")  # conf/defense presets that prune no channel (prune.drops=[0])


def check(cfg) -> None:
    """`prune` and `stop` (defense/pipeline/sweep.py::check_prune_config), and no pruning for the presets
    that prune nothing."""
    sweep.check_prune_config(cfg)
    check_unpruned_defense(cfg)


def check_unpruned_defense(cfg) -> None:
    """defense=none and defense=fine_tuning prune no channel: a prune.drops other than [0] (e.g. given on
    the command line of a multirun over the defenses) would make them prune."""
    name = cfg.get("defense_name")
    drops = [float(d) for d in cfg.prune.drops]
    if name in UNPRUNED_DEFENSES and drops != [0.0]:
        raise DefenseError(f"defense={name} prunes no channel (prune.drops=[0]), but prune.drops={drops}: "
                           f"leave prune.drops out of the command line with defense={name}")


def run(cfg, out_dir, model, valid, test, holdout, tracker) -> dict:
    result = sweep.run_sweep(cfg, model, valid, test, progress=bool(cfg.get("progress", True)), holdout=holdout)
    if result.variant:  # bn, or conv (adapted: no BatchNormalization): defense/pruning/bn_pairing.py
        tracker.set_tags({"defense_variant": result.variant})
        log.info("%s prunes at the %s level", cfg.prune.criterion, result.variant)
    if result.scores.augmentation:  # ANP, RNP: their learning's augmentation and its adaptation (no horizontal flip)
        tracker.set_tags({"augmentation": result.scores.augmentation})
    warn_if_near_chance(result.curves[0]["valid_acc"], cfg.model, "the unpruned network's clean validation accuracy")
    log.info("sweep of %d steps (%d evaluated) in %.1f s (%s)", result.steps, len(result.evaluated),
             sum(result.seconds.values()), ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    report.write_csv(out_dir / "curves.csv", result.curves)
    # the curves under curve/: the run's own metrics are the selected point's scores (stage `track`)
    tracker.log_metrics(result.curves, step_key="channels_pruned", prefix=report.CURVE_PREFIX)
    write_criterion_record(cfg, result, out_dir, tracker)
    return {"sweep": result}


def write_criterion_record(cfg, result, out_dir, tracker) -> None:
    """channel_scores.csv, and the criterion's history: a csv, `<criterion>/<key>` step metrics of its
    summaries (loss, accuracy, mask statistics) and, where it has one value per channel (ANP's and RNP's
    `mask/<layer>/<channel>`), the whole history as a table artifact instead of a chart per channel."""
    channel_record.write_channel_scores(out_dir / "channel_scores.csv", result.scores, result.layers, result.pairs)
    history = result.scores.history
    if history:
        channel_record.write_history(out_dir / f"{cfg.prune.criterion}_history.csv", history)
        summaries = [{k: v for k, v in row.items() if not k.startswith("mask/")} for row in history]
        tracker.log_metrics(summaries, step_key="step", prefix=f"{cfg.prune.criterion}/")
        if any(len(row) != len(short) for row, short in zip(history, summaries)):
            tracker.log_table(history, f"{cfg.prune.criterion}_history.json")
