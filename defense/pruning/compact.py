"""Compact export: a B' with its pruned channels removed, not only zeroed.

A B' made by `defense.nets.models.pruned_copy` keeps the full architecture with the kernel and bias of the
pruned output channels of the pruned Conv2D layer set to zero. `compact_model` rebuilds the network
with fewer filters in that layer and slices every layer that reads those channels:

- layers that act on each channel alone and keep a constant channel constant (pooling, global
  pooling, cropping, up-sampling, element-wise activations, dropout, batch norm over the channels: the
  rule of `defense.pruning.per_channel`) pass the channels through; batch norm and PReLU keep only the kept
  channels' weights;
- a Conv2D that reads them loses the matching input channels of its kernel (DeepID `conv_4`:
  kernel[:, :, kept, :]);
- a Flatten (channels last) followed by a Dense: the Dense loses the matching kernel rows, flattened
  index = position * C + channel (DeepID `fc_1`); a Dense reading the channel axis directly (e.g.
  after global pooling) loses the rows of the pruned channels.

Everything after those consumers (more convolutions, dense layers, Add, activations, the output)
is copied unchanged. The compact network computes the same function as the masked B':

A pruned channel's output is the constant act(0) of the pruned layer (0 for ReLU), and stays a
constant through the per-channel layers (e.g. BN(act(0))). When that constant is not 0 its
contribution is folded into the consumer's bias (a Dense or a `valid`-padded Conv2D: every output
position sees the whole kernel window, so the contribution is the same everywhere; a consumer without
bias gets one). The one case that cannot be folded, a non-zero constant read by a `same`-padded
Conv2D with a kernel larger than 1x1 (the zero padding makes the contribution differ at the borders),
raises a DefenseError, as does a layer that mixes the channels (a softmax over them, a batch norm over
another axis, zero padding of a non-zero constant, any layer `defense.pruning.per_channel` does not know) and
any other layer reading the pruned channels directly (Add, Concatenate, Reshape, ...: slicing them
would need the other inputs changed too).

    compact = compact_model(model, "conv_3", pruned)       # pruned: channel indices
    compact = compact_from_pruned(b_prime, "conv_3")         # the channels whose kernel and bias are 0
    stats = export_compact(b_prime, "conv_3", pruned, "models/model_B_10_compact.h5", tracker, x=x)

`python -m defense.compact B_PRIME.h5 [--layer conv_3] [--out OUT.h5] [--data clean_test.h5]`
compacts a saved B' (or fine-tuned B'') and prints both parameter counts and predict times.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from defense.core.errors import DefenseError
from defense.pruning.per_channel import channel_rule

log = logging.getLogger("defense.compact")

_HINT = (
    "compact export supports, after the pruned layer, per-channel layers (pooling, element-wise activation, "
    "dropout, batch norm over the channels, global pooling), Flatten, and Conv2D / Dense consumers"
)


class _Track:
    """A tensor that carries the pruned layer's channels.

    `k` holds the constant value of each channel when pruned: shape (C,) for a channels-last tensor,
    (P, C) for the channels-last Flatten of a spatial tensor with P positions (`flat`).
    """

    def __init__(self, k: np.ndarray, rank: int, flat: bool = False):
        self.k = k
        self.rank = rank
        self.flat = flat


def _layer_config(config: dict, name: str) -> dict:
    for entry in config["layers"]:
        if entry.get("config", {}).get("name") == name or entry.get("name") == name:
            return entry
    raise DefenseError(f"layer {name!r} is missing from the model's config; the model cannot be rebuilt")


def _check_channels(layer, channels) -> list[int]:
    filters = int(layer.filters)
    try:
        values = sorted({int(c) for c in channels})
    except (TypeError, ValueError):
        raise DefenseError(f"pruned channels must be integers, got {list(channels)!r}") from None
    bad = [c for c in values if c < 0 or c >= filters]
    if bad:
        raise DefenseError(f"pruned channels {bad} are outside 0..{filters - 1} of layer {layer.name!r}")
    if len(values) == filters:
        raise DefenseError(
            f"all {filters} channels of {layer.name!r} are pruned: a compact model needs at least one filter left"
        )
    return values


def _graph(model):
    """The functional graph of `model` (a Sequential's inner functional model)."""
    graph = getattr(model, "_functional", None) or model
    if not hasattr(graph, "_nodes_by_depth"):
        raise DefenseError(
            f"model {model.name!r} ({type(model).__name__}) has no layer graph; compact export needs a "
            "functional or Sequential Keras model with a known input shape"
        )
    return graph


def _plan(model, layer, pruned: list[int]):
    """Walk the layers after the pruned one: {layer name: edit} for the layers whose weights change."""
    import keras

    channels = int(layer.filters)
    kept = [c for c in range(channels) if c not in set(pruned)]
    # the activation is element-wise (`defense.pruning.masked.conv_layer` refuses the others), so a pruned channel is act(0)
    k0 = np.asarray(layer.activation(np.zeros((1, channels), np.float32)), np.float64).reshape(channels)

    graph = _graph(model)
    depths = sorted(graph._nodes_by_depth, reverse=True)
    nodes = [n for d in depths for n in graph._nodes_by_depth[d] if n.operation is not None and not n.is_input]
    tracked: dict[int, _Track] = {}
    found = False
    edits: dict[str, dict] = {layer.name: {"op": "out", "kept": kept}}

    calls: dict[str, int] = {}

    def add_edit(target, edit):
        old = edits.get(target.name)
        if old is not None and (
            old["op"] != edit["op"] or old.get("positions") != edit.get("positions")
            or not np.array_equal(old.get("k", 0), edit.get("k", 0))
        ):
            raise DefenseError(
                f"layer {target.name!r} is shared and reads the pruned channels of {layer.name!r} in different "
                "ways; it cannot be compacted"
            )
        edits[target.name] = edit
        calls[target.name] = calls.get(target.name, 0) + 1

    for node in nodes:
        op = node.operation
        if op is layer:
            found = True
            for t in node.output_tensors:
                tracked[id(t)] = _Track(k0, len(t.shape))
            continue
        ins = [tracked.get(id(t)) for t in node.input_tensors]
        if not any(v is not None for v in ins):
            continue
        kind = type(op).__name__
        if len(node.input_tensors) != 1:
            raise DefenseError(
                f"layer {op.name!r} ({kind}) reads the channels of the pruned layer {layer.name!r} together with other "
                f"inputs; {_HINT}"
            )
        track = ins[0]
        out_tensor = node.output_tensors[0]
        pruned_k = track.k[..., pruned]
        needs_fold = bool(np.any(pruned_k != 0))
        if kind == "Flatten":
            if getattr(op, "data_format", "channels_last") != "channels_last":
                raise DefenseError(f"layer {op.name!r} flattens channels-first; {_HINT}")
            if track.flat:
                tracked[id(out_tensor)] = track
            else:
                spatial = [int(s) for s in node.input_tensors[0].shape[1:-1]]
                positions = int(np.prod(spatial)) if spatial else 1
                tracked[id(out_tensor)] = _Track(np.tile(track.k, (positions, 1)), 2, flat=True)
        elif isinstance(op, keras.layers.Conv2D) and not track.flat:
            if op.data_format != "channels_last" or op.groups != 1:
                raise DefenseError(f"layer {op.name!r}: only channels-last Conv2D with groups=1 can be sliced; {_HINT}")
            kh, kw = (int(s) for s in op.kernel_size)
            if needs_fold and op.padding != "valid" and (kh, kw) != (1, 1):
                raise DefenseError(
                    f"the pruned channels of {layer.name!r} reach {op.name!r} as the non-zero constant "
                    f"{float(pruned_k.flat[np.argmax(np.abs(pruned_k))]):g} and {op.name!r} pads with zeros "
                    f"(padding={op.padding!r}): their contribution differs at the borders and cannot be folded "
                    "into the bias, so this model cannot be compacted"
                )
            add_edit(op, {"op": "conv", "k": pruned_k, "fold": needs_fold})
        elif isinstance(op, keras.layers.Dense):
            if track.flat:
                add_edit(op, {"op": "dense_flat", "positions": track.k.shape[0], "k": pruned_k, "fold": needs_fold})
            else:
                add_edit(op, {"op": "dense", "k": pruned_k, "fold": needs_fold})
        else:
            tracked[id(out_tensor)] = _per_channel(op, track, len(out_tensor.shape), layer, pruned, add_edit)
    if not found:
        raise DefenseError(f"layer {layer.name!r} is not part of the model's graph")
    for name, count in calls.items():
        if count != sum(1 for n in nodes if n.operation.name == name):
            raise DefenseError(
                f"layer {name!r} is shared: it also reads tensors other than the channels of {layer.name!r}, so its "
                "weights cannot be sliced; it cannot be compacted"
            )
    for t in graph.outputs:
        if id(t) in tracked:
            raise DefenseError(
                f"the model's output carries the channels of {layer.name!r} directly; removing them would change "
                "the output shape, so it cannot be compacted"
            )
    return edits, kept, channels


def _per_channel(op, track: _Track, out_rank: int, layer, pruned: list[int], add_edit) -> _Track:
    """The track after a layer that must be per-channel (`defense.pruning.per_channel`); a DefenseError otherwise."""
    kind = type(op).__name__
    rule = channel_rule(op, track.rank, track.rank - 1)
    if not rule.per_channel or rule.out_axis != out_rank - 1:
        raise DefenseError(
            f"layer {op.name!r} ({kind}) reads the channels of the pruned layer {layer.name!r} but does not keep "
            f"them separate: {rule.what}; so this model cannot be compacted; {_HINT}"
        )
    k = rule.constants(op, track.k)
    if k is None:
        pruned_k = track.k[..., pruned]
        raise DefenseError(
            f"layer {op.name!r} ({kind}): {rule.what}; the pruned channels of {layer.name!r} reach it as the non-zero "
            f"constant {float(pruned_k.flat[np.argmax(np.abs(pruned_k))]):g}, so this model cannot be compacted"
        )
    weights = op.get_weights()
    if weights:  # batch norm, PReLU: one weight per channel along the last axis
        size = track.k.size
        if any(w.shape[-1] != size for w in weights):
            raise DefenseError(
                f"layer {op.name!r} ({kind}) has weights of shapes {[w.shape for w in weights]}, not one per channel "
                f"of {layer.name!r} ({size}); it cannot be sliced, so this model cannot be compacted"
            )
        add_edit(op, {"op": "channels", "positions": track.k.shape[0] if track.flat else None})
    return _Track(k, out_rank, track.flat)


def _new_weights(layer, edit: dict, kept: list[int], pruned: list[int], channels: int) -> list[np.ndarray]:
    weights = layer.get_weights()
    op = edit["op"]
    if op == "out":
        kernel, *rest = weights
        return [kernel[..., kept], *[w[kept] for w in rest]]
    if op == "channels":  # a per-channel layer's weights, channels on the last axis
        positions = edit["positions"]
        index = kept if positions is None else (np.arange(positions)[:, None] * channels + np.asarray(kept)).ravel()
        return [w[..., index] for w in weights]
    kernel, *rest = weights
    if op == "conv":
        fold = np.einsum("ijpf,p->f", kernel[:, :, pruned, :].astype(np.float64), edit["k"])
        new_kernel = kernel[:, :, kept, :]
    elif op == "dense":
        fold = np.asarray(edit["k"], np.float64) @ kernel[pruned].astype(np.float64)
        new_kernel = kernel[kept]
    else:  # dense_flat: rows = position * C + channel
        positions = edit["positions"]
        cube = kernel.reshape(positions, channels, kernel.shape[-1])
        fold = np.einsum("pc,pcf->f", np.asarray(edit["k"], np.float64), cube[:, pruned, :].astype(np.float64))
        new_kernel = cube[:, kept, :].reshape(positions * len(kept), kernel.shape[-1])
    if not edit["fold"]:
        return [new_kernel, *rest]
    if rest:
        bias = (rest[0].astype(np.float64) + fold).astype(rest[0].dtype)
        return [new_kernel, bias, *rest[1:]]
    return [new_kernel, fold.astype(kernel.dtype)]


def compact_model(model, layer_name: str, pruned_channels):
    """A smaller copy of `model` without the `pruned_channels` output channels of Conv2D `layer_name`.

    It computes what `model` computes with those channels pruned (kernel and bias zeroed, as
    `defense.nets.models.pruned_copy` does): for a B' made that way, the same predictions. `model` is not
    changed. Raises DefenseError for graphs it cannot slice (see the module docstring).
    """
    import keras

    from defense.pruning.masked import conv_layer

    layer = conv_layer(model, layer_name)
    pruned = _check_channels(layer, pruned_channels)
    edits, kept, channels = _plan(model, layer, pruned)

    config = copy.deepcopy(model.get_config())
    _layer_config(config, layer.name)["config"]["filters"] = len(kept)
    for name, edit in edits.items():
        entry = _layer_config(config, name)
        entry.pop("build_config", None)  # built again from the new input shapes
        if edit.get("fold") and not entry["config"].get("use_bias", True):
            entry["config"]["use_bias"] = True
    try:
        new = type(model).from_config(config)
    except Exception as err:  # noqa: BLE001 - any failure to rebuild names the model
        raise DefenseError(
            f"model {model.name!r} could not be rebuilt with {len(kept)} filters in {layer.name!r}: {err}"
        ) from None
    for old_layer in model.layers:
        weights = old_layer.get_weights()
        if not weights:
            continue
        edit = edits.get(old_layer.name)
        if edit is not None:
            weights = _new_weights(old_layer, edit, kept, pruned, channels)
        new.get_layer(old_layer.name).set_weights(weights)
    return new


def zeroed_channels(model, layer_name: str) -> list[int]:
    """The output channels of Conv2D `layer_name` whose kernel and bias are exactly zero (pruned)."""
    from defense.pruning.masked import conv_layer

    layer = conv_layer(model, layer_name)
    kernel, *rest = layer.get_weights()
    zero = np.all(kernel.reshape(-1, kernel.shape[-1]) == 0, axis=0)
    if rest:
        zero &= rest[0] == 0
    return [int(c) for c in np.flatnonzero(zero)]


def compact_from_pruned(model_b_prime, layer_name: str):
    """The compact model of a saved B': the channels of `layer_name` with zero kernel and bias are removed."""
    return compact_model(model_b_prime, layer_name, zeroed_channels(model_b_prime, layer_name))


def compact_path(b_path) -> Path:
    """models/model_B_10.h5 -> models/model_B_10_compact.h5 (beside the B' file)."""
    b_path = Path(b_path)
    return b_path.with_name(f"{b_path.stem}_compact.h5")


def _forward(model, batch_size: int):
    """A forward pass over `x` in batches (no `model.predict` set-up, no tf.function tracing per model)."""
    import tensorflow as tf

    def run(x: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [np.asarray(model(tf.constant(x[i : i + batch_size]), training=False))
             for i in range(0, len(x), batch_size)]
        )

    return run


def predict_seconds(models_: list, x: np.ndarray, batch_size: int = 256, repeats: int = 3) -> list[float]:
    """Best of `repeats` timings of a forward pass of each model on `x` (warm the models up first).

    The models are timed in turn within each repeat, so that load changes on the machine affect them alike.
    """
    runs = [_forward(m, batch_size) for m in models_]
    best = [float("inf")] * len(runs)
    for _ in range(max(1, repeats)):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run(x)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def timing_inputs(model, x: np.ndarray | None = None, images: int = 128, seed: int = 0) -> np.ndarray:
    """`x` repeated up to `images` rows (or uniform random inputs of the model's input shape)."""
    if x is None or len(x) == 0:
        shape = tuple(int(s) for s in model.input_shape[1:])
        return np.random.default_rng(seed).uniform(0, 1, (images, *shape)).astype(np.float32)
    x = np.asarray(x, np.float32)
    reps = max(1, -(-images // len(x)))
    return np.concatenate([x] * reps)[: max(images, len(x))]


def compare(full, compact, x: np.ndarray | None = None, batch_size: int = 256, images: int = 128,
            repeats: int = 3) -> dict:
    """Parameter counts, predict times and agreement of the full (masked) model and its compact copy.

    `x`: model inputs, already scaled (random inputs when None); timings are on `images` rows.
    """
    xt = timing_inputs(full, x, images)
    # the first passes check the agreement and warm the models up for the timings
    p_full = _forward(full, batch_size)(xt)
    p_compact = _forward(compact, batch_size)(xt)
    t_full, t_compact = predict_seconds([full, compact], xt, batch_size, repeats)
    return {
        "full_params": int(full.count_params()),
        "compact_params": int(compact.count_params()),
        "full_predict_s": t_full,
        "compact_predict_s": t_compact,
        "images": int(len(xt)),
        "agree": float(np.mean(np.argmax(p_full, -1) == np.argmax(p_compact, -1))),
        "max_abs_diff": float(np.max(np.abs(p_full - p_compact))) if p_full.size else 0.0,
    }


def format_stats(stats: dict, name: str = "compact") -> str:
    saved = 100.0 * (1 - stats["compact_params"] / stats["full_params"]) if stats["full_params"] else 0.0
    return (
        f"{name}: {stats['full_params']} -> {stats['compact_params']} parameters ({saved:.1f} % fewer), "
        f"predict {stats['full_predict_s'] * 1000:.1f} ms -> {stats['compact_predict_s'] * 1000:.1f} ms on "
        f"{stats['images']} images, top-1 agreement {stats['agree'] * 100:.2f} %, max |dp| {stats['max_abs_diff']:.2g}"
    )


def _tag(path: Path) -> str:
    match = re.fullmatch(r"model_B_(.+?)(_compact)?", path.stem)
    if not match:
        return path.stem
    key = match.group(1)
    return f"operating_point{key[2:]}" if key == "op" or key.startswith("op_") else f"drop_{key}"


def compact_layers(model, pruned: dict):
    """A smaller copy of `model` without the output channels `pruned[layer]` of each conv layer.

    Compacted layer by layer (`compact_model`), in model order; a layer's output channel indices do not
    change when another layer is compacted (only its input channels do), so each step removes exactly
    the channels listed for it. Layers with no pruned channel are left as they are.
    """
    order = [layer.name for layer in model.layers]
    unknown = [name for name in pruned if name not in order]
    if unknown:
        raise DefenseError(f"layers {unknown} are not layers of model {model.name!r}")
    current = model
    for name in sorted((n for n, channels in pruned.items() if len(channels)), key=order.index):
        current = compact_model(current, name, pruned[name])
    if current is model:  # nothing pruned: still a copy
        current = compact_model(model, next(iter(pruned)), []) if pruned else model
    return current


def export_compact(model, layer_name, pruned_channels, path, tracker=None, x: np.ndarray | None = None,
                   tag: str | None = None, batch_size: int = 256) -> dict:
    """Save the compact copy of `model` (a B', or a fine-tuned B'') to `path`, log its size and speed.

    `layer_name` and `pruned_channels`: one Conv2D layer and its pruned channels, or `layer_name` a
    {layer: channels} map of several layers (and `pruned_channels` None).
    `x`: scaled model inputs to time and check both models on (random inputs when None). Logs the
    params `compact.<tag>.{compact_params,full_params,compact_predict_s,full_predict_s}` to `tracker`
    (static facts, not step metrics); `tag` defaults to `drop_10` for `model_B_10_compact.h5`
    (`drop_10_ft` for `model_B_10_ft_compact.h5`). Returns the statistics and the path.
    """
    from defense.nets import models

    path = Path(path)
    pruned_map = dict(layer_name) if isinstance(layer_name, dict) else {layer_name: pruned_channels}
    pruned_map = {name: sorted({int(c) for c in channels}) for name, channels in pruned_map.items()}
    for name, pruned in pruned_map.items():
        still_set = sorted(set(pruned) - set(zeroed_channels(model, name)))
        if still_set:
            log.warning("%s: channels %s of %s are not zero in the model; the compact model leaves them out anyway",
                        path.name, still_set, name)
    compact = compact_layers(model, pruned_map)
    models.save_model(compact, path)
    stats = compare(model, compact, x, batch_size)
    tag = tag or _tag(path)
    count = sum(len(p) for p in pruned_map.values())
    if tracker is not None:  # static facts: params, not metrics over steps
        tracker.log_params({f"compact.{tag}.{key}": (f"{stats[key]:.6f}" if key.endswith("_s") else int(stats[key]))
                            for key in ("compact_params", "full_params", "compact_predict_s", "full_predict_s")})
    if stats["agree"] < 1.0 or stats["max_abs_diff"] > 1e-4:
        log.warning("%s: the compact model differs from the full one (top-1 agreement %.2f %%, max |dp| %.2g)",
                    path.name, stats["agree"] * 100, stats["max_abs_diff"])
    log.info("%s", format_stats(stats, f"{path.name} ({count} channels of {', '.join(pruned_map)} removed)"))
    return {**stats, "path": str(path), "channels_pruned": count}


def export_compact_beside(b_prime, pruned: dict, b_path, tracker=None, x: np.ndarray | None = None) -> dict | None:
    """`export_compact` to models/model_B_<key>_compact.h5 beside the saved B' (or B''); None, with a
    warning, when a layer has every channel pruned (a compact model keeps at least one filter per layer) or
    when the graph cannot be sliced (e.g. a residual network whose pruned conv feeds an Add: the other
    branch still needs every channel of the sum): one warning line per models folder, the run goes on."""
    whole = [name for name, channels in pruned.items()
             if len(set(int(c) for c in channels)) >= int(b_prime.get_layer(name).filters)]
    if whole:
        log.warning("%s: no compact model: every channel of %s is pruned (a compact model keeps at least one filter "
                    "per layer)", Path(b_path).name, ", ".join(whole))
        return None
    try:
        return export_compact(b_prime, pruned, None, compact_path(b_path), tracker, x=x)
    except DefenseError as err:  # the run's results are computed: a graph the export cannot slice never ends it
        folder = str(Path(b_path).resolve().parent)
        if folder not in _SKIPPED:
            _SKIPPED.add(folder)
            log.warning("warning: no compact models in %s (B' and B'' are saved with their pruned channels zeroed): "
                        "%s", folder, err)
        else:
            log.debug("%s: no compact model: %s", Path(b_path).name, err)
        return None


_SKIPPED: set[str] = set()  # folders whose skipped compact export was already warned about (one line per run)


def main(argv=None) -> int:
    """`python -m defense.compact B_PRIME.h5 [--layer conv_3] [--out OUT.h5] [--data FILE.h5] [--divisor 1]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m defense.compact", description=main.__doc__)
    parser.add_argument("model", help="a saved full-model B' / B'' .h5 (pruned channels zeroed)")
    parser.add_argument("--layer", default="conv_3", help="the pruned Conv2D layer (default conv_3)")
    parser.add_argument("--out", default=None, help="output .h5 (default: <model>_compact.h5 beside it)")
    parser.add_argument("--data", default=None, help="a Lab 3 h5 data file to time and check on (default random)")
    parser.add_argument("--divisor", type=float, default=1.0, help="input scaling: pixels / divisor (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        from defense.nets import models
        from defense.data.arrays import load_h5

        if models.h5_kind(args.model) == "weights":
            raise DefenseError(f"{args.model}: a weights-only file; give a full .h5 model (a saved B')")
        model = models.load_full_model(args.model)
        x = None
        if args.data:
            x = load_h5(args.data).x / np.float32(args.divisor)
        out = Path(args.out) if args.out else compact_path(args.model)
        stats = export_compact(model, args.layer, zeroed_channels(model, args.layer), out, x=x)
    except DefenseError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(format_stats(stats, os.fspath(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
