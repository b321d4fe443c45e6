"""Oracles for the tests: the plain Keras way of computing what the engines compute faster."""

from __future__ import annotations

import numpy as np


def set_weights_predictions(model, layer_name: str, x: np.ndarray, order, batch_size: int = 1024) -> np.ndarray:
    """Prune channel by channel the plain way: zero its kernel and bias with set_weights, then predict.

    Modifies a clone, not `model`. Returns (N, len(order)+1) labels; column s = the first s channels of
    `order` pruned in layer `layer_name`.
    """
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    layer = clone.get_layer(layer_name)
    kernel, *rest = layer.get_weights()
    columns = [np.argmax(clone.predict(x, batch_size=batch_size, verbose=0), axis=-1)]
    for channel in order:
        kernel[..., channel] = 0
        if rest:
            rest[0][channel] = 0
        layer.set_weights([kernel, *rest])
        columns.append(np.argmax(clone.predict(x, batch_size=batch_size, verbose=0), axis=-1))
    return np.stack(columns, axis=1)
