"""What a command says on the terminal: a quiet start, every error once as one line, and a closing footer.

- `quiet(verbose)`: TensorFlow's and absl's start-up lines (written by C++ to the process's stderr
  while TensorFlow loads, before any Python setting can reach them), MLflow's INFO lines, its
  "Add type hints" warnings and its "Downloading artifacts" bars are silenced unless `verbose=true`.
- `one_line_errors(main)`: Hydra's own errors (an unknown key, an unknown option of a config group, a
  value of the wrong type, a syntax error) become one `error:` line and exit 2, naming the closest
  real key or the public options (never the internal `base_*` schemas) instead of Hydra's multi-line
  report, which suggests `+key=value` for a misspelled key.
- `footer(...)`: where the results are, the MLflow run's address, and a verdict read from the numbers.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import os
import re
import sys
from pathlib import Path

from defense.core.errors import SweepJobFailed

CONF = Path(__file__).resolve().parents[2] / "conf"
MLFLOW_UI = "http://127.0.0.1:5000"


# ------------------------------------------------------------------------------------------ start-up


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 goes to /dev/null inside: what C++ libraries print while they load is dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet(verbose: bool = False, tensorflow: bool = True) -> None:
    """Silence the libraries' start-up and bookkeeping output (nothing is changed when `verbose`).

    With `tensorflow`, TensorFlow and Keras are imported here with stderr silenced: the oneDNN and
    CUDA notices that TensorFlow's C++ start-up prints cannot be turned off by TF_CPP_MIN_LOG_LEVEL in
    TensorFlow 2.21. A Python error in that import is raised as usual, after stderr is back."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if tensorflow and "tensorflow" not in sys.modules:
        with _stderr_silenced():
            import keras  # noqa: F401
            import tensorflow as tf

        tf.get_logger().setLevel(logging.ERROR)  # retracing warnings


# -------------------------------------------------------------------------------------- Hydra errors


def public_options(group: str) -> list[str]:
    """The options of a config group a user picks from: its yaml files, without the internal base_* schemas."""
    folder = CONF / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("base_"))


def _schema_fields(schema: str) -> list[str]:
    """The keys of the structured config named `schema` (defense/config.py), [] if it is not one of ours."""
    import dataclasses

    from defense import config

    cls = getattr(config, schema, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        return []
    return [f.name for f in dataclasses.fields(cls)]


def _chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return chain


# Hydra launcher plugins by the config name each registers (hydra/launcher=<name>), and the extra of setup.cfg that
# installs it: a missing plugin's launcher is not an option until then
LAUNCHER_EXTRAS = {"joblib": "joblib", "submitit_slurm": "slurm", "submitit_local": "slurm", "ray": "ray",
                   "ray_aws": "ray"}


def config_error_line(err: BaseException) -> str:
    """One line for one of Hydra's or OmegaConf's composition errors: what is wrong and what to write."""
    text = "\n".join(str(e) for e in _chain(err))
    missing = re.search(r"Could not find '([\w/]+)/([^'/]+)'", text)
    if missing:
        group, name = missing.groups()
        if group == "hydra/launcher" and name in LAUNCHER_EXTRAS:
            return (f"hydra/launcher={name} needs its Hydra plugin, which is not installed: "
                    f"pip install -e '.[{LAUNCHER_EXTRAS[name]}]' (docs/guide.md: running the jobs of a sweep in parallel)")
        options = public_options(group)
        if options:
            close = difflib.get_close_matches(name, options, n=1)
            hint = f"did you mean {group.replace('/', '.')}={close[0]}? " if close else ""
            return (f"{group.replace('/', '.')}={name} is not an option; {hint}choose one of {', '.join(options)} "
                    f"(conf/{group}/)")
    unknown = re.search(r"Key '([^']+)' not in '(\w+)'", text)
    if unknown:
        key, schema = unknown.groups()
        full = re.search(r"full_key: ([\w.\[\]]+)", text) or re.search(r"Could not override '([^']+)'", text)
        full_key = full.group(1) if full else key
        parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
        fields = _schema_fields(schema)
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        if close:
            right = f"{parent}.{close[0]}" if parent else close[0]
            return f"{full_key} is not a config key; did you mean {right}? (python -m defense.run --help lists the keys)"
        where = f" of {parent}" if parent else ""
        listed = f": the keys{where} are {', '.join(fields)}" if fields else ""
        return f"{full_key} is not a config key{listed}"
    merging = re.search(r"Error merging override (\S+)", text)
    if merging:
        reason = next((line.strip() for e in _chain(err)[1:] for line in str(e).splitlines()[:1] if line.strip()), "")
        return f"could not set {merging.group(1)}: {reason}" if reason else f"could not set {merging.group(1)}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    if type(err).__name__ == "OverrideParseException":
        override = _unreadable_override(sys.argv[1:])
        return (f"could not read the override {override!r}: {first} (quote lists and strings for the shell, "
                f"e.g. 'prune.drops=[2,4]')")
    return re.sub(r"\s*To append to your config use \+\S+", "", first)


def _unreadable_override(args: list[str]) -> str:
    """The first command-line override that Hydra's grammar cannot read ('' if none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-"):
            continue
        try:
            parser.parse_overrides([arg])
        except Exception:  # noqa: BLE001 - any refusal of the grammar
            return arg
    return ""


def _is_config_error(err: BaseException) -> bool:
    module = type(err).__module__
    return module.startswith("hydra") or module.startswith("omegaconf")


def in_hydra_sweep() -> bool:
    """Whether the Hydra task function runs as a job of a sweep (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def one_line_errors(main):
    """Decorate a command's `main` (outside `hydra.main`): Hydra's errors become one `error:` line, exit 2.

    Hydra prints its errors itself and exits 1 unless HYDRA_FULL_ERROR is set; set, they reach this
    wrapper. Any other exception propagates with its traceback (a bug to report, not a user error)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        try:
            return main(*args, **kwargs)
        except SweepJobFailed:  # its error: line is printed; the sweep's other jobs ran to their end
            print("error: a job of the sweep failed (its error: line is above, and in its run.log); the other "
                  "jobs ran and kept their results", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as err:  # noqa: BLE001 - only Hydra's and OmegaConf's are turned into one line
            if not _is_config_error(err):
                raise
            print(f"error: {config_error_line(err)}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


# ---------------------------------------------------------------------------------------------- footer


def _number(row: dict, key: str) -> float:
    try:
        value = float(row.get(key, "nan"))
    except (TypeError, ValueError):
        return float("nan")
    return value


def verdict(summary: list[dict], base_acc: float, base_asr: float) -> str:
    """One sentence from the test scores: the selected point's (report.selected_row: the defender's
    point, else the largest accuracy drop reached), or that no kept network removed the backdoor."""
    from defense.reporting.report import point_label, selected_row

    if math.isnan(base_asr):
        return "no poisoned test data: the attack success rate was not measured"
    kept = [row for row in summary if str(row.get("reached", True)) not in ("False", "false")]
    scores = [(_number(row, asr), _number(row, acc), what) for row in kept
              for acc, asr, what in (("test_acc", "test_asr", "G(B, B')"), ("ft_test_acc", "ft_test_asr", "B''"))
              if not math.isnan(_number(row, asr))]
    selected = selected_row(summary)
    if not scores or selected is None:
        return f"no network was kept (B: test ASR {base_asr:.1f}%)"
    if all(asr > 0.5 * base_asr for asr, _, _ in scores):
        lowest = min(asr for asr, _, _ in scores)
        hint = "" if any(what == "B''" for _, _, what in scores) else ": try defense=fine_pruning"
        return f"backdoor still active at every point (lowest test ASR {lowest:.1f}%, B {base_asr:.1f}%){hint}"
    fine_tuned = not math.isnan(_number(selected, "ft_test_asr"))
    acc_key, asr_key, what = ("ft_test_acc", "ft_test_asr", "B''") if fine_tuned else ("test_acc", "test_asr", "G(B, B')")
    return (f"at {point_label(selected)}: test ASR {_number(selected, asr_key):.1f}% (B {base_asr:.1f}%) for {what}, "
            f"{base_acc - _number(selected, acc_key):.1f} points of clean test accuracy lost")


def run_url(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str:
    """The MLflow UI address of a run, as `mlflow ui --backend-store-uri <uri>` serves it."""
    if not run_id:
        return ""
    return f"{MLFLOW_UI}/#/experiments/{experiment_id}/runs/{run_id}"


def footer(out_dir: Path, summary: list[dict], base: dict, seconds: float, tracking_uri: str | None = None,
           experiment_id: str | None = None, run_id: str | None = None, runs_url: str | None = None) -> str:
    """The run's last lines: its files, its MLflow run (and `runs_url`, the experiment's runs table), and
    the verdict."""
    out_dir = Path(out_dir)
    lines = [f"done in {seconds:.1f} s: results in {out_dir}",
             f"  plot   {out_dir / 'prune_result.png'}",
             f"  table  {out_dir / 'results.md'} (every column: {out_dir / 'summary.csv'})"]
    if run_id and tracking_uri:
        lines.append(f"  MLflow mlflow ui --backend-store-uri {tracking_uri}   then open "
                     f"{run_url(tracking_uri, experiment_id, run_id)}")
        if runs_url:
            lines.append(f"         every run of the experiment, results first: {runs_url}")
    lines.append("verdict: " + verdict(summary, _number(base, "pruned_test_acc"), _number(base, "pruned_test_asr")))
    return "\n".join(lines)
