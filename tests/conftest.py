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

import defense.config  # noqa: F401  (registers the config schemas in Hydra's ConfigStore before any compose)

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
