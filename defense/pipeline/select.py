"""The defender's operating point: one rule for every defense, on clean data the defense never learnt from.

Held-out images. Before any stage reads the clean validation data, the `load` stage takes a seeded
`select.holdout` fraction of it aside (`split_holdout`): RunContext.valid keeps the rest, which the
ranking, every criterion's learning (ANP, RNP), the accuracy-drop thresholds and the fine-tuning (its own
early-stopping holdout included) use, and RunContext.holdout holds the held-out images, which only the
scoring of candidate settings here reads. The poisoned validation sets stay as they are: they are only
reported (valid ASR), never read by a choice.

The rule (`defender_index`). A defense's strength knob has candidate settings, weakest first (the number
of channels pruned along the sweep's evaluated steps; a fine-tuning grid of learning rate x epochs). The
defender's point is the strongest candidate whose held-out clean accuracy is at most `select.max_drop`
points below B's held-out clean accuracy and that did not diverge (defense/core/divergence.py). It reads
nothing else: no poisoned data, no test data.

The oracle (`oracle_index`), for comparison only and labelled as such (`oracle: true`): among the same
candidates within the same budget, the one of lowest TEST attack success rate, as BackdoorBench selects
its pruning (defense/anp.py, defense/rnp.py). A defender cannot compute it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from defense.core.errors import DefenseError

log = logging.getLogger("defense.select")

DEFENDER = "defender"
ORACLE = "oracle_test_asr"
POINTS = (DEFENDER, ORACLE)
FILE_KEYS = {DEFENDER: "defender", ORACLE: "oracle"}  # models/model_B_<key>.h5
DEFAULTS = {"holdout": 0.2, "max_drop": 5.0, "seed": 0}


def settings(cfg) -> dict:
    """`select` with its defaults (a config without the group: the defaults), checked."""
    from defense.config import check_select

    given = cfg.get("select") or {}
    check_select(given)
    return {"holdout": float(given.get("holdout", DEFAULTS["holdout"])),
            "max_drop": float(given.get("max_drop", DEFAULTS["max_drop"])),
            "seed": int(given.get("seed", DEFAULTS["seed"]))}


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held out): index arrays of n images, ascending; round(n * fraction) held out (at least 1, at most
    n - 1), drawn by a seeded permutation (numpy default_rng(seed))."""
    if n < 2:
        raise DefenseError(f"select.holdout needs at least 2 clean validation images to hold some out; the split has {n}")
    n_hold = min(n - 1, max(1, int(round(n * fraction))))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def split_holdout(valid, fraction: float, seed: int):
    """(valid with the rest of its clean images, the held-out clean images); the poisoned sets unchanged."""
    from defense.pipeline.load import Split

    rest, held = holdout_indices(len(valid.clean), fraction, seed)
    return Split(valid.clean.subset(rest), dict(valid.poisoned)), valid.clean.subset(held)


def within_budget(candidate: dict, base_acc: float, max_drop: float) -> bool:
    acc = float(candidate.get("holdout_acc", float("nan")))
    return (not candidate.get("diverged")) and math.isfinite(acc) and base_acc - acc <= max_drop + 1e-9


def defender_index(candidates: list[dict], base_acc: float, max_drop: float) -> int | None:
    """The strongest (last) candidate within the budget, or None. Reads `holdout_acc` and `diverged` only."""
    ok = [i for i, c in enumerate(candidates) if within_budget(c, base_acc, max_drop)]
    return ok[-1] if ok else None


def oracle_index(candidates: list[dict], base_acc: float, max_drop: float, asr_key: str = "test_asr") -> int | None:
    """ORACLE: the candidate within the budget of lowest test ASR (ties: the higher held-out accuracy, then the
    weaker); None when none is within the budget or none has an ASR (no poisoned data)."""
    ok = [i for i, c in enumerate(candidates) if within_budget(c, base_acc, max_drop)
          and math.isfinite(float(c.get(asr_key, float("nan"))))]
    if not ok:
        return None
    return min(ok, key=lambda i: (float(candidates[i][asr_key]), -float(candidates[i]["holdout_acc"]), i))


def write_candidates(path: Path, candidates: list[dict], base_acc: float, max_drop: float, chosen: dict,
                     columns: list[str]) -> Path:
    """select.csv: every candidate setting, its held-out clean accuracy and loss against B, whether it is within
    the budget and which point chose it (no test or poisoned score: what the defender saw)."""
    from defense.reporting.report import write_csv

    rows = []
    for i, c in enumerate(candidates):
        row = {k: c.get(k) for k in columns}
        row.update(holdout_acc=float(c.get("holdout_acc", float("nan"))),
                   holdout_drop=base_acc - float(c.get("holdout_acc", float("nan"))),
                   diverged=bool(c.get("diverged", False)), within_budget=within_budget(c, base_acc, max_drop),
                   chosen=" ".join(p for p, idx in chosen.items() if idx == i))
        rows.append(row)
    return write_csv(path, rows)


def log_choice(what: str, candidates: list[dict], index: int | None, base_acc: float, max_drop: float,
               setting: str, n_holdout: int, point: str = DEFENDER) -> None:
    """One run.log line: the chosen setting and the held-out scores behind it."""
    who = "defender's point" if point == DEFENDER else "ORACLE point (lowest test ASR, not available to a defender)"
    if index is None:
        log.warning("warning: %s (%s): no candidate keeps the held-out clean accuracy within select.max_drop=%g "
                    "points of B's %.2f %% (%d held-out images)", who, what, max_drop, base_acc, n_holdout)
        return
    c = candidates[index]
    log.info("%s (%s): %s, held-out clean accuracy %.2f %% (B %.2f %%, budget %g points, %d held-out images, %d "
             "candidates)", who, what, setting, float(c["holdout_acc"]), base_acc, max_drop, n_holdout,
             len(candidates))


def pruning_rows(curves: list[dict], max_drop: float, out_dir: Path | None = None, n_holdout: int = 0,
                 diverged: bool = False) -> list[dict]:
    """The summary rows of the defender's and the oracle's points over the sweep's evaluated steps (the
    candidates: B' with the first k channels pruned, weakest first); `curves` need `holdout_acc` (column 0 is
    B). Writes select.csv into `out_dir` when given. An unreached point has `reached` False, as a drop row.
    diverged: the ranking came from a learning that diverged (ANP, RNP): every candidate is marked, none chosen."""
    if not curves or "holdout_acc" not in curves[0]:
        return []
    base_acc = float(curves[0]["holdout_acc"])
    candidates = [dict(c, diverged=diverged) for c in curves]
    chosen = {DEFENDER: defender_index(candidates, base_acc, max_drop),
              ORACLE: oracle_index(candidates, base_acc, max_drop)}
    log_choice("channels pruned along the sweep", candidates, chosen[DEFENDER], base_acc, max_drop,
               f"{candidates[chosen[DEFENDER]]['channels_pruned']} channels pruned" if chosen[DEFENDER] is not None
               else "", n_holdout)
    if out_dir is not None:
        write_candidates(Path(out_dir) / "select.csv", candidates, base_acc, max_drop, chosen,
                         ["channels_pruned", "fraction_pruned"])
    rows = []
    for point, index in chosen.items():
        if index is None:
            nan = float("nan")
            row = {"drop": nan, "reached": False, "channels_pruned": -1, "fraction_pruned": nan,
                   **{k: nan for k in curves[0] if k not in ("channels_pruned", "fraction_pruned")}}
        else:
            row = {"drop": float("nan"), "reached": True, **curves[index]}
            row["fraction_pruned"] = row["fraction_pruned"] * 100.0
        row.update(point=point, oracle=point == ORACLE, diverged=diverged, base_holdout_acc=base_acc)
        rows.append(row)
    return rows


def point_params(rows: list[dict]) -> dict[str, str]:
    """MLflow params of the defender's and the oracle's points: the chosen setting and its held-out score."""
    params = {}
    for row in rows:
        if row.get("point") not in POINTS:
            continue
        name = row["point"]
        if not row.get("reached"):
            params[f"{name}.channels_pruned"] = "not reached"
            continue
        for key in ("channels_pruned", "holdout_acc", "base_holdout_acc", "ft_learning_rate", "ft_epochs_setting"):
            value = row.get(key)
            if value is None or isinstance(value, float) and not math.isfinite(value):
                continue
            params[f"{name}.{key}"] = str(int(value)) if key == "channels_pruned" else f"{float(value):g}"
    return params
