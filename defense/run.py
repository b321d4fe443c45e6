"""`python -m defense.run`: the pruning defense end to end (Fine-Pruning, Liu et al. 2018; CSAW-HackML Lab 3).

    python -m defense.run prune.criterion=activation prune.drops=[2,4,10,30]
    python -m defense.run -m prune.criterion=activation,l1          # a sweep: one parent MLflow run

Writes to the run folder (Hydra's output dir): curves.csv, summary.csv, prune_result.png,
models/model_B_{drop}.h5, config.yaml and run.log; logs the same to MLflow.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from defense import interrupt
from defense.config import check_config, seed_everything, warn_if_near_chance
from defense.errors import exit_on_user_error

log = logging.getLogger("defense.run")


def run_defense(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run the defense described by `cfg`, writing into `out_dir`; returns the result summary.

    SIGINT or SIGTERM (defense/interrupt.py) stops it at any step: the MLflow run ends KILLED with
    the files written so far, and Interrupted (a KeyboardInterrupt) propagates.
    """
    with interrupt.stop_on_signals():
        result = _run_defense(cfg, out_dir)
    if cfg.tracking.get("register"):  # after the run is logged: a refused registration leaves it whole
        from defense.mlflow_model import register

        result["registered"] = register(cfg.tracking, result["run_id"], result["summary"], result["model_uris"])
    return result


def _run_defense(cfg: DictConfig, out_dir: str | Path) -> dict:
    from defense import autodetect, datasets, models, plots, report, sweep, tracking
    from defense.safe_files import Limits

    # input checks first: a bad option fails here, before any data is read or any run is logged
    check_config(cfg, "run")
    seed_everything(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if cfg.tracking.get("kind") == "mlflow":
        tracking.resolve_uri(cfg.tracking.get("uri"))
    model_path = datasets.resolve_model_path(cfg.model, cfg.dataset)
    limits = Limits.from_cfg(cfg)
    model = models.load_model(cfg.model, model_path, limits)
    autodetect.complete_model_config(cfg.model, model, model_path)
    sweep.check_layers(cfg, model)  # also fills prune.layer / prune.probe where null
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    tracker = None
    status = "FAILED"
    try:
        with interrupt.held():  # a signal must not fall between creating the run and keeping its id
            tracker = tracking.make_tracker(
                cfg, {"model": cfg.model.name, "criterion": cfg.prune.criterion, "dataset": cfg.dataset.get("kind"),
                      "layer": cfg.prune.layer, "finetune": cfg.get("finetune", {}).get("kind", "none"),
                      "defense.run_dir": str(out_dir.resolve()), **tracking.run_tags()}
            )
        valid = datasets.load_split(cfg.dataset, cfg.model, "valid", limits)
        if cfg.model.get("input_divisor") is None:
            divisor = autodetect.choose_input_divisor(cfg.model, model, valid.clean, int(cfg.get("batch_size", 512)))
            tracker.set_tags({"input_divisor": f"{divisor:g}"})
            OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
        test = datasets.load_split(cfg.dataset, cfg.model, "test", limits)
        tracker.log_datasets(valid, "validation", str(cfg.dataset.get("kind")))
        tracker.log_datasets(test, "test", str(cfg.dataset.get("kind")))
        log.info(
            "model %s (%s); %d clean + %s poisoned validation images, %d clean + %s poisoned test images",
            cfg.model.name, model_path, len(valid.clean), [len(v) for v in valid.poisoned.values()],
            len(test.clean), [len(v) for v in test.poisoned.values()],
        )
        result = sweep.run_sweep(cfg, model, valid, test, progress=bool(cfg.get("progress", True)))
        warn_if_near_chance(result.curves[0]["valid_acc"], cfg.model, "the unpruned network's clean validation accuracy")
        log.info("sweep of %d steps in %.1f s (%s)", result.steps, sum(result.seconds.values()),
                 ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
        report.write_csv(out_dir / "curves.csv", result.curves)
        tracker.log_metrics(result.curves, step_key="channels_pruned")

        models_dir = out_dir / "models"
        summary = report.summary_rows(result.thresholds)
        for row in summary:
            row["model_path"] = ""
            if not row["reached"]:
                continue
            pruned = result.order[: row["channels_pruned"]]
            b_prime = models.pruned_copy(model, cfg.prune.layer, pruned)
            path = models.save_model(b_prime, models_dir / f"model_B_{sweep.drop_name(row['drop'])}.h5")
            row["model_path"] = str(path)
            if cfg.get("compact", True):  # also save B' without its pruned channels (defense/compact.py)
                from defense.compact import compact_path, export_compact
                export_compact(b_prime, cfg.prune.layer, pruned, compact_path(path), tracker,
                               x=models.scale_inputs(test.clean.x, cfg.model))
        finetune_extra = _finetune(cfg, model, result, summary, valid, test, out_dir, tracker)

        report.write_csv(out_dir / "summary.csv", summary, first=report.SUMMARY_COLUMNS)
        tracker.log_params(report.threshold_params(summary))
        tracker.log_table(summary, "thresholds.json")
        with open(out_dir / "pruning_order.txt", "w") as f:
            f.write(" ".join(str(int(c)) for c in result.order) + "\n")
        title = (f"Pruning {cfg.prune.layer} of {cfg.model.name} by {cfg.prune.criterion} "
                 f"({len(valid.clean)} valid / {len(test.clean)} test images)")
        plots.plot_prune_result(result.curves, result.thresholds, out_dir / "prune_result.png", title,
                                extra_points=finetune_extra.get("points"))
        table = report.results_table(summary, title, extra=finetune_extra.get("columns"))
        base = result.curves[0]
        if valid.poisoned:
            header = (f"Unpruned B: clean valid accuracy {base['valid_acc']:.2f} %, valid ASR {base['valid_asr']:.2f} %, "
                      f"clean test accuracy {base['pruned_test_acc']:.2f} %, test ASR {base['pruned_test_asr']:.2f} %")
        else:
            header = (f"Unpruned B: clean valid accuracy {base['valid_acc']:.2f} %, clean test accuracy "
                      f"{base['pruned_test_acc']:.2f} % (no poisoned data: no attack success rate)")
        (out_dir / "results.md").write_text(header + "\n\n" + table + "\n")
        log.info("%s\n%s", header, table)
        log.info("results in %s (%.1f s)", out_dir, time.perf_counter() - started)

        for name in ("curves.csv", "summary.csv", "prune_result.png", "config.yaml", "results.md", "pruning_order.txt"):
            tracker.log_artifact(out_dir / name)
        if cfg.tracking.get("log_models", True) and models_dir.is_dir():
            tracker.log_artifact(models_dir, "models")
        model_uris = {}
        if cfg.tracking.get("log_models", True):  # G(B, B') of each kept threshold as an MLflow model
            from defense.mlflow_model import log_repaired_models

            model_uris = log_repaired_models(cfg, tracker, model, summary, valid.clean.x)
        status = "FINISHED"
        return {"curves": result.curves, "summary": summary, "order": result.order, "run_id": tracker.run_id,
                "out_dir": out_dir, "result": result, "model_uris": model_uris}
    except BaseException as err:
        status = interrupt.run_status(err)
        if status == "KILLED":
            log.warning("stopped by %s: the run ends KILLED; the files written so far stay in %s",
                        interrupt.signal_name(interrupt.signum_of(err)), out_dir)
        raise
    finally:
        if tracker is not None:
            with interrupt.held():  # end the run even if another signal comes
                for path in tracking.files_kept(out_dir, status):
                    tracker.log_artifact(path)
                tracker.end(status)


def _finetune(cfg, model, result, summary, valid, test, out_dir, tracker) -> dict:
    """Fine-pruning hook (finetune group); `none` adds nothing."""
    kind = cfg.get("finetune", {}).get("kind", "none")
    if kind == "none":
        return {}
    from defense.finetune import finetune_thresholds

    return finetune_thresholds(cfg, model, result, summary, valid, test, out_dir, tracker)


@interrupt.exit_on_signal
@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_defense(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
