"""Benchmark: the runner's pruning sweep against the seed-style loop, at Lab 3 scale.

    python experiments/benchmark.py --out outputs/benchmark            # tiles the real extracts
    python experiments/benchmark.py --out outputs/benchmark --data data  # the real Lab 3 files

Times, in one process on the same inputs:
  (a) the seed-style loop: for each channel, zero its kernel and bias with set_weights, predict the
      clean and poisoned validation images, and run B and B' on the clean and poisoned test images;
      measured over --seed-steps steps and scaled to all 60 (every step costs the same);
  (b) the runner's sweep (`defense.sweep.run_sweep`: ranking, all 60 steps, valid curves and G on
      test, B' at 2/4/10/30);
  (c) one plain `model.predict` over all four sets, the floor.
Checks that (a) and (b) give the same curves and writes the table to OUT/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CSAW = (REPO.parent / "shared" / "data" / "csaw").resolve()
SIZES = {"valid": 11547, "test": 12830}  # the Lab 3 data set
METRICS = ["valid_acc", "valid_asr", "test_acc", "test_asr", "pruned_test_acc", "pruned_test_asr"]


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def tiled(images, n: int):
    """`images` repeated up to n (the Lab 3 sizes) from the 100 real faces."""
    reps = -(-n // len(images))
    index = np.tile(np.arange(len(images)), reps)[:n]
    return images.subset(index)


def load_inputs(args, cfg):
    from defense.datasets import Split, load_split
    from defense.data import load_h5

    if args.data:
        return load_split(cfg.dataset, cfg.model, "valid"), load_split(cfg.dataset, cfg.model, "test"), "Lab 3 files in " + args.data
    clean = load_h5(CSAW / "clean_test.h5", "clean")
    poisoned = load_h5(CSAW / "sunglasses_test.h5", "sunglasses")
    n_valid, n_test = (max(1, int(round(SIZES[k] * args.scale))) for k in ("valid", "test"))
    valid = Split(tiled(clean, n_valid), {"sunglasses": tiled(poisoned, n_valid)})
    test = Split(tiled(clean, n_test), {"sunglasses": tiled(poisoned, n_test)})
    return valid, test, f"the 100 real faces of {CSAW} tiled to Lab 3 size"


def seed_probe_order(model, x, batch_size):
    """The seed's ranking: predict pool_3 on clean validation data, ascending mean activation."""
    import keras

    probe = keras.Model(model.inputs, model.get_layer("pool_3").output)
    activation = probe.predict(x, batch_size=batch_size, verbose=0)
    return np.argsort(np.mean(activation, axis=(0, 1, 2)), kind="stable")


def seed_loop(model, order, steps, valid, test, num_classes, batch_size):
    """The seed-style loop over `steps` (list of step numbers, ascending); metrics per measured step."""
    import keras

    from defense import metrics

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    layer = clone.get_layer("conv_3")
    kernel, bias = layer.get_weights()
    predict = lambda m, x: np.argmax(m.predict(x, batch_size=batch_size, verbose=0), axis=1)  # noqa: E731
    rows, done, seconds = {}, 0, []
    for step in steps:
        start = time.perf_counter()
        for channel in order[done:step]:  # zero the channel's kernel and bias, as the seed does
            kernel[:, :, :, channel] = 0
            bias[channel] = 0
        layer.set_weights([kernel, bias])
        done = step
        p_valid = predict(clone, valid.clean.x)
        p_valid_bd = predict(clone, valid.poisoned["sunglasses"].x)
        b_test, bp_test = predict(model, test.clean.x), predict(clone, test.clean.x)
        b_bd, bp_bd = predict(model, test.poisoned["sunglasses"].x), predict(clone, test.poisoned["sunglasses"].x)
        seconds.append(time.perf_counter() - start)
        rows[step] = {
            "valid_acc": metrics.accuracy(p_valid, valid.clean.y),
            "valid_asr": metrics.accuracy(p_valid_bd, valid.poisoned["sunglasses"].y),
            "test_acc": metrics.accuracy(metrics.repaired_labels(b_test, bp_test, num_classes), test.clean.y),
            "test_asr": metrics.accuracy(metrics.repaired_labels(b_bd, bp_bd, num_classes), test.poisoned["sunglasses"].y),
            "pruned_test_acc": metrics.accuracy(bp_test, test.clean.y),
            "pruned_test_asr": metrics.accuracy(bp_bd, test.poisoned["sunglasses"].y),
        }
    return rows, seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for benchmark.json")
    parser.add_argument("--data", default=None, help="folder of the real Lab 3 files (cl/, bd/); default: tile the extracts")
    parser.add_argument("--weights", default=str(CSAW / "lab3_bd_weights.h5"), help="Lab 3 weights or full model .h5")
    parser.add_argument("--seed-steps", type=int, default=3, help="steps of the seed loop to time (1..60; 60 = all)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the Lab 3 sizes (quick checks)")
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args(argv)

    if not Path(args.weights).is_file():
        sys.exit(f"error: {args.weights} not found: the benchmark needs the real Lab 3 weights ({CSAW}/README.md)")
    import tensorflow as tf

    from defense import models
    from defense.sweep import run_sweep

    overrides = ["model=lab3", f"model.path={args.weights}", "prune.criterion=activation", "prune.drops=[2,4,10,30]",
                 "stop=all", "tracking=none", "progress=false", f"batch_size={args.batch_size}"]
    overrides += ["dataset=lab3", f"dataset.root={args.data}"] if args.data else ["dataset=csaw_extract", f"dataset.root={CSAW}"]
    cfg = compose(overrides)
    model = models.load_model(cfg.model)
    valid, test, source = load_inputs(args, cfg)
    sets = [valid.clean, valid.poisoned["sunglasses"], test.clean, test.poisoned["sunglasses"]]
    num_classes = int(cfg.model.num_classes)
    gpus = tf.config.list_physical_devices("GPU")
    device = f"GPU ({', '.join(g.name for g in gpus)})" if gpus else f"CPU ({os.cpu_count()} cores)"
    print(f"inputs: {source}: {len(valid.clean)} + {len(valid.clean)} valid, {len(test.clean)} + {len(test.clean)} test; device {device}")

    # warm-up (graph tracing) on a few images, so that every timing below is steady-state
    small = compose(overrides)
    from defense.datasets import Split

    run_sweep(small, model, Split(valid.clean.subset(slice(0, 64)), {"sunglasses": valid.poisoned["sunglasses"].subset(slice(0, 64))}),
              Split(test.clean.subset(slice(0, 64)), {"sunglasses": test.poisoned["sunglasses"].subset(slice(0, 64))}), progress=False)
    model.predict(valid.clean.x[:64], batch_size=args.batch_size, verbose=0)

    # (b) the runner's sweep, first, so that the peak memory is its own
    start = time.perf_counter()
    result = run_sweep(cfg, model, valid, test, progress=False)
    b_primes = [models.pruned_copy(model, "conv_3", result.order[: t["channels_pruned"]])
                for t in result.thresholds if t["reached"]]
    sweep_s = time.perf_counter() - start
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"(b) sweep: {sweep_s:.1f} s, {len(b_primes)} B' kept, peak RSS {peak_rss_gib:.2f} GiB")

    # (c) one plain forward pass over all four sets
    start = time.perf_counter()
    for images in sets:
        model.predict(images.x, batch_size=args.batch_size, verbose=0)
    one_pass_s = time.perf_counter() - start
    print(f"(c) one model.predict over the four sets: {one_pass_s:.1f} s")

    # (a) the seed loop, on its own ranking (checked equal to ours)
    start = time.perf_counter()
    seed_order = seed_probe_order(model, valid.clean.x, args.batch_size)
    probe_s = time.perf_counter() - start
    same_order = list(seed_order) == list(result.order)
    steps = sorted({int(s) for s in np.linspace(1, 60, max(1, min(60, args.seed_steps))).round()})
    seed_rows, seconds = seed_loop(model, seed_order, steps, valid, test, num_classes, args.batch_size)
    per_step = float(np.mean(seconds))
    seed_loop_s = probe_s + per_step * 60
    print(f"(a) seed loop: {len(steps)} steps {steps} measured, {per_step:.1f} s each -> {seed_loop_s:.1f} s for 60 (scaled)")

    diffs, flips = [], 0
    for step, row in seed_rows.items():
        for key in METRICS:
            diff = abs(row[key] - result.curves[step][key])
            diffs.append(diff)
            flips += int(diff > 0)
    # every step, label by label, where the seed loop is affordable: on the distinct faces
    # (the first 100 rows of each tiled set; with --data, the first 100 images of each set)
    from defense.masked import seed_style_predictions

    mismatches, compared = 0, 0
    for key, images in zip(("valid_clean", "valid_sunglasses", "test_clean", "test_sunglasses"), sets):
        rows_ = slice(0, min(100, len(images)))
        seed = seed_style_predictions(model, "conv_3", images.x[rows_], seed_order, args.batch_size)
        mismatches += int(np.sum(seed != result.predictions[key][rows_]))
        compared += seed.size
    print(f"every step, distinct faces: {mismatches} of {compared} labels differ between (a) and (b)")

    report = {
        "seed_loop_s": round(seed_loop_s, 3),
        "seed_loop_steps_measured": len(steps),
        "seed_loop_measured_s": round(float(np.sum(seconds)) + probe_s, 3),
        "sweep_s": round(sweep_s, 3),
        "one_pass_s": round(one_pass_s, 3),
        "ratio_seed_over_sweep": round(seed_loop_s / sweep_s, 2),
        "ratio_sweep_over_one_pass": round(sweep_s / one_pass_s, 3),
        "peak_rss_gib": round(peak_rss_gib, 3),
        "max_curve_diff_pp": float(max(diffs)),
        "metrics_differing": flips,
        "same_ranking": same_order,
        "every_step_labels_compared": compared,
        "every_step_label_mismatches": mismatches,
        "device": device,
        "inputs": source,
        "sizes": {"valid": len(valid.clean), "test": len(test.clean)},
        "sweep_phases_s": {k: round(v, 3) for k, v in result.seconds.items()},
    }
    rows = [
        ("(a) seed loop, measured", f"{report['seed_loop_measured_s']:.1f} s ({len(steps)} steps + ranking)"),
        ("(a) seed loop, scaled to 60 steps", f"{seed_loop_s:.1f} s"),
        ("(b) runner sweep, 60 steps", f"{sweep_s:.1f} s"),
        ("(c) one model.predict, 4 sets", f"{one_pass_s:.1f} s"),
        ("a / b", f"{report['ratio_seed_over_sweep']:.1f}x"),
        ("b / c", f"{report['ratio_sweep_over_one_pass']:.2f}"),
        ("peak memory of (b)", f"{peak_rss_gib:.2f} GiB (process peak RSS after (b))"),
        ("max curve difference a vs b", f"{report['max_curve_diff_pp']:.4f} pp over {len(diffs)} values, {flips} differing"),
        ("every step, distinct faces", f"{mismatches} of {compared} labels differ"),
        ("same ranking", str(same_order)),
        ("device", device),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'benchmark.json'}")
    return report


if __name__ == "__main__":
    main()
