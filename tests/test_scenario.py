"""`defense.scenario` builds the embedded BadNets MNIST scenario once and reuses its cache.

The default scenario is built once per module (about half a minute on 2 CPU cores); the cache tests use
a tiny network (one epoch, no score thresholds) so that rebuilding is cheap.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from defense.scenario import build as scenario
from defense.scenario import common
from defense.core.errors import DefenseError

REPO = Path(__file__).resolve().parents[1]
DATASET_YAML = REPO / "conf" / "dataset" / "badnets_mnist.yaml"
MODEL_YAML = REPO / "conf" / "model" / "badnets_mnist.yaml"


def default_scenario(cache_dir) -> dict:
    """The scenario node of conf/dataset/badnets_mnist.yaml, with a test cache folder."""
    cfg = OmegaConf.load(DATASET_YAML)
    cfg.scenario.cache_dir = str(cache_dir)
    return OmegaConf.to_container(cfg.scenario, resolve=True)


def tiny_scenario(cache_dir, **changes) -> dict:
    """A scenario that trains in a few seconds (weak network, so no score thresholds)."""
    cfg = default_scenario(cache_dir)
    cfg.update(
        epochs=1,
        widths=[4, 8, 8, 8, 16],
        fractions={"train": 0.2, "valid": 0.1, "test": 0.1},
        min_clean_accuracy=0.0,
        min_asr=0.0,
    )
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def model_cfg(folder):
    cfg = OmegaConf.load(MODEL_YAML)
    cfg.path = os.path.join(folder, scenario.MODEL_FILE)
    return cfg


def snapshot(folder) -> dict:
    """Every file of a scenario folder -> (mtime_ns, size)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out[os.path.relpath(os.path.join(root, name), folder)] = (st.st_mtime_ns, st.st_size)
    return out


class TrainingCounter:
    """Wraps `train_network`: counts the builds, or forbids them."""

    def __init__(self, monkeypatch, forbid: bool = False):
        self.calls = 0
        self.forbid = forbid
        self.real = common.train_network
        monkeypatch.setattr(common, "train_network", self)

    def __call__(self, *args, **kwargs):
        if self.forbid:
            raise AssertionError("the scenario was rebuilt although its cache is intact")
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default scenario, built once: (settings, folder)."""
    cfg = default_scenario(tmp_path_factory.mktemp("scenario-cache"))
    return cfg, scenario.ensure_scenario(cfg)


@pytest.fixture(scope="module")
def tiny_built(tmp_path_factory):
    """A tiny scenario, built once, to be copied into fresh caches and damaged: (settings, folder)."""
    cfg = tiny_scenario(tmp_path_factory.mktemp("tiny-cache"))
    return cfg, scenario.ensure_scenario(cfg)


def copy_into_fresh_cache(tiny_built, tmp_path) -> tuple[dict, str]:
    """The tiny scenario's folder copied into a new cache (the key does not depend on cache_dir)."""
    cfg, folder = tiny_built
    cfg = {**cfg, "cache_dir": str(tmp_path / "cache")}
    target = os.path.join(cfg["cache_dir"], os.path.basename(folder))
    shutil.copytree(folder, target)
    assert scenario.scenario_dir(cfg) == target and scenario.check_cache(target) is None
    return cfg, target


# ------------------------------------------------------------------------------- the default scenario


def test_default_scenario_is_a_strong_backdoor(built):
    cfg, folder = built
    meta = scenario.read_metadata(folder)
    metrics = meta["metrics"]
    print(f"clean test accuracy {metrics['clean_test_accuracy']:.2f}%, test ASR {metrics['test_asr']:.2f}%, "
          f"built in {meta['build_seconds']} s")
    assert metrics["clean_test_accuracy"] >= 95.0
    assert metrics["test_asr"] >= 95.0
    assert meta["key"] == os.path.basename(folder) == scenario.scenario_key(scenario.resolve_config(cfg))
    assert meta["scenario"]["trigger"] == cfg["trigger"]
    assert meta["counts"] == {
        "train": 3000, "train_poisoned": 300, "valid": 1000, "valid_poisoned": 900, "test": 1000, "test_poisoned": 900,
    }
    assert set(meta["files"]) == set(scenario.DATA_FILES)
    for rel, record in meta["files"].items():
        assert os.path.getsize(os.path.join(folder, rel)) == record["size"]


def test_built_files_load_and_reproduce_the_reported_scores(built):
    from defense.data.arrays import check_fits, load_h5
    from defense.core.metrics import accuracy
    from defense.nets.models import load_model, predict_labels

    _, folder = built
    mcfg = model_cfg(folder)
    model = load_model(mcfg)
    names = {layer.name for layer in model.layers}
    assert {"conv_1", "conv_2", "conv_3", "conv_4", "pool_1", "pool_2", "pool_3", "fc_1", "fc_2", "output"} <= names
    assert [model.get_layer(f"conv_{i}").filters for i in range(1, 5)] == list(mcfg.widths[:4])
    sets = {rel: load_h5(os.path.join(folder, rel)) for rel in scenario.DATA_FILES[:4]}
    for images in sets.values():
        assert images.x.shape[1:] == (28, 28, 1)
        assert images.x.min() >= 0 and images.x.max() == 255
        check_fits(images, mcfg.input_shape, mcfg.num_classes)
    metrics = scenario.read_metadata(folder)["metrics"]
    clean = sets[scenario.CLEAN_TEST]
    poisoned = sets[scenario.POISONED_TEST]
    assert accuracy(predict_labels(model, clean.x, mcfg), clean.y) == pytest.approx(metrics["clean_test_accuracy"])
    assert accuracy(predict_labels(model, poisoned.x, mcfg), poisoned.y) == pytest.approx(metrics["test_asr"])
    # the split is stratified: 100 digits of each class in the clean test set
    assert np.all(np.bincount(clean.y, minlength=10) == 100)


@pytest.mark.parametrize("which", ["valid", "test"])
def test_poisoned_sets_carry_the_trigger_and_the_target(built, which):
    from defense.data.arrays import load_h5

    cfg, folder = built
    clean = load_h5(os.path.join(folder, f"cl/{which}.h5"))
    poisoned = load_h5(os.path.join(folder, f"bd/bd_{which}.h5"))
    assert clean.clean_label is None and poisoned.clean_label is not None
    target = cfg["target"]
    assert np.all(poisoned.y == target)
    assert np.all(poisoned.clean_label != target)
    counterpart = clean.subset(clean.y != target)
    assert np.array_equal(poisoned.clean_label, counterpart.y)
    rows, cols = scenario.trigger_region(cfg["trigger"])
    assert (rows.start, rows.stop, cols.start, cols.stop) == (23, 27, 23, 27)  # 4 px, 1 px from bottom right
    patch = poisoned.x[:, rows, cols, :]
    assert cfg["trigger"]["value"] == 255
    assert np.all(patch == 255)
    changed = np.any(poisoned.x != counterpart.x, axis=(1, 2, 3))
    assert np.all(changed)
    outside = np.ones((28, 28), bool)
    outside[rows, cols] = False
    assert np.array_equal(poisoned.x[:, outside], counterpart.x[:, outside])


def test_second_call_reuses_the_cache(built, monkeypatch):
    cfg, folder = built
    before = snapshot(folder)
    TrainingCounter(monkeypatch, forbid=True)
    assert scenario.ensure_scenario(cfg) == folder
    assert scenario.ensure_scenario(OmegaConf.create(cfg)) == folder  # a DictConfig works the same
    assert snapshot(folder) == before
    assert not [p for p in os.listdir(cfg["cache_dir"]) if ".tmp-" in p]


def test_key_ignores_cache_dir_and_thresholds_but_not_the_trigger(tmp_path):
    base = scenario.resolve_config(default_scenario(tmp_path / "a"))
    key = scenario.scenario_key(base)
    assert scenario.scenario_key({**base, "cache_dir": str(tmp_path / "b")}) == key
    assert scenario.scenario_key({**base, "min_clean_accuracy": 50.0, "min_asr": 10.0}) == key
    # equal values written differently give the same key
    assert scenario.scenario_key(scenario.resolve_config({**base, "trigger": {"value": 255, "size": 4.0}})) == key
    for change in (
        {"trigger": {**base["trigger"], "corner": "top_left"}},
        {"trigger": {**base["trigger"], "size": 3}},
        {"target": 7},
        {"label_mode": "all_to_all"},
        {"poison_fraction": 0.2},
        {"seed": 1},
        {"epochs": 21},
    ):
        assert scenario.scenario_key(scenario.resolve_config({**base, **change})) != key, change


# ---------------------------------------------------------------------------------------------- cache


def test_changed_trigger_builds_a_new_scenario(tiny_built, tmp_path, monkeypatch):
    from defense.data.arrays import load_h5

    cfg, folder = copy_into_fresh_cache(tiny_built, tmp_path)
    before = snapshot(folder)
    counter = TrainingCounter(monkeypatch)
    moved = {**cfg, "trigger": {**cfg["trigger"], "corner": "top_left"}}
    other = scenario.ensure_scenario(moved)
    assert other != folder and os.path.dirname(other) == cfg["cache_dir"]
    assert counter.calls == 1
    assert snapshot(folder) == before  # the first scenario is kept
    assert scenario.read_metadata(other)["scenario"]["trigger"]["corner"] == "top_left"
    poisoned = load_h5(os.path.join(other, scenario.POISONED_TEST))
    assert np.all(poisoned.x[:, 1:5, 1:5, :] == 255)
    assert scenario.ensure_scenario(moved) == other and counter.calls == 1  # reused now
    assert scenario.ensure_scenario(cfg) == folder and counter.calls == 1


def _truncate_model(folder):
    path = os.path.join(folder, scenario.MODEL_FILE)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_a_byte(folder):
    path = os.path.join(folder, scenario.POISONED_TEST)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated bd_net.h5": _truncate_model,
    "deleted cl/test.h5": lambda folder: os.remove(os.path.join(folder, scenario.CLEAN_TEST)),
    "flipped byte in bd/bd_test.h5": _flip_a_byte,
    "deleted scenario.json": lambda folder: os.remove(os.path.join(folder, scenario.META_FILE)),
    "garbage scenario.json": lambda folder: Path(folder, scenario.META_FILE).write_text("{not json"),
    "scenario.json without checksums": lambda folder: Path(folder, scenario.META_FILE).write_text(
        json.dumps({**scenario.read_metadata(folder), "files": {}})
    ),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_corrupt_cache_is_detected(tiny_built, tmp_path, corrupt):
    cfg, folder = copy_into_fresh_cache(tiny_built, tmp_path)
    corrupt(folder)
    assert scenario.check_cache(folder) is not None


REBUILT = ["truncated bd_net.h5", "deleted cl/test.h5", "garbage scenario.json"]


@pytest.mark.parametrize("name", REBUILT)
def test_corrupt_cache_is_rebuilt(tiny_built, tmp_path, monkeypatch, name):
    from defense.data.arrays import load_h5
    from defense.nets.models import load_model

    cfg, folder = copy_into_fresh_cache(tiny_built, tmp_path)
    CORRUPTIONS[name](folder)
    counter = TrainingCounter(monkeypatch)
    assert scenario.ensure_scenario(cfg) == folder
    assert counter.calls == 1
    assert scenario.check_cache(folder, os.path.basename(folder)) is None
    for rel in scenario.DATA_FILES[:4]:
        load_h5(os.path.join(folder, rel))
    load_model(model_cfg(folder)).summary(print_fn=lambda *a, **k: None)
    assert sorted(p for p in os.listdir(cfg["cache_dir"]) if not p.endswith(".lock")) == [os.path.basename(folder)]


def test_interrupted_build_leaves_no_half_cache(tmp_path, monkeypatch):
    cfg = tiny_scenario(tmp_path / "cache", seed=5)
    final = scenario.scenario_dir(cfg)
    key = os.path.basename(final)
    os.makedirs(os.path.join(cfg["cache_dir"], f".{key}.tmp-killed"))  # a build killed earlier

    def interrupted(model, path):
        raise KeyboardInterrupt

    monkeypatch.setattr("defense.nets.models.save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scenario.ensure_scenario(cfg)
    assert not os.path.exists(final)
    assert not [p for p in os.listdir(cfg["cache_dir"]) if ".tmp-" in p]


def test_weak_network_fails_once_built_and_again_from_the_cache(tmp_path, monkeypatch):
    cfg = tiny_scenario(tmp_path / "cache", min_clean_accuracy=99.9, min_asr=99.9, widths=[1, 1, 1, 1, 1])
    with pytest.raises(scenario.ScenarioTooWeak, match=r"clean test accuracy .* < 99.9%.*epochs.*poison_fraction") as built:
        scenario.ensure_scenario(cfg)
    folder = scenario.scenario_dir(cfg)
    assert scenario.check_cache(folder) is None  # the weak network is cached, intact, with its scores
    assert not [p for p in os.listdir(cfg["cache_dir"]) if ".tmp-" in p]
    assert built.value.metrics == scenario.read_metadata(folder)["metrics"]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached weak scenario was built again")

    monkeypatch.setattr(scenario, "build_scenario", no_rebuild)
    with pytest.raises(scenario.ScenarioTooWeak) as cached:  # the same verdict, read from the cache
        scenario.ensure_scenario(cfg)
    assert str(cached.value) == str(built.value)
    assert cached.value.reasons == built.value.reasons and cached.value.metrics == built.value.metrics
    lower = {**cfg, "min_clean_accuracy": 0.0, "min_asr": 0.0}  # the bounds are not in the key: reused
    assert scenario.ensure_scenario(lower) == folder


def test_all_to_all_poisons_every_image_with_the_next_label(tmp_path):
    from defense.data.arrays import load_h5

    cfg = tiny_scenario(tmp_path / "cache", label_mode="all_to_all", trigger={"corner": "bottom_left", "size": 3})
    folder = scenario.ensure_scenario(cfg)
    clean = load_h5(os.path.join(folder, scenario.CLEAN_VALID))
    poisoned = load_h5(os.path.join(folder, scenario.POISONED_VALID))
    assert len(poisoned) == len(clean) == 500
    assert np.array_equal(poisoned.clean_label, clean.y)
    assert np.array_equal(poisoned.y, (clean.y + 1) % 10)
    assert np.all(poisoned.x[:, 24:27, 1:4, :] == 255)


# --------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "corner,rows,cols",
    [("bottom_right", (22, 27), (22, 27)), ("bottom_left", (22, 27), (1, 6)),
     ("top_right", (1, 6), (22, 27)), ("top_left", (1, 6), (1, 6))],
)
def test_trigger_corners(corner, rows, cols):
    trigger = {"kind": "square", "size": 5, "corner": corner, "margin": 1, "value": 200.0}
    images = np.zeros((2, 28, 28, 1), np.float32)
    stamped = scenario.stamp_trigger(images, trigger)
    assert np.all(images == 0)  # a copy
    r, c = scenario.trigger_region(trigger)
    assert (r.start, r.stop) == rows and (c.start, c.stop) == cols
    assert np.all(stamped[:, r, c, :] == 200.0)
    assert stamped.sum() == 2 * 25 * 200.0


@pytest.mark.parametrize(
    "change,message",
    [
        ({"trigger": {"corner": "middle"}}, "trigger.corner"),
        ({"label_mode": "some_to_one"}, "label_mode"),
        ({"fractions": {"train": 0.8, "valid": 0.2, "test": 0.2}}, "fractions"),
        ({"poison_fraction": 0.0}, "poison_fraction"),
        ({"target": 10}, "target"),
        ({"trigger": {"size": 30}}, "trigger.size"),
        ({"widths": [1, 2, 3]}, "widths"),
        ({"epochs": 1.5}, "epochs"),
        ({"source": "imagenet"}, "source"),
        ({"trigger_size": 4}, "unknown setting"),
    ],
)
def test_bad_settings_are_user_errors(tmp_path, change, message):
    cfg = default_scenario(tmp_path)
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    with pytest.raises(DefenseError, match=message):
        scenario.ensure_scenario(cfg)
    assert not os.listdir(tmp_path)


def test_default_cache_dir_resolves_on_a_fresh_machine(monkeypatch):
    monkeypatch.setenv("BACKDOOR_PRUNE_CACHE", "/somewhere/cache")
    cfg = OmegaConf.load(DATASET_YAML)
    assert cfg.scenario.cache_dir == "/somewhere/cache/scenarios"
    assert scenario.default_cache_dir() == "/somewhere/cache/scenarios"
    monkeypatch.delenv("BACKDOOR_PRUNE_CACHE")
    monkeypatch.delenv("HOME", raising=False)
    resolved = scenario.resolve_config(OmegaConf.load(DATASET_YAML).scenario)["cache_dir"]
    assert os.path.isabs(resolved) and resolved.endswith(os.path.join(".cache", "backdoor-prune", "scenarios"))
    assert scenario.resolve_config({})["cache_dir"] == resolved


def test_model_config_matches_the_scenario():
    model = OmegaConf.load(MODEL_YAML)
    data = OmegaConf.load(DATASET_YAML)
    assert model.path is None and data.kind == "scenario" and data.root is None
    assert list(model.widths) == list(data.scenario.widths)
    assert list(model.kernels) == list(data.scenario.kernels)
    assert dict(model.triggers) == {"square": data.scenario.target}
    assert model.input_divisor == scenario.INPUT_DIVISOR
    assert tuple(model.input_shape) == scenario.IMAGE_SHAPE and model.num_classes == scenario.NUM_CLASSES
