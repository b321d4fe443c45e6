"""Result files of a run: `curves.csv`, `summary.csv` and the printed table of G(B, B').

summary.csv has one row per accuracy-drop threshold (`point` = `drop`) and, for a criterion with its
own operating point (`Scores.operating_point`), one more row (`point` = `operating_point`, `drop`
blank) with the same columns for the channels that rule prunes (defense/pipeline/operating_point.py),
and two more rows (defense/pipeline/select.py): `point` = `defender`, the defender's point chosen on
held-out clean validation images, and `point` = `oracle_test_asr`, the lowest test ASR within the same
budget, `oracle` = true: not available to a defender. `diverged` = true marks a row whose learning
collapsed (defense/core/divergence.py); its fine-tuned scores are left blank.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

CURVE_PREFIX = "curve/"  # MLflow keys of the sweep's curves (one point per channels pruned)
# the selected point's scores as the run's own MLflow metrics (stage `track`)
HEADLINE_COLUMNS = ("test_acc", "test_asr", "der", "valid_acc", "valid_asr", "channels_pruned", "fraction_pruned",
                    "ft_test_acc", "ft_test_asr", "ft_der", "ft_g_test_acc", "ft_g_test_asr")
SUMMARY_COLUMNS = ["drop", "channels_pruned", "fraction_pruned", "valid_acc", "valid_asr", "test_acc", "test_asr"]


def write_csv(path: str | Path, rows: list[dict], first: list[str] | None = None) -> Path:
    """Rows -> csv; columns `first` lead, then every other key in the order it first appears."""
    columns = list(first or [])
    for row in rows:
        columns += [k for k in row if k not in columns]
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(v) for k, v in row.items()})
    return path


def read_csv(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))


def _fmt(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}" if abs(value) < 1 else f"{value:.4f}"
    return value


def summary_rows(thresholds: list[dict]) -> list[dict]:
    """Percentages everywhere: fraction_pruned as % of the layer's channels."""
    rows = []
    for t in thresholds:
        row = dict(t)
        row["fraction_pruned"] = t["fraction_pruned"] * 100.0
        rows.append(row)
    return rows


def _cell(value, width: int) -> str:
    if isinstance(value, float):
        text = "-" if math.isnan(value) else f"{value:.2f}"
    else:
        text = str(value)
    return text.rjust(width)


def results_table(summary: list[dict], title: str, extra: list[tuple[str, str]] | None = None) -> str:
    """A Markdown table like the Lab 3 README's GoodNet table (one row per threshold)."""
    columns = [
        ("channels_pruned", "channels pruned"),
        ("fraction_pruned", "% pruned"),
        ("valid_acc", "valid acc"),
        ("valid_asr", "valid ASR"),
        ("test_acc", "G clean test acc"),
        ("test_asr", "G test ASR"),
        *(extra or []),
    ]
    head = ["G(B, B')"] + [label for _, label in columns]
    widths = [max(14, len(h)) for h in head]
    widths[0] = max([widths[0]] + [len(row_label(row)) for row in summary])
    lines = [title, "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in summary:
        name = row_label(row)
        if not row.get("reached", True):
            cells = [name.ljust(widths[0])] + ["not reached".rjust(widths[1])] + [" " * w for w in widths[2:]]
        else:
            cells = [name.ljust(widths[0])] + [_cell(row.get(key, float("nan")), w) for (key, _), w in zip(columns, widths[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ROW_LABELS = {"operating_point": "operating point", "defender": "defender (held-out)",
              "oracle_test_asr": "ORACLE test ASR"}
DIVERGED_LABEL = " DIVERGED"


def row_label(row: dict) -> str:
    """The first cell of a row in results.md: acc_drop_4%, operating point, defender (held-out), ORACLE test ASR
    (the oracle's point looked at test data), with DIVERGED where the row's learning collapsed."""
    point = row.get("point")
    name = ROW_LABELS.get(point) or f"acc_drop_{row['drop']:g}%"
    return name + (DIVERGED_LABEL if row.get("diverged") is True else "")


def threshold_params(summary: list[dict]) -> dict[str, str]:
    """Where each threshold was reached, as run params: `drop_10.channels_pruned` = 50 or `not reached`
    (the defender's and the oracle's points: defense/pipeline/select.py::point_params)."""
    params = {}
    for row in summary:
        if row.get("point") in ("defender", "oracle_test_asr"):
            continue
        name = "operating_point" if row.get("point") == "operating_point" else f"drop_{row['drop']:g}"
        params[f"{name}.channels_pruned"] = str(int(row["channels_pruned"])) if row.get("reached") else "not reached"
    return params


def selected_row(summary: list[dict]) -> dict | None:
    """The row a run reports as its result: the defender's point where there is one, else the largest
    accuracy drop that the sweep reached (None when no row was reached)."""
    for row in summary:
        if str(row.get("point")) == "defender" and str(row.get("reached", True)) not in ("False", "false"):
            return row
    reached = [row for row in summary if str(row.get("point", "drop")) == "drop"
               and str(row.get("reached", True)) not in ("False", "false")]
    return max(reached, key=lambda row: float(row["drop"])) if reached else None


def point_label(row: dict) -> str:
    """`drop 10`, `defender`, `operating_point`: how reports name a summary row."""
    point = str(row.get("point", "drop"))
    return f"drop {float(row['drop']):g}" if point == "drop" else point


def headline_metrics(row: dict) -> dict[str, float]:
    """The finite numbers of HEADLINE_COLUMNS in the selected row."""
    import math

    out = {}
    for key in HEADLINE_COLUMNS:
        try:
            value = float(row.get(key, "nan"))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            out[key] = value
    return out
