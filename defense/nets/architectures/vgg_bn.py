"""A small VGG-style network with batch normalization: two stages of (conv3x3-BN-ReLU) x 2 and max pooling,
then a hidden Dense layer and the Dense output, sized for 28x28 grey digits.

The convolutions are bias-free (the BN's beta is the channel's offset), as in torchvision's `vgg*_bn`
(`make_layers` with `batch_norm=True`: conv, BatchNorm2d, ReLU; there the conv keeps a bias the BN makes
redundant). Layer names: `conv_k`, `bn_k`, `relu_k` (k = 1..4), `pool_1` after conv_2, `pool_2` after
conv_4, `flatten`, `fc_1` (ReLU), `output` (softmax by default). Every BatchNormalization normalises the
last axis (the channels): one gamma, beta, moving mean and moving variance per channel of the conv before it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Sequence


from defense.core.errors import DefenseError
from defense.nets.architectures import check_sizes

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


@dataclass
class Settings:
    """conf/dataset/arch/vgg_bn.yaml: dataset.scenario.vgg_bn (the embedded scenario's network)."""

    widths: List[int] = field(default_factory=lambda: [16, 16, 32, 32])  # filters of conv_1..conv_4
    dense: int = 128  # width of fc_1
    softmax: bool = True  # True: a softmax output layer; False: logits out


DEFAULTS = asdict(Settings())


def check(block: dict, where: str) -> None:
    """The block `where` (dataset.scenario.vgg_bn) checked and normalised in place; DefenseError naming the key."""
    check_sizes(block, where, DEFAULTS)
    if len(block["widths"]) != 4:
        raise DefenseError(f"{where}.widths={block['widths']} must give 4 widths (conv_1..conv_4)")


def build_vgg_bn(input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (16, 16, 32, 32),
                 dense: int = 128, softmax: bool = True) -> keras.Model:
    import keras

    widths = [int(w) for w in widths]
    if len(widths) != 4:
        raise ValueError(f"widths {widths} must give the filters of conv_1..conv_4")
    x = keras.Input(shape=tuple(int(s) for s in input_shape), name="input")
    h = x
    for k, filters in enumerate(widths, start=1):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv_{k}")(h)
        h = keras.layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=f"bn_{k}")(h)
        h = keras.layers.ReLU(name=f"relu_{k}")(h)
        if k % 2 == 0:
            h = keras.layers.MaxPooling2D(2, name=f"pool_{k // 2}")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(int(dense), activation="relu", name="fc_1")(h)
    y = keras.layers.Dense(int(num_classes), activation="softmax" if softmax else None, name="output")(h)
    return keras.Model(inputs=x, outputs=y, name="vgg_bn")


def dormant_convs(**_) -> list[str]:
    """Every conv: each channel goes through its own BN and ReLU."""
    return ["conv_1", "conv_2", "conv_3", "conv_4"]


def attack_layer(**_) -> str:
    """The pruning-aware attack's layer on this network (its default `conv_3`, as on DeepID)."""
    return "conv_3"


def build(input_shape: Sequence[int], num_classes: int, **options) -> keras.Model:
    """The architecture interface (defense/nets/architectures/__init__.py): `build_vgg_bn`."""
    return build_vgg_bn(input_shape, num_classes, **options)
