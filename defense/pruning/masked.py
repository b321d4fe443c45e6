"""Predictions of a network at every step of a pruning sweep, without re-running the whole network.

Pruning channel c of a conv layer L (zeroing its kernel and bias) makes L's output channel c the
constant act(0) (0 for ReLU). So the part of the network before L is run once per image, and the part
after it is evaluated with the pruned channels masked, for every step of the sweep at once:

- layers that act on each channel alone and keep a constant channel constant (pooling, element-wise
  activations, dropout, batch norm over the channels: the rule of `defense.pruning.per_channel`) keep the
  masking exact: they are applied once to the unmasked tensor ("channel-separable" form), and the
  pruned channels' constant follows them (e.g. BN(act(0)));
- the linear layers that read a channel-separable tensor (Conv2D, Flatten + Dense: `conv_4` and
  `fc_1` in DeepID) are split into one contribution per input channel; the output at step s is the
  bias plus the sum of the contributions of the channels still kept, a reverse cumulative sum over
  the pruning order, so all steps cost one pass of those layers;
- everything after that is evaluated on (image, step) rows, and only on the rows whose input changed:
  removing a channel that is all zero (inactive) for an image leaves that image's prediction as it
  was, so the step is not recomputed for it.

Any other layer (a softmax over the channels, a batch norm over another axis, anything unknown) gets
the masked tensor materialised per (image, step) row and is called as it is, so every functional or
Sequential Keras model whose pruned layer is a channels-last Conv2D with an element-wise activation
works; the fast paths only make it cheaper. `MaskedSweep.routes` says which way each layer goes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from defense.core import interrupt
from defense.core.errors import DefenseError
from defense.pruning.per_channel import activation_name, channel_rule, is_elementwise_activation

log = logging.getLogger("defense.masked")


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
    if not is_elementwise_activation(layer.activation):
        raise DefenseError(
            f"prune.layer={name!r} uses the activation {activation_name(layer.activation)}, which is not element-wise: "
            "pruning one of its channels changes the others, so its channels cannot be pruned one by one; choose a "
            f"conv layer with an element-wise activation (relu, sigmoid, linear, ...) among {convs}"
        )
    return layer


def _per_channel_steps(model, layer, tensor) -> list:
    """(layer, its output) for each per-channel layer of `model` reading `tensor` (`layer`'s output) alone."""
    steps = []
    for node in layer._outbound_nodes:
        op = node.operation
        if op not in model.layers or len(node.input_tensors) != 1 or node.input_tensors[0] is not tensor:
            continue
        out = node.output_tensors[0]
        if _keeps_channels_last(op, len(tensor.shape), len(out.shape)) and all(op is not o for o, _ in steps):
            steps.append((op, out))
    return steps


def per_channel_chain(model, layer_name: str) -> list[str]:
    """`layer_name` and the per-channel layers that follow it one after the other (each its only reader)."""
    chain = [layer_name]
    layer = model.get_layer(layer_name)
    tensor = layer.output
    while len(steps := _per_channel_steps(model, layer, tensor)) == 1:
        layer, tensor = steps[0]
        chain.append(layer.name)
    return chain


def channel_path(model, layer_name: str, probe_name: str) -> list[str]:
    """Layers from the pruned layer to the probe layer, which must follow it through per-channel ops.

    The probe's channels are then the pruned layer's channels (e.g. `conv_3` -> `pool_3`).
    """
    if probe_name == layer_name:
        return [layer_name]
    path = [layer_name]
    layer = model.get_layer(layer_name)
    tensor = layer.output
    while True:
        steps = _per_channel_steps(model, layer, tensor)
        if any(op.name == probe_name for op, _ in steps):
            return path + [probe_name]
        if len(steps) != 1:
            break
        layer, tensor = steps[0]
        path.append(layer.name)
    names = [layer.name for layer in model.layers]
    hint = "" if probe_name in names else " (the model has no such layer)"
    raise DefenseError(
        f"prune.probe={probe_name!r}{hint} is not downstream of prune.layer={layer_name!r} through per-channel "
        f"layers (pooling, activation); use {layer_name!r} itself or a pooling/activation layer right after it"
    )


def _keeps_channels_last(layer, in_rank: int, out_rank: int):
    """The per-channel rule of `layer` reading a channels-last tensor, when the channels stay last (else None)."""
    rule = channel_rule(layer, in_rank, in_rank - 1)
    if rule.per_channel and rule.out_axis == out_rank - 1:
        return rule
    return None


@dataclass
class _Sep:
    """Channel-separable value: at step s it equals t * keep_s + k * (1 - keep_s) (channels last)."""

    t: tf.Tensor  # (B, ..., C)
    k: tf.Tensor  # (C,)
    flat: bool = False  # t is (B, positions, C), the channels-last Flatten of a spatial tensor


# How each layer after the pruned one is evaluated (MaskedSweep.routes)
PER_CHANNEL = "per-channel"  # on the separable tensor, once per image; the constants follow (defense.pruning.per_channel)
FLATTEN = "flatten"  # channels-last Flatten of a separable tensor
SPLIT_CONV = "split conv"  # Conv2D split into one contribution per input channel
SPLIT_DENSE = "split dense"  # Dense on a flattened (or globally pooled) separable tensor, split likewise
PER_ROW = "per row"  # the layer as it is, on the masked tensor materialised per (image, step) row


@dataclass
class _Route:
    node: object
    how: str
    k: tf.Tensor | None = None  # PER_CHANNEL: the constant of each pruned channel after the layer (C,)
    why: str = ""  # PER_ROW on a separable input: why the layer is not per-channel


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
        graph = getattr(model, "_functional", None) or model  # a Sequential keeps its graph there
        depth_keys = sorted(graph._nodes_by_depth, reverse=True)
        nodes = [n for d in depth_keys for n in graph._nodes_by_depth[d] if n.operation and not n.is_input]
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
        # the separable tensors: id -> (constant of each pruned channel, flat)
        seps = {id(self.layer.output): (np.asarray(self.pruned_value, np.float64), False)}
        plan = [self._route(node, seps) for node in top_nodes]
        self.routes = [(route.node.operation.name, route.how) for route in plan]
        for route in plan:
            if route.how == PER_ROW and route.why:
                log.debug("%s: evaluated per (image, step) row: %s", route.node.operation.name, route.why)
        return plan

    def _route(self, node, seps) -> _Route:
        """How `node` is evaluated; records its output in `seps` when it stays channel-separable."""
        import keras

        op = node.operation
        ins, outs = list(node.input_tensors), list(node.output_tensors)
        if len(ins) != 1 or id(ins[0]) not in seps or len(outs) != 1:
            return _Route(node, PER_ROW)
        k, flat = seps[id(ins[0])]
        rank, out = len(ins[0].shape), outs[0]
        if flat:  # (B, positions * C): only a Dense is split per channel
            if type(op) is keras.layers.Dense:
                return _Route(node, SPLIT_DENSE)
            return _Route(node, PER_ROW, why="reads a flattened tensor")
        if type(op) is keras.layers.Flatten:
            if op.data_format != "channels_last":
                return _Route(node, PER_ROW, why="flattens channels first")
            seps[id(out)] = (k, True)
            return _Route(node, FLATTEN)
        if type(op) is keras.layers.Conv2D and rank == 4:
            dilated, strided = list(op.dilation_rate) != [1, 1], list(op.strides) != [1, 1]
            if op.data_format == "channels_last" and op.groups == 1 and not (dilated and strided):
                return _Route(node, SPLIT_CONV)
            return _Route(node, PER_ROW, why="a channels-first, grouped or dilated strided Conv2D")
        if type(op) is keras.layers.Dense and rank == 2:  # e.g. after global pooling: one position
            return _Route(node, SPLIT_DENSE)
        rule = channel_rule(op, rank, rank - 1)
        if not rule.per_channel or rule.out_axis != len(out.shape) - 1:
            return _Route(node, PER_ROW, why=rule.what)
        k_out = rule.constants(op, k)
        if k_out is None:
            return _Route(node, PER_ROW, why=f"{rule.what}; the pruned channels' constants are {k.tolist()}")
        seps[id(out)] = (k_out, False)
        return _Route(node, PER_CHANNEL, tf.constant(k_out, tf.float32))

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
        for route in self._plan:
            node = route.node
            outputs = self._apply(route, [values[id(x)] for x in node.input_tensors], ctx)
            for x, y in zip(node.output_tensors, outputs):
                values[id(x)] = y
        out = self._as_rows(values[self._output_ids[0]], ctx).v
        labels = tf.argmax(tf.reshape(out, [tf.shape(out)[0], -1]), axis=-1, output_type=tf.int32)
        # each (image, step) reads the last row at or before it (row-major order, step 0 always a row)
        read = tf.reshape(tf.cumsum(tf.cast(tf.reshape(changed, [-1]), tf.int32)) - 1, [batch, -1])
        return tf.gather(labels, read)

    def _apply(self, route: _Route, ins, ctx):
        node = route.node
        layer = node.operation
        if route.how == PER_CHANNEL:
            return [_Sep(layer(ins[0].t, training=False), route.k)]
        if route.how == FLATTEN:
            sep = ins[0]
            positions = int(np.prod(sep.t.shape[1:-1]))
            return [_Sep(tf.reshape(sep.t, [-1, positions, sep.t.shape[-1]]), sep.k, flat=True)]
        if route.how == SPLIT_CONV:
            return [self._linear_conv(layer, ins[0], ctx)]
        if route.how == SPLIT_DENSE:
            sep = ins[0]
            if not sep.flat:  # (B, C): the flatten of one position
                sep = _Sep(tf.reshape(sep.t, [-1, 1, sep.t.shape[-1]]), sep.k, flat=True)
            return [self._linear_dense(layer, sep, ctx)]
        # PER_ROW: the layer as it is, on the masked tensor materialised per (image, step) row
        tensors = {id(x): self._as_rows(v, ctx).v for x, v in zip(node.input_tensors, ins)}
        args, kwargs = node.arguments.fill_in(tensors)
        kwargs = dict(kwargs)
        if getattr(layer, "_call_has_training_arg", False):
            kwargs.setdefault("training", False)
        out = layer(*args, **kwargs)
        out = out if isinstance(out, (list, tuple)) else [out]
        return [_Rows(o) for o in out]

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
        dil = list(layer.dilation_rate)  # not both dilated and strided: those run per row (_route)
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
    def layer_outputs(self, x: np.ndarray, divisor: float = 1.0):
        """Outputs of the part before (and beside) the pruned layer, batch by batch: yields lists.

        `x` holds raw images, float or uint8 pixels; each batch is made float32 and divided by
        `divisor` (`model.input_divisor`) here, so no float copy of the whole set is ever made.
        """
        from defense.nets.models import scale_pixels

        for start in range(0, len(x), self.batch_size):
            out = self._bottom_fn(tf.constant(scale_pixels(x[start : start + self.batch_size], divisor)))
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

    def predict(self, x: np.ndarray, order, progress=None, divisor: float = 1.0) -> np.ndarray:
        """Labels (N, len(order)+1) of the network on raw images `x`; column s = s channels pruned.

        `x` is streamed batch by batch (float or uint8 pixels, scaled per batch by `divisor`); only the
        labels of the whole set are kept.
        """
        full = self.full_order(order)
        steps = tf.constant(len(order), tf.int64)
        labels = np.zeros((len(x), len(order) + 1), np.int32)
        done = 0
        for outputs in self.layer_outputs(x, divisor):
            interrupt.check()  # a safe point between batches (defense/core/interrupt.py)
            batch = self._top_fn(outputs[0], list(outputs[1:]), full, steps).numpy()
            labels[done : done + len(batch)] = batch
            done += len(batch)
            if progress is not None:
                progress.update(len(batch))
        return labels
