"""`python -m defense.predict`: classify image files with the repaired network G(B, B').

    python -m defense.predict model=lab3 model.path=../shared/data/csaw/lab3_bd_weights.h5 \
        repaired.run=outputs/run/2024-01-01/12-00-00 repaired.drop=10 image=faces/

B is the `model` group's network (`model.path`: weights-only or full .h5), B' the pruned network
(`repaired.path=<file.h5>`, or `repaired.run=<run folder> repaired.drop=<drop>` for
<run>/models/model_B_<drop>.h5 written by `python -m defense.run`). For each image (a PNG/JPEG file,
or every file of a folder, sorted by name) it prints `<file name> <class>`: B's label in
[0, N-1] where B and B' agree, N = model.num_classes where they disagree (a backdoored input, the
CSAW-HackML-2020 rule).

Images are read with Pillow as RGB (grey, L, for one-channel models), must have the model's input
size unless resize=true, and get the model's input scaling (model.input_divisor). A file that is not
a readable image, has the wrong size or declares more than `limits.max_image_pixels` pixels
(checked from the header, before decoding) is reported on stderr and the others are still
classified; the exit status is then 1. Option errors (no image, empty folder, missing B') are one line, exit 2.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from defense.core import safe_files
import defense.pipeline.schemas  # noqa: F401  (registers the schema that conf/predict.yaml names)
from defense.config import check_config
from defense.core.errors import DefenseError, exit_on_user_error
from defense.reporting import terminal
from defense.data.images import ImageError, load_image

log = logging.getLogger("defense.predict")

B_PRIME_FILE = "model_B_{drop}.h5"


def list_images(image) -> list[Path]:
    """`image`: a file, or a folder whose files (not hidden, not sub-folders) are taken sorted by name."""
    if image is None or str(image) == "":
        raise DefenseError("no input: give image=<file.png> or image=<folder of PNG/JPEG images>")
    path = Path(os.fspath(image))
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)
        if not files:
            raise DefenseError(f"image={path}: the folder holds no files; give a folder of PNG/JPEG images")
        return files
    if path.is_file():
        return [path]
    raise DefenseError(f"image={path}: no such file or folder; give a PNG/JPEG file or a folder of them")


def _drop_name(drop) -> str:
    if isinstance(drop, bool):
        return str(drop)
    try:
        value = float(drop)
    except (TypeError, ValueError):
        return str(drop)
    return f"{value:g}" if math.isfinite(value) else str(drop)


def available_drops(run_dir: Path) -> list[str]:
    """The drops of the B' files in <run>/models (model_B_<drop>.h5), numbers first."""
    names = [p.name[len("model_B_") : -len(".h5")] for p in (run_dir / "models").glob("model_B_*.h5")]

    def key(name: str):  # 2, 4, 10, 30, 2_compact, 4_compact, 10_compact, ...
        match = re.match(r"(\d+(?:\.\d+)?)(.*)", name)
        return (match.group(2), float(match.group(1)), name) if match else (name, 0.0, name)

    return sorted(names, key=key)


def resolve_repaired(repaired) -> str:
    """The B' file: `repaired.path`, or <repaired.run>/models/model_B_<repaired.drop>.h5."""
    path, run, drop = repaired.get("path"), repaired.get("run"), repaired.get("drop")
    if path and run:
        raise DefenseError(
            f"repaired.path={path} and repaired.run={run} both given; give one: a B' file, or a run folder and its drop"
        )
    if path:
        if not os.path.isfile(os.fspath(path)):
            raise DefenseError(f"repaired.path={path}: no such file; give the B' .h5 (e.g. <run>/models/model_B_10.h5)")
        return os.fspath(path)
    if not run:
        raise DefenseError(
            "no repaired network: give repaired.path=<B'.h5> or repaired.run=<folder of a defense.run run> "
            "repaired.drop=<drop threshold, e.g. 10>"
        )
    run_dir = Path(os.fspath(run))
    if not (run_dir / "models").is_dir():
        raise DefenseError(
            f"repaired.run={run_dir}: no models/ folder there; give the output folder of `python -m defense.run` "
            "(it holds models/model_B_<drop>.h5)"
        )
    drops = available_drops(run_dir)
    listed = ", ".join(drops) if drops else "none (no threshold was reached in that run)"
    if drop is None or str(drop) == "":
        raise DefenseError(f"repaired.run={run_dir}: give repaired.drop=<drop>; available: {listed}")
    file = run_dir / "models" / B_PRIME_FILE.format(drop=_drop_name(drop))
    if not file.is_file():
        raise DefenseError(f"repaired.drop={drop}: {file} does not exist; available drops in {run_dir}: {listed}")
    return os.fspath(file)


def predict(cfg: DictConfig) -> tuple[list[tuple[str, int]], list[str]]:
    """Classify `cfg.image`: ([(file name, class), ...], [error line per failed file])."""
    from defense.core import metrics
    from defense.nets import models

    check_config(cfg, "predict")
    limits = safe_files.Limits.from_cfg(cfg)
    files = list_images(cfg.get("image"))
    b_prime_path = resolve_repaired(cfg.get("repaired") or {})
    shape = tuple(int(s) for s in cfg.model.input_shape)
    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise DefenseError(
            f"model.input_shape={list(shape)}: image files need an (H, W, 1) or (H, W, 3) model input"
        )
    images, names, errors = [], [], []
    for path in files:
        try:
            images.append(load_image(path, shape, bool(cfg.get("resize", False)), limits))
            names.append(path.name)
        except ImageError as err:
            errors.append(str(err))
            print(f"error: {err}", file=sys.stderr, flush=True)
    if not images:
        return [], errors
    model_b = models.load_model(cfg.model, cfg.model.get("path"), limits)
    model_bp = models.load_model(cfg.model, b_prime_path, limits)
    x = np.stack(images)
    batch = int(cfg.get("batch_size", 256))
    pred_b = models.predict_labels(model_b, x, cfg.model, batch)
    pred_bp = models.predict_labels(model_bp, x, cfg.model, batch)
    labels = metrics.repaired_labels(pred_b, pred_bp, int(cfg.model.num_classes))
    log.info("B=%s, B'=%s: %d image(s), %d flagged as backdoored (class %d), %d failed",
             cfg.model.get("path"), b_prime_path, len(names), int(np.sum(pred_b != pred_bp)),
             int(cfg.model.num_classes), len(errors))
    return list(zip(names, (int(v) for v in labels))), errors


@terminal.one_line_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@exit_on_user_error(in_sweep=terminal.in_hydra_sweep)
def main(cfg: DictConfig) -> None:
    terminal.quiet(bool(cfg.get("verbose", False)))
    results, errors = predict(cfg)
    for name, label in results:
        print(f"{name} {label}")
    sys.stdout.flush()
    if errors:
        print(f"error: {len(errors)} of {len(errors) + len(results)} file(s) could not be classified",
              file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
