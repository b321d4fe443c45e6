"""Predictions of a network at every step of a pruning sweep, without re-running the whole network.

Pruning channel c of a conv layer L (zeroing its kernel and bias) makes L's output channel c the
constant act(0) (0 for ReLU). So the part of the network before L is run once per image, and the part
after it is evaluated with the pruned channels masked, for every step of the sweep at once:

- ops that act on each channel alone (pooling, activations, dropout, batch norm) keep the masking
  exact: they are applied once to the unmasked tensor ("channel-separable" form);
- the linear layers that read a channel-separable tensor (Conv2D, Flatten + Dense: `conv_4` and
  `fc_1` in DeepID) are split into one contribution per input channel; the output at step s is the
  bias plus the sum of the contributions of the channels still kept, a reverse cumulative sum over
  the pruning order, so all steps cost one pass of those layers;
- everything after that is evaluated on (image, step) rows, and only on the rows whose input changed:
  removing a channel that is all zero (inactive) for an image leaves that image's prediction as it
  was, so the step is not recomputed for it.

Any other layer gets the masked tensor materialised per (image, step) row and is called as it is,
so every functional Keras model whose pruned layer is a channels-last Conv2D works; the fast paths
only make it cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from defense.errors import DefenseError

# Layers that act on each channel separately (the constant of a pruned channel stays a constant).
_POOLING = ("MaxPooling2D", "AveragePooling2D", "MaxPooling1D", "AveragePooling1D")
_PER_CHANNEL = _POOLING + (
    "Activation", "ReLU", "LeakyReLU", "ELU", "Dropout", "SpatialDropout2D", "GaussianNoise",
    "GaussianDropout", "BatchNormalization", "Identity",
)


def conv_layer(model, name: str):
    """The Conv2D layer `name` of `model`, or a DefenseError listing the conv layers there are."""
    import keras

    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    try:
        layer = model.get_layer(name)
    except ValueError:
        raise DefenseError(f"prune.layer={name!r}: the model has no such layer; its conv layers are {convs}") from None
    if not isinstance(layer, keras.layers.Conv2D) or layer.data_format != "channels_last":
        raise DefenseError(
            f"prune.layer={name!r} is a {type(layer).__name__}, not a channels-last Conv2D layer; "
            f"choose one of {convs}"
        )
    return layer


def channel_path(model, layer_name: str, probe_name: str) -> list[str]:
    """Layers from the pruned layer to the probe layer, which must follow it through per-channel ops.

    The probe's channels are then the pruned layer's channels (e.g. `conv_3` -> `pool_3`).
    """
    if probe_name == layer_name:
        return [layer_name]
    path = [layer_name]
    layer = model.get_layer(layer_name)
    while True:
        consumers = [node.operation for node in layer._outbound_nodes if node.operation in model.layers]
        per_channel = [c for c in consumers if type(c).__name__ in _PER_CHANNEL]
        match = [c for c in per_channel if c.name == probe_name]
        if match:
            return path + [probe_name]
        if len(per_channel) != 1:
            break
        layer = per_channel[0]
        path.append(layer.name)
    names = [layer.name for layer in model.layers]
    hint = "" if probe_name in names else " (the model has no such layer)"
    raise DefenseError(
        f"prune.probe={probe_name!r}{hint} is not downstream of prune.layer={layer_name!r} through per-channel "
        f"layers (pooling, activation); use {layer_name!r} itself or a pooling/activation layer right after it"
    )


@dataclass
class _Sep:
    """Channel-separable value: at step s it equals t * keep_s + k * (1 - keep_s) (channels last)."""

    t: tf.Tensor  # (B, ..., C)
    k: tf.Tensor  # (C,)
    flat: bool = False  # t is (B, positions, C), the channels-last Flatten of a spatial tensor


@dataclass
class _Rows:
    """A value per (image, step) row of the rows being evaluated: (P, ...)."""

    v: tf.Tensor


@dataclass
class _Static:
    """A value that no pruning step changes (computed before the pruned layer): (B, ...)."""

    v: tf.Tensor


class MaskedSweep:
    """Top-1 predictions of `model` with the first s channels of `order` pruned in layer `layer_name`.

    >>> sweep = MaskedSweep(model, "conv_3")
    >>> preds = sweep.predict(x, order)  # (N, len(order) + 1): column s = s channels pruned
    """

    def __init__(self, model, layer_name: str, batch_size: int = 512):
        import keras

        self.model = model
        self.layer = conv_layer(model, layer_name)
        self.channels = int(self.layer.filters)
        self.batch_size = int(batch_size)
        act = self.layer.activation
        self.pruned_value = tf.constant(
            np.asarray(act(tf.zeros((1, self.channels)))).reshape(self.channels), tf.float32
        )
        self._plan = self._build_plan()
        self.bottom = keras.Model(model.inputs, [self.layer.output, *self._static_inputs])
        spec = lambda t: tf.TensorSpec([None, *t.shape[1:]], tf.float32)  # noqa: E731 - batch size varies
        self._bottom_fn = tf.function(
            lambda x: self.bottom(x, training=False), input_signature=[spec(model.inputs[0])]
        )
        self._top_fn = tf.function(
            self._top,
            input_signature=[
                spec(self.layer.output),
                [spec(t) for t in self._static_inputs],
                tf.TensorSpec([self.channels], tf.int64),
                tf.TensorSpec([], tf.int64),
            ],
        )

    # ---- graph analysis ------------------------------------------------------------------------
    def _build_plan(self):
        model = self.model
        depth_keys = sorted(model._nodes_by_depth, reverse=True)
        nodes = [n for d in depth_keys for n in model._nodes_by_depth[d] if n.operation and not n.is_input]
        downstream = {id(self.layer.output)}
        top_nodes, statics = [], {}
        layer_seen = False
        for node in nodes:
            if node.operation is self.layer:
                layer_seen = True
                continue
            ins = list(node.input_tensors)
            if any(id(t) in downstream for t in ins):
                top_nodes.append(node)
                for t in node.output_tensors:
                    downstream.add(id(t))
                for t in ins:
                    if id(t) not in downstream:
                        statics[id(t)] = t
        if not layer_seen:
            raise DefenseError(f"prune.layer={self.layer.name!r} is not part of the model's graph")
        self._static_inputs = list(statics.values())
        self._output_ids = [id(t) for t in model.outputs]
        if len(self._output_ids) != 1 or self._output_ids[0] not in downstream:
            raise DefenseError(
                f"the model's single output must depend on prune.layer={self.layer.name!r}; it has "
                f"{len(self._output_ids)} output(s)"
            )
        return top_nodes

    # ---- evaluation of the part after the pruned layer ------------------------------------------
    def _top(self, t, statics, order_full, steps):
        """Predictions for the rows (image, step) whose input changed, and where each row reads.

        t: (B, ..., C) output of the pruned layer; order_full: all C channels, the pruning order first;
        steps: number of pruning steps S (columns 0..S). Returns (B, S+1) int32 labels.
        """
        k = self.pruned_value
        batch = tf.shape(t)[0]
        spatial_axes = list(range(1, len(t.shape) - 1))
        active = tf.reduce_any(tf.not_equal(t, k), axis=spatial_axes)  # (B, C)
        removed = order_full[:steps]
        changed = tf.concat([tf.ones((batch, 1), tf.bool), tf.gather(active, removed, axis=1)], axis=1)
        pairs = tf.where(changed)  # (P, 2): image, step
        rows_b, rows_s = pairs[:, 0], pairs[:, 1]
        # keep[s, c] = 1 while channel c is not among the first s channels of the order
        rank = tf.scatter_nd(order_full[:, None], tf.range(self.channels, dtype=tf.int64), [self.channels])
        keep = tf.cast(rank[None, :] >= tf.range(steps + 1, dtype=tf.int64)[:, None], tf.float32)  # (S+1, C)
        ctx = dict(rows_b=rows_b, rows_s=rows_s, keep=keep, order_full=order_full, pairs=pairs)

        values = {id(self.layer.output): _Sep(t, k)}
        for tensor, value in zip(self._static_inputs, statics):
            values[id(tensor)] = _Static(value)
        for node in self._plan:
            outputs = self._apply(node, [values[id(x)] for x in node.input_tensors], ctx)
            for x, y in zip(node.output_tensors, outputs):
                values[id(x)] = y
        out = self._as_rows(values[self._output_ids[0]], ctx).v
        labels = tf.argmax(tf.reshape(out, [tf.shape(out)[0], -1]), axis=-1, output_type=tf.int32)
        # each (image, step) reads the last row at or before it (row-major order, step 0 always a row)
        read = tf.reshape(tf.cumsum(tf.cast(tf.reshape(changed, [-1]), tf.int32)) - 1, [batch, -1])
        return tf.gather(labels, read)

    def _apply(self, node, ins, ctx):
        layer = node.operation
        kind = type(layer).__name__
        if len(ins) == 1 and isinstance(ins[0], _Sep) and not ins[0].flat:
            sep = ins[0]
            if kind in _POOLING:
                return [_Sep(layer(sep.t, training=False), sep.k)]
            if kind in _PER_CHANNEL:
                rank = len(sep.t.shape)
                k_out = tf.reshape(layer(tf.reshape(sep.k, [1] * (rank - 1) + [-1]), training=False), [-1])
                return [_Sep(layer(sep.t, training=False), k_out)]
            if kind == "Flatten" and getattr(layer, "data_format", "channels_last") == "channels_last":
                positions = int(np.prod(sep.t.shape[1:-1]))
                return [_Sep(tf.reshape(sep.t, [-1, positions, sep.t.shape[-1]]), sep.k, flat=True)]
            if kind == "Conv2D" and layer.data_format == "channels_last" and layer.groups == 1:
                return [self._linear_conv(layer, sep, ctx)]
        if len(ins) == 1 and isinstance(ins[0], _Sep) and ins[0].flat and kind == "Dense":
            return [self._linear_dense(layer, ins[0], ctx)]
        if all(isinstance(v, _Static) for v in ins):
            tensors = {id(x): v.v for x, v in zip(node.input_tensors, ins)}
        else:
            tensors = {id(x): self._as_rows(v, ctx).v for x, v in zip(node.input_tensors, ins)}
        args, kwargs = node.arguments.fill_in(tensors)
        kwargs = dict(kwargs)
        if getattr(layer, "_call_has_training_arg", False):
            kwargs.setdefault("training", False)
        out = layer(*args, **kwargs)
        out = out if isinstance(out, (list, tuple)) else [out]
        wrap = _Static if all(isinstance(v, _Static) for v in ins) else _Rows
        return [wrap(o) for o in out]

    def _as_rows(self, value, ctx) -> _Rows:
        if isinstance(value, _Rows):
            return value
        if isinstance(value, _Static):
            return _Rows(tf.gather(value.v, ctx["rows_b"]))
        t = tf.gather(value.t, ctx["rows_b"])
        keep = tf.gather(ctx["keep"], ctx["rows_s"])  # (P, C)
        keep = tf.reshape(keep, tf.concat([tf.shape(keep)[:1], tf.ones([len(t.shape) - 2], tf.int32), [-1]], 0))
        v = t * keep + value.k * (1.0 - keep)
        if value.flat:
            v = tf.reshape(v, [tf.shape(v)[0], -1])
        return _Rows(v)

    def _kept_sum(self, contrib, base, layer, ctx):
        """contrib (B, C, ...) per input channel, in pruning order -> layer output on every row.

        Row (b, s) keeps channels order_full[s:], so its pre-activation is the bias plus a reverse
        cumulative sum over the ordered contributions. The sum is unrolled (adding from the last
        channel to the first): TensorFlow's cumsum over a middle axis is several times slower on CPU.
        """
        shape = tf.shape(contrib)
        flat = tf.reshape(contrib, [shape[0], self.channels, -1])
        if self.channels <= 1024:
            running = tf.zeros_like(flat[:, 0])
            kept = [running]  # s = C: every channel pruned
            for j in range(self.channels - 1, -1, -1):
                running = running + flat[:, j]
                kept.append(running)
            kept = tf.stack(kept[::-1], axis=1)  # (B, C+1, F)
        else:
            kept = tf.concat([tf.cumsum(flat, axis=1, reverse=True), tf.zeros_like(flat[:, :1])], axis=1)
        pre = tf.gather_nd(kept, ctx["pairs"])
        pre = tf.reshape(pre, tf.concat([tf.shape(pre)[:1], tf.shape(contrib)[2:]], axis=0)) + base
        return _Rows(layer.activation(pre))

    def _linear_conv(self, layer, sep: _Sep, ctx) -> _Rows:
        order = ctx["order_full"]
        kernel = tf.gather(layer.kernel, order, axis=2)  # (kh, kw, C, F), input channels in pruning order
        c, f = kernel.shape[2], kernel.shape[3]
        strides = [1, *layer.strides, 1]
        padding = layer.padding.upper()
        dil = list(layer.dilation_rate)
        if dil != [1, 1] and strides != [1, 1, 1, 1]:
            raise DefenseError(f"layer {layer.name}: dilated strided convolutions are not supported after the pruned layer")
        x = tf.gather(sep.t - sep.k, order, axis=-1)
        per_channel = tf.nn.depthwise_conv2d(x, kernel, strides, padding, dilations=dil)  # (B, H, W, C*F)
        shape = tf.shape(per_channel)
        contrib = tf.reshape(per_channel, [shape[0], shape[1], shape[2], c, f])
        contrib = tf.transpose(contrib, [0, 3, 1, 2, 4])  # (B, C, H, W, F)
        const = tf.ones_like(sep.t[:1]) * sep.k
        base = tf.nn.conv2d(const, layer.kernel, strides, padding, dilations=dil)[0]
        if layer.use_bias:
            base = base + layer.bias
        return self._kept_sum(contrib, base, layer, ctx)

    def _linear_dense(self, layer, sep: _Sep, ctx) -> _Rows:
        positions, c = sep.t.shape[1], sep.t.shape[2]
        kernel = tf.reshape(layer.kernel, [positions, c, -1])  # flatten order: position-major, channel-minor
        order = ctx["order_full"]
        contrib = tf.einsum("bpc,pcf->bcf", tf.gather(sep.t - sep.k, order, axis=-1), tf.gather(kernel, order, axis=1))
        base = tf.einsum("c,pcf->f", sep.k, kernel)
        if layer.use_bias:
            base = base + layer.bias
        return self._kept_sum(contrib, base, layer, ctx)

    # ---- public API -----------------------------------------------------------------------------
    def layer_outputs(self, x: np.ndarray):
        """Outputs of the part before (and beside) the pruned layer, batch by batch: yields lists."""
        for start in range(0, len(x), self.batch_size):
            out = self._bottom_fn(tf.constant(x[start : start + self.batch_size]))
            yield out if isinstance(out, (list, tuple)) else [out]

    def full_order(self, order) -> tf.Tensor:
        order = [int(c) for c in order]
        if len(set(order)) != len(order) or any(c < 0 or c >= self.channels for c in order):
            raise ValueError(f"order must list distinct channels of 0..{self.channels - 1}")
        rest = [c for c in range(self.channels) if c not in set(order)]
        return tf.constant(order + rest, tf.int64)

    def predict_from_outputs(self, outputs, order) -> np.ndarray:
        """(B, len(order)+1) labels from one batch of `layer_outputs`."""
        full = self.full_order(order)
        return self._top_fn(outputs[0], list(outputs[1:]), full, tf.constant(len(order), tf.int64)).numpy()

    def predict(self, x: np.ndarray, order, progress=None) -> np.ndarray:
        """Labels (N, len(order)+1) of the network on scaled inputs `x`; column s = s channels pruned."""
        full = self.full_order(order)
        steps = tf.constant(len(order), tf.int64)
        parts = []
        for outputs in self.layer_outputs(x):
            parts.append(self._top_fn(outputs[0], list(outputs[1:]), full, steps).numpy())
            if progress is not None:
                progress.update(int(outputs[0].shape[0]))
        return np.concatenate(parts) if parts else np.zeros((0, len(order) + 1), np.int32)


def seed_style_predictions(model, layer_name: str, x: np.ndarray, order, batch_size: int = 1024) -> np.ndarray:
    """The seed's way, for checking: zero each channel's kernel and bias with set_weights, then predict.

    Modifies a clone, not `model`. Returns (N, len(order)+1) labels; column s = s channels pruned.
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
