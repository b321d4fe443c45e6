"""G(B, B') as MLflow models: one pyfunc per kept threshold (and per B''), registration, alias `champion`.

`log_repaired_models` logs, into the run, the pyfunc `g_drop_<drop>` for every reached threshold
(and `g_drop_<drop>_ft` for every fine-tuned B''): the model code `defense/tracking/pyfunc_g.py`, B and B'
(compact where exported) as artifacts, `defense/core/safe_files.py` in the model's `code/` folder, a
signature (float32 raw pixels (-1, H, W, C) -> int64 class (-1,)), an input example (clean
validation images) and pinned requirements, so `mlflow.pyfunc.load_model` and `mlflow models serve`
work without this project installed.

`register` registers the model chosen by `tracking.register_drop` (default: the defender's point,
`g_defender`, chosen on held-out clean validation images by defense/pipeline/select.py; in a summary
without it, the largest threshold reached) under `tracking.register` and points the alias `champion` at
the new version. The oracle's point (`g_oracle_test_asr`, chosen by test ASR) is logged beside the others
for comparison, tagged `oracle: true`, and never registered by default.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from defense.core.errors import DefenseError

log = logging.getLogger("defense.mlflow_model")

PACKAGE = Path(__file__).resolve().parent
MODEL_CODE = PACKAGE / "pyfunc_g.py"  # PACKAGE: defense/tracking
# what the model's code/ folder ships: the file checks and their error type (no other project code)
SHIPPED = ("__init__.py", "core/__init__.py", "core/errors.py", "core/safe_files.py")  # under defense/
CHAMPION = "champion"
INPUT_EXAMPLE_IMAGES = 2


OWN_POINT = "operating_point"  # summary.csv `point` of a criterion's own operating point (defense/pipeline/operating_point.py)
DEFENDER = "defender"  # summary.csv `point` of the defender's point (defense/pipeline/select.py)
ORACLE = "oracle_test_asr"  # ... and of the oracle's point (looked at test data)
NAMED_POINTS = (OWN_POINT, DEFENDER, ORACLE)


def model_name(drop: float, finetuned: bool = False, own_point: bool = False, point: str | None = None) -> str:
    """The name of a threshold's logged model: g_drop_10, g_drop_10_ft (B''); g_operating_point(_ft) for the
    criterion's own operating point; g_defender(_ft), g_oracle_test_asr(_ft) for `point`."""
    if point in NAMED_POINTS:
        return f"g_{point}" + ("_ft" if finetuned else "")
    return ("g_operating_point" if own_point else f"g_drop_{drop:g}") + ("_ft" if finetuned else "")


def _row_point(row: dict) -> str | None:
    return row.get("point") if row.get("point") in NAMED_POINTS else None


def requirements() -> list[str]:
    """Pinned pip requirements of the logged model: the versions this run used."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "tensorflow", "keras", "numpy", "h5py")]


def _code_folder(tmp: Path) -> Path:
    """A `defense` package holding only the file checks, for the model's code/ folder."""
    package = tmp / "defense"
    for name in SHIPPED:
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PACKAGE.parent / name, package / name)
    return package


def _signature(input_shape):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *[int(s) for s in input_shape]))]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
    )


def repaired_files(summary: list[dict]) -> list[tuple[str, float, str]]:
    """(logged model name, drop, B' file) for every reached threshold, then every B'' (compact first)."""
    chosen = []
    for row in summary:
        if not row.get("reached") or not row.get("model_path"):
            continue
        full = Path(row["model_path"])
        compact = full.with_name(full.stem + "_compact.h5")
        chosen.append((model_name(row["drop"], point=_row_point(row)), float(row["drop"]),
                       str(compact if compact.is_file() else full)))
    for row in summary:
        if row.get("ft_model_path") and row.get("diverged") is not True:  # a diverged B'' is no defense
            path = row.get("ft_compact_path") or row["ft_model_path"]
            chosen.append((model_name(row["drop"], True, point=_row_point(row)), float(row["drop"]), str(path)))
    return chosen


def log_repaired_models(cfg, tracker, model_b, summary: list[dict], example_images: np.ndarray) -> dict[str, str]:
    """Log G(B, B') of every kept threshold as a pyfunc into the tracker's run; {name: model URI}."""
    if tracker.run_id is None:
        return {}
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from defense.nets import models

    files = repaired_files(summary)
    if not files:
        return {}
    uris = {}
    with tempfile.TemporaryDirectory(prefix="g-model-") as tmp:
        tmp = Path(tmp)
        b_path = models.save_model(model_b, str(tmp / "model_B.h5"))
        code = _code_folder(tmp / "code")
        example = np.asarray(example_images[:INPUT_EXAMPLE_IMAGES], dtype=np.float32)
        divisor = float(models.input_divisor(cfg.model))
        client = MlflowClient(tracking_uri=tracker.uri)
        experiment_id = client.get_run(tracker.run_id).info.experiment_id
        with _use_tracking_uri(tracker.uri):
            for name, drop, repaired in files:
                point = next((p for p in NAMED_POINTS if name.startswith(f"g_{p}")), None)
                tags = {"drop": f"{drop:g}" if math.isfinite(drop) else point, "repaired_file": Path(repaired).name,
                        "oracle": str(point == ORACLE).lower()}
                # created here, in the run's experiment (Model.log alone would use the active experiment)
                logged = client.create_logged_model(experiment_id, name=name, source_run_id=tracker.run_id,
                                                    tags=tags, model_type="G(B, B')")
                settings = tmp / name / "settings.json"  # the model's settings (not model_config: MLflow
                settings.parent.mkdir()                     # would copy that into the run's params)
                settings.write_text(json.dumps({
                    "num_classes": int(cfg.model.num_classes), "input_divisor": divisor, "drop": drop,
                    "layer": str(cfg.prune.layer), "repaired_file": Path(repaired).name}))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "add type hints to predict": a tensor signature is given
                    info = Model.log(
                        artifact_path=None,
                        name=name,
                        flavor=mlflow.pyfunc,
                        run_id=tracker.run_id,
                        python_model=str(MODEL_CODE),
                        artifacts={"model_b": b_path, "repaired": repaired, "settings": str(settings)},
                        code_paths=[str(code)],
                        signature=_signature(cfg.model.input_shape),
                        input_example=example,
                        pip_requirements=requirements(),
                        model_id=logged.model_id,
                    )
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
                uris[name] = info.model_uri
                log.info("logged G(B, B') %s (%s) as %s", name, Path(repaired).name, info.model_uri)
    tracker.set_tags({"defense.models": " ".join(uris)})
    return uris


def chosen_drop(summary: list[dict], register_drop) -> float:
    """The threshold whose G(B, B') is registered: `register_drop`, or nan for the defender's point where the
    summary has it reached, else the largest threshold reached."""
    if register_drop is None and any(row.get("point") == DEFENDER and row.get("reached") and not row.get("diverged")
                                     for row in summary):
        return float("nan")
    summary = [row for row in summary if row.get("point") not in NAMED_POINTS]  # the accuracy-drop thresholds
    reached = [float(row["drop"]) for row in summary if row.get("reached")]
    drops = [float(row["drop"]) for row in summary]
    if register_drop is None:
        if not reached:
            raise DefenseError("tracking.register: no threshold of prune.drops was reached, so there is no B' to "
                               "register; lower prune.drops or prune more (stop=all)")
        return max(reached)
    try:
        value = float(register_drop)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value not in drops:
        shown = f"{value:g}" if math.isfinite(value) else register_drop
        raise DefenseError(f"tracking.register_drop={shown}: not one of prune.drops {[f'{d:g}' for d in drops]}; "
                           "give one of them, or leave it unset for the defender's point")
    if value not in reached:
        raise DefenseError(f"tracking.register_drop={value:g}: that threshold was not reached in this run (reached: "
                           f"{[f'{d:g}' for d in reached] or 'none'}); choose a reached one")
    return value


def check_register_name(name: str) -> None:
    """A registered model name MLflow accepts (no '/', ':', path tricks, not empty)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(str(name))
    except MlflowException as err:
        raise DefenseError(f"tracking.register={name!r}: MLflow refuses that model name ({err.message}); "
                           "give a name without '/' or ':', e.g. tracking.register=lab3-repaired") from None


def register(tracking_cfg, run_id: str | None, summary: list[dict], model_uris: dict[str, str]) -> dict:
    """Register the chosen G(B, B') under `tracking.register`, alias `champion`; {name, version, drop, point, source}
    (point: `defender`, drop nan, by default; `drop` for tracking.register_drop)."""
    name = tracking_cfg.get("register")
    if tracking_cfg.get("kind") != "mlflow" or run_id is None:
        raise DefenseError(f"tracking.register={name}: registering needs the MLflow run; use tracking=mlflow "
                           "(the run's files are in its output folder)")
    check_register_name(name)
    drop = chosen_drop(summary, tracking_cfg.get("register_drop"))
    point = DEFENDER if math.isnan(drop) else "drop"
    what = "the defender's point" if point == DEFENDER else f"drop {drop:g}"
    uri = model_uris.get(model_name(drop, point=DEFENDER if point == DEFENDER else None))
    if uri is None:
        raise DefenseError(f"tracking.register: G(B, B') of {what} was not logged (tracking.log_models=false?); "
                           "set tracking.log_models=true")
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from defense.tracking.tracker import resolve_uri

    tracking_uri = resolve_uri(tracking_cfg.get("uri"))
    try:
        with _use_tracking_uri(tracking_uri):
            version = mlflow.register_model(uri, str(name), tags={"drop": f"{drop:g}" if point == "drop" else point,
                                                                  "run_id": run_id})
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        client.set_registered_model_alias(str(name), CHAMPION, version.version)
    except MlflowException as err:
        raise DefenseError(f"tracking.register={name!r}: MLflow refused the registration ({err.message})") from None
    log.info("registered G(B, B') of %s as %s version %s, alias %s (models:/%s@%s)", what, name,
             version.version, CHAMPION, name, CHAMPION)
    return {"name": str(name), "version": version.version, "drop": drop, "point": point, "source": uri}

