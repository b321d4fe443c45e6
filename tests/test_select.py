"""The defender's protocol (defense/pipeline/select.py, defense/core/divergence.py): the held-out split, the
defender's rule and the labelled oracle, a fine-tuning that diverges on purpose, and bad `select` input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import compose, lab3_overrides, run_cli
from oracles import holdout_split, strongest_within


def read_rows(path):
    from defense.reporting.report import read_csv

    return read_csv(path)


# ---- the rule on hand-made curves ----------------------------------------------------------------------
CURVES = [
    ([90.0, 90.0, 89.0, 86.0, 84.9, 70.0], 5.0),  # falls steadily
    ([90.0, 80.0, 88.0, 86.0, 60.0, 85.5], 5.0),  # not monotone: a later step comes back within the budget
    ([90.0, 90.0, 90.0], 0.0),  # no loss allowed: every step keeps it
    ([90.0, 70.0, 60.0], 5.0),  # only B
    ([50.0, 50.0, 45.0, 44.0], 6.0),
]


@pytest.mark.parametrize("accuracies, max_drop", CURVES)
def test_defender_rule_picks_the_strongest_setting_within_the_budget(accuracies, max_drop):
    from defense.pipeline.select import defender_index

    candidates = [{"holdout_acc": a} for a in accuracies]
    assert defender_index(candidates, accuracies[0], max_drop) == strongest_within(accuracies, accuracies[0], max_drop)


def test_a_diverged_candidate_is_never_chosen():
    from defense.pipeline.select import defender_index, oracle_index

    accuracies = [90.0, 89.0, 88.0, 89.5]
    diverged = [False, False, False, True]  # the strongest keeps its accuracy but its loss was NaN
    candidates = [{"holdout_acc": a, "diverged": d, "test_asr": asr}
                  for a, d, asr in zip(accuracies, diverged, [100.0, 50.0, 10.0, 0.0])]
    assert defender_index(candidates, 90.0, 5.0) == strongest_within(accuracies, 90.0, 5.0, diverged) == 2
    assert oracle_index(candidates, 90.0, 5.0) == 2  # the lowest test ASR among the ones that did not diverge
    assert defender_index([{"holdout_acc": float("nan")}], 90.0, 5.0) is None


def test_oracle_takes_the_lowest_test_asr_within_the_same_budget():
    from defense.pipeline.select import oracle_index

    accuracies = [90.0, 89.0, 80.0, 88.0, 87.0]
    asr = [100.0, 40.0, 0.0, 40.0, 60.0]  # step 2 has the lowest ASR but is out of the budget
    candidates = [{"holdout_acc": a, "test_asr": s} for a, s in zip(accuracies, asr)]
    within = [i for i, a in enumerate(accuracies) if 90.0 - a <= 5.0]
    expected = sorted(within, key=lambda i: (asr[i], -accuracies[i], i))[0]
    assert oracle_index(candidates, 90.0, 5.0) == expected == 1
    assert oracle_index([{"holdout_acc": 90.0, "test_asr": float("nan")}], 90.0, 5.0) is None  # no poisoned data


class Recording(dict):
    """A candidate that records every key the rule reads."""

    read: set = set()

    def __getitem__(self, key):
        Recording.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        Recording.read.add(key)
        return super().get(key, default)


def test_defender_rule_reads_only_the_held_out_accuracy():
    """A spy: the candidates carry test and poisoned scores too; the defender's rule reads none of them."""
    from defense.pipeline.select import defender_index

    Recording.read = set()
    candidates = [Recording(holdout_acc=a, test_asr=s, test_acc=t, valid_asr=v, diverged=False)
                  for a, s, t, v in [(90, 100, 88, 100), (89, 50, 80, 40), (70, 0, 60, 0)]]
    assert defender_index(candidates, 90.0, 5.0) == 1
    assert Recording.read <= {"holdout_acc", "diverged"}


def test_holdout_split_is_seeded_disjoint_and_leaves_the_poisoned_sets():
    from defense.data.arrays import LabeledImages
    from defense.pipeline.load import Split
    from defense.pipeline.select import split_holdout

    x = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1)
    clean = LabeledImages("clean", x, np.arange(50) % 7)
    poisoned = LabeledImages("p", x + 100, np.zeros(50, np.int64))
    rest, held = split_holdout(Split(clean, {"p": poisoned}), 0.2, 0)
    want_rest, want_held = holdout_split(50, 0.2, 0)
    assert list(held.x.ravel()) == list(want_held) and list(rest.clean.x.ravel()) == list(want_rest)
    assert len(held) == 10 and not set(held.x.ravel()) & set(rest.clean.x.ravel())
    assert rest.poisoned["p"] is poisoned
    other, _ = split_holdout(Split(clean, {}), 0.2, 1)
    assert list(other.clean.x.ravel()) != list(want_rest)


# ---- the divergence rule ----------------------------------------------------------------------------
def test_divergence_rule():
    from defense.core.divergence import divergence

    assert divergence(0.3, 90.0, 10) is None
    assert "loss is nan" in divergence(float("nan"), 90.0, 10)
    assert "loss is inf" in divergence(float("inf"))
    assert "at chance" in divergence(0.3, 10.0, 10)  # one class of ten
    assert divergence(0.3, 16.0, 10) is None
    assert "at chance" in divergence(None, 0.0, 1283)
    assert divergence(None, None, None) is None


# ---- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("select.max_drop=-1", "select.max_drop=-1 must be an accuracy loss in points >= 0"),
    ("select.holdout=0", "select.holdout=0 must be a fraction of the clean validation images in (0, 1)"),
    ("select.holdout=1", "select.holdout=1 must be a fraction"),
    ("select.holdout=1.5", "select.holdout=1.5 must be a fraction"),
    ("finetune.grid.epochs=[]", "finetune.grid.epochs=[] is empty"),
    ("finetune.grid.learning_rate=[]", "finetune.grid.learning_rate=[] is empty"),
    ("finetune.grid.learning_rate=null finetune.grid.epochs=[5]",
     "finetune.grid.epochs is given without finetune.grid.learning_rate"),
])
def test_bad_select_input_is_one_error_naming_the_key(override, message):
    from defense.core.errors import DefenseError
    from defense.pipeline import stages

    cfg = compose(lab3_overrides("defense=fine_pruning", *override.split()))
    with pytest.raises(DefenseError) as err:
        stages.check_config(cfg, "run")
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("overrides", [["finetune.grid.learning_rate=[0.01,0.001]", "finetune.grid.epochs=[10]"],
                                       ["finetune.grid={learning_rate:[0.01,0.001],epochs:[10]}"]])
def test_a_grid_is_set_on_a_preset_without_one(overrides):
    """finetune=sgd_cosine has no grid; either override form gives it one (weakest first)."""
    from defense.pipeline.finetune import finetune_settings

    assert finetune_settings(compose(["finetune=sgd_cosine"]).finetune)["grid"] == [(0.05, 30)]
    cfg = compose(["finetune=sgd_cosine", *overrides])
    assert finetune_settings(cfg.finetune)["grid"] == [(0.001, 10), (0.01, 10)]


def test_cli_bad_select_is_one_line_exit_2(tmp_path):
    proc = run_cli("defense.run", *lab3_overrides("select.max_drop=-1"), "tracking=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "select.max_drop=-1" in errors[0] and "e.g. select.max_drop=5" in errors[0]
    assert not (tmp_path / "summary.csv").exists()


# ---- a fine-tuning made to diverge, spied on ------------------------------------------------------------
def _rows(x) -> set[bytes]:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return {r.tobytes() for r in x.reshape(len(x), -1)}


@pytest.fixture(scope="module")
def diverging_run(csaw_dir, tmp_path_factory):
    """defense=fine_pruning on the Lab 3 extracts: the drop rows fine-tuned at a learning rate of 1000 (it
    diverges), the defender's grid [1e-5, 1000] x 1 epoch; fine_tune, the held-out scoring and the rule spied on."""
    from defense.pipeline import finetune, select
    from defense.run import run_defense

    trained, scored, read = [], [], set()
    fine_tune, holdout_accuracy, defender_index = finetune.fine_tune, finetune.holdout_accuracy, select.defender_index

    def spy_fine_tune(cfg, b_prime, pruned, valid_clean, tracker, name, **bn):
        trained.append(np.array(valid_clean.x))
        return fine_tune(cfg, b_prime, pruned, valid_clean, tracker, name, **bn)

    def spy_holdout(cfg, network, holdout, batch_size):
        scored.append(np.array(holdout.x))
        return holdout_accuracy(cfg, network, holdout, batch_size)

    def spy_rule(candidates, base_acc, max_drop):
        Recording.read = set()
        index = defender_index([Recording(c) for c in candidates], base_acc, max_drop)
        read.update(Recording.read)
        return index

    mp = pytest.MonkeyPatch()
    mp.setattr(finetune, "fine_tune", spy_fine_tune)
    mp.setattr(finetune, "holdout_accuracy", spy_holdout)
    mp.setattr(select, "defender_index", spy_rule)
    try:
        out = tmp_path_factory.mktemp("diverging")
        cfg = compose(lab3_overrides("defense=fine_pruning", "tracking=none", "prune.drops=[4]", "finetune.epochs=1",
                                     "finetune.learning_rate=1000", "finetune.shift=0",
                                     "finetune.grid.learning_rate=[0.00001,1000]", "finetune.grid.epochs=[1]"))
        result = run_defense(cfg, out)
    finally:
        mp.undo()
    return cfg, out, result, {"trained": trained, "scored": scored, "read": read}


def test_a_diverged_fine_tuning_is_marked_not_reported_and_not_chosen(diverging_run):
    cfg, out, result, _ = diverging_run
    rows = {r["point"]: r for r in read_rows(out / "summary.csv")}
    drop = rows["drop"]
    # diverged by the rule, computed here: a NaN loss (written blank) or held-out clean accuracy at <= 1.5 x chance
    assert drop["diverged"] == "True"
    assert drop["ft_final_loss"] == "" or float(drop["ft_holdout_acc"]) <= 1.5 * 100.0 / 1283
    for key in ("ft_test_acc", "ft_test_asr", "ft_der", "ft_g_test_acc", "ft_g_test_asr"):
        assert drop[key] == "", key  # no score of a diverged network is reported
    defender = rows["defender"]
    assert defender["diverged"] == "False" and float(defender["ft_learning_rate"]) == pytest.approx(1e-5)
    assert float(defender["ft_holdout_acc"]) >= float(defender["base_holdout_acc"]) - 5.0
    assert defender["ft_test_acc"] != ""
    grid = [r for r in read_rows(out / "select_finetune.csv") if r["point"] == "defender"]
    assert [(float(r["learning_rate"]), r["diverged"], r["chosen"]) for r in grid] == [(1e-5, "False", "True"),
                                                                                       (1000.0, "True", "False")]
    oracle = rows["oracle_test_asr"]
    assert oracle["oracle"] == "True" and float(oracle["ft_learning_rate"]) == pytest.approx(1e-5)
    # the run finished with its files; the table marks the diverged row and the oracle
    for name in ("summary.csv", "results.md", "curves.csv", "select.csv", "models/model_B_4_ft.h5",
                 "models/model_B_defender_ft.h5"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert "acc_drop_4% DIVERGED" in table and "ORACLE" in table


def test_the_defender_sees_no_poisoned_or_test_data_and_trains_on_no_held_out_image(diverging_run):
    from defense.pipeline.load import load_split

    cfg, out, result, spied = diverging_run
    valid = load_split(cfg.dataset, cfg.model, "valid")
    test = load_split(cfg.dataset, cfg.model, "test")
    rest, held = holdout_split(len(valid.clean))
    held_rows, rest_rows = _rows(valid.clean.x[held]), _rows(valid.clean.x[rest])
    forbidden = set()
    for images in [test.clean, *test.poisoned.values(), *valid.poisoned.values()]:
        forbidden |= _rows(images.x)
    # one fine-tuning per distinct (B', setting): the drop row (lr 1000 x 1 epoch), and each point's candidates
    # that ran; the pruned channels are a prefix of the one ranking, so their count names the B'
    points = {r["point"]: r for r in read_rows(out / "summary.csv")}
    distinct = {(points["drop"]["channels_pruned"], 1000.0, 1)}
    for r in read_rows(out / "select_finetune.csv"):
        if r["skipped"] == "False":
            distinct.add((points[r["point"]]["channels_pruned"], float(r["learning_rate"]), int(r["epochs"])))
    assert len(spied["trained"]) == len(distinct) <= 1 + 2 + 2
    for x in spied["trained"]:
        assert _rows(x) == rest_rows  # the rest of the clean validation images, no held-out, test or poisoned one
    assert spied["scored"] and all(_rows(x) == held_rows for x in spied["scored"])
    assert not held_rows & forbidden
    assert spied["read"] and spied["read"] <= {"holdout_acc", "diverged"}


# ---- the Lab 3 preset: no collapsed network is reported --------------------------------------------------
def test_fine_pruning_on_lab3_reports_no_network_below_half_clean_accuracy(csaw_dir, tmp_path):
    """defense=fine_pruning (30 epochs at 0.05) collapses the Lab 3 network on 40 faces: every such B'' is marked
    diverged, the defender keeps within its budget, and no defense result below 50 % clean accuracy is reported."""
    from defense.analysis.runs import defended_scores
    from defense.run import run_defense

    result = run_defense(compose(lab3_overrides("defense=fine_pruning", "tracking=none")), tmp_path)
    rows = read_rows(tmp_path / "summary.csv")
    base = result["curves"][0]
    for row in rows:
        if row["diverged"] == "True":
            assert row["ft_test_acc"] == "" and row["ft_g_test_acc"] == ""
        scores = defended_scores(row, base["pruned_test_acc"], base["pruned_test_asr"])
        if scores is not None and row["oracle"] == "False":
            assert scores["test_acc"] >= 50.0, row
    defender = next(r for r in rows if r["point"] == "defender")
    assert defender["reached"] == "True" and defender["diverged"] == "False"
    held = float(defender["ft_holdout_acc"]) if defender.get("ft_holdout_acc") else float(defender["holdout_acc"])
    assert float(defender["base_holdout_acc"]) - held <= 5.0
    assert math.isfinite(held)


# ---- shared fine-tunings equal unshared ones --------------------------------------------------------------
def test_shared_fine_tunings_give_the_same_rows_as_running_every_one(csaw_dir, tmp_path):
    """defense=fine_tuning fine-tunes one B' (nothing pruned) for the drop-0 row and for every candidate of the
    defender's and the oracle's grids: run once per setting and shared, the summary equals running all of them."""
    import functools

    from defense.pipeline import finetune
    from defense.run import run_defense

    calls = {}
    plain = finetune.fine_tune

    def counting(*args, **kwargs):
        calls[mode] = calls.get(mode, 0) + 1
        return plain(*args, **kwargs)

    overrides = lab3_overrides("defense=fine_tuning", "tracking=none", "finetune.epochs=2", "finetune.shift=1",
                               "finetune.learning_rate=0.01", "finetune.grid.learning_rate=[0.0001,0.01]",
                               "finetune.grid.epochs=[1,2]", "select.max_drop=100")
    rows = {}
    mp = pytest.MonkeyPatch()
    mp.setattr(finetune, "fine_tune", counting)
    try:
        for mode in ("shared", "every"):
            if mode == "every":
                mp.setattr(finetune, "finetune_thresholds",
                           functools.partial(finetune.finetune_thresholds, share=False))
            run_defense(compose(overrides), tmp_path / mode)
            rows[mode] = read_rows(tmp_path / mode / "summary.csv")
    finally:
        mp.undo()
    # every run: the drop-0 row and 4 candidates for each of the two points (a budget of 100 points skips none);
    # shared: the 4 candidates once, the drop-0 row being the candidate 0.01 x 2
    assert calls == {"every": 1 + 4 + 4, "shared": 4}
    assert [r["point"] for r in rows["shared"]] == [r["point"] for r in rows["every"]] == \
        ["drop", "defender", "oracle_test_asr"]
    for shared, every in zip(rows["shared"], rows["every"]):
        for key in every:
            if key.endswith("_path"):
                continue
            assert shared[key] == every[key], (every["point"], key)
