"""Loading, saving and running Keras models given as `.h5` files.

`model.path` is either a full legacy Keras 2 `.h5` model (architecture + weights, like the Lab 3
`bd_net.h5` or a saved B') or a weights-only `.h5` that is loaded onto the architecture named by the
model config (the DeepID network of `defense.nets.architectures.deepid`). The file's content tells them apart.
"""

from __future__ import annotations

import copy
import os
import warnings

import h5py
import numpy as np

from defense.core import safe_files
from defense.core.errors import DefenseError
from defense.core.safe_files import Limits

MODEL_HINT = (
    "give model.path=<file>: a full Keras .h5 model (e.g. the Lab 3 models/bd_net.h5), a Keras 3 .keras file, or a "
    "weights-only .h5 for the DeepID architecture (e.g. ../shared/data/csaw/lab3_bd_weights.h5)"
)


def h5_kind(path: str, limits: Limits | None = None) -> str:
    """'model' for a full Keras .h5 model, 'weights' for a weights-only .h5 (after `check_h5`), 'keras' for a
    Keras 3 `.keras` archive (checked when it is loaded)."""
    if not os.path.isfile(path):
        raise DefenseError(f"model file not found: {path}; {MODEL_HINT}")
    if path.endswith(".keras"):
        return "keras"
    safe_files.check_h5(path, limits)
    try:
        with h5py.File(path, "r") as f:
            if "model_config" in f.attrs:
                return "model"
            if "layer_names" in f.attrs or "model_weights" in f:
                return "weights"
    except OSError as err:
        raise DefenseError(f"{path}: not a readable h5 file ({err}); {MODEL_HINT}") from None
    raise DefenseError(f"{path}: neither a Keras model nor a Keras weights file; {MODEL_HINT}")


def build_architecture(model_cfg):
    """The network named by `model_cfg.architecture`, with the config's input shape and classes."""
    from defense.nets import architectures

    arch = model_cfg.get("architecture") or "deepid"
    if model_cfg.get("input_shape") is None or model_cfg.get("num_classes") is None:
        raise DefenseError(
            "a weights-only .h5 holds no architecture: give model.architecture=deepid with model.input_shape and "
            "model.num_classes (or model=lab3 / csaw2020_*), or a full Keras model file (model=auto reads those "
            "from it)"
        )
    module = architectures.get(arch)
    if module is None:
        raise DefenseError(
            f"model.architecture={arch!r} is not known; the weights-only loader builds "
            f"{', '.join(repr(n) for n in architectures.names())} (give a full .h5 model for other architectures)"
        )
    kwargs = {}
    if arch == "deepid":  # DeepID's own options (conf/model/badnets_mnist.yaml); other architectures: their defaults
        widths = model_cfg.get("widths", None)
        kwargs = {"widths": list(widths)} if widths else {}
        kernels = model_cfg.get("kernels", None)
        if kernels:
            kwargs["kernels"] = list(kernels)
        kwargs["padding"] = model_cfg.get("padding", "valid")
    return module.build(tuple(model_cfg.input_shape), int(model_cfg.num_classes), **kwargs)


def load_model(model_cfg, path: str | None = None, limits: Limits | None = None):
    """Load the model described by `model_cfg` from `path` (default `model_cfg.path`).

    The file is checked by `defense.core.safe_files` first (`limits`: the `limits` config group,
    defaults when None); a full model goes through `load_full_model`.
    """
    path = os.fspath(path or model_cfg.get("path") or "")
    if not path:
        raise DefenseError(f"model.path is not set; {MODEL_HINT}")
    kind = h5_kind(path, limits)
    if kind in ("model", "keras"):
        model = load_full_model(path, limits)
    else:
        model = build_architecture(model_cfg)
        try:
            model.load_weights(path)
        except Exception as err:  # noqa: BLE001
            raise DefenseError(
                f"{path}: the weights do not fit the {model_cfg.get('architecture', 'deepid')} architecture of "
                f"model={model_cfg.get('name', '?')} (input {tuple(model_cfg.input_shape)}, "
                f"{model_cfg.num_classes} classes): {err}; choose the model= option these weights belong to"
            ) from None
    check_model_matches(model, model_cfg, path)
    return as_functional(model)


def as_functional(model):
    """A Sequential as the functional model of the same layers (weights shared), other models as they are.

    The sweep (defense.pruning.masked), compact export and the layer defaults walk the layer graph of a
    functional model; a Sequential's is that of its functional twin.
    """
    import keras

    if not isinstance(model, keras.Sequential):
        return model
    # copies of the layers called once each (a Sequential's layers carry one node per call Keras made
    # while building it, so `layer.output` would not name the tensor of this graph), then B's weights
    inputs = keras.Input(shape=tuple(model.input_shape[1:]), dtype=model.inputs[0].dtype, name="input")
    x = inputs
    for layer in model.layers:
        x = type(layer).from_config(layer.get_config())(x)
    functional = keras.Model(inputs, x, name=model.name)
    functional.set_weights(model.get_weights())
    return functional


def load_full_model(path: str, limits: Limits | None = None):
    """The one loader of full-model .h5 files (B, a saved B'): checked, then built without running code.

    `safe_files.check_model_file` refuses links to other files, oversized datasets and any layer or
    object that is not a Keras built-in (Lambda, custom classes, serialized functions) before Keras
    opens the file. A Keras 2 Sequential whose first layer declares `batch_input_shape` is repaired
    (`repair_legacy_sequential`) and built from the repaired config; everything else is loaded by
    `keras.models.load_model(path, compile=False, safe_mode=True)`.
    """
    import keras

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DefenseError(f"model file not found: {path}; {MODEL_HINT}")
    if path.endswith(".keras"):  # Keras 3 archive: its config and weights checked, then Keras's safe loader
        safe_files.check_keras_archive(path, limits)
        repaired = None
    else:
        config = safe_files.check_model_file(path, limits)
        repaired = repair_legacy_sequential(config, _keras_version(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if repaired is None:
                return keras.models.load_model(path, compile=False, safe_mode=True)
            return _build_legacy_h5(path, repaired)
    except DefenseError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to rebuild the model is the file's
        raise DefenseError(f"{path}: the Keras model in this file could not be loaded ({err})") from None


def _keras_version(path: str) -> str:
    with h5py.File(path, "r") as f:  # a short string attribute; the file passed check_h5
        version = f.attrs.get("keras_version", "")
    return version.decode("utf-8", "replace") if isinstance(version, bytes) else str(version)


def repair_legacy_sequential(config: dict, keras_version: str) -> dict | None:
    """The Keras 3 form of a Keras 2 Sequential config whose first layer declares `batch_input_shape`.

    Keras 2 (e.g. 2.3.1) saved a Sequential model's input as `batch_input_shape` on its first layer;
    Keras 3's legacy h5 loader turns that into an input whose batch axis is doubled, so the first
    Conv2D fails ("Kernel shape must have the same length as input ... input of shape (None, None,
    28, 28, 1)"). The repair moves the shape onto an explicit first `InputLayer` (`batch_shape`, the
    way Keras 3 writes a Sequential) and removes it from the layer; nothing else changes, so the
    layers and their weight order are those of the file. Returns None (load unchanged) for anything
    else: not Keras 1/2, not a Sequential, no layers, or the first layer is already an InputLayer.
    """
    if not str(keras_version).startswith(("1.", "2.")) or config.get("class_name") != "Sequential":
        return None
    inner = config.get("config")
    layers = inner.get("layers") if isinstance(inner, dict) else inner if isinstance(inner, list) else None
    if not layers or not isinstance(layers[0], dict) or layers[0].get("class_name") == "InputLayer":
        return None
    first = layers[0].get("config")
    if not isinstance(first, dict) or "batch_input_shape" not in first:
        return None
    repaired = copy.deepcopy(config)
    if isinstance(repaired["config"], list):  # Keras 1 / early Keras 2: the config is the layer list
        repaired["config"] = {"name": "sequential", "layers": repaired["config"]}
    layers = repaired["config"]["layers"]
    first = layers[0]["config"]
    shape = first.pop("batch_input_shape")
    input_config = {"batch_shape": shape, "name": f"{first.get('name', 'layer')}_input"}
    if isinstance(first.get("dtype"), str):
        input_config["dtype"] = first["dtype"]
    layers.insert(0, {"class_name": "InputLayer", "config": input_config})
    return repaired


def _build_legacy_h5(path: str, config: dict):
    """Build `config` as Keras's legacy h5 loader does (safe mode on) and load `path`'s weights by topology."""
    from keras.src.legacy.saving import legacy_h5_format, saving_options, saving_utils
    from keras.src.saving import serialization_lib

    with saving_options.keras_option_scope(use_legacy_config=True), serialization_lib.SafeModeScope(True):
        model = saving_utils.model_from_config(config, custom_objects={})
    with h5py.File(path, "r") as f:
        legacy_h5_format.load_weights_from_hdf5_group(f["model_weights"], model)
    return model


def check_model_matches(model, model_cfg, path: str) -> None:
    """The loaded network must take the configured input shape and give the configured classes."""
    in_shape = tuple(int(s) for s in model.input_shape[1:])
    out_classes = int(model.output_shape[-1])
    if model_cfg.get("input_shape") is None and model_cfg.get("num_classes") is None:
        return  # model=auto: read from the model (defense.pruning.autodetect.complete_model_config)
    want_shape = tuple(int(s) for s in model_cfg.input_shape) if model_cfg.get("input_shape") is not None else in_shape
    want_classes = int(model_cfg.num_classes) if model_cfg.get("num_classes") is not None else out_classes
    if in_shape != want_shape or out_classes != want_classes:
        raise DefenseError(
            f"{path}: the model takes {in_shape} and gives {out_classes} classes, but model="
            f"{model_cfg.get('name', '?')} says input {tuple(model_cfg.input_shape)} and "
            f"{model_cfg.num_classes} classes; set model.input_shape / model.num_classes or pick the matching model="
        )


def save_model(model, path: str) -> str:
    """Save a full model as legacy `.h5` (loadable again by `load_model` and by Keras 2)."""
    import logging

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    absl = logging.getLogger("absl")  # Keras warns that .h5 is legacy: it is the format asked for here
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save(os.fspath(path))
    finally:
        absl.setLevel(level)
    return path


def input_divisor(model_cfg) -> float:
    """`model.input_divisor`: raw pixels are divided by it before they enter the network (default 1)."""
    return float(model_cfg.get("input_divisor", 1.0))


def scale_pixels(x: np.ndarray, divisor: float) -> np.ndarray:
    """float32 `x / divisor`; `x` may be float or uint8 pixels (uint8 -> float32 is exact, so both give
    the same bits). A float32 `x` with divisor 1 is returned as it is, without a copy."""
    x = np.asarray(x, dtype=np.float32)
    return x if divisor == 1.0 else (x / np.float32(divisor)).astype(np.float32)


def scale_inputs(x: np.ndarray, model_cfg) -> np.ndarray:
    """Apply the model's input scaling (raw pixels are divided by `model.input_divisor`); float32 out."""
    return scale_pixels(x, input_divisor(model_cfg))


def uses_logits(model) -> bool:
    """True when the network's output layer has no softmax: its outputs are logits (a Dense with a linear
    activation, or a layer with none, e.g. an Add or a pooling layer at the end). Keras losses need
    `from_logits=True` for such a network; top-1 labels are the argmax either way."""
    import keras

    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return False
    activation = getattr(last, "activation", None)
    return activation is None or activation is keras.activations.linear


def class_probabilities(model, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The network's class probabilities on already scaled inputs `x`: its outputs, softmaxed when they are
    logits (`uses_logits`)."""
    out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    if not uses_logits(model):
        return out
    out = np.exp(out - out.max(axis=-1, keepdims=True))
    return out / out.sum(axis=-1, keepdims=True)


def predict_labels(model, x: np.ndarray, model_cfg, batch_size: int = 1024) -> np.ndarray:
    """Top-1 labels of `model` on raw images `x` (scaled as the model config says)."""
    probs = model.predict(scale_inputs(x, model_cfg), batch_size=batch_size, verbose=0)
    return np.argmax(probs, axis=-1).astype(np.int64)


def pruned_copy(model, layer_name: str, channels) -> "keras.Model":  # noqa: F821
    """A copy of `model` whose `layer_name` has the given output channels pruned (kernel and bias zeroed)."""
    return pruned_copy_layers(model, {layer_name: channels})


def check_bn_zero(bn_zero) -> None:
    """A ValueError unless `bn_zero` is ("gamma",) or ("gamma", "beta"): what pruning a BN channel may zero."""
    if not set(bn_zero) <= {"gamma", "beta"} or "gamma" not in bn_zero:
        raise ValueError(f"bn_zero={bn_zero!r}: zero ('gamma',) or ('gamma', 'beta')")


def bn_parameters(model, bn_name: str, bn_zero=("gamma",)) -> list:
    """The variables of BatchNormalization `bn_name` that pruning one of its channels zeroes: gamma, and beta
    where `bn_zero` names it (a BN without beta, center=False, has none to zero).

    As the references prune at the BN level: ANP (csdongxian/ANP_backdoor, `prune_neuron_cifar.py`, `pruning`)
    and RNP (bboylyg/RNP, `main.py`, `pruning`) set the BN weight (gamma) of the channel to 0; CLP
    (rkteddy/channel-Lipschitzness-based-pruning, `defense.py`, `CLP`) sets its weight and bias (gamma, beta)."""
    check_bn_zero(bn_zero)
    bn = model.get_layer(bn_name)
    if getattr(bn, "gamma", None) is None:
        raise ValueError(f"{bn_name} has no scale gamma (scale=False): its channels cannot be pruned on it")
    variables = [bn.gamma]
    if "beta" in bn_zero and getattr(bn, "beta", None) is not None:
        variables.append(bn.beta)
    return variables


def pruned_copy_layers(model, pruned: dict, bn_units: dict | None = None,
                       bn_zero=("gamma",)) -> "keras.Model":  # noqa: F821
    """A copy of `model` with the output channels `pruned[layer]` of each conv layer pruned (kernel and
    bias zeroed); `model` is not changed.

    bn_units: {conv: BatchNormalization name} of the convs pruned at the BN level: for those, the BN's
    `bn_zero` parameters of the pruned channels are zeroed instead (gamma, or gamma and beta), as the
    ANP, RNP and CLP reference codes prune."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    bn_units = bn_units or {}
    for layer_name, channels in pruned.items():
        channels = [int(c) for c in channels]
        if layer_name in bn_units:
            for variable in bn_parameters(clone, bn_units[layer_name], bn_zero):
                values = variable.numpy()
                values[channels] = 0
                variable.assign(values)
            continue
        layer = clone.get_layer(layer_name)
        kernel, *rest = layer.get_weights()
        channels = [int(c) for c in channels]
        kernel[..., channels] = 0
        if rest:
            rest[0][channels] = 0
        layer.set_weights([kernel, *rest])
    return clone
