"""Stage `keep`: B' of every reached summary row saved as models/model_B_<key>.h5 (and, with `compact`,
without its pruned channels: defense/pruning/compact.py), and pruned.json naming their channels."""

from __future__ import annotations

import logging

from defense.core import interrupt
from defense.nets import models
from defense.pipeline import sweep as sweeps
from defense.reporting import channel_record

ORDER = 40
log = logging.getLogger("defense.run")


def run(cfg, out_dir, model, sweep, summary, test, tracker) -> dict:
    models_dir = out_dir / "models"
    kept = {}
    for row in summary:
        row["model_path"] = ""
        if not row["reached"]:
            continue
        interrupt.check()  # a safe point between two B' (defense/core/interrupt.py)
        pruned = sweep.pruned_for(row)
        kept[sweeps.point_name(row)] = pruned
        b_prime = sweep.pruned_model(model, pruned)
        path = models.save_model(b_prime, models_dir / f"model_B_{sweeps.file_key(row)}.h5")
        row["model_path"] = str(path)
        if cfg.get("compact", True) and sweep.bn_units:
            log.warning("%s: no compact model: its channels are pruned on BatchNormalization layers (%s), and a "
                        "compact model removes zeroed conv channels", path.name, ", ".join(sweep.bn_units.values()))
        elif cfg.get("compact", True):  # also save B' without its pruned channels (defense/pruning/compact.py)
            from defense.pruning.compact import export_compact_beside

            export_compact_beside(b_prime, pruned, path, tracker, models.scale_inputs(test.clean.x, cfg.model))
    channel_record.write_pruned(out_dir / "pruned.json", kept)
    return {"summary": summary, "kept": kept}
