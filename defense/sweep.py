"""The pruning sweep (steps 1-4 of the defense): rank, prune channel by channel, record, pick B'.

All predictions come from `defense.masked.MaskedSweep`: the network before the pruned layer runs
once per image and the rest is evaluated for every step with the pruned channels masked.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from defense import metrics, ranking
from defense.datasets import Split
from defense.errors import DefenseError
from defense.masked import MaskedSweep, channel_path
from defense.models import input_divisor

log = logging.getLogger("defense.sweep")


VALID_OUTPUTS_CACHE_BYTES = 512 * 2**20


def check_drops(drops) -> list[float]:
    """prune.drops: non-negative numbers in ascending order."""
    try:
        values = [float(d) for d in drops]
    except (TypeError, ValueError):
        raise DefenseError(f"prune.drops={list(drops)!r} must be a list of numbers, e.g. prune.drops=[2,4,10,30]") from None
    if any(v < 0 or not np.isfinite(v) for v in values):
        raise DefenseError(f"prune.drops={values}: thresholds are accuracy drops in percentage points, >= 0")
    if values != sorted(values) or len(set(values)) != len(values):
        raise DefenseError(f"prune.drops={values}: list the thresholds once each, in ascending order, e.g. [2,4,10,30]")
    return values


def check_prune_config(cfg) -> None:
    """Checks that need no model or data (run before any work)."""
    ranking.check_criterion(cfg.prune.criterion)
    check_drops(cfg.prune.drops)
    ranking.check_stop(cfg.stop)


def check_layers(cfg, model) -> list[str]:
    """prune.layer must be a conv layer; prune.probe must follow it through per-channel layers.

    Null ones are found first (defense.autodetect: DeepID -> conv_3 / pool_3).
    """
    from defense.autodetect import complete_prune_config

    complete_prune_config(cfg.prune, model)  # checks prune.layer is a Conv2D (masked.conv_layer)
    if cfg.prune.criterion == "activation":
        return channel_path(model, cfg.prune.layer, cfg.prune.get("probe") or cfg.prune.layer)
    return [cfg.prune.layer]


def drop_name(drop: float) -> str:
    return f"{drop:g}"


@dataclass
class SweepResult:
    order: np.ndarray  # channels in pruning order (the first `steps` were pruned)
    channels: int
    steps: int
    curves: list[dict]  # one row per step
    thresholds: list[dict]  # one row per drop
    poisoned_names: list[str]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # set name -> (N, steps+1)
    seconds: dict[str, float] = field(default_factory=dict)


def _probe_outputs(model, path: list[str], layer_batches):
    """The probe's outputs, batch by batch, from the pruned layer's outputs through the per-channel path."""
    layers = [model.get_layer(name) for name in path[1:]]
    for batch in layer_batches:
        h = batch
        for layer in layers:
            h = layer(h, training=False)
        yield np.asarray(h)


def pruning_order(cfg, model, path, layer_batches, channels: int) -> np.ndarray:
    """The pruning order; `layer_batches` (an iterable of pruned-layer outputs on clean validation
    data) is only consumed, batch by batch, by the activation criterion."""
    criterion = cfg.prune.criterion
    if criterion == "activation":
        return ranking.mean_activation_order(_probe_outputs(model, path, layer_batches))
    if criterion == "l1":
        return ranking.l1_order(model.get_layer(cfg.prune.layer).get_weights()[0])
    return ranking.random_order(channels, cfg.prune.get("seed", 0))


def run_sweep(cfg, model, valid: Split, test: Split, progress: bool = True) -> SweepResult:
    """Rank on clean validation data, then record every step on valid (B') and test (G(B, B')).

    Every set is streamed through the engine batch by batch (raw pixels, float or uint8, scaled per
    batch); only labels are kept. The clean validation set's outputs of the pruned layer are kept from
    the ranking pass for its predictions when they fit in VALID_OUTPUTS_CACHE_BYTES (Lab 3: 11,547
    faces x 9x7x60 floats, 174 MB); otherwise it passes twice, once to rank and once to predict.
    """
    from tqdm.auto import tqdm

    drops = check_drops(cfg.prune.drops)
    path = check_layers(cfg, model)
    num_classes = int(cfg.model.num_classes)
    divisor = input_divisor(cfg.model)
    engine = MaskedSweep(model, cfg.prune.layer, int(cfg.get("batch_size", 512)))
    channels = engine.channels
    names = list(valid.poisoned)
    seconds: dict[str, float] = {}

    sets = [("valid_clean", valid.clean)] + [(f"valid_{n}", valid.poisoned[n]) for n in names]
    sets += [("test_clean", test.clean)] + [(f"test_{n}", test.poisoned[n]) for n in names]
    total = sum(len(images) for _, images in sets)
    bar = tqdm(total=total, desc="pruning sweep (images x all steps)", unit="img", disable=not progress) if progress else None
    with bar if bar is not None else nullcontext():
        # 1. clean validation data: ranking (streamed), then every step
        t0 = time.perf_counter()
        per_image = 4 * sum(int(np.prod(t.shape[1:])) for t in engine.bottom.outputs)  # float32 outputs
        keep = len(valid.clean) * per_image <= VALID_OUTPUTS_CACHE_BYTES
        if keep:  # the pruned layer's outputs, once: ranked on, then reused for every step
            kept = list(engine.layer_outputs(valid.clean.x, divisor))
            order = pruning_order(cfg, model, path, (outputs[0] for outputs in kept), channels)
        else:
            order = pruning_order(cfg, model, path, (o[0] for o in engine.layer_outputs(valid.clean.x, divisor)),
                                  channels)
        seconds["rank"] = time.perf_counter() - t0
        if keep:
            labels = []
            for outputs in kept:
                labels.append(engine.predict_from_outputs(outputs, order))
                if bar is not None:
                    bar.update(len(labels[-1]))
            preds = {"valid_clean": np.concatenate(labels)}
            del kept, labels
        else:
            preds = {"valid_clean": engine.predict(valid.clean.x, order, progress=bar, divisor=divisor)}
        valid_acc_all = metrics.accuracy_per_step(preds["valid_clean"], valid.clean.y)
        steps = ranking.steps_for_stop(cfg.stop, channels, valid_acc_all, drops)
        preds["valid_clean"] = preds["valid_clean"][:, : steps + 1]
        seconds["valid_clean"] = time.perf_counter() - t0
        # 2. the other sets, only as far as the stop rule goes
        for key, images in sets[1:]:
            t1 = time.perf_counter()
            preds[key] = engine.predict(images.x, order[:steps], progress=bar, divisor=divisor)
            seconds[key] = time.perf_counter() - t1

    curves = _curves(preds, valid, test, names, steps, channels, num_classes)
    thresholds = _thresholds(curves, drops)
    return SweepResult(order, channels, steps, curves, thresholds, names, preds, seconds)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _curves(preds, valid: Split, test: Split, names, steps: int, channels: int, num_classes: int) -> list[dict]:
    valid_acc = metrics.accuracy_per_step(preds["valid_clean"], valid.clean.y)
    valid_asr = {n: metrics.accuracy_per_step(preds[f"valid_{n}"], valid.poisoned[n].y) for n in names}
    clean_test = preds["test_clean"]
    g_clean = metrics.repaired_labels(clean_test[:, 0], clean_test, num_classes)
    test_acc = metrics.accuracy_per_step(g_clean, test.clean.y)
    pruned_test_acc = metrics.accuracy_per_step(clean_test, test.clean.y)
    test_asr, pruned_test_asr = {}, {}
    for n in names:
        p = preds[f"test_{n}"]
        test_asr[n] = metrics.accuracy_per_step(metrics.repaired_labels(p[:, 0], p, num_classes), test.poisoned[n].y)
        pruned_test_asr[n] = metrics.accuracy_per_step(p, test.poisoned[n].y)
    rows = []
    for s in range(steps + 1):
        row = {
            "channels_pruned": s,
            "fraction_pruned": s / channels,
            "valid_acc": float(valid_acc[s]),
            "valid_asr": _mean([float(valid_asr[n][s]) for n in names]),
            "test_acc": float(test_acc[s]),
            "test_asr": _mean([float(test_asr[n][s]) for n in names]),
            "pruned_test_acc": float(pruned_test_acc[s]),
            "pruned_test_asr": _mean([float(pruned_test_asr[n][s]) for n in names]),
        }
        if len(names) > 1:
            for n in names:
                row[f"valid_asr_{n}"] = float(valid_asr[n][s])
                row[f"test_asr_{n}"] = float(test_asr[n][s])
        rows.append(row)
    return rows


def _thresholds(curves: list[dict], drops: list[float]) -> list[dict]:
    """One row per drop: the first step whose clean valid accuracy fell by at least the drop."""
    base = curves[0]["valid_acc"]
    rows = []
    for drop in drops:
        hit = next((row for row in curves if base - row["valid_acc"] >= drop - 1e-9), None)
        if hit is None:
            nan = float("nan")
            rows.append({"drop": drop, "reached": False, "channels_pruned": -1, "fraction_pruned": nan,
                         **{k: nan for k in curves[0] if k not in ("channels_pruned", "fraction_pruned")}})
            log.warning(
                "accuracy drop of %g points never reached (largest drop %.2f points after %d steps)",
                drop, base - min(r["valid_acc"] for r in curves), len(curves) - 1,
            )
        else:
            rows.append({"drop": drop, "reached": True, **hit})
    return rows
