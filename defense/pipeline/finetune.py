"""Fine-pruning (step 6 of the defense): fine-tune every kept B' on clean validation data -> B''.

Fine-Pruning (Liu et al., 2018) follows the pruning of the last conv layer with a few epochs of
training on clean data: the pruned channels stay pruned, the rest of the network re-learns the clean
task and, as a side effect, mostly forgets the backdoor that was hiding in the remaining weights.

For every threshold the sweep reached:
- B' = the unpruned B with the first `channels_pruned` channels of the order pruned (as the runner
  saved it), fine-tuned on the clean validation images only (a `holdout` fraction of them kept aside
  for early stopping; optionally randomly translated by up to `shift` pixels, Adam or SGD, constant or
  cosine learning rate); the pruned channels' kernels and biases are re-zeroed after every optimizer
  step (inside Keras' compiled step, a whole epoch per call) and checked to be exactly zero at the end.
  Where the criterion pruned a conv's channels on its BatchNormalization (ANP, RNP, CLP on networks
  with BN: SweepResult.bn_units), B' has that BN's gamma (ANP, RNP) or gamma and beta (CLP) of those
  channels zeroed, as the references prune (defense/nets/models.py bn_parameters);
  then those BN parameters are the ones re-zeroed and checked, while the conv's kernel and the BN's moving
  statistics train as everything else does;
- B'' alone and G(B, B'') are scored on the test data: clean accuracy, ASR per poisoned set, robust
  accuracy (RA, where the poisoned data has `clean_label`) and DER against the unpruned B;
(and the criterion's own operating point, `model_B_op_ft.h5`, metrics `ft/operating_point/...`, where it has one)
- B'' is saved as `models/model_B_{drop}_ft.h5` and logged to MLflow with its per-epoch metrics
  (`ft/drop_{drop}/loss`, `.../acc`, `.../val_loss`, `.../val_acc`, step = epoch); unless
  `compact=false`, also as `models/model_B_{drop}_ft_compact.h5` without its pruned channels
  (`defense.compact.export_compact`, metrics `compact/drop_{drop}_ft/...`); not for channels pruned on a
  BatchNormalization (a channel with gamma 0 still outputs beta), as for B' (stage keep).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from defense.core import interrupt
from defense.core import metrics
from defense.core.divergence import divergence
from defense.nets import models
from defense.core.errors import DefenseError
from defense.pipeline.sweep import file_key, point_name
from defense.data.arrays import shift_images  # noqa: F401  (the pure function lives in the data layer)

log = logging.getLogger("defense.finetune")

OPTIMIZERS = ("adam", "sgd")
MONITORS = ("val_loss", "val_acc")
SCHEDULES = ("constant", "cosine")


def finetune_settings(ft_cfg) -> dict:
    """The `finetune` group (kind: clean), checked; a DefenseError names the bad option and the fix."""

    def number(key, default, cast, ok, what):
        value = ft_cfg.get(key, default)
        try:
            value = cast(value)
        except (TypeError, ValueError):
            raise DefenseError(f"finetune.{key}={value!r} must be {what}") from None
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            raise DefenseError(f"finetune.{key}={value!r} must be {what}")
        return value

    settings = {
        "epochs": number("epochs", 10, int, lambda v: v >= 1, "a whole number of epochs >= 1"),
        "learning_rate": number("learning_rate", 1e-3, float, lambda v: v > 0, "a learning rate > 0"),
        "batch_size": number("batch_size", 64, int, lambda v: v >= 1, "a batch size >= 1"),
        "momentum": number("momentum", 0.9, float, lambda v: 0 <= v < 1, "a momentum in [0, 1) (optimizer=sgd)"),
        "seed": number("seed", 0, int, lambda v: True, "an integer seed"),
        "holdout": number("holdout", 0.2, float, lambda v: 0 <= v < 1,
                          "the fraction of the clean validation data held out for early stopping, in [0, 1)"),
        "patience": number("patience", 3, int, lambda v: v >= 1, "a whole number of epochs >= 1"),
        "shift": number("shift", 0, int, lambda v: v >= 0,
                        "the largest random translation in pixels of the training images (0: none), >= 0"),
    }
    optimizer = str(ft_cfg.get("optimizer", "adam")).lower()
    if optimizer not in OPTIMIZERS:
        raise DefenseError(f"finetune.optimizer={optimizer!r} is not known; use one of {list(OPTIMIZERS)}")
    monitor = str(ft_cfg.get("monitor", "val_loss"))
    if monitor not in MONITORS:
        raise DefenseError(f"finetune.monitor={monitor!r} is not known; use one of {list(MONITORS)}")
    schedule = str(ft_cfg.get("lr_schedule", "constant"))
    if schedule not in SCHEDULES:
        raise DefenseError(f"finetune.lr_schedule={schedule!r} is not known; use one of {list(SCHEDULES)}")
    settings.update(optimizer=optimizer, monitor=monitor, lr_schedule=schedule)
    settings["grid"] = grid_candidates(ft_cfg.get("grid"), settings)
    return settings


def grid_candidates(grid, settings: dict) -> list[tuple[float, int]]:
    """`finetune.grid` as (learning_rate, epochs) candidates, weakest first (learning rate x epochs ascending,
    then fewer epochs); without a grid (null, or neither list given) the one setting of the group. An empty list,
    or one list without the other, is a DefenseError."""
    if grid is None or grid.get("learning_rate") is None and grid.get("epochs") is None:
        return [(settings["learning_rate"], settings["epochs"])]
    for key, other, example in (("learning_rate", "epochs", "[10,30]"), ("epochs", "learning_rate", "[0.01,0.05]")):
        if grid.get(other) is None:
            raise DefenseError(f"finetune.grid.{key} is given without finetune.grid.{other}: give both, e.g. "
                               f"finetune.grid.{other}={example}, or neither")

    def values(key, cast, ok, what, example):
        raw = grid.get(key)
        try:
            found = [cast(v) for v in (raw or [])]
        except (TypeError, ValueError):
            raise DefenseError(f"finetune.grid.{key}={raw!r} must be a list of {what}, e.g. "
                               f"finetune.grid.{key}={example}") from None
        if not found:
            raise DefenseError(f"finetune.grid.{key}=[] is empty: list at least one of the {what} the defender's rule "
                               f"chooses among, e.g. finetune.grid.{key}={example}, or set finetune.grid=null")
        if any(isinstance(v, float) and not math.isfinite(v) or not ok(v) for v in found):
            raise DefenseError(f"finetune.grid.{key}={list(raw)!r} must be a list of {what}, e.g. "
                               f"finetune.grid.{key}={example}")
        return sorted(set(found))

    rates = values("learning_rate", float, lambda v: v > 0, "learning rates > 0", "[0.01,0.05]")
    epochs = values("epochs", int, lambda v: v >= 1, "whole numbers of epochs >= 1", "[10,30]")
    if any(float(v) != int(v) for v in grid.get("epochs")):
        raise DefenseError(f"finetune.grid.epochs={list(grid.get('epochs'))!r} must be whole numbers of epochs")
    return sorted(((lr, e) for lr in rates for e in epochs), key=lambda c: (c[0] * c[1], c[1], c[0]))


def split_holdout(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, holdout) of n clean validation images; the holdout is a seeded random subset."""
    if n < 1:
        raise DefenseError("fine-tuning needs clean validation images; the validation split holds none")
    n_hold = int(round(n * holdout)) if holdout > 0 else 0
    if holdout > 0:
        n_hold = max(1, n_hold)
    if n - n_hold < 1:
        raise DefenseError(
            f"finetune.holdout={holdout} leaves no training images of the {n} clean validation images; "
            "lower it (finetune.holdout=0 trains on all of them without early stopping)"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def _shifted_batches(x: np.ndarray, y: np.ndarray, batch_size: int, shift: int, seed: int):
    """Batches of (randomly translated) x and y, reshuffled every epoch; `.x`/`.y` are the source arrays."""
    import keras

    class ShiftedBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.x, self.y, self.batch_size, self.shift = x, y, batch_size, shift
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(y))

        def __len__(self):
            return math.ceil(len(self.y) / self.batch_size)

        def __getitem__(self, index):
            idx = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            return shift_images(self.x[idx], self.shift, self.rng), self.y[idx]

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(self.y))

    return ShiftedBatches()


def _make_optimizer(settings: dict, steps_per_epoch: int):
    """Adam or SGD (with momentum); `cosine` decays the learning rate to 0 over all the epochs."""
    import keras

    lr = settings["learning_rate"]
    if settings["lr_schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, settings["epochs"] * steps_per_epoch))
    if settings["optimizer"] == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=settings["momentum"])
    return keras.optimizers.Adam(learning_rate=lr)


def _as_pruned_map(pruned, layer_name: str | None) -> dict[str, list[int]]:
    """{layer: channels}; a plain list of channels belongs to `layer_name` (prune.layer)."""
    if isinstance(pruned, dict):
        return {name: [int(c) for c in channels] for name, channels in pruned.items()}
    return {layer_name: [int(c) for c in pruned]}


def _pruned_masks(model, pruned: dict[str, list[int]], bn_units: dict | None = None,
                  bn_zero=("gamma",)) -> list[tuple[object, np.ndarray]]:
    """(variable, 0/1 mask) for the kernel and bias of every pruned layer: 0 on its pruned channels.

    bn_units: {conv: BatchNormalization name} of the convs pruned at the BN level: for those the variables are
    the BN's `bn_zero` parameters (models.bn_parameters), and the conv's own kernel and bias train freely."""
    masks = []
    bn_units = bn_units or {}
    for layer_name, channels in pruned.items():
        channels = np.asarray([int(c) for c in channels], dtype=np.int64)
        if layer_name in bn_units:
            variables = models.bn_parameters(model, bn_units[layer_name], bn_zero)  # gamma (C,), beta (C,)
        else:
            variables = model.get_layer(layer_name).weights[:2]  # kernel (..., C) and bias (C,)
        for variable in variables:
            mask = np.ones(tuple(variable.shape), dtype=np.float32)
            mask[..., channels] = 0.0
            masks.append((variable, mask))
    return masks


def pruned_channels_zero(model, layer_name: str, channels) -> bool:
    """True when the kernel and bias of every pruned channel of `layer_name` are exactly zero."""
    channels = [int(c) for c in channels]
    weights = model.get_layer(layer_name).get_weights()[:2]
    return all(not np.any(w[..., channels]) for w in weights)


def pruned_bn_channels_zero(model, bn_name: str, channels, bn_zero=("gamma",)) -> bool:
    """True when the `bn_zero` parameters (models.bn_parameters) of every pruned channel of BatchNormalization
    `bn_name` are exactly zero."""
    channels = [int(c) for c in channels]
    return all(not np.any(v.numpy()[channels]) for v in models.bn_parameters(model, bn_name, bn_zero))


def pruned_layers_zero(model, pruned: dict[str, list[int]], bn_units: dict | None = None,
                       bn_zero=("gamma",)) -> bool:
    """pruned_channels_zero for every layer of {layer: channels}; pruned_bn_channels_zero on the paired
    BatchNormalization for the convs of `bn_units`."""
    bn_units = bn_units or {}
    return all(pruned_bn_channels_zero(model, bn_units[name], channels, bn_zero) if name in bn_units
               else pruned_channels_zero(model, name, channels) for name, channels in pruned.items())


def _log_epoch(tracker, name: str, row: dict) -> None:
    """One fine-tuning epoch's row ({"epoch", "loss", "acc", ...}) as step metrics `ft/<name>/<key>` (finite ones)."""
    for key, value in row.items():
        if key != "epoch" and math.isfinite(value):
            tracker.log_metric(f"ft/{name}/{key}", value, step=row["epoch"])


def _rezeroed(mask, constraint=None):
    """A variable constraint: the variable with its pruned entries (mask 0) set to 0, after `constraint` (the one
    the variable had, if any). `where`, not a product: NaN weights of a diverged fine-tuning stay 0 where pruned."""
    import keras

    mask = keras.ops.convert_to_tensor(mask)

    def apply(value):
        value = constraint(value) if constraint is not None else value
        return keras.ops.where(mask > 0, value, keras.ops.zeros_like(value))

    return apply


@contextmanager
def _kept_pruned(masks):
    """Inside, every (variable, mask) of `masks` (_pruned_masks) has the constraint _rezeroed: Keras applies it
    right after each optimizer update, inside the compiled step, as the callback's re-zeroing after each batch
    would. The variables' own constraints are put back after."""
    before = [(variable, variable.constraint) for variable, _ in masks]
    try:
        for variable, mask in masks:
            variable.constraint = _rezeroed(mask, variable.constraint)
        yield
    finally:
        for variable, constraint in before:
            variable.constraint = constraint


def _fine_tune_callback(masks, settings: dict, name: str, tracker, has_holdout: bool, every_batch: bool = True):
    """Re-zero the pruned channels when training begins and ends (and after every batch with `every_batch`;
    otherwise _kept_pruned does it inside the step); log every epoch; early stopping on the holdout."""
    import keras

    class FineTune(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.masks = [(variable, _rezeroed(mask)) for variable, mask in masks]  # the constraint's re-zeroing
            self.best = None
            self.best_epoch = -1
            self.best_weights = None
            self.wait = 0
            self.history: list[dict] = []
            self.started = time.perf_counter()

        def rezero(self):
            for variable, rezeroed in self.masks:
                variable.assign(rezeroed(variable))

        def on_train_begin(self, logs=None):
            self.rezero()

        def on_train_batch_end(self, batch, logs=None):
            if every_batch:
                self.rezero()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            row = {"epoch": epoch + 1}
            for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
                if key in logs:
                    value = float(logs[key])
                    short = key.replace("accuracy", "acc")
                    row[short] = value * 100.0 if short.endswith("acc") else value
            _log_epoch(tracker, name, row)
            self.history.append(row)
            text = ", ".join(f"{k} {v:.4f}" if k.endswith("loss") else f"{k} {v:.2f} %"
                             for k, v in row.items() if k != "epoch")
            log.info("  fine-tune %s epoch %d/%d: %s (%.1f s)", name, epoch + 1, settings["epochs"], text,
                     time.perf_counter() - self.started)
            if not has_holdout:
                return
            current = row.get(settings["monitor"])
            if current is None or not math.isfinite(current):
                return
            better = self.best is None or (current < self.best if settings["monitor"] == "val_loss"
                                           else current > self.best)
            if better:
                self.best, self.best_epoch, self.wait = current, epoch + 1, 0
                self.best_weights = self.model.get_weights()
                return
            self.wait += 1
            if self.wait >= settings["patience"]:
                log.info("  fine-tune %s: no better %s for %d epoch(s), stopping", name, settings["monitor"],
                         self.wait)
                self.model.stop_training = True

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)
            self.rezero()

    return FineTune()


def fine_tune(cfg, b_prime, pruned, valid_clean, tracker, name: str, bn_units: dict | None = None,
              bn_zero=("gamma",), history: list | None = None, whole_epochs: bool = True) -> tuple[object, dict]:
    """Fine-tune B' (in place) on the clean validation images only; returns (B'', info).

    pruned: {layer: channels}, or a list of channels of prune.layer; they are kept at zero.
    bn_units, bn_zero: the convs pruned at the BatchNormalization level (SweepResult.bn_units, .bn_zero): their
    pruned channels are kept pruned there instead, the BN's gamma (and beta with ("gamma", "beta")) at zero;
    the BN's moving statistics and the conv's kernel train as everything else does.
    history: a list that gets the per-epoch rows ({"epoch", "loss", "acc", "val_loss", "val_acc"}).
    whole_epochs: one compiled call of Keras runs a whole epoch (`steps_per_execution`), the pruned channels
    re-zeroed inside it after every optimizer step (a variable constraint, which Keras applies right after the
    update); False runs one batch per call and re-zeroes them in a callback after it. Both give the same
    weights (tests/test_bn_finetune.py); the first has less per-batch overhead, and a stop signal then ends
    the fine-tuning at the end of an epoch, not of a batch.
    """
    import keras

    settings = finetune_settings(cfg.finetune)
    keras.utils.set_random_seed(settings["seed"])
    x = models.scale_inputs(valid_clean.x, cfg.model)
    y = np.asarray(valid_clean.y, dtype=np.int64)
    train_idx, hold_idx = split_holdout(len(y), settings["holdout"], settings["seed"])
    x_train, y_train = x[train_idx], y[train_idx]
    validation = (x[hold_idx], y[hold_idx]) if len(hold_idx) else None

    steps_per_epoch = math.ceil(len(train_idx) / settings["batch_size"])
    # a network that outputs logits (no softmax) needs from_logits=True: Keras' default treats its outputs as
    # probabilities (it divides them by their sum and clips them to [eps, 1 - eps]), so the loss and its
    # gradients are meaningless and every fine-tuned B'' of such a network ends near chance
    b_prime.compile(optimizer=_make_optimizer(settings, steps_per_epoch),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=models.uses_logits(b_prime)),
                    metrics=["accuracy"], steps_per_execution=steps_per_epoch if whole_epochs else 1)
    pruned = _as_pruned_map(pruned, cfg.prune.get("layer"))
    masks = _pruned_masks(b_prime, pruned, bn_units, bn_zero)
    callback = _fine_tune_callback(masks, settings, name, tracker, validation is not None, every_batch=not whole_epochs)
    # a signal stops fit between two calls (batches, or epochs with whole_epochs), and is raised once fit has
    # returned (defense/core/interrupt.py)
    with _kept_pruned(masks if whole_epochs else []):
        if settings["shift"]:
            batches = _shifted_batches(x_train, y_train, settings["batch_size"], settings["shift"], settings["seed"])
            interrupt.fit(b_prime, batches, epochs=settings["epochs"], validation_data=validation,
                          callbacks=[callback], verbose=0)
        else:
            interrupt.fit(b_prime, x_train, y_train, batch_size=settings["batch_size"], epochs=settings["epochs"],
                          validation_data=validation, shuffle=True, callbacks=[callback], verbose=0)
    if not pruned_layers_zero(b_prime, pruned, bn_units, bn_zero):
        where = [f"{layer} ({(bn_units or {})[layer]} {'/'.join(bn_zero)})" if layer in (bn_units or {}) else layer
                 for layer in pruned]
        raise RuntimeError(f"fine-tuning {name}: pruned channels of {', '.join(where)} are no longer zero")
    info = {"ft_epochs": len(callback.history), "ft_best_epoch": callback.best_epoch,
            "ft_train_images": int(len(train_idx)), "ft_holdout_images": int(len(hold_idx))}
    if callback.history:
        info["ft_final_loss"] = callback.history[-1].get("loss", float("nan"))
    if not all(np.all(np.isfinite(w)) for w in b_prime.get_weights()):
        info["ft_final_loss"] = float("nan")  # NaN weights: whatever the last logged loss was, the network is lost
    if callback.best is not None:
        info[f"ft_best_{settings['monitor']}"] = float(callback.best)
    if history is not None:
        history.extend(callback.history)
    return b_prime, info


def _nan_mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def der(acc_before: float, acc_after: float, asr_before: float, asr_after: float) -> float:
    """DER of metrics.defense_effectiveness_rating, nan when any of the scores is missing (no ASR)."""
    if any(math.isnan(float(v)) for v in (acc_before, acc_after, asr_before, asr_after)):
        return float("nan")
    return metrics.defense_effectiveness_rating(acc_before, acc_after, asr_before, asr_after)


def score_fine_pruned(clean_y, pred_b_clean, pred_ft_clean, poisoned: dict, num_classes: int,
                      base_acc: float | None = None, base_asr: float | None = None) -> dict:
    """The summary columns of one B'' from top-1 labels on the test data.

    poisoned: set name -> (target labels, clean_label or None, B's labels, B'''s labels).
    base_acc / base_asr: the unpruned network's scores (default: computed from B's labels here).
    Returns base_test_acc, base_test_asr, ft_test_acc, ft_test_asr, ft_test_ra, ft_der (B'' alone),
    ft_g_test_acc, ft_g_test_asr, ft_g_test_ra, ft_g_der (G(B, B'')); with several poisoned sets the
    ASR/RA columns hold their mean and per-set columns `<column>_<name>` follow.
    """
    pred_b_clean = np.asarray(pred_b_clean)
    g_clean = metrics.repaired_labels(pred_b_clean, pred_ft_clean, num_classes)
    row = {
        "base_test_acc": float(base_acc) if base_acc is not None else metrics.accuracy(pred_b_clean, clean_y),
        "ft_test_acc": metrics.accuracy(pred_ft_clean, clean_y),
        "ft_g_test_acc": metrics.accuracy(g_clean, clean_y),
    }
    per_set = {}
    for name, (target, clean_label, pred_b, pred_ft) in poisoned.items():
        g = metrics.repaired_labels(pred_b, pred_ft, num_classes)
        per_set[name] = {
            "base_test_asr": metrics.attack_success_rate(pred_b, target),
            "ft_test_asr": metrics.attack_success_rate(pred_ft, target),
            "ft_test_ra": metrics.robust_accuracy(pred_ft, clean_label),
            "ft_g_test_asr": metrics.attack_success_rate(g, target),
            "ft_g_test_ra": metrics.robust_accuracy(g, clean_label),
        }
    for key in ("base_test_asr", "ft_test_asr", "ft_test_ra", "ft_g_test_asr", "ft_g_test_ra"):
        row[key] = _nan_mean([s[key] for s in per_set.values()])
    if base_asr is not None:
        row["base_test_asr"] = float(base_asr)
    row["ft_der"] = der(row["base_test_acc"], row["ft_test_acc"], row["base_test_asr"], row["ft_test_asr"])
    row["ft_g_der"] = der(row["base_test_acc"], row["ft_g_test_acc"], row["base_test_asr"], row["ft_g_test_asr"])
    if len(per_set) > 1:
        for key in ("ft_test_asr", "ft_test_ra", "ft_g_test_asr"):
            for name, scores in per_set.items():
                row[f"{key}_{name}"] = scores[key]
    return row


def base_predictions(cfg, model, result, test) -> dict[str, np.ndarray]:
    """B's top-1 labels on the test sets: column 0 of the sweep's predictions (as in the curves)."""
    keys = {"clean": "test_clean", **{n: f"test_{n}" for n in test.poisoned}}
    preds = {}
    batch_size = int(cfg.get("batch_size", 512))
    for name, key in keys.items():
        p = (result.predictions or {}).get(key)
        if p is not None:
            preds[name] = np.asarray(p)[:, 0].astype(np.int64)
        else:
            images = test.clean if name == "clean" else test.poisoned[name]
            preds[name] = models.predict_labels(model, images.x, cfg.model, batch_size)
    return preds


SCORE_COLUMNS = ("ft_test_acc", "ft_test_asr", "ft_test_ra", "ft_der", "ft_g_test_acc", "ft_g_test_asr", "ft_g_test_ra",
                 "ft_g_der")


def check_diverged(row: dict, name: str, num_classes: int) -> bool:
    """Mark a fine-tuned row `diverged` (defense/core/divergence.py: its last loss, its clean accuracy on the
    held-out images) and blank its fine-tuned scores, so no table reports them as a defense's; one warning line."""
    reason = divergence(row.get("ft_final_loss"), row.get("ft_holdout_acc"), num_classes)
    if reason is None:
        return False
    row["diverged"] = True
    for key in list(row):
        if key in SCORE_COLUMNS or any(key.startswith(f"{c}_") for c in SCORE_COLUMNS):
            row[key] = float("nan")
    log.warning("warning: fine-tuning of %s diverged (%s after %s epoch(s)): its fine-tuned network is not reported "
                "as a defense and never chosen; lower finetune.learning_rate", name.replace("_", " "), reason,
                row.get("ft_epochs"))
    return True


def holdout_accuracy(cfg, network, holdout, batch_size: int) -> float:
    """Clean accuracy (%) of `network` on the held-out clean validation images (nan without them)."""
    if holdout is None or not len(holdout):
        return float("nan")
    return metrics.accuracy(models.predict_labels(network, holdout.x, cfg.model, batch_size), holdout.y)


def _with_setting(cfg, learning_rate: float, epochs: int):
    """A copy of the run config whose fine-tuning uses `learning_rate` and `epochs`."""
    import copy

    from omegaconf import open_dict

    out = copy.deepcopy(cfg)
    with open_dict(out.finetune):
        out.finetune.learning_rate = float(learning_rate)
        out.finetune.epochs = int(epochs)
        out.finetune.grid = None
    return out


def _share_key(cfg, pruned: dict, bn_units, bn_zero) -> tuple:
    """What decides a fine-tuning's result within one run: the B' (its pruned channels, and where they are pruned)
    and every fine-tuning setting (the grid aside, which only lists candidates). Two fine-tunings of one key start
    from the same weights with the same seed, so the second would repeat the first exactly (the run enables
    TensorFlow's op determinism, defense/config.py)."""
    settings = {k: v for k, v in finetune_settings(cfg.finetune).items() if k != "grid"}
    return (tuple(sorted((layer, tuple(sorted(int(c) for c in channels))) for layer, channels in pruned.items())),
            tuple(sorted((bn_units or {}).items())), tuple(bn_zero), tuple(sorted(settings.items())))


def _shared_fine_tune(cfg, make_b_prime, pruned, valid_clean, tracker, name: str, shared: dict | None,
                      bn_units=None, bn_zero=("gamma",)):
    """fine_tune, done once per run for each _share_key: a later fine-tuning of the same B' with the same settings
    (the plain drop-0 row and the grid's candidate of the same learning rate and epochs; the defender's and the
    oracle's candidates on the same B') takes the first one's network and info, and its per-epoch metrics are
    logged again under its own name so each point keeps its full MLflow record. shared=None: no sharing.

    make_b_prime: () -> a fresh B' (called only when the fine-tuning runs)."""
    key = _share_key(cfg, _as_pruned_map(pruned, cfg.prune.get("layer")), bn_units, bn_zero) \
        if shared is not None else None
    if key is not None and key in shared:
        b2, info, history, first = shared[key]
        for row in history:
            _log_epoch(tracker, name, row)
        log.info("  fine-tune %s: the same B' and settings as %s, whose fine-tuned network it shares",
                 name.replace("_", " "), first.replace("_", " "))
        return b2, dict(info)
    history = []
    b2, info = fine_tune(cfg, make_b_prime(), pruned, valid_clean, tracker, name, bn_units=bn_units, bn_zero=bn_zero,
                         history=history)
    if key is not None:
        shared[key] = (b2, info, history, name)
    return b2, dict(info)


def choose_finetuning(cfg, model, pruned, row: dict, valid, test, holdout, tracker, name: str, out_dir: Path,
                      base_preds=None, bn_units: dict | None = None, bn_zero=("gamma",), shared: dict | None = None):
    """The fine-tuning of a point's B' chosen among `finetune.grid` (defense/pipeline/select.py's rule).

    Candidates run weakest first; each is scored on the held-out clean images (never trained on) and checked
    for divergence. A candidate whose held-out accuracy leaves the budget (or that diverges) ends the
    candidates that dominate it (no smaller learning rate, no fewer epochs), which are not run. The defender's
    point keeps the strongest candidate within the budget; the oracle's point (select.ORACLE) the one of
    lowest test ASR of the fine-tuned network within it: only the oracle reads test data (`base_preds`, test).
    Returns (fine-tuned network or None, its info, the chosen (lr, epochs) or None); rows of
    select_finetune.csv are appended to `out_dir`. bn_units, bn_zero: as for fine_tune (channels pruned on
    their BatchNormalization: every candidate starts from that B' and keeps those BN parameters at zero).
    shared: the run's fine-tunings by B' and setting (_shared_fine_tune), None to run every candidate anew.
    """
    from defense.pipeline import select

    settings = finetune_settings(cfg.finetune)
    num_classes = int(cfg.model.num_classes)
    batch_size = int(cfg.get("batch_size", 512))
    max_drop = select.settings(cfg)["max_drop"]
    base_acc = float(row.get("base_holdout_acc", float("nan")))
    oracle = row.get("point") == select.ORACLE
    candidates, exceeded = [], []
    best, best_key = None, None
    for lr, epochs in settings["grid"]:
        entry = {"point": row["point"], "learning_rate": lr, "epochs": epochs}
        if any(lr >= x_lr and epochs >= x_ep for x_lr, x_ep in exceeded):
            entry.update(holdout_acc=float("nan"), diverged=False, skipped=True)
            candidates.append(entry)
            continue
        b2, info = _shared_fine_tune(_with_setting(cfg, lr, epochs),
                                     lambda: models.pruned_copy_layers(model, pruned, bn_units, bn_zero), pruned,
                                     valid.clean, tracker, f"{name}_lr{lr:g}_e{epochs}", shared, bn_units=bn_units,
                                     bn_zero=bn_zero)
        acc = holdout_accuracy(cfg, b2, holdout, batch_size)
        reason = divergence(info.get("ft_final_loss"), acc, num_classes)
        entry.update(holdout_acc=acc, diverged=reason is not None, skipped=False)
        if reason is not None:
            log.warning("warning: fine-tuning candidate lr %g x %d epoch(s) of %s diverged (%s): not chosen", lr,
                        epochs, name.replace("_", " "), reason)
        if oracle and select.within_budget(entry, base_acc, max_drop):
            asr = [metrics.attack_success_rate(models.predict_labels(b2, images.x, cfg.model, batch_size), images.y)
                   for images in test.poisoned.values()]
            entry["test_asr"] = _nan_mean(asr)
        candidates.append(entry)
        if not select.within_budget(entry, base_acc, max_drop):
            exceeded.append((lr, epochs))
            continue
        key = (entry.get("test_asr", float("nan")), -acc) if oracle else None
        if not oracle or best is None or (math.isfinite(key[0]) and (not math.isfinite(best_key[0]) or key < best_key)):
            best, best_key = (b2, dict(info, ft_holdout_acc=acc), (lr, epochs)), key
    index = select.oracle_index(candidates, base_acc, max_drop) if oracle else \
        select.defender_index(candidates, base_acc, max_drop)
    setting = (f"learning rate {candidates[index]['learning_rate']:g} x {candidates[index]['epochs']} epoch(s)"
               if index is not None else "")
    select.log_choice("fine-tuning learning rate x epochs", candidates, index, base_acc, max_drop, setting,
                      0 if holdout is None else len(holdout), row["point"])
    _append_candidates(out_dir / "select_finetune.csv", candidates, base_acc, max_drop, index)
    if best is None or index is None:
        return None, {}, None
    return best


def _append_candidates(path: Path, candidates: list[dict], base_acc: float, max_drop: float, index) -> None:
    """select_finetune.csv: every fine-tuning candidate of a point, its held-out accuracy and the choice."""
    from defense.pipeline import select
    from defense.reporting.report import read_csv, write_csv

    rows = read_csv(path) if path.is_file() else []
    for i, c in enumerate(candidates):
        rows.append({"point": c["point"], "learning_rate": c["learning_rate"], "epochs": c["epochs"],
                     "holdout_acc": c["holdout_acc"], "holdout_drop": base_acc - c["holdout_acc"],
                     "diverged": c["diverged"], "skipped": c["skipped"],
                     "within_budget": select.within_budget(c, base_acc, max_drop), "chosen": i == index})
    write_csv(path, rows)


def finetune_thresholds(cfg, model, result, summary, valid, test, out_dir, tracker, holdout=None,
                        share: bool = True) -> dict:
    """Fine-prune every reached threshold of `summary` (rows get the fine-tuned columns); points/columns back.

    holdout: the held-out clean validation images (defense/pipeline/select.py), never trained on: the fine-tuned
    network's clean accuracy there (`ft_holdout_acc`) and its last loss tell whether the fine-tuning diverged.
    share: fine-tune each B' once per setting (_shared_fine_tune: rows and grid candidates of the same pruned
    channels reuse it, and the log names the first); False runs every one anew (the same numbers, slower)."""
    settings = finetune_settings(cfg.finetune)
    out_dir = Path(out_dir)
    num_classes = int(cfg.model.num_classes)
    batch_size = int(cfg.get("batch_size", 512))
    base_curve = result.curves[0]
    base_preds = base_predictions(cfg, model, result, test)
    names = list(test.poisoned)
    log_models = bool(cfg.get("tracking", {}).get("log_models", True))
    stopping = (f"holdout {settings['holdout']:g} for early stopping on {settings['monitor']}, patience "
                f"{settings['patience']}" if settings["holdout"] > 0 else "no holdout, no early stopping")
    log.info(
        "fine-pruning: %s, lr %g (%s), %d epoch(s) max, batch %d, shift %d px, on %d clean validation images (%s)",
        settings["optimizer"], settings["learning_rate"], settings["lr_schedule"], settings["epochs"],
        settings["batch_size"], settings["shift"], len(valid.clean), stopping,
    )
    points = []
    shared = {} if share else None
    for row in summary:
        if not row.get("reached"):
            continue
        name = point_name(row)
        started = time.perf_counter()
        pruned = result.pruned_for(row)
        log.info("fine-tuning B' of %s (%d channels of %s pruned, %.1f %%)", name.replace("_", " "),
                 sum(len(c) for c in pruned.values()), ", ".join(pruned), row["fraction_pruned"])
        if row.get("point") in ("defender", "oracle_test_asr") and holdout is not None:
            b2, info, setting = choose_finetuning(cfg, model, pruned, row, valid, test, holdout, tracker, name, out_dir,
                                                  bn_units=result.bn_units, bn_zero=result.bn_zero, shared=shared)
            if b2 is None:  # no fine-tuning keeps the held-out accuracy: the point is B' itself, not fine-tuned
                row["ft_within_budget"] = False
                continue
            row["ft_within_budget"] = True
            info.update(ft_learning_rate=setting[0], ft_epochs_setting=setting[1])
        else:
            # B' as the sweep pruned it: conv, or the BN's parameters
            b2, info = _shared_fine_tune(cfg, lambda: result.pruned_model(model, pruned), pruned, valid.clean, tracker,
                                         name, shared, bn_units=result.bn_units, bn_zero=result.bn_zero)
            info["ft_holdout_acc"] = holdout_accuracy(cfg, b2, holdout, batch_size)

        pred_clean = models.predict_labels(b2, test.clean.x, cfg.model, batch_size)
        poisoned = {}
        for n in names:
            images = test.poisoned[n]
            poisoned[n] = (images.y, images.clean_label, base_preds[n],
                           models.predict_labels(b2, images.x, cfg.model, batch_size))
        scores = score_fine_pruned(test.clean.y, base_preds["clean"], pred_clean, poisoned, num_classes,
                                   base_acc=base_curve["pruned_test_acc"], base_asr=base_curve["pruned_test_asr"])
        path = models.save_model(b2, out_dir / "models" / f"model_B_{file_key(row)}_ft.h5")
        if log_models:
            tracker.log_artifact(path, "models")
        if cfg.get("compact", True) and result.bn_units:  # as stage keep: a channel with gamma 0 still outputs beta
            row["ft_compact_path"] = ""
            log.debug("%s: no compact model: its channels are pruned on BatchNormalization layers", path.name)
        elif cfg.get("compact", True):  # B'' without its pruned channels, as run.py saves B' (defense/compact.py)
            from defense.pruning.compact import export_compact_beside

            compact = export_compact_beside(b2, pruned, path, tracker, models.scale_inputs(test.clean.x, cfg.model))
            row["ft_compact_path"] = compact["path"] if compact else ""
            if log_models and compact:
                tracker.log_artifact(compact["path"], "models")
        row.update(scores)
        row.update(info)
        row["ft_model_path"] = str(path)
        if check_diverged(row, name, num_classes):
            continue
        # the fine-tuned scores are static facts of the run (params); its step metrics stay the curves and
        # the per-epoch fine-tuning history
        tracker.log_params({f"ft.{name}.{key}": f"{row[key]:.4f}"
                            for key in ("ft_test_acc", "ft_test_asr", "ft_test_ra", "ft_der", "ft_g_test_acc",
                                        "ft_g_test_asr") if math.isfinite(row[key])})
        log.info(
            "B'' of %s: test acc %.2f %% (B %.2f %%), ASR %.2f %% (B %.2f %%), RA %.2f %%, DER %.3f; "
            "G(B, B''): acc %.2f %%, ASR %.2f %% (%d epoch(s), %.1f s)",
            name.replace("_", " "), row["ft_test_acc"], row["base_test_acc"], row["ft_test_asr"],
            row["base_test_asr"], row["ft_test_ra"], row["ft_der"], row["ft_g_test_acc"], row["ft_g_test_asr"],
            info["ft_epochs"], time.perf_counter() - started,
        )
        x = float(row["fraction_pruned"])
        points.append({"x": x, "y": row["ft_test_acc"], "label": "B'' clean accuracy (test)",
                       "color": "tab:blue", "marker": "D"})
        if names:
            points.append({"x": x, "y": row["ft_test_asr"], "label": "B'' ASR (test)",
                           "color": "tab:red", "marker": "D"})
    columns = [("ft_test_acc", "B'' test acc")]
    if names:
        columns += [("ft_test_asr", "B'' ASR")]
        if any(images.clean_label is not None for images in test.poisoned.values()):
            columns += [("ft_test_ra", "B'' RA")]
        columns += [("ft_der", "B'' DER")]
    columns += [("ft_g_test_acc", "G(B,B'') acc")]
    if names:
        columns += [("ft_g_test_asr", "G(B,B'') ASR")]
    return {"points": points, "columns": columns}
