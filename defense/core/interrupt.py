"""Stopping a run on SIGINT or SIGTERM: its MLflow run ends KILLED and the process exits 130 / 143.

Ctrl-C sends SIGINT. SLURM (scancel, the time limit, preemption) and Kubernetes (a pod deleted or
evicted) send SIGTERM, then SIGKILL when a grace period is over (SLURM's KillWait and Kubernetes'
terminationGracePeriodSeconds, 30 s by default). Python turns SIGINT into KeyboardInterrupt, but
SIGTERM ends the process at once without running any `finally`, which would leave its MLflow run
RUNNING forever. Inside `stop_on_signals()` both raise `Interrupted` (a KeyboardInterrupt, so code
that lets Ctrl-C through lets it through too) and every `try/finally` on the way out runs:
`defense.run.run_defense` ends its MLflow run KILLED and logs the files written so far.

Where the signal is raised:
- Inside `stop_on_signals(deferred=True)` (a defense run: the sweep, the criteria's learning,
  fine-tuning, the scenario build) the handler only records the request and says so on stderr.
  Raising from a signal handler lands the exception at whatever bytecode the main thread runs:
  inside Keras' `fit`, while its data workers and TensorFlow ops run, that crashed the process
  (SIGSEGV) instead of stopping it. The loops check the request at safe points with `check()`:
  between the sweep's batches, between a criterion's learning iterations, between the stages of a
  run, and between training batches through `fit()` (a Keras callback sets `stop_training`, so
  `fit` returns after the call in flight: one batch, or a whole epoch for a model compiled with
  `steps_per_execution` (fine-tuning); the stop is raised once it has returned). A request
  that no safe point saw is raised when the scope ends, so a run asked to stop never ends FINISHED.
- A second signal before the first was acted on stops at once, as Ctrl-C always did: it raises from
  the handler (the way out of a loop without a safe point).
- Elsewhere (a command's entry point around Hydra and its launchers, which wait for jobs, and the
  short evaluate / predict commands) the first signal raises at once. Python runs the handler in
  the main thread between two bytecodes, so a signal that arrives while TensorFlow runs an op in C++
  is raised as soon as the op returns to Python.
- Once a stop is under way, later signals are noted on stderr and otherwise ignored, so that a
  further Ctrl-C or a launcher passing SIGTERM on cannot cut the ending of the run short (SIGKILL
  still ends the process at once).
- `held()` marks the few lines that must not be cut in the middle (creating an MLflow run and
  keeping its id, ending it): a signal arriving inside is raised when the block ends.
- `on_abort(fn)`: `fn(status)` is called when an exception leaves the outermost scope (`KILLED` for
  a signal, `FAILED` otherwise): the MLflow parent run of a multirun, which Hydra does not end when
  a job raises, is ended there.
- A signal ignored (SIG_IGN) when the scope starts stays ignored, as Python itself does for SIGINT
  (a job started with nohup or in the background of a non-interactive shell ignores Ctrl-C).
- Outside the main thread the scope changes nothing: only the main thread may set handlers.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager

log = logging.getLogger("defense.interrupt")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a run."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def signum_of(err: BaseException) -> int:
    """The signal behind an interruption: a plain KeyboardInterrupt counts as SIGINT."""
    return getattr(err, "signum", signal.SIGINT)


def exit_status(err: BaseException) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number (130, 143)."""
    return 128 + signum_of(err)


def run_status(err: BaseException | None) -> str:
    """The MLflow status of a run that ends with `err` propagating (None: it ended normally)."""
    if err is None:
        return "FINISHED"
    return "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"


class _State:
    def __init__(self):
        self.depth = 0  # nesting of stop_on_signals() in the main thread
        self.deferred = 0  # nesting of stop_on_signals(deferred=True): the handler only records
        self.previous: dict[int, object] = {}  # handlers to put back when the outermost scope ends
        self.requested: int | None = None  # the signal that asked to stop, until the stop starts
        self.stopping: int | None = None  # the signal whose Interrupted is on its way out
        self.held = 0  # nesting of held()
        self.aborts: list = []  # on_abort() callables


_state = _State()


def _note(text: str) -> None:
    # os.write, not print or logging: the handler may run while the main thread is inside a write
    # to the same stream, and Python's buffered streams refuse a reentrant call
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


def _handle(signum, frame) -> None:
    if _state.stopping is not None:
        _note(f"{signal_name(signum)}: already stopping (ending the run and logging its files)")
        return
    first = _state.requested is None
    if first:
        _state.requested = signum
    if _state.held:  # raised when the held block ends
        return
    if first and _state.deferred:
        _note(f"{signal_name(signum)}: stopping at the next safe point (send it again to stop at once)")
        return
    _state.stopping = _state.requested
    raise Interrupted(_state.requested)


def requested() -> bool:
    """True when a signal asked to stop and the stop has not started yet."""
    return _state.requested is not None and _state.stopping is None


def check() -> None:
    """A safe point: raise Interrupted if a signal asked to stop (inside held(), when the block ends)."""
    if _state.held or not requested():
        return
    _state.stopping = _state.requested
    raise Interrupted(_state.requested)


def keras_callback():
    """A Keras callback: on a stop request, `fit` returns after the call in flight (a batch, or steps_per_execution).

    It sets `model.stop_training`, which Keras reads after every training batch and every epoch;
    `check()` after `fit` returns raises the stop (`fit()` below does both)."""
    import keras

    class StopOnRequest(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if requested():
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            if requested():
                self.model.stop_training = True

    return StopOnRequest()


def fit(model, *args, callbacks=(), **kwargs):
    """`model.fit(*args, **kwargs)` that a signal stops between two batches, raising Interrupted after it."""
    history = model.fit(*args, callbacks=[*callbacks, keras_callback()], **kwargs)
    check()
    return history


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_on_signals(deferred: bool = False):
    """Inside, SIGINT and SIGTERM raise Interrupted in the main thread; the handlers are put back after.

    deferred=True: inside, the first signal is only recorded and raised at the next `check()` (or
    when the scope ends); a second one raises at once. Nested scopes share the outermost one's
    handlers. When an exception leaves the outermost scope, the `on_abort` callables run first
    (newest first), with the status it gives the run.
    """
    if not _in_main_thread():
        yield
        return
    outermost = _state.depth == 0
    if outermost:
        _state.stopping = _state.requested = None
        _state.previous = {}
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:
                continue
            _state.previous[signum] = previous
            signal.signal(signum, _handle)
    _state.depth += 1
    _state.deferred += int(deferred)
    try:
        try:
            yield
        finally:
            _state.deferred -= int(deferred)
        check()  # a request that no safe point saw: the scope still ends stopped
    except BaseException as err:
        if outermost:
            _run_aborts(run_status(err))
        raise
    finally:
        _state.depth -= 1
        if outermost:
            for signum, previous in _state.previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            _state.previous = {}
            _state.stopping = _state.requested = None


@contextmanager
def _holding():
    _state.held += 1
    try:
        yield
    finally:
        _state.held -= 1


@contextmanager
def held():
    """A block that a signal must not cut: a signal arriving inside is raised when it ends."""
    with _holding():
        yield
    check()


def on_abort(fn) -> None:
    """Call `fn(status)` if an exception leaves the outermost stop_on_signals() scope."""
    _state.aborts.append(fn)


def cancel_on_abort(fn) -> None:
    if fn in _state.aborts:
        _state.aborts.remove(fn)


def _run_aborts(status: str) -> None:
    aborts, _state.aborts = _state.aborts[::-1], []
    with _holding():  # not held(): the exception already on its way out stays the one that propagates
        for fn in aborts:
            try:
                fn(status)
            except Exception as err:  # noqa: BLE001 - one failing cleanup must not stop the others
                log.error("while stopping: %s", err)


def exit_on_signal(func):
    """Decorate a command's entry point: SIGINT / SIGTERM stop it with exit status 130 / 143.

    The signals raise Interrupted while `func` runs (at its next safe point where it defers them);
    when it reaches this level, one line goes to stderr (no traceback) and the process exits with
    128 + the signal's number.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with stop_on_signals():
                return func(*args, **kwargs)
        except KeyboardInterrupt as err:
            print(f"stopped by {signal_name(signum_of(err))}", file=sys.stderr, flush=True)
            sys.exit(exit_status(err))

    return wrapper
