"""A pre-activation ResNet (He, Zhang, Ren and Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016)
in the form BackdoorBench trains it, scaled down for 28x28 grey digits.

Reference: SCLBD/BackdoorBench models/preact_resnet.py, `PreActBlock` (lines 15-42) and `PreActResNet`
(lines 73-103). Each block is BN-ReLU-conv3x3-BN-ReLU-conv3x3 with bias-free convolutions; when the
stride or the width changes, the shortcut is a bias-free 1x1 convolution of the block's first BN-ReLU
output (BackdoorBench line 35: `self.shortcut(out)` with `out = relu(bn1(x))`), otherwise the block's input
itself; the residual `Add` ends the block. A bias-free 3x3 stem convolution comes first. After the last
block, as in He et al.'s pre-activation network, a BN-ReLU normalises the sum before the global average
pooling (BackdoorBench's copy leaves it out) and a Dense layer gives the class scores: logits by default,
as BackdoorBench's `self.linear` (`softmax=True` adds the softmax).

Layer names: `stem_conv`; block b of stage s: `s{s}b{b}_bn1`, `_relu1`, `_shortcut` (where there is one),
`_conv1`, `_bn2`, `_relu2`, `_conv2`, `_add`; then `final_bn`, `final_relu`, `pool`, `output`. Every
BatchNormalization normalises the last axis (the channels), so its gamma, beta, moving mean and moving
variance hold one value per channel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Sequence


from defense.core.errors import DefenseError
from defense.nets.architectures import check_sizes

BN_EPSILON = 1e-5  # PyTorch's BatchNorm2d default, which the reference uses
BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1 in Keras' convention (new = momentum * old + (1 - momentum) * batch)


@dataclass
class Settings:
    """conf/dataset/arch/preact_resnet.yaml: dataset.scenario.preact_resnet (the embedded scenario's network)."""

    widths: List[int] = field(default_factory=lambda: [16, 32, 64])  # filters of each stage (the stem: widths[0])
    blocks: List[int] = field(default_factory=lambda: [1, 1, 1])  # PreActBlocks per stage
    softmax: bool = False  # False: logits out (BackdoorBench); True: a softmax output layer


DEFAULTS = asdict(Settings())


def check(block: dict, where: str) -> None:
    """The block `where` (dataset.scenario.preact_resnet) checked and normalised in place; DefenseError naming the key."""
    check_sizes(block, where, DEFAULTS)
    if len(block["widths"]) != len(block["blocks"]):
        raise DefenseError(f"{where}.widths={block['widths']} and {where}.blocks={block['blocks']} must name the same "
                           "stages (one width and one block count per stage)")


def build_preact_resnet(input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (16, 32, 64),
                        blocks: Sequence[int] = (1, 1, 1), softmax: bool = False) -> keras.Model:
    """The network; stage s has `widths[s]` filters and `blocks[s]` blocks, stride 1 in the first stage, 2 after."""
    import keras

    widths = [int(w) for w in widths]
    blocks = [int(b) for b in blocks]
    if len(widths) != len(blocks) or not widths:
        raise ValueError(f"widths {widths} and blocks {blocks} must name the same stages")

    def bn(name):
        return keras.layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)

    def conv(filters, kernel, stride, name):
        return keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)

    x = keras.Input(shape=tuple(int(s) for s in input_shape), name="input")
    h = conv(widths[0], 3, 1, "stem_conv")(x)
    in_planes = widths[0]
    for s, (planes, count) in enumerate(zip(widths, blocks), start=1):
        for b in range(1, count + 1):
            stride = 2 if s > 1 and b == 1 else 1
            p = f"s{s}b{b}_"
            out = keras.layers.ReLU(name=p + "relu1")(bn(p + "bn1")(h))
            shortcut = conv(planes, 1, stride, p + "shortcut")(out) if stride != 1 or in_planes != planes else h
            out = conv(planes, 3, stride, p + "conv1")(out)
            out = keras.layers.ReLU(name=p + "relu2")(bn(p + "bn2")(out))
            out = conv(planes, 3, 1, p + "conv2")(out)
            h = keras.layers.Add(name=p + "add")([out, shortcut])
            in_planes = planes
    h = keras.layers.ReLU(name="final_relu")(bn("final_bn")(h))
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    y = keras.layers.Dense(int(num_classes), activation="softmax" if softmax else None, name="output")(h)
    return keras.Model(inputs=x, outputs=y, name="preact_resnet")


def dormant_convs(widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (1, 1, 1), **_) -> list[str]:
    """The convolutions whose every channel goes through its own BN and ReLU (each block's conv1): where a
    pruning-aware attacker can park dormant channels. The stem, conv2 and the shortcuts feed residual sums."""
    return [f"s{s}b{b}_conv1" for s, count in enumerate(blocks, start=1) for b in range(1, int(count) + 1)]


def attack_layer(**options) -> str:
    """The pruning-aware attack's layer on this network: the last block's conv1."""
    return dormant_convs(**options)[-1]


def build(input_shape: Sequence[int], num_classes: int, **options) -> keras.Model:
    """The architecture interface (defense/nets/architectures/__init__.py): `build_preact_resnet`."""
    return build_preact_resnet(input_shape, num_classes, **options)
