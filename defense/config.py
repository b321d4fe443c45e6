"""The config schemas of the apps (Hydra structured configs) and the numeric bounds no type can say.

Hydra 1.3 validates a YAML config against a dataclass registered in its ConfigStore when the YAML
names that schema first in its defaults list (https://hydra.cc/docs/tutorials/structured_config/schema/):

    conf/prune/default.yaml:   defaults: [base_prune, _self_]
    conf/config.yaml:          defaults: [base_config, model: ..., ..., _self_]

so an unknown key (`prune.critrion=l1`, or a typo in a YAML file) or a wrong type (`batch_size=abc`,
`finetune.epochs=ten`) fails when the config is composed, with Hydra's own message, before any code
of the defense runs. defense/pipeline/schemas.py stores these schemas (with each attack's own `Settings`)
in Hydra's ConfigStore; the apps (`defense.run`, `defense.evaluate`,
`defense.predict`, `defense.compare`) and tests/conftest.py import it before Hydra composes anything.

What a type cannot say (a batch size >= 1, a fraction in (0, 1], ...) is checked by `check_config`
(the keys every app shares) and by the module that reads a section (a criterion's `check_config`, a
stage's `check`, defense/pipeline/stages/__init__.py), which the apps call first: one `DefenseError`
line naming the key, exit status 2, before any data is read or any MLflow run is created. This module
imports nothing of the modules it validates.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from defense.core.errors import DefenseError

# ---------------------------------------------------------------------------------------------------
# schemas of the config groups (conf/<group>/<option>.yaml names one of them in its defaults list)


@dataclass
class ModelConfig:
    """conf/model/*.yaml: a network B (weights-only .h5 on the architecture, or a full Keras .h5)."""

    name: Optional[str] = None  # null (model=auto): the model file's name
    path: Optional[str] = None
    architecture: Optional[str] = "deepid"
    input_shape: Optional[List[int]] = None  # null (model=auto): read from the model file
    num_classes: Optional[int] = None  # null (model=auto): read from the model file
    input_divisor: Optional[float] = 1.0  # null: chosen on clean validation data (defense/pruning/autodetect.py)
    triggers: Dict[str, int] = field(default_factory=dict)  # trigger name -> target label


@dataclass
class ScenarioModelConfig(ModelConfig):
    """conf/model/badnets_mnist.yaml: the embedded scenario's DeepID with its own padding and widths."""

    padding: str = "valid"
    widths: Optional[List[int]] = None
    kernels: Optional[List[int]] = None


@dataclass
class Lab3DatasetConfig:
    """conf/dataset/lab3.yaml: the four Lab 3 files under `root`."""

    kind: str = "lab3"
    root: str = "data"
    clean_valid: str = "cl/valid.h5"
    poisoned_valid: str = "bd/bd_valid.h5"
    clean_test: str = "cl/test.h5"
    poisoned_test: str = "bd/bd_test.h5"


@dataclass
class ScenarioDatasetConfig(Lab3DatasetConfig):
    """conf/dataset/badnets_mnist.yaml: the Lab 3 layout of a built scenario; `scenario` is checked by
    defense/scenario/build.py::resolve_config (a nested mapping, typed loosely here)."""

    kind: str = "scenario"
    root: Optional[str] = None
    scenario: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CsawExtractDatasetConfig:
    """conf/dataset/csaw_extract.yaml: the real faces; poisoned files by model name, then trigger name."""

    kind: str = "csaw_extract"
    root: str = MISSING
    clean: str = "clean_test.h5"
    poisoned: Dict[str, Dict[str, str]] = field(default_factory=dict)


@dataclass
class FilesDatasetConfig:
    """conf/dataset/files.yaml: the defender's own files (defense/data/files.py)."""

    kind: str = "files"
    root: Optional[str] = None
    clean_valid: Optional[str] = None
    clean_test: Optional[str] = None
    poisoned_valid: Dict[str, str] = field(default_factory=dict)  # trigger name -> file
    poisoned_test: Dict[str, str] = field(default_factory=dict)


@dataclass
class ClpConfig:
    """`prune.clp` (conf/prune/clp.yaml; defense/criteria/clp.py)."""

    u: float = 3.0  # prune channels above mean + u * std of their layer (>= 0)
    level: str = "auto"  # where channels are pruned: auto, bn or conv (defense/pruning/bn_pairing.py)


@dataclass
class AnpConfig:
    """`prune.anp` (conf/prune/anp.yaml; defense/criteria/anp.py)."""

    eps: float = 0.4  # bound of the multiplicative perturbations (>= 0; 0: no perturbation)
    steps: int = 1  # signed-gradient steps of the perturbation per iteration (>= 1)
    alpha: float = 0.2  # weight of the natural loss, 1 - alpha of the perturbed one ([0, 1])
    lr: float = 0.2  # mask learning rate (> 0)
    momentum: float = 0.9  # SGD momentum of the masks ([0, 1))
    iterations: int = 2000  # mask updates (>= 1)
    batch_size: int = 128  # images per iteration, drawn with replacement (>= 1)
    images: int = 500  # clean validation images that learn the masks (>= 1; capped by what there is)
    fraction: Optional[float] = None  # former option: a share of the clean validation data ((0, 1]); replaces images
    level: str = "auto"  # where the masks sit: auto, bn or conv (defense/pruning/bn_pairing.py)
    shift: Optional[int] = None  # random translation of every batch (px, >= 0); null: 4 per 32 px with BN masks, else 0
    threshold: float = 0.2  # operating point: prune masks below it ([0, 1])
    log_every: int = 100  # iterations per history row (>= 1)


@dataclass
class RnpConfig:
    """`prune.rnp` (conf/prune/rnp.yaml; defense/criteria/rnp.py)."""

    clean_threshold: float = 0.2  # unlearning stops at this clean accuracy (fraction, [0, 1])
    unlearn_lr: float = 0.01  # (> 0)
    unlearn_epochs: int = 20  # at most (>= 1)
    weight_decay: float = 0.0005  # of the unlearning SGD (>= 0)
    recover_lr: float = 0.2  # mask learning rate (> 0)
    recover_epochs: int = 20  # (>= 1)
    alpha: float = 0.2  # weight of the recovering loss ((0, 1])
    momentum: float = 0.9  # SGD momentum of both phases ([0, 1))
    batch_size: int = 128  # (>= 1)
    images: int = 500  # clean validation images used (>= 1; capped by what there is)
    fraction: Optional[float] = None  # former option: a share of the clean validation data ((0, 1]); replaces images
    level: str = "auto"  # where the masks sit: auto, bn or conv (defense/pruning/bn_pairing.py)
    shift: Optional[int] = None  # random translation of every batch (px, >= 0); null: 4 per 32 px with BN masks, else 0
    threshold: float = 0.2  # operating point: prune masks below it ([0, 1])


@dataclass
class PruneConfig:
    """conf/prune/default.yaml (and clp.yaml, anp.yaml, rnp.yaml)."""

    criterion: str = "activation"
    # a Conv2D layer name, a list of them, or `all` (every Conv2D); null: defense/pruning/autodetect.py::default_layer
    # (DeepID: conv_3); typed Any because it is a string or a list, checked by defense/pipeline/sweep.py::check_layer_option
    layer: Any = None
    probe: Optional[str] = None  # null: defense/pruning/autodetect.py::default_probe (DeepID: pool_3)
    drops: List[float] = field(default_factory=lambda: [2.0, 4.0, 10.0, 30.0])
    seed: int = 0
    # null: every step (several layers and over 100 steps: 101 evenly spaced); N >= 2: N evenly spaced
    # steps, the first and last included (defense/pruning/steps.py)
    eval_steps: Optional[int] = None
    clp: ClpConfig = field(default_factory=ClpConfig)
    anp: AnpConfig = field(default_factory=AnpConfig)
    rnp: RnpConfig = field(default_factory=RnpConfig)


@dataclass
class StopConfig:
    """conf/stop/*.yaml."""

    rule: str = "all"
    fraction: Optional[float] = None


@dataclass
class FinetuneNoneConfig:
    """conf/finetune/none.yaml."""

    kind: str = "none"


@dataclass
class FinetuneGridConfig:
    """`finetune.grid`: the fine-tuning settings the defender's rule chooses among (defense/pipeline/select.py),
    each list non-empty, tried from the weakest (smallest learning rate, fewest epochs) up."""

    # both null (the default): no grid; both lists, each non-empty: the candidates
    learning_rate: Optional[List[float]] = None  # each > 0
    epochs: Optional[List[int]] = None  # each >= 1


@dataclass
class FinetuneCleanConfig:
    """conf/finetune/clean.yaml (fine-pruning on the clean validation data)."""

    kind: str = "clean"
    epochs: int = 10
    learning_rate: float = 0.001
    lr_schedule: str = "constant"
    batch_size: int = 64
    optimizer: str = "adam"
    momentum: float = 0.9
    seed: int = 0
    holdout: float = 0.2
    patience: int = 3
    monitor: str = "val_loss"
    shift: int = 0
    # no lists (or null): no grid (the defender's point fine-tunes with the settings above). Not null by default,
    # so that finetune.grid.learning_rate=[...] and finetune.grid={...} merge into it (OmegaConf cannot merge
    # either into a null structured node)
    grid: Optional[FinetuneGridConfig] = field(default_factory=FinetuneGridConfig)


@dataclass
class AblationConfig:
    """`ablation` of conf/experiment/finetune_ablation.yaml: the fine-tuning budgets of the grid
    (defense/pipeline/ablation.py); every other fine-tuning setting comes from the `finetune` group."""

    epochs: List[int] = field(default_factory=lambda: [2, 5, 10, 30])  # each >= 1
    learning_rate: List[float] = field(default_factory=lambda: [0.01, 0.05])  # each > 0


@dataclass
class SelectConfig:
    """conf/select/default.yaml: the defender's operating point (defense/pipeline/select.py), chosen on a
    seeded held-out part of the clean validation data that nothing else of the run learns from."""

    holdout: float = 0.2  # fraction of the clean validation images held out ((0, 1))
    max_drop: float = 5.0  # largest held-out clean accuracy loss against B, in points (>= 0)
    seed: int = 0  # seeds the held-out draw


def check_select(select_cfg) -> None:
    """`select`: holdout in (0, 1), max_drop >= 0 (DefenseError naming the key)."""
    if select_cfg is None:
        return

    def shown(key, ok, what):  # the value as typed (-1, not -1.0: the schema makes it a float)
        value = select_cfg.get(key)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        bound(f"select.{key}", value, ok, what)

    shown("holdout", lambda v: 0 < v < 1, "a fraction of the clean validation images in (0, 1), e.g. select.holdout=0.2")
    shown("max_drop", lambda v: v >= 0, "an accuracy loss in points >= 0, e.g. select.max_drop=5")
    shown("seed", lambda v: float(v).is_integer(), "an integer seed, e.g. select.seed=0")


@dataclass
class TrackingConfig:
    """conf/tracking/*.yaml."""

    kind: str = "mlflow"
    uri: Optional[str] = None
    experiment: str = "backdoor-prune"
    run_name: Optional[str] = None
    log_models: bool = True
    register: Optional[str] = None
    register_drop: Optional[float] = None


@dataclass
class LimitsConfig:
    """`limits`: the largest input array (GiB) and the largest image (pixels) an app accepts."""

    max_array_gib: float = 4.0
    max_image_pixels: int = 40_000_000


@dataclass
class Csaw2020Config:
    """`csaw2020` of conf/experiment/csaw2020.yaml: where each CSAW-HackML-2020 network file is."""

    dir: str = MISSING
    suffix: str = "_bd_weights.h5"
    stems: Dict[str, str] = field(default_factory=dict)


@dataclass
class LeaderboardSweepConfig:
    """`leaderboard` of conf/experiment/leaderboard.yaml: the axes of the attacks x defenses sweep.

    Each list becomes one axis of the multirun through the `sweep_axis` resolver (below)."""

    attacks: List[str] = field(default_factory=list)  # dataset.scenario.attack of each row
    defenses: List[str] = field(default_factory=list)  # defense preset (conf/defense/) of each column
    seeds: List[int] = field(default_factory=lambda: [1])  # dataset.scenario.seed: data split, poison, training


# ---------------------------------------------------------------------------------------------------
# schemas of the primary configs (conf/config.yaml, evaluate.yaml, predict.yaml, compare.yaml); the
# groups are typed Any here: each option file brings its own schema above


@dataclass
class RunConfig:
    """conf/config.yaml: `python -m defense.run`."""

    verbose: bool = False  # also print the libraries' start-up lines, warnings and progress bars
    model: Any = MISSING
    dataset: Any = MISSING
    prune: Any = MISSING
    stop: Any = MISSING
    finetune: Any = MISSING
    tracking: Any = MISSING
    select: Any = MISSING
    # set by every conf/defense preset; null: a custom defense (defense/config.py::defense_name)
    defense_name: Optional[str] = None
    batch_size: int = 512
    progress: bool = True
    compact: bool = True
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # set by experiment=finetune_ablation only: the grid of fine-tuning budgets
    ablation: Optional[AblationConfig] = None
    # set by experiment=csaw2020 only
    csaw2020: Optional[Csaw2020Config] = None
    # set by experiment=leaderboard only
    leaderboard: Optional[LeaderboardSweepConfig] = None


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml: `python -m defense.evaluate`."""

    verbose: bool = False  # also print the libraries' start-up lines, warnings and progress bars
    model: Any = MISSING
    dataset: Any = MISSING
    split: str = "test"
    batch_size: int = 1024
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass
class RepairedConfig:
    path: Optional[str] = None
    run: Optional[str] = None
    drop: Optional[str] = None  # 10, 10_compact, 10_ft


@dataclass
class PredictConfig:
    """conf/predict.yaml: `python -m defense.predict`."""

    verbose: bool = False  # also print the libraries' start-up lines, warnings and progress bars
    model: Any = MISSING
    image: Optional[str] = None
    repaired: RepairedConfig = field(default_factory=RepairedConfig)
    resize: bool = False
    batch_size: int = 256
    limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass
class CompareSection:
    parent: Optional[str] = None
    experiment: Optional[str] = None
    x: str = "fraction_pruned"
    layout: str = "runs"  # runs (one row per run) | leaderboard (attacks x defenses, defense/analysis/leaderboard.py)


@dataclass
class LeaderboardCompareConfig:
    """`leaderboard` of conf/compare.yaml: where compare.layout=leaderboard reads a defense's scores."""

    drop: float = 4.0  # accuracy-drop threshold (points) of a defense without its own operating point
    # which summary.csv row a cell shows: operating_point (the defense's own point, else leaderboard.drop),
    # defender (the defender's held-out rule) or oracle_test_asr (the lowest test ASR: an oracle)
    point: str = "operating_point"


@dataclass
class CompareConfig:
    """conf/compare.yaml: `python -m defense.compare`."""

    verbose: bool = False  # also print the libraries' start-up lines, warnings and progress bars
    tracking: Any = MISSING
    compare: CompareSection = field(default_factory=CompareSection)
    leaderboard: LeaderboardCompareConfig = field(default_factory=LeaderboardCompareConfig)


# ---------------------------------------------------------------------------------------------------
# a list of the config as one axis of a Hydra sweep

SWEEP_VALUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


def sweep_axis(key: str, _root_) -> str:
    """`${sweep_axis:leaderboard.seeds}` in `hydra.sweeper.params`: the list at `key` as the comma list
    that Hydra's sweepers read as one axis ([1, 2, 3] -> "1,2,3").

    A sweeper param may not interpolate a list directly (Hydra would pass "[1, 2, 3]", one job with a
    list value); the sweeper resolves its params when it starts, after the command line's overrides,
    so `leaderboard.seeds=[1,2,3]` on the command line gives three jobs per cell. An empty list, a
    repeated value or one that is not a plain name or number is a DefenseError naming the key.
    """
    from omegaconf import OmegaConf

    values = OmegaConf.select(_root_, key, throw_on_missing=False)
    if OmegaConf.is_list(values):
        values = list(values)
    if not isinstance(values, list) or not values:
        raise DefenseError(f"{key}={values!r} must be a non-empty list, e.g. {key}=[1,2,3]")
    texts = []
    for value in values:
        text = str(value)
        if isinstance(value, bool) or value is None or not SWEEP_VALUE.fullmatch(text):
            raise DefenseError(f"{key}: {value!r} is not a plain name or number (letters, digits, _ . + -)")
        texts.append(text)
    repeated = sorted({t for t in texts if texts.count(t) > 1})
    if repeated:
        raise DefenseError(f"{key}=[{','.join(texts)}] repeats {', '.join(repeated)}: give each value once")
    return ",".join(texts)


def check_sweep_axes(config) -> None:
    """Resolve `hydra.sweeper.params` now: a bad axis (sweep_axis) is one DefenseError before any run starts."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if params is None:
        return
    try:
        OmegaConf.to_container(params, resolve=True)
    except InterpolationResolutionError as err:
        cause = err  # OmegaConf re-raises the resolver's error; it stays in the exception chain
        while cause is not None and not isinstance(cause, DefenseError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("sweep_axis", sweep_axis, replace=True)


register_resolvers()


# ---------------------------------------------------------------------------------------------------
# numeric bounds


def bound(key: str, value, ok, what: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
        raise DefenseError(f"{key}={value!r} must be {what}")


def check_limits(cfg) -> None:
    """`limits.max_array_gib` > 0 and `limits.max_image_pixels` >= 1 (where the config has them)."""
    limits = cfg.get("limits")
    if limits is None:
        return
    bound("limits.max_array_gib", limits.get("max_array_gib"), lambda v: v > 0,
           "a size in GiB > 0, e.g. limits.max_array_gib=4")
    bound("limits.max_image_pixels", limits.get("max_image_pixels"), lambda v: v >= 1 and float(v).is_integer(),
           "a whole number of pixels >= 1, e.g. limits.max_image_pixels=40000000")


def check_batch_size(cfg) -> None:
    bound("batch_size", cfg.get("batch_size"), lambda v: v >= 1 and float(v).is_integer(),
           "a whole number of images per batch >= 1, e.g. batch_size=512")


def check_model(model_cfg) -> None:
    """`model`: num_classes >= 2, input_divisor > 0, input_shape of positive sizes (null: model=auto)."""
    if model_cfg.get("num_classes") is not None:
        bound("model.num_classes", model_cfg.get("num_classes"), lambda v: v >= 2, "a number of classes >= 2")
    if model_cfg.get("input_divisor") is not None:
        bound("model.input_divisor", model_cfg.get("input_divisor"), lambda v: v > 0,
               "a number > 0 (1 for raw pixels 0..255, 255 for pixels / 255)")
    if model_cfg.get("input_shape") is None:
        return
    shape = list(model_cfg.get("input_shape") or [])
    if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
        raise DefenseError(f"model.input_shape={shape} must list positive sizes, e.g. model.input_shape=[55,47,3]")


def check_config(cfg, app: str = "run") -> None:
    """The numeric bounds every app shares (batch_size, limits, model) and evaluate's split; DefenseError on the
    first bad key. The run's own sections are checked by its stages (defense/pipeline/stages/__init__.py::check_config).
    """
    check_batch_size(cfg)
    check_limits(cfg)
    if cfg.get("model") is not None:
        check_model(cfg.model)
    if app == "evaluate" and cfg.get("split") not in ("valid", "test", "all"):
        raise DefenseError(f"split={cfg.get('split')!r} is not known; use split=valid, split=test or split=all")


def defense_name(cfg) -> str:
    """The defense's name in reports and MLflow: `defense_name` (set by the conf/defense presets), or for
    a custom defense the criterion, with "+ft" when it fine-tunes (e.g. "l1+ft")."""
    name = cfg.get("defense_name")
    if name:
        return str(name)
    finetune = (cfg.get("finetune") or {}).get("kind", "none")
    criterion = str((cfg.get("prune") or {}).get("criterion", "activation"))
    return criterion + ("+ft" if finetune not in (None, "none") else "")


# ---------------------------------------------------------------------------------------------------
# a network, its weights and its input scaling that do not belong together

MISMATCH_FACTOR = 5.0  # clean accuracy below this many times chance is reported


def warn_if_near_chance(clean_acc: float, model_cfg, what: str, logger=None) -> bool:
    """Log one warning when `clean_acc` (%) of the unpruned network is below 5x chance (100 / num_classes %).

    A backdoored network still classifies clean inputs well (that is what makes it a backdoor), so
    near-chance clean accuracy almost always means that `model` (the architecture and its
    `input_divisor`), the weights in `model.path` and the data do not belong together, e.g. a network
    trained on raw 0..255 pixels fed pixels / 255 (the Lab 3 network under model=csaw2020_sunglasses:
    0 % on the real extracts). It cannot catch every mismatch: the CSAW-HackML-2020 sunglasses network
    fed raw pixels (model=lab3) still gets 48 % of the 50 validation faces right.
    Returns True when it warned.
    """
    import logging

    num_classes = int(model_cfg.num_classes)
    floor = MISMATCH_FACTOR * 100.0 / num_classes
    if not (clean_acc < floor):
        return False
    (logger or logging.getLogger("defense.config")).warning(
        "warning: %s is %.2f %%, below %g x chance (%.2f %% for %d classes): model=%s, its weights (model.path=%s) "
        "and the data scaling (model.input_divisor=%g) probably do not match; check that the model option fits the "
        "weights file (e.g. model=csaw2020_sunglasses, pixels / 255, for the CSAW-HackML-2020 networks; model=lab3, "
        "raw pixels, for the Lab 3 network)",
        what, clean_acc, MISMATCH_FACTOR, floor, num_classes, model_cfg.get("name"), model_cfg.get("path"),
        float(model_cfg.get("input_divisor", 1.0)),
    )
    return True


def seed_everything(cfg) -> None:
    """The same config gives the same bytes: Python's, numpy's and TensorFlow's global seeds from
    `prune.seed`, and TensorFlow ops that pick deterministic kernels (order of float reductions).

    The data-dependent random draws have their own seeded generators (prune.seed for the random
    order, finetune.seed for the holdout split, the shuffling and the shift augmentation,
    defense/pipeline/finetune.py); this covers what they do not reach (Keras' global generators and the
    thread-order of TensorFlow's reductions).
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(cfg.prune.get("seed", 0)))
    tf.config.experimental.enable_op_determinism()
