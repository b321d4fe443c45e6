"""Untrusted files (the suspect network comes from the attacker): loading never runs the file's code,
never reads another file and never allocates what a file merely declares (defense/safe_files.py).

Every hostile file is crafted here with h5py / Keras / by hand; each refusal must come from the
project's own checks, before Keras or any reader touches the file.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from conftest import as_keras_2_3_file
from PIL import Image

from conftest import CSAW, compose, run_cli
from defense import predict
from defense.pruning import compact
from defense.data import arrays as data
from defense.nets import models
from defense.core import safe_files
from defense.core.errors import DefenseError
from defense.core.safe_files import Limits

from keras.src.legacy.saving import legacy_h5_format  # isort: skip

_LEGACY_H5_LOAD = legacy_h5_format.load_model_from_hdf5  # kept before any test replaces it


def _save(model, path: Path) -> Path:
    models.save_model(model, str(path))
    return path


def _rewrite_config(src: Path, dst: Path, edit) -> Path:
    """Copy `src` to `dst` and replace its model_config attribute by edit(config)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        config = json.loads(f.attrs["model_config"])
        f.attrs["model_config"] = json.dumps(edit(config))
    return dst


# ---------------------------------------------------------------------------------------------
# Lambda layers: marshalled bytecode that would write a marker file


@pytest.fixture()
def lambda_model(tmp_path):
    """A full-model h5 whose Lambda layer 'payload' writes `marker` when its bytecode runs."""
    marker = tmp_path / "pwned.txt"
    payload = eval(f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]")  # the path is a constant of the bytecode
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Lambda(payload, name="payload"),
        keras.layers.Dense(2, name="out"),
    ])
    path = _save(model, tmp_path / "evil.h5")
    marker.unlink(missing_ok=True)  # building the model above ran the function once; start clean
    return path, marker


def _vulnerable_load(path, *args, **kwargs):
    """What a vulnerable Keras (3.0-3.11.2, CVE-2025-9905) does: deserialize the Lambda's bytecode."""
    return _LEGACY_H5_LOAD(str(path), compile=False, safe_mode=False)


def test_lambda_file_is_a_real_exploit_for_a_vulnerable_loader(lambda_model):
    # control: the crafted file does run its code when loaded without the project's checks
    path, marker = lambda_model
    _vulnerable_load(path)
    assert marker.exists()


def test_lambda_layer_refused_by_own_check_before_keras(lambda_model, monkeypatch):
    path, marker = lambda_model
    reached = []

    def vulnerable(p, *args, **kwargs):
        reached.append(p)
        return _vulnerable_load(p)

    from keras.src.legacy.saving import saving_utils

    monkeypatch.setattr(keras.models, "load_model", vulnerable)
    monkeypatch.setattr(keras.saving, "load_model", vulnerable)
    monkeypatch.setattr(legacy_h5_format, "load_model_from_hdf5", vulnerable)
    monkeypatch.setattr(saving_utils, "model_from_config", vulnerable)
    cfg = compose(["model=lab3"]).model
    for load in (lambda: models.load_model(cfg, str(path)), lambda: models.load_full_model(str(path))):
        with pytest.raises(DefenseError) as err:
            load()
        assert "Lambda" in str(err.value) and "'payload'" in str(err.value) and str(path) in str(err.value)
    assert reached == [] and not marker.exists()


def test_lambda_layer_refused_by_the_cli(lambda_model, tmp_path):
    path, marker = lambda_model
    proc = run_cli("defense.evaluate", "model=lab3", f"model.path={path}", "dataset=csaw_extract",
                   f"dataset.root={CSAW}", "split=all", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Lambda" in errors[0] and "payload" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_compact_cli_uses_the_safe_loader(lambda_model, capsys):
    path, marker = lambda_model
    assert compact.main([str(path)]) == 2
    assert "Lambda" in capsys.readouterr().err
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# custom classes, modules outside keras, registered custom objects, nested layers


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    """A Keras 3 full-model h5 with a wrapper: Sequential[Input, TimeDistributed(Dense 'inner'), Flatten, Dense]."""
    model = keras.Sequential([
        keras.Input((3, 4)),
        keras.layers.TimeDistributed(keras.layers.Dense(5, name="inner"), name="td"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(2, name="out"),
    ])
    return _save(model, tmp_path_factory.mktemp("plain") / "plain.h5")


def _layer(config, name):
    for layer in config["config"]["layers"]:
        if layer["config"].get("name") == name:
            return layer
    raise KeyError(name)


def _custom_class(config):
    _layer(config, "out")["class_name"] = "EvilDense"
    return config


def _outside_module(config):
    _layer(config, "out")["config"]["kernel_initializer"]["module"] = "os"
    return config


def _registered_custom(config):
    _layer(config, "out")["config"]["kernel_initializer"]["registered_name"] = "evil>Init"
    return config


def _nested_custom(config):
    _layer(config, "td")["config"]["layer"]["class_name"] = "EvilDense"
    return config


def _serialized_function(config):
    _layer(config, "out")["config"]["activation"] = {
        "module": "builtins", "class_name": "function", "config": "exec", "registered_name": "function"}
    return config


@pytest.mark.parametrize(
    "edit, layer, words",
    [
        (_custom_class, "out", "not a Keras built-in layer"),
        (_outside_module, "out", "module 'os'"),
        (_registered_custom, "out", "evil>Init"),
        (_nested_custom, "inner", "not a Keras built-in layer"),
        (_serialized_function, "out", "module 'builtins'"),
    ],
)
def test_non_builtin_config_refused(plain_model, tmp_path, monkeypatch, edit, layer, words):
    path = _rewrite_config(plain_model, tmp_path / "edited.h5", edit)
    reached = []
    monkeypatch.setattr(keras.models, "load_model", lambda *a, **k: reached.append(a))
    with pytest.raises(DefenseError) as err:
        models.load_full_model(str(path))
    assert f"'{layer}'" in str(err.value) and words in str(err.value) and str(path) in str(err.value)
    assert reached == []


def test_unedited_model_still_loads(plain_model):
    x = np.random.default_rng(0).random((3, 3, 4)).astype(np.float32)
    reference = keras.models.load_model(str(plain_model), compile=False).predict(x, verbose=0)
    assert np.array_equal(models.load_full_model(str(plain_model)).predict(x, verbose=0), reference)


# ---------------------------------------------------------------------------------------------
# h5 structure: external storage, external links, virtual datasets, declared sizes


class ReadSpy:
    """Records every dataset read through h5py (slicing, read_direct, numpy conversion)."""

    def __init__(self, monkeypatch):
        self.reads = []
        for attr in ("__getitem__", "read_direct", "__array__"):
            original = getattr(h5py.Dataset, attr)

            def spy(ds, *args, _original=original, _attr=attr, **kwargs):
                self.reads.append((ds.name, _attr))
                return _original(ds, *args, **kwargs)

            monkeypatch.setattr(h5py.Dataset, attr, spy)


def _labels(f, n):
    f.create_dataset("label", data=np.zeros(n, np.float32))


def test_external_storage_refused_without_reading_the_other_file(tmp_path, monkeypatch):
    secret = tmp_path / "secret.bin"
    values = np.arange(2 * 3 * 4 * 4, dtype=np.float32)
    secret.write_bytes(values.tobytes())
    path = tmp_path / "ext.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=(2, 3, 4, 4), dtype=np.float32, external=[(str(secret), 0, values.nbytes)])
        _labels(f, 2)
    with h5py.File(path, "r") as f:  # control: a plain reader does return the other file's bytes
        assert np.array_equal(f["data"][()].reshape(-1), values)
    spy = ReadSpy(monkeypatch)
    with pytest.raises(DefenseError) as err:
        data.load_h5(str(path))
    assert "'data'" in str(err.value) and "external" in str(err.value) and str(secret) in str(err.value)
    assert spy.reads == []


def test_external_link_refused(tmp_path, monkeypatch):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("data", data=np.ones((2, 3, 4, 4), np.float32))
    path = tmp_path / "link.h5"
    with h5py.File(path, "w") as f:
        f["data"] = h5py.ExternalLink(str(other), "/data")
        _labels(f, 2)
    spy = ReadSpy(monkeypatch)
    with pytest.raises(DefenseError) as err:
        data.load_h5(str(path))
    assert "external link" in str(err.value) and str(other) in str(err.value)
    assert spy.reads == []


def test_virtual_dataset_refused(tmp_path, monkeypatch):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("data", data=np.ones((2, 3, 4, 4), np.float32))
    path = tmp_path / "virtual.h5"
    layout = h5py.VirtualLayout(shape=(2, 3, 4, 4), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(other), "data", shape=(2, 3, 4, 4))
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("data", layout)
        _labels(f, 2)
    spy = ReadSpy(monkeypatch)
    with pytest.raises(DefenseError) as err:
        data.load_h5(str(path))
    assert "virtual dataset" in str(err.value) and "'data'" in str(err.value)
    assert spy.reads == []


def test_soft_link_and_weights_file_with_external_link_refused(tmp_path):
    path = tmp_path / "weights.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([b"conv_1"])
        f.create_group("conv_1")
        f["conv_1"]["kernel"] = h5py.ExternalLink(str(CSAW / "lab3_bd_weights.h5"), "/conv_1/conv_1/kernel:0")
    with pytest.raises(DefenseError, match="external link"):
        models.load_model(compose(["model=lab3"]).model, str(path))
    soft = tmp_path / "soft.h5"
    with h5py.File(soft, "w") as f:
        f.create_dataset("real", data=np.zeros((2, 3, 4, 4), np.float32))
        f["data"] = h5py.SoftLink("/real")
        _labels(f, 2)
    with pytest.raises(DefenseError, match="SoftLink"):
        data.load_h5(str(soft))


def test_declared_huge_dataset_refused_without_allocating(tmp_path, monkeypatch):
    import tracemalloc

    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=(10**7, 3, 55, 47), dtype=np.float32, chunks=(1, 3, 55, 47))  # never written
        _labels(f, 10)
    assert path.stat().st_size < 1 << 20  # the file is tiny; it declares 10**7 * 3 * 55 * 47 * 4 bytes = 289 GiB
    spy = ReadSpy(monkeypatch)
    tracemalloc.start()
    try:
        with pytest.raises(DefenseError) as err:
            data.load_h5(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "limits.max_array_gib=4" in str(err.value) and "'data'" in str(err.value)
    assert spy.reads == [] and peak < 50 * 2**20


def test_memory_budget_is_configurable(tmp_path):
    path = tmp_path / "small.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.zeros((4, 3, 8, 8), np.float32))  # 3072 bytes
        _labels(f, 4)
    assert data.load_h5(str(path)).x.shape == (4, 8, 8, 3)
    with pytest.raises(DefenseError, match="max_array_gib"):
        data.load_h5(str(path), limits=Limits(max_array_gib=3000 / 2**30))
    for cfg_name in ("config", "evaluate", "predict"):
        assert Limits.from_cfg(compose(config_name=cfg_name)) == Limits(4.0, 40_000_000)
        with pytest.raises(DefenseError, match="limits.max_array_gib"):
            Limits.from_cfg(compose(["limits.max_array_gib=0"], config_name=cfg_name))
        with pytest.raises(DefenseError, match="limits.max_image_pixels"):
            Limits.from_cfg(compose(["limits.max_image_pixels=0"], config_name=cfg_name))


def test_real_csaw_files_pass_the_checks(csaw_dir):
    files = sorted(csaw_dir.glob("*.h5"))
    assert len(files) >= 10
    for path in files:
        safe_files.check_h5(str(path))
    weights = [p for p in files if p.name.endswith("_bd_weights.h5")]
    assert len(weights) == 5 and all(models.h5_kind(str(p)) == "weights" for p in weights)
    assert data.load_h5(str(csaw_dir / "clean_test.h5")).x.shape[1:] == (55, 47, 3)


# ---------------------------------------------------------------------------------------------
# images: decompression bombs refused from the header, before decoding


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG of ~60 bytes whose header declares width x height 8-bit grey pixels (no pixel data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def _decode_spy(monkeypatch):
    from PIL import ImageFile

    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: (decoded.append(im.size), original(im))[1])
    return decoded


def test_oversized_png_refused_before_decoding(tmp_path, monkeypatch):
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 100
    decoded = _decode_spy(monkeypatch)
    with pytest.raises(predict.ImageError) as err:
        predict.load_image(bomb, (55, 47, 3), resize=False)
    assert "limits.max_image_pixels=40000000" in str(err.value) and str(bomb) in str(err.value)
    assert decoded == []


def test_pixel_cap_override(tmp_path, monkeypatch):
    path = tmp_path / "face.png"
    pixels = np.random.default_rng(1).integers(0, 256, (55, 47, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    assert np.array_equal(predict.load_image(path, (55, 47, 3), resize=False), pixels.astype(np.float32))
    decoded = _decode_spy(monkeypatch)
    for cap in (2000, 55 * 47 - 1):  # Pillow's own cap (2 x ours) refuses the first, our check the second
        with pytest.raises(predict.ImageError) as err:
            predict.load_image(path, (55, 47, 3), resize=False, limits=Limits(max_image_pixels=cap))
        assert f"limits.max_image_pixels={cap}" in str(err.value)
    assert decoded == []
    assert Image.MAX_IMAGE_PIXELS != 2000  # Pillow's global cap is restored after each image


def test_predict_reports_a_refused_image_and_classifies_the_others(tmp_path, csaw_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    with h5py.File(csaw_dir / "clean_test.h5", "r") as f:
        face = np.transpose(np.asarray(f["data"][0]), (1, 2, 0)).astype(np.uint8)
    Image.fromarray(face).save(folder / "a_face.png")
    _png_header_only(folder / "b_bomb.png", 20000, 20000)
    weights = csaw_dir / "lab3_bd_weights.h5"
    cfg = compose(["model=lab3", f"model.path={weights}", f"image={folder}", f"repaired.path={weights}"],
                  config_name="predict")
    results, errors = predict.predict(cfg)
    # oracle: the plain Keras loop on the same face (B == B' here, so G outputs B's label)
    net = models.build_architecture(cfg.model)
    net.load_weights(str(weights))
    expected = int(np.argmax(net.predict(face[None].astype(np.float32), verbose=0)))
    assert results == [("a_face.png", expected)]
    assert len(errors) == 1 and "b_bomb.png" in errors[0] and "max_image_pixels" in errors[0]


# ---------------------------------------------------------------------------------------------
# Keras 2 Sequential with batch_input_shape on its first layer


def test_legacy_sequential_with_batch_input_shape_loads_and_predicts_the_same(tmp_path):
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 5, activation="relu", name="conv2d_1"),
        keras.layers.MaxPooling2D(name="max_pooling2d_1"),
        keras.layers.Flatten(name="flatten_1"),
        keras.layers.Dense(10, activation="softmax", name="dense_1"),
    ])
    original = _save(model, tmp_path / "keras3.h5")
    legacy = as_keras_2_3_file(original, tmp_path / "keras2.h5")
    with h5py.File(legacy, "r") as f:
        first = json.loads(f.attrs["model_config"])["config"]["layers"][0]
    assert first["class_name"] == "Conv2D" and first["config"]["batch_input_shape"] == [None, 28, 28, 1]
    x = np.random.default_rng(2).random((8, 28, 28, 1)).astype(np.float32)
    expected = model.predict(x, verbose=0)
    loaded = models.load_full_model(str(legacy))
    assert [type(layer).__name__ for layer in loaded.layers] == ["Conv2D", "MaxPooling2D", "Flatten", "Dense"]
    assert loaded.input_shape == (None, 28, 28, 1)
    assert np.array_equal(loaded.predict(x, verbose=0), expected)


def test_repair_legacy_sequential_by_hand():
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "Dense", "config": {"name": "d", "units": 2, "dtype": "float32", "batch_input_shape": [None, 3]}},
    ]}}
    assert models.repair_legacy_sequential(config, "2.3.1") == {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"batch_shape": [None, 3], "name": "d_input", "dtype": "float32"}},
        {"class_name": "Dense", "config": {"name": "d", "units": 2, "dtype": "float32"}},
    ]}}
    assert config["config"]["layers"][0]["config"]["batch_input_shape"] == [None, 3]  # the input is not changed
    assert models.repair_legacy_sequential(config, "3.15.1") is None
    functional = {"class_name": "Functional", "config": config["config"]}
    assert models.repair_legacy_sequential(functional, "2.3.1") is None
