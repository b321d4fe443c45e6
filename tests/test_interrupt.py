"""SIGTERM (SLURM, Kubernetes) and SIGINT (Ctrl-C) stop `python -m defense.run` cleanly.

Each test starts a real run on the Lab 3 extracts in a subprocess, waits for the log line of a phase,
sends the signal and checks what the scheduler and the user see afterwards: exit status 143 / 130,
the MLflow run (and a multirun's parent) ended KILLED, and the files written so far logged to it.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, lab3_overrides

# fine-tuning long enough to be stopped in the middle: 500 epochs of one batch each
LONG_FINETUNE = ["finetune=clean", "finetune.epochs=500", "finetune.holdout=0"]
FINETUNE_EPOCH = re.compile(r"fine-tune drop_\S+ epoch [3-9]/500")
PHASE_DEADLINE_S = 300  # TensorFlow's import alone takes tens of seconds on a loaded 2-core machine
EXIT_DEADLINE_S = 120


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Every test runs with Python's own SIGINT handler, as under an interactive shell's pytest, and puts back
    what was there: a runner started in the background of a non-interactive shell inherits SIGINT ignored, an
    ignored signal stays ignored in the children it starts (a handled one is reset to the default at exec), and
    stop_on_signals rightly leaves an ignored signal ignored, in process and in a child run alike."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class Cli:
    """`python -m defense.run args...` in a subprocess, its merged output read line by line."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "defense.run", *args], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def output(self) -> str:
        return "\n".join(self.lines[-40:])

    def wait_for(self, pattern: str | re.Pattern, deadline_s: float = PHASE_DEADLINE_S) -> str:
        """The first line (from here on) that matches `pattern`; fails if the run ends or the deadline passes."""
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        end = time.monotonic() + deadline_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                pytest.fail(f"no line matching {pattern.pattern!r} within {deadline_s} s:\n{self.output()}")
            if line is None:
                pytest.fail(f"the run ended (status {self.proc.wait()}) before {pattern.pattern!r}:\n{self.output()}")
            self.lines.append(line)
            if pattern.search(line):
                return line

    def stop(self, signum: int) -> tuple[int, int]:
        """Send `signum`; (exit status, time of sending in ms since the epoch, as MLflow's times)."""
        sent_ms = int(time.time() * 1000)
        self.proc.send_signal(signum)
        try:
            status = self.proc.wait(timeout=EXIT_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the run did not exit within {EXIT_DEADLINE_S} s of {signal.Signals(signum).name}")
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)
        return status, sent_ms


def _runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


def _artifacts(uri: str, run_id: str) -> set[str]:
    from mlflow import MlflowClient

    return {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run_id)}


def _check_killed_run(run, uri: str, run_dir: Path, sent_ms: int, must_have: tuple[str, ...],
                      logs_the_stop: bool = True) -> None:
    """KILLED, ended after the signal, its files logged (those it had written, at least `must_have`)."""
    assert run.info.status == "KILLED"
    assert run.info.end_time >= sent_ms  # ended by the signal (how soon is measured, not asserted: no timed tests)
    written = {name for name in ("config.yaml", "run.log", "curves.csv") if (run_dir / name).is_file()}
    assert set(must_have) <= written
    assert written <= _artifacts(uri, run.info.run_id)
    if logs_the_stop:  # the log that MLflow keeps records the stop
        assert "stopped by" in (run_dir / "run.log").read_text()
    assert not (run_dir / "summary.csv").exists()  # the run did not go on to its end


def test_sigterm_during_the_sweep_ends_the_run_killed(csaw_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    # progress bars on: tqdm must let the signal through
    overrides = [o for o in lab3_overrides() if not o.startswith("progress=")] + ["progress=true"]
    cli = Cli(*overrides, *LONG_FINETUNE, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}")
    cli.wait_for(r"^MLflow run \w+ in experiment")  # the run exists; data loading and the sweep follow
    status, sent_ms = cli.stop(signal.SIGTERM)

    assert status == 143, cli.output()
    assert "Traceback" not in "\n".join(cli.lines) and cli.lines[-1] == "stopped by SIGTERM"
    (run,) = _runs(uri)
    _check_killed_run(run, uri, run_dir, sent_ms, must_have=("config.yaml", "run.log"))


@pytest.mark.parametrize("signum, exit_status, extra", [
    (signal.SIGTERM, 143, []),
    # random 1-pixel shifts: Keras fits from a PyDataset instead of arrays
    (signal.SIGINT, 130, ["finetune.shift=1"]),
], ids=["SIGTERM", "SIGINT"])
def test_signal_during_finetuning_ends_the_run_killed(csaw_dir, tmp_path, signum, exit_status, extra):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    cli = Cli(*lab3_overrides("prune.drops=[2,10]"), *LONG_FINETUNE, *extra, f"tracking.uri={uri}",
              f"hydra.run.dir={run_dir}")
    cli.wait_for(FINETUNE_EPOCH)
    status, sent_ms = cli.stop(signum)

    name = signal.Signals(signum).name
    assert status == exit_status, cli.output()
    assert cli.lines[-1] == f"stopped by {name}" and "Traceback" not in "\n".join(cli.lines)
    (run,) = _runs(uri)
    _check_killed_run(run, uri, run_dir, sent_ms, must_have=("config.yaml", "run.log", "curves.csv"))
    # fine-tuning stopped where it was: the first B' had some of its 500 epochs, the second none
    epochs = MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "ft/drop_2/loss")
    assert 3 <= len(epochs) < 500
    assert "ft/drop_10/loss" not in run.data.metrics
    assert (run_dir / "models" / "model_B_2.h5").is_file() and not (run_dir / "models" / "model_B_2_ft.h5").exists()


def test_sigterm_to_a_multirun_ends_the_job_and_the_parent_killed(csaw_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "sweep"
    cli = Cli("-m", *lab3_overrides("prune.criterion=activation,l1", "prune.drops=[2]"), *LONG_FINETUNE,
              f"tracking.uri={uri}", f"hydra.sweep.dir={sweep_dir}")
    cli.wait_for(FINETUNE_EPOCH)
    status, sent_ms = cli.stop(signal.SIGTERM)

    assert status == 143, cli.output()
    assert cli.lines[-1] == "stopped by SIGTERM"
    runs = _runs(uri)
    (parent,) = [r for r in runs if r.data.tags.get("defense.parent") == "true"]
    children = [r for r in runs if r is not parent]
    # the second job never started: one child, the first job's
    assert [r.data.tags.get("mlflow.parentRunId") for r in children] == [parent.info.run_id]
    assert children[0].data.tags["criterion"] == "activation"
    _check_killed_run(children[0], uri, sweep_dir / "0", sent_ms, must_have=("config.yaml", "run.log", "curves.csv"))
    assert parent.info.status == "KILLED"
    assert sent_ms <= parent.info.end_time <= sent_ms + 10_000
    assert not (sweep_dir / "1").exists()


def test_sigterm_to_a_joblib_multirun_ends_the_killed_workers_runs(csaw_dir, tmp_path):
    """SIGTERM to the sweep's process alone (Kubernetes signals PID 1): joblib kills its workers with
    SIGKILL, so the parent ends their runs, KILLED, with their files."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "sweep"
    cli = Cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
              *lab3_overrides("prune.criterion=activation,l1", "prune.drops=[2]"), *LONG_FINETUNE,
              f"tracking.uri={uri}", f"hydra.sweep.dir={sweep_dir}")
    # each job logs its epoch 3 once: after two of these lines both jobs fine-tune
    cli.wait_for("fine-tune drop_2 epoch 3/500")
    cli.wait_for("fine-tune drop_2 epoch 3/500")
    status, sent_ms = cli.stop(signal.SIGTERM)

    assert status == 143, cli.output()
    runs = _runs(uri)
    (parent,) = [r for r in runs if r.data.tags.get("defense.parent") == "true"]
    children = sorted((r for r in runs if r is not parent), key=lambda r: r.data.tags["criterion"])
    assert [r.data.tags["criterion"] for r in children] == ["activation", "l1"]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in children)
    for child, job in zip(children, ("0", "1")):
        _check_killed_run(child, uri, sweep_dir / job, sent_ms, must_have=("config.yaml", "run.log", "curves.csv"),
                          logs_the_stop=False)
    assert parent.info.status == "KILLED"


def test_a_signal_during_a_tensorflow_op_is_raised_when_the_op_returns():
    """The main thread blocked in a C++ op (a queue's dequeue) gets SIGTERM: the process is not killed,
    and Interrupted is raised once the op has returned."""
    script = """
import os, signal, sys, threading, time
import tensorflow as tf
from defense.core import interrupt

queue = tf.queue.FIFOQueue(1, tf.float32)
main = threading.main_thread().ident
events = []

def signal_then_feed():
    # until the main thread is in the op's Python wrapper, a few lines before its C++ call
    while sys._current_frames()[main].f_code.co_name != 'queue_dequeue_v2':
        time.sleep(0.01)
    time.sleep(0.5)
    events.append('signal sent')
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)
    events.append('op can return')
    queue.enqueue(1.0)

with interrupt.stop_on_signals():
    threading.Thread(target=signal_then_feed, daemon=True).start()
    try:
        queue.dequeue()
        time.sleep(60)
        print('not interrupted')
    except interrupt.Interrupted as err:
        print('Interrupted', err.signum, 'after', events)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"Interrupted {int(signal.SIGTERM)} after ['signal sent', 'op can return']"


def test_a_failed_job_ends_its_multirun_parent_failed(csaw_dir, tmp_path):
    """Not a signal: a job that stops the sweep with an error leaves the parent FAILED, not RUNNING."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli = Cli("-m", *lab3_overrides("prune.criterion=activation,l1", "prune.layer=conv_9"),
              f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    status = cli.proc.wait(timeout=PHASE_DEADLINE_S)
    while (line := cli._queue.get(timeout=30)) is not None:
        cli.lines.append(line)

    assert status == 2, cli.output()
    assert any(line.startswith("error: ") and "conv_9" in line for line in cli.lines), cli.output()
    (parent,) = _runs(uri)  # the job failed on its input check, before creating its own run
    assert parent.data.tags.get("defense.parent") == "true"
    assert parent.info.status == "FAILED"


def test_held_signal_is_raised_at_the_end_and_later_signals_do_not_cut_the_cleanup():
    """In-process: signal.raise_signal runs the handler before it returns, so the order is exact."""
    from defense.core import interrupt

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    events, aborts = [], []
    with pytest.raises(interrupt.Interrupted) as stopped:
        with interrupt.stop_on_signals():
            interrupt.on_abort(aborts.append)
            with interrupt.held():
                signal.raise_signal(signal.SIGTERM)
                events.append("held block goes on")
            events.append("not reached")
    assert events == ["held block goes on"] and aborts == ["KILLED"]
    assert stopped.value.signum == signal.SIGTERM and interrupt.exit_status(stopped.value) == 143
    assert {s: signal.getsignal(s) for s in before} == before

    with pytest.raises(interrupt.Interrupted) as stopped:
        with interrupt.stop_on_signals():
            try:
                signal.raise_signal(signal.SIGINT)
                events.append("not reached")
            finally:
                signal.raise_signal(signal.SIGTERM)  # a second signal while stopping is only noted
                signal.raise_signal(signal.SIGINT)
                events.append("cleanup ran")
    assert events == ["held block goes on", "cleanup ran"]
    assert stopped.value.signum == signal.SIGINT and interrupt.exit_status(stopped.value) == 130
    assert {s: signal.getsignal(s) for s in before} == before


def test_an_error_leaving_the_scope_aborts_failed_and_a_normal_end_calls_nothing():
    from defense.core import interrupt

    aborts = []
    with pytest.raises(SystemExit):
        with interrupt.stop_on_signals():
            interrupt.on_abort(aborts.append)
            raise SystemExit(2)  # what defense.core.errors.exit_on_user_error raises in a single run
    with interrupt.stop_on_signals():
        interrupt.on_abort(aborts.append)
        interrupt.cancel_on_abort(aborts.append)
    assert aborts == ["FAILED"]


def test_parent_status_failed_beats_killed_beats_finished():
    from defense.tracking.tracker import parent_status

    assert parent_status([]) == "FINISHED"
    assert parent_status(["FINISHED", "FINISHED"]) == "FINISHED"
    assert parent_status(["FINISHED", "KILLED"]) == "KILLED"
    assert parent_status(["KILLED", "FAILED", "FINISHED"]) == "FAILED"
    assert parent_status(["FINISHED", "RUNNING"]) == "FAILED"  # a job that never ended its run


def test_in_a_run_the_first_signal_waits_for_a_safe_point_and_a_second_stops_at_once():
    """deferred=True (a defense run): the handler only records; check(), held()'s end and the scope's end raise."""
    from defense.core import interrupt

    events, aborts = [], []
    with pytest.raises(interrupt.Interrupted) as stopped:
        with interrupt.stop_on_signals(deferred=True):
            interrupt.on_abort(aborts.append)
            signal.raise_signal(signal.SIGTERM)
            events.append("the loop goes on to its safe point")
            assert interrupt.requested()
            interrupt.check()
            events.append("not reached")
    assert events == ["the loop goes on to its safe point"] and aborts == ["KILLED"]
    assert stopped.value.signum == signal.SIGTERM and interrupt.exit_status(stopped.value) == 143

    with pytest.raises(interrupt.Interrupted) as stopped:  # a second signal: at once, from the handler
        with interrupt.stop_on_signals(deferred=True):
            signal.raise_signal(signal.SIGINT)
            events.append("first recorded")
            signal.raise_signal(signal.SIGINT)
            events.append("not reached")
    assert events[-1] == "first recorded" and stopped.value.signum == signal.SIGINT

    with pytest.raises(interrupt.Interrupted):  # no safe point after the signal: the scope's end raises
        with interrupt.stop_on_signals(deferred=True):
            signal.raise_signal(signal.SIGTERM)
            events.append("body ended")
    assert events[-1] == "body ended"
    assert not interrupt.requested()  # the scope's state is cleared for the next run


def test_fit_stops_after_the_batch_in_flight_and_raises_once_fit_returned():
    import keras

    from defense.core import interrupt

    rng = np.random.default_rng(0)
    x, y = rng.random((64, 4), dtype=np.float32), rng.integers(0, 2, 64)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    batches = []

    class SignalAtBatch3(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batches.append(batch)
            if batch == 3:
                signal.raise_signal(signal.SIGINT)

    with pytest.raises(interrupt.Interrupted) as stopped:
        with interrupt.stop_on_signals(deferred=True):
            interrupt.fit(model, x, y, batch_size=4, epochs=5, verbose=0, callbacks=[SignalAtBatch3()])
    # 16 batches an epoch, 5 epochs: training ended with the batch in flight when the signal came
    assert batches == [0, 1, 2, 3] and stopped.value.signum == signal.SIGINT


# Fine-tuning from a PyDataset (as finetune.shift does), stopped by a signal from outside while Keras' data
# workers and TensorFlow's ops run: run again and again, never a crash status.
FIT_SCRIPT = """
import sys
import numpy as np
import keras
from defense.core import interrupt

class Shifted(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__(workers=2)
        self.x, self.y, self.rng = x, y, np.random.default_rng(0)
    def __len__(self):
        return len(self.y) // 32
    def __getitem__(self, i):
        x = np.roll(self.x[i * 32:(i + 1) * 32], int(self.rng.integers(-1, 2)), axis=1)
        return x, self.y[i * 32:(i + 1) * 32]

class Say(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        print(f"epoch {epoch + 1}", flush=True)

@interrupt.exit_on_signal
def main():
    rng = np.random.default_rng(0)
    x, y = rng.random((512, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, 512)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(16, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with interrupt.stop_on_signals(deferred=True):
        try:
            interrupt.fit(model, Shifted(x, y), epochs=10000, verbose=0, callbacks=[Say()])
        finally:
            print("cleanup ran", flush=True)

main()
"""


@pytest.mark.parametrize("signum, exit_status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_fit_from_a_pydataset_never_crashes(tmp_path, signum, exit_status):
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    statuses = []
    for attempt in range(5):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(f"epoch {2 + attempt}"):  # after a different number of epochs each time
                proc.send_signal(signum)
                break
        rest, _ = proc.communicate(timeout=EXIT_DEADLINE_S)
        lines += rest.splitlines()
        statuses.append(proc.returncode)
        assert proc.returncode == exit_status, f"attempt {attempt}: status {proc.returncode}\n" + "\n".join(lines[-30:])
        assert "cleanup ran" in lines and lines[-1] == f"stopped by {signal.Signals(signum).name}", "\n".join(lines[-30:])
    assert statuses == [exit_status] * 5


def test_a_signal_the_process_ignores_stays_ignored_inside_and_after_the_scope():
    """nohup and `cmd &` start a process with SIGINT ignored: a run keeps it so, as Python does."""
    from defense.core import interrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with interrupt.stop_on_signals(deferred=True):
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        signal.raise_signal(signal.SIGINT)
        assert not interrupt.requested()
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
