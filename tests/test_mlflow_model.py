"""G(B, B') as an MLflow model: logged per threshold, loadable without this project, registered with
the alias `champion`, served by `mlflow models serve`; on the real CSAW-HackML faces, every answer is
compared with what `python -m defense.predict` prints for the same B and B' files."""

from __future__ import annotations

import math

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import LAB3_WEIGHTS, compose, lab3_overrides, run_cli

REGISTERED = "lab3-repaired"
FACES_PER_SET = 12  # test-half faces of each file (clean, sunglasses), written as PNG for defense.predict


def _faces(csaw_dir: Path, name: str) -> np.ndarray:
    """Test-half faces (the last 50 of a file), the first FACES_PER_SET of them, NHWC float32 raw pixels."""
    with h5py.File(csaw_dir / name, "r") as f:
        x = np.transpose(np.asarray(f["data"][()], np.float32), (0, 2, 3, 1))
    return x[50 : 50 + FACES_PER_SET]


@pytest.fixture(scope="module")
def registered_run(csaw_dir, tmp_path_factory):
    """A Lab 3 run on the extracts that logs G(B, B') per threshold and registers the default choice."""
    from defense.run import run_defense

    out = tmp_path_factory.mktemp("g-model")
    db = out / "mlflow.db"
    cfg = compose(lab3_overrides(f"tracking.uri=sqlite:///{db}", f"tracking.register={REGISTERED}"))
    result = run_defense(cfg, out / "run")
    return result, out, db


@pytest.fixture(scope="module")
def faces(csaw_dir, tmp_path_factory):
    """The clean and sunglasses test faces as arrays and as one folder of PNG files (sorted names)."""
    folder = tmp_path_factory.mktemp("faces")
    x = np.concatenate([_faces(csaw_dir, "clean_test.h5"), _faces(csaw_dir, "sunglasses_test.h5")])
    assert np.all(x == np.round(x))  # integral pixels: the PNG round trip is exact
    names = []
    for i, image in enumerate(x):
        name = f"{i:03d}_{'clean' if i < FACES_PER_SET else 'sunglasses'}.png"
        Image.fromarray(image.astype(np.uint8)).save(folder / name)
        names.append(name)
    return x, names, folder


def _predict_cli(faces, repaired: str, tmp: Path) -> list[int]:
    """What `python -m defense.predict` prints for B = the Lab 3 weights and B' = `repaired`."""
    x, names, folder = faces
    proc = run_cli("defense.predict", "model=lab3", f"model.path={LAB3_WEIGHTS}", f"repaired.path={repaired}",
                   f"image={folder}", f"hydra.run.dir={tmp / 'predict'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert [name for name, _ in printed] == names
    return [int(label) for _, label in printed]


@pytest.fixture(scope="module")
def champion_expected(registered_run, faces, tmp_path_factory):
    """defense.predict's classes for the registered threshold's B' (the compact file the model holds)."""
    result, out, _ = registered_run
    assert result["registered"]["point"] == "defender"
    repaired = out / "run" / "models" / "model_B_defender_compact.h5"
    return _predict_cli(faces, str(repaired), tmp_path_factory.mktemp("expected"))


def test_each_threshold_is_a_logged_pyfunc_and_the_defenders_point_is_champion(registered_run):
    from mlflow import MlflowClient

    result, out, db = registered_run
    summary = result["summary"]
    reached = [row["drop"] for row in summary if row["reached"] and row["point"] == "drop"]
    assert reached == [2, 4, 10, 30]  # the Lab 3 run on the extracts reaches every threshold (docs/results.md table)
    # beside the thresholds: the defender's point and the oracle's (logged for comparison, tagged oracle)
    assert sorted(result["model_uris"]) == sorted([f"g_drop_{d:g}" for d in reached] + ["g_defender",
                                                                                        "g_oracle_test_asr"])
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    logged = {m.model_id for m in run.outputs.model_outputs}
    assert logged == {uri.split("/")[-1] for uri in result["model_uris"].values()}
    for model_id in logged:  # in the run's experiment, ready: the UI's Models column lists them
        model = client.get_logged_model(model_id)
        assert model.experiment_id == run.info.experiment_id and str(model.status) == "READY"
    for name, uri in result["model_uris"].items():
        tags = client.get_logged_model(uri.split("/")[-1]).tags
        assert tags["oracle"] == ("true" if name == "g_oracle_test_asr" else "false")
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    registered = dict(result["registered"])
    assert math.isnan(registered.pop("drop"))
    assert registered == {"name": REGISTERED, "version": version.version, "point": "defender",
                          "source": result["model_uris"]["g_defender"]}
    assert version.tags["drop"] == "defender"
    assert version.run_id == result["run_id"]


def test_pyfunc_predicts_what_defense_predict_prints_without_the_project(registered_run, faces, champion_expected,
                                                                       tmp_path):
    """The registered G(B, B'), loaded by mlflow.pyfunc in a process where this project cannot be imported,
    gives on the real faces exactly the classes `python -m defense.predict` prints for its B and B'."""
    from mlflow import MlflowClient

    result, out, db = registered_run
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    x, names, _ = faces
    np.save(tmp_path / "faces.npy", x)
    uri = result["registered"]["source"]
    stored = client.get_logged_model(uri.split("/")[-1]).artifact_location  # file:// beside the store
    local = str(shutil.copytree(urllib.parse.urlparse(stored).path, tmp_path / "model"))  # a copy, read alone
    mlmodel = (Path(local) / "MLmodel").read_text()
    assert "signature" in mlmodel and "input_example" in mlmodel
    settings = json.loads((Path(local) / "artifacts" / "settings.json").read_text())
    # the registered default is the defender's point (defense/pipeline/select.py), not the largest drop
    assert settings["repaired_file"] == "model_B_defender_compact.h5" and settings["num_classes"] == 1283
    script = (
        "import sys, json, importlib.util, numpy as np\n"
        # this project must not be importable: drop its editable-install finder, as if not installed
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "assert importlib.util.find_spec('defense') is None, 'the project is importable'\n"
        "import mlflow.pyfunc\n"
        f"model = mlflow.pyfunc.load_model({local!r})\n"
        f"labels = model.predict(np.load({str(tmp_path / 'faces.npy')!r}))\n"
        "import defense\n"
        "print(json.dumps({'labels': labels.tolist(), 'defense': defense.__file__,\n"
        "                  'project': sorted(m for m in sys.modules if m.startswith('defense'))}))\n"
    )
    proc = subprocess.run([sys.executable, "-P", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["defense"].startswith(str(Path(local).resolve() / "code")), answer["defense"]
    assert answer["project"] == ["defense", "defense.core", "defense.core.errors", "defense.core.safe_files"]
    assert answer["labels"] == champion_expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_champion_answers_like_defense_predict(registered_run, faces, champion_expected, tmp_path):
    """`mlflow models serve -m models:/<name>@champion` on 127.0.0.1: POST the real faces to /invocations."""
    _, _, db = registered_run
    x, _, _ = faces
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    server = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", f"models:/{REGISTERED}@champion", "--env-manager", "local",
         "-p", str(port), "-h", "127.0.0.1"],
        cwd=tmp_path, env=env, stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /ping in 120 s"
            time.sleep(0.5)
        body = json.dumps({"inputs": x.tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as reply:
            answer = json.loads(reply.read())
        assert answer == {"predictions": champion_expected}
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(timeout=20)


@pytest.mark.parametrize("overrides, message", [
    (["tracking.register_drop=5"], "tracking.register_drop=5: not one of prune.drops ['2', '4', '10', '30']"),
    (["prune.drops=[2,150]", "tracking.register_drop=150"], "tracking.register_drop=150: that threshold was not reached"),
    (["tracking.register=bad/name"], "tracking.register='bad/name': MLflow refuses that model name"),
])
def test_bad_registration_is_one_error_and_the_run_is_still_logged(csaw_dir, tmp_path, overrides, message):
    from mlflow import MlflowClient

    from defense.core.errors import DefenseError
    from defense.run import run_defense

    db = tmp_path / "mlflow.db"
    cfg = compose(lab3_overrides(f"tracking.uri=sqlite:///{db}", f"tracking.register={REGISTERED}",
                                 "tracking.log_models=false", *overrides))
    with pytest.raises(DefenseError) as err:
        run_defense(cfg, tmp_path / "run")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("backdoor-prune").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert (tmp_path / "run" / "summary.csv").is_file()
    assert client.search_registered_models() == []


def test_register_without_mlflow_is_one_line_exit_2(csaw_dir, tmp_path):
    proc = run_cli("defense.run", *lab3_overrides("tracking=none", f"tracking.register={REGISTERED}",
                                                  f"hydra.run.dir={tmp_path / 'run'}"))
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: tracking.register={REGISTERED}: registering needs the MLflow run; use tracking=mlflow "
        "(the run's files are in its output folder)"
    ]
    assert (tmp_path / "run" / "summary.csv").is_file()


def test_chosen_drop_defaults_to_the_defenders_point_and_never_to_the_oracle():
    from defense.tracking.mlflow_model import chosen_drop

    summary = [{"point": "drop", "drop": 4.0, "reached": True}, {"point": "drop", "drop": 10.0, "reached": True},
               {"point": "defender", "drop": float("nan"), "reached": True, "diverged": False},
               {"point": "oracle_test_asr", "drop": float("nan"), "reached": True, "diverged": False}]
    assert math.isnan(chosen_drop(summary, None))  # nan: the defender's point
    assert chosen_drop(summary, 4) == 4.0
    no_defender = [summary[0], summary[1], summary[3]]  # a summary from before the protocol: the largest drop
    assert chosen_drop(no_defender, None) == 10.0
    diverged = summary[:2] + [dict(summary[2], diverged=True), summary[3]]
    assert chosen_drop(diverged, None) == 10.0
