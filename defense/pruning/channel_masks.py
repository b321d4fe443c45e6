"""Predictions of a network with channels of several conv layers pruned, one mask assignment per step.

Pruning output channel c of a Conv2D (zeroing its kernel and bias, as `defense.nets.models.pruned_copy`
does) makes its pre-activation exactly 0 at every position, so the layer outputs act(0) there. The
same is obtained by multiplying the layer's pre-activation (convolution + bias) by a 0/1 mask per
output channel before its activation: 0 * z = 0 for the finite z a network computes, and act(0)
follows for any activation (relu, sigmoid, linear, ...).

`ChannelMasks` walks the model's layer graph once inside one `tf.function` (traced once, on the first
batch): every layer is called as it is, with the model's own weights, except the masked Conv2D layers,
whose convolution + bias is multiplied by a mask `tf.Variable` before their activation. A pruning
step is then one `assign` per masked layer; no model is rebuilt, cloned or traced again per step.
For one layer the faster `defense.pruning.masked.MaskedSweep` (every step at once) is used instead.

What an unchanged mask gave is not computed again. The walk is cut at each masked layer into segments
(one `tf.function` per segment start, traced once): a step that changes the masks of, say, conv_3 and
conv_4 only runs from conv_3, on the tensors the previous step left at that cut (the layers before it
read no changed mask, so their outputs are the same tensors); the first step of each batch runs from
the input. The labels are those of the whole walk at every step (tests/test_masked.py compares both
ways and against `set_weights`).

BN level (`bn_units`: {conv: BatchNormalization name}; ANP, RNP and CLP on networks with BatchNormalization,
defense.pruning.bn_pairing): channel c of such a conv is pruned on its BatchNormalization instead, by
zeroing the BN's `bn_zero` parameters of channel c, as the references' pruning scripts do: gamma := 0
(ANP, RNP) or gamma := 0 and beta := 0 (CLP). The mask then sits on the BN's affine part,
out = (gamma * m) * xhat + beta * m_beta (m_beta = m where beta is zeroed, else 1), xhat normalized with
the moving statistics (inference mode). The BN layer itself is called with gamma * m and beta * m_beta
read in place of its variables (keras.StatelessScope), so a 0/1 mask gives the very values, and labels,
that `set_weights` with those parameters zeroed gives (defense.nets.models.pruned_copy_layers).

    masks = ChannelMasks(model, ["conv_1", "conv_2", "conv_3", "conv_4"])
    labels = masks.predict(x, pairs, steps=[0, 10, 200])  # (N, 3): column j = steps[j] pairs pruned
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from defense.core import interrupt
from defense.nets.models import bn_parameters, check_bn_zero
from defense.pruning.masked import conv_layer


class ChannelMasks:
    """Top-1 labels of `model` with chosen output channels of the conv layers `layer_names` masked."""

    def __init__(self, model, layer_names: list[str], batch_size: int = 512, bn_units: dict | None = None,
                 bn_zero=("gamma",)):
        self.model = model
        self.layers = [conv_layer(model, name) for name in layer_names]
        self.names = [layer.name for layer in self.layers]
        self.channels = {layer.name: int(layer.filters) for layer in self.layers}
        self.bn_units = {conv: bn for conv, bn in (bn_units or {}).items() if conv in self.channels}
        self.bn_zero = tuple(bn_zero)
        check_bn_zero(self.bn_zero)
        # the BN parameters a pruned channel zeroes, chosen where every pruning chooses them (defense/nets/models.py)
        self._zeroed = {bn: bn_parameters(model, bn, self.bn_zero) for bn in self.bn_units.values()}
        self._bn_of = {id(model.get_layer(bn)): conv for conv, bn in self.bn_units.items()}
        # the convs masked on their own pre-activation (the others are masked on their BN)
        self._masked_convs = {id(layer): layer.name for layer in self.layers if layer.name not in self.bn_units}
        self.batch_size = int(batch_size)
        self.masks = {layer.name: tf.Variable(tf.ones([layer.filters], tf.float32), trainable=False,
                                              name=f"mask_{layer.name}") for layer in self.layers}
        graph = getattr(model, "_functional", None) or model
        depths = sorted(graph._nodes_by_depth, reverse=True)
        self._nodes = [n for d in depths for n in graph._nodes_by_depth[d] if n.operation and not n.is_input]
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ValueError("ChannelMasks handles models with one input and one output")
        self._input_id = id(model.inputs[0])
        self._output_id = id(model.outputs[0])
        spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
        self._forward = tf.function(self._run, input_signature=[spec])
        self.traces = 0
        self._cuts()

    def _masked_conv(self, layer, x):
        z = layer.convolution_op(x, layer.kernel)
        if layer.use_bias:
            z = z + layer.bias
        z = z * self.masks[layer.name]  # channels last (conv_layer checks it)
        return layer.activation(z) if layer.activation is not None else z

    def _masked_bn(self, layer, x):
        import keras

        m = self.masks[self._bn_of[id(layer)]]
        mapping = [(variable, tf.convert_to_tensor(variable) * m) for variable in self._zeroed[layer.name]]
        with keras.StatelessScope(state_mapping=mapping):
            return layer(x, training=False)

    def _cuts(self) -> None:
        """The segment starts (node positions of the walk where a mask acts, and 0) and, per start, the tensors
        made before it that the rest of the walk reads (`self._live`), in a fixed order."""
        where = {}  # masked layer name -> the position of the node where its mask acts (the conv, or its BN)
        made = {self._input_id: -1}  # tensor -> the position of the node that makes it
        self._shapes = {self._input_id: self.model.inputs[0]}  # tensor -> its Keras tensor (shape, dtype)
        for i, node in enumerate(self._nodes):
            op = id(node.operation)
            name = self._bn_of.get(op, self._masked_convs.get(op))
            if name is not None:
                where.setdefault(name, i)  # a layer called twice: its first call
            for tensor in node.output_tensors:
                made[id(tensor)], self._shapes[id(tensor)] = i, tensor
        self._start_of = where
        self._starts = sorted({0, *where.values()})
        self._live = {}
        for start in self._starts:
            needed = [id(t) for node in self._nodes[start:] for t in node.input_tensors] + [self._output_id]
            self._live[start] = [t for t in dict.fromkeys(needed) if made.get(t, -1) < start]
        self._segments: dict[int, object] = {}

    def _segment(self, start: int):
        """The walk from node position `start`, as one tf.function: (live tensors at `start`) -> (labels, then
        the live tensors of every later start)."""
        if start not in self._segments:
            specs = [tf.TensorSpec([None, *self._shapes[t].shape[1:]], self._shapes[t].dtype or tf.float32)
                     for t in self._live[start]]

            def run(*inputs):
                self.traces += 1  # Python side effect: counts traces, not calls
                values = dict(zip(self._live[start], inputs))
                labels, values = self._walk(values, start)
                later = [values[t] for s in self._starts if s > start for t in self._live[s]]
                return (labels, *later)

            self._segments[start] = tf.function(run, input_signature=specs)
        return self._segments[start]

    def _run(self, x):
        self.traces += 1  # Python side effect: counts traces, not calls
        return self._walk({self._input_id: x}, 0)[0]

    def _walk(self, values: dict, start: int):
        """Labels of the walk from node position `start` on `values` (the tensors made before it), and every
        tensor it saw."""
        values = dict(values)
        for node in self._nodes[start:]:
            op = node.operation
            if id(op) in self._bn_of:
                outs = [self._masked_bn(op, values[id(node.input_tensors[0])])]
            elif id(op) in self._masked_convs:
                outs = [self._masked_conv(op, values[id(node.input_tensors[0])])]
            else:
                args, kwargs = node.arguments.fill_in(values)
                kwargs = dict(kwargs)
                if getattr(op, "_call_has_training_arg", False):
                    kwargs.setdefault("training", False)
                out = op(*args, **kwargs)
                outs = list(out) if isinstance(out, (list, tuple)) else [out]
            for tensor, value in zip(node.output_tensors, outs):
                values[id(tensor)] = value
        out = values[self._output_id]
        return tf.argmax(tf.reshape(out, [tf.shape(out)[0], -1]), axis=-1, output_type=tf.int32), values

    def mask_arrays(self, pairs, steps) -> list[dict[str, np.ndarray]]:
        """For each step s of `steps`: layer -> 0/1 mask with the first s of `pairs` pruned."""
        index = {name: i for i, name in enumerate(self.names)}
        rank = {name: np.full(self.channels[name], np.iinfo(np.int64).max) for name in self.names}
        for position, (name, channel) in enumerate(pairs):
            if name not in index or not 0 <= int(channel) < self.channels[name]:
                raise ValueError(f"({name!r}, {channel}) is not a channel of the masked layers {self.names}")
            rank[name][int(channel)] = position
        return [{name: (rank[name] >= int(s)).astype(np.float32) for name in self.names} for s in steps]

    def set_masks(self, masks: dict[str, np.ndarray]) -> None:
        for name, mask in masks.items():
            self.masks[name].assign(mask)

    def labels(self, x_scaled: np.ndarray) -> np.ndarray:
        """Top-1 labels of already scaled images with the masks as they are now."""
        return np.concatenate([self._forward(tf.constant(x_scaled[i : i + self.batch_size])).numpy()
                               for i in range(0, len(x_scaled), self.batch_size)] or [np.zeros(0, np.int32)])

    def segments(self) -> int:
        """How many segment functions the walk can have (the bound of `traces`: one trace each)."""
        return len(self._starts)

    def predict(self, x: np.ndarray, pairs, steps, progress=None, divisor: float = 1.0,
                reuse: bool = True) -> np.ndarray:
        """Labels (N, len(steps)) on raw images `x`: column j has the first steps[j] of `pairs` pruned.

        `x` is streamed batch by batch (float or uint8 pixels, scaled per batch by `divisor`); each batch
        is scaled once and evaluated at every step (one mask assignment per step and layer), each step from
        the earliest masked layer whose mask changed since the step before (`reuse=False`: every step from
        the input, the same labels).
        """
        from defense.nets.models import scale_pixels

        masks = self.mask_arrays(pairs, steps)
        labels = np.zeros((len(x), len(masks)), np.int32)
        try:
            for first in range(0, len(x), self.batch_size):
                interrupt.check()  # a safe point between batches (defense/core/interrupt.py)
                batch = tf.constant(scale_pixels(x[first : first + self.batch_size], divisor))
                kept: dict[int, list] = {}  # segment start -> the live tensors there, as the last step left them
                for j, mask in enumerate(masks):
                    changed = [name for name in self.names if j == 0 or not np.array_equal(mask[name], masks[j - 1][name])]
                    start = 0 if j == 0 or not reuse else min((self._start_of[n] for n in changed), default=None)
                    if start is None:  # no mask changed: the step before's labels
                        labels[first : first + len(batch), j] = labels[first : first + len(batch), j - 1]
                        continue
                    self.set_masks({name: mask[name] for name in changed})
                    if not reuse:
                        labels[first : first + len(batch), j] = self._forward(batch).numpy()
                        continue
                    out = self._segment(start)(*([batch] if start == 0 else kept[start]))
                    labels[first : first + len(batch), j] = out[0].numpy()
                    at = 1
                    for s in self._starts:
                        if s > start:
                            kept[s] = list(out[at : at + len(self._live[s])])
                            at += len(self._live[s])
                if progress is not None:
                    progress.update(len(batch))
        finally:
            self.set_masks({name: np.ones(n, np.float32) for name, n in self.channels.items()})
        return labels
