"""The default leaderboard: every attack of the embedded scenario against every defense preset, timed.

    python experiments/leaderboard.py                        # 5 attacks x 5 defenses, scenario seed 1, 2 jobs at a time
    python experiments/leaderboard.py --seeds 1 2 3          # mean ± std over three scenario seeds
    python experiments/leaderboard.py --dry-run              # print the two commands, run nothing

It runs, from the project root, with its own MLflow store and sweep folder under `--out`:

  python -m defense.run -m experiment=leaderboard hydra/launcher=joblib hydra.launcher.n_jobs=2 \\
      tracking.uri=sqlite:///<out>/mlflow.db hydra.sweep.dir=<out>/sweep [leaderboard.seeds=[...]]
  python -m defense.compare compare.layout=leaderboard tracking.uri=sqlite:///<out>/mlflow.db \\
      hydra.run.dir=<out>/compare

times the sweep (wall clock, scenario builds included: a scenario not yet in the cache is built by
the first job that needs it; the results say how many scenarios the cache held before and after) and writes
experiments/results/leaderboard.md (the table of defense/analysis/leaderboard.py, the commands and the time)
and .json (the same cells, per run, with the times), and copies the heatmaps to
experiments/results/leaderboard.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files as rf  # noqa: E402

rf.use_this_checkout()

NAME = "leaderboard"


def axis_overrides(args) -> list[str]:
    """leaderboard.attacks / defenses / seeds where given (else the preset's lists)."""
    overrides = []
    for key in ("attacks", "defenses", "seeds"):
        values = getattr(args, key)
        if values:
            overrides.append(f"leaderboard.{key}=[{','.join(str(v) for v in values)}]")
    return overrides


def sweep_command(args, out: Path) -> list[str]:
    return ["python", "-m", "defense.run", "-m", "experiment=leaderboard", "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={args.n_jobs}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
            f"hydra.sweep.dir={out / 'sweep'}", *axis_overrides(args)]


def compare_command(args, out: Path) -> list[str]:
    return ["python", "-m", "defense.compare", "compare.layout=leaderboard", f"leaderboard.drop={args.drop:g}",
            f"tracking.uri=sqlite:///{out / 'mlflow.db'}", f"hydra.run.dir={out / 'compare'}"]


def run(command: list[str], log_path: Path) -> float:
    """Run `command` from the project root (this checkout's `defense`), its output to `log_path`; seconds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(rf.REPO))
    env.pop("DEFENSE_MLFLOW_PARENT_RUN_ID", None)
    print("$", shlex.join(command), flush=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, *command[1:]], cwd=rf.REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise SystemExit(f"{shlex.join(command)} exited {proc.returncode} after {seconds:.0f} s; "
                         f"the end of {log_path}:\n" + "\n".join(tail))
    return seconds


def cached_scenarios() -> int:
    """Scenario folders in the cache (defense/scenario/build.py: $BACKDOOR_PRUNE_CACHE or ~/.cache/backdoor-prune)."""
    root = Path(os.environ.get("BACKDOOR_PRUNE_CACHE") or "~/.cache/backdoor-prune").expanduser() / "scenarios"
    return sum(1 for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else 0


def check_axes(args) -> dict:
    """experiment=leaderboard composed with the chosen axes: a bad axis stops here, before anything runs."""
    from omegaconf import OmegaConf

    import defense.pipeline.schemas  # noqa: F401  (schemas and the sweep_axis resolver)
    from defense.config import check_sweep_axes
    from hydra import compose, initialize_config_dir

    overrides = ["experiment=leaderboard", *axis_overrides(args)]
    with initialize_config_dir(config_dir=str(rf.REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    check_sweep_axes(cfg)
    return {k: v.split(",") for k, v in OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True).items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=rf.REPO / "outputs" / "leaderboard",
                        help="MLflow store, sweep and report folder (default outputs/leaderboard; emptied first)")
    parser.add_argument("--n-jobs", type=int, default=2, help="joblib workers (default 2)")
    parser.add_argument("--seeds", type=int, nargs="+", help="scenario seeds (default: the preset's, [1])")
    parser.add_argument("--attacks", nargs="+", help="attacks (default: the preset's five)")
    parser.add_argument("--defenses", nargs="+", help="defense presets (default: the preset's)")
    parser.add_argument("--drop", type=float, default=4.0, help="leaderboard.drop (default 4)")
    parser.add_argument("--results", type=Path, default=rf.RESULTS, help="where leaderboard.md/.json go")
    parser.add_argument("--dry-run", action="store_true", help="check the axes, print the commands, run nothing")
    parser.add_argument("--report-again", action="store_true",
                        help="keep the sweep of the last run in --out (and its time from the results .json); "
                             "make the report again")
    args = parser.parse_args(argv)
    if args.n_jobs < 1:
        parser.error("--n-jobs must be >= 1")

    from defense.core.errors import DefenseError

    out = args.out.resolve()
    # the commands run from the project root: paths inside it are written relative to it
    shown = out.relative_to(rf.REPO) if out.is_relative_to(rf.REPO) else out
    try:
        axes = check_axes(args)
    except DefenseError as err:
        parser.error(str(err))
    jobs = 1
    for values in axes.values():
        jobs *= len(values)
    sweep, report = sweep_command(args, shown), compare_command(args, shown)
    if args.dry_run:
        print(f"{jobs} jobs: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in axes.items()))
        print("$", shlex.join(sweep))
        print("$", shlex.join(report))
        return

    if args.report_again:  # the sweep as it was run, with the time it took then
        import json

        earlier = json.loads((args.results / f"{NAME}.json").read_text())["results"]
        sweep_seconds = earlier["sweep_seconds"]
        before, after = earlier["scenarios_cached_before"], earlier["scenarios_cached_after"]
        shutil.rmtree(out / "compare", ignore_errors=True)
    else:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        before = cached_scenarios()
        sweep_seconds = run(sweep, out / "sweep.log")
        after = cached_scenarios()
    compare_seconds = run(report, out / "compare.log")

    table = (out / "compare" / "leaderboard.md").read_text().strip()
    with (out / "compare" / "leaderboard_runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    with (out / "compare" / "leaderboard.csv").open() as f:
        cells = list(csv.DictReader(f))
    args.results.mkdir(parents=True, exist_ok=True)
    shutil.copy(out / "compare" / "leaderboard.png", args.results / f"{NAME}.png")

    minutes = sweep_seconds / 60.0
    body = "\n".join([
        f"{jobs} jobs ({len(axes['dataset.scenario.attack'])} attacks x {len(axes['defense'])} defenses x "
        f"{len(axes['dataset.scenario.seed'])} scenario seeds), {args.n_jobs} at a time:",
        "",
        f"    {shlex.join(sweep)}",
        f"    {shlex.join(report)}",
        "",
        f"The sweep took {sweep_seconds:.0f} s ({minutes:.1f} min) wall clock, scenario builds included "
        f"(the scenario cache held {before} scenario{'' if before == 1 else 's'} before it, {after} after); "
        f"the report {compare_seconds:.0f} s.",
        "",
        table,
        "",
        f"![leaderboard heatmaps: ASR and clean accuracy loss](experiments/results/{NAME}.png)",
    ])
    rf.write_results(NAME, body, {
        "jobs": jobs, "n_jobs": args.n_jobs, "axes": axes, "drop": args.drop,
        "sweep_command": shlex.join(sweep), "compare_command": shlex.join(report),
        "sweep_seconds": sweep_seconds, "compare_seconds": compare_seconds,
        "scenarios_cached_before": before, "scenarios_cached_after": after,
        "cells": cells, "runs": runs,
    }, args.results)


if __name__ == "__main__":
    main()
