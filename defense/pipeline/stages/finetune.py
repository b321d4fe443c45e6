"""Stage `finetune`: fine-pruning (the finetune group; `none` adds nothing) of every kept B'
(defense/pipeline/finetune.py), or with `ablation` (experiment=finetune_ablation) the grid of fine-tuning
budgets in its place (defense/pipeline/ablation.py). Channels pruned on a BatchNormalization (sweep.bn_units)
stay pruned there: the BN's gamma (and beta for CLP) of those channels is kept at zero."""

from __future__ import annotations

from defense.pipeline import ablation, finetune

ORDER = 50


def check(cfg) -> None:
    """The `finetune` section when it fine-tunes, and `ablation` when it is set."""
    settings = cfg.get("finetune") or {}
    if settings.get("kind", "none") != "none":
        finetune.finetune_settings(settings)
    if cfg.get("ablation") is not None:
        ablation.check_ablation(cfg)


def run(cfg, out_dir, model, sweep, summary, valid, test, holdout, tracker) -> dict:
    kind = cfg.get("finetune", {}).get("kind", "none")
    if kind == "none":
        return {"finetune_extra": {}}
    if cfg.get("ablation") is not None:
        ablation.run_ablation(cfg, model, sweep, summary, valid, test, out_dir, tracker, holdout)
        return {"finetune_extra": {}}
    return {"finetune_extra": finetune.finetune_thresholds(cfg, model, sweep, summary, valid, test, out_dir, tracker,
                                                                holdout)}
