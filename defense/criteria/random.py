"""`prune.criterion=random`: a seeded random order of the channels (a baseline; data-free).

The order is `numpy.random.default_rng(prune.seed).permutation` of every (layer, channel) pair, layers
in model order; a channel's score is its position in that permutation, so the lowest goes first. With
one layer this is the permutation of its channels.
"""

from __future__ import annotations

import numpy as np

from defense.criteria import Scores

NEEDS_DATA = False


def score(model, layers, clean, cfg, divisor) -> Scores:
    sizes = [int(model.get_layer(name).filters) for name in layers]
    permutation = np.random.default_rng(int(cfg.prune.get("seed", 0))).permutation(sum(sizes))
    position = np.empty(len(permutation), np.float64)
    position[permutation] = np.arange(len(permutation))
    values, start = {}, 0
    for name, size in zip(layers, sizes):
        values[name] = position[start : start + size]
        start += size
    return Scores(values, prune_first="low")
