"""The real CSAW-HackML networks on the real face extracts: their scores and the Lab 3 pruning run.

    python experiments/csaw_extracts.py                          # ../shared/data/csaw
    python experiments/csaw_extracts.py --data <folder>          # the extracts elsewhere

Through the project's own entry points (`defense.evaluate.evaluate`, `defense.run.run_defense`):
  1. every CSAW network scored on all 100 faces of the extracts, as
     `python -m defense.evaluate model=<model> model.path=<weights> dataset=csaw_extract split=all`
     prints them, beside the scores the data's README lists (an independent oracle);
  2. the Lab 3 pruning run of docs/results.md ("The Lab 3 run on the real extracts"),
     `python -m defense.run model=lab3 model.path=.../lab3_bd_weights.h5 dataset=csaw_extract
      prune.criterion=activation prune.drops=[2,4,10,30]` (50 validation / 50 test faces): its table,
     the curve between the 10- and 30-point thresholds, and the parameter counts of B and of every
     compact B' (`defense.compact.compact_model`).
Writes experiments/results/csaw_extracts.md and .json.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files as rf  # noqa: E402

rf.use_this_checkout()

NAME = "csaw_extracts"
# model config -> weights file of ../shared/data/csaw, and the scores its README lists (top-1 correct
# out of the 100 faces: clean, then each trigger's attack success), an oracle this script did not make.
NETWORKS = {
    "lab3": ("lab3_bd_weights.h5", {"clean": 99, "sunglasses": 100}),
    "csaw2020_sunglasses": ("sunglasses_bd_weights.h5", {"clean": 95, "sunglasses": 100}),
    "csaw2020_anonymous_1": ("anonymous_1_bd_weights.h5", {"clean": 96, "lipstick": 92}),
    "csaw2020_anonymous_2": ("anonymous_2_bd_weights.h5", {"clean": 94}),
    "csaw2020_multi": ("multi_trigger_multi_target_bd_weights.h5",
                       {"clean": 91, "eyebrows": 91, "lipstick": 92, "sunglasses": 100}),
}
DROPS = [2, 4, 10, 30]


def evaluate_all(data: Path) -> list[dict]:
    from defense.evaluate import evaluate

    rows = []
    for model, (weights, expected) in NETWORKS.items():
        cfg = rf.compose([f"model={model}", f"model.path={data / weights}", "dataset=csaw_extract",
                          f"dataset.root={data}", "split=all"], config_name="evaluate")
        scores = evaluate(cfg)
        measured = {"clean": scores["clean_acc"],
                    **{k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("asr/")}}
        rows.append({"model": model, "weights": weights, "scores": measured, "expected": expected,
                     "matches_data_readme": all(abs(measured.get(k, -1) - v) < 1e-9 for k, v in expected.items())
                     and set(measured) == set(expected)})
    return rows


def lab3_pruning(data: Path, out_dir: Path) -> dict:
    from defense.nets import models
    from defense.pruning.compact import compact_model
    from defense.pipeline.load import resolve_model_path
    from defense.run import run_defense

    cfg = rf.compose(["model=lab3", f"model.path={data / 'lab3_bd_weights.h5'}", "dataset=csaw_extract",
                      f"dataset.root={data}", "prune.criterion=activation", f"prune.drops=[{','.join(map(str, DROPS))}]",
                      "tracking=none", "progress=false"])
    started = time.perf_counter()
    run = run_defense(cfg, out_dir)
    seconds = time.perf_counter() - started
    model = models.load_model(cfg.model, resolve_model_path(cfg.model, cfg.dataset))
    full = int(model.count_params())
    compact = []
    for row in run["summary"]:
        if not row["reached"] or row.get("point", "drop") != "drop":  # the accuracy-drop rows only
            continue
        pruned = run["order"][: int(row["channels_pruned"])]
        small = compact_model(models.pruned_copy(model, cfg.prune.layer, pruned), cfg.prune.layer, pruned)
        saved = full - int(small.count_params())
        compact.append({"drop": row["drop"], "channels_removed": len(pruned), "b_params": full,
                        "compact_params": int(small.count_params()),
                        "params_per_removed_channel": saved / len(pruned) if len(pruned) else None})
    return {"results_md": (Path(out_dir) / "results.md").read_text(), "summary": run["summary"],
            "curves": run["curves"], "compact": compact, "layer": cfg.prune.layer,
            "channels": int(model.get_layer(cfg.prune.layer).filters), "seconds": round(seconds, 1)}


def markdown(evaluated: list[dict], lab3: dict, data_text: str) -> str:
    triggers = []
    for row in evaluated:
        triggers += [k for k in row["scores"] if k != "clean" and k not in triggers]
    header = ["network (`model=`)", "clean acc (%)", *[f"ASR {t} (%)" for t in triggers], "data README lists"]
    rows = []
    for row in evaluated:
        s, e = row["scores"], row["expected"]
        listed = ", ".join(f"{k} {v}" for k, v in e.items())
        rows.append([f"`{row['model']}`", f"{s['clean']:.2f}",
                     *[f"{s[t]:.2f}" if t in s else "-" for t in triggers],
                     listed + (" (agrees)" if row["matches_data_readme"] else " (DIFFERS)")])
    eval_table = rf.md_table(header, rows, align="l" + "r" * (len(header) - 2) + "l")

    summary = {int(r["drop"]): r for r in lab3["summary"] if r.get("point", "drop") == "drop"}
    lo, hi = summary.get(10), summary.get(30)
    curve_md = ""
    if lo and hi and lo["reached"] and hi["reached"]:
        steps = [c for c in lab3["curves"] if lo["channels_pruned"] <= c["channels_pruned"] <= hi["channels_pruned"]]
        curve_md = ("\n\nThe curve from the 10-point to the 30-point threshold (B' on the validation faces, "
                    "G(B, B') on the test faces, %):\n\n" + rf.md_table(
                        ["channels pruned", "valid acc", "valid ASR", "G clean test acc", "G test ASR"],
                        [[c["channels_pruned"], f"{c['valid_acc']:.2f}", f"{c['valid_asr']:.2f}",
                          f"{c['test_acc']:.2f}", f"{c['test_asr']:.2f}"] for c in steps], align="rrrrr"))
    compact_rows = []
    for c in lab3["compact"]:
        per = c["params_per_removed_channel"]
        compact_rows.append([f"{c['drop']:g}", c["channels_removed"], f"{c['b_params']:,}", f"{c['compact_params']:,}",
                             "-" if per is None else f"{per:,.0f}"])
    compact_md = rf.md_table(["accuracy drop (pp)", f"{lab3['layer']} channels removed", "B parameters",
                              "compact B' parameters", "parameters per removed channel"], compact_rows, align="rrrrr")
    results_md = lab3["results_md"].strip().splitlines()
    unpruned, title, table = results_md[0], results_md[2], "\n".join(results_md[3:])
    return (
        f"Data: {data_text}.\n\n"
        "`python -m defense.evaluate ... dataset=csaw_extract split=all` (all 100 faces) for every network, "
        "beside the correct-out-of-100 counts that the data's README lists:\n\n"
        f"{eval_table}\n\n"
        "`python -m defense.run model=lab3 model.path=../shared/data/csaw/lab3_bd_weights.h5 dataset=csaw_extract "
        "dataset.root=../shared/data/csaw prune.criterion=activation prune.drops=[2,4,10,30]`:\n\n"
        f"{unpruned}\n\n{title}\n\n{table}"
        f"{curve_md}\n\n"
        f"The compact B' of each threshold (`models/model_B_{{drop}}_compact.h5`, pruned channels removed):\n\n"
        f"{compact_md}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(rf.CSAW), help="the CSAW-HackML extracts (default ../shared/data/csaw)")
    parser.add_argument("--out", default=str(rf.REPO / "outputs" / "experiments" / NAME),
                        help="run folder of the Lab 3 pruning run (default outputs/experiments/csaw_extracts)")
    args = parser.parse_args(argv)
    data = Path(args.data).resolve()
    if not (data / "clean_test.h5").is_file():
        print(f"error: the CSAW-HackML extracts are not in {data}: give --data <folder> "
              "(the folder with clean_test.h5 and the *_bd_weights.h5 files)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    evaluated = evaluate_all(data)
    lab3 = lab3_pruning(data, Path(args.out) / "lab3_pruning")
    data_text = "the 100 real faces of `../shared/data/csaw` (pruning: first 50 = validation, last 50 = test)"
    rf.write_results(NAME, markdown(evaluated, lab3, data_text),
                     {"data": str(data), "evaluate": evaluated,
                      "lab3_pruning": {k: v for k, v in lab3.items() if k != "results_md"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
