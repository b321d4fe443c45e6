"""Stage `load`: the clean and poisoned validation and test data (defense/pipeline/load.py), the input
scaling chosen on clean validation data when model.input_divisor is null, the data sets logged, then the
seeded `select.holdout` part of the clean validation images set aside for the defender's point
(defense/pipeline/select.py): every later stage gets `valid` without them and `holdout` alone."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from defense.pipeline import load, select
from defense.pruning import autodetect

ORDER = 10
log = logging.getLogger("defense.run")


def check(cfg) -> None:
    """`select` (holdout in (0, 1), max_drop >= 0)."""
    select.settings(cfg)


def run(cfg, out_dir, model, model_path, limits, tracker) -> dict:
    valid = load.load_split(cfg.dataset, cfg.model, "valid", limits)
    if cfg.model.get("input_divisor") is None:
        divisor = autodetect.choose_input_divisor(cfg.model, model, valid.clean, int(cfg.get("batch_size", 512)))
        tracker.set_tags({"input_divisor": f"{divisor:g}"})
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    else:  # a configured scaling that the clean validation data contradicts is said, in one line
        autodetect.warn_if_scaling_mismatch(cfg.model, model, valid.clean, int(cfg.get("batch_size", 512)))
    test = load.load_split(cfg.dataset, cfg.model, "test", limits)
    tracker.log_datasets(valid, "validation", str(cfg.dataset.get("kind")))
    tracker.log_datasets(test, "test", str(cfg.dataset.get("kind")))
    log.info(
        "model %s (%s); %d clean + %s poisoned validation images, %d clean + %s poisoned test images",
        cfg.model.name, model_path, len(valid.clean), [len(v) for v in valid.poisoned.values()],
        len(test.clean), [len(v) for v in test.poisoned.values()],
    )
    chosen = select.settings(cfg)
    valid, holdout = select.split_holdout(valid, chosen["holdout"], chosen["seed"])
    tracker.log_params({"select.holdout_images": str(len(holdout)), "select.rest_images": str(len(valid.clean))})
    log.info("held out %d of the %d clean validation images for the defender's point (select.holdout=%g, seed %d); "
             "ranking, criteria and fine-tuning use the other %d", len(holdout), len(holdout) + len(valid.clean),
             chosen["holdout"], chosen["seed"], len(valid.clean))
    return {"valid": valid, "test": test, "holdout": holdout}
