"""The default leaderboard: every attack of the embedded scenario against every defense preset, timed.

    python experiments/leaderboard.py                        # 5 attacks x 8 defenses x scenario seeds 1-5, 2 jobs at a time
    python experiments/leaderboard.py --seeds 1              # one scenario seed (40 jobs)
    python experiments/leaderboard.py --dry-run              # print the commands, run nothing
    python experiments/leaderboard.py --arch preact_resnet --seeds 1   # another network: leaderboard_preact_resnet.md
    python experiments/leaderboard.py --point operating_point  # the cells at each defense's own (paper's) point

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

The cells are read at the defender's point by default (`leaderboard.point=defender`: the strongest setting
within `select.max_drop` points of held-out clean accuracy, defense/pipeline/select.py). The same runs are
also reported at the ORACLE point (`leaderboard.point=oracle_test_asr`: the lowest test ASR within the same
budget, as BackdoorBench selects; not available to a defender), and a table gives the oracle's gain in ASR
over the defender's point. A profile of where the time went comes from every job's profile.json
(defense/core/profile.py): start-up, each stage of defense/pipeline/stages/, the sweep's ranking
(criterion learning) and MLflow's end of run, per defense and in total.
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
import sweep_jobs  # noqa: E402

rf.use_this_checkout()

NAME = "leaderboard"


def axis_overrides(args) -> list[str]:
    """leaderboard.attacks / defenses / seeds where given (else the preset's lists), and the scenario's network
    where it is not DeepID."""
    overrides = [] if args.arch == DEFAULT_ARCH else [f"dataset.scenario.arch={args.arch}"]
    for key in ("attacks", "defenses", "seeds"):
        values = getattr(args, key)
        if values:
            overrides.append(f"leaderboard.{key}=[{','.join(str(v) for v in values)}]")
    return overrides


def reduced(args) -> bool:
    """Whether an axis of the board was changed (the speed goals are for the full boards)."""
    return any(getattr(args, key) for key in ("attacks", "defenses", "seeds"))


def results_name(args) -> str:
    """leaderboard for DeepID, leaderboard_<arch> for another network (its own results files)."""
    return NAME if args.arch == DEFAULT_ARCH else f"{NAME}_{args.arch}"


def sweep_command(args, out: Path) -> list[str]:
    return ["python", "-m", "defense.run", "-m", "experiment=leaderboard", "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={args.n_jobs}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
            f"hydra.sweep.dir={out / 'sweep'}", *axis_overrides(args)]


def compare_command(args, out: Path, point: str | None = None, folder: str = "compare") -> list[str]:
    return ["python", "-m", "defense.compare", "compare.layout=leaderboard", f"leaderboard.drop={args.drop:g}",
            f"leaderboard.point={point or args.point}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
            f"hydra.run.dir={out / folder}"]


ORACLE = "oracle_test_asr"
# the speed goal of the default leaderboard (5 attacks x 8 defenses x scenario seeds 1-5, DeepID, 2 jobs at a
# time on 2 CPU cores), scenario builds included
GOAL_SECONDS = 30 * 60
# the speed goal of the same board per network (dataset.scenario.arch)
GOALS = {"deepid": GOAL_SECONDS, "preact_resnet": 60 * 60}
DEFAULT_ARCH = "deepid"
STAGES = ("startup", "setup", "load", "sweep", "rank", "points", "keep", "finetune", "report", "track", "mlflow_end")


def job_profiles(sweep_dir: Path) -> list[dict]:
    """Every job's profile.json (defense/core/profile.py) with its defense, attack and seed (from the job's
    Hydra overrides); `rank` is the part of `sweep` spent ranking (criterion learning included)."""
    import json

    import yaml

    found = []
    for path in sorted(sweep_dir.rglob("profile.json")):
        prof = json.loads(path.read_text())
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        given = dict(o.split("=", 1) for o in overrides if "=" in o)
        row = {"defense": given.get("defense", "?"), "attack": given.get("dataset.scenario.attack", "badnets"),
               "seed": given.get("dataset.scenario.seed", "?"), "status": prof.get("status"),
               "total": float(prof.get("total", 0.0)), "startup": float(prof.get("startup", 0.0)),
               "mlflow_end": float(prof.get("mlflow_end", 0.0)), "rank": float(prof.get("sweep", {}).get("rank", 0.0))}
        for stage, seconds in prof.get("stages", {}).items():
            row[stage] = float(seconds)
        found.append(row)
    return found


def profile_summary(profiles: list[dict]) -> list[dict]:
    """Per defense the mean seconds per job of each phase (and `total`), then a row `all` of the sums over all
    jobs: what the profile table shows, kept in the results .json too."""
    rows = []
    for defense in [*sorted({p["defense"] for p in profiles}), None]:
        group = [p for p in profiles if defense is None or p["defense"] == defense]
        scale = 1.0 if defense is None else 1.0 / len(group)
        row = {"defense": defense or "all", "jobs": len(group)}
        row.update({k: scale * sum(p.get(k, 0.0) for p in group) for k in (*STAGES, "total")})
        rows.append(row)
    return rows


def profile_markdown(profiles: list[dict], wall_seconds: float, n_jobs: int) -> str:
    """Mean seconds per job of each phase, per defense, and the sum over all jobs."""
    if not profiles:
        return "No job wrote a profile.json."
    rows = []
    for row in profile_summary(profiles):
        if row["defense"] == "all":
            rows.append(["**all jobs, summed**", row["jobs"]] + [f"{row[k]:.0f}" for k in (*STAGES, "total")])
        else:
            rows.append([f"`{row['defense']}`", row["jobs"]] + [f"{row[k]:.1f}" for k in (*STAGES, "total")])
    total = sum(p["total"] for p in profiles)
    return ("Where the time went (seconds; mean per job for each defense, summed over all jobs in the last row; "
            "`rank` is the part of `sweep` that ranks the channels, criterion learning included; `startup` is "
            "counted for the first job of each worker process only; the scenario builds fall in `setup` of the job "
            f"that built them). {len(profiles)} jobs took {total:.0f} job-seconds on {n_jobs} workers, "
            f"{wall_seconds:.0f} s wall clock:\n\n"
            + rf.md_table(["defense", "jobs", *STAGES, "total"], rows))


def scenario_builds(sweep_dir: Path) -> dict[str, float]:
    """{scenario folder: its build seconds} of every scenario a job of the sweep used (the folder its run.log
    names), as the cache recorded them when the scenario was built (scenario.json `build_seconds`)."""
    import json
    import re

    builds = {}
    for log_path in sorted(sweep_dir.glob("*/run.log")):
        for folder in set(re.findall(r"(/\S*?/scenarios/[0-9a-f]{16})\b", log_path.read_text(errors="replace"))):
            record = Path(folder) / "scenario.json"
            if folder not in builds and record.is_file():
                seconds = json.loads(record.read_text()).get("build_seconds")
                if seconds is not None:
                    builds[folder] = float(seconds)
    return builds


def defense_shares(profiles: list[dict], n_jobs: int) -> list[dict]:
    """Per defense, its jobs' seconds summed and spread over the workers: the part of the sweep's wall clock
    that defense's jobs took, largest first."""
    rows = []
    for defense in sorted({p.get("defense", "?") for p in profiles}):
        group = [p for p in profiles if p.get("defense", "?") == defense]
        seconds = sum(p.get("total", 0.0) for p in group)
        rows.append({"defense": defense, "jobs": len(group),
                     "job_seconds": seconds, "wall_share_seconds": seconds / max(1, n_jobs)})
    return sorted(rows, key=lambda r: -r["job_seconds"])


def speed_goal(sweep_seconds: float, profiles: list[dict], default: bool, n_jobs: int, before: int,
               after: int, goal_seconds: float = GOAL_SECONDS, board: str = "the default leaderboard",
               builds: dict[str, float] | None = None) -> dict | None:
    """The default leaderboard's time (`default`: no axis changed) against `goal_seconds` (None for any other
    leaderboard): met or missed, by how
    much, and, where the run built scenarios (a cold cache), the job-seconds of `setup` (where the builds fall)
    and the wall time without them, estimated as the sweep's time less those seconds spread over the workers
    (an estimate, not a warm-cache run). Where the cache held some of the scenarios already, `builds`
    (scenario_builds) gives a cold cache's time too: that warm estimate plus the recorded build seconds of
    every scenario the jobs used, spread over the workers (an estimate: the builds ran at other times). The
    defenses whose jobs alone took more of the workers' time than the goal (defense_shares) are listed: no
    other change meets the goal while their jobs cost what they did."""
    if not default:
        return None
    setup = sum(p.get("setup", 0.0) for p in profiles)
    built = max(0, after - before)
    goal = {"board": board, "goal_seconds": goal_seconds, "goal_met": sweep_seconds <= goal_seconds,
            "times_goal": sweep_seconds / goal_seconds, "scenarios_built": built,
            "setup_seconds": setup, "warm_estimate_seconds": sweep_seconds - setup / max(1, n_jobs),
            "over_goal_alone": [r for r in defense_shares(profiles, n_jobs) if r["wall_share_seconds"] > goal_seconds]}
    if builds and built < len(builds):  # some of the scenarios were cached already: a cold cache is estimated
        total = sum(builds.values())
        goal.update(cold_scenarios=len(builds), cold_build_seconds=total,
                    cold_estimate_seconds=goal["warm_estimate_seconds"] + total / max(1, n_jobs))
    return goal


def reduced_goal(sweep_seconds: float, jobs: int, full_jobs: int, goal_seconds: float, board: str) -> dict:
    """A board with fewer jobs than the full one has no verdict: its time scaled by full_jobs / jobs is an
    estimate of the full board's (the jobs of the left-out seeds or cells cost about what these did), beside
    the full board's goal."""
    estimate = sweep_seconds * full_jobs / max(1, jobs)
    return {"board": board, "goal_seconds": goal_seconds, "jobs": jobs, "full_jobs": full_jobs,
            "scaled_estimate_seconds": estimate, "times_goal_estimate": estimate / goal_seconds}


def reduced_goal_text(goal: dict) -> list[str]:
    estimate = goal["scaled_estimate_seconds"] / 60
    return ["", f"A reduced board ({goal['jobs']} of the full board's {goal['full_jobs']} jobs), so no verdict: the "
                f"speed goal is for {goal['board']}, at most {goal['goal_seconds'] / 60:.0f} min wall clock on 2 CPU "
                f"cores. Scaled to the full board's jobs, this run's time gives about {estimate:.0f} min (an "
                f"estimate, not a run: {goal['times_goal_estimate']:.1f}x the goal)."]


def speed_goal_text(goal: dict | None, sweep_seconds: float) -> list[str]:
    """One paragraph on the speed goal (empty for a leaderboard other than the default)."""
    if goal is None:
        return []
    verdict = ("met" if goal["goal_met"] else
               f"MISSED ({sweep_seconds / 60:.1f} min, {goal['times_goal']:.2f}x the goal)")
    text = (f"Speed goal: {goal['board']} in at most {goal['goal_seconds'] / 60:.0f} min wall clock on 2 CPU "
            f"cores, scenario builds included: {verdict}.")
    built = goal["scenarios_built"]
    if built:
        where = (f"The cache was cold ({built} scenarios built)" if not goal.get("cold_scenarios") else
                 f"The cache lacked {built} of the {goal['cold_scenarios']} scenarios the jobs used "
                 f"({built} built)")
        text += (f" {where}; `setup`, where the builds fall, took {goal['setup_seconds']:.0f} job-seconds, so a warm "
                 f"cache would take about {goal['warm_estimate_seconds'] / 60:.1f} min (an estimate: the sweep's time "
                 "less those seconds spread over the workers, not a measured run).")
    else:
        text += " The cache was warm (no scenario built)."
    if goal.get("cold_scenarios"):
        text += (f" A cold cache would add the builds of the {goal['cold_scenarios']} scenarios the jobs used: "
                 f"{goal['cold_build_seconds']:.0f} s as the cache recorded them when they were built, so about "
                 f"{goal['cold_estimate_seconds'] / 60:.1f} min in all (an estimate: the warm time and the builds "
                 "spread over the workers, not a measured run).")
    for row in goal.get("over_goal_alone", []):
        text += (f" `{row['defense']}`'s {row['jobs']} jobs alone took {row['job_seconds']:.0f} job-seconds, "
                 f"{row['wall_share_seconds'] / 60:.1f} min of the workers' time: more than the whole goal, so no "
                 "other change meets it while these jobs cost what they do.")
    return ["", text + " Where the time went is in the profile below."]


def oracle_gains(defender_cells: list[dict], oracle_cells: list[dict]) -> list[dict]:
    """Per attack and defense: test ASR at the defender's point, at the oracle point, and the oracle's gain
    (defender's minus oracle's, points); None where either is missing. Kept in the results .json."""
    oracle = {r["attack"]: r for r in oracle_cells}
    defenses = [key[: -len("_test_asr_mean")] for key in (defender_cells[0] if defender_cells else [])
                if key.endswith("_test_asr_mean")]
    gains = []
    for row in defender_cells:
        other = oracle.get(row["attack"], {})
        for defense in defenses:
            d, o = row.get(f"{defense}_test_asr_mean", ""), other.get(f"{defense}_test_asr_mean", "")
            both = d not in ("", None) and o not in ("", None)
            gains.append({"attack": row["attack"], "defense": defense,
                          "defender_test_asr": float(d) if both else None,
                          "oracle_test_asr": float(o) if both else None,
                          "gain": float(d) - float(o) if both else None})
    return gains


def oracle_gain_markdown(defender_cells: list[dict], oracle_cells: list[dict]) -> str:
    """Per cell: test ASR at the defender's point, at the oracle point, and the oracle's gain (points)."""
    gains = oracle_gains(defender_cells, oracle_cells)
    defenses = list(dict.fromkeys(g["defense"] for g in gains))
    rows = []
    for row in defender_cells:
        cells = [row["attack"]]
        for g in (g for g in gains if g["attack"] == row["attack"]):
            cells.append("-" if g["gain"] is None else
                         f"{g['defender_test_asr']:.2f} → {g['oracle_test_asr']:.2f} ({g['gain']:+.2f})")
        rows.append(cells)
    return ("Test ASR (%) at the defender's point → at the ORACLE point (lowest test ASR within the same "
            "clean-accuracy budget, read off the test data: not available to a defender), and in brackets how "
            "much the oracle's choice lowers the reported ASR (mean over the seeds):\n\n"
            + rf.md_table(["attack", *defenses], rows, align="l" + "r" * len(defenses)))


def sweep_provenance(earlier_file: dict | None = None) -> dict:
    """The command, commit and load average of the run that made the sweep: this one (taken when the script
    started, results_files.STARTED), or, for a report made again, the earlier results file's (its header's, where
    that file was written by the sweep's own run; {} where it was itself a report made again)."""
    if earlier_file is None:
        return {"command": rf.command_line(), "commit": rf.STARTED["commit"],
                "load_average_at_start": rf.STARTED["load_average_at_start"]}
    if "--report-again" in earlier_file.get("command", ""):
        return {}
    return {"command": earlier_file["command"], "commit": earlier_file["commit"],
            "load_average_at_start": earlier_file.get("machine", {}).get("load_average_at_start", [])}


def sweep_provenance_text(sweep_run: dict) -> str:
    if not sweep_run:
        return "The run that made the sweep is not recorded here (the results file was made again from it)."
    load = sweep_run.get("load_average_at_start") or []
    return (f"The sweep was run by `{sweep_run['command']}` at commit {sweep_run['commit'][:12]}"
            + (f", load average {load[0]:g} when it started." if load else "."))


def run(command: list[str], log_path: Path, may_fail: bool = False) -> float:
    """Run `command` from the project root (this checkout's `defense`), its output to `log_path`; seconds.

    `may_fail`: an exit status 2 (a sweep whose other jobs ran, sweep_jobs.py names the failed ones) is
    reported as a warning."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(rf.REPO))
    env.pop("DEFENSE_MLFLOW_PARENT_RUN_ID", None)
    print("$", shlex.join(command), flush=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, *command[1:]], cwd=rf.REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode == 2 and may_fail:
        print(f"warning: {shlex.join(command)} exited 2: a job of the sweep failed; see {log_path}", file=sys.stderr)
    elif proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise SystemExit(f"{shlex.join(command)} exited {proc.returncode} after {seconds:.0f} s; "
                         f"the end of {log_path}:\n" + "\n".join(tail))
    return seconds


def cached_scenarios() -> int:
    """Scenario folders in the cache (defense/scenario/build.py: $BACKDOOR_PRUNE_CACHE or ~/.cache/backdoor-prune)."""
    root = Path(os.environ.get("BACKDOOR_PRUNE_CACHE") or "~/.cache/backdoor-prune").expanduser() / "scenarios"
    return sum(1 for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else 0


def count_jobs(axes: dict) -> int:
    jobs = 1
    for values in axes.values():
        jobs *= len(values)
    return jobs


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
    parser.add_argument("--seeds", type=int, nargs="+", help="scenario seeds (default: the preset's, 1-5)")
    parser.add_argument("--attacks", nargs="+", help="attacks (default: the preset's five)")
    parser.add_argument("--defenses", nargs="+", help="defense presets (default: the preset's)")
    parser.add_argument("--arch", default=DEFAULT_ARCH,
                        help="dataset.scenario.arch of every scenario (default deepid); another network writes "
                             "leaderboard_<arch>.md/.json")
    parser.add_argument("--drop", type=float, default=4.0, help="leaderboard.drop (default 4)")
    parser.add_argument("--point", default="defender", choices=["defender", "operating_point", ORACLE],
                        help="leaderboard.point of the main table (default: defender)")
    parser.add_argument("--results", type=Path, default=rf.RESULTS, help="where leaderboard.md/.json go")
    parser.add_argument("--dry-run", action="store_true", help="check the axes, print the commands, run nothing")
    parser.add_argument("--report-again", action="store_true",
                        help="keep the sweep of the last run in --out (and its time from the results .json); "
                             "make the report again")
    args = parser.parse_args(argv)
    if args.n_jobs < 1:
        parser.error("--n-jobs must be >= 1")
    from defense.nets import architectures

    if args.arch not in architectures.names():
        parser.error(f"--arch {args.arch!r} is not a network of defense/nets/architectures/; choose one of "
                     + ", ".join(architectures.names()))

    from defense.core.errors import DefenseError

    out = args.out.resolve()
    # the commands run from the project root: paths inside it are written relative to it
    shown = out.relative_to(rf.REPO) if out.is_relative_to(rf.REPO) else out
    try:
        axes = check_axes(args)
    except DefenseError as err:
        parser.error(str(err))
    jobs = count_jobs(axes)
    sweep, report = sweep_command(args, shown), compare_command(args, shown)
    oracle_report = compare_command(args, shown, ORACLE, "compare_oracle") if args.point != ORACLE else None
    if args.dry_run:
        print(f"{jobs} jobs: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in axes.items()))
        for command in (sweep, report, oracle_report):
            if command:
                print("$", shlex.join(command))
        return

    if args.report_again:  # the sweep as it was run, with the time it took then
        import json

        earlier_file = json.loads((args.results / f"{results_name(args)}.json").read_text())
        earlier = earlier_file["results"]
        sweep_run = earlier.get("sweep_run") or sweep_provenance(earlier_file)
        sweep_seconds = earlier["sweep_seconds"]
        before, after = earlier["scenarios_cached_before"], earlier["scenarios_cached_after"]
        shutil.rmtree(out / "compare", ignore_errors=True)
        shutil.rmtree(out / "compare_oracle", ignore_errors=True)
    else:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        before = cached_scenarios()
        sweep_run = sweep_provenance()
        sweep_seconds = run(sweep, out / "sweep.log", may_fail=True)
        after = cached_scenarios()
    compare_seconds = run(report, out / "compare.log")
    oracle_cells = []
    if oracle_report:
        run(oracle_report, out / "compare_oracle.log")
        with (out / "compare_oracle" / "leaderboard.csv").open() as f:
            oracle_cells = list(csv.DictReader(f))
    profiles = job_profiles(out / "sweep")
    failed = sweep_jobs.failed_jobs(out / "sweep")

    table = (out / "compare" / "leaderboard.md").read_text().strip()
    with (out / "compare" / "leaderboard_runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    with (out / "compare" / "leaderboard.csv").open() as f:
        cells = list(csv.DictReader(f))
    args.results.mkdir(parents=True, exist_ok=True)
    name = results_name(args)
    shutil.copy(out / "compare" / "leaderboard.png", args.results / f"{name}.png")

    minutes = sweep_seconds / 60.0
    board = "the default leaderboard" + ("" if args.arch == DEFAULT_ARCH else f" on `dataset.scenario.arch={args.arch}`")
    goal_seconds = GOALS.get(args.arch)
    goal = (speed_goal(sweep_seconds, profiles, not reduced(args), args.n_jobs, before, after, goal_seconds, board,
                       scenario_builds(out / "sweep"))
            if goal_seconds else None)
    partial = None
    if goal_seconds and reduced(args):
        full = check_axes(argparse.Namespace(**{**vars(args), "attacks": None, "defenses": None, "seeds": None}))
        partial = reduced_goal(sweep_seconds, jobs, count_jobs(full), goal_seconds, board)
    body = "\n".join([
        f"{jobs} jobs ({len(axes['dataset.scenario.attack'])} attacks x {len(axes['defense'])} defenses x "
        f"{len(axes['dataset.scenario.seed'])} scenario seeds), {args.n_jobs} at a time:",
        "",
        f"    {shlex.join(sweep)}",
        f"    {shlex.join(report)}",
        *([f"    {shlex.join(oracle_report)}"] if oracle_report else []),
        "",
        f"The sweep took {sweep_seconds:.0f} s ({minutes:.1f} min) wall clock, scenario builds included "
        f"(the scenario cache held {before} scenario{'' if before == 1 else 's'} before it, {after} after); "
        f"the report {compare_seconds:.0f} s.",
        sweep_provenance_text(sweep_run),
        *speed_goal_text(goal, sweep_seconds),
        *(reduced_goal_text(partial) if partial else []),
        *(["", f"Jobs that did not finish (their seeds are missing from the cells): {sweep_jobs.failed_text(failed)}."]
          if failed else []),
        "",
        table,
        "",
        # the default board is embedded in README.md, another network's in docs/performance.md
        f"![leaderboard heatmaps: ASR and clean accuracy loss]({'' if name == NAME else '../'}experiments/results/{name}.png)",
        *(["", oracle_gain_markdown(cells, oracle_cells)] if oracle_cells else []),
        "",
        profile_markdown(profiles, sweep_seconds, args.n_jobs),
    ])
    rf.write_results(name, body, {
        "jobs": jobs, "n_jobs": args.n_jobs, "arch": args.arch, "axes": axes, "drop": args.drop, "reduced_goal": partial,
        "sweep_command": shlex.join(sweep), "compare_command": shlex.join(report),
        "sweep_seconds": sweep_seconds, "sweep_run": sweep_run, "compare_seconds": compare_seconds,
        "failed_jobs": failed,
        "scenarios_cached_before": before, "scenarios_cached_after": after, "speed_goal": goal,
        "point": args.point, "cells": cells, "oracle_cells": oracle_cells, "runs": runs, "profiles": profiles,
        "profile_summary": profile_summary(profiles) if profiles else [],
        "oracle_gains": oracle_gains(cells, oracle_cells) if oracle_cells else [],
    }, args.results)


if __name__ == "__main__":
    main()
