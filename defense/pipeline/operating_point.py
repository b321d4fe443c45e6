"""A criterion's own operating point, scored like a step of the sweep.

Some criteria say themselves which channels to prune (`Scores.operating_point`: CLP prunes the
channels above mean + u std of their layer, ANP and RNP the channels whose mask is below a threshold).
That set need not be a prefix of the global ranking, so it is evaluated on its own: B (nothing pruned)
and B' (those channels pruned) on the clean and poisoned validation and test data, giving one summary
row (`point` = `operating_point`) with the columns of a curve row: clean accuracy and ASR of B' on
valid, of G(B, B') on test, and of B' alone on test.
"""

from __future__ import annotations

import numpy as np

from defense.core.errors import DefenseError

POINT = "operating_point"
FILE_KEY = "op"  # models/model_B_op.h5, model_B_op_ft.h5, model_B_op_compact.h5


def checked_pairs(operating_point: dict, model, layers: list[str]) -> list[tuple[str, int]]:
    """The (layer, channel) pairs of an operating point, in layer order then channel order."""
    unknown = sorted(set(operating_point) - set(layers))
    if unknown:
        raise DefenseError(f"the criterion's operating point names layers {unknown} that are not pruned ({layers})")
    pairs = []
    for name in layers:
        channels = sorted({int(c) for c in operating_point.get(name, [])})
        filters = int(model.get_layer(name).filters)
        if channels and (channels[0] < 0 or channels[-1] >= filters):
            raise DefenseError(f"the criterion's operating point prunes channels outside 0..{filters - 1} of {name}")
        pairs += [(name, c) for c in channels]
    return pairs


def predictions(model, layers: list[str], pairs, sets: list[tuple[str, object]], divisor: float,
                batch_size: int, bn_units: dict | None = None, bn_zero=("gamma",)) -> dict[str, np.ndarray]:
    """Labels (N, 2) per set: column 0 B, column 1 B' with `pairs` pruned (defense.pruning.channel_masks; the
    convs of `bn_units` pruned on their BatchNormalization)."""
    from defense.pruning.channel_masks import ChannelMasks

    masks = ChannelMasks(model, layers, batch_size, bn_units, bn_zero)
    return {key: masks.predict(images.x, pairs, [0, len(pairs)], divisor=divisor) for key, images in sets}


def operating_point_row(pairs, channels: int, preds: dict[str, np.ndarray], valid, test, names: list[str],
                        num_classes: int) -> dict:
    """The summary row of the operating point from the (N, 2) labels of `predictions`.

    channels: all channels of the pruned layers (fraction_pruned is a percentage of them, as in summary.csv).
    """
    from defense.pipeline.curves import curve_rows

    row = curve_rows(preds, valid, test, names, [0, len(pairs)], channels, num_classes)[1]
    row["fraction_pruned"] = row["fraction_pruned"] * 100.0
    return {"point": POINT, "drop": float("nan"), "reached": True, **row}
