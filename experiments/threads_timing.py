"""Two jobs at a time on 2 cores: TensorFlow's default thread pools against one thread per job, measured.

    python experiments/threads_timing.py                   # 2 repeats of each arm
    python experiments/threads_timing.py --repeats 1 --iterations 5 --seed 0 --quick --results-dir /tmp/t   # a quick try

The leaderboard runs two jobs at a time (hydra/launcher=joblib, n_jobs=2) on 2 CPU cores, and each job's
TensorFlow sizes its intra-op and inter-op thread pools by the cores, so two jobs run four pools on two
cores. Would one thread per job (TF_NUM_INTRAOP_THREADS=1, TF_NUM_INTEROP_THREADS=1, read by TensorFlow at
start-up) be faster? Each arm starts the same two jobs side by side, as the leaderboard's workers would:

  python -m defense.run defense=anp prune.anp.iterations=N dataset.scenario.seed=1 tracking=none progress=false
  python -m defense.run defense=fine_tuning dataset.scenario.seed=1 tracking=none progress=false

(ANP's mask learning shortened to --iterations, the rest as the presets are), and the arms alternate,
`default` first, --repeats times. Reported: the wall clock of each pair, and whether each job's summary.csv
(every column but the file paths) is the same across repeats of one arm and across the two arms. Writes
experiments/results/threads_timing.{md,json}.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files as rf  # noqa: E402

rf.use_this_checkout()

NAME = "threads_timing"
ARMS = {"default": {}, "one thread per job": {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}}
BASE = ["tracking=none", "progress=false"]


# --quick: 5 evaluated steps of ANP's sweep, one fine-tuning of one epoch per point
QUICK = {"anp": ["prune.eval_steps=5"],
         "fine_tuning": ["finetune.grid.epochs=[1]", "finetune.grid.learning_rate=[0.01]", "finetune.epochs=1"]}


def jobs(iterations: int, seed: int = 1, quick: bool = False) -> dict[str, list[str]]:
    common = [*BASE, f"dataset.scenario.seed={seed}"]
    return {"anp": ["defense=anp", f"prune.anp.iterations={iterations}", *common, *(QUICK["anp"] if quick else [])],
            "fine_tuning": ["defense=fine_tuning", *common, *(QUICK["fine_tuning"] if quick else [])]}


def run_pair(env_extra: dict, job_overrides: dict[str, list[str]], out: Path) -> dict:
    """The two jobs side by side; the pair's wall clock and each job's summary rows (paths dropped)."""
    env = {**os.environ, **env_extra}
    started = time.perf_counter()
    procs = {name: subprocess.Popen([sys.executable, "-m", "defense.run", *overrides, f"hydra.run.dir={out / name}"],
                                    cwd=rf.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, overrides in job_overrides.items()}
    errors = {name: p.communicate()[1] for name, p in procs.items()}
    wall = time.perf_counter() - started
    for name, p in procs.items():
        if p.returncode != 0:
            raise RuntimeError(f"{name} exited {p.returncode}: {errors[name][-2000:]}")
    rows = {}
    for name in procs:
        with open(out / name / "summary.csv", newline="") as f:
            rows[name] = [{k: v for k, v in row.items() if not k.endswith("_path")} for row in csv.DictReader(f)]
    return {"wall_s": round(wall, 1), "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="pairs per arm (default 2), arms alternating")
    parser.add_argument("--iterations", type=int, default=400, help="ANP iterations of the anp job (default 400)")
    parser.add_argument("--seed", type=int, default=1, help="the scenario seed of both jobs (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a quick try, not the leaderboard's jobs: " + "; ".join(
                            f"{job}: {' '.join(o)}" for job, o in QUICK.items()))
    parser.add_argument("--results-dir", default=str(rf.RESULTS), help="where the .md and .json go")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.iterations < 1:
        parser.error("--repeats and --iterations must be at least 1")
    pair_jobs = jobs(args.iterations, args.seed, args.quick)
    runs = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="threads_timing_") as tmp:
        for repeat in range(args.repeats):
            for arm, env in ARMS.items():
                pair = run_pair(env, pair_jobs, Path(tmp) / f"{arm.replace(' ', '_')}_{repeat}")
                runs[arm].append(pair)
                print(f"{arm}, repeat {repeat + 1}: {pair['wall_s']} s", flush=True)
    first = {arm: r[0]["rows"] for arm, r in runs.items()}
    mean = {arm: round(sum(p["wall_s"] for p in r) / len(r), 1) for arm, r in runs.items()}
    same_within = {arm: all(p["rows"] == r[0]["rows"] for p in r) for arm, r in runs.items()}
    same_across = {name: first["default"][name] == first["one thread per job"][name] for name in pair_jobs}
    table = rf.md_table(
        ["arm", "environment", *[f"pair {i + 1} wall (s)" for i in range(args.repeats)], "mean wall (s)",
         "same summaries on every repeat"],
        [[arm, " ".join(f"`{k}={v}`" for k, v in ARMS[arm].items()) or "TensorFlow's defaults (pools sized by the cores)",
          *[p["wall_s"] for p in runs[arm]], f"{mean[arm]:.1f}",
          "yes" if same_within[arm] else "no"] for arm in ARMS],
        align="llrr" + "r" * args.repeats)
    across = "; ".join(f"`{name}`: {'the same' if same else 'different'}" for name, same in same_across.items())
    commands = " and ".join("`python -m defense.run " + " ".join(o) + "`" for o in pair_jobs.values())
    body = (f"Two jobs side by side on this machine, {commands}, each arm {args.repeats} time(s), arms alternating:\n\n{table}\n\n"
            f"Each job's summary.csv (scores, channels, file paths aside) between the two arms: {across}.")
    rf.write_results(NAME, body, {"iterations": args.iterations, "repeats": args.repeats, "seed": args.seed,
                                  "quick": args.quick, "jobs": pair_jobs,
                                  "arms": {arm: {"env": ARMS[arm], "wall_s": [p["wall_s"] for p in runs[arm]],
                                                 "mean_wall_s": mean[arm],
                                                 "same_summaries_within": same_within[arm]} for arm in ARMS},
                                  "same_summaries_across_arms": same_across},
                     results_dir=Path(args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
