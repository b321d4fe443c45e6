"""Fine-tuning a whole epoch per compiled call against one batch per call, timed, with the same weights.

    python experiments/finetune_timing.py                 # DeepID and preact_resnet, seed 1, 2 repeats
    python experiments/finetune_timing.py --archs deepid --repeats 1 --epochs 2 --results-dir /tmp/f   # a quick try

`defense/pipeline/finetune.py::fine_tune` keeps the pruned channels of B' at zero after every optimizer step.
It did that with a Keras callback after every batch, so Keras ran one batch per call. It now gives those
variables a constraint, which Keras applies right after each update inside its compiled step, and compiles the
model with `steps_per_execution` equal to the batches of an epoch (`whole_epochs=True`, the default).

For each architecture this script takes the embedded BadNets scenario of `--seed` and the preset
`defense=fine_pruning` (its fine-tuning `conf/finetune/sgd_cosine.yaml`: SGD with momentum, cosine decay,
batches of 64 randomly shifted), loads the data as a run does, ranks the channels of the preset's layer with
its criterion on the clean validation images, prunes the first `--fraction` of them (B'), and fine-tunes that
B' both ways, alternating, `--repeats` times, timing each fine-tuning (trace included, as in a run).

Both ways must give the same weights bit for bit and the same per-epoch history; otherwise the script prints
the largest difference and exits 1. Writes experiments/results/finetune_timing.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files as rf  # noqa: E402

rf.use_this_checkout()

NAME = "finetune_timing"
ARMS = {"one batch per call": False, "a whole epoch per call": True}


def setting(arch: str, seed: int, fraction: float, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """B and its B' (the first `fraction` of the preset's ranking pruned), the clean validation images and the
    config of `defense=fine_pruning` on the BadNets scenario of (arch, seed)."""
    from defense.criteria import global_order

    run = rf.ranked_as_a_run(["defense=fine_pruning", f"dataset.scenario.arch={arch}", f"dataset.scenario.seed={seed}",
                              "tracking=none", "progress=false", *extra], out)
    (layer,) = run["layers"]
    order = [channel for _, channel in global_order(run["scores"], [layer])]  # the sweep's pruning order
    pruned = {layer: sorted(order[: max(1, round(fraction * len(order)))])}
    clean = run["data"]["valid"].clean
    return {"cfg": run["cfg"], "model": run["model"], "pruned": pruned, "clean": clean, "images": len(clean),
            "layer": layer}


def fine_tune_once(s: dict, whole: bool) -> tuple[float, list, list, dict]:
    """Seconds, weights, per-epoch history and info of one fine-tuning of a fresh B'."""
    from defense.nets.models import pruned_copy_layers
    from defense.pipeline.finetune import fine_tune
    from defense.tracking.tracker import Tracker

    b_prime = pruned_copy_layers(s["model"], s["pruned"])
    history: list[dict] = []
    started = time.perf_counter()
    b2, info = fine_tune(s["cfg"], b_prime, s["pruned"], s["clean"], Tracker(), "timing", history=history,
                         whole_epochs=whole)
    return time.perf_counter() - started, b2.get_weights(), history, info


def measure(arch: str, seed: int, repeats: int, fraction: float, extra: tuple[str, ...] = ()) -> dict:
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        s = setting(arch, seed, fraction, Path(tmp), extra)
    times: dict[str, list] = {arm: [] for arm in ARMS}
    results: dict[str, tuple] = {}
    for repeat in range(repeats):
        for arm, whole in ARMS.items():
            seconds, weights, history, info = fine_tune_once(s, whole)
            times[arm].append(round(seconds, 2))
            results.setdefault(arm, (weights, history, info))
            print(f"{arch}: {arm}, repeat {repeat + 1}: {seconds:.1f} s", flush=True)
    (w_batch, h_batch, i_batch), (w_epoch, h_epoch, i_epoch) = results.values()
    largest = max(float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(w_batch, w_epoch))
    means = {arm: sum(v) / len(v) for arm, v in times.items()}
    ft = s["cfg"].finetune
    return {"arch": arch, "seed": seed, "layer": s["layer"], "pruned_channels": len(s["pruned"][s["layer"]]),
            "images": s["images"], "epochs": int(ft.epochs), "batch_size": int(ft.batch_size), "shift": int(ft.shift),
            "optimizer": str(ft.optimizer), "seconds": times, "mean_seconds": means,
            "speed_up": means["one batch per call"] / means["a whole epoch per call"],
            "largest_weight_difference": largest, "same_history": h_batch == h_epoch and i_batch == i_epoch}


def markdown(rows: list[dict], repeats: int) -> str:
    table = []
    for r in rows:
        table.append([r["arch"], f"{r['pruned_channels']} of `{r['layer']}`", r["images"],
                      f"{r['epochs']} x batch {r['batch_size']}, shift {r['shift']}",
                      ", ".join(f"{v:.2f}" for v in r["seconds"]["one batch per call"]),
                      ", ".join(f"{v:.2f}" for v in r["seconds"]["a whole epoch per call"]),
                      f"{r['speed_up']:.2f}x", f"{r['largest_weight_difference']:g}",
                      "yes" if r["same_history"] else "no"])
    return ("The fine-tuning of `defense=fine_pruning` (conf/finetune/sgd_cosine.yaml) of one B' (the first channels "
            "of the preset's ranking pruned) on the embedded BadNets scenario of seed "
            + ", ".join(sorted({str(r["seed"]) for r in rows}))
            + f", each arm {repeats} time(s), alternating, in one process with TensorFlow's default threads; each "
            "time is one whole fine-tuning, its trace included:\n\n"
            + rf.md_table(["arch", "pruned", "images", "epochs", "one batch per call, each repeat (s)",
                           "a whole epoch per call, each repeat (s)", "speed-up", "largest weight difference",
                           "same history"], table))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["deepid", "preact_resnet"], help="dataset.scenario.arch values")
    parser.add_argument("--seed", type=int, default=1, help="dataset.scenario.seed (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="fine-tunings of each arm (default 2)")
    parser.add_argument("--fraction", type=float, default=0.2,
                        help="share of the layer's channels pruned (default 0.2)")
    parser.add_argument("--epochs", type=int, help="finetune.epochs (default: the preset's, 30)")
    parser.add_argument("--results-dir", type=Path, default=rf.RESULTS, help="where the .md/.json go")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if not 0 < args.fraction < 1:
        parser.error("--fraction must be in (0, 1), e.g. --fraction 0.2")
    extra = (f"finetune.epochs={args.epochs}",) if args.epochs else ()
    rows = [measure(arch, args.seed, args.repeats, args.fraction, extra) for arch in args.archs]
    body = markdown(rows, args.repeats)
    print(body)
    different = [r for r in rows if r["largest_weight_difference"] or not r["same_history"]]
    if different:
        raise SystemExit("the two ways gave different fine-tunings: " + ", ".join(
            f"{r['arch']}: largest weight difference {r['largest_weight_difference']:g}, same history "
            f"{r['same_history']}" for r in different))
    rf.write_results(NAME, body, {"rows": rows, "repeats": args.repeats, "fraction": args.fraction}, args.results_dir)


if __name__ == "__main__":
    main()
