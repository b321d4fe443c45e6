"""Loading, saving and running Keras models given as `.h5` files.

`model.path` is either a full legacy Keras 2 `.h5` model (architecture + weights, like the Lab 3
`bd_net.h5` or a saved B') or a weights-only `.h5` that is loaded onto the architecture named by the
model config (the DeepID network of `defense.architecture`). The file's content tells them apart.
"""

from __future__ import annotations

import os
import warnings

import h5py
import numpy as np

from defense.errors import DefenseError

MODEL_HINT = (
    "give model.path=<file.h5>: a full Keras .h5 model (e.g. the Lab 3 models/bd_net.h5) or a "
    "weights-only .h5 for the DeepID architecture (e.g. ../shared/data/csaw/lab3_bd_weights.h5)"
)


def h5_kind(path: str) -> str:
    """'model' for a full Keras model file, 'weights' for a weights-only file."""
    if not os.path.isfile(path):
        raise DefenseError(f"model file not found: {path}; {MODEL_HINT}")
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
    from defense.architecture import build_deepid

    arch = model_cfg.get("architecture") or "deepid"
    if model_cfg.get("input_shape") is None or model_cfg.get("num_classes") is None:
        raise DefenseError(
            "a weights-only .h5 holds no architecture: give model.architecture=deepid with model.input_shape and "
            "model.num_classes (or model=lab3 / csaw2020_*), or a full Keras model file (model=auto reads those "
            "from it)"
        )
    if arch != "deepid":
        raise DefenseError(
            f"model.architecture={arch!r} is not known; the weights-only loader builds 'deepid' "
            "(give a full .h5 model for other architectures)"
        )
    widths = model_cfg.get("widths", None)
    kwargs = {"widths": list(widths)} if widths else {}
    kernels = model_cfg.get("kernels", None)
    if kernels:
        kwargs["kernels"] = list(kernels)
    kwargs["padding"] = model_cfg.get("padding", "valid")
    return build_deepid(tuple(model_cfg.input_shape), int(model_cfg.num_classes), **kwargs)


def load_model(model_cfg, path: str | None = None):
    """Load the model described by `model_cfg` from `path` (default `model_cfg.path`)."""
    import keras

    path = os.fspath(path or model_cfg.get("path") or "")
    if not path:
        raise DefenseError(f"model.path is not set; {MODEL_HINT}")
    kind = h5_kind(path)
    if kind == "model":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = keras.models.load_model(path, compile=False)
        except Exception as err:  # noqa: BLE001 - any failure to rebuild the model is the file's
            raise DefenseError(f"{path}: the Keras model in this file could not be loaded ({err})") from None
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

    The sweep (defense.masked), compact export and the layer defaults walk the layer graph of a
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


def check_model_matches(model, model_cfg, path: str) -> None:
    """The loaded network must take the configured input shape and give the configured classes."""
    in_shape = tuple(int(s) for s in model.input_shape[1:])
    out_classes = int(model.output_shape[-1])
    if model_cfg.get("input_shape") is None and model_cfg.get("num_classes") is None:
        return  # model=auto: read from the model (defense.autodetect.complete_model_config)
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


def scale_inputs(x: np.ndarray, model_cfg) -> np.ndarray:
    """Apply the model's input scaling (raw pixels are divided by `model.input_divisor`)."""
    divisor = float(model_cfg.get("input_divisor", 1.0))
    return x if divisor == 1.0 else (x / np.float32(divisor)).astype(np.float32)


def predict_labels(model, x: np.ndarray, model_cfg, batch_size: int = 1024) -> np.ndarray:
    """Top-1 labels of `model` on raw images `x` (scaled as the model config says)."""
    probs = model.predict(scale_inputs(x, model_cfg), batch_size=batch_size, verbose=0)
    return np.argmax(probs, axis=-1).astype(np.int64)


def pruned_copy(model, layer_name: str, channels) -> "keras.Model":  # noqa: F821
    """A copy of `model` whose `layer_name` has the given output channels pruned (kernel and bias zeroed)."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    layer = clone.get_layer(layer_name)
    kernel, *rest = layer.get_weights()
    channels = [int(c) for c in channels]
    kernel[..., channels] = 0
    if rest:
        rest[0][channels] = 0
    layer.set_weights([kernel, *rest])
    return clone
