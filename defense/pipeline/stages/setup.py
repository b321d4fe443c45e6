"""Stage `setup`: everything before the MLflow run exists, so a bad option or an unreadable model fails
here with no run logged: the config checks, the seeds, B loaded (model=auto completed from the file),
the pruned layers checked against B (null prune.layer / prune.probe filled in), config.yaml written."""

from __future__ import annotations

from omegaconf import OmegaConf

from defense.config import seed_everything
from defense.core.safe_files import Limits
from defense.nets import models
from defense.pipeline import load, stages, sweep
from defense.pruning import autodetect
from defense.tracking import tracker as tracking

ORDER = 0


def run(cfg, out_dir) -> dict:
    # input checks first: a bad option fails here, before any data is read or any run is logged
    stages.check_config(cfg, "run")
    seed_everything(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.tracking.get("kind") == "mlflow":
        tracking.resolve_uri(cfg.tracking.get("uri"))
    model_path = load.resolve_model_path(cfg.model, cfg.dataset)
    limits = Limits.from_cfg(cfg)
    model = models.load_model(cfg.model, model_path, limits)
    autodetect.complete_model_config(cfg.model, model, model_path)
    layers = sweep.check_layers(cfg, model)  # also fills prune.layer / prune.probe where null
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    return {"model": model, "model_path": model_path, "limits": limits, "layers": layers}
