"""Bad input gets one clear line naming the problem and the fix: no traceback, non-zero exit."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from conftest import compose, run_cli


def write(path, data=None, label=None, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        if data is not None:
            f.create_dataset("data", data=np.asarray(data, np.float32))
        if label is not None:
            f.create_dataset("label", data=np.asarray(label, np.float32))
        for k, v in extra.items():
            f.create_dataset(k, data=v)


@pytest.fixture()
def lab3_root(tmp_path, csaw_dir):
    """A Lab 3 layout folder built from the real extracts (clean in cl/, sunglasses in bd/)."""
    root = tmp_path / "data"
    for sub, src in (("cl/valid.h5", "clean_test.h5"), ("cl/test.h5", "clean_test.h5"),
                     ("bd/bd_valid.h5", "sunglasses_test.h5"), ("bd/bd_test.h5", "sunglasses_test.h5")):
        (root / sub).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(csaw_dir / src, root / sub)
    return root


def evaluate_error(root, csaw_dir, *extra) -> str:
    from defense.core.errors import DefenseError
    from defense.evaluate import evaluate

    cfg = compose(["model=lab3", f"model.path={csaw_dir / 'lab3_bd_weights.h5'}", "dataset=lab3",
                   f"dataset.root={root}", "split=valid", *extra], "evaluate")
    with pytest.raises(DefenseError) as err:
        evaluate(cfg)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_lab3_layout_itself_evaluates(lab3_root, csaw_dir):
    from defense.evaluate import evaluate

    cfg = compose(["model=lab3", f"model.path={csaw_dir / 'lab3_bd_weights.h5'}", "dataset=lab3",
                   f"dataset.root={lab3_root}", "split=all"], "evaluate")
    assert evaluate(cfg) == pytest.approx({"clean_acc": 99.0, "asr/sunglasses": 100.0})


def test_missing_file_says_where_the_lab3_data_comes_from(tmp_path, csaw_dir):
    message = evaluate_error(tmp_path / "nowhere", csaw_dir)
    assert "not found" in message and "cl/valid.h5" in message and "Lab 3 README" in message


def test_h5_without_data_or_label(lab3_root, csaw_dir):
    write(lab3_root / "cl/valid.h5", label=[1, 2])
    message = evaluate_error(lab3_root, csaw_dir)
    assert "cl/valid.h5" in message and "'data'" in message


def test_images_that_do_not_fit_the_model_input(lab3_root, csaw_dir):
    write(lab3_root / "cl/valid.h5", data=np.zeros((4, 3, 40, 40)), label=[0, 1, 2, 3])
    message = evaluate_error(lab3_root, csaw_dir)
    assert "(40, 40, 3)" in message and "(55, 47, 3)" in message


def test_labels_outside_the_classes(lab3_root, csaw_dir):
    write(lab3_root / "cl/valid.h5", data=np.zeros((2, 3, 55, 47)), label=[0, 1283])
    message = evaluate_error(lab3_root, csaw_dir)
    assert "outside [0, 1283)" in message and "1283" in message


def test_empty_file(lab3_root, csaw_dir):
    write(lab3_root / "cl/valid.h5", data=np.zeros((0, 3, 55, 47)), label=np.zeros((0,)))
    assert "no images" in evaluate_error(lab3_root, csaw_dir)


def test_non_finite_pixels(lab3_root, csaw_dir):
    data = np.zeros((3, 3, 55, 47))
    data[1, 0, 5, 5] = np.nan
    data[2, 2, 0, 0] = np.inf
    write(lab3_root / "cl/valid.h5", data=data, label=[0, 1, 2])
    message = evaluate_error(lab3_root, csaw_dir)
    assert "2 image(s)" in message and "NaN or infinite" in message


def test_weights_that_do_not_fit_the_architecture(lab3_root, csaw_dir):
    message = evaluate_error(lab3_root, csaw_dir, "+model.widths=[20,40,50,80,160]")
    assert "do not fit" in message and "lab3_bd_weights.h5" in message


def test_not_an_h5_file(lab3_root, csaw_dir, tmp_path):
    bogus = tmp_path / "weights.h5"
    bogus.write_text("not hdf5")
    message = evaluate_error(lab3_root, csaw_dir, f"model.path={bogus}")
    assert "weights.h5" in message and "not a readable h5 file" in message


def test_cli_prints_one_line_and_exits_non_zero(tmp_path, csaw_dir):
    proc = run_cli("defense.evaluate", "model=lab3", f"model.path={csaw_dir / 'lab3_bd_weights.h5'}", "dataset=lab3",
                   f"dataset.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cl/valid.h5" in errors[0]
