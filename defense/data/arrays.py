"""Images and labels in the CSAW-HackML Lab 3 h5 layout.

An h5 file holds `data` (N, C, H, W) channels-first, pixels 0..255 (NHWC files are accepted too),
`label` (N,) and, for poisoned sets, optionally `clean_label` (N,), the true identity of each image.
Images are returned NHWC float32, unscaled: input scaling belongs to the model (see `defense.nets.models`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from defense.core import safe_files
from defense.core.errors import DefenseError
from defense.core.safe_files import Limits

LAB3_DATA_HINT = (
    "the Lab 3 data (cl/valid.h5, cl/test.h5, bd/bd_valid.h5, bd/bd_test.h5) is downloaded from the "
    "CSAW-HackML Lab 3 README's data link into the folder given as dataset.root; or run on the "
    "embedded default (dataset=badnets_mnist model=badnets_mnist)"
)


@dataclass
class LabeledImages:
    """One set of images: `x` NHWC float32 (unscaled), `y` int64 labels, optional `clean_label`."""

    name: str
    x: np.ndarray
    y: np.ndarray
    clean_label: np.ndarray | None = None
    path: str = ""

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index) -> "LabeledImages":
        return LabeledImages(
            self.name,
            self.x[index],
            self.y[index],
            None if self.clean_label is None else self.clean_label[index],
            self.path,
        )

    @staticmethod
    def concat(parts: list["LabeledImages"], name: str | None = None) -> "LabeledImages":
        with_clean = all(p.clean_label is not None for p in parts)
        return LabeledImages(
            name or parts[0].name,
            np.concatenate([p.x for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.clean_label for p in parts]) if with_clean else None,
            " + ".join(p.path for p in parts),
        )


def to_nhwc(data: np.ndarray, path: str = "") -> np.ndarray:
    """Channels-first (N, C, H, W) with C in {1, 3} -> NHWC; NHWC and (N, H, W) pass through."""
    if data.ndim == 3:
        return data[..., None]
    if data.ndim != 4:
        raise DefenseError(
            f"{path}: `data` has shape {data.shape}; expected 4 dimensions (N, C, H, W) or (N, H, W, C)"
        )
    if data.shape[1] in (1, 3) and data.shape[-1] not in (1, 3):
        return np.transpose(data, (0, 2, 3, 1))
    return data


def load_h5(path: str, name: str | None = None, hint: str = LAB3_DATA_HINT, limits: Limits | None = None) -> LabeledImages:
    """Load and check one Lab 3 h5 file; every problem is a DefenseError naming the file and the fix.

    The file is untrusted: `safe_files.check_h5` (links, external storage, declared sizes against
    `limits`, the defaults when None) runs before any dataset is read.
    """
    path = os.fspath(path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    if not os.path.isfile(path):
        raise DefenseError(f"data file not found: {path} ({hint})")
    safe_files.check_h5(path, limits)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("data", "label") if k not in f]
            if missing:
                raise DefenseError(
                    f"{path}: no {' and no '.join(repr(m) for m in missing)} dataset in the h5 file "
                    f"(found {sorted(f.keys())}); a Lab 3 data file holds 'data' (N, 3, H, W) and 'label' (N,)"
                )
            data = np.asarray(f["data"][()], dtype=np.float32)
            label = np.asarray(f["label"][()])
            clean = np.asarray(f["clean_label"][()]) if "clean_label" in f else None
    except OSError as err:
        raise DefenseError(f"{path}: not a readable h5 file ({err}); give a Lab 3 h5 data file") from None
    return labeled_images(path, name, data, label, clean)


def labeled_images(path: str, name: str, data: np.ndarray, label: np.ndarray,
                   clean: np.ndarray | None = None) -> LabeledImages:
    """Check images and labels read from `path` (any layout) and make them a LabeledImages (NHWC)."""
    if data.shape[0] == 0 or label.size == 0:
        raise DefenseError(f"{path}: the file holds no images; give a data file with at least one image")
    x = to_nhwc(data, path)
    if label.ndim != 1 or label.shape[0] != x.shape[0]:
        raise DefenseError(
            f"{path}: 'label' has shape {label.shape} but 'data' holds {x.shape[0]} images; "
            "give one label per image"
        )
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)))
        raise DefenseError(f"{path}: {bad} image(s) contain NaN or infinite pixels; fix or drop them")
    for key, values in (("label", label), ("clean_label", clean)):
        if values is not None and not np.all(np.isfinite(values.astype(np.float64))):
            raise DefenseError(f"{path}: '{key}' contains NaN or infinite values; labels must be integers")
        if values is not None and np.any(values.astype(np.float64) != np.round(values.astype(np.float64))):
            raise DefenseError(f"{path}: '{key}' contains non-integer values; labels must be integers")
    return LabeledImages(
        name,
        np.ascontiguousarray(x),
        label.astype(np.int64),
        None if clean is None else clean.astype(np.int64),
        path,
    )


def save_h5(path: str, images: np.ndarray, labels: np.ndarray, clean_label: np.ndarray | None = None) -> None:
    """Write NHWC images in the Lab 3 layout (channels-first `data`, float32 `label`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.transpose(np.asarray(images, np.float32), (0, 3, 1, 2)), compression="gzip")
        f.create_dataset("label", data=np.asarray(labels, np.float32))
        if clean_label is not None:
            f.create_dataset("clean_label", data=np.asarray(clean_label, np.float32))


def check_fits(images: LabeledImages, input_shape, num_classes: int, model_name: str = "the model") -> None:
    """Images must have the model's input shape and labels must lie in [0, num_classes)."""
    expected = tuple(int(s) for s in input_shape)
    if tuple(images.x.shape[1:]) != expected:
        raise DefenseError(
            f"{images.path}: images are {tuple(images.x.shape[1:])} (H, W, C) but {model_name} expects "
            f"{expected}; use data made for this model or choose the matching model= option"
        )
    for key, values in (("label", images.y), ("clean_label", images.clean_label)):
        if values is None:
            continue
        out = (values < 0) | (values >= num_classes)
        if np.any(out):
            raise DefenseError(
                f"{images.path}: {int(out.sum())} '{key}' value(s) outside [0, {num_classes}) "
                f"(e.g. {int(values[out][0])}); {model_name} has {num_classes} classes: check model.num_classes "
                "or the data file"
            )


def as_uint8_pixels(images: LabeledImages) -> LabeledImages:
    """`images` with `x` stored as uint8 when that is lossless (every pixel an integer in 0..255, as in
    the Lab 3 files and the extracts), a quarter of the float32 memory; otherwise `images` unchanged.

    The sweep engine (`defense.pruning.masked.MaskedSweep`) and Keras `predict` turn uint8 batches back into
    the same float32 values, so predictions are exactly those on the float32 images.
    """
    x = images.x
    if x.dtype == np.uint8:
        return images
    if x.size and not (x.min() >= 0 and x.max() <= 255):
        return images
    pixels = x.astype(np.uint8)
    if not np.array_equal(pixels, x):  # pixels with fractions
        return images
    return LabeledImages(images.name, pixels, images.y, images.clean_label, images.path)


def shift_images(x: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Each NHWC image translated by its own random (dy, dx) in [-shift, shift], zero-filled."""
    if shift <= 0:
        return x
    n, h, w = x.shape[:3]
    padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    dy = rng.integers(0, 2 * shift + 1, n)
    dx = rng.integers(0, 2 * shift + 1, n)
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
