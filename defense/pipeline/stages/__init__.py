"""The stages of a defense run, one module each, run in the order of their `ORDER`:

    setup     (before the MLflow run exists) checks, seeds, loads B, fills prune.layer / prune.probe
    load      the clean and poisoned validation and test data; a seeded part of the clean validation images held out (select)
    sweep     rank the channels and prune step by step (curves.csv, channel_scores.csv)
    points    the summary rows: each accuracy drop, the criterion's operating point, the defender's and the oracle's points, their DER
    keep      save B' of every reached row (models/model_B_<key>.h5, its compact copy, pruned.json)
    finetune  fine-tune each B' (finetune group), or the fine-tuning ablation grid (ablation)
    report    summary.csv, pruning_order.txt, prune_result.png, results.md
    track     the run's files and G(B, B') as MLflow artifacts and models

A stage module defines `ORDER` (int), `run(...)` and optionally `check(cfg)`:
- `run` names the RunContext fields it reads (defense/pipeline/context.py) as its parameters and
  returns a dict of the fields it sets;
- `check(cfg)` checks the stage's own config section before any work (a DefenseError naming the key).
Adding a stage is one module here (and its config file when it has options); stages never import
each other. `defense/run.py` opens the MLflow run after `setup` and calls the others in order.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def names() -> list[str]:
    """Every stage module of this package, in run order."""
    found = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(found, key=lambda name: (get(name).ORDER, name))


def get(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def ordered() -> list[ModuleType]:
    """The stage modules in run order (setup first)."""
    return [get(name) for name in names()]


def check_config(cfg, app: str = "run") -> None:
    """Every check of a run's config that needs no model or data: the keys every app shares
    (defense/config.py::check_config), then each stage's own section, in stage order."""
    from defense import config

    config.check_config(cfg, app)
    if app != "run":
        return
    for stage in ordered():
        if hasattr(stage, "check"):
            stage.check(cfg)
