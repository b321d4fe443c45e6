"""Stage `report`: summary.csv (and its params), pruning_order.txt, prune_result.png and results.md."""

from __future__ import annotations

import logging

from defense.reporting import plots, report

ORDER = 60
log = logging.getLogger("defense.run")


def run(cfg, out_dir, sweep, summary, valid, test, tracker, finetune_extra) -> dict:
    result = sweep
    report.write_csv(out_dir / "summary.csv", summary, first=report.SUMMARY_COLUMNS)
    tracker.log_params(report.threshold_params(summary))
    log_point_params(summary, tracker)
    tracker.log_table(summary, "thresholds.json")
    with open(out_dir / "pruning_order.txt", "w") as f:
        if len(result.layers) == 1:
            f.write(" ".join(str(int(c)) for c in result.order) + "\n")
        else:  # layer:channel
            f.write(" ".join(f"{name}:{int(c)}" for name, c in result.pairs) + "\n")
    title = (f"Pruning {layers_title(result.layers)} of {cfg.model.name} by {cfg.prune.criterion} "
             f"({len(valid.clean)} valid / {len(test.clean)} test images)")
    plots.plot_prune_result(result.curves, result.thresholds, out_dir / "prune_result.png", title,
                            extra_points=finetune_extra.get("points"))
    table = report.results_table(summary, title, extra=finetune_extra.get("columns"))
    base = result.curves[0]
    if valid.poisoned:
        header = (f"Unpruned B: clean valid accuracy {base['valid_acc']:.2f} %, valid ASR {base['valid_asr']:.2f} %, "
                  f"clean test accuracy {base['pruned_test_acc']:.2f} %, test ASR {base['pruned_test_asr']:.2f} %")
    else:
        header = (f"Unpruned B: clean valid accuracy {base['valid_acc']:.2f} %, clean test accuracy "
                  f"{base['pruned_test_acc']:.2f} % (no poisoned data: no attack success rate)")
    (out_dir / "results.md").write_text(header + "\n\n" + table + "\n")
    log.info("%s\n%s", header, table)
    return {}


def log_point_params(summary, tracker) -> None:
    """The scores of the defender's and the oracle's points as MLflow params `<point>.<score>` (static facts of
    the run, as the fine-tuned scores; a diverged or unreached point logs none)."""
    import math

    params = {}
    for row in summary:
        if row.get("point") not in ("defender", "oracle_test_asr") or not row.get("reached") or row.get("diverged"):
            continue
        params[f"{row['point']}.oracle"] = str(bool(row.get("oracle"))).lower()
        for key in ("valid_acc", "test_acc", "test_asr", "der", "ft_test_acc", "ft_test_asr", "ft_der", "ft_g_test_acc",
                    "ft_g_test_asr", "ft_holdout_acc", "ft_learning_rate", "ft_epochs_setting"):
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                params[f"{row['point']}.{key}"] = f"{float(value):g}" if key in ("ft_learning_rate", "ft_epochs_setting") \
                    else f"{float(value):.4f}"
    tracker.log_params(params)


def layers_title(layers: list[str]) -> str:
    return layers[0] if len(layers) == 1 else f"{len(layers)} conv layers ({', '.join(layers)})"
