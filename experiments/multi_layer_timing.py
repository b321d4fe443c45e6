"""The multi-layer pruning sweep's evaluation, each step from the earliest changed mask against the whole walk.

    python experiments/multi_layer_timing.py                    # CLP's sweep on DeepID and preact_resnet, seed 1
    python experiments/multi_layer_timing.py --archs deepid --repeats 1 --eval-steps 5 --results-dir /tmp/m   # a quick try

`defense=clp`, `defense=anp` and `defense=rnp` prune every conv layer (or its BatchNormalization) in one
global order, and the sweep evaluates 101 evenly spaced steps with `defense/pruning/channel_masks.py` on
every set (clean validation, held-out, poisoned validation, clean and poisoned test). For each
architecture this script takes the embedded BadNets scenario of `--seed`, the preset `defense=clp` (its
data-free ranking, so that no learning is timed), loads the data as a run does (the `setup` and `load`
stages of defense/pipeline/stages/), ranks, and times `ChannelMasks.predict` over every set at the sweep's
evaluated steps both ways, alternating, `--repeats` times:

- `whole walk`: every step runs the network from its input (`reuse=False`, how the sweep ran before);
- `from the changed mask`: each step runs from the earliest masked layer whose mask changed since the step
  before, on the tensors the step before left there (the default).

Both must give the same label for every image at every step; otherwise the script prints how many differ
and exits 1. Writes experiments/results/multi_layer_timing.{md,json}.
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

NAME = "multi_layer_timing"
ARMS = {"whole walk": False, "from the changed mask": True}


def setting(arch: str, seed: int, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """The sweep's engine, rankings and sets for `defense=clp` on the BadNets scenario of (arch, seed)."""
    from defense.criteria import global_order
    from defense.pruning import steps as step_rules
    from defense.pruning.channel_masks import ChannelMasks

    run = rf.ranked_as_a_run(["defense=clp", f"dataset.scenario.arch={arch}", f"dataset.scenario.seed={seed}",
                              "tracking=none", "progress=false", *extra], out)
    cfg, model, layers, units, zero = run["cfg"], run["model"], run["layers"], run["units"], run["zero"]
    valid, test, holdout = run["data"]["valid"], run["data"]["test"], run["data"]["holdout"]
    scores, divisor = run["scores"], run["divisor"]
    pairs = global_order(scores, layers)
    engine = ChannelMasks(model, layers, int(cfg.get("batch_size", 512)), units, zero)
    channels = sum(engine.channels.values())
    evaluated = [int(s) for s in step_rules.evaluated_steps(cfg.stop, channels, cfg.prune.get("eval_steps"),
                                                            len(layers) > 1)]
    sets = {"valid_clean": valid.clean, "holdout_clean": holdout, **{f"valid_{n}": v for n, v in valid.poisoned.items()},
            "test_clean": test.clean, **{f"test_{n}": v for n, v in test.poisoned.items()}}
    return {"cfg": cfg, "engine": engine, "pairs": pairs, "steps": evaluated, "sets": sets, "divisor": divisor,
            "layers": layers, "units": units, "channels": channels}


def time_arm(s: dict, reuse: bool) -> tuple[float, float, dict]:
    """Wall and CPU seconds of the evaluation over every set, and the labels per set."""
    wall, cpu = time.perf_counter(), time.process_time()
    labels = {key: s["engine"].predict(images.x, s["pairs"], s["steps"], divisor=s["divisor"], reuse=reuse)
              for key, images in s["sets"].items()}
    return time.perf_counter() - wall, time.process_time() - cpu, labels


def measure(arch: str, seed: int, repeats: int, extra: tuple[str, ...] = ()) -> dict:
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        s = setting(arch, seed, Path(tmp), extra)
    first = {key: images.x[:8] for key, images in s["sets"].items()}
    for reuse in ARMS.values():  # trace every segment outside the timing
        for x in first.values():
            s["engine"].predict(x, s["pairs"], s["steps"], divisor=s["divisor"], reuse=reuse)
    times: dict[str, list] = {arm: [] for arm in ARMS}
    cpu: dict[str, list] = {arm: [] for arm in ARMS}
    labels: dict[str, dict] = {}
    for repeat in range(repeats):
        for arm, reuse in ARMS.items():
            w, c, got = time_arm(s, reuse)
            times[arm].append(round(w, 2))
            cpu[arm].append(round(c, 2))
            labels.setdefault(arm, got)
            print(f"{arch}: {arm}, repeat {repeat + 1}: {w:.1f} s wall, {c:.1f} s CPU", flush=True)
    whole, reused = labels["whole walk"], labels["from the changed mask"]
    compared = sum(v.size for v in whole.values())
    differing = int(sum(np.sum(whole[k] != reused[k]) for k in whole))
    images = sum(len(v) for v in s["sets"].values())
    means = {arm: sum(v) / len(v) for arm, v in times.items()}
    return {"arch": arch, "seed": seed, "layers": s["layers"], "masked_layers": len(s["layers"]),
            "bn_level": bool(s["units"]), "channels": s["channels"],
            "steps": len(s["steps"]), "segments": s["engine"].segments(), "images": images,
            "wall_s": times, "cpu_s": cpu,
            "mean_wall_s": means, "speed_up": means["whole walk"] / means["from the changed mask"],
            "labels_compared": int(compared), "labels_differing": differing}


def markdown(rows: list[dict], repeats: int) -> str:
    table = []
    for r in rows:
        table.append([r["arch"], f"{r['masked_layers']} ({'BN' if r['bn_level'] else 'conv'}), {r['channels']} channels",
                      r["steps"], r["images"], ", ".join(f"{v:.1f}" for v in r["wall_s"]["whole walk"]),
                      ", ".join(f"{v:.1f}" for v in r["wall_s"]["from the changed mask"]),
                      f"{r['speed_up']:.2f}x", f"{r['labels_differing']} of {r['labels_compared']}"])
    return ("`defense=clp` (every conv layer, or its BatchNormalization, in one global order; the data-free ranking) "
            "on the embedded BadNets scenario of seed " + ", ".join(sorted({str(r["seed"]) for r in rows}))
            + f"; the sweep's evaluated steps on every set, each arm {repeats} time(s), alternating, in one process "
            "with TensorFlow's default threads:\n\n"
            + rf.md_table(["arch", "masked layers", "steps", "images", "whole walk, each repeat (s)", "from the changed mask, each repeat (s)",
                           "speed-up", "labels differing"], table))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["deepid", "preact_resnet"], help="dataset.scenario.arch values")
    parser.add_argument("--seed", type=int, default=1, help="dataset.scenario.seed (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timings of each arm (default 2)")
    parser.add_argument("--eval-steps", type=int, help="prune.eval_steps (default: the sweep's, 101 here)")
    parser.add_argument("--results-dir", type=Path, default=rf.RESULTS, help="where the .md/.json go")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    extra = (f"prune.eval_steps={args.eval_steps}",) if args.eval_steps else ()
    rows = [measure(arch, args.seed, args.repeats, extra) for arch in args.archs]
    body = markdown(rows, args.repeats)
    print(body)
    if any(r["labels_differing"] for r in rows):
        raise SystemExit("the two ways gave different labels: " + ", ".join(
            f"{r['arch']}: {r['labels_differing']} of {r['labels_compared']}" for r in rows if r["labels_differing"]))
    rf.write_results(NAME, body, {"rows": rows, "repeats": args.repeats}, args.results_dir)


if __name__ == "__main__":
    main()
