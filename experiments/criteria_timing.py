"""How long ANP's mask learning takes on the Lab 3 network at Lab 3 image size (55 x 47 x 3).

    taskset -c 0,1 python experiments/criteria_timing.py            # the goal: <= 3 minutes on 2 CPU cores
    python experiments/criteria_timing.py --iterations 20 --results-dir /tmp/timing   # a quick try

Runs defense/criteria/anp.py::score with the published defaults (conf/prune/anp.yaml: 2000 iterations
of batch 128, eps 0.4, 1 perturbation step) on the real Lab 3 network (`lab3_bd_weights.h5`) and
`--images` clean images (default 577 = 5 % of the 11547 clean validation images of the Lab 3 data, the
former default prune.anp.fraction; the extracts' clean faces are repeated to that count: only their number
and size matter for the time). Writes experiments/results/criteria_timing.{md,json}: wall seconds of
the whole scoring (including the one trace of the training step) and per iteration, and the CPU
seconds of the process (steadier than wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files  # noqa: E402
from results_files import CSAW, REPO  # noqa: E402

GOAL_SECONDS = 180.0  # ANP's mask learning at Lab-3 image size on 2 CPU cores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(CSAW / "lab3_bd_weights.h5"), help="Lab 3 weights .h5")
    parser.add_argument("--images", type=int, default=577, help="clean images ANP learns from (default 577)")
    parser.add_argument("--iterations", type=int, default=2000, help="mask updates (default 2000, the paper's)")
    parser.add_argument("--layers", default="conv_3",
                        help="comma-separated Conv2D layers to mask (default conv_3; 'all': every Conv2D)")
    parser.add_argument("--results-dir", default=str(REPO / "experiments" / "results"),
                        help="where criteria_timing.md/.json go (default experiments/results)")
    parser.add_argument("--render-again", action="store_true",
                        help="write the results files again from the measurements in criteria_timing.json")
    args = parser.parse_args(argv)
    if args.render_again:
        return render_again(Path(args.results_dir))
    if args.images < 1 or args.iterations < 1:
        parser.error("--images and --iterations must be >= 1")

    results_files.use_this_checkout()
    import keras

    from defense.nets import models
    from defense.criteria import anp

    cfg, images = results_files.lab3_clean_faces(args.weights, args.images, [
        "prune=anp", f"prune.anp.iterations={args.iterations}", "prune.anp.fraction=1",
        f"prune.anp.log_every={max(1, args.iterations // 10)}"])
    model = models.load_model(cfg.model, args.weights)
    convs = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    layers = convs if args.layers == "all" else [name.strip() for name in args.layers.split(",")]
    unknown = [name for name in layers if name not in convs]
    if unknown:
        parser.error(f"--layers: {', '.join(unknown)} not among the Conv2D layers {', '.join(convs)}")

    cpu0, wall0 = time.process_time(), time.perf_counter()
    scores = anp.score(model, layers, images, cfg, models.input_divisor(cfg.model))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    first_row = scores.history[0]
    per_iteration = (wall - first_row["seconds"]) / max(1, args.iterations - first_row["step"])
    s = anp.settings(cfg.prune)
    report = {
        "layers": layers, "images": args.images, "image_shape": list(images.x.shape[1:]),
        "iterations": args.iterations, "batch_size": s["batch_size"], "eps": s["eps"], "steps": s["steps"],
        "wall_seconds": wall, "cpu_seconds": cpu, "seconds_per_iteration_after_first_block": per_iteration,
        "goal_seconds": GOAL_SECONDS, "meets_goal": wall <= GOAL_SECONDS,
        "masks_to_prune": scores.history[-1]["masks_to_prune"], "history": scores.history,
    }
    write(report, Path(args.results_dir))
    return 0


def write(report: dict, results_dir: Path, measured: str = "") -> None:
    """criteria_timing.md (the table) and .json (`report`, with the time per iteration in ms as shown)."""
    report["ms_per_iteration_after_first_block"] = 1000 * report["seconds_per_iteration_after_first_block"]
    wall = report["wall_seconds"]
    rows = [[", ".join(report["layers"]), report["images"], f"{report['iterations']} x {report['batch_size']}",
             f"{wall:.1f}", f"{report['cpu_seconds']:.1f}", f"{report['ms_per_iteration_after_first_block']:.1f}",
             "yes" if wall <= GOAL_SECONDS else "no"]]
    body = ("ANP mask learning (defense/criteria/anp.py, conf/prune/anp.yaml defaults) on the Lab 3 network at "
            f"{'x'.join(str(d) for d in report['image_shape'])} pixels; goal <= {GOAL_SECONDS:.0f} s on 2 CPU cores."
            + measured + "\n\n"
            + results_files.md_table(["layers", "images", "iterations x batch", "wall s", "CPU s", "ms / iteration",
                                      f"<= {GOAL_SECONDS:.0f} s"], rows))
    results_files.write_results("criteria_timing", body, report, results_dir)


def render_again(results_dir: Path) -> int:
    """Write the .md and .json again from the measurements of the .json (no new measurement)."""
    import json

    earlier = json.loads((results_dir / "criteria_timing.json").read_text())
    write(earlier["results"], results_dir,
          f" Measured by `{earlier['command']}` on {earlier['date']} (this file re-rendered from its .json).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
