"""Shared test helpers: the real CSAW-HackML extracts and Hydra composition of the project's configs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Scenario builds (the embedded default) go to a cache of this test session, never the user's
# ~/.cache/backdoor-prune: set before any config is composed, inherited by every subprocess.
os.environ["BACKDOOR_PRUNE_CACHE"] = tempfile.mkdtemp(prefix="backdoor-prune-test-cache-")

import defense.pipeline.schemas  # noqa: F401  (registers the config schemas in Hydra's ConfigStore before any compose)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
CSAW = (REPO.parent / "shared" / "data" / "csaw").resolve()
LAB3_WEIGHTS = CSAW / "lab3_bd_weights.h5"


def require_csaw() -> Path:
    """The real extracts: a test that needs them fails (never skips) when they are missing."""
    if not (CSAW / "clean_test.h5").is_file():
        pytest.fail(f"the real CSAW-HackML extracts are missing at {CSAW}: put ../shared/data/csaw beside the clone")
    return CSAW


@pytest.fixture(scope="session")
def csaw_dir() -> Path:
    return require_csaw()


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def lab3_overrides(*extra: str) -> list[str]:
    return [
        "model=lab3",
        f"model.path={LAB3_WEIGHTS}",
        "dataset=csaw_extract",
        f"dataset.root={CSAW}",
        "progress=false",
        *extra,
    ]


def run_cli(module: str, *args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` as a user would; returns the completed process (text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def pytest_sessionfinish(session, exitstatus):
    """Remove this session's scenario cache (built scenarios are ~2 MB each)."""
    import shutil

    shutil.rmtree(os.environ["BACKDOOR_PRUNE_CACHE"], ignore_errors=True)


def _as_keras_2_3(config: dict) -> dict:
    """The model_config as Keras 2.3 wrote it: no InputLayer, `batch_input_shape` on the first layer,
    plain dtype strings, no `module` / `registered_name` / `build_config` entries."""

    def strip(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy":
                return node["config"]["name"]
            return {k: strip(v) for k, v in node.items() if k not in ("module", "registered_name", "build_config")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    layers = config["config"]["layers"]
    input_layer, rest = layers[0], [strip(layer) for layer in layers[1:]]
    assert input_layer["class_name"] == "InputLayer"
    rest[0]["config"] = {"name": rest[0]["config"]["name"], "trainable": True,
                         "batch_input_shape": input_layer["config"]["batch_shape"],
                         **{k: v for k, v in rest[0]["config"].items() if k not in ("name", "trainable")}}
    return {"class_name": "Sequential", "config": {"name": "sequential_1", "layers": rest}}


def as_keras_2_3_file(src, dst):
    """A copy of the Keras 3 legacy .h5 Sequential `src` as Keras 2.3 wrote it (model_config with
    `batch_input_shape` on its first layer, keras_version 2.3.1), the weights unchanged."""
    import json
    import shutil

    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f.attrs["model_config"] = json.dumps(_as_keras_2_3(json.loads(f.attrs["model_config"])))
        f.attrs["keras_version"] = "2.3.1"
        f["model_weights"].attrs["keras_version"] = "2.3.1"
    return dst
