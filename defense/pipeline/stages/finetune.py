"""Stage `finetune`: fine-pruning (the finetune group; `none` adds nothing) of every kept B'
(defense/pipeline/finetune.py), or with `ablation` (experiment=finetune_ablation) the grid of fine-tuning
budgets in its place (defense/pipeline/ablation.py)."""

from __future__ import annotations

import logging

from defense.pipeline import ablation, finetune

ORDER = 50
log = logging.getLogger("defense.run")


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
    if sweep.bn_units:  # fine-tuning keeps pruned conv kernels at zero; B' here has its BN parameters zeroed
        log.warning("warning: no fine-tuning: %s pruned channels on BatchNormalization layers (%s), and fine-tuning "
                    "keeps pruned conv channels at zero; use prune.%s.level=conv to fine-tune", cfg.prune.criterion,
                    ", ".join(sweep.bn_units.values()), cfg.prune.criterion)
        return {"finetune_extra": {}}
    if cfg.get("ablation") is not None:
        ablation.run_ablation(cfg, model, sweep, summary, valid, test, out_dir, tracker)
        return {"finetune_extra": {}}
    return {"finetune_extra": finetune.finetune_thresholds(cfg, model, sweep, summary, valid, test, out_dir, tracker,
                                                                holdout)}
