"""`prune.criterion=activation`: mean activation on clean validation data, least active first.

Fine-Pruning (Liu, Dolan-Gavitt and Garg, RAID 2018) and the CSAW-HackML Lab 3 prune the channels of
the last convolution that the clean inputs activate least: the backdoor hides in channels that clean
data leaves dormant. A channel's score is the mean, over the clean validation images and positions,
of its activation read after the per-channel layers that follow the conv layer:

- one layer: at `prune.probe` (null: the end of the per-channel chain after `prune.layer`, e.g.
  DeepID's conv_3 -> pool_3, as the Lab 3 reads it);
- several layers: for each conv layer, at the end of its own per-channel chain (pooling, element-wise
  activation, dropout, batch norm over the channels: `defense.pruning.masked.per_channel_chain`); `prune.probe`
  must then be null. The means of all layers are ranked together, so a layer whose activations are
  small overall loses its channels first.
"""

from __future__ import annotations

import numpy as np

from defense.criteria import Scores
from defense.core.errors import DefenseError

NEEDS_DATA = True


def check_config(prune_cfg) -> None:
    layer = prune_cfg.get("layer")
    several = layer == "all" or (not isinstance(layer, str) and layer is not None and len(layer) != 1)
    if several and prune_cfg.get("probe"):
        raise DefenseError(
            f"prune.probe={prune_cfg.probe!r} applies to one pruned layer; with prune.layer={layer} each layer is "
            "read at the end of its own per-channel layers: set prune.probe=null"
        )


def probe_path(model, layers: list[str], name: str, probe: str | None) -> list[str]:
    """The layers from conv layer `name` to where its activation is read (see the module docstring)."""
    from defense.pruning.masked import channel_path, per_channel_chain

    if len(layers) == 1:
        return channel_path(model, name, probe or name)
    return per_channel_chain(model, name)


def mean_activation(probe_outputs) -> np.ndarray:
    """Mean over images and positions of each channel (channels last); accepts a list of batches."""
    if isinstance(probe_outputs, np.ndarray):
        probe_outputs = [probe_outputs]
    total, count = None, 0
    for batch in probe_outputs:
        batch = np.asarray(batch, np.float64)
        s = batch.reshape(-1, batch.shape[-1]).sum(axis=0)
        total = s if total is None else total + s
        count += int(np.prod(batch.shape[:-1]))
    return total / max(count, 1)


def mean_activation_order(probe_outputs) -> np.ndarray:
    """Ascending mean activation per channel (least active first), ties kept in channel order."""
    return np.argsort(mean_activation(probe_outputs), kind="stable")


def probe_outputs(model, path: list[str], layer_batches):
    """The probe's outputs, batch by batch, from the conv layer's outputs through the per-channel path.

    The sweep of one layer (defense/pipeline/sweep.py) already streams that layer's outputs and hands them here,
    so the clean validation images pass through the layers before it once only.
    """
    layers = [model.get_layer(name) for name in path[1:]]
    for batch in layer_batches:
        h = batch
        for layer in layers:
            h = layer(h, training=False)
        yield np.asarray(h)


def score(model, layers, clean, cfg, divisor) -> Scores:
    """Mean activations of every layer's channels, in one streamed pass over the clean validation images."""
    import keras
    import tensorflow as tf

    from defense.nets.models import scale_pixels

    probe = cfg.prune.get("probe")
    ends = [probe_path(model, layers, name, probe)[-1] for name in layers]
    reader = keras.Model(model.inputs, [model.get_layer(end).output for end in ends])
    batch_size = int(cfg.get("batch_size", 512))
    sums = [None] * len(layers)
    counts = [0] * len(layers)
    for start in range(0, len(clean.x), batch_size):
        outputs = reader(tf.constant(scale_pixels(clean.x[start : start + batch_size], divisor)), training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for i, out in enumerate(outputs):
            out = np.asarray(out, np.float64)
            s = out.reshape(-1, out.shape[-1]).sum(axis=0)
            sums[i] = s if sums[i] is None else sums[i] + s
            counts[i] += int(np.prod(out.shape[:-1]))
    return Scores({name: sums[i] / max(counts[i], 1) for i, name in enumerate(layers)}, prune_first="low")
