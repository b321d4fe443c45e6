"""Reading a Hydra sweep folder (`hydra.sweep.dir`) after the sweep: each numbered job folder's overrides,
and the jobs that did not finish with the error line their run.log ends with.

A job that stops on a user error (defense/core/errors.py) logs that error, with `[ERROR] - `, into its
run.log and writes no summary.csv; the sweep runs its other jobs and exits 2. The studies name such jobs
beside their tables, so that a cell with fewer seeds says why.
"""

from __future__ import annotations

from pathlib import Path

SUMMARY = "summary.csv"  # written by a job that finished (defense/pipeline/stages/report.py)


def job_overrides(job: Path) -> dict:
    """{key: value} of the overrides Hydra recorded for this job (.hydra/overrides.yaml)."""
    import yaml

    path = job / ".hydra" / "overrides.yaml"
    given = yaml.safe_load(path.read_text()) if path.is_file() else []
    return dict(o.split("=", 1) for o in given if "=" in o)


def numbered(folder: Path) -> list[Path]:
    """The job folders of a sweep folder, in job order (the MLflow store's artifact copies are not jobs)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def finished(folder: Path) -> list[Path]:
    """The job folders with a summary.csv."""
    return [job for job in numbered(folder) if (job / SUMMARY).is_file()]


def failed_jobs(folder: Path) -> list[dict]:
    """The job folders with no summary.csv: their attack, seed and defense overrides and the last error line
    of their run.log ("" where it has none: the job was stopped, or never started)."""
    failed = []
    for job in numbered(folder):
        if (job / SUMMARY).is_file():
            continue
        log = job / "run.log"
        errors = [line.split("[ERROR] - ", 1)[1] for line in (log.read_text().splitlines() if log.is_file() else [])
                  if "[ERROR] - " in line]
        given = job_overrides(job)
        failed.append({"job": job.name, "defense": given.get("defense", "?"),
                       "attack": given.get("dataset.scenario.attack"), "seed": given.get("dataset.scenario.seed"),
                       "error": errors[-1] if errors else ""})
    return failed


def failed_text(failed: list[dict]) -> str:
    """One clause per distinct error: which attacks, seeds and how many jobs it stopped."""
    by_error: dict[str, list[dict]] = {}
    for job in failed:
        by_error.setdefault(job["error"], []).append(job)
    parts = []
    for error, jobs in by_error.items():
        attacks = sorted({j["attack"] for j in jobs if j.get("attack")})
        seeds = sorted({j["seed"] for j in jobs if j.get("seed") is not None}, key=str)
        which = "".join([f"{', '.join(attacks)} " if attacks else "",
                         f"scenario seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}, " if seeds else "",
                         f"{len(jobs)} job{'s' if len(jobs) > 1 else ''}"])
        parts.append(f"{which}: {error or 'no error line in its run.log (stopped before it ended)'}")
    return "; ".join(parts)
