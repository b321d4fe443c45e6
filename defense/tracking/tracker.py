"""Experiment tracking: MLflow (a sqlite store by default) or none.

One run per defense job: params = the flattened config, one metric per curve column logged with
`step=channels_pruned`, artifacts = plot, csvs, resolved config and the B' models, tags = model,
criterion, dataset. A multirun (`-m`) groups its jobs under one parent run, created by the Hydra
callback `MultirunParentRun` before the first job starts and tagged with the sweep's folder
(`sweep_dir`), overrides, command line (`sweep_command`) and package versions (`sweep_versions`).

The experiment is tagged as a model-training experiment (MLflow 3 then opens it on the runs table),
runs are named after what ran (`default_run_name`), the data sets are logged as dataset inputs with
content digests (`dataset_inputs`), and static facts (compact sizes, thresholds reached) are params.
"""

from __future__ import annotations

import json

import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from defense.core.errors import DefenseError, exit_on_user_error

log = logging.getLogger("defense.tracking")

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout (this file is defense/tracking/tracker.py)
PARENT_ENV = "DEFENSE_MLFLOW_PARENT_RUN_ID"
PARENT_FILE = "mlflow_parent_run_id.txt"


def default_uri() -> str:
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def resolve_uri(uri: str | None) -> str:
    """The tracking URI: `tracking.uri`, or the sqlite store at the project root."""
    uri = str(uri) if uri else default_uri()
    if "://" not in uri:
        raise DefenseError(
            f"tracking.uri={uri!r} is a plain path: MLflow 3's file store is not used here; give "
            f"sqlite:///<absolute path>/mlflow.db or an http(s):// tracking server"
        )
    if uri.startswith("file:"):
        raise DefenseError(f"tracking.uri={uri!r}: the MLflow file store is refused; use sqlite:///<abs path>/mlflow.db")
    return uri


def flatten(cfg, prefix: str = "") -> dict[str, str]:
    """Config -> {'prune.criterion': 'activation', ...} with list values as their YAML-ish text."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, str] = {}

    def walk(node, key):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            flat[key] = str(node)

    walk(container, prefix)
    return flat


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI, None for other stores."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_experiment(tracking_cfg) -> tuple[object, str, str]:
    """(client, experiment id, uri) for writing runs: the sqlite folder and the experiment are made."""
    uri = resolve_uri(tracking_cfg.get("uri"))
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = _client(uri)
    return client, _experiment_id(client, tracking_cfg.experiment, uri), uri


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        mark_model_training(client, exp)
        return exp.experiment_id
    location = None
    db = sqlite_path(uri)
    if db is not None:
        # artifacts beside the store, not relative to wherever the command was started
        location = (db.parent / "mlartifacts" / name).resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except Exception:  # noqa: BLE001 - created concurrently by a parallel job
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class Tracker:
    """No tracking (tracking=none): every call does nothing."""

    run_id: str | None = None
    experiment_id: str | None = None
    uri: str | None = None

    def log_metrics(self, rows: list[dict], step_key: str, prefix: str = "") -> None:
        pass

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def log_params(self, params: dict) -> None:
        pass

    def log_datasets(self, split, context: str, dataset_name: str) -> None:
        pass

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(Tracker):
    """One MLflow run, written through MlflowClient (no global active-run state)."""

    def __init__(self, cfg: DictConfig, tags: dict, parent_run_id: str | None = None):
        from mlflow.entities import Param

        self.client, exp_id, self.uri = open_experiment(cfg.tracking)
        self.experiment_id = exp_id
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_name = cfg.tracking.get("run_name") or default_run_name(cfg, self.client, parent_run_id)
        run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        log.info("MLflow run %s in experiment %r at %s", self.run_id, cfg.tracking.experiment, self.uri)

    def log_metrics(self, rows: list[dict], step_key: str, prefix: str = "") -> None:
        """Each numeric column of `rows` as a metric, one point per row at step=row[step_key]."""
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for row in rows:
            step = int(row[step_key])
            for key, value in row.items():
                if key == step_key or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if not math.isfinite(float(value)):
                    continue
                metrics.append(Metric(prefix + key, float(value), now, step))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        self.client.log_metric(self.run_id, key, float(value), step=int(step))

    def log_artifact(self, path, artifact_path=None) -> None:
        """A file, or every file of a folder, under `artifact_path` (default: the artifact root)."""
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, os.fspath(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, os.fspath(path), artifact_path)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_params(self, params: dict) -> None:
        """Static facts of the run (sizes, times, thresholds reached) as params, not step metrics."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_datasets(self, split, context: str, dataset_name: str) -> None:
        """Every set of `split` (a defense.pipeline.load.Split) as an MLflow dataset input (`dataset_inputs`).

        Parallel jobs log the same data sets at the same moment: `retry_first_insert` lets a job whose
        insert lost that race log its inputs again, against the row the other job wrote."""
        inputs = dataset_inputs(split, context, dataset_name)
        retry_first_insert(lambda: self.client.log_inputs(self.run_id, datasets=inputs),
                           f"logging the {context} data sets")

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        """`rows` as an MLflow table artifact (JSON; the UI shows it in the artifact view)."""
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        data = {c: [_table_value(row.get(c)) for row in rows] for c in columns}
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


FIRST_INSERT_ATTEMPTS = 8


def is_first_insert_race(err: BaseException) -> bool:
    """True for a store's refusal of a row that another process inserted a moment before.

    MLflow's sqlalchemy store (3.x) looks a data set up by (experiment, name, digest) and inserts it
    when it is not there, in one transaction without an upsert: two runs that log the same data set
    at once both find nothing, and the second insert fails on the unique constraint. SQLite words it
    "UNIQUE constraint failed", PostgreSQL "duplicate key value", MySQL "Duplicate entry"."""
    text = str(err)
    return any(marker in text for marker in ("UNIQUE constraint failed", "IntegrityError", "duplicate key value",
                                             "Duplicate entry"))


def retry_first_insert(call, what: str, attempts: int = FIRST_INSERT_ATTEMPTS):
    """`call()`, called again when it loses a first-insert race (`is_first_insert_race`).

    The failed transaction is rolled back whole, and the row that won now exists, so the next attempt
    finds it instead of inserting it. A short randomised wait keeps two losers apart; any other
    error, or a race lost `attempts` times, propagates."""
    import random

    from mlflow.exceptions import MlflowException

    wait = random.Random()  # its own generator: the seeded global one is left as it was
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except MlflowException as err:
            if attempt == attempts or not is_first_insert_race(err):
                raise
            log.debug("%s: a parallel run inserted the same row first (attempt %d), trying again", what, attempt)
            time.sleep(wait.uniform(0.05, 0.25) * attempt)
    return None  # pragma: no cover - the loop returns or raises


def parent_run_id() -> str | None:
    """The parent run of the current multirun job, if this job is part of one."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        sweep_dir = hc.sweep.dir
    except Exception:  # noqa: BLE001 - no Hydra context (tests composing configs, library use)
        return None
    # The sweep folder's marker first: the callback rewrites it for every sweep, whereas the
    # environment variable is frozen in worker processes when they start, and joblib/loky keeps
    # its workers for the next multirun of the same Python process (whose jobs would otherwise
    # join the previous sweep's parent). The variable serves where the folder is not shared.
    marker = Path(sweep_dir) / PARENT_FILE
    if marker.is_file() and marker.read_text().strip():
        return marker.read_text().strip()
    return os.environ.get(PARENT_ENV) or None


def make_tracker(cfg: DictConfig, tags: dict) -> Tracker:
    kind = cfg.tracking.get("kind", "mlflow")
    if kind == "none":
        return Tracker()
    if kind != "mlflow":
        raise DefenseError(f"tracking.kind={kind!r} is not known; use tracking=mlflow or tracking=none")
    return MlflowTracker(cfg, tags, parent_run_id())


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


class MultirunParentRun(Callback):
    """Hydra callback: one MLflow parent run per multirun sweep; the jobs become its children.

    It ends FINISHED when every child finished, FAILED when one failed (or never ended), KILLED
    when children were stopped by a signal and none failed. Hydra skips `on_multirun_end` when a job
    raises (basic and joblib launchers) or the sweep is stopped: the parent then ends from
    `defense.core.interrupt.on_abort`, KILLED on SIGINT / SIGTERM and FAILED otherwise.
    """

    @exit_on_user_error
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from defense.core import interrupt
        from defense.core import provenance
        from defense.config import check_sweep_axes

        check_sweep_axes(config)  # a bad sweep axis (e.g. leaderboard.seeds=[]) stops here, before any run
        if config.get("tracking", {}).get("kind") != "mlflow":
            return
        client, exp_id, _ = open_experiment(config.tracking)
        sweep_dir = str(config.hydra.sweep.dir)
        overrides = " ".join(config.hydra.overrides.task)
        with interrupt.held():  # a signal must not fall between creating the parent and keeping its id
            run = client.create_run(
                exp_id,
                run_name=sweep_run_name(list(config.hydra.overrides.task), sweep_dir),
                tags={"sweep_dir": sweep_dir, "sweep_overrides": overrides, "defense.parent": "true",
                      "sweep_command": provenance.command_line(), "sweep_versions": provenance.versions_text()},
            )
            self._run = (client, run.info.run_id)
            interrupt.on_abort(self._end_aborted)
        os.environ[PARENT_ENV] = run.info.run_id
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        (Path(sweep_dir) / PARENT_FILE).write_text(run.info.run_id)
        log.info("MLflow parent run %s for the sweep in %s", run.info.run_id, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from defense.core import interrupt

        run = getattr(self, "_run", None)
        if run is None:
            interrupt.cancel_on_abort(self._end_aborted)
            return
        client, run_id = run
        with interrupt.held():  # (if this raises, the parent still ends from on_abort)
            children = client.search_runs(
                [client.get_run(run_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
            )
            self._end(parent_status([child.info.status for child in children]))
            interrupt.cancel_on_abort(self._end_aborted)

    def _end_aborted(self, status: str) -> None:
        if getattr(self, "_run", None) is None:
            return
        client, run_id = self._run
        log.warning("the sweep ended early or with a failed job: MLflow parent run %s ends %s", run_id, status)
        try:
            end_orphaned_children(client, run_id, status)
        finally:
            self._end(status)

    def _end(self, status: str) -> None:
        client, run_id = self._run
        self._run = None
        client.set_terminated(run_id, status=status)
        os.environ.pop(PARENT_ENV, None)


def files_kept(out_dir: str | os.PathLike, status: str) -> list[Path]:
    """The files of a run folder logged when the run ends: its logs, and more when it did not finish."""
    out_dir = Path(out_dir)
    kept = sorted(out_dir.glob("*.log"))
    if status != "FINISHED":  # keep in MLflow what the failed or stopped run had written
        kept += [out_dir / name for name in ("config.yaml", "curves.csv") if (out_dir / name).is_file()]
    return kept


def run_tags() -> dict[str, str]:
    """Where a run's process runs (tags defense.host, defense.pid): a stopped sweep ends the runs of dead jobs."""
    import socket

    return {"defense.host": socket.gethostname(), "defense.pid": str(os.getpid())}


def _process_gone(pid: int) -> bool:
    """True when process `pid` of this machine has ended (a zombie that was not reaped yet counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def end_orphaned_children(client, parent_id: str, status: str, wait_s: float = 5.0) -> None:
    """End the RUNNING children of a stopped sweep whose job process died without ending its run.

    joblib kills its workers with SIGKILL when the sweep is stopped, before a worker may have ended
    its run: such a run (same machine, process gone) ends with `status`, its files logged from
    `defense.run_dir`. Runs of processes still alive, or on other machines, are left to end themselves.
    """
    import socket

    experiment_id = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    host = socket.gethostname()
    local = {}
    for child in children:
        tags = child.data.tags
        pid = tags.get("defense.pid", "")
        if child.info.status == "RUNNING" and tags.get("defense.host") == host and pid.isdigit() \
                and int(pid) != os.getpid():
            local[child.info.run_id] = (int(pid), tags.get("defense.run_dir"))
    deadline = time.monotonic() + wait_s
    while local:
        for child_id, (pid, run_dir) in list(local.items()):
            if not _process_gone(pid):
                continue
            del local[child_id]
            if client.get_run(child_id).info.status != "RUNNING":
                continue
            for path in files_kept(run_dir, status) if run_dir else []:
                client.log_artifact(child_id, os.fspath(path))
            client.set_terminated(child_id, status=status)
            log.warning("MLflow run %s of the sweep (its process %d has ended) ends %s", child_id, pid, status)
        if local and time.monotonic() > deadline:
            break
        time.sleep(0.1)


def parent_status(child_statuses: list[str]) -> str:
    """A multirun parent's status from its children's: FAILED beats KILLED beats FINISHED."""
    statuses = set(child_statuses)
    if statuses <= {"FINISHED"}:
        return "FINISHED"
    if statuses <= {"FINISHED", "KILLED"}:
        return "KILLED"
    return "FAILED"


# --- MLflow-native run contents: experiment kind, run names, dataset inputs --------------------

# MLflow 3's UI opens an experiment by its kind: `genai_development` (traces) or
# `custom_model_development` (the runs table); an experiment without the tag is guessed at.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# The runs table of MLflow's UI shows the columns a user picked (kept in the browser); a view saved as an
# experiment tag `mlflow.sharedViewState.<key>` opens with `#/experiments/<id>/runs?viewStateShareKey=<key>`
# (what the UI's "Share" button writes; plain JSON is accepted). This one leads with the headline metrics
# (the selected point's scores, defense/reporting/report.py HEADLINE_COLUMNS) and the defense's name.
RESULTS_VIEW_KEY = "results"
RESULTS_VIEW_TAG = "mlflow.sharedViewState." + RESULTS_VIEW_KEY
RESULTS_VIEW = {
    "selectedColumns": ["tags.`defense_name`", "metrics.`test_acc`", "metrics.`test_asr`", "metrics.`der`",
                        "metrics.`ft_test_acc`", "metrics.`ft_test_asr`", "metrics.`channels_pruned`"],
    "orderByKey": "attributes.start_time",
    "orderByAsc": False,
}
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, RESULTS_VIEW_TAG: json.dumps(RESULTS_VIEW)}
# Hydra overrides that never name what a sweep varies
_NAME_SKIP_PREFIXES = ("hydra.", "hydra/")


def runs_table_url(ui: str, experiment_id: str | None) -> str:
    """The address of the experiment's runs table on the results view, under the MLflow UI at `ui`."""
    return f"{ui}/#/experiments/{experiment_id}/runs?viewStateShareKey={RESULTS_VIEW_KEY}"


def mark_model_training(client, experiment) -> None:
    """Tag an experiment made before the kind and the results view were set (or by another tool): model
    training, and the runs table's results view."""
    for key, value in EXPERIMENT_TAGS.items():
        if key not in (experiment.tags or {}):
            client.set_experiment_tag(experiment.experiment_id, key, value)


def swept_keys(sweep_overrides: list[str]) -> list[str]:
    """The keys a multirun sweeps (`prune.criterion=activation,l1` -> prune.criterion), in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(sweep_overrides))
    except Exception:  # noqa: BLE001 - an override Hydra itself accepted but we cannot re-parse
        return []
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def job_overrides() -> list[str]:
    """The overrides of the current Hydra job (empty outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(o) for o in HydraConfig.get().overrides.task]
    except Exception:  # noqa: BLE001 - no Hydra context (tests composing configs, library use)
        return []


def sweep_run_name(sweep_overrides: list[str], sweep_dir: str) -> str:
    """A sweep's parent run: `sweep prune.criterion=activation,l1` (what it varies), else its folder."""
    keys = swept_keys(sweep_overrides)
    swept = [o for o in sweep_overrides if o.split("=", 1)[0].lstrip("+~") in keys]
    return ("sweep " + " ".join(swept))[:250] if swept else f"sweep {Path(sweep_dir).name}"


def default_run_name(cfg, client=None, parent_run_id: str | None = None) -> str:
    """What ran: `lab3 activation conv_3` (+ `finetune clean`); a sweep's job: the overrides it sweeps.

    A job of a multirun is named by its own values of the keys the sweep varies (read from the
    parent run's `sweep_overrides` tag), e.g. `prune.criterion=l1`; all of its overrides when
    the sweep's cannot be read.
    """
    if parent_run_id:
        overrides = [o for o in job_overrides() if not o.startswith(_NAME_SKIP_PREFIXES)]
        keys: list[str] = []
        if client is not None:
            try:
                text = client.get_run(parent_run_id).data.tags.get("sweep_overrides", "")
                import shlex

                keys = swept_keys(shlex.split(text))
            except Exception:  # noqa: BLE001 - the name is a convenience; the run must start anyway
                keys = []
        chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys] or overrides
        if chosen:
            return " ".join(chosen)[:250]
    finetune = cfg.get("finetune", {}).get("kind", "none")
    path = cfg.model.get("path")  # the weights file: two files of one model kind get two names
    stem = Path(str(path)).stem if path else ""
    parts = [cfg.model.get("name") or "model", stem if stem != cfg.model.get("name") else "", cfg.prune.criterion,
             cfg.prune.get("layer") or ""]
    if finetune and finetune != "none":
        parts.append(f"finetune {finetune}")
    return " ".join(str(p) for p in parts if p)


def images_digest(images) -> str:
    """A digest of one set's content (pixels, labels, clean labels): a changed file changes it."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for array in (images.x, images.y, images.clean_label):
        if array is None:
            continue
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.data)
    return h.hexdigest()[:16]


def dataset_inputs(split, context: str, dataset_name: str) -> list:
    """MLflow DatasetInputs for the clean and poisoned sets of `split`.

    Name `<dataset> <set>` (e.g. `csaw_extract clean`), source = the file(s) read, digest =
    `images_digest` of the images actually used (for csaw_extract: the half of the file), context
    tag = `context` (`validation` / `test`), as `mlflow.log_input` records them.
    """
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    # the source type MLflow gives local files (`mlflow.log_input` of a path), built for every path
    # here, so that a data set of several files ("a.h5 + b.h5") is not mistaken for another type
    local = next(s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource")
    inputs = []
    for images in split.all_sets():
        source = local(images.path or "unknown")
        schema = Schema([TensorSpec(images.x.dtype, (-1, *images.x.shape[1:]), "images"),
                         TensorSpec(images.y.dtype, (-1,), "labels")])
        dataset = MetaDataset(source, name=f"{dataset_name} {images.name}", digest=images_digest(images),
                              schema=schema)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    return inputs


def _table_value(value):
    """A table cell MLflow's JSON table accepts (NaN -> None, numpy scalars -> Python)."""
    import math

    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
