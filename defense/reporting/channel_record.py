"""What a run records per channel: `channel_scores.csv`, `pruned.json` and the criterion's history.

- channel_scores.csv: one row per (layer, channel) of the pruned layers, in layer order then channel
  order: the criterion's score, its rank in the global pruning order (0 = pruned first), then the
  criterion's extra columns (`Scores.columns`, e.g. a learned mask);
- pruned.json: for each network the run keeps (`drop_<D>` for each reached accuracy-drop threshold,
  `operating_point` for the criterion's own), the pruned channels as {layer: [channels]};
- <criterion>_history.csv: `Scores.history` (losses per iteration block of a learning criterion).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from defense.reporting import report


def _exact(value) -> str:
    """A score with the digits that tell float64 values apart (the csv is read back to check rankings)."""
    return repr(float(value))


def channel_rows(scores, layers: list[str], pairs) -> list[dict]:
    rank = {(name, int(c)): i for i, (name, c) in enumerate(pairs)}
    rows = []
    for name in layers:
        values = np.asarray(scores.values[name], np.float64)
        for c in range(len(values)):
            row = {"layer": name, "channel": c, "score": _exact(values[c]), "rank": rank[(name, c)]}
            for column, per_layer in scores.columns.items():
                if name in per_layer:
                    value = per_layer[name][c]
                    row[column] = _exact(value) if np.ndim(value) == 0 and not isinstance(value, str) else value
            rows.append(row)
    return rows


def write_channel_scores(path, scores, layers: list[str], pairs) -> Path:
    return report.write_csv(path, channel_rows(scores, layers, pairs),
                            first=["layer", "channel", "score", "rank"])


def write_pruned(path, kept: dict[str, dict[str, list[int]]]) -> Path:
    """kept: network name (drop_2, operating_point) -> {layer: channels}."""
    path = Path(path)
    blocks = []
    for name, pruned in kept.items():  # one line per layer
        layers = [f"    {json.dumps(layer)}: {json.dumps([int(c) for c in channels])}" for layer, channels in pruned.items()]
        blocks.append(f"  {json.dumps(name)}: {{\n" + ",\n".join(layers) + "\n  }")
    path.write_text("{\n" + ",\n".join(blocks) + ("\n}\n" if blocks else "}\n"))
    json.loads(path.read_text())  # well-formed
    return path


def write_history(path, history: list[dict]) -> Path:
    return report.write_csv(path, history, first=["step"])
