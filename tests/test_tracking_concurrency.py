"""Parallel jobs that log to one sqlite store at the same moment lose nothing.

MLflow's sqlalchemy store inserts a data set's row (experiment, name, digest) without an upsert: two
runs that log the same data set at once both find no row and the second insert fails on the unique
constraint. The leaderboard's and the compare test's joblib workers log the same clean and poisoned
sets, so without `defense.tracking.retry_first_insert` one job of a parallel sweep died at random.
Here N processes are released by a barrier, first to open the experiment (a first insert too) and
create their runs, then to log the same data sets; every run must end FINISHED with all its inputs.
"""

from __future__ import annotations

import multiprocessing

import numpy as np

N_PROCESSES = 6
EXPERIMENT = "same-data"


def _split(seed: int):
    from defense.data.arrays import LabeledImages
    from defense.pipeline.load import Split

    rng = np.random.default_rng(seed)  # the same seed in every process: the same content, the same digests
    clean = LabeledImages("clean", rng.random((20, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, 20),
                          path="/data/clean.h5")
    poisoned = LabeledImages("patch", rng.random((20, 8, 8, 1), dtype=np.float32), np.full(20, 2),
                             clean_label=rng.integers(0, 3, 20), path="/data/patch.h5")
    return Split(clean, {"patch": poisoned})


def _job(uri: str, index: int, barrier, results) -> None:
    """One parallel job: open the experiment, create a run, log the same validation and test sets."""
    try:
        from omegaconf import OmegaConf

        from defense.tracking.tracker import MlflowTracker

        cfg = OmegaConf.create({"tracking": {"kind": "mlflow", "uri": uri, "experiment": EXPERIMENT,
                                             "run_name": f"job {index}"}})
        valid, test = _split(1), _split(2)
        barrier.wait(timeout=120)  # every process creates the experiment at once
        tracker = MlflowTracker(cfg, {"job": str(index)})
        barrier.wait(timeout=120)  # and logs the same data sets at once
        tracker.log_datasets(valid, "validation", "race")
        tracker.log_datasets(test, "test", "race")
        tracker.end("FINISHED")
        results.put((index, tracker.run_id, ""))
    except BaseException as err:  # noqa: BLE001 - reported to the test, which fails on it
        results.put((index, None, f"{type(err).__name__}: {err}"))
        barrier.abort()


def test_parallel_runs_log_the_same_data_sets_and_keep_all_their_inputs(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # the store's tables exist before the race
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(N_PROCESSES)
    results = context.Queue()
    processes = [context.Process(target=_job, args=(uri, i, barrier, results)) for i in range(N_PROCESSES)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join(timeout=120)

    errors = [f"job {i}: {error}" for i, _, error in outcomes if error]
    assert not errors, "\n".join(errors)
    assert all(process.exitcode == 0 for process in processes)
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == EXPERIMENT]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["job"] for r in runs) == [str(i) for i in range(N_PROCESSES)]
    # one data set row per (name, digest), shared by every run: 2 splits x 2 sets, each with its context
    expected = {("race clean", "validation"), ("race patch", "validation"), ("race clean", "test"),
                ("race patch", "test")}
    digests = {}
    for run in runs:
        assert run.info.status == "FINISHED"
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        got = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]) for d in inputs}
        assert got == expected, run.info.run_name
        for d in inputs:
            digests.setdefault(d.dataset.name, set()).add(d.dataset.digest)
    # the validation and test sets differ in content, so each name has two digests across the runs
    assert {name: len(found) for name, found in digests.items()} == {"race clean": 2, "race patch": 2}
