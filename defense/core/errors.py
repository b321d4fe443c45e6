"""User-facing errors: one clear line naming the problem and the fix, never a bare traceback."""

from __future__ import annotations

import functools
import logging
import sys


FILE_ONLY = "defense_file_only"


class FileOnly(logging.Filter):
    """A filter for the console handler: records logged with extra={FILE_ONLY: True} go to log files only
    (conf/hydra/job_logging/defense.yaml), so that an error the command prints itself is not shown twice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, FILE_ONLY, False)


class DefenseError(Exception):
    """An error caused by the user's input (a file, a config key, an option).

    The message must name what is wrong and how to fix it; the command-line apps print it
    on one line and exit with status 2 instead of showing a traceback.
    """


class SweepJobFailed(Exception):
    """A job of a Hydra sweep (`-m`) ended with a DefenseError, already printed as its one `error:` line.

    Raised instead of exiting, so that Hydra records the job as failed and runs the others (its
    `run_job` catches an Exception, not a SystemExit); Hydra raises it again once the sweep's jobs have
    run, and the command exits 2 (defense/reporting/terminal.py, `one_line_errors`)."""


def exit_on_user_error(func=None, *, in_sweep=None):
    """Decorate a Hydra task function: a DefenseError becomes one line on stderr and exit 2.

    `in_sweep`, a function of no arguments (defense/reporting/terminal.py, `in_hydra_sweep`): where it
    says that the function runs as a job of a sweep, the job ends failed (SweepJobFailed) instead, and
    the sweep goes on with its other jobs."""
    if func is None:
        return functools.partial(exit_on_user_error, in_sweep=in_sweep)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DefenseError as err:
            # into the run's log file; the terminal gets the error: line below only (FileOnly on its handler)
            logging.getLogger("defense").error("%s", err, extra={FILE_ONLY: True})
            print(f"error: {err}", file=sys.stderr, flush=True)
            if in_sweep is not None and in_sweep():
                raise SweepJobFailed(str(err)) from None
            sys.exit(2)

    return wrapper
