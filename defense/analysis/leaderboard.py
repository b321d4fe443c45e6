"""The leaderboard of `python -m defense.compare compare.layout=leaderboard`: attacks x defenses.

    python -m defense.run -m experiment=leaderboard hydra/launcher=joblib hydra.launcher.n_jobs=2
    python -m defense.compare compare.layout=leaderboard

Each run (a job of the sweep, read from MLflow by defense/compare.py) gives one value per cell:

- row, the attack: `dataset.scenario.attack` of the run; an embedded-scenario run without that key is
  BadNets (the scenario's only attack before the key existed); a run on files is named by its network;
  `dataset.scenario.mode=all_to_all` is added to the name where a run has it;
- column, the defense: the run's `defense_name` (tag, else param; set by the conf/defense presets),
  else its criterion, with "+ft" when it fine-tunes;
- seed: `dataset.scenario.seed` (a run on files has none);
- value: the defended network of the run's summary.csv at the defense's own operating point: the row
  whose `point` is `operating_point` where the criterion has one (CLP, ANP, RNP); else the only row of a
  run with one threshold (defense=none, defense=fine_tuning: drop 0, nothing pruned); else the row of
  the accuracy drop `leaderboard.drop` (default 4 points). The defended network is what
  defense/compare.py reports: B'' where the row is fine-tuned, else G(B, B'); its clean test accuracy,
  ASR, DER against the unpruned B of the same run, and accuracy loss (B's clean test accuracy minus it).

A cell is the mean ± sample standard deviation (n - 1) of its values over the seeds. Files:
leaderboard.md (the table, with the command, date and package versions of the sweep and of this
report), leaderboard.csv (one row per attack, the columns `<defense>_<score>_mean` / `_std`,
`<defense>_n_seeds`, `<defense>_point`), leaderboard_runs.csv (one row per run: the values the cells
average) and leaderboard.png (heatmaps of the ASR and of the accuracy loss).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from defense.analysis.runs import as_float as _float, defended_scores, is_own_point
from defense.core.errors import DefenseError

log = logging.getLogger("defense.leaderboard")

FILES = ("leaderboard.csv", "leaderboard.md", "leaderboard.png", "leaderboard_runs.csv")
# the order of conf/experiment/leaderboard.yaml's axes; other names follow, alphabetically
ATTACK_ORDER = ("badnets", "blended", "sig", "wanet", "prune_aware")
DEFENSE_ORDER = ("none", "fine_tuning", "random_pruning", "fp", "fine_pruning", "clp", "anp", "rnp")
SCORES = ("test_acc", "test_asr", "der", "acc_loss")
NAN = float("nan")
OWN_POINT = "operating_point"
NO_SEED = "-"


def _given(value) -> bool:
    return value not in (None, "", "None", "null")


# ---------------------------------------------------------------------------------------------------
# what a run is: attack, defense, seed

def attack_of(params: dict, tags: dict | None = None) -> str:
    """The attack (row) of a run, from its logged params (the flattened config, defense/tracking/tracker.py)."""
    tags = tags or {}
    if _given(tags.get("attack")):
        return str(tags["attack"])
    if _given(params.get("dataset.scenario.attack")):
        name = str(params["dataset.scenario.attack"])
    elif any(key.startswith("dataset.scenario.") for key in params):
        name = "badnets"  # the embedded scenario (defense/scenario/build.py) from before dataset.scenario.attack
    else:
        return str(tags.get("model") or params.get("model.name") or "?")  # a network on files: its own backdoor
    if params.get("dataset.scenario.mode") == "all_to_all":
        name += " all_to_all"
    return name


def defense_of(params: dict, tags: dict | None = None) -> str:
    """The defense (column) of a run: `defense_name` (tag, else param), else criterion (+ft if fine-tuned)."""
    tags = tags or {}
    for given in (tags.get("defense_name"), params.get("defense_name")):
        if _given(given):
            return str(given)
    criterion = str(tags.get("criterion") or params.get("prune.criterion") or "?")
    finetune = tags.get("finetune") or params.get("finetune.kind") or "none"
    return criterion + ("" if finetune == "none" else "+ft")


def seed_of(params: dict) -> str:
    seed = params.get("dataset.scenario.seed")
    return str(seed) if _given(seed) else NO_SEED


# ---------------------------------------------------------------------------------------------------
# the defense's own operating point in a run's summary.csv

def point_label(drop: float) -> str:
    return f"drop {drop:g}"


POINT_LABELS = {"defender": "defender", "oracle_test_asr": "ORACLE test ASR"}


def operating_row(summary: list[dict], drop: float, run_id: str = "?", point: str = OWN_POINT) -> tuple[dict, str]:
    """(the summary.csv row of the defense's own operating point, its label).

    The criterion's own operating point (`point` = operating_point) where there is one; else the only
    threshold of a run that has one; else the threshold `drop`. A run with several thresholds and none
    equal to `drop` is a DefenseError naming leaderboard.drop and the thresholds it has.
    point (leaderboard.point): `defender` or `oracle_test_asr` read that row of summary.csv instead
    (defense/pipeline/select.py); a run without it is a DefenseError naming leaderboard.point.
    """
    if point in POINT_LABELS:
        found = [row for row in summary if str(row.get("point", "")) == point]
        if not found:
            raise DefenseError(f"leaderboard.point={point}: run {run_id} has no such summary.csv row (a run from before "
                               f"the defender's protocol); run it again, or use leaderboard.point=operating_point")
        return found[0], POINT_LABELS[point]
    own = [row for row in summary if is_own_point(row)]
    if own:
        return own[0], OWN_POINT
    rows = [row for row in summary if math.isfinite(_float(row.get("drop")))]
    if not rows:
        raise DefenseError(f"run {run_id} has no summary.csv rows to read a defense's scores from: "
                           f"leave it out (compare.parent=<a sweep>) or run it again")
    if len(rows) == 1:
        return rows[0], point_label(_float(rows[0]["drop"]))
    for row in rows:
        if _float(row["drop"]) == float(drop):
            return row, point_label(float(drop))
    have = ", ".join(f"{_float(r['drop']):g}" for r in rows)
    raise DefenseError(f"leaderboard.drop={drop:g} is not a threshold of run {run_id} (prune.drops: {have}); "
                       f"give one of them, e.g. leaderboard.drop={_float(rows[0]['drop']):g}")


def run_entry(run: dict, drop: float, which: str = OWN_POINT) -> dict:
    """One run (describe_run of defense/compare.py) as one value of its leaderboard cell (`which`: leaderboard.point)."""
    params, tags = run.get("params", {}), run.get("tags", {})
    defense = run.get("defense_name") or defense_of(params, tags)  # describe_run's name where it gives one
    # `none` is the undefended B at every point: its one row (drop 0), never a pruning the rule chose
    row, point = operating_row(run.get("summary", []), drop, run["run_id"], OWN_POINT if defense == "none" else which)
    base_acc, base_asr = run["base_test_acc"], run["base_test_asr"]
    scores = defended_scores(row, base_acc, base_asr)
    entry = {"attack": attack_of(params, tags), "defense": defense, "seed": seed_of(params),
             "run_id": run["run_id"], "point": point, "reached": scores is not None,
             "defended": "" if scores is None else scores["defended"],
             "channels_pruned": NAN if scores is None else float(scores["channels_pruned"]),
             "base_test_acc": base_acc, "base_test_asr": base_asr}
    for key in ("test_acc", "test_asr", "der"):
        entry[key] = NAN if scores is None else scores[key]
    entry["acc_loss"] = base_acc - entry["test_acc"]
    # some learning of the run collapsed (defense/core/divergence.py): its rows say so and none is a score
    entry["diverged"] = any(str(r.get("diverged", "False")) == "True" for r in run.get("summary", []))
    entry["start_time"] = run.get("start_time", 0)
    return entry


# ---------------------------------------------------------------------------------------------------
# cells: mean ± std over seeds

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the finite values; std NaN for fewer than two."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return NAN, NAN
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, NAN
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def _ordered(names, order) -> list[str]:
    names = set(names)
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def latest_per_seed(entries: list[dict]) -> list[dict]:
    """One entry per (attack, defense, seed): the newest run where a store holds the same job twice."""
    kept: dict[tuple, dict] = {}
    for entry in sorted(entries, key=lambda e: (e.get("start_time", 0), e["run_id"])):
        key = (entry["attack"], entry["defense"], entry["seed"])
        if key in kept:
            log.warning("runs %s and %s are both %s / %s / seed %s: the newer one counts", kept[key]["run_id"],
                        entry["run_id"], *key)
        kept[key] = entry
    return list(kept.values())


def aggregate(entries: list[dict]) -> dict:
    """{"attacks": [...], "defenses": [...], "cells": {(attack, defense): cell}} over `entries`.

    A cell: `seeds` (every seed of a run in it), `n` (the seeds whose operating point was reached),
    `points` and `defended` (the labels of its runs), `<score>_mean` and `<score>_std` for each of SCORES,
    `channels_pruned_mean`, `base_test_acc_mean`, `base_test_asr_mean`, `test_asr_worst` (the highest test
    ASR of a reached seed: the worst case for the defender) and `n_diverged` (seeds whose run has a
    diverged learning).
    """
    entries = latest_per_seed(entries)
    attacks = _ordered({e["attack"] for e in entries}, ATTACK_ORDER)
    defenses = _ordered({e["defense"] for e in entries}, DEFENSE_ORDER)
    cells = {}
    for attack in attacks:
        for defense in defenses:
            group = sorted((e for e in entries if e["attack"] == attack and e["defense"] == defense),
                           key=lambda e: (_float(e["seed"]), e["seed"]))
            if not group:
                continue
            reached = [e for e in group if e["reached"]]
            cell = {"seeds": [e["seed"] for e in group], "n": len(reached),
                    "points": sorted({e["point"] for e in group}),
                    "defended": sorted({e["defended"] for e in reached})}
            for key in (*SCORES, "channels_pruned", "base_test_acc", "base_test_asr"):
                cell[f"{key}_mean"], cell[f"{key}_std"] = mean_std([e[key] for e in reached])
            worst = [e["test_asr"] for e in reached if math.isfinite(e["test_asr"])]
            cell["test_asr_worst"] = max(worst) if worst else NAN
            cell["n_diverged"] = sum(1 for e in group if e.get("diverged"))
            cells[(attack, defense)] = cell
    return {"attacks": attacks, "defenses": defenses, "cells": cells}


# ---------------------------------------------------------------------------------------------------
# files

def csv_rows(board: dict) -> list[dict]:
    """leaderboard.csv: one row per attack, a column group per defense."""
    rows = []
    for attack in board["attacks"]:
        row = {"attack": attack}
        for defense in board["defenses"]:
            cell = board["cells"].get((attack, defense))
            for key in SCORES:
                for stat in ("mean", "std"):
                    value = NAN if cell is None else cell[f"{key}_{stat}"]
                    # every digit (repr), so that the csv gives back the very numbers the table rounds
                    row[f"{defense}_{key}_{stat}"] = "" if not math.isfinite(value) else repr(float(value))
            worst = NAN if cell is None else cell["test_asr_worst"]
            row[f"{defense}_test_asr_worst"] = "" if not math.isfinite(worst) else repr(float(worst))
            row[f"{defense}_n_seeds"] = "" if cell is None else cell["n"]
            row[f"{defense}_n_diverged"] = "" if cell is None else cell["n_diverged"]
            row[f"{defense}_point"] = "" if cell is None else " ".join(cell["points"])
            row[f"{defense}_defended"] = "" if cell is None else " ".join(cell["defended"])
        rows.append(row)
    return rows


def _pm(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if not math.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(board: dict, title: str, notes: list[str]) -> str:
    """The table: rows attacks, columns defenses, cells `clean acc / ASR / DER` (mean ± std over seeds)."""
    defenses = board["defenses"]
    head = ["attack", *defenses]
    lines = [title, "", "| " + " | ".join(head) + " |", "|---|" + "|".join("---:" for _ in defenses) + "|"]
    for attack in board["attacks"]:
        cells = [attack]
        for defense in defenses:
            cell = board["cells"].get((attack, defense))
            if cell is None:
                cells.append("")
            elif cell["n"] == 0 and not cell["n_diverged"]:
                cells.append("n/r")
            elif cell["n"] > 0:
                text = " / ".join([_pm(cell["test_acc_mean"], cell["test_acc_std"], 2),
                                   _pm(cell["test_asr_mean"], cell["test_asr_std"], 2),
                                   _pm(cell["der_mean"], cell["der_std"], 3)])
                if len(cell["seeds"]) > 1 and math.isfinite(cell["test_asr_worst"]):
                    text += f" (worst ASR {cell['test_asr_worst']:.2f})"
                if cell["n"] < len(cell["seeds"]):
                    text += f" ({cell['n']} of {len(cell['seeds'])} seeds)"
                if cell["n_diverged"]:
                    text += f" ({cell['n_diverged']} diverged)"
                cells.append(text)
            elif cell["n_diverged"]:
                cells.append(f"diverged ({cell['n_diverged']} of {len(cell['seeds'])} seeds)")
        lines.append("| " + " | ".join(cells) + " |")
    points = []
    for defense in defenses:
        used = sorted({p for (a, d), c in board["cells"].items() if d == defense for p in c["points"]})
        defended = sorted({x for (a, d), c in board["cells"].items() if d == defense for x in c["defended"]})
        points.append(f"{defense}: {', '.join(p.replace('_', ' ') for p in used)} ({', '.join(defended) or '-'})")
    seeds = sorted({s for c in board["cells"].values() for s in c["seeds"]}, key=lambda s: (_float(s), s))
    lines += ["",
              "Each cell: clean test accuracy (%) / attack success rate (%) / DER of the defended network at the "
              "point the title names, mean ± sample std over the scenario seeds "
              f"({', '.join(seeds)}), and the worst seed's ASR where there are several; n/r: the point was not "
              "reached; k diverged: k seeds whose run had a learning that diverged (never counted as a score); "
              "blank: not run. DER = "
              "(max(0, ΔASR) − max(0, ΔACC) + 1) / 2 against the unpruned B of the same run (0.5: nothing changed).",
              "",
              "Operating points (defended network): " + "; ".join(points) + ".",
              *(["", *notes] if notes else [])]
    return "\n".join(lines)


def plot_heatmaps(board: dict, path: Path, title: str) -> Path:
    """leaderboard.png: the mean ASR and the mean accuracy loss of every cell, as two heatmaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks, defenses = board["attacks"], board["defenses"]
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.6 + 2.2 * len(defenses)), 1.6 + 0.7 * len(attacks)),
                             dpi=110, squeeze=False)
    panels = (("test_asr", "attack success rate (%)", "Reds", 0.0, 100.0),
              ("acc_loss", "clean accuracy loss (points)", "Blues", 0.0, None))
    for ax, (key, name, cmap, vmin, vmax) in zip(axes[0], panels):
        grid = np.full((len(attacks), len(defenses)), np.nan)
        stds = np.full_like(grid, np.nan)
        for i, attack in enumerate(attacks):
            for j, defense in enumerate(defenses):
                cell = board["cells"].get((attack, defense))
                if cell is not None:
                    grid[i, j], stds[i, j] = cell[f"{key}_mean"], cell[f"{key}_std"]
        top = vmax if vmax is not None else max(10.0, float(np.nanmax(grid)) if np.isfinite(grid).any() else 10.0)
        color_map = plt.get_cmap(cmap).with_extremes(bad="#dddddd")  # cells not run or not reached
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=color_map, vmin=vmin, vmax=top, aspect="auto")
        for i in range(len(attacks)):
            for j in range(len(defenses)):
                value = grid[i, j]
                text = "n/r" if not math.isfinite(value) and (attacks[i], defenses[j]) in board["cells"] else \
                    "" if not math.isfinite(value) else _pm(value, stds[i, j], 1)
                dark = math.isfinite(value) and (value - vmin) / (top - vmin or 1.0) > 0.6
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(len(defenses)), defenses, rotation=20, ha="right")
        ax.set_yticks(range(len(attacks)), attacks)
        ax.set_xlabel("defense")
        ax.set_title(name)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    axes[0][0].set_ylabel("attack")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def provenance_notes(parent, uri: str) -> list[str]:
    """The command, date and package versions of this report and of the sweep it reads."""
    from defense.core import provenance

    notes = [f"Report: `{provenance.command_line()}` on {provenance.utc_text()}; {provenance.versions_text()}."]
    if parent is not None:
        tags = parent.data.tags
        command = tags.get("sweep_command")
        versions = tags.get("sweep_versions")
        notes.append(f"Runs: the sweep {parent.info.run_id} at {uri}"
                     + (f", made by `{command}`" if command else "")
                     + f", started {provenance.utc_text_of_ms(parent.info.start_time)}"
                     + (f"; {versions}" if versions else "") + ".")
    return notes


def write_leaderboard(runs: list[dict], out_dir: Path, drop: float, what: str, uri: str, parent=None,
                      point: str = OWN_POINT) -> dict:
    """Write FILES into `out_dir` from the runs (describe_run of defense/compare.py); returns the board.
    point (leaderboard.point): operating_point (the defense's own), defender or oracle_test_asr (an oracle:
    the title says so)."""
    from defense.reporting import report

    out_dir = Path(out_dir)
    entries = [run_entry(run, drop, point) for run in runs]
    board = aggregate(entries)
    n_runs = f"{len(entries)} run{'' if len(entries) == 1 else 's'}"
    title = f"Leaderboard of {len(board['attacks'])} attacks x {len(board['defenses'])} defenses ({n_runs} of {what})"
    if point != OWN_POINT:
        title += (" at the defender's point (held-out clean validation rule)" if point == "defender" else
                  " at the ORACLE point (lowest test ASR: an oracle, not available to a defender)")
    notes = provenance_notes(parent, uri)
    table = markdown(board, title, notes)
    (out_dir / "leaderboard.md").write_text(table + "\n")
    report.write_csv(out_dir / "leaderboard.csv", csv_rows(board))
    report.write_csv(out_dir / "leaderboard_runs.csv",
                     [{k: v for k, v in e.items() if k != "start_time"} for e in entries])
    plot_heatmaps(board, out_dir / "leaderboard.png", title)
    log.info("%s", table)
    log.info("leaderboard of %s in %s", n_runs, out_dir)
    return {"board": board, "entries": entries, "table": table}
