"""Compiled (XLA, `jit_compile=True`) versus plain TensorFlow graphs for the two learning loops, measured both ways.

    python experiments/jit_timing.py                      # 100 ANP iterations and 10 fine-tuning epochs each way
    python experiments/jit_timing.py --iterations 20 --epochs 3 --results-dir /tmp/jit   # a quick try

On the real Lab 3 network (`lab3_bd_weights.h5`, 55 x 47 x 3 faces) and the clean faces of the Lab 3
extracts, each loop runs twice from the same weights and seeds, once as the framework runs it (a plain
`tf.function`; Keras' `compile(jit_compile=False)`) and once compiled by XLA:

- ANP's mask learning step (defense/criteria/anp.py MaskLearner, masks on every Conv2D, batch 128 drawn
  with replacement from `--images` faces): ms per iteration after the first (the first one traces and
  compiles), and the largest difference between the two runs' masks at the end;
- fine-tuning (Keras `fit`, SGD, batches of `finetune.batch_size` (64 by default), no augmentation, on the same faces): seconds per epoch after
  the first, and the largest difference between the two runs' weights.

TensorFlow's op determinism is off here for both runs (XLA does not run every op deterministically, and
Keras' `jit_compile="auto"` turns XLA off whenever determinism is on, as in every defense run). Writes
experiments/results/jit_timing.{md,json}; the framework uses XLA for neither loop, and this file says
whether that still holds on the machine it was measured on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files  # noqa: E402
from results_files import CSAW, REPO  # noqa: E402


def time_anp(model_path, cfg, x, y, jit: bool, iterations: int) -> dict:
    import keras
    import numpy as np

    from defense.criteria import anp
    from defense.nets import models

    keras.utils.set_random_seed(0)
    model = models.load_model(cfg.model, model_path)
    layers = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    s = dict(anp.DEFAULTS, level="auto", shift=None, images=len(x), fraction=None)
    learner = anp.MaskLearner(model, layers, s, seed=0, jit_compile=jit)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    first = None
    for it in range(iterations):
        index = rng.integers(0, len(x), size=s["batch_size"])
        loss, _ = learner.step(x[index], y[index])
        if it == 0:
            first = time.perf_counter()
    done = time.perf_counter()
    return {"first_s": first - started, "ms_per_iteration": 1000 * (done - first) / max(1, iterations - 1),
            "final_loss": loss, "layers": layers,
            "masks": np.concatenate([m.numpy() for m in learner.masks.masks])}


def time_finetune(model_path, cfg, x, y, jit: bool, epochs: int, batch_size: int) -> dict:
    import keras
    import numpy as np

    from defense.nets import models

    keras.utils.set_random_seed(0)
    model = models.load_model(cfg.model, model_path)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.001, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=models.uses_logits(model)),
                  metrics=["accuracy"], jit_compile=jit)
    seconds = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.t)

    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, callbacks=[Clock()], verbose=0)
    later = seconds[1:] or seconds
    return {"first_s": seconds[0], "s_per_epoch": float(np.mean(later)), "final_loss": history.history["loss"][-1],
            "weights": np.concatenate([w.ravel() for w in model.get_weights()])}


def fixed(value: float) -> str:
    """Three significant digits without an exponent (0.0000000838, 1.00), as the docs' number check reads them."""
    import math

    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(CSAW / "lab3_bd_weights.h5"), help="Lab 3 weights .h5")
    parser.add_argument("--images", type=int, default=577, help="clean faces (the extracts' repeated; default 577)")
    parser.add_argument("--iterations", type=int, default=100, help="ANP iterations each way (default 100)")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs each way (default 10)")
    parser.add_argument("--results-dir", default=str(REPO / "experiments" / "results"),
                        help="where jit_timing.md/.json go (default experiments/results)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.iterations < 2 or args.epochs < 2:
        parser.error("--images must be >= 1, --iterations and --epochs >= 2")

    results_files.use_this_checkout()
    import numpy as np

    from defense.criteria import anp
    from defense.nets import models
    from defense.pipeline.finetune import finetune_settings

    cfg, faces = results_files.lab3_clean_faces(args.weights, args.images)
    x = models.scale_pixels(faces.x, models.input_divisor(cfg.model)).astype(np.float32)
    y = np.asarray(faces.y, np.int64)

    report = {"images": args.images, "image_shape": list(x.shape[1:]), "iterations": args.iterations,
              "epochs": args.epochs, "anp_batch_size": anp.DEFAULTS["batch_size"],
              "finetune_batch_size": finetune_settings(cfg.finetune)["batch_size"], "loops": {}}
    for loop, run, unit in (("anp", lambda jit: time_anp(args.weights, cfg, x, y, jit, args.iterations),
                             "ms_per_iteration"),
                            ("finetune", lambda jit: time_finetune(args.weights, cfg, x, y, jit, args.epochs,
                                                             report["finetune_batch_size"]),
                             "s_per_epoch")):
        plain, xla = run(False), run(True)
        values = "masks" if loop == "anp" else "weights"
        report["loops"][loop] = {
            "unit": unit, "plain": plain[unit], "xla": xla[unit], "speedup": plain[unit] / xla[unit],
            "first_plain_s": plain["first_s"], "first_xla_s": xla["first_s"],
            "final_loss_plain": float(plain["final_loss"]), "final_loss_xla": float(xla["final_loss"]),
            "max_abs_difference": float(np.max(np.abs(plain[values] - xla[values]))),
            "compared": values,
        }
        print(f"{loop}: plain {plain[unit]:.3f}, XLA {xla[unit]:.3f} {unit}; "
              f"largest difference of the {values} {report['loops'][loop]['max_abs_difference']:.3g}", flush=True)
    rows = []
    for loop, r in report["loops"].items():
        what = (f"ANP mask learning, every Conv2D, batch {report['anp_batch_size']} ({args.iterations} iterations)"
                if loop == "anp" else
                f"fine-tuning with Keras fit, SGD, batch {report['finetune_batch_size']} ({args.epochs} epochs)")
        unit = "ms / iteration" if loop == "anp" else "s / epoch"
        rows.append([what, f"{r['plain']:.3f} {unit}", f"{r['xla']:.3f} {unit}", f"{r['speedup']:.2f}x",
                     f"{r['first_plain_s']:.1f} / {r['first_xla_s']:.1f}",
                     f"{fixed(r['max_abs_difference'])} ({r['compared']})",
                     "yes" if r["speedup"] > 1.05 else "no"])
    body = ("Plain TensorFlow graphs versus XLA (`jit_compile=True`) on the Lab 3 network, "
            f"{'x'.join(str(d) for d in report['image_shape'])} pixels, {args.images} clean faces, the same "
            "weights and seeds both ways; op determinism off for both. The framework compiles neither loop with "
            "XLA; the last column says whether XLA would be faster here.\n\n"
            + results_files.md_table(["loop", "plain", "XLA", "plain / XLA", "first step or epoch, s (plain / XLA)",
                                      "largest difference at the end", "XLA faster"], rows))
    results_files.write_results("jit_timing", body, report, Path(args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
