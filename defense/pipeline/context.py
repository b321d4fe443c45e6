"""What the stages of a defense run hand each other (defense/pipeline/stages/).

A stage's `run` names the fields it reads as its parameters and returns the fields it sets, so its
inputs and outputs are explicit; `RunContext.call` passes them in and stores what comes back.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class RunContext:
    cfg: Any  # the run's config (DictConfig)
    out_dir: Path
    started: float  # time.perf_counter() when the run started
    model: Any = None  # the suspect network B
    model_path: str = ""
    limits: Any = None  # defense.core.safe_files.Limits
    layers: list[str] = field(default_factory=list)  # the pruned layers, in model order
    tracker: Any = None  # defense.tracking.tracker.Tracker
    valid: Any = None  # defense.pipeline.load.Split (the clean images less the held-out ones)
    holdout: Any = None  # the held-out clean validation images (defense/pipeline/select.py), LabeledImages
    test: Any = None
    sweep: Any = None  # defense.pipeline.sweep.SweepResult
    summary: list[dict] = field(default_factory=list)  # summary.csv: one row per drop (the operating point, the defender's and the oracle's points)
    kept: dict = field(default_factory=dict)  # point name -> {layer: pruned channels} of every saved B'
    finetune_extra: dict = field(default_factory=dict)  # points and columns the fine-tuning adds to the reports
    model_uris: dict = field(default_factory=dict)  # MLflow models logged
    stage_seconds: dict = field(default_factory=dict)  # stage module name -> seconds (profile.json)

    def call(self, function) -> None:
        """`function(**fields it names)`; the dict it returns sets those fields (a name that is no field fails)."""
        names = inspect.signature(function).parameters
        t0 = time.perf_counter()
        try:
            out = function(**{name: getattr(self, name) for name in names})
        finally:
            stage = function.__module__.rsplit(".", 1)[-1]
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0
        known = {f.name for f in fields(self)}
        for key, value in (out or {}).items():
            if key not in known:
                raise TypeError(f"{function.__module__}.{function.__name__} returned {key!r}, no RunContext field")
            setattr(self, key, value)

    def result(self) -> dict:
        """What `defense.run.run_defense` returns."""
        result = self.sweep
        return {"curves": result.curves, "summary": self.summary,
                "order": result.order if len(result.layers) == 1 else result.pairs, "run_id": self.tracker.run_id,
                "experiment_id": self.tracker.experiment_id, "tracking_uri": self.tracker.uri,
                "out_dir": self.out_dir, "result": result, "model_uris": self.model_uris}
