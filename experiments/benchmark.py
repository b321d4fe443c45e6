"""Benchmark: the runner's pruning sweep against the CSAW-HackML Lab 3 loop, at Lab 3 scale.

    python experiments/benchmark.py --out outputs/benchmark              # tiles the real extracts
    python experiments/benchmark.py --out outputs/benchmark --data data  # the real Lab 3 files
    python experiments/benchmark.py --out /tmp/b --tile 1 --results-dir /tmp/b   # quick check

Times, in one process on the same inputs (images held as uint8 where that is lossless):
  (a) the Lab 3 loop ("seed loop"), doing per step exactly the work of the CSAW-HackML Lab 3
      loop for the outputs the runner reports: rank the channels with a plain Keras probe model
      (mean pool_3 activation on clean validation data), predict B once on the four sets, then for
      each pruning step zero the channel's kernel and bias with set_weights and predict B' on clean
      and poisoned validation data and on clean and poisoned test data (the B' labels that the
      repaired network G(B, B') needs); the per-step part is timed on --seed-steps steps spread
      over the sweep and scaled to all steps (`--seed-steps all` times every step, no scaling);
      B's predictions on the four sets are (c) below, the same work, timed once;
  (b) the runner's sweep (`defense.pipeline.sweep.run_sweep`: ranking, every step, valid curves and G on
      test, B' at 2/4/10/30), including the tracing of its own graphs;
  (c) one plain `model.predict` of B over the four sets, the floor;
  (d) the evaluator of several pruned layers (`defense.pruning.channel_masks.ChannelMasks`, used by the
      runner with `prune.layer=all` or a list): every conv layer of the network (DeepID: conv_1 to
      conv_4, 200 channels) in one global L1 order, --multi-steps evenly spaced steps on the four
      sets; its time per evaluated step is compared with (c) (goal: at most 1.2x), and its labels
      on the distinct faces with zeroing the same channels' kernels and biases by set_weights.
Wall times are the results; the CPU seconds of the process (all threads) are reported beside them,
as they vary less when other work shares the machine.

Checks that (a) and (b) agree: the same ranking, every curve value and every B' label at step 0
and at the measured steps, and, at every step, the labels of the 100 distinct faces of each set
(the clean faces and their sunglasses copies; with --data the first 100 images of each of the four
sets). Any difference is printed and the script exits 1. `--seed-order reversed` gives the Lab 3
loop the reversed ranking, a wrong one, so that a run disagrees on purpose (to test this check).

Writes OUT/benchmark.json and, when (a) and (b) agree, RESULTS_DIR/benchmark.json and
RESULTS_DIR/benchmark.md (the command line, date, machine, package versions and the table printed
at the end). Exit status: 0 agree, 1 (a) and (b) disagree, 2 bad input (one `error:` line).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CSAW = (REPO.parent / "shared" / "data" / "csaw").resolve()
SIZES = {"valid": 11547, "test": 12830}  # the Lab 3 data set
METRICS = ["valid_acc", "valid_asr", "test_acc", "test_asr", "pruned_test_acc", "pruned_test_asr"]
SET_KEYS = ["valid_clean", "valid_sunglasses", "test_clean", "test_sunglasses"]
DISTINCT_FACES = 100  # every extract holds the same 100 faces
MULTI_STEP_GOAL = 1.2  # (d) / (c): one evaluated step of several masked layers against one plain pass


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import defense.pipeline.schemas  # noqa: F401  (registers the schemas that conf/ names)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def tiled(images, n: int):
    """`images` repeated up to n rows (row i is face i mod len(images))."""
    reps = -(-n // len(images))
    index = np.tile(np.arange(len(images)), reps)[:n]
    return images.subset(index)


def seed_steps_arg(value: str):
    if value == "all":
        return "all"
    try:
        steps = int(value)
    except ValueError:
        steps = 0
    if steps < 10:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of steps >= 10, or 'all'")
    return steps


def tile_arg(value: str) -> int:
    try:
        reps = int(value)
    except ValueError:
        reps = 0
    if reps < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number >= 1 (1 = the 100 faces as they are)")
    return reps


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for benchmark.json")
    parser.add_argument("--results-dir", default=str(REPO / "experiments" / "results"),
                        help="folder for the published benchmark.md and benchmark.json (default experiments/results)")
    parser.add_argument("--data", default=None, help="folder of the real Lab 3 files (cl/, bd/); default: tile the extracts")
    parser.add_argument("--weights", default=str(CSAW / "lab3_bd_weights.h5"), help="Lab 3 weights or full model .h5")
    parser.add_argument("--tile", type=tile_arg, default=None,
                        help="each set = the 100 real faces repeated N times (1 = as they are); default: tiled to the "
                             f"Lab 3 sizes ({SIZES['valid']:,} valid, {SIZES['test']:,} test per set)")
    parser.add_argument("--seed-steps", type=seed_steps_arg, default=10,
                        help="pruning steps of the Lab 3 loop (a) to time, spread over the sweep (>= 10, default 10); "
                             "'all' times every step and needs no scaling")
    parser.add_argument("--seed-order", choices=["probe", "reversed"], default="probe",
                        help="ranking of the Lab 3 loop (a): 'probe' (its own probe model, must equal the sweep's) or "
                             "'reversed' (that ranking reversed: a wrong one, so that (a) and (b) disagree and the "
                             "script exits 1; for testing the agreement check)")
    parser.add_argument("--batch-size", type=int, default=512, help="images per batch in (a), (b) and (c) (default 512, "
                        "as `batch_size` in conf/config.yaml)")
    parser.add_argument("--multi-steps", type=int, default=5,
                        help="evenly spaced pruning steps of (d), the evaluator of several pruned layers, to time "
                             "(>= 2, default 5; the first is step 0)")
    args = parser.parse_args(argv)
    if args.multi_steps < 2:
        parser.error("--multi-steps must be >= 2")
    if args.tile is not None and args.data:
        parser.error("--tile tiles the extracts; it cannot be combined with --data")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    return args


def load_inputs(args, cfg):
    """valid and test Splits (poisoned set `sunglasses`), pixels as uint8 where that is lossless."""
    from defense.data.arrays import as_uint8_pixels, check_fits, load_h5
    from defense.pipeline.load import Split

    if args.data:  # file by file, so that only one float32 file is held at a time
        def one(key, name):
            images = as_uint8_pixels(load_h5(os.path.join(args.data, cfg.dataset[key]), name))
            check_fits(images, cfg.model.input_shape, int(cfg.model.num_classes), "model=lab3")
            return images

        valid = Split(one("clean_valid", "clean"), {"sunglasses": one("poisoned_valid", "sunglasses")})
        test = Split(one("clean_test", "clean"), {"sunglasses": one("poisoned_test", "sunglasses")})
        return valid, test, f"the Lab 3 files in {args.data}"
    clean = as_uint8_pixels(load_h5(CSAW / "clean_test.h5", "clean"))
    poisoned = as_uint8_pixels(load_h5(CSAW / "sunglasses_test.h5", "sunglasses"))
    if args.tile is not None:
        n_valid = n_test = args.tile * len(clean)
        how = "as they are" if args.tile == 1 else f"repeated {args.tile} times"
    else:
        n_valid, n_test = SIZES["valid"], SIZES["test"]
        how = "tiled to Lab 3 size"
    valid = Split(tiled(clean, n_valid), {"sunglasses": tiled(poisoned, n_valid)})
    test = Split(tiled(clean, n_test), {"sunglasses": tiled(poisoned, n_test)})
    return valid, test, f"the {len(clean)} real faces of {CSAW} {how}"


def set_of(split_valid, split_test, key):
    split = split_valid if key.startswith("valid") else split_test
    return split.clean if key.endswith("clean") else split.poisoned["sunglasses"]


def labels(model, x, batch_size):
    return np.argmax(model.predict(x, batch_size=batch_size, verbose=0), axis=-1)


def probe_order(model, x, batch_size):
    """The Lab 3 ranking: a Keras model up to pool_3 on clean validation data, ascending mean activation."""
    import keras

    probe = keras.Model(model.inputs, model.get_layer("pool_3").output)
    activation = probe.predict(x, batch_size=batch_size, verbose=0)
    return np.argsort(np.mean(activation, axis=(0, 1, 2)), kind="stable")


def lab3_loop(model, order, steps, sets, batch_size):
    """The per-step work of the Lab 3 loop at the measured `steps` (ascending): set_weights, then B' on
    the four sets. Returns {step: {set key: B' labels}} and the wall and CPU seconds of each step."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    labels(clone, sets["valid_clean"].x[: batch_size + 8], batch_size)  # trace predict (full and last batch)
    layer = clone.get_layer("conv_3")
    kernel, bias = layer.get_weights()
    rows, done, seconds, cpu_seconds = {}, 0, [], []
    for step in steps:
        start, cpu = time.perf_counter(), time.process_time()
        for channel in order[done:step]:  # channels between measured steps are zeroed in the same call
            kernel[:, :, :, channel] = 0
            bias[channel] = 0
        layer.set_weights([kernel, bias])
        done = step
        rows[step] = {key: labels(clone, sets[key].x, batch_size) for key in SET_KEYS}
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu)
    return rows, seconds, cpu_seconds


def every_step_labels(model, x, order, batch_size):
    """The Lab 3 loop at every step on `x`: (N, len(order)+1) labels, column s = s channels zeroed."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    layer = clone.get_layer("conv_3")
    kernel, bias = layer.get_weights()
    columns = [labels(clone, x, batch_size)]
    for channel in order:
        kernel[:, :, :, channel] = 0
        bias[channel] = 0
        layer.set_weights([kernel, bias])
        columns.append(labels(clone, x, batch_size))
    return np.stack(columns, axis=1)


def multi_layer_steps(model, sets, groups, n_steps: int, batch_size: int) -> dict:
    """(d): ChannelMasks over every Conv2D of `model`, at `n_steps` evenly spaced steps of the global L1 order
    (data-free, so that the ranking costs nothing here): wall and CPU seconds per evaluated step over the four
    sets, and the labels of the distinct faces (`groups`) at those steps against the set_weights loop."""
    import keras

    from defense.pruning.autodetect import conv_layers
    from defense.pruning.channel_masks import ChannelMasks
    from defense.criteria import global_order, l1

    layers = [layer.name for layer in conv_layers(model)]
    pairs = global_order(l1.score(model, layers, None, None, 1.0), layers)
    steps = sorted({int(s) for s in np.linspace(0, len(pairs), n_steps).round()})
    masks = ChannelMasks(model, layers, batch_size)
    masks.predict(sets["valid_clean"].x[: batch_size + 8], pairs, steps)  # trace its segments (outside the timing)
    start, cpu = time.perf_counter(), time.process_time()
    masked = {key: masks.predict(sets[key].x, pairs, steps) for key in SET_KEYS}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    compared = mismatches = 0
    for name, x, _ in groups:  # the set_weights loop on the distinct faces, one clone per step
        key = name if name in SET_KEYS else f"valid_{name}"  # tiled extracts: the faces are valid's first rows
        for j, step in enumerate(steps):
            clone = keras.models.clone_model(model)
            clone.set_weights(model.get_weights())
            for layer_name, channel in pairs[:step]:
                layer = clone.get_layer(layer_name)
                kernel, bias = layer.get_weights()
                kernel[..., channel] = 0
                bias[channel] = 0
                layer.set_weights([kernel, bias])
            plain = labels(clone, x, batch_size)
            compared += len(plain)
            mismatches += int(np.sum(plain != masked[key][: len(plain), j]))
    return {"layers": layers, "channels": len(pairs), "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "steps_timed": len(steps), "step_s": seconds / len(steps), "step_cpu_s": cpu_seconds / len(steps),
            "traces": masks.traces, "segments": masks.segments(),
            "labels_compared": compared, "labels_differing": mismatches}


def curve_row(b_labels, bp_labels, sets, num_classes):
    """The six curve values of one step from B's and B''s labels on the four sets (the Lab 3 way)."""
    from defense.core import metrics

    def g(key):
        return metrics.repaired_labels(b_labels[key], bp_labels[key], num_classes)

    return {
        "valid_acc": metrics.accuracy(bp_labels["valid_clean"], sets["valid_clean"].y),
        "valid_asr": metrics.accuracy(bp_labels["valid_sunglasses"], sets["valid_sunglasses"].y),
        "test_acc": metrics.accuracy(g("test_clean"), sets["test_clean"].y),
        "test_asr": metrics.accuracy(g("test_sunglasses"), sets["test_sunglasses"].y),
        "pruned_test_acc": metrics.accuracy(bp_labels["test_clean"], sets["test_clean"].y),
        "pruned_test_asr": metrics.accuracy(bp_labels["test_sunglasses"], sets["test_sunglasses"].y),
    }


def distinct_face_groups(args, sets, predictions):
    """(name, images for (a), [the sweep's labels of the same images]) for the every-step check.

    Tiled extracts: row i of every clean set is face i, so the 100 distinct clean faces are the
    first 100 rows of valid_clean, and (b) labelled them twice (valid and test rows); likewise for
    the sunglasses copies. With --data the four sets hold different images.
    """
    groups = []
    if args.data:
        for key in SET_KEYS:
            n = min(DISTINCT_FACES, len(sets[key]))
            groups.append((key, sets[key].x[:n], [predictions[key][:n]]))
        return groups
    for kind in ("clean", "sunglasses"):
        n = min(DISTINCT_FACES, len(sets[f"valid_{kind}"]), len(sets[f"test_{kind}"]))
        groups.append((kind, sets[f"valid_{kind}"].x[:n],
                       [predictions[f"valid_{kind}"][:n], predictions[f"test_{kind}"][:n]]))
    return groups


def machine_description(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"cores": os.cpu_count(), "cpu": cpu, "device": device, "platform": platform.platform(),
            "load_average_at_start": load}


def versions() -> dict:
    import keras
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__}


def write_results(results_dir: Path, report: dict, rows) -> list[Path]:
    """RESULTS_DIR/benchmark.md and .json through `results_files` (command, date, machine, versions)."""
    import results_files

    width = max(len(k) for k, _ in rows)
    body = "\n".join([
        f"Inputs: {report['inputs']}: {report['sizes']['valid']:,} + {report['sizes']['valid']:,} validation, "
        f"{report['sizes']['test']:,} + {report['sizes']['test']:,} test images ({report['input_dtype']}), "
        f"batch size {report['batch_size']}; load average {report['run']['machine']['load_average_at_start']} "
        f"at start. Lab 3 loop steps measured: {report['seed_loop_measured_steps']}.",
        "",
        f"| {'quantity'.ljust(width)} | value |",
        f"|{'-' * (width + 2)}|-------|",
        *(f"| {k.ljust(width)} | {val} |" for k, val in rows),
    ])
    return list(results_files.write_results("benchmark", body, report, results_dir))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["python", "experiments/benchmark.py", *argv])
    started = datetime.datetime.now(datetime.timezone.utc)

    from defense.core.errors import DefenseError

    if not Path(args.weights).is_file():
        print(f"error: --weights {args.weights} not found: the benchmark needs the real Lab 3 weights "
              f"({CSAW}/README.md)", file=sys.stderr)
        return 2
    try:
        return run(args, command, started)
    except DefenseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args, command: str, started) -> int:
    import tensorflow as tf

    from defense.nets import models
    from defense.pipeline.load import Split
    from defense.core.errors import DefenseError
    from defense.pipeline.sweep import run_sweep

    overrides = ["model=lab3", f"model.path={args.weights}", "prune.criterion=activation", "prune.drops=[2,4,10,30]",
                 "stop=all", "tracking=none", "progress=false", f"batch_size={args.batch_size}"]
    overrides += ["dataset=lab3", f"dataset.root={args.data}"] if args.data else ["dataset=csaw_extract", f"dataset.root={CSAW}"]
    cfg = compose(overrides)
    model = models.load_model(cfg.model)
    channels = int(model.get_layer("conv_3").filters)
    if args.seed_steps != "all" and args.seed_steps > channels:
        raise DefenseError(f"--seed-steps {args.seed_steps}: conv_3 has {channels} channels, so the sweep has "
                           f"{channels} steps; give at most {channels} or 'all'")
    valid, test, source = load_inputs(args, cfg)
    sets = {key: set_of(valid, test, key) for key in SET_KEYS}
    num_classes = int(cfg.model.num_classes)
    gpus = tf.config.list_physical_devices("GPU")
    device = f"GPU ({', '.join(g.name for g in gpus)})" if gpus else f"CPU ({os.cpu_count()} cores)"
    machine = machine_description(device)
    dtype = str(valid.clean.x.dtype)
    print(f"inputs: {source}: {len(valid.clean)} + {len(valid.clean)} valid, {len(test.clean)} + {len(test.clean)} "
          f"test ({dtype}); device {device}; load average {machine['load_average_at_start']}", flush=True)

    # warm-up: TensorFlow's start-up and Keras' predict tracing (full and last batch) stay out of the timings
    few = {k: s.subset(slice(0, 64)) for k, s in sets.items()}
    run_sweep(cfg, model, Split(few["valid_clean"], {"sunglasses": few["valid_sunglasses"]}),
              Split(few["test_clean"], {"sunglasses": few["test_sunglasses"]}), progress=False)
    labels(model, valid.clean.x[: args.batch_size + 8], args.batch_size)

    # (b) the runner's sweep, first, so that the peak memory is its own (inputs included)
    start, cpu = time.perf_counter(), time.process_time()
    result = run_sweep(cfg, model, valid, test, progress=False)
    b_primes = [models.pruned_copy(model, "conv_3", result.order[: t["channels_pruned"]])
                for t in result.thresholds if t["reached"]]
    sweep_s, sweep_cpu = time.perf_counter() - start, time.process_time() - cpu
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"(b) sweep: {sweep_s:.1f} s, {len(b_primes)} B' kept, peak RSS {peak_rss_gib:.2f} GiB", flush=True)
    steps_total = result.steps

    # (c) one plain forward pass of B over the four sets; (a) uses these labels as its B-once part
    start, cpu = time.perf_counter(), time.process_time()
    b_labels = {key: labels(model, sets[key].x, args.batch_size) for key in SET_KEYS}
    one_pass_s, one_pass_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"(c) one model.predict over the four sets: {one_pass_s:.1f} s", flush=True)

    # (a) the Lab 3 loop on its own ranking
    start, cpu = time.perf_counter(), time.process_time()
    probe = probe_order(model, valid.clean.x, args.batch_size)
    ranking_s, ranking_cpu = time.perf_counter() - start, time.process_time() - cpu
    seed_order = probe[::-1].copy() if args.seed_order == "reversed" else probe
    if args.seed_steps == "all":
        steps = list(range(1, steps_total + 1))
    else:
        steps = sorted({int(s) for s in np.linspace(1, steps_total, args.seed_steps).round()})
    seed_rows, seconds, cpu_seconds = lab3_loop(model, seed_order, steps, sets, args.batch_size)
    per_step = float(np.mean(seconds))
    scaled = len(steps) < steps_total
    measured_s = ranking_s + one_pass_s + float(np.sum(seconds))
    seed_loop_s = ranking_s + one_pass_s + (per_step * steps_total if scaled else float(np.sum(seconds)))
    seed_loop_cpu = ranking_cpu + one_pass_cpu + float(np.mean(cpu_seconds)) * steps_total
    print(f"(a) Lab 3 loop: {len(steps)} of {steps_total} steps measured {steps}, {per_step:.2f} s each -> "
          f"{seed_loop_s:.1f} s for {steps_total}{' (scaled)' if scaled else ''}", flush=True)

    # agreement of (a) and (b): ranking, curves and B' labels at step 0 and the measured steps
    problems = []
    same_ranking = [int(c) for c in seed_order] == [int(c) for c in result.order]
    if not same_ranking:
        first = next(i for i, (a, b) in enumerate(zip(seed_order, result.order)) if a != b)
        problems.append(f"ranking: (a) and (b) first differ at position {first} (channel {int(seed_order[first])} "
                        f"vs {int(result.order[first])})")
    curve_diffs, curve_values, label_diffs, label_values = [], 0, 0, 0
    bad_curves, bad_labels = [], []
    for step, bp_labels in [(0, b_labels), *seed_rows.items()]:
        row = curve_row(b_labels, bp_labels, sets, num_classes)
        for key in METRICS:
            diff = abs(row[key] - result.curves[step][key])
            curve_diffs.append(diff)
            curve_values += 1
            if row[key] != result.curves[step][key]:
                bad_curves.append(f"{key} at step {step}: (a) {row[key]:.4f} vs (b) {result.curves[step][key]:.4f}")
        for key in SET_KEYS:
            differ = int(np.sum(bp_labels[key] != result.predictions[key][:, step]))
            label_diffs += differ
            label_values += len(bp_labels[key])
            if differ:
                bad_labels.append(f"{key} step {step}: {differ}")
    if bad_curves:
        problems.append(f"curve values: {len(bad_curves)} of {curve_values} differ, e.g. " + "; ".join(bad_curves[:3]))
    if label_diffs:
        problems.append(f"B' labels at the measured steps: {label_diffs} of {label_values} differ ("
                        + ", ".join(bad_labels[:4]) + (", ..." if len(bad_labels) > 4 else "") + ")")

    # every step, label by label, on the distinct faces (each counted once)
    every_compared, every_mismatches = 0, 0
    groups = distinct_face_groups(args, sets, result.predictions)
    for name, x, sweep_labels in groups:
        seed = every_step_labels(model, x, seed_order, args.batch_size)
        wrong = np.zeros(seed.shape, bool)
        for ours in sweep_labels:
            wrong |= seed != ours
        every_compared += seed.size
        every_mismatches += int(wrong.sum())
    faces = f"{len(groups[0][1])} distinct faces of each of {len(groups)} sets"
    if every_mismatches:
        problems.append(f"every-step labels ({faces}): {every_mismatches} of {every_compared} differ")
    print(f"every step, distinct faces: {every_mismatches} of {every_compared} labels differ ({faces}, "
          f"{steps_total + 1} steps)", flush=True)

    # (d) the evaluator of several pruned layers, per evaluated step, against (c)
    multi = multi_layer_steps(model, sets, groups, args.multi_steps, args.batch_size)
    if multi["labels_differing"]:
        problems.append(f"(d) several layers masked: {multi['labels_differing']} of {multi['labels_compared']} labels "
                        "differ from zeroing the same kernels and biases with set_weights")
    print(f"(d) {len(multi['layers'])} conv layers ({multi['channels']} channels) masked: {multi['step_s']:.2f} s per "
          f"evaluated step over the four sets ({len(multi['steps'])} steps {multi['steps']}), "
          f"{multi['step_s'] / one_pass_s:.2f}x (c)", flush=True)

    r = lambda v: round(float(v), 4)  # noqa: E731
    report = {
        "seed_loop_s": r(seed_loop_s),
        "seed_loop_scaled": scaled,
        "seed_loop_steps_measured": len(steps),
        "seed_loop_measured_steps": steps,
        "seed_loop_measured_s": r(measured_s),
        "seed_loop_step_s": r(per_step),
        "seed_loop_ranking_s": r(ranking_s),
        "seed_loop_b_once_s": r(one_pass_s),
        "seed_order": args.seed_order,
        "sweep_s": r(sweep_s),
        "one_pass_s": r(one_pass_s),
        "steps": steps_total,
        "peak_rss_gib": round(peak_rss_gib, 3),
        "agree": not problems,
        "disagreements": problems,
        "same_ranking": same_ranking,
        "curve_values_compared": curve_values,
        "curve_values_differing": len(bad_curves),
        "max_curve_diff_pp": float(max(curve_diffs)),
        "labels_compared": label_values,
        "labels_differing": label_diffs,
        "every_step_labels_compared": every_compared,
        "every_step_label_mismatches": every_mismatches,
        "device": device,
        "inputs": source,
        "input_dtype": dtype,
        "batch_size": args.batch_size,
        "sizes": {"valid": len(valid.clean), "test": len(test.clean)},
        "sweep_phases_s": {k: r(v) for k, v in result.seconds.items()},
        "run": {"command": command, "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
                "versions": versions()},
    }
    report["multi_layer"] = {"layers": multi["layers"], "channels": multi["channels"], "steps": multi["steps"],
                             "steps_timed": multi["steps_timed"],
                             "step_s": r(multi["step_s"]), "step_cpu_s": r(multi["step_cpu_s"]),
                             "traces": multi["traces"], "segments": multi["segments"],
                             "labels_compared": multi["labels_compared"],
                             "labels_differing": multi["labels_differing"]}
    report["ratio_multi_step_over_one_pass"] = round(multi["step_s"] / one_pass_s, 3)
    report["ratio_multi_step_over_one_pass_goal"] = MULTI_STEP_GOAL
    report["ratio_multi_step_over_one_pass_cpu"] = round(multi["step_cpu_s"] / one_pass_cpu, 3)
    report["ratio_seed_over_sweep"] = round(report["seed_loop_s"] / report["sweep_s"], 2)
    report["ratio_sweep_over_one_pass"] = round(report["sweep_s"] / report["one_pass_s"], 3)
    # CPU seconds of this process (all threads): steadier than wall time on a shared machine
    report["cpu_s"] = {"seed_loop": r(seed_loop_cpu), "sweep": r(sweep_cpu), "one_pass": r(one_pass_cpu)}
    report["ratio_seed_over_sweep_cpu"] = round(report["cpu_s"]["seed_loop"] / report["cpu_s"]["sweep"], 2)
    report["ratio_sweep_over_one_pass_cpu"] = round(report["cpu_s"]["sweep"] / report["cpu_s"]["one_pass"], 3)

    how = f"scaled from {len(steps)} steps" if scaled else "all measured"
    rows = [
        ("(a) Lab 3 loop, measured", f"{measured_s:.1f} s (ranking, B once, {len(steps)} steps)"),
        ("(a) Lab 3 loop, one step", f"{per_step:.2f} s (set_weights, B' on the 4 sets)"),
        (f"(a) Lab 3 loop, {steps_total} steps", f"{seed_loop_s:.1f} s ({how})"),
        (f"(b) runner sweep, {steps_total} steps", f"{sweep_s:.1f} s"),
        ("(c) one model.predict, 4 sets", f"{one_pass_s:.1f} s"),
        ("a / b", f"{report['ratio_seed_over_sweep']:.1f}x"),
        ("b / c", f"{report['ratio_sweep_over_one_pass']:.2f}"),
        ("a / b, CPU time", f"{report['ratio_seed_over_sweep_cpu']:.1f}x ({seed_loop_cpu:.1f} / {sweep_cpu:.1f} CPU s)"),
        ("b / c, CPU time", f"{report['ratio_sweep_over_one_pass_cpu']:.2f} ({sweep_cpu:.1f} / {one_pass_cpu:.1f} CPU s)"),
        (f"(d) {len(multi['layers'])} layers masked, one step", f"{multi['step_s']:.2f} s ({multi['channels']} channels "
         f"of {', '.join(multi['layers'])}; {len(multi['steps'])} steps timed)"),
        (f"d / c (goal <= {MULTI_STEP_GOAL:g})", f"{report['ratio_multi_step_over_one_pass']:.2f} (CPU time "
         f"{report['ratio_multi_step_over_one_pass_cpu']:.2f})"),
        ("peak memory of (b)", f"{peak_rss_gib:.2f} GiB (process peak RSS after (b), {dtype} inputs included)"),
        ("curves of (a) and (b), measured steps",
         f"{len(bad_curves)} of {curve_values} values differ (max {report['max_curve_diff_pp']:.4f} pp)"),
        ("B' labels of (a) and (b), measured steps", f"{label_diffs:,} of {label_values:,} differ"),
        ("every step, distinct faces", f"{every_mismatches:,} of {every_compared:,} labels differ ({faces})"),
        ("same ranking", str(same_ranking)),
        ("device", device),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"| {k.ljust(width)} | {v} |" for k, v in rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'benchmark.json'}")
    if problems:
        print("FAILED: (a) and (b) disagree:\n  " + "\n  ".join(problems), file=sys.stderr)
        print(f"not writing {args.results_dir}: the results of a disagreeing run are not published", file=sys.stderr)
        return 1
    write_results(Path(args.results_dir), report, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
