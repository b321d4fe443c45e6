"""`python -m defense.compare`: one table and one plot over the runs of a sweep, read from MLflow.

    python -m defense.compare                                  # the newest sweep of tracking.experiment
    python -m defense.compare compare.layout=leaderboard       # attacks x defenses (defense/analysis/leaderboard.py)
    python -m defense.compare compare.parent=<parent run id>   # the jobs of that sweep
    python -m defense.compare compare.experiment=backdoor-prune  # every single run of an experiment
    python -m defense.compare tracking.uri=http://mlflow.example.org:5000

Writes to its run folder (Hydra's output dir):
- comparison.csv: one row per run: run id, the defense (`defense_name`: the conf/defense preset, e.g. none,
  fine_tuning, random_pruning, fp, fine_pruning, or for a custom defense its criterion, "+ft" when
  fine-tuned), network, criterion, layer, finetune, data set, the unpruned
  B's clean test accuracy and ASR, and per accuracy-drop threshold D the channels pruned
  (`drop{D}_channels_pruned`), test accuracy, ASR and DER of the defended network
  (`drop{D}_test_acc`, `drop{D}_test_asr`, `drop{D}_der`); blank where a threshold was not reached;
  and, where a run's criterion has its own operating point (summary.csv rows with `point` =
  `operating_point`), the same four columns for it (`op_channels_pruned`, `op_test_acc`, `op_test_asr`,
  `op_der`; blank for runs without one);
- comparison.md: the same table in Markdown;
- comparison.png: the clean accuracy and attack success rate curves of every run, overlaid.
When it compares a sweep the three files are also logged to the sweep's parent run under comparison/.
With compare.layout=leaderboard it writes leaderboard.{csv,md,png} and leaderboard_runs.csv instead
(logged under leaderboard/): rows attacks, columns defenses (defense/analysis/leaderboard.py).

The defended network is G(B, B') (the summary's test_acc / test_asr, DER computed against the unpruned
B of curve step 0), or the fine-pruned B'' where the run's summary.csv has fine-tuning columns
(ft_test_acc / ft_test_asr and its ft_der); the `defended` column says which.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

import defense.pipeline.schemas  # noqa: F401  (registers the schema that conf/compare.yaml names)
from defense.analysis.runs import OWN_POINT, POINT_COLUMN, defended_scores, is_own_point  # noqa: F401
from defense.analysis.runs import as_float as _float, finite as _finite  # noqa: F401
from defense.core.errors import DefenseError, exit_on_user_error
from defense.reporting import terminal

log = logging.getLogger("defense.compare")

PARENT_TAG = "defense.parent"
CURVE_KEYS = ("valid_acc", "valid_asr", "test_acc", "test_asr", "pruned_test_acc", "pruned_test_asr", "fraction_pruned")
X_AXES = ("fraction_pruned", "channels_pruned")
FILES = ("comparison.csv", "comparison.md", "comparison.png")
LAYOUTS = ("runs", "leaderboard")
NAN = float("nan")
OP_TEXT = " and at the criterion's own operating point (op)"


def open_client(uri: str):
    """The MLflow client of `uri`; a sqlite store that does not exist is refused (not created empty)."""
    from defense.tracking import tracker as tracking

    uri = tracking.resolve_uri(uri)
    path = tracking.sqlite_path(uri)
    if path is not None:
        if not path.is_file():
            raise DefenseError(
                f"no MLflow store at {path} (tracking.uri={uri}): nothing to compare; run a sweep first "
                f"(python -m defense.run -m ...) or give the tracking.uri it logged to"
            )
    return tracking._client(uri), uri


def _search(client, experiment_ids: list[str], filter_string: str = "", order_by=None, max_results: int | None = None):
    """Every run matching (all pages), or the first `max_results`."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, order_by=order_by or [],
                                  max_results=min(max_results or 1000, 1000), page_token=token)
        runs.extend(page)
        token = page.token
        if not token or (max_results and len(runs) >= max_results):
            return runs[:max_results] if max_results else runs


def _children(client, parent) -> list:
    return _search(client, [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def select_runs(client, uri: str, compare_cfg, experiment_name: str):
    """(runs, parent run or None, one-line description of what is compared)."""
    from mlflow.exceptions import MlflowException

    parent_id = compare_cfg.get("parent")
    experiment = compare_cfg.get("experiment")
    if parent_id and experiment:
        raise DefenseError("give compare.parent=RUN_ID or compare.experiment=NAME, not both")
    try:
        if parent_id:
            try:
                parent = client.get_run(str(parent_id))
            except MlflowException:
                raise DefenseError(f"compare.parent={parent_id}: no such run at {uri}") from None
            runs = _children(client, parent)
            if not runs:
                raise DefenseError(f"compare.parent={parent_id} has no child runs at {uri}: nothing to compare")
            return runs, parent, f"sweep {parent.info.run_id} ({parent.data.tags.get('sweep_dir', '?')})"
        name = str(experiment or experiment_name)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise DefenseError(
                f"no MLflow experiment {name!r} at {uri}: nothing to compare (experiments there: {known or 'none'})"
            )
        if experiment:
            runs = [r for r in _search(client, [exp.experiment_id]) if r.data.tags.get(PARENT_TAG) != "true"]
            if not runs:
                raise DefenseError(f"MLflow experiment {name!r} at {uri} has no runs: nothing to compare")
            return runs, None, f"experiment {name!r}"
        parents = _search(client, [exp.experiment_id], f"tags.`{PARENT_TAG}` = 'true'",
                          order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise DefenseError(
                f"no sweep (parent run) in MLflow experiment {name!r} at {uri}: nothing to compare; run one "
                f"(python -m defense.run -m ...) or compare single runs with compare.experiment={name}"
            )
        parent = parents[0]
        runs = _children(client, parent)
        if not runs:
            raise DefenseError(
                f"the newest sweep of experiment {name!r} (parent run {parent.info.run_id}) has no child runs "
                f"at {uri}: nothing to compare"
            )
        return runs, parent, f"sweep {parent.info.run_id} ({parent.data.tags.get('sweep_dir', '?')})"
    except MlflowException as err:
        raise DefenseError(f"cannot read the MLflow store at {uri}: {str(err).splitlines()[0]}") from None


def _history(client, run_id: str) -> dict[str, dict[int, float]]:
    """Curve metrics of a run: key -> {step (channels pruned): value}."""
    curves = {}
    for key in CURVE_KEYS:
        # under curve/ since the run's own metrics became the selected point's; bare in older runs
        points = client.get_metric_history(run_id, f"curve/{key}") or client.get_metric_history(run_id, key)
        if points:
            curves[key] = {int(m.step): float(m.value) for m in sorted(points, key=lambda m: (m.step, m.timestamp))}
    return curves


def _summary(client, run_id: str, tmp: Path) -> list[dict]:
    from defense.reporting import report

    try:
        path = client.download_artifacts(run_id, "summary.csv", str(tmp / run_id))
    except Exception as err:  # noqa: BLE001 - a run without its summary still gets its row
        log.warning("run %s: no summary.csv artifact (%s); its thresholds stay blank", run_id, str(err).splitlines()[0])
        return []
    return report.read_csv(path)


def describe_run(client, run, tmp: Path) -> dict:
    """One run: its labels, params, tags, summary rows, curves, the unpruned B and the defended network
    at every accuracy-drop threshold."""
    tags, params = run.data.tags, run.data.params
    run_id = run.info.run_id
    curves = _history(client, run_id)
    base_acc = curves.get("pruned_test_acc", curves.get("test_acc", {})).get(0, NAN)
    base_asr = curves.get("pruned_test_asr", curves.get("test_asr", {})).get(0, NAN)
    summary = _summary(client, run_id, tmp)
    if summary and not math.isfinite(base_acc):
        base_acc = _float(summary[0].get("base_test_acc"))
        base_asr = _float(summary[0].get("base_test_asr"))
    thresholds, defended, operating, points = {}, "G(B,B')", None, {}
    for row in summary:
        if str(row.get("point", "")) in PROTOCOL_POINTS:  # the defender's and the oracle's points (select.py)
            scores = defended_scores(row, base_acc, base_asr)
            points[row["point"]] = None if scores is None else {k: scores[k] for k in ("channels_pruned", "test_acc",
                                                                                         "test_asr", "der")}
            continue
        if is_own_point(row):
            scores = defended_scores(row, base_acc, base_asr)
            operating = None if scores is None else {k: scores[k] for k in ("channels_pruned", "test_acc",
                                                                             "test_asr", "der")}
            continue
        drop = _float(row.get("drop"))
        if not math.isfinite(drop) or is_own_point(row):
            continue
        scores = defended_scores(row, base_acc, base_asr)
        if scores is not None and scores["defended"] == "B''":
            defended = "B''"
        thresholds[drop] = None if scores is None else {k: scores[k] for k in ("channels_pruned", "test_acc",
                                                                                  "test_asr", "der")}
    return {
        "run_id": run_id,
        "run_name": run.info.run_name or "",
        "defense_name": run_defense_name(tags, params),
        "network": tags.get("model") or params.get("model.name", ""),
        "criterion": tags.get("criterion") or params.get("prune.criterion", ""),
        "layer": tags.get("layer") or params.get("prune.layer", ""),
        "finetune": tags.get("finetune") or params.get("finetune.kind", "none"),
        "dataset": tags.get("dataset") or params.get("dataset.kind", ""),
        "defended": defended,
        "base_test_acc": base_acc,
        "base_test_asr": base_asr,
        "thresholds": thresholds,
        "operating_point": operating,
        "points": points,
        "curves": curves,
        "start_time": run.info.start_time or 0,
        "summary": summary,
        "params": dict(params),
        "tags": dict(tags),
    }


def run_defense_name(tags: dict, params: dict) -> str:
    """The defense of a run: its tag `defense_name`, else its param `defense_name` (a conf/defense
    preset), else named as defense/config.py::defense_name names a custom defense (criterion, "+ft")."""
    from defense.config import defense_name

    if tags.get("defense_name"):
        return tags["defense_name"]
    given = params.get("defense_name")
    return defense_name({"defense_name": None if given in (None, "", "None") else given,
                         "prune": {"criterion": params.get("prune.criterion", "activation")},
                         "finetune": {"kind": params.get("finetune.kind", "none")}})


PROTOCOL_POINTS = ("defender", "oracle_test_asr")  # summary.csv `point` rows of defense/pipeline/select.py
POINT_HEADS = {"defender": "defender", "oracle_test_asr": "ORACLE"}
POINTS_TEXT = (" defender: the strongest setting whose held-out clean validation accuracy stays within select.max_drop "
               "points of B's; ORACLE: the lowest test ASR within the same budget, an oracle not available to a "
               "defender (BackdoorBench's choice); n/r there: none within the budget, or its learning diverged.")
LEADERBOARD_POINTS = ("operating_point", "defender", "oracle_test_asr")


def drop_key(drop: float) -> str:
    return f"drop{drop:g}"


def table_rows(runs: list[dict]) -> tuple[list[dict], list[float]]:
    """The comparison table: one flat row per run, and the thresholds (its column groups)."""
    drops = sorted({d for r in runs for d in r["thresholds"]})
    rows = []
    for r in runs:
        row = {k: r[k] for k in ("run_id", "run_name", "defense_name", "network", "criterion", "layer", "finetune",
                                 "dataset", "defended", "base_test_acc", "base_test_asr")}
        for drop in drops:
            # "": not reached; None: the run has no such threshold (e.g. defense=none has only drop 0)
            t = r["thresholds"].get(drop)
            for key in ("channels_pruned", "test_acc", "test_asr", "der"):
                row[f"{drop_key(drop)}_{key}"] = None if drop not in r["thresholds"] else "" if t is None else t[key]
        if any(other.get("operating_point") for other in runs):
            op = r.get("operating_point")
            for key in ("channels_pruned", "test_acc", "test_asr", "der"):
                row[f"op_{key}"] = "" if op is None else op[key]
        for point in PROTOCOL_POINTS:  # "": not reached or diverged; None: the run has no such row (older runs)
            if any(point in other.get("points", {}) for other in runs):
                found = r.get("points", {})
                for key in ("channels_pruned", "test_acc", "test_asr", "der"):
                    row[f"{point}_{key}"] = None if point not in found else "" if found[point] is None \
                        else found[point][key]
        rows.append(row)
    return rows, drops


def markdown(rows: list[dict], drops: list[float], title: str) -> str:
    def cell(value, digits=2):
        if value is None:
            return ""
        if value == "":
            return "n/r"
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.{digits}f}"
        return str(value)

    head = ["run", "defense", "network", "criterion", "layer", "finetune", "B acc", "B ASR"]
    for drop in drops:
        head += [f"-{drop:g}pt ch", f"-{drop:g}pt acc", f"-{drop:g}pt ASR", f"-{drop:g}pt DER"]
    with_op = any("op_der" in row for row in rows)
    if with_op:
        head += ["op ch", "op acc", "op ASR", "op DER"]
    points = [p for p in PROTOCOL_POINTS if any(f"{p}_der" in row for row in rows)]
    for point in points:
        short = POINT_HEADS[point]
        head += [f"{short} ch", f"{short} acc", f"{short} ASR", f"{short} DER"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        cells = [row["run_id"][:8], row["defense_name"], row["network"], row["criterion"], row["layer"], row["finetune"],
                 cell(row["base_test_acc"]), cell(row["base_test_asr"])]
        for drop in drops:
            k = drop_key(drop)
            cells += [cell(row[f"{k}_channels_pruned"]), cell(row[f"{k}_test_acc"]), cell(row[f"{k}_test_asr"]),
                      cell(row[f"{k}_der"], 3)]
        if with_op:
            cells += [cell(row["op_channels_pruned"]), cell(row["op_test_acc"]), cell(row["op_test_asr"]),
                      cell(row["op_der"], 3)]
        for point in points:
            cells += [cell(row[f"{point}_channels_pruned"]), cell(row[f"{point}_test_acc"]),
                      cell(row[f"{point}_test_asr"]), cell(row[f"{point}_der"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    defended = sorted({row["defended"] for row in rows})
    lines += ["", f"acc / ASR / DER: clean test accuracy, attack success rate (%) and DER of the defended network "
                  f"({', '.join(defended)}) at each accuracy-drop threshold (drop 0: no channel pruned)"
                  f"{OP_TEXT if with_op else ''}; ch: channels pruned; n/r: not reached (op: the criterion has "
                  f"none); blank: not a threshold of that run; B: the unpruned network (its DER would be 0.5)."
              + (POINTS_TEXT if points else "")]
    return "\n".join(lines)


def run_labels(runs: list[dict]) -> list[str]:
    """Legend labels: network / defense, plus layer and dataset where the runs differ in them."""
    varied = [k for k in ("layer", "dataset") if len({r[k] for r in runs}) > 1]
    labels = [" / ".join([r["network"], r["defense_name"], *(f"{k} {r[k]}" for k in varied)]) for r in runs]
    return [f"{lab} ({r['run_id'][:6]})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]


def plot_overlay(runs: list[dict], path: Path, title: str, x_axis: str = "fraction_pruned") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax_acc, ax_asr) = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110, sharex=True)
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    for i, (r, label) in enumerate(zip(runs, run_labels(runs))):
        color = colors[i % len(colors)]
        curves = r["curves"]
        steps = sorted(curves.get("test_acc", {}))
        if not steps:
            continue
        fraction = curves.get("fraction_pruned", {})
        if x_axis == "fraction_pruned" and fraction:
            xs = [100.0 * fraction.get(s, NAN) for s in steps]
        else:
            xs = steps
        for ax, key in ((ax_acc, "acc"), (ax_asr, "asr")):
            test = curves.get(f"test_{key}", {})
            valid = curves.get(f"valid_{key}", {})
            ax.plot(xs, [test.get(s, NAN) for s in steps], color=color, lw=1.8, label=label)
            ax.plot(xs, [valid.get(s, NAN) for s in steps], color=color, lw=1.0, ls=":")
    xlabel = "channels pruned (% of the layer)" if x_axis == "fraction_pruned" else "channels pruned"
    for ax, name in ((ax_acc, "clean accuracy (%)"), (ax_asr, "attack success rate (%)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(name)
        ax.set_ylim(-2, 105)
        ax.grid(alpha=0.3)
        ax.set_title(name)
    if x_axis == "fraction_pruned":
        ax_acc.set_xlim(0, 100)
    ax_acc.legend(loc="lower left", fontsize=8, framealpha=0.9)
    ax_asr.legend([Line2D([], [], color="black", lw=1.8), Line2D([], [], color="black", lw=1.0, ls=":")],
                  ["G(B, B') on test data", "B' on validation data"], loc="lower left", fontsize=8, framealpha=0.9)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def check_layout(cfg) -> str:
    """`compare.layout` (runs | leaderboard) and, for the leaderboard, `leaderboard.drop` >= 0."""
    compare_cfg = cfg.get("compare") or {}
    layout = str(compare_cfg.get("layout") or "runs")
    if layout not in LAYOUTS:
        raise DefenseError(f"compare.layout={layout!r} is not known; use compare.layout=runs (one row per run) "
                           f"or compare.layout=leaderboard (attacks x defenses)")
    if layout == "leaderboard":
        point = (cfg.get("leaderboard") or {}).get("point", "operating_point")
        if point not in LEADERBOARD_POINTS:
            raise DefenseError(f"leaderboard.point={point!r} is not known; use one of {', '.join(LEADERBOARD_POINTS)}, "
                               "e.g. leaderboard.point=defender")
        drop = (cfg.get("leaderboard") or {}).get("drop", 4.0)
        if drop is None or isinstance(drop, bool) or not isinstance(drop, (int, float)) \
                or not math.isfinite(float(drop)) or drop < 0:
            raise DefenseError(f"leaderboard.drop={drop!r} must be an accuracy drop in points >= 0, "
                               f"e.g. leaderboard.drop=4")
    return layout


def log_to_parent(client, parent, paths: list[Path], folder: str) -> None:
    """Log `paths` to the sweep's parent run under `folder`/ (a warning if the store refuses)."""
    if parent is None:
        return
    try:
        for path in paths:
            client.log_artifact(parent.info.run_id, str(path), folder)
        log.info("logged to the parent run %s under %s/", parent.info.run_id, folder)
    except Exception as err:  # noqa: BLE001 - the files are written; the store refused the copy
        log.warning("could not log the %s to the parent run %s: %s", folder, parent.info.run_id, err)


def compare(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Compare the runs `cfg.compare` selects; writes comparison.{csv,md,png} into `out_dir`, or with
    compare.layout=leaderboard leaderboard.{csv,md,png} and leaderboard_runs.csv (defense/analysis/leaderboard.py)."""
    import os

    from defense.reporting import report

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    compare_cfg = cfg.get("compare") or {}
    layout = check_layout(cfg)
    x_axis = str(compare_cfg.get("x") or "fraction_pruned")
    if x_axis not in X_AXES:
        raise DefenseError(f"compare.x={x_axis!r} is not known; use one of {list(X_AXES)}")
    client, uri = open_client(cfg.tracking.get("uri"))
    selected, parent, what = select_runs(client, uri, compare_cfg, cfg.tracking.experiment)
    finished = [r for r in selected if r.info.status == "FINISHED"]
    for r in selected:
        if r.info.status != "FINISHED":
            log.warning("run %s is %s: left out of the comparison", r.info.run_id, r.info.status)
    if not finished:
        raise DefenseError(f"none of the {len(selected)} runs of {what} at {uri} finished: nothing to compare")
    finished.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [describe_run(client, r, Path(tmp)) for r in finished]
    if layout == "leaderboard":
        from defense.analysis import leaderboard

        board = leaderboard.write_leaderboard(runs, out_dir, float(cfg.leaderboard.drop), what, uri, parent,
                                              str(cfg.leaderboard.get("point", "operating_point")))
        log_to_parent(client, parent, [out_dir / name for name in leaderboard.FILES], "leaderboard")
        return {**board, "parent": parent.info.run_id if parent is not None else None, "out_dir": out_dir, "uri": uri}
    rows, drops = table_rows(runs)
    n_runs = f"{len(rows)} run{'' if len(rows) == 1 else 's'}"
    title = f"Comparison of {n_runs} of {what} at {uri}"
    report.write_csv(out_dir / "comparison.csv", rows)
    table = markdown(rows, drops, title)
    (out_dir / "comparison.md").write_text(table + "\n")
    plot_overlay(runs, out_dir / "comparison.png", f"{n_runs} of {what}", x_axis)
    log.info("%s", table)
    log_to_parent(client, parent, [out_dir / name for name in FILES], "comparison")
    log.info("comparison of %s in %s", n_runs, out_dir)
    return {"rows": rows, "drops": drops, "parent": parent.info.run_id if parent is not None else None,
            "out_dir": out_dir, "uri": uri}


@terminal.one_line_errors
@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
@exit_on_user_error(in_sweep=terminal.in_hydra_sweep)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    terminal.quiet(bool(cfg.get("verbose", False)), tensorflow=False)

    compare(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
