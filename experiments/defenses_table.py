"""Every defense preset on the embedded scenario and on the Lab 3 network with the real face extracts.

    python experiments/defenses_table.py                      # both setups, every preset of conf/defense
    python experiments/defenses_table.py --setups embedded    # one setup
    python experiments/defenses_table.py --defenses fp clp    # some presets

For each setup it runs, from the project root, with its own sweep folder and MLflow store under `--out`:

  python -m defense.run -m experiment=defenses defense=<presets> <setup overrides> \\
      hydra.sweep.dir=<out>/<setup> tracking.uri=sqlite:///<out>/<setup>/mlflow.db

and reads each job's `summary.csv` and `curves.csv` (nothing is recomputed here). A row of the table
is one defended network of one defense: at the defense's own operating point where its criterion has
one (CLP, ANP, RNP: `point = operating_point`), and at the 4-point accuracy drop (`--drop`); the
baselines `none` and `fine_tuning` prune nothing and have the one row of drop 0. The columns are the
clean test accuracy, the test ASR and the DER (defense/core/metrics.py, against the unpruned B of the same
setup) of B' alone and of G(B, B'), and, for the presets that fine-tune, of B'' and G(B, B'').
Writes experiments/results/defenses_table.md and .json.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files as rf  # noqa: E402

rf.use_this_checkout()

NAME = "defenses_table"
DEFENSES = ["none", "fine_tuning", "random_pruning", "fp", "fine_pruning", "clp", "anp", "rnp"]
SHARED = rf.REPO.parent / "shared" / "data" / "csaw"
SETUPS = {
    # scenario seed 1: seed 0 is the development instance that experiment=fine_pruning was chosen on
    "embedded": ("the embedded BadNets scenario (MNIST digits, scenario seed 1: 1000 clean validation, 1000 test "
                 "digits)", ["dataset.scenario.seed=1"]),
    "lab3_extracts": (
        "the Lab 3 network on the real face extracts (50 validation, 50 test faces; sunglasses trigger)",
        ["model=lab3", f"model.path={SHARED / 'lab3_bd_weights.h5'}", "dataset=csaw_extract",
         f"dataset.root={SHARED}"],
    ),
}


def sweep_command(setup: str, defenses: list[str], out: Path) -> list[str]:
    folder = out / setup
    return ["python", "-m", "defense.run", "-m", "experiment=defenses", f"defense={','.join(defenses)}",
            *SETUPS[setup][1], f"hydra.sweep.dir={folder}", f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
            "progress=false"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def job_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and (p / "summary.csv").is_file()),
                  key=lambda p: int(p.name) if p.name.isdigit() else 0)


def defense_of(job: Path) -> str:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(job / "config.yaml")
    return str(cfg.get("defense_name") or cfg.prune.criterion)


def rows_of_job(job: Path, drop: float) -> list[dict]:
    """The table rows of one job: its own operating point and the `drop` threshold (or its only row)."""
    from defense.core.metrics import defense_effectiveness_rating as der

    summary = read_csv(job / "summary.csv")
    base = read_csv(job / "curves.csv")[0]
    base_acc, base_asr = number(base["pruned_test_acc"]), number(base["pruned_test_asr"])
    picked = [r for r in summary if r.get("point") == "operating_point"]
    drops = [r for r in summary if r.get("point", "drop") == "drop"]
    if len(drops) == 1:
        picked += drops
    else:
        picked += [r for r in drops if number(r["drop"]) == drop]
    out = []
    for r in picked:
        own = r.get("point") == "operating_point"
        reached = str(r.get("reached")) == "True"
        row = {"defense": defense_of(job), "point": "own operating point" if own else f"drop {number(r['drop']):g}",
               "reached": reached, "channels_pruned": int(number(r["channels_pruned"])) if reached else None,
               "base_acc": base_acc, "base_asr": base_asr, "job": job.name}
        scores = {}
        if reached:
            scores["b_prime"] = (number(r["pruned_test_acc"]), number(r["pruned_test_asr"]))
            scores["g"] = (number(r["test_acc"]), number(r["test_asr"]))
            if str(r.get("ft_test_acc", "")).strip():
                scores["b_ft"] = (number(r["ft_test_acc"]), number(r["ft_test_asr"]))
                scores["g_ft"] = (number(r["ft_g_test_acc"]), number(r["ft_g_test_asr"]))
        for key, (acc, asr) in scores.items():
            row[key] = {"acc": acc, "asr": asr, "der": der(base_acc, acc, base_asr, asr)}
        out.append(row)
    return out


def cell(scores: dict | None) -> list[str]:
    if not scores:
        return ["-", "-", "-"]
    return [f"{scores['acc']:.2f}", f"{scores['asr']:.2f}", f"{scores['der']:.3f}"]


def markdown(results: dict, args) -> str:
    parts = []
    for setup, info in results.items():
        rows = info["rows"]
        base = rows[0] if rows else None
        head = (f"**{SETUPS[setup][0]}** (`{info['command']}`; {info['seconds']:.0f} s on this machine). "
                + (f"Unpruned B: clean test accuracy {base['base_acc']:.2f} %, test ASR {base['base_asr']:.2f} %." if base else ""))
        table = []
        for r in rows:
            pruned = "n/r" if not r["reached"] else str(r["channels_pruned"])
            table.append([f"`{r['defense']}`", r["point"], pruned, *cell(r.get("b_prime")), *cell(r.get("g")),
                          *cell(r.get("b_ft")), *cell(r.get("g_ft"))])
        parts.append(head + "\n\n" + rf.md_table(
            ["defense", "point", "channels pruned", "B' acc", "B' ASR", "B' DER", "G(B,B') acc", "G(B,B') ASR",
             "G(B,B') DER", "B'' acc", "B'' ASR", "B'' DER", "G(B,B'') acc", "G(B,B'') ASR", "G(B,B'') DER"],
            table, align="llr" + "r" * 12))
    intro = (f"Every defense preset (`defense=...`, conf/defense/) with its own settings, one job each of "
             f"`experiment=defenses`; a row per defended network: the defense's own operating point (CLP, ANP, RNP) "
             f"and the {args.drop:g}-point clean-validation accuracy drop (`none` and `fine_tuning` prune nothing: "
             f"drop 0). Accuracy and ASR in % on the test data; DER against the unpruned B (0.5: no change). "
             f"B': the pruned network; G(B, B'): B's label where B and B' agree, N where they differ; B'': B' after "
             f"fine-tuning (only the presets that fine-tune); n/r: threshold not reached; -: not applicable.")
    return intro + "\n\n" + "\n\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--defenses", nargs="+", default=DEFENSES)
    parser.add_argument("--drop", type=float, default=4.0, help="the accuracy-drop threshold of the table (default 4)")
    parser.add_argument("--out", default=str(rf.REPO / "outputs" / "experiments" / NAME))
    parser.add_argument("--reuse", nargs="*", choices=list(SETUPS), default=None,
                        help="read the job folders of an earlier run of these setups (all when none is named) "
                             "instead of running them again")
    args = parser.parse_args(argv)
    if "lab3_extracts" in args.setups and not SHARED.is_dir():
        print(f"error: {SHARED} is missing: the real CSAW-HackML extracts are read from ../shared/data/csaw",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    results = {}
    for setup in args.setups:
        command = sweep_command(setup, args.defenses, out)
        started = time.perf_counter()
        if args.reuse is None or (args.reuse and setup not in args.reuse):
            print("+", shlex.join(command), flush=True)
            done = subprocess.run(command, cwd=rf.REPO, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
            if done.returncode != 0:
                print(f"error: the {setup} sweep failed (exit {done.returncode}); see {out / setup}", file=sys.stderr)
                return 1
        seconds = time.perf_counter() - started
        rows = [row for job in job_folders(out / setup) for row in rows_of_job(job, args.drop)]
        shown = shlex.join(["python", "-m", "defense.run", "-m", "experiment=defenses",
                            f"defense={','.join(args.defenses)}", *SETUPS[setup][1]]).replace(str(rf.REPO.parent), "..")
        results[setup] = {"command": shown, "seconds": seconds, "rows": rows}
    rf.write_results(NAME, markdown(results, args), {"drop": args.drop, "setups": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
