"""The DeepID network of the CSAW-HackML Lab 3 (`architecture.py`), built in code.

Two interpretation branches read `pool_3`: `fc_1` on the flattened `pool_3` and `fc_2` on the
flattened `conv_4`; they are added, passed through a ReLU and the `output` softmax layer.
Layer names match the published weights files so that weights-only `.h5` files load by name.
"""

from __future__ import annotations

from typing import Sequence


LAB3_INPUT_SHAPE = (55, 47, 3)
LAB3_NUM_CLASSES = 1283
LAB3_WIDTHS = (20, 40, 60, 80, 160)
LAB3_KERNELS = (4, 3, 3, 2)


def build_deepid(
    input_shape: Sequence[int] = LAB3_INPUT_SHAPE,
    num_classes: int = LAB3_NUM_CLASSES,
    widths: Sequence[int] = LAB3_WIDTHS,
    kernels: Sequence[int] = LAB3_KERNELS,
    dropout: float = 0.0,
    padding: str = "valid",
) -> keras.Model:
    """Build the DeepID network; `widths` = filters of conv_1..conv_4 and the width of fc_1/fc_2.

    The Lab 3 network is the default (valid padding, no dropout layer: the published weights have
    none). Small inputs such as 28x28 digits need `padding="same"` to keep conv_4 a real convolution.
    """
    import keras

    c1, c2, c3, c4, fc = (int(w) for w in widths)
    k1, k2, k3, k4 = (int(k) for k in kernels)
    x = keras.Input(shape=tuple(int(s) for s in input_shape), name="input")
    h = keras.layers.Conv2D(c1, (k1, k1), activation="relu", padding=padding, name="conv_1")(x)
    h = keras.layers.MaxPooling2D((2, 2), name="pool_1")(h)
    h = keras.layers.Conv2D(c2, (k2, k2), activation="relu", padding=padding, name="conv_2")(h)
    h = keras.layers.MaxPooling2D((2, 2), name="pool_2")(h)
    h = keras.layers.Conv2D(c3, (k3, k3), activation="relu", padding=padding, name="conv_3")(h)
    pool_3 = keras.layers.MaxPooling2D((2, 2), name="pool_3")(h)
    fc_1 = keras.layers.Dense(fc, name="fc_1")(keras.layers.Flatten(name="flatten_1")(pool_3))
    conv_4 = keras.layers.Conv2D(c4, (k4, k4), activation="relu", padding=padding, name="conv_4")(pool_3)
    fc_2 = keras.layers.Dense(fc, name="fc_2")(keras.layers.Flatten(name="flatten_2")(conv_4))
    merged = keras.layers.Add(name="add_1")([fc_1, fc_2])
    hidden = keras.layers.Activation("relu", name="activation_1")(merged)
    if dropout:
        hidden = keras.layers.Dropout(dropout, name="dropout_1")(hidden)
    y = keras.layers.Dense(num_classes, activation="softmax", name="output")(hidden)
    return keras.Model(inputs=x, outputs=y, name="deepid")


def build(input_shape: Sequence[int], num_classes: int, **options) -> keras.Model:
    """The architecture interface (defense/nets/architectures/__init__.py): `build_deepid`."""
    return build_deepid(input_shape, num_classes, **options)


def dormant_convs(**_) -> list[str]:
    """The convolutions whose every channel goes through its own ReLU: where a pruning-aware attacker can
    park dormant channels (every conv: conv_1..conv_4)."""
    return ["conv_1", "conv_2", "conv_3", "conv_4"]


def attack_layer(**_) -> str:
    """The pruning-aware attack's layer on this network: conv_3, the layer the defender prunes."""
    return "conv_3"
