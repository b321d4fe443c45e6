"""CLP: Channel Lipschitzness-based Pruning, data-free (`prune.criterion=clp`).

Zheng, Tang, Li and Liu, "Data-Free Backdoor Defense via Channel Lipschitzness", ECCV 2022;
reference code: github.com/rkteddy/channel-Lipschitzness-based-pruning, `defense.py::CLP`.

The upper bound of a channel's Lipschitz constant (UCLC) of output channel k of a Conv2D is the largest
singular value of its kernel W_k reshaped to (in_channels, kh * kw), times |gamma_k / sqrt(var_k)| of the
BatchNormalization paired with the conv (`defense.py::CLP`: w = conv.weight[idx].reshape(...) *
(weight[idx] / std[idx]).abs() with std = running_var.sqrt(), without BN's eps, as there). The pairing
is defense.pruning.bn_pairing's rule, the one ANP and RNP use (conv -> BN, or conv -> Add -> BN): the
reference pairs each BatchNorm2d with the last Conv2d registered before it. A convolution without a
paired BatchNormalization (DeepID, the Lab 3 network, has none) is scored by its kernel alone; one
warning line says so.

Pruning (`prune.clp.level`, default auto): a channel of a conv paired with a BatchNormalization is pruned
as the reference does, params[<bn>.weight][index] = 0 and params[<bn>.bias][index] = 0 (gamma and beta
:= 0: the `bn` variant); a conv without one has its kernel and bias zeroed (`conv (adapted: no
BatchNormalization)`). The run's `defense_variant` tag and summary.csv column say which.

Operating point (the reference's rule, `defense.py`): in each layer, the channels whose bound exceeds
mean + u * std of that layer's bounds (std with n - 1, as torch.std) are pruned; `prune.clp.u`,
default 3 (the reference `test.py`'s `-u` default). The global ranking over (layer, channel) pairs uses
the standardized bound z = (bound - mean) / std of its layer, highest first, so that pruning every
channel with z > u is exactly the per-layer rule; the raw bound is the `clp_bound` column.
No data is read (NEEDS_DATA = False).
"""

from __future__ import annotations

import logging

import numpy as np

from defense.config import bound as _bound
from defense.criteria import Scores
from defense.pruning import bn_pairing

NEEDS_DATA = False
log = logging.getLogger(__name__)
BN_ZERO = ("gamma", "beta")  # defense.py::CLP: params[name + '.weight'][index] = 0; params[name + '.bias'][index] = 0


def check_config(prune_cfg) -> None:
    """`prune.clp.u` >= 0 (a finite number)."""
    clp = prune_cfg.get("clp") or {}
    _bound("prune.clp.u", clp.get("u", 3.0), lambda v: v >= 0,
           "a number of standard deviations >= 0, e.g. prune.clp.u=3 (the CLP paper's default)")
    bn_pairing.check_level("prune.clp.level", clp.get("level", None) or "auto")


def bn_units(model, layers: list[str], cfg) -> dict[str, str]:
    """{conv: BatchNormalization} of the layers pruned at the BN level (`prune.clp.level`)."""
    check_config(cfg.prune)
    level = (cfg.prune.get("clp") or {}).get("level", None) or "auto"
    return bn_pairing.bn_units(model, layers, level, "prune.clp.level")


def following_batch_norm(model, conv):
    """The BatchNormalization paired with `conv` (defense.pruning.bn_pairing.find_batch_norm), or None."""
    return bn_pairing.find_batch_norm(model, conv.name)[0]


def channel_bounds(model, layer_name: str) -> tuple[np.ndarray, bool]:
    """The UCLC of every output channel of Conv2D `layer_name`, and whether a BatchNormalization was folded in."""
    conv = model.get_layer(layer_name)
    kernel = np.asarray(conv.kernel.numpy(), np.float64)  # (kh, kw, in, out)
    kh, kw, cin, cout = kernel.shape
    # one (in, kh * kw) matrix per output channel, all channels at once
    mats = np.transpose(kernel, (3, 2, 0, 1)).reshape(cout, cin, kh * kw)
    bounds = np.linalg.svd(mats, compute_uv=False)[:, 0]
    bn = following_batch_norm(model, conv)
    if bn is None:
        return bounds, False
    var = np.asarray(bn.moving_variance.numpy(), np.float64)
    gamma = np.asarray(bn.gamma.numpy(), np.float64) if bn.gamma is not None else np.ones_like(var)
    return bounds * np.abs(gamma / np.sqrt(var)), True  # defense.py: std = running_var.sqrt(), no eps


def standardize(bounds: np.ndarray) -> np.ndarray:
    """(bound - mean) / std over one layer, std with n - 1; zeros where the spread is zero or undefined."""
    bounds = np.asarray(bounds, np.float64)
    if len(bounds) < 2:
        return np.zeros_like(bounds)
    std = bounds.std(ddof=1)
    if not np.isfinite(std) or std == 0:
        return np.zeros_like(bounds)
    return (bounds - bounds.mean()) / std


def operating_point(bounds: np.ndarray, u: float) -> list[int]:
    """The channels of one layer whose bound exceeds mean + u * std (std with n - 1), as `defense.py::CLP`."""
    bounds = np.asarray(bounds, np.float64)
    if len(bounds) < 2:
        return []
    return [int(c) for c in np.flatnonzero(bounds > bounds.mean() + u * bounds.std(ddof=1))]


def score(model, layers: list[str], clean, cfg, divisor: float) -> Scores:
    """CLP's standardized bounds per layer (prune highest first) and its per-layer operating point."""
    check_config(cfg.prune)
    u = float((cfg.prune.get("clp") or {}).get("u", 3.0))
    values, bounds, op, without_bn = {}, {}, {}, []
    for name in layers:
        raw, folded = channel_bounds(model, name)
        if not folded:
            without_bn.append(name)
        z = standardize(raw)
        bounds[name], values[name] = raw, z
        op[name] = operating_point(raw, u)
    if without_bn:
        log.warning("warning: CLP: no BatchNormalization right after %s; their bounds are those of the conv kernels "
                    "alone", ", ".join(without_bn))
    units = bn_units(model, layers, cfg)
    return Scores(values=values, prune_first="high", operating_point=op, columns={"clp_bound": bounds},
                  bn_units=units, bn_zero=BN_ZERO, variant=bn_pairing.variant(units, layers))
