"""The same config run twice gives byte-identical curves, summary and B' / B'' weights (on CPU)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import lab3_overrides, run_cli

# a tiny fine-pruning run on the real Lab 3 extracts: two thresholds, two epochs with the shift
# augmentation and a holdout (every random draw of the fine-tuning is used)
TINY = ["finetune=clean", "finetune.epochs=2", "finetune.shift=2", "finetune.holdout=0.2", "prune.drops=[2,30]", "stop=max_drop",
        "tracking=none", "compact=false"]


def weight_arrays(path: Path) -> dict[str, bytes]:
    """Every weight array of a saved Keras .h5 (the `model_weights` group), as raw bytes, by its h5 path.

    (The optimizer state that Keras saves beside them is named after a process-wide counter, adam,
    adam_1, ..., so it is left out.)
    """
    arrays: dict[str, bytes] = {}
    with h5py.File(path, "r") as f:
        def visit(name, node):
            if isinstance(node, h5py.Dataset):
                arrays[name] = np.asarray(node[()]).tobytes()
        f["model_weights"].visititems(visit)
    return arrays


@pytest.fixture(scope="module")
def two_runs(csaw_dir, tmp_path_factory):
    """`python -m defense.run` twice with the same config, as two processes (different hash seeds)."""
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"same_config_{i}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONHASHSEED", str(i + 1))
            proc = run_cli("defense.run", *lab3_overrides(*TINY), f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(out)
    return outs


def test_curves_and_summary_are_byte_identical(two_runs):
    first, second = two_runs
    for name in ("curves.csv", "summary.csv", "pruning_order.txt"):
        # summary.csv names the model files, which lie in each run's own folder
        a = (first / name).read_bytes().replace(bytes(first), b"<run>")
        b = (second / name).read_bytes().replace(bytes(second), b"<run>")
        assert a and a == b, name
    assert b"<run>/models/model_B_2_ft.h5" in (first / "summary.csv").read_bytes().replace(bytes(first), b"<run>")


def test_pruned_and_fine_tuned_weights_are_byte_identical(two_runs):
    first, second = two_runs
    files = sorted(p.name for p in (first / "models").glob("model_B_*.h5"))
    # the drops' B' and B'', and the defender's and the oracle's points (defense/pipeline/select.py)
    assert {"model_B_2.h5", "model_B_2_ft.h5", "model_B_30.h5", "model_B_30_ft.h5"} <= set(files)
    assert files == sorted(p.name for p in (second / "models").glob("model_B_*.h5"))
    for name in files:
        a, b = weight_arrays(first / "models" / name), weight_arrays(second / "models" / name)
        assert a and a.keys() == b.keys(), name
        assert [k for k in a if a[k] != b[k]] == [], name
    # the fine-tuning did change the weights (the comparison above is not between two copies of B')
    pruned, tuned = weight_arrays(first / "models" / "model_B_2.h5"), weight_arrays(first / "models" / "model_B_2_ft.h5")
    assert any(pruned[k] != tuned[k] for k in pruned.keys() & tuned.keys())
