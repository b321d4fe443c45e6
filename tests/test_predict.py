"""`python -m defense.predict` on PNG files of the real CSAW-HackML faces, with the Lab 3
network B and its B' from the 10-point accuracy-drop threshold of a real `defense.run` run.

Runs on ../shared/data/csaw (no skipping: missing data is a failure).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from defense.nets.architectures.deepid import build_deepid

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "csaw"
WEIGHTS = DATA / "lab3_bd_weights.h5"
N_CLASSES = 1283
MODEL_ARGS = ["model=lab3", f"model.path={WEIGHTS}"]


def _faces(name: str) -> np.ndarray:
    """(N, 55, 47, 3) uint8 faces; the extracts hold integral 0..255 values, so PNG round trips are exact."""
    with h5py.File(DATA / name, "r") as f:
        x = np.transpose(np.asarray(f["data"][()], np.float64), (0, 2, 3, 1))
    assert np.all(x == np.round(x)) and x.min() >= 0 and x.max() <= 255
    return x.astype(np.uint8)


def _cli(*args: str, tmp: Path):
    """Run `python -m defense.predict` from the repository root; its Hydra folder goes under `tmp`."""
    cmd = [sys.executable, "-m", "defense.predict", *args, f"hydra.run.dir={tmp / 'hydra'}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real pruning run of the Lab 3 network on the extracts (writes models/model_B_10.h5)."""
    from defense.run import run_defense

    out = tmp_path_factory.mktemp("run")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*MODEL_ARGS, "dataset=csaw_extract", f"dataset.root={DATA}",
                                           "tracking=none", "progress=false"])
    run_defense(cfg, out)
    assert (out / "models" / "model_B_10.h5").is_file()
    return out


@pytest.fixture(scope="module")
def faces():
    return {"clean": _faces("clean_test.h5"), "sunglasses": _faces("sunglasses_test.h5")}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, faces):
    """clean_000.png .. sunglasses_099.png, plus a file that is no image and one of the wrong size."""
    folder = tmp_path_factory.mktemp("faces")
    for kind, x in faces.items():
        for i, face in enumerate(x):
            Image.fromarray(face, "RGB").save(folder / f"{kind}_{i:03d}.png")
    (folder / "broken.png").write_text("this is not an image\n")
    Image.fromarray(faces["clean"][0]).resize((40, 40)).save(folder / "small.png")
    return folder


@pytest.fixture(scope="module")
def expected(run_dir, faces):
    """The G(B, B') line of every face, from Keras directly: B = DeepID + the weights, B' = the saved file."""
    b = build_deepid()
    b.load_weights(str(WEIGHTS))
    b_prime = keras.models.load_model(str(run_dir / "models" / "model_B_10.h5"), compile=False)
    lines, stats = [], {}
    for kind, x in faces.items():
        pb = np.argmax(b.predict(x.astype(np.float32), verbose=0), -1)
        pbp = np.argmax(b_prime.predict(x.astype(np.float32), verbose=0), -1)
        stats[kind] = (pb, pbp)
        lines += [f"{kind}_{i:03d}.png {pb[i] if pb[i] == pbp[i] else N_CLASSES}" for i in range(len(x))]
    return lines, stats


def test_folder_prints_g_of_b_and_b_prime_and_reports_bad_files(run_dir, image_dir, expected, tmp_path):
    lines, stats = expected
    result = _cli(*MODEL_ARGS, f"repaired.run={run_dir}", "repaired.drop=10", f"image={image_dir}", tmp=tmp_path)
    out = result.stdout.splitlines()
    assert out == lines, result.stderr
    got = {line.split()[0]: int(line.split()[1]) for line in out}
    # clean faces: B's identity where B and B' agree; sunglasses faces: N wherever they disagree
    pb, pbp = stats["clean"]
    for i in np.flatnonzero(pb == pbp):
        assert got[f"clean_{i:03d}.png"] == pb[i]
    assert np.sum(pb == pbp) >= 50
    pb, pbp = stats["sunglasses"]
    for i in np.flatnonzero(pb != pbp):
        assert got[f"sunglasses_{i:03d}.png"] == N_CLASSES
    assert all(0 <= v <= N_CLASSES for v in got.values())
    # the unreadable and the wrongly sized file are named on stderr, the others all printed, exit non-zero
    assert result.returncode == 1
    err = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any("broken.png" in line and "not a readable image" in line for line in err), result.stderr
    assert any("small.png" in line and "40x40" in line and "47x55" in line and "resize=true" in line for line in err)
    assert "Traceback" not in result.stderr


def test_user_errors_are_one_line_exit_2(run_dir, image_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "no such file or folder": [f"image={tmp_path / 'missing'}", f"repaired.run={run_dir}", "repaired.drop=10"],
        "holds no files": [f"image={empty}", f"repaired.run={run_dir}", "repaired.drop=10"],
        "available drops": [f"image={image_dir}", f"repaired.run={run_dir}", "repaired.drop=11"],
    }
    for message, args in cases.items():
        result = _cli(*MODEL_ARGS, *args, tmp=tmp_path)
        err = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
        assert any(line.startswith("error:") and message in line for line in err), result.stderr
        if message == "available drops":
            assert "2, 4, 10, 30" in result.stderr and "model_B_11.h5" in result.stderr


def _predict_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("predict", overrides=[*MODEL_ARGS, *overrides])


def test_compact_b_prime_and_single_file(run_dir, image_dir, expected):
    """The runner's compact B' gives the same G; a single file is classified alone."""
    from defense.predict import predict

    lines, _ = expected
    compact = run_dir / "models" / "model_B_10_compact.h5"
    assert compact.is_file()
    results, errors = predict(_predict_cfg(f"repaired.path={compact}", f"image={image_dir}"))
    assert [f"{name} {label}" for name, label in results] == lines
    assert sorted(Path(e.split(":")[0]).name for e in errors) == ["broken.png", "small.png"]
    results, errors = predict(_predict_cfg(f"repaired.path={compact}", f"image={image_dir / 'sunglasses_007.png'}"))
    assert [f"{name} {label}" for name, label in results] == [lines[107]] and errors == []


def test_resize_true_resizes(run_dir, image_dir, faces, tmp_path):
    from defense.predict import predict

    big = tmp_path / "big.jpg"
    Image.fromarray(faces["clean"][3]).resize((94, 110)).save(big)
    results, errors = predict(_predict_cfg(f"repaired.run={run_dir}", "repaired.drop=10", f"image={big}",
                                           "resize=true"))
    assert errors == [] and len(results) == 1
    x = np.asarray(Image.open(big).convert("RGB").resize((47, 55), Image.BILINEAR), np.float32)[None]
    b = build_deepid()
    b.load_weights(str(WEIGHTS))
    bp = keras.models.load_model(str(run_dir / "models" / "model_B_10.h5"), compile=False)
    pb, pbp = np.argmax(b.predict(x, verbose=0), -1)[0], np.argmax(bp.predict(x, verbose=0), -1)[0]
    assert results[0] == ("big.jpg", int(pb if pb == pbp else N_CLASSES))
    _, errors = predict(_predict_cfg(f"repaired.run={run_dir}", "repaired.drop=10", f"image={big}"))
    assert len(errors) == 1 and "94x110" in errors[0] and "resize=true" in errors[0]
