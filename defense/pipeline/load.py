"""The data sets of a defense run: clean and poisoned sets, each split into validation and test.

`dataset.kind` picks the layout:
- `lab3`: the Lab 3 files under `dataset.root` (cl/valid.h5, bd/bd_valid.h5, cl/test.h5, bd/bd_test.h5);
- `csaw_extract`: the real extracts of ../shared/data/csaw; one file per set, the first half of every
  file is validation data and the second half test data, so clean/poisoned pairs stay aligned;
- `scenario`: a backdoor scenario built offline by `defense.scenario.build` (Lab 3 layout in its cache folder);
- `files`: the defender's own files (`defense.data.files`): `clean_valid` and `clean_test` (required),
  `poisoned_valid` / `poisoned_test` (optional, trigger name -> file whose labels are the attack's
  targets), each an h5 file, an npz file or a folder of class subfolders, relative to `root` when set.
  Without poisoned sets the defense runs on clean data alone and the ASR columns stay blank.

Poisoned sets are named after the model's triggers (`model.triggers`: trigger name -> target label).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from defense.data.arrays import LabeledImages, check_fits, load_h5
from defense.core.errors import DefenseError

SPLITS = ("valid", "test", "all")


@dataclass
class Split:
    """One split: the clean set and the poisoned sets (trigger name -> images, labels = targets)."""

    clean: LabeledImages
    poisoned: dict[str, LabeledImages] = field(default_factory=dict)

    def all_sets(self):
        return [self.clean, *self.poisoned.values()]


def scenario_root(dataset_cfg) -> str:
    """Build (or reuse from its cache) the scenario of a `kind: scenario` data set; its folder."""
    from defense.scenario.build import ensure_scenario

    return ensure_scenario(dataset_cfg.scenario)


def dataset_root(dataset_cfg) -> str:
    if dataset_cfg.kind == "scenario":
        return dataset_cfg.get("root") or scenario_root(dataset_cfg)
    if dataset_cfg.kind == "files":
        return os.fspath(dataset_cfg.get("root") or "")
    return os.fspath(dataset_cfg.root)


def resolve_model_path(model_cfg, dataset_cfg) -> str:
    """`model.path`, or the scenario's backdoored model when the model comes from the scenario."""
    path = model_cfg.get("path")
    if path:
        return os.fspath(path)
    if dataset_cfg.kind == "scenario":
        return os.path.join(dataset_root(dataset_cfg), "bd_net.h5")
    raise DefenseError(f"model.path is not set for model={model_cfg.get('name')}; give model.path=<file.h5>")


def _split_of(part, split: str) -> Split:
    """`part(which)` for `valid` / `test`; for `all` both parts concatenated, set by set."""
    if split != "all":
        return part(split)
    valid, test = part("valid"), part("test")
    return Split(
        LabeledImages.concat([valid.clean, test.clean]),
        {k: LabeledImages.concat([valid.poisoned[k], test.poisoned[k]]) for k in valid.poisoned},
    )


def _lab3_poisoned_name(model_cfg) -> str:
    triggers = list((model_cfg.get("triggers") or {}).keys())
    return triggers[0] if len(triggers) == 1 else "poisoned"


def _load_lab3_layout(root: str, dataset_cfg, model_cfg, split: str, limits=None) -> Split:
    hint = (
        f"dataset.root={root} must hold the Lab 3 files cl/valid.h5, cl/test.h5, bd/bd_valid.h5, bd/bd_test.h5 "
        "(download them from the CSAW-HackML Lab 3 README's data link), or run on the embedded default "
        "(dataset=badnets_mnist model=badnets_mnist)"
    )
    name = _lab3_poisoned_name(model_cfg)
    has_triggers = bool(model_cfg.get("triggers"))

    def part(which: str) -> Split:
        clean = load_h5(os.path.join(root, dataset_cfg[f"clean_{which}"]), "clean", hint=hint, limits=limits)
        poisoned = {}
        if has_triggers:
            poisoned[name] = load_h5(os.path.join(root, dataset_cfg[f"poisoned_{which}"]), name, hint=hint, limits=limits)
        return Split(clean, poisoned)

    return _split_of(part, split)


def _load_csaw_extract(root: str, dataset_cfg, model_cfg, split: str, limits=None) -> Split:
    hint = f"dataset.root={root} must be the folder of the real extracts (../shared/data/csaw from the project root)"
    model_name = model_cfg.get("name")
    by_model = dataset_cfg.get("poisoned") or {}
    triggers = dict(model_cfg.get("triggers") or {})
    if triggers and model_name not in by_model:
        raise DefenseError(
            f"dataset=csaw_extract has no poisoned files for model={model_name}; "
            f"known: {sorted(by_model)}; add dataset.poisoned.{model_name}.<trigger>=<file.h5>"
        )
    files = {trig: by_model[model_name][trig] for trig in triggers if trig in by_model[model_name]}
    missing = sorted(set(triggers) - set(files))
    if missing:
        raise DefenseError(
            f"dataset=csaw_extract has no poisoned file for trigger(s) {missing} of model={model_name}; "
            f"add dataset.poisoned.{model_name}.<trigger>=<file.h5>"
        )

    def halve(images: LabeledImages) -> LabeledImages:
        n = len(images)
        if split == "valid":
            return images.subset(slice(0, n // 2))
        if split == "test":
            return images.subset(slice(n // 2, n))
        return images

    clean = halve(load_h5(os.path.join(root, dataset_cfg.clean), "clean", hint=hint, limits=limits))
    poisoned = {trig: halve(load_h5(os.path.join(root, f), trig, hint=hint, limits=limits)) for trig, f in files.items()}
    return Split(clean, poisoned)


def _load_files(root: str, dataset_cfg, model_cfg, split: str, limits=None) -> Split:
    from defense.data.files import load_images

    hint = "dataset=files reads the files named by dataset.clean_valid, dataset.clean_test, dataset.poisoned_valid, " \
           "dataset.poisoned_test (relative to dataset.root when it is set)"
    for key in ("clean_valid", "clean_test"):
        if not dataset_cfg.get(key):
            raise DefenseError(f"dataset.{key} is not set; dataset=files needs dataset.clean_valid=<file> and "
                               "dataset.clean_test=<file> (h5, npz or a folder of class subfolders)")
    triggers = {which: dict(dataset_cfg.get(f"poisoned_{which}") or {}) for which in ("valid", "test")}
    if set(triggers["valid"]) != set(triggers["test"]):
        raise DefenseError(
            f"dataset.poisoned_valid names the triggers {sorted(triggers['valid'])} and dataset.poisoned_test "
            f"{sorted(triggers['test'])}; give the same triggers for both (trigger name -> file), or neither"
        )

    def part(which: str) -> Split:
        clean = load_images(os.path.join(root, dataset_cfg[f"clean_{which}"]), "clean", model_cfg.input_shape, hint,
                            limits)
        poisoned = {trig: load_images(os.path.join(root, f), trig, model_cfg.input_shape, hint, limits)
                    for trig, f in triggers[which].items()}
        return Split(clean, poisoned)

    return _split_of(part, split)


def load_split(dataset_cfg, model_cfg, split: str, limits=None) -> Split:
    """Load one split (`valid`, `test` or `all`) and check it fits the model.

    `limits`: a `defense.core.safe_files.Limits` for the untrusted h5 files (the defaults when None).
    """
    if split not in SPLITS:
        raise DefenseError(f"split={split!r} is not one of {list(SPLITS)}")
    kind = dataset_cfg.get("kind")
    root = dataset_root(dataset_cfg)
    if kind in ("lab3", "scenario"):
        result = _load_lab3_layout(root, dataset_cfg, model_cfg, split, limits)
    elif kind == "csaw_extract":
        result = _load_csaw_extract(root, dataset_cfg, model_cfg, split, limits)
    elif kind == "files":
        result = _load_files(root, dataset_cfg, model_cfg, split, limits)
    else:
        raise DefenseError(f"dataset.kind={kind!r} is not known; use one of lab3, csaw_extract, scenario, files")
    for images in result.all_sets():
        check_fits(images, model_cfg.input_shape, int(model_cfg.num_classes), f"model={model_cfg.get('name')}")
    return result
