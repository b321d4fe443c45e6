"""Where a run's time goes: `profile.json` in the run folder, read by experiments/leaderboard.py.

    {"stages": {"setup": s, "load": s, "sweep": s, ...},   # each stage of defense/pipeline/stages/
     "sweep": {"rank": s, "valid_clean": s, ...},           # the sweep's own phases (SweepResult.seconds)
     "mlflow_end": s,                                       # the run's last artifacts and its end
     "startup": s,                                          # interpreter, imports, Hydra composition
     "total": s, "status": "FINISHED"}

`startup` is the age of the process when the run began, counted for the first run of a process only:
a worker process that runs several jobs (joblib) pays its imports once, and its later runs count 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FILE = "profile.json"
_first_run_of_process = True


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0.0 where that is not readable)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5), counted after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def startup_seconds() -> float:
    """The process's age for its first run, 0.0 for every later run of the same process."""
    global _first_run_of_process
    if not _first_run_of_process:
        return 0.0
    _first_run_of_process = False
    return round(process_age(), 3)


def write(out_dir: str | Path, profile: dict) -> Path:
    """Write `profile` (seconds rounded to ms) to <out_dir>/profile.json."""
    def rounded(value):
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return round(value, 3) if isinstance(value, float) else value

    path = Path(out_dir) / FILE
    path.write_text(json.dumps(rounded(profile), indent=1) + "\n")
    return path

