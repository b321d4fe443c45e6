"""The layers of defense/ (setup.cfg's [importlinter] contracts, docs/architecture.md): lint-imports passes,
an import made the wrong way fails it, and the package's import graph has no cycle."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_imports(cwd: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    """`lint-imports` (the console script beside this Python), run in `cwd` with `cwd` first on the path."""
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [sys.executable, "-c",
                                                     "import sys; from importlinter.cli import lint_imports_command; "
                                                     "sys.exit(lint_imports_command())"]
    if config is not None:
        command += ["--config", str(config)]
    env = {"PYTHONPATH": str(cwd), "PATH": str(Path(sys.executable).parent), "HOME": str(cwd)}
    return subprocess.run(command + ["--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_pass():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_import_made_the_wrong_way_fails(tmp_path):
    """A copy of the package with `import defense.run` planted in the base layer: lint-imports names it."""
    shutil.copytree(REPO / "defense", tmp_path / "defense", ignore=shutil.ignore_patterns("__pycache__"))
    errors = tmp_path / "defense" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _wrong_way():\n    import defense.run  # noqa: F401\n")
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    kept = configparser.ConfigParser()
    for section in config.sections():
        if section.startswith("importlinter"):
            kept[section] = dict(config[section])
    with open(tmp_path / "setup.cfg", "w") as f:
        kept.write(f)
    done = lint_imports(tmp_path, tmp_path / "setup.cfg")
    assert done.returncode != 0, done.stdout
    assert "defense.core is not allowed to import defense.run" in done.stdout, done.stdout
    assert "defense.core.errors -> defense.run" in done.stdout, done.stdout


def test_no_import_cycle_in_the_package():
    """No cycle among the modules of any package of defense/ (imports inside functions count)."""
    import grimp

    graph = grimp.build_graph("defense", cache_dir=None)
    packages = sorted({m for m in graph.modules if graph.find_children(m)})
    cycles = []
    for package in packages:
        children = sorted(graph.find_children(package))
        for i, a in enumerate(children):
            for b in children[i + 1:]:
                down = graph.chain_exists(importer=a, imported=b, as_packages=True)
                up = graph.chain_exists(importer=b, imported=a, as_packages=True)
                if down and up:
                    cycles.append(f"{a} <-> {b}")
    assert not cycles, "import cycles: " + ", ".join(cycles)


def test_paths_that_modules_derive_from_their_own_file_still_point_at_the_checkout():
    """Moving a module into a layer package moves its __file__: the store, the command line and conf/ must not."""
    from defense.core.provenance import command_line
    from defense.reporting.terminal import CONF
    from defense.tracking.tracker import default_uri

    assert default_uri() == f"sqlite:///{REPO / 'mlflow.db'}"
    assert command_line([str(REPO / "defense" / "run.py"), "-m", "prune.criterion=l1"]) == \
        "python -m defense.run -m prune.criterion=l1"
    assert CONF == REPO / "conf"
