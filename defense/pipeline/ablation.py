"""The fine-tuning budget ablation (`experiment=finetune_ablation`): does pruning first let a smaller
fine-tuning budget remove the backdoor?

Fine-Pruning (Liu, Dolan-Gavitt and Garg, RAID 2018) argues that a backdoor hides in channels that
clean data leaves dormant, which fine-tuning alone barely updates, so pruning them first makes the
fine-tuning work. This module measures it on any network and data: the sweep runs once, then for
B itself (drop 0: fine-tuning alone, no channel pruned) and for the kept B' of every accuracy-drop
threshold of `prune.drops`, it fine-tunes with every budget of the grid `ablation.epochs` x
`ablation.learning_rate` (every other setting from the `finetune` group, as `finetune=clean` does:
clean validation data only, pruned channels kept at zero), and scores B'' and G(B, B'') on the test
data with `defense.pipeline.finetune.score_fine_pruned`.

Writes into the run folder, and logs to MLflow (the grid itself is in the params `ablation.*`):
- ablation.csv: one row per (drop, epochs, learning_rate): channels_pruned, the fine-tuned network
  B'' (`ft_test_acc`, `ft_test_asr`, `ft_test_ra`, `ft_der`) and G(B, B'') (`ft_g_test_acc`,
  `ft_g_test_asr`, `ft_g_test_ra`, `ft_g_der`), DER against the unpruned B (`base_test_acc`,
  `base_test_asr`); a threshold the sweep never reached keeps its rows with `reached=False` and
  blank scores;
- ablation.png: the ASR and the clean accuracy of B'' against the number of epochs, one panel per
  learning rate, one line per drop;
- metrics `ablation/drop_{drop}/lr_{lr}/<column>` with step = epochs.
"""

from __future__ import annotations

import copy
import logging
import math
import textwrap
import time
from pathlib import Path

import numpy as np

from defense.nets import models
from defense.reporting import report
from defense.core.errors import DefenseError
from defense.pipeline.finetune import SCORE_COLUMNS  # the fine-tuned scores: one list for both tables
from defense.pipeline.sweep import drop_name

log = logging.getLogger("defense.ablation")
FIRST_COLUMNS = ["drop", "epochs", "learning_rate", "channels_pruned", "reached", *SCORE_COLUMNS,
                 "base_test_acc", "base_test_asr"]


def check_ablation(cfg) -> tuple[list[int], list[float]]:
    """`ablation.epochs` (whole numbers >= 1) and `ablation.learning_rate` (> 0), both non-empty, and a
    fine-tuning to vary (finetune=clean or sgd_cosine); a DefenseError names the key and the fix."""
    ablation = cfg.get("ablation")
    if (cfg.get("finetune") or {}).get("kind", "none") == "none":
        raise DefenseError("ablation is set but finetune=none: the ablation varies the fine-tuning budget of the "
                           "finetune group; use finetune=sgd_cosine (experiment=finetune_ablation's) or finetune=clean")

    def values(key, cast, ok, what, example):
        raw = ablation.get(key)
        try:
            found = [cast(v) for v in (raw or [])]
        except (TypeError, ValueError):
            raise DefenseError(f"ablation.{key}={raw!r} must be a list of {what}, e.g. ablation.{key}={example}") from None
        if not found or any(isinstance(v, float) and not math.isfinite(v) or not ok(v) for v in found):
            raise DefenseError(f"ablation.{key}={list(raw or [])!r} must be a non-empty list of {what}, "
                               f"e.g. ablation.{key}={example}")
        if len(set(found)) != len(found):
            raise DefenseError(f"ablation.{key}={found}: list each value once")
        return found

    epochs = values("epochs", int, lambda v: v >= 1, "whole numbers of epochs >= 1", "[2,5,10,30]")
    if any(float(v) != int(v) for v in ablation.get("epochs")):
        raise DefenseError(f"ablation.epochs={list(ablation.get('epochs'))!r} must be whole numbers of epochs")
    rates = values("learning_rate", float, lambda v: v > 0, "learning rates > 0", "[0.01,0.05]")
    return epochs, rates


def ablation_cells(summary: list[dict]) -> list[dict]:
    """The drops of the grid: 0 (the unpruned B: fine-tuning alone) first, then every threshold of the
    summary (a threshold of 0 in prune.drops is the same network and is not repeated)."""
    cells = [{"drop": 0.0, "channels_pruned": 0, "reached": True}]
    for row in summary:
        if row.get("point", "drop") != "drop" or float(row["drop"]) == 0.0:  # drop thresholds only
            continue
        cells.append({"drop": float(row["drop"]), "channels_pruned": int(row["channels_pruned"]),
                      "reached": bool(row["reached"])})
    return cells


def run_ablation(cfg, model, result, summary, valid, test, out_dir, tracker, holdout=None) -> dict:
    """Fine-tune every (drop, epochs, learning rate) cell; write and log ablation.csv / .png / .md.

    holdout: the held-out clean validation images (defense/pipeline/select.py), never trained on. A cell whose
    fine-tuning diverged by the package's one rule (defense/core/divergence.py: its last loss is not finite, or
    its clean accuracy on the held-out images is at chance) is marked `diverged` and its scores left blank,
    as defense/pipeline/finetune.py's check_diverged does for the thresholds' fine-tunings."""
    from defense.core.divergence import divergence
    from defense.pipeline.finetune import (base_predictions, fine_tune, finetune_settings, holdout_accuracy,
                                           score_fine_pruned)
    from defense.tracking.tracker import Tracker

    epochs_grid, rates = check_ablation(cfg)
    settings = finetune_settings(cfg.finetune)
    out_dir = Path(out_dir)
    num_classes = int(cfg.model.num_classes)
    batch_size = int(cfg.get("batch_size", 512))
    base = result.curves[0]
    base_preds = base_predictions(cfg, model, result, test)
    names = list(test.poisoned)
    cells = ablation_cells(summary)
    log.info("fine-tuning ablation: drops %s x epochs %s x learning rates %s (%s, %s schedule, batch %d, shift %d px)",
             [drop_name(c["drop"]) for c in cells], epochs_grid, [f"{r:g}" for r in rates], settings["optimizer"],
             settings["lr_schedule"], settings["batch_size"], settings["shift"])
    quiet = Tracker()  # per-epoch curves of 40-odd fine-tunings are not logged; each cell's scores are
    rows = []
    for cell in cells:
        pruned = result.pruned_at(cell["channels_pruned"]) if cell["reached"] else None
        for epochs in epochs_grid:
            for rate in rates:
                row = {"drop": cell["drop"], "epochs": epochs, "learning_rate": rate,
                       "channels_pruned": cell["channels_pruned"] if cell["reached"] else -1,
                       "reached": cell["reached"],
                       **{k: float("nan") for k in SCORE_COLUMNS},
                       "base_test_acc": base["pruned_test_acc"], "base_test_asr": base["pruned_test_asr"]}
                rows.append(row)
                if pruned is None:
                    continue
                started = time.perf_counter()
                cell_cfg = copy.deepcopy(cfg)
                cell_cfg.finetune.epochs = int(epochs)
                cell_cfg.finetune.learning_rate = float(rate)
                name = f"drop_{drop_name(cell['drop'])}_e{epochs}_lr{rate:g}"
                b_prime = result.pruned_model(model, pruned)  # as the sweep pruned it: conv, or the BN's parameters
                b2, info = fine_tune(cell_cfg, b_prime, pruned, valid.clean, quiet, name, bn_units=result.bn_units,
                                     bn_zero=result.bn_zero)
                pred_clean = models.predict_labels(b2, test.clean.x, cfg.model, batch_size)
                poisoned = {n: (test.poisoned[n].y, test.poisoned[n].clean_label, base_preds[n],
                                models.predict_labels(b2, test.poisoned[n].x, cfg.model, batch_size)) for n in names}
                scores = score_fine_pruned(test.clean.y, base_preds["clean"], pred_clean, poisoned, num_classes,
                                           base_acc=base["pruned_test_acc"], base_asr=base["pruned_test_asr"])
                row.update(scores)
                row["ft_epochs_run"] = info["ft_epochs"]
                row["ft_holdout_acc"] = holdout_accuracy(cfg, b2, holdout, batch_size)
                reason = divergence(info.get("ft_final_loss"), row["ft_holdout_acc"] if holdout is not None else None,
                                    num_classes)  # defense/core/divergence.py
                row["diverged"] = reason is not None
                if row["diverged"]:  # no score of a collapsed network is reported
                    row.update({k: float("nan") for k in SCORE_COLUMNS})
                    log.warning("warning: ablation cell %s diverged (%s): left blank", name, reason)
                row["seconds"] = round(time.perf_counter() - started, 2)
                prefix = f"ablation/drop_{drop_name(cell['drop'])}/lr_{rate:g}"
                for key in SCORE_COLUMNS:
                    if math.isfinite(row[key]):
                        tracker.log_metric(f"{prefix}/{key}", row[key], step=int(epochs))
                log.info("ablation drop %s%% (%d channels), %d epochs at lr %g: B'' acc %.2f %%, ASR %.2f %%, DER %.3f; "
                         "G(B, B'') acc %.2f %%, ASR %.2f %% (%.1f s)", drop_name(cell["drop"]), len(pruned), epochs,
                         rate, row["ft_test_acc"], row["ft_test_asr"], row["ft_der"], row["ft_g_test_acc"],
                         row["ft_g_test_asr"], row["seconds"])
                del b_prime, b2
    report.write_csv(out_dir / "ablation.csv", rows, first=FIRST_COLUMNS)
    title = (f"Fine-tuning budget of {cfg.model.name} after pruning {cfg.prune.layer} by {cfg.prune.criterion} "
             f"({settings['optimizer']}, {settings['lr_schedule']} schedule; {len(valid.clean)} clean validation / "
             f"{len(test.clean)} test images)")
    plot_ablation(rows, base, out_dir / "ablation.png", title, str(cfg.prune.criterion))
    table = markdown(rows, title)
    (out_dir / "ablation.md").write_text(table + "\n")
    log.info("%s", table)
    for name in ("ablation.csv", "ablation.png", "ablation.md"):
        tracker.log_artifact(out_dir / name)
    return {"rows": rows}


def markdown(rows: list[dict], title: str) -> str:
    def cell(value, digits=2):
        return "-" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"

    lines = [title, "",
             "| drop (pp) | channels pruned | epochs | learning rate | B'' acc | B'' ASR | B'' DER | G(B,B'') acc | "
             "G(B,B'') ASR | G(B,B'') DER |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        channels = str(r["channels_pruned"]) if r["reached"] else "not reached"
        lines.append(f"| {drop_name(r['drop'])} | {channels} | {r['epochs']} | {r['learning_rate']:g} | "
                     f"{cell(r['ft_test_acc'])} | {cell(r['ft_test_asr'])} | {cell(r['ft_der'], 3)} | "
                     f"{cell(r['ft_g_test_acc'])} | {cell(r['ft_g_test_asr'])} | {cell(r['ft_g_der'], 3)} |")
    lines += ["", "Drop 0: fine-tuning alone (no channel pruned). B'': the fine-tuned network; G(B, B''): B's label "
                  "where B and B'' agree, N where they differ. Test data, %; DER against the unpruned B."]
    return "\n".join(lines)


def plot_ablation(rows: list[dict], base: dict, path: str | Path, title: str, criterion: str = "activation") -> Path:
    """ASR (top) and clean accuracy (bottom) of B'' against the epochs, one column per learning rate,
    one line per drop (pruned by `criterion` first, then fine-tuned: fine-pruning when it is activation);
    B's own scores as a grey dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["learning_rate"] for r in rows})
    drops = sorted({r["drop"] for r in rows})
    has_asr = any(math.isfinite(r["ft_test_asr"]) for r in rows)
    metrics = ([("ft_test_asr", "attack success rate of B'' (%)", "pruned_test_asr")] if has_asr else []) + \
        [("ft_test_acc", "clean accuracy of B'' (%)", "pruned_test_acc")]
    fig, axes = plt.subplots(len(metrics), len(rates), figsize=(5.2 * len(rates), 3.8 * len(metrics)), dpi=110,
                             squeeze=False, sharex=True)
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(drops), 1)))
    for j, rate in enumerate(rates):
        for i, (key, label, base_key) in enumerate(metrics):
            ax = axes[i][j]
            for color, drop in zip(colors, drops):
                points = sorted((r["epochs"], r[key]) for r in rows
                                if r["drop"] == drop and r["learning_rate"] == rate and math.isfinite(r[key]))
                if not points:
                    continue
                pruned = "fine-pruning" if criterion == "activation" else f"{criterion} pruning + fine-tuning"
                name = "fine-tuning alone (drop 0)" if drop == 0 else f"{pruned}, drop {drop_name(drop)} pt"
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, lw=1.6, label=name)
            ax.axhline(base[base_key], color="grey", ls="--", lw=1, label="B (no defense)")
            ax.set_xscale("log")
            epochs = sorted({r["epochs"] for r in rows})
            ax.set_xticks(epochs)
            ax.set_xticklabels([str(e) for e in epochs])
            ax.minorticks_off()
            ax.set_ylim(-2, 105)
            ax.grid(alpha=0.3)
            ax.set_ylabel(label)
            if i == 0:
                ax.set_title(f"learning rate {rate:g}")
            if i == len(metrics) - 1:
                ax.set_xlabel("fine-tuning epochs")
    axes[0][0].legend(loc="best", fontsize=7, framealpha=0.9)
    fig.suptitle("\n".join(textwrap.wrap(title, width=70 * len(rates))), fontsize=9)  # fits one panel too
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
