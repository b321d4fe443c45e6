"""Every defense preset on every architecture of the embedded BadNets scenario (scenario seeds 1-5) and on
the Lab 3 network with the real face extracts, at the defender's point, at each defense's own operating
point and at the oracle point.

    python experiments/defenses_table.py                               # every setup, every preset of conf/defense
    python experiments/defenses_table.py --setups preact_resnet        # one setup
    python experiments/defenses_table.py --seeds 1 --defenses fp anp   # a quick look
    python experiments/defenses_table.py --reuse                       # report again from the job folders of --out

For an architecture (`deepid`, `preact_resnet`, `vgg_bn`: `dataset.scenario.arch`) it runs, from the project
root, with its own sweep folder and MLflow store under `--out`:

  python -m defense.run -m experiment=leaderboard leaderboard.attacks=[badnets] leaderboard.seeds=[1,2,3,4,5] \\
      dataset.scenario.arch=<arch> hydra/launcher=joblib hydra.launcher.n_jobs=2 \\
      hydra.sweep.dir=<out>/<arch> tracking.uri=sqlite:///<out>/<arch>/mlflow.db

and for the Lab 3 network `experiment=defenses` on the extracts (one network, no seeds). It reads each
job's `summary.csv` and `curves.csv` (nothing is recomputed here) through the leaderboard's reading of a
run (defense/analysis/leaderboard.py `run_entry` and `aggregate`: mean ± sample std over the seeds, the
worst seed's ASR, the seeds whose learning diverged). Three tables, rows the networks, columns the presets:

- the defender's point (`point = defender`, defense/pipeline/select.py): the strongest setting whose
  held-out clean accuracy stays within `select.max_drop` points; the defended network as the leaderboard
  reads it (B'' where the preset fine-tunes, else G(B, B'));
- each defense's own operating point (the paper's threshold for CLP, ANP and RNP; the 4-point drop, `--drop`,
  for the drop-threshold presets), the network alone (B'' or the pruned B', no G), as BackdoorBench and the
  papers report it; the goals for ANP and RNP on `preact_resnet` are judged here;
- the ORACLE point (lowest test ASR within the same budget, as BackdoorBench selects; not available to a
  defender), the defended network.

BackdoorBench's published cells (PreAct-ResNet18 on CIFAR-10, another data set and network) stand beside
them, cited. Writes experiments/results/defenses_table.md and .json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files as rf  # noqa: E402
import sweep_jobs  # noqa: E402

rf.use_this_checkout()

NAME = "defenses_table"
DEFENSES = ["none", "fine_tuning", "random_pruning", "fp", "fine_pruning", "clp", "anp", "rnp"]
ARCHS = ("deepid", "preact_resnet", "vgg_bn")
LAB3 = "lab3_extracts"
SETUPS = (*ARCHS, LAB3)
SEEDS = [1, 2, 3, 4, 5]  # seed 0 is the development instance that experiment=fine_pruning was chosen on
SHARED = rf.CSAW
LAB3_OVERRIDES = ["model=lab3", f"model.path={SHARED / 'lab3_bd_weights.h5'}", "dataset=csaw_extract",
                  f"dataset.root={SHARED}"]
ROW_NAMES = {"deepid": "deepid (no BN)", "preact_resnet": "preact_resnet (BN)", "vgg_bn": "vgg_bn (BN)",
             LAB3: "Lab 3 DeepID, real faces (no BN)"}
TIME_FILE = "sweep_time.json"  # in each setup's sweep folder: the sweep's seconds and exit code
DEFENDER, OWN, ORACLE = "defender", "operating_point", "oracle_test_asr"
# the goal of ANP and RNP on the preact_resnet BadNets scenario, at the method's own operating point
GOAL_ASR, GOAL_LOSS = 5.0, 5.0

# BackdoorBench's leaderboard, PreAct-ResNet18 on CIFAR-10, 10% poisoning: clean accuracy / ASR (%), as
# published (https://backdoorbench.github.io/leaderboard-cifar10.html); another data set and network.
PUBLISHED_SOURCE = "BackdoorBench leaderboard (https://backdoorbench.github.io), PreAct-ResNet18, CIFAR-10, 10% poisoning"
PUBLISHED = {
    "badnets": {"none": (91.32, 95.03), "fine_tuning": (89.96, 1.48), "fine_pruning": (91.31, 57.13),
                "clp": (90.07, 77.56), "anp": (84.17, 0.73)},
    "blended": {"none": (93.47, 99.92), "fine_tuning": (92.78, 96.11), "fine_pruning": (93.17, 99.26),
                "clp": (91.32, 99.74), "anp": (86.58, 2.19)},
    "wanet": {"none": (91.25, 89.73), "fine_tuning": (93.48, 17.10), "fine_pruning": (91.46, 1.09),
              "clp": (81.91, 78.42), "anp": (85.73, 0.43)},
}


def sweep_command(setup: str, args, folder: Path) -> list[str]:
    common = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}", f"hydra.sweep.dir={folder}",
              f"tracking.uri=sqlite:///{folder / 'mlflow.db'}"]
    if setup == LAB3:
        return ["python", "-m", "defense.run", "-m", "experiment=defenses", f"defense={','.join(args.defenses)}",
                *LAB3_OVERRIDES, "progress=false", "compact=false", "tracking.log_models=false", *common]
    return ["python", "-m", "defense.run", "-m", "experiment=leaderboard", "leaderboard.attacks=[badnets]",
            f"leaderboard.defenses=[{','.join(args.defenses)}]",
            f"leaderboard.seeds=[{','.join(str(s) for s in args.seeds)}]", f"dataset.scenario.arch={setup}", *common]


def shown(command: list[str]) -> str:
    """The command as a reader runs it from the project root: paths relative to it or to ../shared."""
    text = shlex.join(command)
    return text.replace(str(rf.REPO) + "/", "").replace(str(rf.REPO.parent), "..")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def network_alone(summary: list[dict]) -> list[dict]:
    """summary.csv rows whose G(B, B') scores are replaced by B' alone's (the fine-tuned B'' rows keep
    their ft_ columns): the network as BackdoorBench and the papers report it."""
    rows = []
    for row in summary:
        row = dict(row)
        if not str(row.get("ft_der", "")).strip():
            row["test_acc"], row["test_asr"] = row.get("pruned_test_acc"), row.get("pruned_test_asr")
        rows.append(row)
    return rows


def sweep_time(folder: Path, earlier: dict | None = None) -> dict:
    """{"seconds", "exit", "timed_by"} of an earlier sweep in `folder`: its TIME_FILE, written when the sweep
    ended; else `earlier` (the setup's entry in the results .json of the run that made the sweep, same command);
    else (a sweep stopped before it ended) the span of its job folders' file times."""
    path = folder / TIME_FILE
    if path.is_file():
        return {**json.loads(path.read_text()), "timed_by": "the sweep's wall clock"}
    if earlier and earlier.get("seconds") is not None:
        return {"seconds": earlier["seconds"], "exit": earlier.get("exit"), "timed_by": "the sweep's wall clock"}
    jobs = sweep_jobs.finished(folder)
    if not jobs:
        return {"seconds": None, "exit": None, "timed_by": "not timed"}
    first = min((job / ".hydra").stat().st_mtime for job in sweep_jobs.finished(folder) if (job / ".hydra").is_dir())
    last = max(f.stat().st_mtime for job in jobs for f in job.iterdir() if f.is_file())
    return {"seconds": last - first, "exit": None,
            "timed_by": "the span of its job folders' file times (no sweep_time.json: that sweep did not record its time)"}


def entries_of_job(setup: str, job: Path, drop: float) -> dict[str, dict]:
    """{point: the leaderboard's entry of this job at that point} (defense/analysis/leaderboard.py
    run_entry), the own operating point read off the network alone."""
    from defense.analysis.leaderboard import run_entry
    from defense.core.errors import DefenseError

    given = sweep_jobs.job_overrides(job)
    defense = given.get("defense", "?")
    summary = read_csv(job / "summary.csv")
    base = read_csv(job / "curves.csv")[0]
    run = {"run_id": f"{setup}/{job.name}", "defense_name": defense,
           "params": {} if setup == LAB3 else {"dataset.scenario.seed": given.get("dataset.scenario.seed", "-"),
                                               "dataset.scenario.attack": "badnets"},
           "tags": {"attack": ROW_NAMES[setup], "defense_name": defense},
           "base_test_acc": number(base["pruned_test_acc"]), "base_test_asr": number(base["pruned_test_asr"])}
    entries = {}
    for point in (DEFENDER, OWN, ORACLE):
        rows = network_alone(summary) if point == OWN else summary
        try:
            entry = run_entry({**run, "summary": rows}, drop, point)
        except DefenseError as err:
            print(f"warning: {err}", file=sys.stderr)
            continue
        if point == OWN and entry["defended"] == "G(B,B')":
            entry["defended"] = "B'"
        entry["job"] = job.name
        entry["setup"] = setup
        entries[point] = entry
    return entries


def cell_text(cell: dict | None, expected: int) -> str:
    """`clean acc ± std / ASR ± std`, the worst seed's ASR, and the seeds not counted; `expected`: the seeds
    asked for (a sweep stopped early has fewer)."""
    if cell is None:
        return "not run"
    n_seeds = len(cell["seeds"])
    unrun = f" ({n_seeds} of {expected} seeds run)" if n_seeds < expected else ""
    if cell["n"] == 0:
        return (f"diverged ({cell['n_diverged']} of {n_seeds})" if cell["n_diverged"] else "n/r") + unrun

    def pm(mean, std):
        return f"{mean:.2f}" if not math.isfinite(std) else f"{mean:.2f} ± {std:.2f}"

    text = pm(cell["test_acc_mean"], cell["test_acc_std"]) + " / " + pm(cell["test_asr_mean"], cell["test_asr_std"])
    if n_seeds > 1:
        text += f" (worst {cell['test_asr_worst']:.2f})"
    if cell["n"] < n_seeds:
        text += f" ({cell['n']} of {n_seeds} seeds"
        text += f", {cell['n_diverged']} diverged)" if cell["n_diverged"] else ")"
    elif cell["n_diverged"]:
        text += f" ({cell['n_diverged']} diverged)"
    return text + unrun


def board_table(board: dict, defenses: list[str], seeds: int) -> str:
    rows = [[ROW_NAMES[setup], *(cell_text(board["cells"].get((ROW_NAMES[setup], d)), 1 if setup == LAB3 else seeds)
                                 for d in defenses)]
            for setup in board["setups"]]
    return rf.md_table(["network", *defenses], rows, align="l" + "r" * len(defenses))


def make_board(entries: list[dict], setups: list[str]) -> dict:
    from defense.analysis.leaderboard import aggregate

    board = aggregate(entries) if entries else {"attacks": [], "defenses": [], "cells": {}}
    board["setups"] = [s for s in setups if ROW_NAMES[s] in board["attacks"]]
    return board


def cells_json(board: dict) -> list[dict]:
    return [{"network": network, "defense": defense, **cell} for (network, defense), cell in board["cells"].items()]


def goals(entries: list[dict]) -> list[dict]:
    """ANP and RNP on preact_resnet at the own operating point (the pruned network alone): per seed whether the
    ASR is at most GOAL_ASR and the clean accuracy lost at most GOAL_LOSS points."""
    out = []
    for defense in ("anp", "rnp"):
        group = [e for e in entries if e["setup"] == "preact_resnet" and e["defense"] == defense]
        if not group:
            continue
        met = [e for e in group if e["reached"] and e["test_asr"] <= GOAL_ASR and e["acc_loss"] <= GOAL_LOSS]
        out.append({"defense": defense, "seeds": len(group), "met": len(met),
                    "diverged": sum(1 for e in group if e["diverged"]),
                    "test_asr": [e["test_asr"] for e in group], "acc_loss": [e["acc_loss"] for e in group]})
    return out


def goal_text(goal: dict) -> str:
    def listed(values):
        return ", ".join("-" if not math.isfinite(v) else f"{v:.2f}" for v in values)

    verdict = "met" if goal["met"] == goal["seeds"] else "missed"
    diverged = f", {goal['diverged']} diverged" if goal["diverged"] else ""
    return (f"`{goal['defense']}` on `preact_resnet`, own operating point: the goal (ASR at most {GOAL_ASR:g} % "
            f"with at most {GOAL_LOSS:g} points of clean accuracy lost) is **{verdict}**: met on {goal['met']} of "
            f"{goal['seeds']} seeds{diverged}; test ASR per seed {listed(goal['test_asr'])} %, clean accuracy lost "
            f"{listed(goal['acc_loss'])} points.")


def published_table(defenses: list[str]) -> str:
    shown_defenses = [d for d in defenses if any(d in cells for cells in PUBLISHED.values())]
    rows = [[attack, *(("%.2f / %.2f" % cells[d]) if d in cells else "" for d in shown_defenses)]
            for attack, cells in PUBLISHED.items()]
    return rf.md_table(["attack", *shown_defenses], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--defenses", nargs="+", default=DEFENSES, choices=DEFENSES)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="scenario seeds (default 1-5)")
    parser.add_argument("--drop", type=float, default=4.0,
                        help="the accuracy drop read as the own operating point of fp, fine_pruning, random_pruning "
                             "(default 4)")
    parser.add_argument("--n-jobs", type=int, default=2, help="joblib workers per sweep (default 2)")
    parser.add_argument("--out", default=str(rf.REPO / "outputs" / "experiments" / NAME))
    parser.add_argument("--results-dir", type=Path, default=rf.RESULTS, help="where defenses_table.md/.json go")
    parser.add_argument("--reuse", action="store_true",
                        help="read the job folders of an earlier run in --out instead of running the sweeps again")
    args = parser.parse_args(argv)
    if args.n_jobs < 1:
        parser.error("--n-jobs must be >= 1")
    if LAB3 in args.setups and not SHARED.is_dir():
        print(f"error: {SHARED} is missing: the real CSAW-HackML extracts are read from ../shared/data/csaw",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    setups, entries = {}, []
    results_json = args.results_dir / f"{NAME}.json"
    earlier = json.loads(results_json.read_text())["results"].get("setups", {}) if results_json.is_file() else {}
    for setup in args.setups:
        folder = out / setup
        command = sweep_command(setup, args, folder)
        info = {"command": shown(command), "exit": 0, "seconds": None, "timed_by": "the sweep's wall clock"}
        if args.reuse:
            made_it = earlier.get(setup) if earlier.get(setup, {}).get("command") == info["command"] else None
            info.update(sweep_time(folder, made_it))
        else:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            print("+", info["command"], flush=True)
            started = time.perf_counter()
            with (folder / "sweep.log").open("w") as log:
                done = subprocess.run([sys.executable, *command[1:]], cwd=rf.REPO, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "PYTHONPATH": str(rf.REPO), "PYTHONUNBUFFERED": "1"})
            info.update(seconds=time.perf_counter() - started, exit=done.returncode)
            (folder / TIME_FILE).write_text(json.dumps({"seconds": info["seconds"], "exit": info["exit"]}) + "\n")
            if done.returncode != 0:  # keep what finished: the table says how many jobs are missing
                print(f"warning: the {setup} sweep exited {done.returncode}; see {folder / 'sweep.log'}", file=sys.stderr)
        jobs = sweep_jobs.finished(folder)
        info["jobs"] = len(jobs)
        info["failed"] = sweep_jobs.failed_jobs(folder)
        info["expected_jobs"] = len(args.defenses) * (1 if setup == LAB3 else len(args.seeds))
        for job in jobs:
            for point, entry in entries_of_job(setup, job, args.drop).items():
                entries.append({**entry, "read_at": point})
        setups[setup] = info
    by_point = {point: [e for e in entries if e["read_at"] == point] for point in (DEFENDER, OWN, ORACLE)}
    boards = {point: make_board(group, list(args.setups)) for point, group in by_point.items()}
    body = markdown(boards, setups, goals(by_point[OWN]), args)
    rf.write_results(NAME, body, {
        "drop": args.drop, "seeds": args.seeds, "defenses": args.defenses, "setups": setups,
        "cells": {point: cells_json(board) for point, board in boards.items()},
        "goals": goals(by_point[OWN]),
        "published": {"source": PUBLISHED_SOURCE,
                      "cells": [{"attack": a, "defense": d, "acc": acc, "asr": asr}
                                for a, cells in PUBLISHED.items() for d, (acc, asr) in cells.items()]},
        "runs": [{k: v for k, v in e.items() if k != "start_time"} for e in entries],
    }, args.results_dir)
    return 0


def markdown(boards: dict, setups: dict, goal_list: list[dict], args) -> str:
    defenses = list(args.defenses)
    lines = [
        "Every defense preset (`defense=...`, conf/defense/) with its own settings. Rows: the embedded BadNets "
        f"scenario on each architecture (`dataset.scenario.arch`), scenario seeds {', '.join(map(str, args.seeds))} "
        "(seed 0, the development instance, is not among them), and the Lab 3 network on the real face extracts "
        "(50 validation faces, 10 of them held out for the defender's point, 50 test faces; one network, no seeds). "
        "Each cell: clean test accuracy / attack success rate (%), mean ± sample std over the seeds, the worst "
        "seed's ASR in brackets; n/r: the point was not reached; k diverged: seeds whose learning diverged "
        "(defense/core/divergence.py), never counted as a score. BN: the network has BatchNormalization, and "
        "CLP, ANP and RNP act on it as their reference code does; no BN: they act on conv channels "
        "(`defense_variant` = `conv (adapted: no BatchNormalization)`).",
        "",
        "Commands (from the project root):",
        "",
    ]
    for setup, info in setups.items():
        took = "" if info.get("seconds") is None else f"{info['seconds']:.0f} s by {info['timed_by']}"
        missing = info["expected_jobs"] - info["jobs"]
        status = f"{info['jobs']} of {info['expected_jobs']} jobs finished" if missing else f"{info['jobs']} jobs"
        if info.get("exit"):
            status += f", the sweep exited {info['exit']}"
        lines.append(f"- {ROW_NAMES[setup]}: `{info['command']}` ({status}" + (f", {took}" if took else "")
                     + ")")
        if info.get("failed"):
            lines.append(f"  - jobs that did not finish: {sweep_jobs.failed_text(info['failed'])}")
    lines += [
        "",
        "**At the defender's point** (the strongest setting whose held-out clean accuracy stays within "
        "`select.max_drop` points of B's; defense/pipeline/select.py). The defended network: B'' where the preset "
        "fine-tunes, else G(B, B'):",
        "",
        board_table(boards[DEFENDER], defenses, len(args.seeds)),
        "",
        f"**At each defense's own operating point** (the paper's threshold for CLP, ANP and RNP; the {args.drop:g}-point "
        "clean validation drop for random_pruning, fp and fine_pruning; nothing pruned for none and fine_tuning). "
        "The network alone, as the papers and BackdoorBench report it: B'' where the preset fine-tunes, else the "
        "pruned B':",
        "",
        board_table(boards[OWN], defenses, len(args.seeds)),
        "",
        *[goal_text(g) for g in goal_list],
        *([""] if goal_list else []),
        "**At the ORACLE point** (the lowest test ASR within the same budget, read off the test data as "
        "BackdoorBench selects: not available to a defender). The defended network, as at the defender's point:",
        "",
        board_table(boards[ORACLE], defenses, len(args.seeds)),
        "",
        f"For comparison, not comparable cell by cell (another data set and network): {PUBLISHED_SOURCE}, clean "
        "accuracy / ASR (%):",
        "",
        published_table(defenses),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
