"""User-facing errors: one clear line naming the problem and the fix, never a bare traceback."""

from __future__ import annotations

import functools
import logging
import sys


class DefenseError(Exception):
    """An error caused by the user's input (a file, a config key, an option).

    The message must name what is wrong and how to fix it; the command-line apps print it
    on one line and exit with status 2 instead of showing a traceback.
    """


def exit_on_user_error(func):
    """Decorate a Hydra task function: a DefenseError becomes one line on stderr and exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DefenseError as err:
            logging.getLogger("defense").error("%s", err)
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
