"""Stage `track`: the run's files as MLflow artifacts, and G(B, B') of every kept point as an MLflow model
(defense/tracking/mlflow_model.py)."""

from __future__ import annotations

from defense.reporting import report

ORDER = 70

FILES = ("curves.csv", "summary.csv", "prune_result.png", "config.yaml", "results.md", "pruning_order.txt",
         "channel_scores.csv", "pruned.json", "select.csv", "select_finetune.csv")


def run(cfg, out_dir, model, summary, valid, tracker) -> dict:
    models_dir = out_dir / "models"
    selected = report.selected_row(summary)
    if selected is not None:  # the run's own metrics: the selected point's scores, not a curve's last step
        tracker.log_metrics([{"step": 0, **report.headline_metrics(selected)}], step_key="step")
        tracker.set_tags({"selected_point": report.point_label(selected)})
    for name in (*FILES, f"{cfg.prune.criterion}_history.csv"):
        if (out_dir / name).is_file():
            tracker.log_artifact(out_dir / name)
    if cfg.tracking.get("log_models", True) and models_dir.is_dir():
        tracker.log_artifact(models_dir, "models")
    model_uris = {}
    if cfg.tracking.get("log_models", True):  # G(B, B') of each kept threshold as an MLflow model
        from defense.tracking.mlflow_model import log_repaired_models

        model_uris = log_repaired_models(cfg, tracker, model, summary, valid.clean.x)
    return {"model_uris": model_uris}
