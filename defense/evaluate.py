"""`python -m defense.evaluate`: score a network on clean and poisoned data, like the Lab 3 `eval.py`.

    python -m defense.evaluate model=lab3 model.path=../shared/data/csaw/lab3_bd_weights.h5 \
        dataset=csaw_extract dataset.root=../shared/data/csaw split=all

prints `Clean Classification accuracy: 99.00 %` and one `Attack Success Rate` line per poisoned set.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

import defense.pipeline.schemas  # noqa: F401  (registers the schema that conf/evaluate.yaml names)
from defense.config import check_config, warn_if_near_chance
from defense.core.errors import exit_on_user_error
from defense.reporting import terminal

log = logging.getLogger("defense.evaluate")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score `cfg.model` on `cfg.split` of `cfg.dataset`; returns {'clean_acc': .., 'asr/<trigger>': ..}."""
    from defense.pruning import autodetect
    from defense.pipeline import load as datasets
    from defense.core import metrics
    from defense.nets import models
    from defense.core.safe_files import Limits

    check_config(cfg, "evaluate")
    limits = Limits.from_cfg(cfg)
    model_path = datasets.resolve_model_path(cfg.model, cfg.dataset)
    model = models.load_model(cfg.model, model_path, limits)
    autodetect.complete_model_config(cfg.model, model, model_path)
    split = datasets.load_split(cfg.dataset, cfg.model, cfg.split, limits)
    if cfg.model.get("input_divisor") is None:
        # clean validation data chooses the scaling, whatever split is scored
        valid = split if cfg.split == "valid" else datasets.load_split(cfg.dataset, cfg.model, "valid", limits)
        autodetect.choose_input_divisor(cfg.model, model, valid.clean, int(cfg.get("batch_size", 1024)))
    scores = {"clean_acc": metrics.accuracy(models.predict_labels(model, split.clean.x, cfg.model), split.clean.y)}
    warn_if_near_chance(scores["clean_acc"], cfg.model, f"the clean accuracy on split={cfg.split}", log)
    for name, images in split.poisoned.items():
        pred = models.predict_labels(model, images.x, cfg.model)
        scores[f"asr/{name}"] = metrics.attack_success_rate(pred, images.y)
    return scores


def format_scores(scores: dict[str, float]) -> list[str]:
    lines = [f"Clean Classification accuracy: {scores['clean_acc']:.2f} %"]
    asr = {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("asr/")}
    for name, value in asr.items():
        label = "Attack Success Rate" if len(asr) == 1 else f"Attack Success Rate ({name})"
        lines.append(f"{label}: {value:.2f} %")
    return lines


@terminal.one_line_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@exit_on_user_error(in_sweep=terminal.in_hydra_sweep)
def main(cfg: DictConfig) -> None:
    terminal.quiet(bool(cfg.get("verbose", False)))
    for line in format_scores(evaluate(cfg)):
        log.info(line)


if __name__ == "__main__":
    main()
