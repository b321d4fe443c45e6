"""What the commands print: one line per error, a real --help, no library start-up noise, a closing footer."""

from __future__ import annotations

import math
import re

import pytest

from conftest import CONF, REPO, lab3_overrides, run_cli

# lines TensorFlow's and absl's C++ start-up writes to stderr when nothing silences them
STARTUP_NOISE = re.compile(r"oneDNN custom operations|cudart_stub|absl::InitializeLog|Could not find cuda drivers")


def _groups() -> dict[str, list[str]]:
    """Each config group of conf/ and its public options (yaml files other than the base_* schemas)."""
    groups = {}
    for folder in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        groups[folder.name] = sorted(f.stem for f in folder.glob("*.yaml") if not f.stem.startswith("base_"))
    return groups


def test_a_misspelled_key_is_one_line_naming_the_right_key(tmp_path):
    proc = run_cli("defense.run", "prune.critrion=l1", f"hydra.run.dir={tmp_path / 'run'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: prune.critrion is not a config key; did you mean prune.criterion? "
        "(python -m defense.run --help lists the keys)"]
    assert "+prune.critrion" not in proc.stderr + proc.stdout  # Hydra's advice would add a key nothing reads
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()


def test_an_unknown_option_lists_the_public_options_only(tmp_path):
    proc = run_cli("defense.run", "model=lab33", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    public = _groups()["model"]
    assert line.startswith("error: model=lab33 is not an option; did you mean model=lab3? choose one of ")
    assert line.endswith(f"choose one of {', '.join(public)} (conf/model/)")
    assert "base_" not in line


def test_a_launcher_whose_plugin_is_missing_names_the_extra_to_install():
    """Hydra's own error for a launcher no installed plugin registers (the text of hydra.errors.MissingConfigException
    as composition raises it) becomes one line naming the pip extra of setup.cfg that installs the plugin."""
    import configparser

    from hydra.errors import MissingConfigException

    from defense.reporting.terminal import LAUNCHER_EXTRAS, config_error_line

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    extras = {name: value for name, value in cfg["options.extras_require"].items()}
    for launcher, extra in (("submitit_slurm", "slurm"), ("ray", "ray"), ("joblib", "joblib")):
        err = MissingConfigException(f"In 'hydra/config': Could not find 'hydra/launcher/{launcher}'\n\n"
                                     "Available options in 'hydra/launcher':\n\tbasic", missing_cfg_file=None)
        line = config_error_line(err)
        assert line.startswith(f"hydra/launcher={launcher} needs its Hydra plugin") and f".[{extra}]" in line, line
        assert LAUNCHER_EXTRAS[launcher] == extra and extra in extras  # the extra exists in setup.cfg
    # the README's and the leaderboard's hydra/launcher=joblib works after the quick start's plain install
    assert "hydra-joblib-launcher" in cfg["options"]["install_requires"]


def test_help_shows_examples_and_every_public_option_and_no_schema():
    proc = run_cli("defense.run", "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "python -m defense.run defense=fine_pruning" in text  # an example command
    assert "base_" not in text
    groups = _groups()
    for group, options in groups.items():
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(group + " ")), None)
        assert line is not None, f"--help does not list the group {group}"
        # the options may continue on the next line of the same entry
        entry = text[text.index(line): text.index(line) + 400]
        for option in options:
            shown = "default" if option == "default" else option
            assert re.search(rf"\b{re.escape(shown)}\b", entry), f"--help does not name {group}={option}"
    assert len(text.splitlines()) < 60


def test_a_missing_file_is_reported_once(tmp_path):
    missing = tmp_path / "nowhere.h5"
    proc = run_cli("defense.run", "model=lab3", f"model.path={missing}", "dataset=csaw_extract",
                   f"dataset.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}",
                   f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert proc.returncode == 2
    everything = proc.stdout + proc.stderr
    assert everything.count(str(missing)) == 1, everything
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")] == [proc.stderr.strip()]
    assert str(missing) in (tmp_path / "run" / "run.log").read_text()  # the log file keeps it too


def test_a_run_prints_no_startup_noise_and_ends_with_the_footer(csaw_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("defense.run", *lab3_overrides(), f"hydra.run.dir={tmp_path / 'run'}", f"tracking.uri={uri}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert not STARTUP_NOISE.search(out), out[:2000]
    assert "Add type hints" not in out and "Downloading artifacts" not in out
    lines = proc.stdout.strip().splitlines()
    footer = lines[-6:]
    assert footer[0].startswith("done in ") and footer[0].endswith(f"results in {tmp_path / 'run'}")
    assert footer[1].strip() == f"plot   {tmp_path / 'run' / 'prune_result.png'}"
    from mlflow import MlflowClient

    (run,) = MlflowClient(tracking_uri=uri).search_runs(["1"])
    assert footer[3].strip().endswith(f"http://127.0.0.1:5000/#/experiments/1/runs/{run.info.run_id}")
    # the runs table on the results view: an experiment tag in the form MLflow's "Share" button writes,
    # whose columns are metrics the run logged
    assert footer[4].strip().endswith("http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=results")
    import json

    view = json.loads(MlflowClient(tracking_uri=uri).get_experiment("1").tags["mlflow.sharedViewState.results"])
    shown = [c.split(".", 1)[1].strip("`") for c in view["selectedColumns"] if c.startswith("metrics.")]
    assert {"test_acc", "test_asr"} <= set(shown) <= set(run.data.metrics) | {"ft_test_acc", "ft_test_asr"}
    # the verdict: the real Lab 3 extracts keep the backdoor until the 30-point drop (test ASR 8 %)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "summary.csv")))
    base = next(csv.DictReader(open(tmp_path / "run" / "curves.csv")))
    defender = [r for r in rows if r["point"] == "defender"]
    selected = defender[0] if defender else max((r for r in rows if r["point"] == "drop"), key=lambda r: float(r["drop"]))
    label = "defender" if defender else f"drop {float(selected['drop']):g}"
    # on the real extracts the 30-point drop's G(B, B') has a test ASR far below B's: not "still active"
    assert min(float(r["test_asr"]) for r in rows) < 0.5 * float(base["pruned_test_asr"])
    assert footer[5] == (f"verdict: at {label}: test ASR {float(selected['test_asr']):.1f}% "
                         f"(B {float(base['pruned_test_asr']):.1f}%) for G(B, B'), "
                         f"{float(base['pruned_test_acc']) - float(selected['test_acc']):.1f} points of clean test "
                         "accuracy lost")

    verbose = run_cli("defense.run", *lab3_overrides("verbose=true", "prune.drops=[2]", "compact=false"),
                      f"hydra.run.dir={tmp_path / 'v'}", "tracking=none")
    assert verbose.returncode == 0 and STARTUP_NOISE.search(verbose.stdout + verbose.stderr)


@pytest.mark.parametrize("rows, expected", [
    # nothing below half of B's ASR: still active, and no fine-tuned network among them
    ([{"point": "drop", "drop": 2, "test_acc": 95.0, "test_asr": 99.0},
      {"point": "drop", "drop": 4, "test_acc": 90.0, "test_asr": 97.5}],
     "backdoor still active at every point (lowest test ASR 97.5%, B 99.9%): try defense=fine_pruning"),
    # the fine-tuned B'' of the 4-point drop is the lowest
    ([{"point": "drop", "drop": 2, "test_acc": 95.0, "test_asr": 99.0, "ft_test_acc": 96.5, "ft_test_asr": 3.0},
      {"point": "drop", "drop": 4, "test_acc": 90.0, "test_asr": 97.5, "ft_test_acc": 97.1, "ft_test_asr": 0.3}],
     "at drop 4: test ASR 0.3% (B 99.9%) for B'', 1.4 points of clean test accuracy lost"),
    # the defender's point is reported where there is one, even when a drop row has a lower test ASR
    ([{"point": "drop", "drop": 30, "test_acc": 60.0, "test_asr": 1.0},
      {"point": "defender", "drop": "nan", "test_acc": 96.0, "test_asr": 12.5}],
     "at defender: test ASR 12.5% (B 99.9%) for G(B, B'), 2.5 points of clean test accuracy lost"),
    # a row not reached is not a result
    ([{"point": "drop", "drop": 30, "test_acc": "nan", "test_asr": "nan", "reached": "False"}],
     "no network was kept (B: test ASR 99.9%)"),
])
def test_the_verdict_reads_the_lowest_test_asr_and_its_cost(rows, expected):
    from defense.reporting.terminal import verdict

    assert verdict(rows, base_acc=98.5, base_asr=99.9) == expected
    assert verdict(rows, base_acc=98.5, base_asr=math.nan).startswith("no poisoned test data")


def test_an_anp_run_logs_its_masks_as_a_table_not_as_metrics(csaw_dir, tmp_path):
    """ANP on every conv layer of the real Lab 3 network has 200 masks: a table artifact, not 200 charts."""
    import json

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("defense.run", *lab3_overrides("prune=anp", "prune.layer=all", "prune.anp.iterations=10",
                                                  "prune.anp.log_every=5", "prune.anp.batch_size=16",
                                                  "prune.eval_steps=5", "prune.drops=[4]", "compact=false",
                                                  "tracking.log_models=false"),
                   f"hydra.run.dir={tmp_path / 'run'}", f"tracking.uri={uri}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(["1"])
    keys = set(run.data.metrics)
    assert len(keys) < 60, sorted(keys)
    assert not [k for k in keys if "/mask/" in k or k.startswith("mask/")]
    assert {"anp/loss", "anp/mask_mean", "test_acc", "test_asr"} <= keys
    table = json.loads(open(client.download_artifacts(run.info.run_id, "anp_history.json", str(tmp_path))).read())
    mask_columns = [c for c in table["columns"] if c.startswith("mask/")]
    assert len(mask_columns) == 20 + 40 + 60 + 80  # conv_1..conv_4 of DeepID
