"""`defense.run` pruning several conv layers at once, on the embedded BadNet scenario: the global ranking,
`prune.eval_steps`, channel_scores.csv, pruned.json, B' / B'' / compact models of several layers, a
criterion's own operating point, and bad `prune.layer` values."""

from __future__ import annotations

import csv
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
from oracles import holdout_split
from oracles import accuracy_per_step, set_weights_predictions_pairs

from conftest import compose, run_cli


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def scenario(overrides=()):
    """The embedded scenario's config, network and data (built once per test session, then cached)."""
    from defense.pipeline import load as datasets
    from defense.nets import models

    cfg = compose(["progress=false", *overrides])
    model = models.load_model(cfg.model, datasets.resolve_model_path(cfg.model, cfg.dataset))
    valid = datasets.load_split(cfg.dataset, cfg.model, "valid")
    test = datasets.load_split(cfg.dataset, cfg.model, "test")
    rest, _ = holdout_split(len(valid.clean))  # select.holdout: the run's valid_acc is on the other images
    valid.clean = valid.clean.subset(rest)
    return cfg, model, valid, test


def l1_global_order(model, layers):
    """Ascending L1 norm of every (layer, channel) kernel, over all layers (numpy; ties: layer, then channel)."""
    pairs, norms = [], []
    for name in layers:
        kernel = np.asarray(model.get_layer(name).get_weights()[0], np.float64)
        n = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
        pairs += [(name, c) for c in range(len(n))]
        norms += list(n)
    return [pairs[i] for i in np.argsort(norms, kind="stable")]


def zeroed(model, pruned: dict) -> dict:
    """{layer: channels whose kernel and bias are all zero} of a saved network."""
    out = {}
    for name in pruned:
        kernel, bias = model.get_layer(name).get_weights()
        out[name] = [int(c) for c in np.flatnonzero(~np.any(kernel.reshape(-1, kernel.shape[-1]), axis=0) & (bias == 0))]
    return out


@pytest.fixture(scope="module")
def l1_two_layers(tmp_path_factory):
    from defense.run import run_defense

    out = tmp_path_factory.mktemp("two_layers")
    overrides = ["prune.criterion=l1", "prune.layer=[conv_2,conv_4]", "prune.eval_steps=7", "prune.drops=[2,10]",
                 "tracking=none", "compact=false", "progress=false"]
    result = run_defense(compose(overrides), out / "run")
    return result, out / "run"


def test_several_layers_rank_globally_and_evaluate_evenly_spaced_steps(l1_two_layers):
    """The global L1 order (numpy), 7 evenly spaced steps over 120 pairs, and every curve value against the
    set_weights + predict loop at those steps."""
    from defense.nets import models

    result, run = l1_two_layers
    cfg, model, valid, test = scenario()
    order = l1_global_order(model, ["conv_2", "conv_4"])
    assert [tuple(p) for p in result["order"]] == order
    assert (run / "pruning_order.txt").read_text().split() == [f"{n}:{c}" for n, c in order]
    curves = read_rows(run / "curves.csv")
    steps = [int(r["channels_pruned"]) for r in curves]
    assert steps == [0, 20, 40, 60, 80, 100, 120]  # round(linspace(0, 40 + 80, 7))
    columns = {"valid_acc": valid.clean, "valid_asr": valid.poisoned["square"], "pruned_test_acc": test.clean}
    x = models.scale_inputs(np.concatenate([images.x for images in columns.values()]), cfg.model)
    labels = set_weights_predictions_pairs(model, x, order, steps)  # one clone and predict per step
    start = 0
    for key, images in columns.items():
        expected = accuracy_per_step(labels[start : start + len(images.x)], images.y)
        start += len(images.x)
        np.testing.assert_allclose([float(r[key]) for r in curves], expected, atol=1e-3, err_msg=key)
        if key == "valid_acc":
            acc = expected
    summary = [r for r in read_rows(run / "summary.csv") if r["point"] == "drop"]
    for row in summary:  # the first evaluated step whose clean valid accuracy fell by the drop (hand rule)
        drop = float(row["drop"])
        hit = [s for s, a in zip(steps, acc) if acc[0] - a >= drop - 1e-9]
        assert (row["reached"] == "True") == bool(hit)
        if hit:
            assert int(row["channels_pruned"]) == hit[0] and row["point"] == "drop"


def test_channel_scores_and_pruned_json_list_every_kept_network(l1_two_layers):
    from defense.nets import models

    result, run = l1_two_layers
    cfg, model, _, _ = scenario()
    order = l1_global_order(model, ["conv_2", "conv_4"])
    rows = read_rows(run / "channel_scores.csv")
    assert list(rows[0]) == ["layer", "channel", "score", "rank"] and len(rows) == 40 + 80
    rank = {pair: i for i, pair in enumerate(order)}
    for row in rows:
        layer, channel = row["layer"], int(row["channel"])
        assert int(row["rank"]) == rank[(layer, channel)]
        kernel = model.get_layer(layer).get_weights()[0]
        assert float(row["score"]) == pytest.approx(np.abs(kernel[..., channel].astype(np.float64)).sum(), rel=1e-12)
    pruned = json.loads((run / "pruned.json").read_text())
    reached = [r for r in read_rows(run / "summary.csv") if r["reached"] == "True"]
    names = {"defender": ("defender", "defender"), "oracle_test_asr": ("oracle_test_asr", "oracle")}
    keys = [names[r["point"]] if r["point"] in names else (f"drop_{float(r['drop']):g}", f"{float(r['drop']):g}")
            for r in reached]
    assert reached and sorted(pruned) == sorted(k for k, _ in keys)
    assert {"defender", "oracle_test_asr"} <= set(pruned)
    for row, (key, file_key) in zip(reached, keys):
        n = int(row["channels_pruned"])
        expected = {name: sorted(c for layer, c in order[:n] if layer == name) for name in ("conv_2", "conv_4")}
        assert pruned[key] == expected
        path = run / "models" / f"model_B_{file_key}.h5"
        assert zeroed(models.load_model(cfg.model, str(path)), expected) == expected  # B' has exactly those zeroed


def test_evaluated_steps_by_hand():
    from omegaconf import OmegaConf

    from defense.core.errors import DefenseError
    from defense.pruning.steps import evaluated_steps

    every = OmegaConf.create({"rule": "all"})
    assert list(evaluated_steps(every, 60, None)) == list(range(61))  # one layer: every step
    assert list(evaluated_steps(every, 100, None, several_layers=True)) == list(range(101))
    assert list(evaluated_steps(every, 200, None, several_layers=True)) == list(range(0, 201, 2))  # 101 steps
    assert list(evaluated_steps(every, 200, 5, several_layers=True)) == [0, 50, 100, 150, 200]
    assert list(evaluated_steps(every, 10, 4)) == [0, 3, 7, 10]  # round(0, 3.33, 6.67, 10)
    assert list(evaluated_steps(every, 3, 50)) == [0, 1, 2, 3]
    assert list(evaluated_steps(OmegaConf.create({"rule": "fraction", "fraction": 0.5}), 200, 3)) == [0, 50, 100]
    for bad in (1, 0, -3, True, 2.5, "10"):
        with pytest.raises(DefenseError, match="prune.eval_steps"):
            evaluated_steps(every, 60, bad)


def fixed_criterion(op):
    """A criterion module (the interface of defense/criteria/__init__.py): L1 scores, pruned highest first, an
    operating point `op`, an extra column and a history; data-free."""
    from defense.criteria import Scores
    from defense.criteria.l1 import kernel_l1

    def score(model, layers, clean, cfg, divisor):
        assert clean is None  # data-free criteria are given no data
        values = {name: kernel_l1(model.get_layer(name).get_weights()[0]) for name in layers}
        mask = {name: np.where(np.isin(np.arange(len(v)), op.get(name, [])), 0.0, 1.0) for name, v in values.items()}
        return Scores(values, prune_first="high", operating_point=op, columns={"mask": mask},
                      history=[{"step": 0, "loss": 2.5}, {"step": 10, "loss": 1.25}])

    return types.SimpleNamespace(NEEDS_DATA=False, score=score)


def test_a_criterion_with_its_own_operating_point(tmp_path, monkeypatch):
    """The operating point's summary row (B' on valid, G(B, B') on test) against the set_weights loop; its
    pruned.json entry, B', fine-tuned B'' and compact model keep exactly its channels pruned."""
    from defense import criteria
    from defense.nets import models
    from defense.run import run_defense

    op = {"conv_3": [2, 7, 11], "conv_4": [0, 5]}
    real_get = criteria.get
    monkeypatch.setattr(criteria, "get", lambda name: fixed_criterion(op) if name == "fixed" else real_get(name))
    overrides = ["prune.criterion=fixed", "prune.layer=[conv_3,conv_4]", "prune.drops=[]", "prune.eval_steps=5",
                 "stop=fraction", "stop.fraction=0.25", "finetune=clean", "finetune.epochs=1", "tracking=none"]
    result = run_defense(compose(["progress=false", *overrides]), tmp_path)
    cfg, model, valid, test = scenario()

    summary = read_rows(tmp_path / "summary.csv")
    (row,) = [r for r in summary if r["point"] == "operating_point"]
    pairs = [(name, c) for name, channels in op.items() for c in channels]
    sets = [("valid_acc", valid.clean, False), ("valid_asr", valid.poisoned["square"], False),
            ("test_acc", test.clean, True), ("test_asr", test.poisoned["square"], True)]
    x = models.scale_inputs(np.concatenate([images.x for _, images, _ in sets]), cfg.model)
    labels = set_weights_predictions_pairs(model, x, pairs, [0, len(pairs)])  # B, B'
    start = 0
    for key, images, repaired in sets:
        part = labels[start : start + len(images.x)]
        start += len(images.x)
        if repaired:  # G(B, B'): B's label where B and B' agree, num_classes (10) where they differ
            part = np.where(part == part[:, :1], part[:, :1], 10)
        assert float(row[key]) == pytest.approx(accuracy_per_step(part, images.y)[1], abs=1e-3), key
    assert int(row["channels_pruned"]) == 5 and row["drop"] == ""
    assert float(row["fraction_pruned"]) == pytest.approx(100 * 5 / (60 + 80), abs=1e-3)
    assert row["ft_der"] != ""  # B'' of the operating point was fine-tuned and scored

    assert json.loads((tmp_path / "pruned.json").read_text())["operating_point"] == op
    models_dir = tmp_path / "models"
    for name in ("model_B_op.h5", "model_B_op_ft.h5"):
        assert zeroed(models.load_model(cfg.model, str(models_dir / name)), op) == op, name
    compact = models.load_model(cfg.model, str(models_dir / "model_B_op_ft_compact.h5"))
    assert [compact.get_layer(n).filters for n in op] == [60 - 3, 80 - 2]

    scores = read_rows(tmp_path / "channel_scores.csv")
    assert list(scores[0]) == ["layer", "channel", "score", "rank", "mask"]
    assert {(r["layer"], int(r["channel"])) for r in scores if float(r["mask"]) == 0} == set(pairs)
    top = min(scores, key=lambda r: int(r["rank"]))  # prune_first="high": the largest score has rank 0
    assert float(top["score"]) == max(float(r["score"]) for r in scores)
    history = read_rows(tmp_path / "fixed_history.csv")
    assert [(int(r["step"]), float(r["loss"])) for r in history] == [(0, 2.5), (10, 1.25)]
    assert [int(r["channels_pruned"]) for r in result["curves"]] == [0, 9, 18, 26, 35]  # 35 = ceil(0.25 * 140)


@pytest.mark.parametrize(
    "layer,expected",
    [
        ("[conv_3,conv_9]", "the model has no layer 'conv_9'"),
        ("[]", "lists no layer"),
        ("[conv_3,fc_1]", "not a channels-last Conv2D"),
        ("[conv_3,conv_3]", "lists conv_3 twice"),
    ],
)
def test_bad_layer_lists_fail_before_any_run_is_logged(tmp_path, layer, expected):
    from defense.core.errors import DefenseError
    from defense.run import run_defense

    db = tmp_path / "mlflow.db"
    with pytest.raises(DefenseError, match=re.escape(expected)) as err:
        run_defense(compose([f"prune.layer={layer}", f"tracking.uri=sqlite:///{db}", "progress=false"]), tmp_path / "run")
    assert "prune.layer" in str(err.value)
    assert not db.exists() and not list((tmp_path / "run").glob("*.csv"))


def test_cli_unknown_layer_in_the_list_is_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = run_cli("defense.run", "prune.layer=[conv_3,conv_9]", f"tracking.uri=sqlite:///{db}", "progress=false",
                   f"hydra.run.dir={tmp_path / 'run'}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert "the model has no layer 'conv_9'" in errors[0] and "conv_1" in errors[0]  # lists the Conv2D layers there are
    assert not db.exists()


def test_layer_lists_are_taken_in_model_order_and_all_needs_a_conv_layer():
    import keras

    from defense.core.errors import DefenseError
    from defense.pipeline.sweep import pruned_layers

    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(3, 3, name="c1")(inp)
    h = keras.layers.Conv2D(4, 3, name="c2")(h)
    out = keras.layers.Dense(2, name="d")(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    assert pruned_layers(compose(["prune.layer=[c2,c1]"]), model) == ["c1", "c2"]
    assert pruned_layers(compose(["prune.layer=all"]), model) == ["c1", "c2"]
    assert pruned_layers(compose(["prune.layer=[c2]"]), model) == ["c2"]
    dense_only = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="d")])
    with pytest.raises(DefenseError, match="prune.layer=all: .* has no Conv2D layer to prune"):
        pruned_layers(compose(["prune.layer=all"]), dense_only)
