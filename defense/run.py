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
from defense.config import check_config, defense_name, seed_everything, warn_if_near_chance
from defense.errors import exit_on_user_error

log = logging.getLogger("defense.run")


def run_defense(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run the defense described by `cfg`, writing into `out_dir`; returns the result summary.

    SIGINT or SIGTERM (defense/interrupt.py) stops it at the next safe point (between batches,
    iterations and stages): the MLflow run ends KILLED with the files written so far, and Interrupted
    (a KeyboardInterrupt) propagates. A second signal stops it at once.
    """
    with interrupt.stop_on_signals(deferred=True):
        result = _run_defense(cfg, out_dir)
    if cfg.tracking.get("register"):  # after the run is logged: a refused registration leaves it whole
        from defense.mlflow_model import register

        result["registered"] = register(cfg.tracking, result["run_id"], result["summary"], result["model_uris"])
    return result


def _run_defense(cfg: DictConfig, out_dir: str | Path) -> dict:
    from defense import autodetect, channel_record, datasets, models, plots, report, sweep, tracking
    from defense.finetune import der
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
    layers = sweep.check_layers(cfg, model)  # also fills prune.layer / prune.probe where null
    models_dir = out_dir / "models"
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    tracker = None
    status = "FAILED"
    try:
        with interrupt.held():  # a signal must not fall between creating the run and keeping its id
            tracker = tracking.make_tracker(
                cfg, {"model": cfg.model.name, "criterion": cfg.prune.criterion, "dataset": cfg.dataset.get("kind"),
                      "layer": "all" if cfg.prune.layer == "all" else sweep.layer_label(layers),
                      "finetune": cfg.get("finetune", {}).get("kind", "none"),
                      "defense_name": defense_name(cfg),
                      "defense.run_dir": str(out_dir.resolve()), **tracking.run_tags()}
            )
        valid = datasets.load_split(cfg.dataset, cfg.model, "valid", limits)
        if cfg.model.get("input_divisor") is None:
            divisor = autodetect.choose_input_divisor(cfg.model, model, valid.clean, int(cfg.get("batch_size", 512)))
            tracker.set_tags({"input_divisor": f"{divisor:g}"})
            OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
        test = datasets.load_split(cfg.dataset, cfg.model, "test", limits)
        interrupt.check()
        tracker.log_datasets(valid, "validation", str(cfg.dataset.get("kind")))
        tracker.log_datasets(test, "test", str(cfg.dataset.get("kind")))
        log.info(
            "model %s (%s); %d clean + %s poisoned validation images, %d clean + %s poisoned test images",
            cfg.model.name, model_path, len(valid.clean), [len(v) for v in valid.poisoned.values()],
            len(test.clean), [len(v) for v in test.poisoned.values()],
        )
        interrupt.check()
        result = sweep.run_sweep(cfg, model, valid, test, progress=bool(cfg.get("progress", True)))
        interrupt.check()
        warn_if_near_chance(result.curves[0]["valid_acc"], cfg.model, "the unpruned network's clean validation accuracy")
        log.info("sweep of %d steps (%d evaluated) in %.1f s (%s)", result.steps, len(result.evaluated),
                 sum(result.seconds.values()), ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
        report.write_csv(out_dir / "curves.csv", result.curves)
        tracker.log_metrics(result.curves, step_key="channels_pruned")
        _write_criterion_record(cfg, result, out_dir, tracker)

        base_curve = result.curves[0]
        summary = report.summary_rows(result.thresholds)
        for row in summary:
            row["point"] = "drop"
        op_row = _operating_point(cfg, model, result, valid, test)
        if op_row is not None:
            summary.append(op_row)
        kept = {}
        for row in summary:
            # DER of G(B, B') against the unpruned B (0.5: nothing changed, e.g. defense=none)
            row["der"] = der(base_curve["pruned_test_acc"], row["test_acc"], base_curve["pruned_test_asr"],
                             row["test_asr"]) if row["reached"] else float("nan")
            row["model_path"] = ""
            if not row["reached"]:
                continue
            interrupt.check()
            pruned = result.pruned_for(row)
            kept[sweep.point_name(row)] = pruned
            b_prime = models.pruned_copy_layers(model, pruned)
            path = models.save_model(b_prime, models_dir / f"model_B_{sweep.file_key(row)}.h5")
            row["model_path"] = str(path)
            if cfg.get("compact", True):  # also save B' without its pruned channels (defense/compact.py)
                from defense.compact import export_compact_beside

                export_compact_beside(b_prime, pruned, path, tracker, models.scale_inputs(test.clean.x, cfg.model))
        channel_record.write_pruned(out_dir / "pruned.json", kept)
        interrupt.check()
        finetune_extra = _finetune(cfg, model, result, summary, valid, test, out_dir, tracker)
        interrupt.check()

        report.write_csv(out_dir / "summary.csv", summary, first=report.SUMMARY_COLUMNS)
        tracker.log_params(report.threshold_params(summary))
        tracker.log_table(summary, "thresholds.json")
        with open(out_dir / "pruning_order.txt", "w") as f:
            if len(result.layers) == 1:
                f.write(" ".join(str(int(c)) for c in result.order) + "\n")
            else:  # layer:channel
                f.write(" ".join(f"{name}:{int(c)}" for name, c in result.pairs) + "\n")
        title = (f"Pruning {_layers_title(result.layers)} of {cfg.model.name} by {cfg.prune.criterion} "
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

        for name in ("curves.csv", "summary.csv", "prune_result.png", "config.yaml", "results.md", "pruning_order.txt",
                     "channel_scores.csv", "pruned.json", f"{cfg.prune.criterion}_history.csv"):
            if (out_dir / name).is_file():
                tracker.log_artifact(out_dir / name)
        if cfg.tracking.get("log_models", True) and models_dir.is_dir():
            tracker.log_artifact(models_dir, "models")
        model_uris = {}
        if cfg.tracking.get("log_models", True):  # G(B, B') of each kept threshold as an MLflow model
            from defense.mlflow_model import log_repaired_models

            model_uris = log_repaired_models(cfg, tracker, model, summary, valid.clean.x)
        interrupt.check()  # a stop asked for while the models were logged: the run ends KILLED, not FINISHED
        status = "FINISHED"
        return {"curves": result.curves, "summary": summary,
                "order": result.order if len(result.layers) == 1 else result.pairs, "run_id": tracker.run_id,
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


def _layers_title(layers: list[str]) -> str:
    return layers[0] if len(layers) == 1 else f"{len(layers)} conv layers ({', '.join(layers)})"


def _write_criterion_record(cfg, result, out_dir: Path, tracker) -> None:
    """channel_scores.csv, and the criterion's history (csv and `<criterion>/<key>` step metrics)."""
    from defense import channel_record

    channel_record.write_channel_scores(out_dir / "channel_scores.csv", result.scores, result.layers, result.pairs)
    history = result.scores.history
    if history:
        channel_record.write_history(out_dir / f"{cfg.prune.criterion}_history.csv", history)
        tracker.log_metrics(history, step_key="step", prefix=f"{cfg.prune.criterion}/")


def _operating_point(cfg, model, result, valid, test) -> dict | None:
    """The summary row of the criterion's own operating point, or None when it has none."""
    from defense import operating_point
    from defense.models import input_divisor
    from defense.sweep import pruned_by_layer as sweep_pruned_by_layer

    op = result.scores.operating_point
    if op is None:
        return None
    pairs = operating_point.checked_pairs(op, model, result.layers)
    names = list(valid.poisoned)
    sets = [("valid_clean", valid.clean)] + [(f"valid_{n}", valid.poisoned[n]) for n in names]
    sets += [("test_clean", test.clean)] + [(f"test_{n}", test.poisoned[n]) for n in names]
    preds = operating_point.predictions(model, result.layers, pairs, sets, input_divisor(cfg.model),
                                        int(cfg.get("batch_size", 512)))
    row = operating_point.operating_point_row(pairs, result.channels, preds, valid, test, names,
                                              int(cfg.model.num_classes))
    log.info("the criterion's operating point prunes %d channels: clean valid accuracy %.2f %%, valid ASR %.2f %%, "
             "G(B, B') test accuracy %.2f %%, test ASR %.2f %%", len(pairs), row["valid_acc"], row["valid_asr"],
             row["test_acc"], row["test_asr"])
    result.operating_pruned = sweep_pruned_by_layer(pairs, result.layers)
    return row


def _finetune(cfg, model, result, summary, valid, test, out_dir, tracker) -> dict:
    """Fine-pruning hook (finetune group); `none` adds nothing. With `ablation` (experiment=finetune_ablation)
    the grid of fine-tuning budgets replaces the one fine-tuning of each threshold (defense/ablation.py)."""
    kind = cfg.get("finetune", {}).get("kind", "none")
    if kind == "none":
        return {}
    if cfg.get("ablation") is not None:
        from defense.ablation import run_ablation

        run_ablation(cfg, model, result, summary, valid, test, out_dir, tracker)
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
