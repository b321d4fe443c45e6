"""Stage `points`: the summary rows, one per accuracy drop of prune.drops, one for the criterion's own
operating point (defense/pipeline/operating_point.py), the defender's point and the oracle's point
(defense/pipeline/select.py, select.csv), each with its DER against the unpruned B. Every row has the
columns `oracle` (true only for the oracle's point, which looked at test data) and `diverged`."""

from __future__ import annotations

import logging

from defense.nets.models import input_divisor
from defense.pipeline import operating_point, select
from defense.pipeline.finetune import der
from defense.pipeline.sweep import pruned_by_layer
from defense.reporting import report

ORDER = 30
log = logging.getLogger("defense.run")


def run(cfg, out_dir, model, sweep, valid, test, holdout, tracker) -> dict:
    base_curve = sweep.curves[0]
    summary = report.summary_rows(sweep.thresholds)
    for row in summary:
        row["point"] = "drop"
    op_row = operating_point_row(cfg, model, sweep, valid, test)
    if op_row is not None:
        summary.append(op_row)
    # a criterion whose learning diverged (ANP, RNP: a history row `diverged`) ranked with the masks it had
    # then: every row of its ranking is marked, and the defender's rule chooses none
    diverged = any(r.get("diverged") for r in (sweep.scores.history or []))
    for row in summary:
        row.setdefault("oracle", False)
        row["diverged"] = diverged
    points = select.pruning_rows(sweep.curves, select.settings(cfg)["max_drop"], out_dir,
                                 0 if holdout is None else len(holdout), diverged)
    summary += points
    tracker.log_params(select.point_params(points))
    for row in summary:
        # DER of G(B, B') against the unpruned B (0.5: nothing changed, e.g. defense=none)
        row["der"] = der(base_curve["pruned_test_acc"], row["test_acc"], base_curve["pruned_test_asr"],
                         row["test_asr"]) if row["reached"] else float("nan")
        if sweep.variant:  # where the criterion prunes: `bn` or `conv (adapted: no BatchNormalization)`
            row["defense_variant"] = sweep.variant
        if sweep.scores.augmentation:
            row["augmentation"] = sweep.scores.augmentation
    return {"summary": summary}


def operating_point_row(cfg, model, result, valid, test) -> dict | None:
    """The summary row of the criterion's own operating point, or None when it has none."""
    op = result.scores.operating_point
    if op is None:
        return None
    pairs = operating_point.checked_pairs(op, model, result.layers)
    names = list(valid.poisoned)
    sets = [("valid_clean", valid.clean)] + [(f"valid_{n}", valid.poisoned[n]) for n in names]
    sets += [("test_clean", test.clean)] + [(f"test_{n}", test.poisoned[n]) for n in names]
    preds = operating_point.predictions(model, result.layers, pairs, sets, input_divisor(cfg.model),
                                        int(cfg.get("batch_size", 512)), result.bn_units, result.bn_zero)
    row = operating_point.operating_point_row(pairs, result.channels, preds, valid, test, names,
                                              int(cfg.model.num_classes))
    log.info("the criterion's operating point prunes %d channels: clean valid accuracy %.2f %%, valid ASR %.2f %%, "
             "G(B, B') test accuracy %.2f %%, test ASR %.2f %%", len(pairs), row["valid_acc"], row["valid_asr"],
             row["test_acc"], row["test_asr"])
    result.operating_pruned = pruned_by_layer(pairs, result.layers)
    return row
