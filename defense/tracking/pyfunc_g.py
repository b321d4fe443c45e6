"""The MLflow pyfunc model of the repaired network G(B, B'), as MLflow "models from code".

MLflow copies this file into every logged model (`defense/tracking/mlflow_model.py` logs it) and runs it when
the model is loaded, so it imports nothing of this project at module level: the model works where
only its requirements (mlflow, tensorflow, keras, numpy, h5py) are installed. The two networks are
artifacts of the model (with `settings`, a JSON of the number of classes and the input
scaling), full Keras .h5 files (`model_b`: the suspect network B; `repaired`: B' or a
fine-tuned B'', compact where it was exported). They are checked by `defense.core.safe_files` (shipped in
the model's `code/` folder) before Keras opens them: Keras built-in layers only, no code, no links to
other files; then `keras.models.load_model(..., safe_mode=True)`.

Input: raw pixels (0..255, the way `python -m defense.predict` reads image files), float32 of shape
(n, H, W, C). Output: one class per image: B's label where B and B' agree, N = `num_classes` where
they disagree (a backdoored input; CSAW-HackML-2020).
"""

from __future__ import annotations

import json

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class RepairedNetwork(PythonModel):
    """G(B, B'): B's label where B and B' agree, N where they disagree."""

    def load_context(self, context):
        import keras
        from defense.core.safe_files import check_model_file

        with open(context.artifacts["settings"]) as f:
            config = json.load(f)
        self.num_classes = int(config["num_classes"])
        self.input_divisor = float(config.get("input_divisor", 1.0))
        self.batch_size = int(config.get("batch_size", 256))
        self.networks = []
        for key in ("model_b", "repaired"):
            path = context.artifacts[key]
            check_model_file(path)  # refuses code-carrying layers, custom objects, links, oversized data
            self.networks.append(keras.models.load_model(path, compile=False, safe_mode=True))

    # np.ndarray: MLflow infers no schema from it (the model is logged with a tensor signature) and does
    # not warn that predict() lacks type hints
    def predict(self, context, model_input: np.ndarray, params=None):
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim == 3:  # one image
            x = x[None]
        if self.input_divisor != 1.0:
            x = (x / np.float32(self.input_divisor)).astype(np.float32)
        model_b, repaired = self.networks
        pred_b = np.argmax(model_b.predict(x, batch_size=self.batch_size, verbose=0), axis=-1)
        pred_r = np.argmax(repaired.predict(x, batch_size=self.batch_size, verbose=0), axis=-1)
        return np.where(pred_b == pred_r, pred_b, self.num_classes).astype(np.int64)


set_model(RepairedNetwork())
