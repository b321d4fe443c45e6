"""ANP's compiled step against the passes it cannot avoid, on the Lab 3 network at Lab 3 image size.

    python experiments/anp_step_timing.py                 # every Conv2D, batch 128, 3 repeats of 100 iterations
    python experiments/anp_step_timing.py --iterations 3 --repeats 1 --images 16 --results-dir /tmp/s   # a quick try

One iteration of ANP's mask learning (defense/criteria/anp.py, MaskLearner._train_step, after
csdongxian/ANP_backdoor optimize_mask_cifar.py::mask_train) runs the network three times (the perturbation's
ascent step, then the natural and the perturbed pass of the mask step) and back-propagates three times. This
script times, on the same batches (128 drawn with replacement from `--images` clean Lab 3 faces, every
Conv2D masked, the defaults of conf/prune/anp.yaml), alternating, `--repeats` blocks of `--iterations`:

- `anp`: the step as the framework runs it: kernel and bias of each channel scaled by m + d and m + e;
- `anp, masks on the conv outputs`: the same function written as conv(x, W) * (m + d) + b * (m + e), so
  that the convolution reads no mask and the masks' gradient needs no filter gradient (this variant lives in
  this script only);
- `floor`: three forward passes of the unmasked network and three gradients of its cross-entropy with respect
  to every Conv2D's kernel and bias (what training the network for three steps computes), on the same batch.

Both ANP arms start from the same masks and seed and see the same batches; the table gives the largest
difference of their masks at the end and how many masks each has at or below ANP's threshold, so it shows
how far a rounding-level change of the same function moves ANP's masks. Writes
experiments/results/anp_step_timing.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files  # noqa: E402
from results_files import CSAW, REPO  # noqa: E402

NAME = "anp_step_timing"
ARMS = ("anp", "anp, masks on the conv outputs", "floor")


def output_masks(model, layers, network=None):
    """defense.criteria._masking.ChannelMasks with the masks applied to each masked conv's output instead of its
    kernel and bias: conv(x, W) * (m + d) + b * (m + e), then the activation (the same function)."""
    from defense.criteria._masking import ChannelMasks

    class OutputMasks(ChannelMasks):
        def __init__(self):
            super().__init__(model, layers, network)
            net = self.network
            graph = getattr(net, "_functional", None) or net
            depths = sorted(graph._nodes_by_depth, reverse=True)
            self.nodes = [n for d in depths for n in graph._nodes_by_depth[d] if n.operation and not n.is_input]
            self.input_id, self.output_id = id(net.inputs[0]), id(net.outputs[0])
            self.at = {id(conv): i for i, conv in enumerate(self.convs)}

        def forward(self, x, masked=True, noise_w=None, noise_b=None):
            if not masked:
                return super().forward(x, masked, noise_w, noise_b)
            values = {self.input_id: x}
            for node in self.nodes:
                op, i = node.operation, self.at.get(id(node.operation))
                if i is None:
                    args, kwargs = node.arguments.fill_in(values)
                    kwargs = dict(kwargs)
                    if getattr(op, "_call_has_training_arg", False):
                        kwargs["training"] = False
                    out = op(*args, **kwargs)
                    outs = list(out) if isinstance(out, (list, tuple)) else [out]
                else:
                    z = op.convolution_op(values[id(node.input_tensors[0])], op.kernel)
                    z = z * (self.masks[i] if noise_w is None else self.masks[i] + noise_w[i])
                    if op.use_bias:
                        z = z + op.bias * (self.masks[i] if noise_b is None else self.masks[i] + noise_b[i])
                    outs = [op.activation(z) if op.activation is not None else z]
                for tensor, value in zip(node.output_tensors, outs):
                    values[id(tensor)] = value
            return values[self.output_id]

    return OutputMasks()


def floor_step(model, layers):
    """Three forward passes and three gradients with respect to the kernels and biases of `layers`."""
    import tensorflow as tf

    from defense.criteria._masking import cross_entropy, step_signature

    variables = [v for name in layers for v in (model.get_layer(name).kernel, model.get_layer(name).bias)
                 if v is not None]

    @tf.function(input_signature=step_signature(model))
    def step(x, y):
        total = tf.constant(0.0)
        for _ in range(3):
            with tf.GradientTape() as tape:
                loss = cross_entropy(model, y, model(x, training=False))
            total += loss + tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, variables)]) * 0.0
        return total

    return step


def measure(args) -> dict:
    import keras
    import numpy as np

    from defense.criteria import anp
    from defense.nets import models

    cfg, faces = results_files.lab3_clean_faces(args.weights, args.images, ["prune=anp"])
    model = models.load_model(cfg.model, args.weights)
    layers = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    x = models.scale_pixels(faces.x, models.input_divisor(cfg.model))
    y = np.asarray(faces.y, np.int64)
    s = anp.settings(cfg.prune)
    learners = {ARMS[0]: anp.MaskLearner(model, layers, s, seed=0), ARMS[1]: anp.MaskLearner(model, layers, s, seed=0)}
    learners[ARMS[1]].masks = output_masks(model, layers)  # before its first step: the step traces with these
    floor = floor_step(model, layers)
    run = {ARMS[0]: learners[ARMS[0]].step, ARMS[1]: learners[ARMS[1]].step,
           ARMS[2]: lambda xb, yb: float(floor(keras.ops.convert_to_tensor(xb), keras.ops.convert_to_tensor(yb)))}
    rng = np.random.default_rng(0)
    warm = rng.integers(0, len(x), size=s["batch_size"])
    for arm in ARMS:  # the trace of each step, not timed
        run[arm](x[warm], y[warm])
    ms: dict[str, list] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        batches = [rng.integers(0, len(x), size=s["batch_size"]) for _ in range(args.iterations)]
        for arm in ARMS:
            started = time.perf_counter()
            for b in batches:
                run[arm](x[b], y[b])
            ms[arm].append(1000 * (time.perf_counter() - started) / args.iterations)
            print(f"{arm}, repeat {repeat + 1}: {ms[arm][-1]:.1f} ms / iteration", flush=True)
    masks = {arm: np.concatenate([m.numpy() for m in learners[arm].masks.masks]) for arm in ARMS[:2]}
    mean = {arm: sum(v) / len(v) for arm, v in ms.items()}
    return {"layers": layers, "images": args.images, "image_shape": list(faces.x.shape[1:]),
            "batch_size": s["batch_size"], "iterations": args.iterations, "repeats": args.repeats,
            "threshold": s["threshold"], "ms_per_iteration": ms, "mean_ms_per_iteration": mean,
            "times_floor": {arm: mean[arm] / mean[ARMS[2]] for arm in ARMS},
            "masks_at_or_below_threshold": {arm: int((m <= s["threshold"]).sum()) for arm, m in masks.items()},
            "masks": int(masks[ARMS[0]].size),
            "largest_mask_difference": float(np.max(np.abs(masks[ARMS[0]] - masks[ARMS[1]]))),
            "iterations_per_arm": 1 + args.iterations * args.repeats}


def markdown(r: dict) -> str:
    rows = []
    for arm in ARMS:
        masked = r["masks_at_or_below_threshold"].get(arm)
        rows.append([arm, ", ".join(f"{v:.1f}" for v in r["ms_per_iteration"][arm]),
                     f"{r['mean_ms_per_iteration'][arm]:.1f}", f"{r['times_floor'][arm]:.2f}",
                     "" if masked is None else f"{masked} of {r['masks']}",
                     f"{r['largest_mask_difference']:.4f}" if arm == ARMS[1] else ""])
    return (f"One ANP iteration on the Lab 3 network ({'x'.join(str(d) for d in r['image_shape'])} pixels, masks on "
            f"{', '.join(r['layers'])}, batch {r['batch_size']} drawn from {r['images']} clean faces), "
            f"{r['repeats']} repeat(s) of {r['iterations']} iterations per arm, alternating, on the same batches; "
            f"each ANP arm ran {r['iterations_per_arm']} iterations in all from the same masks and seed:\n\n"
            + results_files.md_table(["step", "ms / iteration, each repeat", "mean", "x floor",
                                      f"masks <= {r['threshold']:g} at the end", "largest mask difference from anp"],
                                     rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(CSAW / "lab3_bd_weights.h5"), help="Lab 3 weights .h5")
    parser.add_argument("--images", type=int, default=577, help="clean faces the batches are drawn from (default 577)")
    parser.add_argument("--iterations", type=int, default=100, help="iterations per arm and repeat (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per arm (default 3)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "experiments" / "results",
                        help="where anp_step_timing.md/.json go (default experiments/results)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.iterations < 1 or args.repeats < 1:
        parser.error("--images, --iterations and --repeats must be >= 1")
    results_files.use_this_checkout()
    report = measure(args)
    body = markdown(report)
    print(body)
    results_files.write_results(NAME, body, report, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
