"""`prune.criterion=l1`: the L1 norm of each output channel's kernel, smallest first (data-free).

Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017: a filter with a small sum of absolute
weights contributes little. Scores are comparable across layers only as raw norms (no normalisation),
so with several layers the globally smallest kernels go first.
"""

from __future__ import annotations

import numpy as np

from defense.criteria import Scores

NEEDS_DATA = False


def kernel_l1(kernel: np.ndarray) -> np.ndarray:
    """L1 norm of each output channel of a kernel shaped (..., C_in, C_out), in float64."""
    kernel = np.asarray(kernel, np.float64)
    return np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)


def score(model, layers, clean, cfg, divisor) -> Scores:
    return Scores({name: kernel_l1(model.get_layer(name).get_weights()[0]) for name in layers}, prune_first="low")
