"""The data files a defender brings (`dataset=files`): one set per file or folder, three layouts.

- `.h5` / `.hdf5`: the Lab 3 layout (`data` (N, C, H, W) or (N, H, W, C), `label`, optional
  `clean_label`), read by `defense.data.arrays.load_h5`;
- `.npz`: arrays `x` (images, channels first or last, or (N, H, W) for grey) and `y` (labels), optional
  `clean_label`; read with `allow_pickle=False`, so a file can hold arrays only, never code, and each
  array's declared size is checked against `limits.max_array_gib` before it is read;
- a folder with one subfolder per class label (`0/`, `1/`, ...; the subfolder name is the label) of
  PNG/JPEG images, read as the model's input (grey for one channel, RGB for three) by
  `defense.data.images.load_image`, which refuses an image of the wrong size or over `limits.max_image_pixels`.

Pixels stay raw (e.g. 0..255); the model's input scaling is applied later (`model.input_divisor`).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from defense.core import safe_files
from defense.data.arrays import LabeledImages, labeled_images, load_h5
from defense.core.errors import DefenseError
from defense.core.safe_files import Limits

H5_SUFFIXES = (".h5", ".hdf5")


def load_images(path, name: str, input_shape, hint: str = "", limits: Limits | None = None) -> LabeledImages:
    """One set from an h5 file, an npz file or a folder of class subfolders (see the module docstring)."""
    path = Path(os.fspath(path))
    where = f" ({hint})" if hint else ""
    if path.is_dir():
        return load_folder(path, name, input_shape, limits)
    if not path.is_file():
        raise DefenseError(f"data file or folder not found: {path}{where}")
    suffix = path.suffix.lower()
    if suffix in H5_SUFFIXES:
        return load_h5(str(path), name, hint=hint or "give an h5 file with 'data' and 'label'", limits=limits)
    if suffix == ".npz":
        return load_npz(path, name, limits)
    raise DefenseError(
        f"{path}: unknown data format {suffix or '(no suffix)'!r}; give an .h5 file (Lab 3 layout: data, label), "
        "an .npz file (arrays x, y) or a folder with one subfolder of images per class label"
    )


def _npz_member_bytes(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], int]:
    """(shape, declared bytes) of one array of an npz, from its .npy header only."""
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise DefenseError(f"{archive.filename}: array {member!r} holds Python objects; give numeric arrays")
    return tuple(shape), int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def load_npz(path: Path, name: str, limits: Limits | None = None) -> LabeledImages:
    """Arrays `x`, `y` (and `clean_label`) of an npz file, checked before and after reading."""
    max_bytes = safe_files.resolve(limits).max_array_bytes
    try:
        with zipfile.ZipFile(path) as archive:
            members = {Path(m).stem: m for m in archive.namelist() if m.endswith(".npy")}
            missing = [k for k in ("x", "y") if k not in members]
            if missing:
                raise DefenseError(
                    f"{path}: no {' and no '.join(repr(m) for m in missing)} array in the npz file (found "
                    f"{sorted(members)}); an npz data file holds images 'x' and labels 'y'"
                )
            for key in ("x", "y", "clean_label"):
                if key in members:
                    shape, size = _npz_member_bytes(archive, members[key])
                    if size > max_bytes:
                        raise DefenseError(
                            f"{path}: array {key!r} declares shape {shape} ({size / 2**30:.1f} GiB), more than the "
                            f"{max_bytes / 2**30:.1f} GiB allowed for one array (limits.max_array_gib); split the "
                            "data into smaller files or raise the limit"
                        )
        with np.load(path, allow_pickle=False) as arrays:
            x = np.asarray(arrays["x"], np.float32)
            y = np.asarray(arrays["y"])
            clean = np.asarray(arrays["clean_label"]) if "clean_label" in arrays else None
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise DefenseError(f"{path}: not a readable npz file ({err}); save it with numpy.savez(path, x=..., y=...)") from None
    return labeled_images(str(path), name, x, y, clean)


def load_folder(path: Path, name: str, input_shape, limits: Limits | None = None) -> LabeledImages:
    """Images of every class subfolder of `path` (subfolder name = integer label), sorted by file name."""
    from defense.data.images import ImageError, load_image

    subfolders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    bad = [p.name for p in subfolders if not p.name.isdigit()]
    if bad:
        raise DefenseError(
            f"{path}: subfolder(s) {bad} are not class labels; an image folder holds one subfolder per class, "
            "named by its integer label (0/, 1/, ...)"
        )
    images, labels = [], []
    for sub in subfolders:
        for file in sorted(p for p in sub.iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                images.append(load_image(file, input_shape, resize=False, limits=limits))
            except ImageError as err:
                raise DefenseError(str(err)) from None
            labels.append(int(sub.name))
    if not images:
        raise DefenseError(
            f"{path}: no images found; an image folder holds one subfolder per class label (0/, 1/, ...) "
            "with PNG/JPEG files in it"
        )
    return labeled_images(str(path), name, np.stack(images), np.asarray(labels, np.int64))
