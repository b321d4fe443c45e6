"""The `experiment` presets and launcher configs: every one composes; the criteria preset sweeps."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
CSAW = (REPO.parent / "shared" / "data" / "csaw").resolve()
LAB3_WEIGHTS = CSAW / "lab3_bd_weights.h5"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
CSAW2020 = ["csaw2020_sunglasses", "csaw2020_anonymous_1", "csaw2020_anonymous_2", "csaw2020_multi"]


def compose(overrides: list[str], hydra_config: bool = False, config_name: str = "config"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra_config)


def require_data() -> Path:
    """The real extracts must be there (../shared/data/csaw from the project root): no skipping."""
    assert (CSAW / "clean_test.h5").is_file(), f"the real CSAW-HackML extracts are missing at {CSAW}"
    return CSAW


def sweep_jobs(cfg) -> list[list[str]]:
    """The job overrides a multirun of `cfg` would launch (hydra.sweeper.params, cartesian product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = cfg.hydra.sweeper.params
    params = OmegaConf.to_container(params, resolve=True) if params else {}  # sweep_axis lists -> "a,b"
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [f"{o.get_key_element()}={o.get_value_element_as_str()}"] for o in parsed]
    return [list(job) for job in itertools.product(*axes)] or [[]]


def test_the_presets_exist():
    assert {"lab3", "criteria", "csaw2020"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_and_every_job_of_its_sweep_composes(preset):
    from defense.tracking.tracker import flatten

    cfg = compose([f"experiment={preset}"], hydra_config=True)
    jobs = sweep_jobs(cfg)
    for job in jobs:
        job_cfg = compose([f"experiment={preset}", *job])
        flat = flatten(job_cfg)  # every interpolation resolves
        for override in job:
            key, value = override.split("=", 1)
            key = "model.name" if key == "model" else key
            assert flat.get(key, value) == value, (preset, override, flat.get(key))
        # a criterion module that exists: defense/criteria/<name>.py
        assert (REPO / "defense" / "criteria" / f"{job_cfg.prune.criterion}.py").is_file(), preset


def test_lab3_preset_is_the_seed_run():
    cfg = compose(["experiment=lab3"])
    assert cfg.model.name == "lab3" and cfg.model.path == "models/bd_net.h5"
    assert cfg.dataset.kind == "lab3" and cfg.dataset.root == "data"
    assert cfg.prune.criterion == "activation" and cfg.prune.layer == "conv_3" and cfg.prune.probe == "pool_3"
    assert list(cfg.prune.drops) == [2, 4, 10, 30]
    assert cfg.finetune.kind == "none" and cfg.stop.rule == "all"
    # the user can still point it at the files elsewhere
    moved = compose(["experiment=lab3", "dataset.root=/lab3/data", "model.path=/lab3/models/bd_net.h5"])
    assert moved.dataset.root == "/lab3/data" and moved.model.path == "/lab3/models/bd_net.h5"


def test_criteria_preset_sweeps_the_three_criteria_on_the_chosen_network():
    cfg = compose(["experiment=criteria", "model=lab3"], hydra_config=True)
    assert sweep_jobs(cfg) == [["prune.criterion=activation"], ["prune.criterion=l1"], ["prune.criterion=random"]]
    assert cfg.model.name == "lab3"


def test_csaw2020_preset_points_every_network_at_its_own_weights():
    require_data()
    cfg = compose(["experiment=csaw2020"], hydra_config=True)
    jobs = sweep_jobs(cfg)
    assert [job[0] for job in jobs] == [f"model={m}" for m in CSAW2020]
    paths = set()
    for job in jobs:
        job_cfg = compose(["experiment=csaw2020", *job])
        assert job_cfg.dataset.kind == "csaw_extract"
        path = Path(job_cfg.model.path)
        path = path if path.is_absolute() else REPO / path  # relative to the project root, where it runs
        assert path.is_file(), (job, path)
        paths.add(path.name)
    assert paths == {"sunglasses_bd_weights.h5", "anonymous_1_bd_weights.h5", "anonymous_2_bd_weights.h5",
                     "multi_trigger_multi_target_bd_weights.h5"}
    full = compose(["experiment=csaw2020", "model=csaw2020_multi", "csaw2020.dir=/hackml/models", "csaw2020.suffix=_bd_net.h5"])
    assert full.model.path == "/hackml/models/multi_trigger_multi_target_bd_net.h5"


def test_launcher_configs(monkeypatch):
    cfg = compose(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], hydra_config=True)
    assert cfg.hydra.launcher.n_jobs == 2 and "Joblib" in cfg.hydra.launcher._target_

    slurm = OmegaConf.load(CONF / "hydra" / "launcher" / "slurm.yaml")
    assert list(slurm.defaults) == ["submitit_slurm"] and slurm.timeout_min > 0
    ray = OmegaConf.load(CONF / "hydra" / "launcher" / "ray_cluster.yaml")
    assert list(ray.defaults) == ["ray"]
    monkeypatch.setenv("DEFENSE_MLFLOW_PARENT_RUN_ID", "abc123")
    init = OmegaConf.to_container(ray.ray.init, resolve=True)
    assert init["object_store_memory"] is None  # Ray refuses it when joining a cluster
    assert init["runtime_env"]["env_vars"]["DEFENSE_MLFLOW_PARENT_RUN_ID"] == "abc123"
    # the plugins come with the dev extra (pip install -e .[dev]; or .[slurm] / .[ray]): the project's
    # files compose over the plugins' own configs, with the plugins' launcher classes
    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.timeout_min == slurm.timeout_min
    cfg = compose(["hydra/launcher=ray_cluster"], hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert cfg.hydra.launcher.ray.init.address == "auto" and cfg.hydra.launcher.ray.init.object_store_memory is None
    assert cfg.hydra.launcher.ray.remote.num_cpus == ray.ray.remote.num_cpus


def test_criteria_preset_runs_as_a_multirun(tmp_path):
    """`-m experiment=criteria` launches one job per criterion (no tracking: the sweep itself)."""
    import csv
    import subprocess
    import sys

    require_data()
    proc = subprocess.run(
        [sys.executable, "-m", "defense.run", "-m", "experiment=criteria", "model=lab3", f"model.path={LAB3_WEIGHTS}",
         "dataset=csaw_extract", f"dataset.root={CSAW}", "tracking=none", "stop=max_drop", "progress=false",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    criteria = []
    for job in sorted((tmp_path / "sweep").glob("[0-9]*")):
        assert (job / "summary.csv").is_file(), job
        with (job / "summary.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [float(r["drop"]) for r in rows if r["point"] == "drop"] == [2, 4, 10, 30]
        assert [r["point"] for r in rows[4:]] == ["defender", "oracle_test_asr"]
        criteria.append(OmegaConf.load(job / "config.yaml").prune.criterion)
    assert criteria == ["activation", "l1", "random"]


def test_lab3_preset_runs_on_the_lab3_layout(tmp_path):
    """The preset end to end on the Lab 3 file layout (the real extracts linked in as cl/ and bd/)."""
    import csv

    from defense.run import run_defense

    require_data()
    for name, source in {"cl/valid.h5": "clean_test.h5", "cl/test.h5": "clean_test.h5",
                         "bd/bd_valid.h5": "sunglasses_test.h5", "bd/bd_test.h5": "sunglasses_test.h5"}.items():
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).symlink_to(CSAW / source)
    cfg = compose(["experiment=lab3", f"dataset.root={tmp_path / 'data'}", f"model.path={LAB3_WEIGHTS}",
                   "tracking=none", "progress=false"])
    run_defense(cfg, tmp_path / "run")
    with (tmp_path / "run" / "summary.csv").open() as f:
        every = list(csv.DictReader(f))
    rows = [r for r in every if r["point"] == "drop"]
    assert [float(r["drop"]) for r in rows] == [2, 4, 10, 30] and all(r["reached"] == "True" for r in rows)
    assert [r["point"] for r in every[4:]] == ["defender", "oracle_test_asr"]  # the protocol's rows follow
    assert float(rows[-1]["test_asr"]) < 50.0  # the backdoor breaks by the 30-point drop
