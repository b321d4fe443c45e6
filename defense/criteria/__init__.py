"""Pruning criteria: one module per criterion, each scoring the output channels of the layers it prunes.

A criterion is the module `defense/criteria/<name>.py` (selected by `prune.criterion=<name>`) plus its
option file `conf/prune/<name>.yaml`; the runner, the sweep, the reports and tracking do not change
when one is added. A criterion module defines:

    NEEDS_DATA: bool
        True when it reads clean validation data to score (activation, ANP, RNP); False for data-free
        criteria (l1, random, CLP), which are then given `clean=None`.

    def score(model, layers: list[str], clean, cfg, divisor: float) -> Scores
        model:   the suspect network (a functional Keras model); the criterion must leave its weights
                 as they were (work on a copy, or restore them).
        layers:  the Conv2D layers to score, in model order.
        clean:   defense.data.arrays.LabeledImages of the CLEAN VALIDATION data only (raw pixels, `x`, and
                 labels, `y`; scale a batch with defense.nets.models.scale_pixels(x, divisor)), or None.
        cfg:     the whole run config; the criterion's own keys live under cfg.prune.<name>.

    def bn_units(model, layers, cfg) -> dict[str, str]   (optional)
        {conv: BatchNormalization name} of the layers this criterion prunes at the BN level (ANP, RNP, CLP:
        defense.pruning.bn_pairing), known before scoring so that the sweep builds the right evaluator;
        with it, `BN_ZERO`: the BN parameters a pruned channel zeroes.

    def check_config(prune_cfg) -> None   (optional)
        Checks of the criterion's own options that need no model or data, run with the other config
        checks before any work (defense.pipeline.sweep.check_prune_config); raises a DefenseError naming the key.

The defender has only clean validation data: nothing here may read poisoned or test data.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import numpy as np

from defense.core.errors import DefenseError


@dataclass
class Scores:
    """What a criterion returns.

    values:          layer -> one score per output channel (float array), the ranking key.
    prune_first:     "low" (ascending scores are pruned first: activation, l1) or "high" (CLP, ANP, RNP).
    operating_point: layer -> the channels the criterion's own rule prunes (CLP: above mean + u std;
                     ANP / RNP: mask below the threshold), or None for criteria without one.
    columns:         extra per-channel columns for channel_scores.csv (name -> layer -> array), e.g.
                     CLP's raw upper bound beside its standardized score, ANP's mask.
    history:         rows logged per iteration block while learning (ANP / RNP losses), in order;
                     each has a "step" key; written to <criterion>_history.csv and as step metrics.
    bn_units:        {conv: BatchNormalization name} of the convs pruned at the BN level (their channels are
                     pruned by zeroing the BN's `bn_zero` parameters, not the conv's kernel and bias).
    bn_zero:         ("gamma",) (ANP, RNP) or ("gamma", "beta") (CLP).
    variant:         `bn` or `conv (adapted: no BatchNormalization)` (defense.pruning.bn_pairing.variant);
                     empty for criteria without a reference to adapt.
    augmentation:    how the criterion's learning augmented the clean images, where it learns from them (ANP,
                     RNP: defense.criteria._masking.augmentation), with the adaptation of the references'
                     augmentation it makes; empty for the others.
    """

    values: dict[str, np.ndarray]
    prune_first: str = "low"
    operating_point: dict[str, list[int]] | None = None
    columns: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    bn_units: dict[str, str] = field(default_factory=dict)
    bn_zero: tuple = ("gamma",)
    variant: str = ""
    augmentation: str = ""


def names() -> list[str]:
    """Every criterion module in this package, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str):
    """The module of criterion `name`; an unknown name is a DefenseError listing the known ones."""
    known = names()
    if name not in known:
        raise DefenseError(f"prune.criterion={name!r} is not known; use one of {', '.join(known)}")
    return importlib.import_module(f"{__name__}.{name}")


def global_order(scores: Scores, layers: list[str]) -> list[tuple[str, int]]:
    """Every (layer, channel) pair in pruning order, over all layers at once; ties keep layer order,
    then channel order (a stable sort)."""
    keys = np.concatenate([np.asarray(scores.values[name], np.float64) for name in layers])
    pairs = [(name, c) for name in layers for c in range(len(scores.values[name]))]
    if scores.prune_first not in ("low", "high"):
        raise ValueError(f"Scores.prune_first={scores.prune_first!r} must be 'low' or 'high'")
    idx = np.argsort(-keys if scores.prune_first == "high" else keys, kind="stable")
    return [pairs[i] for i in idx]
