"""`python -m defense.run`: the pruning defense end to end (Fine-Pruning, Liu et al. 2018; CSAW-HackML Lab 3).

    python -m defense.run prune.criterion=activation prune.drops=[2,4,10,30]
    python -m defense.run -m prune.criterion=activation,l1          # a sweep: one parent MLflow run

Writes to the run folder (Hydra's output dir): curves.csv, summary.csv, prune_result.png,
models/model_B_{drop}.h5, config.yaml and run.log; logs the same to MLflow. The work is done by the
stages of defense/pipeline/stages/ (setup, load, sweep, points, keep, finetune, report, track), in order.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from defense.config import defense_name
from defense.core import interrupt, profile
from defense.core.errors import exit_on_user_error
from defense.reporting import terminal
from defense.pipeline import schemas  # noqa: F401  (registers the schema that conf/config.yaml names)

log = logging.getLogger("defense.run")


def run_defense(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run the defense described by `cfg`, writing into `out_dir`; returns the result summary.

    SIGINT or SIGTERM (defense/core/interrupt.py) stops it at the next safe point (between batches,
    iterations and stages): the MLflow run ends KILLED with the files written so far, and Interrupted
    (a KeyboardInterrupt) propagates. A second signal stops it at once.
    """
    with interrupt.stop_on_signals(deferred=True):
        result = _run_stages(cfg, Path(out_dir))
    if cfg.tracking.get("register"):  # after the run is logged: a refused registration leaves it whole
        from defense.tracking.mlflow_model import register

        result["registered"] = register(cfg.tracking, result["run_id"], result["summary"], result["model_uris"])
    return result


def _run_stages(cfg: DictConfig, out_dir: Path) -> dict:
    """`setup`, then the MLflow run, then every other stage; the run ends FINISHED, FAILED or KILLED."""
    from defense.pipeline import stages
    from defense.pipeline.context import RunContext
    from defense.pipeline.sweep import layer_label
    from defense.tracking import tracker as tracking

    ctx = RunContext(cfg, out_dir, time.perf_counter())
    startup = profile.startup_seconds()
    setup, *tracked = stages.ordered()
    ctx.call(setup.run)  # no MLflow run yet: a bad option or model fails with none logged
    status = "FAILED"
    try:
        with interrupt.held():  # a signal must not fall between creating the run and keeping its id
            ctx.tracker = tracking.make_tracker(
                cfg, {"model": cfg.model.name, "criterion": cfg.prune.criterion, "dataset": cfg.dataset.get("kind"),
                      "layer": "all" if cfg.prune.layer == "all" else layer_label(ctx.layers),
                      "finetune": cfg.get("finetune", {}).get("kind", "none"),
                      "defense_name": defense_name(cfg),
                      "defense.run_dir": str(out_dir.resolve()), **tracking.run_tags()}
            )
        for stage in tracked:
            interrupt.check()  # a safe point between stages (defense/core/interrupt.py)
            ctx.call(stage.run)
        interrupt.check()  # a stop asked for in the last stage: the run ends KILLED, not FINISHED
        status = "FINISHED"
        return ctx.result()
    except BaseException as err:
        status = interrupt.run_status(err)
        if status == "KILLED":
            log.warning("stopped by %s: the run ends KILLED; the files written so far stay in %s",
                        interrupt.signal_name(interrupt.signum_of(err)), out_dir)
        raise
    finally:
        t0 = time.perf_counter()
        if ctx.tracker is not None:
            with interrupt.held():  # end the run even if another signal comes
                for path in tracking.files_kept(out_dir, status):
                    ctx.tracker.log_artifact(path)
                ctx.tracker.end(status)
        if out_dir.is_dir():
            profile.write(out_dir, {"stages": ctx.stage_seconds,
                                    "sweep": dict(getattr(ctx.sweep, "seconds", None) or {}),
                                    "mlflow_end": time.perf_counter() - t0, "startup": startup,
                                    "total": time.perf_counter() - ctx.started + startup, "status": status})


@terminal.one_line_errors
@interrupt.exit_on_signal
@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@exit_on_user_error(in_sweep=terminal.in_hydra_sweep)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    started = time.perf_counter()
    terminal.quiet(bool(cfg.get("verbose", False)))
    result = run_defense(cfg, HydraConfig.get().runtime.output_dir)
    from defense.tracking.tracker import runs_table_url

    runs_url = runs_table_url(terminal.MLFLOW_UI, result.get("experiment_id")) if result["run_id"] else None
    log.info("%s", terminal.footer(result["out_dir"], result["summary"], result["curves"][0],
                                   time.perf_counter() - started, result.get("tracking_uri"),
                                   result.get("experiment_id"), result["run_id"], runs_url))


if __name__ == "__main__":
    main()
