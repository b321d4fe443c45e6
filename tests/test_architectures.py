"""The embedded scenario's networks (`dataset.scenario.arch`): their layers, BN pairing, outputs and settings.

Oracles: hand-written layer lists (what the reference networks are), plain Keras and numpy.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import compose, run_cli
from defense.core.errors import DefenseError
from defense.scenario import build as scenario

SHAPE, CLASSES = (28, 28, 1), 10

# Each BatchNormalization with the Conv2D whose output it reads directly (CLP folds that BN into the conv's
# bound). In a PreAct block the BN comes before its conv: only bn2 reads a conv (conv1); bn1 and final_bn
# read a residual sum, except the first block's bn1, which reads the stem conv (that also feeds the identity
# skip, so it has two readers: CLP pairs only a BN that is its conv's one reader).
PAIRS = {
    "vgg_bn": {"conv_1": "bn_1", "conv_2": "bn_2", "conv_3": "bn_3", "conv_4": "bn_4"},
    # defense/pruning/bn_pairing.py: the BN that reads a conv, else the BN of the residual sum it feeds, which
    # goes to the sum's last conv (the 1x1 shortcut where a block has one), as the reference CLP pairs by
    # module order (BackdoorBench's PreActBlock registers bn1, conv1, bn2, conv2, shortcut)
    "preact_resnet": {"stem_conv": "s1b1_bn1", "s1b1_conv1": "s1b1_bn2", "s1b1_conv2": "s2b1_bn1",
                      "s2b1_shortcut": "s3b1_bn1", "s2b1_conv1": "s2b1_bn2", "s2b1_conv2": None,
                      "s3b1_shortcut": "final_bn", "s3b1_conv1": "s3b1_bn2", "s3b1_conv2": None},
    "deepid": {"conv_1": None, "conv_2": None, "conv_3": None, "conv_4": None},
}
BN_INPUTS = {  # every BN and the layer whose output it normalises (the data flow, by hand)
    "vgg_bn": {"bn_1": "conv_1", "bn_2": "conv_2", "bn_3": "conv_3", "bn_4": "conv_4"},
    "preact_resnet": {"s1b1_bn1": "stem_conv", "s1b1_bn2": "s1b1_conv1", "s2b1_bn1": "s1b1_add",
                      "s2b1_bn2": "s2b1_conv1", "s3b1_bn1": "s2b1_add", "s3b1_bn2": "s3b1_conv1",
                      "final_bn": "s3b1_add"},
    "deepid": {},
}


def network(arch: str, **options):
    from defense.nets import architectures
    from defense.scenario import common

    cfg = scenario.resolve_config({"arch": arch, "cache_dir": "/nonexistent-cache-not-used"})
    return architectures.get(arch).build(SHAPE, CLASSES, **{**common.arch_options(cfg), **options})


@pytest.mark.parametrize("arch", sorted(PAIRS))
def test_conv_bn_pairing_and_bn_per_channel_on_the_last_axis(arch):
    import keras

    from defense.criteria.clp import following_batch_norm

    model = network(arch)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert sorted(c.name for c in convs) == sorted(PAIRS[arch])
    found = {c.name: getattr(following_batch_norm(model, c), "name", None) for c in convs}
    assert found == PAIRS[arch]
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    inputs = {bn.name: bn._inbound_nodes[0].input_tensors[0]._keras_history.operation.name for bn in bns}
    assert inputs == BN_INPUTS[arch]
    for bn in bns:  # one gamma, beta, moving mean and variance per channel, the channels on the last axis
        channels = int(bn.input.shape[-1])
        assert bn.axis in ([-1], [3], -1, 3)
        assert [w.shape for w in bn.get_weights()] == [(channels,)] * 4
    for conv in convs:
        if arch != "deepid":
            assert not conv.use_bias  # bias-free: the BN's beta (or the residual sum) is the offset


def test_preact_blocks_are_those_of_backdoorbench():
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, a 1x1 shortcut where the stride or width changes, the Add, then
    BN-ReLU, global average pooling and a Dense with no softmax (hand-written from models/preact_resnet.py)."""
    import keras

    model = network("preact_resnet")
    kinds = [(layer.name, type(layer).__name__) for layer in model.layers]
    block = ["bn1:BatchNormalization", "relu1:ReLU", "conv1:Conv2D", "bn2:BatchNormalization", "relu2:ReLU",
             "conv2:Conv2D", "shortcut:Conv2D", "add:Add"]
    expected = ["input:InputLayer", "stem_conv:Conv2D"]
    for s in (1, 2, 3):
        expected += [f"s{s}b1_{b}" for b in block if not (s == 1 and b.startswith("shortcut"))]
    expected += ["final_bn:BatchNormalization", "final_relu:ReLU", "pool:GlobalAveragePooling2D", "output:Dense"]
    assert sorted(f"{n}:{k}" for n, k in kinds) == sorted(expected)
    sizes = {layer.name: (layer.kernel_size, layer.strides, layer.filters) for layer in model.layers
             if isinstance(layer, keras.layers.Conv2D)}
    assert sizes["s2b1_conv1"] == ((3, 3), (2, 2), 32) and sizes["s2b1_conv2"] == ((3, 3), (1, 1), 32)
    assert sizes["s2b1_shortcut"] == ((1, 1), (2, 2), 32) and sizes["s3b1_shortcut"] == ((1, 1), (2, 2), 64)
    assert sizes["stem_conv"] == ((3, 3), (1, 1), 16)
    assert model.get_layer("s2b1_shortcut").input is model.get_layer("s2b1_relu1").output  # of relu(bn1(x))
    assert model.get_layer("output").activation is keras.activations.linear
    assert model.output_shape == (None, CLASSES) and model.get_layer("pool").output.shape[-1] == 64


def test_outputs_logits_or_softmax_as_configured_and_detected():
    import keras

    from defense.nets.models import class_probabilities, uses_logits

    x = np.random.default_rng(0).uniform(0, 1, (4, *SHAPE)).astype(np.float32)
    for arch, logits in (("preact_resnet", True), ("vgg_bn", False), ("deepid", False)):
        assert uses_logits(network(arch)) is logits
    flipped = network("preact_resnet", softmax=True)
    assert not uses_logits(flipped) and uses_logits(network("vgg_bn", softmax=False))
    logits_net = network("preact_resnet")
    raw = logits_net.predict(x, verbose=0)
    expected = np.exp(raw - raw.max(-1, keepdims=True))
    np.testing.assert_allclose(class_probabilities(logits_net, x), expected / expected.sum(-1, keepdims=True),
                               rtol=1e-5)
    vgg = network("vgg_bn")
    np.testing.assert_allclose(class_probabilities(vgg, x), keras.Model(vgg.inputs, vgg.outputs).predict(x, verbose=0),
                               rtol=1e-6)


def test_the_default_layer_of_a_residual_network_is_on_the_main_path():
    from defense.pruning import autodetect

    preact = network("preact_resnet")
    assert autodetect.shortcut_convs(preact) == {"s2b1_shortcut", "s3b1_shortcut"}
    assert autodetect.default_layer(preact) == "s3b1_conv2"
    assert autodetect.default_probe(preact, "s3b1_conv2") == "s3b1_conv2"  # its output joins the residual sum
    vgg = network("vgg_bn")
    assert autodetect.shortcut_convs(vgg) == set()
    assert autodetect.default_layer(vgg) == "conv_4" and autodetect.default_probe(vgg, "conv_4") == "pool_2"


def _settings(**changes) -> dict:
    return scenario.resolve_config({"cache_dir": "/nonexistent-cache-not-used", **changes})


def test_deepid_keeps_its_cache_keys_and_other_architectures_key_their_own_settings():
    deepid = scenario.scenario_key(_settings())
    assert deepid == scenario.scenario_key(_settings(arch="deepid", vgg_bn={"dense": 7}))
    assert deepid == "421c867c8e97418c"  # tests/test_attacks.py re-derives it by hand
    for arch, change in (("preact_resnet", {"widths": [8, 16, 32]}), ("vgg_bn", {"dense": 64})):
        key = scenario.scenario_key(_settings(arch=arch))
        assert key != deepid
        assert scenario.scenario_key(_settings(arch=arch, **{arch: change})) != key
        assert scenario.scenario_key(_settings(arch=arch, widths=[1, 2, 3, 4, 5])) == key  # DeepID's own setting
        assert scenario.scenario_key(_settings(arch=arch, attack="blended")) != key


def test_prune_aware_layer_per_architecture():
    assert _settings(attack="prune_aware")["prune_aware"]["layer"] == "conv_3"
    assert _settings(attack="prune_aware", arch="vgg_bn")["prune_aware"]["layer"] == "conv_3"
    assert _settings(attack="prune_aware", arch="preact_resnet")["prune_aware"]["layer"] == "s3b1_conv1"
    with pytest.raises(DefenseError) as err:
        _settings(attack="prune_aware", arch="preact_resnet", prune_aware={"layer": "s3b1_conv2"})
    message = str(err.value)
    assert "\n" not in message and "dataset.scenario.prune_aware.layer='s3b1_conv2'" in message
    assert "['s1b1_conv1', 's2b1_conv1', 's3b1_conv1']" in message


@pytest.mark.parametrize("change,message", [
    ({"arch": "resnet50"}, "dataset.scenario.arch='resnet50' is not known; use one of ['deepid', 'preact_resnet', "
                           "'vgg_bn']"),
    ({"arch": "preact_resnet", "preact_resnet": {"blocks": [1, 1]}}, "dataset.scenario.preact_resnet.widths="),
    ({"arch": "vgg_bn", "vgg_bn": {"widths": [8, 8]}}, "dataset.scenario.vgg_bn.widths=[8, 8] must give 4 widths"),
    ({"arch": "vgg_bn", "vgg_bn": {"softmax": "yes"}}, "dataset.scenario.vgg_bn.softmax='yes' must be true or false"),
])
def test_bad_architecture_settings_are_one_line_and_build_nothing(tmp_path, change, message):
    with pytest.raises(DefenseError) as err:
        scenario.ensure_scenario({"cache_dir": str(tmp_path / "cache"), **change})
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "cache")


def test_cli_unknown_arch_is_one_line_exit_2_and_logs_no_run(tmp_path):
    proc = run_cli("defense.run", "dataset.scenario.arch=resnet50", f"dataset.scenario.cache_dir={tmp_path / 'cache'}",
                   f"hydra.run.dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "dataset.scenario.arch='resnet50' is not known" in errors[0]
    assert "preact_resnet" in errors[0] and "vgg_bn" in errors[0]
    assert "FINISHED" not in proc.stdout + proc.stderr
    if (tmp_path / "mlflow.db").exists():
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("backdoor-prune")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        assert not [r for r in runs if r.info.status == "FINISHED"]
    assert not os.path.exists(tmp_path / "cache")


def test_composed_config_selects_the_architecture_blocks():
    cfg = compose(["dataset.scenario.arch=preact_resnet", "dataset.scenario.preact_resnet.widths=[8,16,32]"])
    assert cfg.dataset.scenario.arch == "preact_resnet"
    assert list(cfg.dataset.scenario.preact_resnet.widths) == [8, 16, 32]
    assert cfg.dataset.scenario.vgg_bn.dense == 128
    typo = compose(["+dataset.scenario.vgg_bn.depth=3"]).dataset.scenario
    with pytest.raises(DefenseError, match=r"unknown setting\(s\) \['depth'\] in dataset.scenario.vgg_bn"):
        scenario.resolve_config(typo)
