"""What a defender need not configure: read from the suspect model file and the clean validation data.

A defender holds a network they suspect and some clean data. The settings the Lab 3 configs spell
out (`model=lab3`: input shape, class count, pixel scaling; `prune.layer=conv_3`, `prune.probe=pool_3`)
can be found instead:

- `model=auto` (`model.input_shape` / `model.num_classes` null): read from the loaded model; the run is
  named after the model file (`model.name` null);
- `model.input_divisor` null: 1 (raw pixels 0..255) or 255 (pixels / 255), whichever gives the unpruned
  network the higher clean validation accuracy (clean validation data only decides, as the threat
  model requires; the choice and both accuracies are logged);
- `prune.layer` null: the last Conv2D whose output is followed by pooling, the layer Fine-Pruning
  (Liu et al. 2018) prunes: the last convolution of the feature extractor (DeepID: conv_3, whose
  pool_3 feeds both interpretation branches; conv_4 is one branch); a network with no conv layer
  followed by pooling gets its last Conv2D; in a residual network the 1x1 shortcut convs are never chosen
  (`shortcut_convs`): a PreAct-ResNet gets the last block's conv2, the last conv of the main path (its output
  joins the residual sum, so it is also the probe);
- `prune.probe` null: the end of the chain of per-channel layers (pooling, activation) right after
  `prune.layer` (defense/pruning/per_channel.py's rule), where the Lab 3 reads the activations (DeepID: pool_3).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from omegaconf import open_dict

from defense.core.errors import DefenseError
from defense.pruning.masked import conv_layer, per_channel_chain
from defense.nets.models import class_probabilities, scale_pixels

log = logging.getLogger("defense.autodetect")

DIVISORS = (1.0, 255.0)
TIE_POINTS = 1.0  # accuracies this close (percentage points) count as a tie
_POOLING = ("MaxPooling2D", "AveragePooling2D")


def complete_model_config(model_cfg, model, path: str) -> None:
    """Fill `model.input_shape`, `model.num_classes` and `model.name` from the loaded model where null."""
    shape = [int(s) for s in model.input_shape[1:]]
    classes = int(model.output_shape[-1])
    with open_dict(model_cfg):
        if model_cfg.get("input_shape") is None:
            model_cfg.input_shape = shape
        if model_cfg.get("num_classes") is None:
            model_cfg.num_classes = classes
        if not model_cfg.get("name"):
            model_cfg.name = os.path.splitext(os.path.basename(os.fspath(path)))[0]
        if model_cfg.get("triggers") is None:
            model_cfg.triggers = {}


def conv_layers(model) -> list:
    """The Conv2D layers of `model` (not Conv2DTranspose), in model order (`prune.layer=all`)."""
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
            and not isinstance(layer, keras.layers.Conv2DTranspose)]


def _inbound_layers(model) -> dict[str, set[str]]:
    """Layer name -> names of the layers whose outputs it reads, in `model`'s graph."""
    names = {layer.name for layer in model.layers}
    inbound: dict[str, set[str]] = {name: set() for name in names}
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            for tensor in node.input_tensors:
                history = getattr(tensor, "_keras_history", None)
                source = getattr(history, "operation", None) if history is not None else None
                if source is not None and source.name in names:
                    inbound[layer.name].add(source.name)
    return inbound


def _ancestors(inbound: dict[str, set[str]], name: str) -> set[str]:
    seen: set[str] = set()
    todo = [name]
    while todo:
        for parent in inbound.get(todo.pop(), ()):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def shortcut_convs(model) -> set[str]:
    """The Conv2D layers on the skip branch of a residual sum (a ResNet's 1x1 projection shortcut).

    A conv is one when the end of its per-channel chain is read by a merge layer (Add, Concatenate, ...)
    whose other input depends on the tensor the conv reads but not on the conv: the skip branch forks from
    the main branch before it and rejoins it at the merge. The main branch's last conv also feeds the merge, but
    what it reads (the block's inner activation) is no ancestor of the skip branch.
    """
    inbound = _inbound_layers(model)
    readers: dict[str, set[str]] = {name: set() for name in inbound}
    for name, parents in inbound.items():
        for parent in parents:
            readers[parent].add(name)
    found = set()
    for conv in conv_layers(model):
        end = per_channel_chain(model, conv.name)[-1]
        for merge in readers.get(end, ()):
            others = inbound[merge] - {end}
            if len(inbound[merge]) < 2 or not others:
                continue
            for other in others:
                upstream = _ancestors(inbound, other) | {other}
                # the other input forks off before the conv (what the conv reads) and does not pass through it
                # (an identity skip around a block reads the stem conv, which the main branch passes through too)
                if conv.name not in upstream and inbound[conv.name] & upstream:
                    found.add(conv.name)
    return found


def default_layer(model) -> str:
    """The last Conv2D followed by pooling (through per-channel layers), else the last Conv2D; a residual
    network's shortcut convolutions (`shortcut_convs`) are left out: the main path's last conv is pruned."""
    convs = conv_layers(model)
    shortcuts = shortcut_convs(model) if convs else set()
    if len(shortcuts) < len(convs):
        convs = [c for c in convs if c.name not in shortcuts]
    if not convs:
        names = [f"{layer.name} ({type(layer).__name__})" for layer in model.layers]
        raise DefenseError(
            f"the model has no Conv2D layer to prune (its layers: {', '.join(names)}); the pruning defense "
            "removes channels of a convolution: give a convolutional network"
        )
    pooled = [c for c in convs
              if any(type(model.get_layer(n)).__name__ in _POOLING for n in per_channel_chain(model, c.name)[1:])]
    return (pooled or convs)[-1].name


def default_probe(model, layer_name: str) -> str:
    """The end of the per-channel chain after `layer_name` (the layer itself when nothing follows)."""
    return per_channel_chain(model, layer_name)[-1]


def complete_prune_config(prune_cfg, model) -> None:
    """Fill `prune.layer` / `prune.probe` where null, and say which were chosen."""
    with open_dict(prune_cfg):
        if not prune_cfg.get("layer"):
            prune_cfg.layer = default_layer(model)
            log.info("prune.layer not set: pruning %s (the last Conv2D followed by pooling, else the last Conv2D)",
                     prune_cfg.layer)
        conv_layer(model, prune_cfg.layer)  # a layer that is no Conv2D of the model: one line naming the ones there are
        if not prune_cfg.get("probe"):
            prune_cfg.probe = default_probe(model, prune_cfg.layer)
            log.info("prune.probe not set: ranking channels at %s, the end of the per-channel layers after %s",
                     prune_cfg.probe, prune_cfg.layer)


MISMATCH_NATS = 1.0  # a configured scaling whose mean cross-entropy is this much higher than another's is reported


def divisor_scores(model, clean_valid, divisors, batch_size: int = 512) -> dict[float, tuple[float, float]]:
    """{divisor: (clean accuracy %, mean cross-entropy)} of the unpruned network on the clean images."""
    y = np.asarray(clean_valid.y)
    scores = {}
    for divisor in divisors:
        probs = class_probabilities(model, scale_pixels(clean_valid.x, divisor), batch_size)  # logits softmaxed
        accuracy = 100.0 * float(np.mean(np.argmax(probs, axis=-1) == y))
        loss = float(np.mean(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))
        scores[float(divisor)] = (accuracy, loss)
    return scores


def warn_if_scaling_mismatch(model_cfg, model, clean_valid, batch_size: int = 512) -> bool:
    """One warning line when the configured `model.input_divisor` fits the clean validation data clearly worse
    than the other scaling (raw pixels 0..255 or pixels / 255): its mean cross-entropy is at least MISMATCH_NATS
    higher and its accuracy no better (the measure of `choose_input_divisor`). Returns True when it warned.

    A network fed the wrong scaling may still classify part of the data (the Lab 3 network on pixels / 255,
    a pixels / 255 network on raw pixels): the run goes on, with a low clean accuracy and no error.
    """
    if model_cfg.get("input_divisor") is None or not len(clean_valid):
        return False
    given = float(model_cfg.input_divisor)
    others = [d for d in DIVISORS if d != given]
    scores = divisor_scores(model, clean_valid, [given, *others], batch_size)
    best = min(others, key=lambda d: scores[d][1])
    (acc, loss), (other_acc, other_loss) = scores[given], scores[best]
    if not (loss - other_loss >= MISMATCH_NATS and other_acc >= acc):
        return False
    log.warning(
        "warning: model.input_divisor=%g fits the clean validation data clearly worse than %g: cross-entropy %.3f "
        "(accuracy %.2f %%) against %.3f (accuracy %.2f %%); the weights probably expect the other scaling: set "
        "model.input_divisor=%g (or model.input_divisor=null to choose it on the clean validation data)",
        given, best, loss, acc, other_loss, other_acc, best)
    return True


def choose_input_divisor(model_cfg, model, clean_valid, batch_size: int = 512) -> float:
    """Set `model.input_divisor` (when null) to the scaling that fits the clean validation data best.

    The highest clean validation accuracy wins; scalings within `TIE_POINTS` of it are told apart by
    the mean cross-entropy (a ReLU network often classifies 255x brighter inputs almost as well, but
    with far less fitting confidences: the scale it was trained at has the lower loss).
    """
    if model_cfg.get("input_divisor") is not None:
        return float(model_cfg.input_divisor)
    scores = divisor_scores(model, clean_valid, DIVISORS, batch_size)
    top = max(acc for acc, _ in scores.values())
    best = min((d for d in DIVISORS if scores[d][0] >= top - TIE_POINTS), key=lambda d: (scores[d][1], d))
    with open_dict(model_cfg):
        model_cfg.input_divisor = best
    log.info(
        "model.input_divisor not set: %g chosen on the clean validation data (%s; best accuracy, cross-entropy "
        "breaking ties within %g points; set model.input_divisor to override)",
        best, "; ".join(f"pixels / {d:g}: accuracy {scores[d][0]:.2f} %, cross-entropy {scores[d][1]:.3f}"
                        for d in DIVISORS), TIE_POINTS,
    )
    return best
