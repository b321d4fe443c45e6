"""Independent oracles for the tests: plain Keras and numpy, none of the package's sweep machinery.

- `set_weights_predictions`: the CSAW-HackML Lab 3 loop (`lab3.py`): zero a channel's kernel and bias
  with `set_weights`, run `predict`, one channel after the other.
- `set_weights_predictions_pairs`: the same loop over (layer, channel) pairs of several layers, at
  chosen steps.
- `probe_ranking`: the Lab 3 ranking: a Keras sub-model up to the probe layer (`pool_3`), the mean
  activation of each channel over the clean validation images, ascending.
- `threshold_steps`: the first step at which the clean accuracy has dropped by at least each threshold.
"""

from __future__ import annotations

import numpy as np


def set_weights_predictions(model, layer_name: str, x: np.ndarray, order, batch_size: int = 1024) -> np.ndarray:
    """Top-1 labels (N, len(order)+1) with the first s channels of `order` zeroed; column s = s pruned.

    Works on a clone of `model` (the model itself is not changed).
    """
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    layer = clone.get_layer(layer_name)
    kernel, *rest = layer.get_weights()
    columns = [np.argmax(clone.predict(x, batch_size=batch_size, verbose=0), axis=-1)]
    for channel in order:
        kernel[..., channel] = 0
        if rest:
            rest[0][channel] = 0
        layer.set_weights([kernel, *rest])
        columns.append(np.argmax(clone.predict(x, batch_size=batch_size, verbose=0), axis=-1))
    return np.stack(columns, axis=1)


def set_weights_predictions_pairs(model, x: np.ndarray, pairs, steps, batch_size: int = 1024) -> np.ndarray:
    """Top-1 labels (N, len(steps)): column j with the kernel and bias of the first steps[j] (layer,
    channel) `pairs` zeroed by `set_weights` on a fresh clone of `model` (the model itself is not changed)."""
    import keras

    columns = []
    for step in steps:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        for name, channel in list(pairs)[: int(step)]:
            layer = clone.get_layer(name)
            kernel, *rest = layer.get_weights()
            kernel[..., channel] = 0
            if rest:
                rest[0][channel] = 0
            layer.set_weights([kernel, *rest])
        columns.append(np.argmax(clone.predict(x, batch_size=batch_size, verbose=0), axis=-1))
    return np.stack(columns, axis=1)


def probe_ranking(model, probe_layer: str, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Channels in ascending mean activation at `probe_layer` over `x` (ties in channel order)."""
    import keras

    probe = keras.Model(model.inputs, model.get_layer(probe_layer).output)
    activations = np.asarray(probe.predict(x, batch_size=batch_size, verbose=0), np.float64)
    means = activations.reshape(-1, activations.shape[-1]).mean(axis=0)
    return np.argsort(means, kind="stable")


def accuracy_per_step(labels: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Percent of rows whose label equals `truth`, for every column (step) of `labels`."""
    return 100.0 * (np.asarray(labels) == np.asarray(truth)[:, None]).mean(axis=0)


def threshold_steps(accuracy: np.ndarray, drops) -> dict[float, int | None]:
    """drop -> the first step whose accuracy is at least `drop` points below step 0 (None: never)."""
    accuracy = np.asarray(accuracy, np.float64)
    out = {}
    for drop in drops:
        hit = np.flatnonzero(accuracy[0] - accuracy >= float(drop) - 1e-9)
        out[float(drop)] = int(hit[0]) if hit.size else None
    return out


def holdout_split(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held out) indices of n clean validation images under select.holdout / select.seed, as the
    protocol states it: round(n * fraction) images (1 to n - 1) of numpy's default_rng(seed).permutation(n)."""
    count = min(n - 1, max(1, int(round(n * fraction))))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[count:]), np.sort(perm[:count])


def strongest_within(accuracies, base: float, max_drop: float, diverged=None) -> int | None:
    """The last index whose accuracy is at most `max_drop` below `base` and that did not diverge (a loop from the
    end), or None."""
    diverged = diverged or [False] * len(accuracies)
    for i in range(len(accuracies) - 1, -1, -1):
        if not diverged[i] and accuracies[i] == accuracies[i] and base - accuracies[i] <= max_drop + 1e-9:
            return i
    return None
