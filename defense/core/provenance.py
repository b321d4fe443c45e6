"""Where a result comes from: the command line that made it, the date, and the package versions.

The results files of `experiments/` (experiments/results_files.py) and the leaderboard of
`python -m defense.compare compare.layout=leaderboard` (defense/analysis/leaderboard.py) write these beside
their tables; a multirun's MLflow parent run keeps them as tags (defense/tracking/tracker.py).
"""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("tensorflow", "keras", "numpy", "mlflow")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # defense/ (this file is defense/core/provenance.py)


def versions() -> dict[str, str]:
    """python and the PACKAGES installed in this environment (read from their metadata, not imported)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def versions_text(found: dict[str, str] | None = None) -> str:
    """'python 3.11.7, tensorflow 2.21.0, keras 3.15.1, numpy 2.4.6, mlflow 3.17.2'."""
    found = found or versions()
    return ", ".join(f"{k} {found[k]}" for k in ("python", *PACKAGES) if k in found)


def command_line(argv: list[str] | None = None) -> str:
    """The running command as typed: `python -m defense.<app> ...` for an app of this package."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv and argv[0] else None
    if script is not None and script.parent == PACKAGE_DIR and script.suffix == ".py":
        head = ["python", "-m", f"defense.{script.stem}"]
    else:
        head = ["python", *(argv[:1] or [])]
    return shlex.join([*head, *argv[1:]])


def utc_text(when: _dt.datetime | None = None) -> str:
    """'2026-11-24 14:34 UTC' (now, or a given aware time)."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    return when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def utc_text_of_ms(ms: int | None) -> str:
    """An MLflow time (milliseconds since the epoch) as utc_text; '?' when unknown."""
    if not ms:
        return "?"
    return utc_text(_dt.datetime.fromtimestamp(ms / 1000.0, _dt.timezone.utc))
