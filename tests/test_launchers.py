"""Sweeps beyond one process: submitit, a Ray cluster and joblib workers, each into one MLflow parent run.

Every test runs a real multirun as a user would (`python -m defense.run -m ...`): tiny Lab 3 jobs on
the real extracts, 10 % of conv_3 pruned in a random order, one `prune.seed` per job, tracked into a
sqlite store under tmp_path. The store is then read back with MlflowClient: one parent run (tag
defense.parent=true, its id in <sweep dir>/mlflow_parent_run_id.txt), one FINISHED child per job,
every job's seed exactly once, and every child's full curve (fraction_pruned = k/60 at step k: the
Lab 3 network's conv_3 has 60 channels, 10 % of them is 6 steps).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, lab3_overrides, require_csaw, run_cli

CONV3_CHANNELS = 60  # conv_3 of the Lab 3 network (CSAW-HackML Lab 3, models/bd_net.h5): 60 filters
STEPS = 6  # stop.fraction=0.1 of 60 channels


def tiny_sweep(tmp_path: Path, seeds: list[int], *launcher: str, sweep_dir: str | None = None) -> list[str]:
    """`defense.run -m` arguments: one tiny random-pruning job per seed, into tmp_path's store and sweep dir."""
    require_csaw()
    return [
        "-m",
        *launcher,
        *lab3_overrides("stop=fraction", "stop.fraction=0.1", "compact=false", "tracking.log_models=false"),
        "prune.criterion=random",
        "prune.seed=" + ",".join(str(s) for s in seeds),
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.sweep.dir={sweep_dir or tmp_path / 'sweep'}",
    ]


def check_parent_and_children(tmp_path: Path, seeds: list[int], jobs_dir: Path | None = None) -> list:
    """One FINISHED parent run, one FINISHED child per seed with its whole curve; returns the children.

    The parent's marker is in tmp_path/sweep; the job folders too unless `jobs_dir` says otherwise."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("backdoor-prune")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("defense.parent") == "true"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    assert (tmp_path / "sweep" / "mlflow_parent_run_id.txt").read_text().strip() == parent.info.run_id
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert [r.data.tags.get("mlflow.parentRunId") for r in children] == [parent.info.run_id] * len(seeds)
    assert [r.info.status for r in children] == ["FINISHED"] * len(seeds)
    assert sorted(int(r.data.params["prune.seed"]) for r in children) == sorted(seeds)
    for child in children:
        curve = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "curve/fraction_pruned"))
        assert [step for step, _ in curve] == list(range(STEPS + 1)), child.info.run_id
        assert [value for _, value in curve] == pytest.approx([k / CONV3_CHANNELS for k in range(STEPS + 1)])
    # each job folder holds the config of its own seed (Hydra numbers the jobs in sweep order)
    for num, seed in enumerate(seeds):
        assert OmegaConf.load((jobs_dir or tmp_path / "sweep") / str(num) / "config.yaml").prune.seed == seed
    return children


def test_submitit_local_sweep_makes_one_parent_with_a_child_per_job(tmp_path):
    proc = run_cli("defense.run", *tiny_sweep(tmp_path, [0, 1], "hydra/launcher=submitit_local"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_parent_and_children(tmp_path, [0, 1])
    # the jobs ran in submitit's own processes: their logs are in <sweep dir>/.submitit
    logs = list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("results in" in log.read_text() for log in logs), logs


# --- Ray -------------------------------------------------------------------------------------------
# Ray's GCS server and raylet listen on every interface whatever --node-ip-address says, so the test
# cluster lives in private user, network, PID and mount namespaces (util-linux unshare/nsenter): its
# only network interface is that namespace's loopback, 127.0.0.1, and `ray stop` there sees only its
# own processes. The namespace's first process holds it open; when it dies the kernel kills the rest.

_HOLD_NAMESPACE = r"""
import fcntl, signal, socket, struct, sys
# as the namespace's first process it adopts the orphaned Ray daemons: reap them when they exit
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
# bring the namespace's loopback interface up: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0))[:18])[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
print("ready", flush=True)
sys.stdin.read()  # until the test closes the pipe (or dies)
"""
RAY_PORT = 6379  # free by construction: nothing else lives in the fresh network namespace
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


class RayCluster:
    def __init__(self, enter: list[str], address: str, node_dir: Path):
        self.enter, self.address, self.node_dir = enter, address, node_dir

    def run(self, *cmd: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
        """A command inside the cluster's namespaces, from `cwd`, importing this checkout's `defense`."""
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        return subprocess.run([*self.enter, f"--wd={cwd}", *cmd], env=env, capture_output=True, text=True,
                              timeout=timeout)


def _namespace_pids(pid_ns: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "pid") == pid_ns:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A one-node Ray cluster (2 CPUs, 100 MB object store) on 127.0.0.1, stopped whatever happens."""
    holder = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
         sys.executable, "-c", _HOLD_NAMESPACE],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    pid_ns = None
    enter: list[str] = []
    try:
        if holder.stdout.readline().strip() != "ready":
            pytest.fail(
                "could not make the private namespaces for the Ray cluster (unshare --user --net --pid): "
                f"{holder.stderr.read().strip()}; allow unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1, kernel.apparmor_restrict_unprivileged_userns=0)"
            )
        inside = int(Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()[0])
        pid_ns = os.readlink(f"/proc/{inside}/ns/pid")
        enter = ["nsenter", f"--target={inside}", "--user", "--preserve-credentials", "--net", "--pid", "--mount"]
        temp_dir = tmp_path_factory.mktemp("ray")  # short: Ray's unix sockets live below it (107 bytes max)
        # the node's working directory, where its workers start: not the folder the sweep is launched from
        node_dir = tmp_path_factory.mktemp("node")
        cluster = RayCluster(enter, f"127.0.0.1:{RAY_PORT}", node_dir)
        env_without_parent = {k: v for k, v in os.environ.items() if k != "DEFENSE_MLFLOW_PARENT_RUN_ID"}
        started = subprocess.run(
            [*enter, f"--wd={node_dir}", *RAY, "start", "--head", "--node-ip-address=127.0.0.1",
             f"--port={RAY_PORT}", "--num-cpus=2", "--include-dashboard=false", "--object-store-memory=100000000",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env_without_parent, capture_output=True, text=True, timeout=300,
        )
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield cluster
    finally:
        if enter:
            try:
                subprocess.run([*enter, *RAY, "stop", "--force"], cwd=REPO, capture_output=True, timeout=120)
            except subprocess.TimeoutExpired:
                pass
        holder.kill()  # unshare --kill-child: the namespace's first process dies, the kernel kills the others
        holder.wait(timeout=60)
        if pid_ns is not None:
            for pid in _namespace_pids(pid_ns):  # stragglers, if any, by their id
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_ray_cluster_sweep_makes_one_parent_with_a_child_per_job(ray_cluster, tmp_path):
    """conf/hydra/launcher/ray_cluster.yaml joins the running cluster; the jobs find the parent run
    through DEFENSE_MLFLOW_PARENT_RUN_ID in its runtime_env, as on nodes that do not share the sweep
    folder: the sweep dir is relative, so the driver (started in tmp_path) writes the parent's marker
    in tmp_path/sweep while the Ray workers (started in the node's folder) write the job folders in
    <node folder>/sweep, where there is no marker; the raylet's own environment lacks the variable."""
    # one CPU per job: the default (4) exceeds this 2-CPU node, and Ray would wait for a bigger one forever
    proc = ray_cluster.run(
        sys.executable, "-m", "defense.run",
        *tiny_sweep(tmp_path, [0, 1], "hydra/launcher=ray_cluster",
                    f"hydra.launcher.ray.init.address={ray_cluster.address}", "hydra.launcher.ray.remote.num_cpus=1",
                    sweep_dir="sweep"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Connected to Ray cluster" in proc.stderr  # joined the test cluster, did not start a private Ray
    jobs_dir = ray_cluster.node_dir / "sweep"
    assert not (jobs_dir / "mlflow_parent_run_id.txt").exists() and not (tmp_path / "sweep" / "0").exists()
    check_parent_and_children(tmp_path, [0, 1], jobs_dir=jobs_dir)


def test_joblib_workers_share_one_sqlite_store(tmp_path):
    """8 jobs in 4 worker processes write into one sqlite file at the same time: none is lost."""
    seeds = list(range(8))
    proc = run_cli("defense.run", *tiny_sweep(tmp_path, seeds, "hydra/launcher=joblib", "hydra.launcher.n_jobs=4"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    children = check_parent_and_children(tmp_path, seeds)
    # the writers really overlapped: some job started before another one ended
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    outputs = [proc.stdout, proc.stderr] + [p.read_text() for p in (tmp_path / "sweep").glob("*/run.log")]
    assert len(outputs) == 2 + len(seeds)
    assert not [text for text in outputs if "database is locked" in text]


def test_a_failed_sweep_job_leaves_the_others_running(tmp_path):
    """One job of a joblib sweep ends with a user error: the other job still runs to its end, the
    error is printed once, the sweep exits 2 and its MLflow parent ends FAILED."""
    from mlflow import MlflowClient

    args = tiny_sweep(tmp_path, [0], "hydra/launcher=joblib", "hydra.launcher.n_jobs=2") + ["prune.layer=no_such_layer,conv_3"]
    proc = run_cli("defense.run", *args)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "no_such_layer" in errors[0] and "a job of the sweep failed" in errors[1], errors
    assert not (tmp_path / "sweep" / "0" / "summary.csv").exists()
    assert "no_such_layer" in (tmp_path / "sweep" / "0" / "run.log").read_text()
    assert len(read_csv_rows(tmp_path / "sweep" / "1" / "summary.csv")) > 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("backdoor-prune").experiment_id])
    parent = [r for r in runs if r.data.tags.get("defense.parent") == "true"]
    children = [r for r in runs if r.data.tags.get("defense.parent") != "true"]
    assert [r.info.status for r in parent] == ["FAILED"]
    assert [r.info.status for r in children] == ["FINISHED"]  # the failed job stopped before its run began


def read_csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
