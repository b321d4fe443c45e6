"""Checks on untrusted files, run before Keras or any other reader touches them.

The suspect network B comes from the attacker, and so may any data or image file given to the apps.
Loading one must never run its code, read another file or exhaust memory. Keras has its own guards
(see the pins in setup.cfg), but they have been bypassed before: Lambda bytecode ran while loading
legacy .h5 models even with safe_mode=True (CVE-2025-9905), HDF5 external storage read other files
(CVE-2026-1669), declared-but-unstored datasets forced huge allocations (CVE-2026-0897). So the
project checks every file itself, reading metadata only:

- `check_h5`: every h5 file (model, weights, data). Walks all links and objects with h5py without
  reading any dataset's data and refuses external and soft links, datasets with external storage
  (`Dataset.external`), virtual datasets (`Dataset.is_virtual`, they map other files), datasets
  using filters outside HDF5's built-in set and lzf (others are native plugins loaded from disk), and
  datasets or attributes whose declared size (shape x item size) exceeds `limits.max_array_gib`.
- `check_model_config`: the `model_config` JSON of a full-model h5 (read with `read_model_config`,
  bounded in size). Every layer, recursively through nested Sequential / Functional models, wrappers
  (TimeDistributed, Bidirectional) and RNN cells, must be a Keras built-in layer other than the ones
  that carry or load code (Lambda, TFSMLayer, TorchModuleWrapper, JaxLayer, FlaxLayer); every
  serialized object must come from a `keras` module, carry no `registered_name` of a custom object
  and be no serialized function or bytecode.
- `check_image_pixels`: an image's width x height (read from its header) against
  `limits.max_image_pixels`, before any pixel is decoded (decompression bombs).

Each refusal is a DefenseError naming the file, what was found and why it is refused. `Limits`
holds the two config keys `limits.max_array_gib` and `limits.max_image_pixels`; library code that
calls the loaders without a config gets the defaults below.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import dataclass

import h5py

from defense.core.errors import DefenseError

DEFAULT_MAX_ARRAY_GIB = 4.0
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# the model_config JSON of a full-model h5 (the DeepID config is ~10 KB; 16 MiB is far above any real one)
MAX_MODEL_CONFIG_BYTES = 16 * 2**20
# HDF5's own filters (gzip, shuffle, fletcher32, szip, nbit, scaleoffset) and h5py's built-in lzf;
# any other filter id makes HDF5 load a native plugin library from its plugin path
SAFE_H5_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})
# Keras layers whose config carries Python code or names files/modules to load code from
CODE_LAYERS = frozenset({"Lambda", "TFSMLayer", "TorchModuleWrapper", "JaxLayer", "FlaxLayer"})
# model classes that may appear as a layer (nested models) or at the root of model_config
MODEL_CLASSES = frozenset({"Sequential", "Functional", "Model"})
# config keys whose value is one layer, or a list of layers (wrappers, RNNs, nested models)
LAYER_KEYS = ("layer", "forward_layer", "backward_layer", "cell")
LAYER_LIST_KEYS = ("layers", "cells")
LIMITS_HINT = "raise limits.max_array_gib if the file is trusted and memory allows"


@dataclass(frozen=True)
class Limits:
    """Resource limits for untrusted files (config group `limits`)."""

    max_array_gib: float = DEFAULT_MAX_ARRAY_GIB  # memory budget for one declared h5 dataset/attribute
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width x height cap for one input image

    def __post_init__(self):
        gib = self.max_array_gib
        if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not math.isfinite(gib) or gib <= 0:
            raise DefenseError(f"limits.max_array_gib={gib!r}: give a number of GiB > 0 (default {DEFAULT_MAX_ARRAY_GIB})")
        pixels = self.max_image_pixels
        if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 1:
            raise DefenseError(
                f"limits.max_image_pixels={pixels!r}: give a whole number of pixels >= 1 (default {DEFAULT_MAX_IMAGE_PIXELS})"
            )

    @property
    def max_array_bytes(self) -> int:
        return int(self.max_array_gib * 2**30)

    @classmethod
    def from_cfg(cls, cfg) -> "Limits":
        """The `limits` group of an app config (missing keys, or no group, take the defaults)."""
        group = cfg.get("limits") if cfg is not None else None
        if not group:
            return cls()
        values = {}
        if group.get("max_array_gib") is not None:
            values["max_array_gib"] = group.get("max_array_gib")
        if group.get("max_image_pixels") is not None:
            values["max_image_pixels"] = group.get("max_image_pixels")
        return cls(**values)


def resolve(limits: Limits | None) -> Limits:
    return Limits() if limits is None else limits


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def _declared_bytes(shape, itemsize: int) -> int:
    return math.prod(int(s) for s in (shape or ())) * int(itemsize)


def _check_attrs(obj, where: str, path: str, budget: int) -> None:
    for name in obj.attrs.keys():  # names only: no value is read
        attr = obj.attrs.get_id(name)
        nbytes = _declared_bytes(attr.shape, attr.dtype.itemsize)
        if nbytes > budget:
            raise DefenseError(
                f"{path}: attribute {name!r} of {where} declares {_gib(nbytes)}, over limits.max_array_gib="
                f"{budget / 2**30:g}; refused (an untrusted file must not make the loader allocate that); {LIMITS_HINT}"
            )


def _check_dataset(ds, name: str, path: str, budget: int) -> None:
    if ds.external:
        files = sorted({entry[0] for entry in ds.external})
        raise DefenseError(
            f"{path}: dataset {name!r} keeps its data in external file(s) {files}; refused: reading it would read "
            "another file of this machine (give a file that holds its own data)"
        )
    if ds.is_virtual:
        raise DefenseError(
            f"{path}: dataset {name!r} is an HDF5 virtual dataset (mapped from other files); refused: reading it "
            "would read other files of this machine (give a file that holds its own data)"
        )
    plist = ds.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code = int(plist.get_filter(i)[0])
        if code not in SAFE_H5_FILTERS:
            raise DefenseError(
                f"{path}: dataset {name!r} uses HDF5 filter {code}, which is not built in (HDF5 would load a native "
                "plugin to read it); refused: re-save the data uncompressed or with gzip/lzf"
            )
    nbytes = _declared_bytes(ds.shape, ds.dtype.itemsize)
    if nbytes > budget:
        raise DefenseError(
            f"{path}: dataset {name!r} declares shape {tuple(ds.shape)} x {ds.dtype.itemsize} bytes = {_gib(nbytes)}, "
            f"over limits.max_array_gib={budget / 2**30:g}; refused before reading it; {LIMITS_HINT}"
        )


def check_h5(path: str, limits: Limits | None = None) -> None:
    """Refuse an h5 file that links or maps other files, needs native plugins, or declares too much data.

    Reads only the file's metadata (links, object headers, attribute and dataset shapes); no
    dataset's data and no attribute value is read, and no link is followed out of the file.
    """
    budget = resolve(limits).max_array_bytes
    try:
        with h5py.File(path, "r") as f:
            _check_attrs(f, "the root group", path, budget)
            links: list[tuple[str, object]] = []
            f.visititems_links(lambda name, link: links.append((name, link)))  # walks hard links only
            for name, link in links:
                if isinstance(link, h5py.ExternalLink):
                    raise DefenseError(
                        f"{path}: {name!r} is an HDF5 external link to {link.filename}:{link.path}; refused: it "
                        "would make the loader read another file (give a file that holds its own data)"
                    )
                if not isinstance(link, h5py.HardLink):
                    target = getattr(link, "path", "?")
                    raise DefenseError(
                        f"{path}: {name!r} is an HDF5 {type(link).__name__} (to {target}); refused: Keras and Lab 3 "
                        "files hold no links (give a file that holds its own objects)"
                    )
            for name, _ in links:  # every path below is made of hard links only (checked above)
                obj = f.get(name)
                if isinstance(obj, h5py.Dataset):
                    _check_dataset(obj, name, path, budget)
                if obj is not None:
                    _check_attrs(obj, repr(name), path, budget)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:  # h5py's errors on malformed files
        raise DefenseError(f"{path}: not a readable h5 file ({err}); give an HDF5 (.h5) file") from None
    except RecursionError:
        raise DefenseError(f"{path}: the h5 file is nested too deeply to check; refused") from None


def read_model_config(path: str) -> dict | None:
    """The parsed `model_config` attribute of a Keras full-model h5 (None when there is none).

    Call `check_h5` first. The attribute must be one string of at most MAX_MODEL_CONFIG_BYTES.
    """
    try:
        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                return None
            attr = f.attrs.get_id("model_config")
            if attr.shape not in ((), (1,)) or attr.dtype.kind not in ("O", "S", "U"):
                raise DefenseError(
                    f"{path}: the model_config attribute is not one JSON string (shape {attr.shape}, "
                    f"type {attr.dtype}); give a Keras .h5 model file"
                )
            if attr.dtype.itemsize > MAX_MODEL_CONFIG_BYTES:
                raise DefenseError(f"{path}: the model_config attribute declares {_gib(attr.dtype.itemsize)}; refused")
            raw = f.attrs["model_config"]
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:  # h5py's errors on malformed files
        raise DefenseError(f"{path}: not a readable h5 file ({err}); give a Keras .h5 model file") from None
    if not isinstance(raw, (str, bytes)):
        raw = raw.reshape(-1)[0] if hasattr(raw, "reshape") else raw
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    if not isinstance(raw, str) or len(raw) > MAX_MODEL_CONFIG_BYTES:
        raise DefenseError(f"{path}: the model_config attribute is not a JSON string of at most 16 MiB; refused")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise DefenseError(f"{path}: the model_config attribute is not valid JSON ({err}); give a Keras .h5 model file") from None
    if not isinstance(config, dict) or not isinstance(config.get("class_name"), str):
        raise DefenseError(f"{path}: the model_config attribute holds no Keras model config; give a Keras .h5 model file")
    return config


@functools.cache
def builtin_layer_names() -> frozenset[str]:
    """The class names of Keras's built-in layers (keras.layers), without the code-carrying ones."""
    import keras

    names = {
        name
        for name in dir(keras.layers)
        if isinstance(getattr(keras.layers, name), type) and issubclass(getattr(keras.layers, name), keras.layers.Layer)
    }
    return frozenset((names | MODEL_CLASSES) - CODE_LAYERS)


def _layer_name(entry: dict) -> str:
    config = entry.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    return str(name if name is not None else entry.get("name", "?"))


def _check_layer(entry, path: str, trail: str) -> None:
    if not isinstance(entry, dict):
        raise DefenseError(f"{path}: a layer entry under {trail or 'the model'} is not a Keras layer config; refused")
    cls, name = entry.get("class_name"), _layer_name(entry)
    where = f"layer {name!r}" + (f" (in {trail})" if trail else "")
    if cls in CODE_LAYERS:
        raise DefenseError(
            f"{path}: {where} is a {cls} layer, which carries or loads code that loading would run; refused: "
            "the project loads only Keras built-in layers (rebuild the network without it)"
        )
    if not isinstance(cls, str) or cls not in builtin_layer_names():
        raise DefenseError(
            f"{path}: {where} has class {cls!r}, which is not a Keras built-in layer; refused: custom layers "
            "are code the file would make the loader run (give a model of built-in layers)"
        )
    config = entry.get("config")
    if not isinstance(config, dict):
        return
    inner = f"{trail} > {name}" if trail else name
    for key in LAYER_KEYS:
        if isinstance(config.get(key), dict):
            _check_layer(config[key], path, inner)
    for key in LAYER_LIST_KEYS:
        if isinstance(config.get(key), list):
            for child in config[key]:
                _check_layer(child, path, inner)


def _refuse_object(path: str, layer: str, what: str) -> None:
    raise DefenseError(
        f"{path}: layer {layer!r} holds {what}; refused: loading it could run code from the file "
        "(give a model of Keras built-in layers and objects)"
    )


def _check_objects(node, path: str, layer: str) -> None:
    """Every serialized object anywhere in the config: keras modules, no custom names, no code."""
    if isinstance(node, list):
        for item in node:
            _check_objects(item, path, layer)
        return
    if not isinstance(node, dict):
        return
    cls = node.get("class_name")
    if isinstance(cls, str) and cls in builtin_layer_names() and isinstance(node.get("config"), dict):  # entering a layer: name it
        layer = str(node["config"].get("name", layer))
    module = node.get("module")
    if module is not None and (not isinstance(module, str) or not (module == "keras" or module.startswith("keras."))):
        _refuse_object(path, layer, f"an object of class {cls!r} from module {module!r}, outside keras")
    registered = node.get("registered_name")
    if registered is not None and registered != cls:
        _refuse_object(path, layer, f"the custom object {registered!r} (registered_name)")
    if cls == "__lambda__" or node.get("function_type") == "lambda" or node.get("output_shape_type") == "lambda":
        _refuse_object(path, layer, "a serialized Python function (marshalled bytecode)")
    if cls == "function" and module != "keras.activations":
        _refuse_object(path, layer, f"a serialized function {node.get('config')!r} from module {module!r}")
    for value in node.values():
        _check_objects(value, path, layer)


def check_model_config(config: dict, path: str) -> None:
    """Refuse a model config with layers or objects that are not Keras built-ins, or with code."""
    try:
        _check_layer(config, path, "")
        _check_objects(config, path, _layer_name(config))
    except RecursionError:
        raise DefenseError(f"{path}: the model config is nested too deeply to check; refused") from None


def check_model_file(path: str, limits: Limits | None = None) -> dict:
    """`check_h5`, then read and check the model config of a full-model h5; returns the config."""
    check_h5(path, limits)
    config = read_model_config(path)
    if config is None:
        raise DefenseError(f"{path}: no model_config attribute: not a full Keras .h5 model")
    check_model_config(config, path)
    return config


def check_image_pixels(width: int, height: int, path: str, limits: Limits | None = None) -> None:
    """Refuse an image whose header declares more than `limits.max_image_pixels` pixels."""
    cap = resolve(limits).max_image_pixels
    if int(width) * int(height) > cap:
        raise DefenseError(
            f"{path}: the image declares {width}x{height} = {int(width) * int(height)} pixels, over "
            f"limits.max_image_pixels={cap}; refused before decoding (a decompression bomb); raise "
            "limits.max_image_pixels if the image is trusted"
        )


@contextlib.contextmanager
def pil_pixel_cap(limits: Limits | None = None):
    """Set Pillow's own decompression-bomb cap (Image.MAX_IMAGE_PIXELS) to ours while opening images."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = resolve(limits).max_image_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


KERAS_ARCHIVE_MEMBERS = ("metadata.json", "config.json", "model.weights.h5")


def check_keras_archive(path: str, limits: Limits | None = None) -> dict:
    """A Keras 3 `.keras` file (a zip): only Keras's own members, its config.json checked as a model
    config (`check_model_config`), its model.weights.h5 checked like any h5 (`check_h5`, on a copy
    made in a temporary folder); returns the config. Nothing is read beyond the archive."""
    import tempfile
    import zipfile

    budget = resolve(limits).max_array_bytes
    try:
        with zipfile.ZipFile(path) as archive:
            infos = {info.filename: info for info in archive.infolist()}
            odd = sorted(n for n in infos if n not in KERAS_ARCHIVE_MEMBERS and not n.startswith("assets/"))
            if odd or any(".." in n.split("/") or n.startswith("/") for n in infos):
                raise DefenseError(
                    f"{path}: the .keras archive holds members a Keras model file does not ({odd or 'paths outside it'}); "
                    "refused (give a file written by keras Model.save)"
                )
            if "config.json" not in infos:
                raise DefenseError(f"{path}: no config.json in the .keras archive; give a file written by keras Model.save")
            if infos["config.json"].file_size > MAX_MODEL_CONFIG_BYTES:
                raise DefenseError(f"{path}: config.json declares {_gib(infos['config.json'].file_size)}; refused")
            try:
                config = json.loads(archive.read("config.json"))
            except (ValueError, RecursionError) as err:
                raise DefenseError(f"{path}: config.json is not valid JSON ({err}); refused") from None
            if not isinstance(config, dict):
                raise DefenseError(f"{path}: config.json holds no Keras model config; refused")
            check_model_config(config, path)
            weights = infos.get("model.weights.h5")
            if weights is not None:
                if weights.file_size > budget:
                    raise DefenseError(
                        f"{path}: model.weights.h5 declares {_gib(weights.file_size)}, over limits.max_array_gib; refused"
                    )
                with tempfile.TemporaryDirectory() as tmp:
                    copy = os.path.join(tmp, "model.weights.h5")
                    with archive.open(weights) as src, open(copy, "wb") as dst:
                        dst.write(src.read(budget + 1)[:budget])
                    try:
                        check_h5(copy, limits)
                    except DefenseError as err:
                        raise DefenseError(str(err).replace(copy, f"{path} (model.weights.h5)")) from None
    except zipfile.BadZipFile as err:
        raise DefenseError(f"{path}: not a readable .keras archive ({err}); give a file written by keras Model.save") from None
    return config
