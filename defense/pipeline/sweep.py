"""The pruning sweep (steps 1-4 of the defense): rank, prune step by step, record, pick B'.

1. rank: the criterion module (`defense.criteria.get(prune.criterion)`) scores the channels of the
   pruned layers on clean validation data (or none), and `defense.criteria.global_order` turns the
   scores into one order of (layer, channel) pairs;
2. predict: every evaluated step (`defense.pruning.steps`) on the clean validation data, then, as far as the
   stop rule goes, on the poisoned validation data and the test data;
   - one layer: `defense.pruning.masked.MaskedSweep` (the network before the layer runs once per image, every
     step at once); ranked by activation, the layer's outputs of the clean validation images are
     computed once and serve both the ranking and the predictions;
   - several layers, or channels pruned at the BatchNormalization level (ANP, RNP, CLP on a network with
     BatchNormalization: the criterion's `bn_units`): `defense.pruning.channel_masks.ChannelMasks` (one
     traced graph, one mask per layer, assigned per step);
3. curves per evaluated step and the first step reaching each accuracy drop (defense/pipeline/curves.py).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from defense.core import interrupt
from defense import criteria
from defense.core import metrics
from defense.pruning import steps as step_rules
from defense.pipeline.curves import curve_rows, threshold_rows
from defense.pipeline.load import Split
from defense.core.errors import DefenseError
from defense.pruning.masked import MaskedSweep, conv_layer
from defense.nets.models import input_divisor

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


LAYER_HINT = "give one conv layer (prune.layer=conv_3), a list (prune.layer=[conv_2,conv_3]) or prune.layer=all"


def check_layer_option(value) -> None:
    """prune.layer before any model is read: null, a name, `all`, or a non-empty list of distinct names."""
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not value.strip():
            raise DefenseError(f"prune.layer is an empty name; {LAYER_HINT}")
        return
    try:
        names = list(value)
    except TypeError:
        raise DefenseError(f"prune.layer={value!r} is neither a layer name nor a list; {LAYER_HINT}") from None
    if not names:
        raise DefenseError(f"prune.layer=[] lists no layer; {LAYER_HINT}")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise DefenseError(f"prune.layer={names}: {bad[0]!r} is not a layer name; {LAYER_HINT}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DefenseError(f"prune.layer={names} lists {', '.join(twice)} twice; list each layer once")
    if "all" in names:
        raise DefenseError(f"prune.layer={names}: `all` stands alone (prune.layer=all), not in a list")


def check_prune_config(cfg) -> None:
    """Checks that need no model or data (run before any work), the criterion's own included."""
    module = criteria.get(cfg.prune.criterion)
    check_layer_option(cfg.prune.get("layer"))
    step_rules.check_eval_steps(cfg.prune.get("eval_steps"))
    if hasattr(module, "check_config"):
        module.check_config(cfg.prune)
    check_drops(cfg.prune.drops)
    step_rules.check_stop(cfg.stop)


def pruned_layers(cfg, model) -> list[str]:
    """The conv layers prune.layer names, in model order (a list is sorted into it; criteria score layers in
    model order, defense/criteria/__init__.py).

    Null is filled with the default layer (defense.pruning.autodetect); a name that is no layer of the model
    or a layer that is no Conv2D is one DefenseError listing the Conv2D layers there are.
    """
    from defense.pruning.autodetect import complete_prune_config, conv_layers

    from omegaconf import open_dict

    value = cfg.prune.get("layer")
    check_layer_option(value)
    if value is not None and not isinstance(value, str) and len(value) == 1:  # [conv_3] is conv_3
        with open_dict(cfg.prune):
            cfg.prune.layer = value = str(value[0])
    if value is None or isinstance(value, str) and value != "all":
        complete_prune_config(cfg.prune, model)
        return [cfg.prune.layer]
    convs = [layer.name for layer in conv_layers(model)]
    if value == "all":
        if not convs:
            found = ", ".join(f"{layer.name} ({type(layer).__name__})" for layer in model.layers)
            raise DefenseError(f"prune.layer=all: model {model.name!r} has no Conv2D layer to prune (its layers: {found})")
        names = convs
    else:
        names = [str(n) for n in value]
        known = {layer.name for layer in model.layers}
        for name in names:
            if name not in known:
                raise DefenseError(f"prune.layer={names}: the model has no layer {name!r}; its Conv2D layers are {convs}")
        position = {layer.name: i for i, layer in enumerate(model.layers)}
        names = sorted(names, key=position.__getitem__)
    for name in names:
        try:
            conv_layer(model, name)
        except DefenseError as err:
            raise DefenseError(f"prune.layer={names}: {err}") from None
    return names


def check_layers(cfg, model) -> list[str]:
    """prune.layer (and, ranked by activation on one layer, prune.probe), checked against the model.

    Returns the pruned layers; null options are filled (defense.pruning.autodetect: DeepID -> conv_3 / pool_3).
    """
    layers = pruned_layers(cfg, model)
    bn_pruning(cfg, model, layers)  # a criterion's level=bn on a network without per-channel BN fails here
    if cfg.prune.criterion == "activation":
        from defense.criteria.activation import probe_path

        for name in layers:
            probe_path(model, layers, name, cfg.prune.get("probe"))
    return layers


def bn_pruning(cfg, model, layers: list[str]) -> tuple[dict[str, str], tuple, str]:
    """(bn_units, bn_zero, variant) of the criterion: the convs it prunes at the BatchNormalization level
    ({conv: BN name}), the BN parameters a pruned channel zeroes, and the `defense_variant` ('' for a
    criterion without one); DefenseError for a level the network cannot give."""
    from defense.pruning.bn_pairing import variant

    module = criteria.get(cfg.prune.criterion)
    if not hasattr(module, "bn_units"):
        return {}, ("gamma",), ""
    units = module.bn_units(model, layers, cfg)
    return units, tuple(module.BN_ZERO), variant(units, layers)


def drop_name(drop: float) -> str:
    return f"{drop:g}"


def point_name(row: dict) -> str:
    """The name of a kept network (a summary row) in pruned.json and MLflow: drop_10, operating_point, defender,
    oracle_test_asr."""
    from defense.pipeline.operating_point import POINT
    from defense.pipeline.select import POINTS

    if row.get("point") == POINT or row.get("point") in POINTS:
        return str(row["point"])
    return f"drop_{drop_name(row['drop'])}"


def file_key(row: dict) -> str:
    """models/model_B_<key>.h5 of a summary row: the drop (10), `op` for the criterion's operating point,
    `defender` / `oracle` for the defender's and the oracle's points (defense/pipeline/select.py)."""
    from defense.pipeline.operating_point import FILE_KEY, POINT
    from defense.pipeline.select import FILE_KEYS

    if row.get("point") in FILE_KEYS:
        return FILE_KEYS[row["point"]]
    return FILE_KEY if row.get("point") == POINT else drop_name(row["drop"])


def layer_label(layers: list[str]) -> str:
    """prune.layer as the tags, titles and reports show it: `conv_3`, or `conv_1+conv_2+...`."""
    return "+".join(layers)


@dataclass
class SweepResult:
    pairs: list[tuple[str, int]]  # every (layer, channel) in pruning order (the first `steps` were pruned)
    layers: list[str]
    scores: criteria.Scores
    channels: int  # channels of all pruned layers together
    steps: int  # the last evaluated step
    evaluated: list[int]  # the evaluated steps (curve rows), ascending, 0 first
    curves: list[dict]  # one row per evaluated step
    thresholds: list[dict]  # one row per drop
    poisoned_names: list[str]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # set name -> (N, len(evaluated))
    seconds: dict[str, float] = field(default_factory=dict)
    operating_pruned: dict[str, list[int]] | None = None  # {layer: channels} of the criterion's operating point
    bn_units: dict[str, str] = field(default_factory=dict)  # {conv: BN} of the convs pruned at the BN level
    bn_zero: tuple = ("gamma",)  # the BN parameters a pruned channel zeroes there
    variant: str = ""  # defense_variant: `bn` or `conv (adapted: no BatchNormalization)` ('' for other criteria)

    def pruned_model(self, model, pruned: dict):
        """B': a copy of `model` with `pruned` ({layer: channels}) pruned as this sweep pruned them (conv
        kernel and bias, or the BatchNormalization's bn_zero parameters)."""
        from defense.nets.models import pruned_copy_layers

        return pruned_copy_layers(model, pruned, self.bn_units, self.bn_zero)

    @property
    def order(self) -> np.ndarray:
        """The channels in pruning order when one layer is pruned (pruning_order.txt)."""
        if len(self.layers) != 1:
            raise ValueError("several layers are pruned: use SweepResult.pairs")
        return np.asarray([c for _, c in self.pairs], np.int64)

    def pruned_at(self, step: int) -> dict[str, list[int]]:
        """{layer: channels pruned at `step`, ascending} for every pruned layer (empty lists kept)."""
        return pruned_by_layer(self.pairs[: int(step)], self.layers)


    def pruned_for(self, row: dict) -> dict[str, list[int]]:
        """{layer: channels} pruned in the network of a summary row (a drop threshold or the operating point)."""
        from defense.pipeline.operating_point import POINT

        if row.get("point") == POINT:
            return dict(self.operating_pruned)
        return self.pruned_at(int(row["channels_pruned"]))


def pruned_by_layer(pairs, layers: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {name: [] for name in layers}
    for name, channel in pairs:
        out[name].append(int(channel))
    return {name: sorted(channels) for name, channels in out.items()}


def rank(cfg, model, layers: list[str], valid: Split, divisor: float) -> criteria.Scores:
    """The criterion's scores (clean validation data only, or none for data-free criteria)."""
    module = criteria.get(cfg.prune.criterion)
    scores = module.score(model, layers, valid.clean if module.NEEDS_DATA else None, cfg, divisor)
    for name in layers:
        values = np.asarray(scores.values[name])
        if values.shape != (int(model.get_layer(name).filters),) or not np.all(np.isfinite(values)):
            raise RuntimeError(f"criterion {cfg.prune.criterion}: scores of {name} are not one finite value per channel")
    return scores


def run_sweep(cfg, model, valid: Split, test: Split, progress: bool = True, holdout=None) -> SweepResult:
    """Rank on clean validation data, then record the evaluated steps on valid (B') and test (G(B, B')).

    holdout: the held-out clean validation images (defense/pipeline/select.py), not in `valid`: never
    ranked on, only predicted at the evaluated steps (curve column `holdout_acc`) for the defender's point.

    Every set is streamed through the engine batch by batch (raw pixels, float or uint8, scaled per
    batch); only labels are kept. With one layer ranked by activation, the clean validation set's
    outputs of the pruned layer are kept from the ranking pass for its predictions when they fit in
    VALID_OUTPUTS_CACHE_BYTES (Lab 3: 11,547 faces x 9x7x60 floats, 174 MB); otherwise it passes twice.
    """
    from tqdm.auto import tqdm

    drops = check_drops(cfg.prune.drops)
    layers = check_layers(cfg, model)
    num_classes = int(cfg.model.num_classes)
    divisor = input_divisor(cfg.model)
    batch_size = int(cfg.get("batch_size", 512))
    names = list(valid.poisoned)
    seconds: dict[str, float] = {}
    sets = [("valid_clean", valid.clean)] + [(f"valid_{n}", valid.poisoned[n]) for n in names]
    sets += [("test_clean", test.clean)] + [(f"test_{n}", test.poisoned[n]) for n in names]
    if holdout is not None:
        sets.insert(1, ("holdout_clean", holdout))
    units, zero, variant = bn_pruning(cfg, model, layers)
    if len(layers) == 1 and not units:
        engine = _OneLayer(cfg, model, layers[0], batch_size, divisor)
    else:
        engine = _SeveralLayers(cfg, model, layers, batch_size, divisor, units, zero)
    channels = engine.channels
    candidates = step_rules.evaluated_steps(cfg.stop, channels, cfg.prune.get("eval_steps"), len(layers) > 1)
    total = len(valid.clean) + sum(len(images) for _, images in sets[1:])
    bar = tqdm(total=total, desc="pruning sweep (images x all steps)", unit="img", disable=not progress) if progress else None
    with bar if bar is not None else nullcontext():
        # 1. clean validation data: ranking, then every candidate step
        t0 = time.perf_counter()
        scores, pairs, valid_preds = engine.rank_and_predict_valid(valid, candidates, bar, seconds)
        valid_acc = metrics.accuracy_per_step(valid_preds, valid.clean.y)
        kept = step_rules.cut_at_stop(cfg.stop, candidates, valid_acc, drops)
        evaluated = [int(s) for s in candidates[:kept]]
        preds = {"valid_clean": valid_preds[:, :kept]}
        seconds["valid_clean"] = time.perf_counter() - t0 - seconds.get("rank", 0.0)  # the ranking is timed apart
        # 2. the other sets, only as far as the stop rule goes
        for key, images in sets[1:]:
            t1 = time.perf_counter()
            preds[key] = engine.predict(images.x, pairs, evaluated, bar)
            seconds[key] = time.perf_counter() - t1

    curves = curve_rows(preds, valid, test, names, evaluated, channels, num_classes, holdout)
    thresholds = threshold_rows(curves, drops)
    if scores.bn_units != units or (units and tuple(scores.bn_zero) != zero):
        raise RuntimeError(f"criterion {cfg.prune.criterion}: scored with BN units {scores.bn_units}, pruned with {units}")
    return SweepResult(pairs, layers, scores, channels, evaluated[-1], evaluated, curves, thresholds, names, preds,
                       seconds, bn_units=units, bn_zero=zero, variant=variant)


class _OneLayer:
    """One pruned layer: MaskedSweep computes every step; the evaluated ones are kept."""

    def __init__(self, cfg, model, layer: str, batch_size: int, divisor: float):
        self.cfg, self.model, self.layer, self.divisor = cfg, model, layer, divisor
        self.engine = MaskedSweep(model, layer, batch_size)
        self.channels = self.engine.channels

    def _channel_order(self, pairs) -> list[int]:
        return [c for _, c in pairs]

    def rank_and_predict_valid(self, valid, candidates, bar, seconds):
        from defense.criteria import activation

        cfg, engine, divisor = self.cfg, self.engine, self.divisor
        t0 = time.perf_counter()
        clean = valid.clean
        per_image = 4 * sum(int(np.prod(t.shape[1:])) for t in engine.bottom.outputs)  # float32 outputs
        fast = cfg.prune.criterion == "activation"
        keep = fast and len(clean) * per_image <= VALID_OUTPUTS_CACHE_BYTES
        kept = None
        if fast:  # the pruned layer's outputs, streamed once for the ranking (and kept when they fit)
            path = activation.probe_path(self.model, [self.layer], self.layer, cfg.prune.get("probe"))
            if keep:
                kept = list(engine.layer_outputs(clean.x, divisor))
                outputs = (o[0] for o in kept)
            else:
                outputs = (o[0] for o in engine.layer_outputs(clean.x, divisor))
            means = activation.mean_activation(activation.probe_outputs(self.model, path, outputs))
            scores = criteria.Scores({self.layer: means}, prune_first="low")
        else:
            scores = rank(cfg, self.model, [self.layer], valid, divisor)
        pairs = criteria.global_order(scores, [self.layer])
        seconds["rank"] = time.perf_counter() - t0
        order = self._channel_order(pairs)  # every step, as the stop rule needs them all
        if kept is not None:
            labels = []
            for outputs in kept:
                interrupt.check()
                labels.append(engine.predict_from_outputs(outputs, order))
                if bar is not None:
                    bar.update(len(labels[-1]))
            preds = np.concatenate(labels)
            del kept, labels
        else:
            preds = engine.predict(clean.x, order, progress=bar, divisor=divisor)
        return scores, pairs, preds[:, candidates]

    def predict(self, x, pairs, evaluated, bar):
        order = self._channel_order(pairs)[: evaluated[-1]]
        return self.engine.predict(x, order, progress=bar, divisor=self.divisor)[:, evaluated]


class _SeveralLayers:
    """Several pruned layers: ChannelMasks evaluates each step with masks assigned."""

    def __init__(self, cfg, model, layers: list[str], batch_size: int, divisor: float, bn_units=None,
                 bn_zero=("gamma",)):
        from defense.pruning.channel_masks import ChannelMasks

        self.cfg, self.model, self.layers, self.divisor = cfg, model, layers, divisor
        self.engine = ChannelMasks(model, layers, batch_size, bn_units, bn_zero)
        self.channels = sum(self.engine.channels.values())

    def rank_and_predict_valid(self, valid, candidates, bar, seconds):
        t0 = time.perf_counter()
        scores = rank(self.cfg, self.model, self.layers, valid, self.divisor)
        pairs = criteria.global_order(scores, self.layers)
        seconds["rank"] = time.perf_counter() - t0
        return scores, pairs, self.predict(valid.clean.x, pairs, candidates, bar)

    def predict(self, x, pairs, evaluated, bar):
        return self.engine.predict(x, pairs, [int(s) for s in evaluated], progress=bar, divisor=self.divisor)
