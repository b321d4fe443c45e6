"""Writing a study's results: `experiments/results/<name>.md` and `<name>.json`, with provenance.

Every study in `experiments/` ends with `write_results(name, body_md, data)`. Both files start with
the same header: the command line that produced them, the date, the machine (CPU cores, device: the
GPU's name or the CPU's model) and the versions of python, tensorflow, keras, numpy and mlflow.
README.md and the pages of docs/ embed the .md files between `<!-- results: <name> -->` and
`<!-- /results -->` markers (`python experiments/embed_results.py`), and `tests/test_readme_numbers.py`
checks them.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
CSAW = (REPO.parent / "shared" / "data" / "csaw").resolve()


def use_this_checkout() -> None:
    """Import `defense` from this checkout, even when an installed copy lives elsewhere."""
    if sys.path[0] != str(REPO):
        sys.path.insert(0, str(REPO))
    os.environ.setdefault("PYTHONPATH", str(REPO))


def compose(overrides: list[str], config_name: str = "config"):
    """The project's config composed as `python -m defense.run <overrides>` would compose it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import defense.pipeline.schemas  # noqa: F401  (the configs' schemas in Hydra's ConfigStore, as the apps register them)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def ranked_as_a_run(overrides: list[str], out: Path) -> dict:
    """What `python -m defense.run <overrides>` has once it has ranked: the composed config, the model and the
    data of the `setup` and `load` stages of defense/pipeline/stages/ (written under `out`), the pruned layers
    (sweep.check_layers), where they are pruned (sweep.bn_pruning: units, zero), the input divisor and the
    criterion's scores on the clean validation images (sweep.rank)."""
    from defense.nets.models import input_divisor
    from defense.pipeline import sweep
    from defense.pipeline.stages import load as load_stage
    from defense.pipeline.stages import setup as setup_stage
    from defense.tracking.tracker import Tracker

    cfg = compose(overrides)
    ready = setup_stage.run(cfg, out)
    model = ready["model"]
    data = load_stage.run(cfg, out, model, ready["model_path"], ready["limits"], Tracker())
    layers = sweep.check_layers(cfg, model)
    units, zero, _ = sweep.bn_pruning(cfg, model, layers)
    divisor = input_divisor(cfg.model)
    return {"cfg": cfg, "model": model, "data": data, "layers": layers, "units": units, "zero": zero,
            "divisor": divisor, "scores": sweep.rank(cfg, model, layers, data["valid"], divisor)}


def lab3_clean_faces(weights, images: int, overrides: list[str] = ()):
    """The config of the Lab 3 network `weights` on the Lab 3 extracts of ../shared/data/csaw (`overrides` added)
    and `images` of their clean validation faces, the extracts' faces repeated to that count (a timing needs
    only their number and size): (cfg, LabeledImages)."""
    import numpy as np

    from defense.data.arrays import LabeledImages
    from defense.pipeline import load as datasets

    cfg = compose(["model=lab3", f"model.path={weights}", "dataset=csaw_extract", f"dataset.root={CSAW}",
                   *overrides])
    clean = datasets.load_split(cfg.dataset, cfg.model, "valid").clean
    index = np.arange(images) % len(clean)
    return cfg, LabeledImages("clean_valid", clean.x[index], clean.y[index])


def versions() -> dict[str, str]:
    """python, tensorflow, keras, numpy and mlflow of this environment (defense/core/provenance.py)."""
    use_this_checkout()
    from defense.core.provenance import versions as package_versions

    return package_versions()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU cores this process may use and the device TensorFlow computes on (GPU name, else CPU)."""
    import tensorflow as tf

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 0
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        gpus.append(details.get("device_name", gpu.name))
    device = "GPU: " + ", ".join(gpus) if gpus else "CPU: " + _cpu_model()
    return {"cores": cores, "device": device, "platform": platform.platform()}


def command_line() -> str:
    """The command that is running, as a user would type it from the project root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO))
    except ValueError:
        script_text = str(script)
    return shlex.join(["python", script_text, *sys.argv[1:]])


def checkout_commit() -> str:
    """The commit of this checkout, with " + uncommitted changes" when tracked files outside
    experiments/results/ and docs/attacks/ (the files results scripts write) differ from it; "unknown"
    outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)experiments/results",
                      ":(exclude)docs/attacks")  # what the results scripts themselves write
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" + uncommitted changes" if changed else "")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# taken when a results script starts, before its work: the code and the load the numbers come from
STARTED = {"commit": checkout_commit(), "load_average_at_start": load_average()}


def provenance() -> dict:
    return {
        "command": command_line(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": STARTED["commit"],
        "machine": {**machine(), "load_average_at_start": STARTED["load_average_at_start"],
                    "load_average_at_end": load_average()},
        "versions": versions(),
    }


def header_md(prov: dict) -> str:
    from defense.core.provenance import versions_text

    m = prov["machine"]
    packages = versions_text(prov["versions"])
    load = m.get("load_average_at_start")
    load_text = f", load average {load[0]:g} at start" if load else ""
    commit = prov.get("commit", "unknown")
    return (f"Written by `{prov['command']}` on {prov['date']} at commit {commit[:12]}{commit[40:]}; "
            f"{m['cores']} CPU cores, {m['device']}{load_text}; {packages}.")


def _clean(value):
    """JSON-safe: NaN/inf become null, numpy scalars plain numbers, paths strings."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(name: str, body_md: str, data: dict, results_dir: Path = RESULTS) -> tuple[Path, Path]:
    """Write `<name>.md` (header + body) and `<name>.json` (provenance + data); returns both paths."""
    prov = provenance()
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    md = results_dir / f"{name}.md"
    js = results_dir / f"{name}.json"
    md.write_text(header_md(prov) + "\n\n" + body_md.strip() + "\n")
    js.write_text(json.dumps(_clean({**prov, "results": data}), indent=2, sort_keys=False) + "\n")
    print(f"wrote {md.relative_to(REPO) if md.is_relative_to(REPO) else md} and {js.name}", flush=True)
    return md, js


def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; `align` has one letter per column, l(eft) or r(ight) (default: l then r...)."""
    align = align or "l" + "r" * (len(header) - 1)
    cells = [[str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def too_weak_record(seed: int, err) -> dict:
    """A scenario seed whose build failed the builder's check (`ScenarioTooWeak`): what it measured."""
    return {"seed": seed, "error": " and ".join(err.reasons),
            "clean_test_accuracy": err.metrics.get("clean_test_accuracy"), "test_asr": err.metrics.get("test_asr")}


def too_weak_md(skipped: list[dict]) -> str:
    """One sentence naming the seeds left out because their scenario failed the build check ("" if none)."""
    if not skipped:
        return ""
    parts = [f"seed {s['seed']} ({s['error']})" for s in skipped]
    return (f"Left out of every mean: the scenario of {'; '.join(parts)} failed the builder's check "
            f"(`dataset.scenario.min_clean_accuracy` and `min_asr`, not lowered), so no defense ran on it.")


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def stats(values) -> dict:
    """mean, sample std (n - 1; null for one value), min, max and n of the finite values."""
    import numpy as np

    v = _finite(values)
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(v), "mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
            "min": min(v), "max": max(v)}
