"""One image file as the model's input: Pillow reads it (RGB, or grey L for one-channel models) after
its header's size is checked against `limits.max_image_pixels` (defense/core/safe_files.py).

Used by `python -m defense.predict` (defense/predict.py) and by image-folder data sets (defense/data/files.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from defense.core import safe_files
from defense.core.errors import DefenseError
from defense.core.safe_files import Limits


class ImageError(Exception):
    """One input file cannot be classified (reported, the other files go on)."""


def load_image(path: Path, input_shape, resize: bool, limits: Limits | None = None) -> np.ndarray:
    """One image as an HWC float32 array of raw pixels (0..255), checked against the model's input.

    The header's width x height is checked against `limits.max_image_pixels` (Pillow's own
    MAX_IMAGE_PIXELS is set to the same cap) before any pixel is decoded.
    """
    from PIL import Image

    height, width, channels = (int(s) for s in input_shape)
    mode = {1: "L", 3: "RGB"}[channels]
    cap = safe_files.resolve(limits).max_image_pixels
    try:
        with safe_files.pil_pixel_cap(limits), warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by our own check
            with Image.open(path) as img:  # reads the header only
                safe_files.check_image_pixels(img.size[0], img.size[1], str(path), limits)
                img.load()
                img = img.convert(mode)
    except DefenseError as err:
        raise ImageError(str(err)) from None
    except Image.DecompressionBombError as err:  # Pillow's cap (2 x ours) hit in Image.open
        raise ImageError(
            f"{path}: {err} (limits.max_image_pixels={cap}); refused before decoding, raise limits.max_image_pixels "
            "if the image is trusted"
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to decode is this file's problem
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"{path}: not a readable image ({reason}); give PNG or JPEG files") from None
    if img.size != (width, height):
        if not resize:
            raise ImageError(
                f"{path}: the image is {img.size[0]}x{img.size[1]} pixels (width x height) but the model takes "
                f"{width}x{height}; resize it, or pass resize=true to resize every image"
            )
        img = img.resize((width, height), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32)
    return x[..., None] if x.ndim == 2 else x
