"""Which BatchNormalization belongs to which pruned Conv2D: one rule for ANP, RNP and CLP.

The references put their masks on (ANP, RNP) or prune through (CLP) the BatchNormalization layers of the
network, not the convolutions. This framework ranks the output channels of Conv2D layers, so each pruned
conv is paired with the BatchNormalization that normalizes ITS OUTPUT CHANNELS, channel k with channel k:

1. conv -> BN: a BatchNormalization that reads the conv's output directly (the conv's output may also
   feed other layers, e.g. an identity shortcut; exactly one of its readers is a BatchNormalization);
2. otherwise conv -> Add -> BN: the conv's output is a summand of an Add (a residual sum) and exactly one
   reader of the sum is a BatchNormalization; of several conv summands (conv2 and a 1x1 shortcut) only the
   last in the network's layer order gets it, the others keep the conv adaptation. This is the PreAct block (BN -> ReLU -> conv): the BN that
   comes BEFORE a conv there is paired with the conv (or residual sum) that feeds it, not with the conv
   after it, as the reference CLP pairs each BatchNorm2d with the last Conv2d registered before it
   (channel-Lipschitzness-based-pruning, defense.py::CLP, the `elif isinstance(m, nn.Conv2d): conv = m`
   branch): in a PreActResNet the BN opening block b + 1 follows the last conv of block b.
3. no such BatchNormalization: None, and the criterion falls back to its conv adaptation (the mask on the
   conv's kernel and bias), as for DeepID, which has no BatchNormalization.

A paired BatchNormalization must normalize per channel over the last axis (channels last) and have a
scale gamma (`scale=True`); one that does not is reported, and `level=bn` then fails while `level=auto`
falls back to the conv.
"""

from __future__ import annotations

from defense.core.errors import DefenseError

LEVELS = ("auto", "bn", "conv")
VARIANT_BN = "bn"
VARIANT_CONV = "conv (adapted: no BatchNormalization)"


def _readers(model, layer) -> list:
    """The layers of `model` that read `layer`'s output."""
    names = {id(other) for other in model.layers}
    out = []
    for node in getattr(layer, "_outbound_nodes", []):
        op = getattr(node, "operation", None)
        if op is not None and id(op) in names and op not in out:
            out.append(op)
    return out


def _one_batch_norm(readers):
    import keras

    bns = [r for r in readers if isinstance(r, keras.layers.BatchNormalization)]
    return bns[0] if len(bns) == 1 else None


def batch_norm_problem(bn, rank: int) -> str:
    """Why `bn` cannot carry per-channel masks ('' when it can): not over the last axis, or no gamma."""
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    if axis is None or axis not in (-1, rank - 1):
        return f"{bn.name} normalizes over axis {bn.axis}, not per channel over the last axis"
    if getattr(bn, "gamma", None) is None:
        return f"{bn.name} has no scale gamma (scale=False)"
    return ""


def find_batch_norm(model, conv_name: str):
    """(the BatchNormalization paired with Conv2D `conv_name` by the rule above, or None; why not, or '')."""
    import keras

    conv = model.get_layer(conv_name)
    rank = len(conv.output.shape)
    readers = _readers(model, conv)
    bn = _one_batch_norm(readers)
    if bn is None:
        for add in (r for r in readers if isinstance(r, keras.layers.Add)):
            bn = _one_batch_norm(_readers(model, add))
            if bn is None:
                continue
            # the sum's BN goes to ONE of its summands: the last conv before it in the network's layer order,
            # as the reference pairs each BN with the last Conv2d registered before it (in a PreActBlock the
            # shortcut conv is registered after conv2, and so it is created here); the others keep the conv
            # adaptation
            order = {layer.name: i for i, layer in enumerate(model.layers)}
            summands = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)
                        and add in _readers(model, layer)]
            last = max(summands, key=lambda layer: order[layer.name])
            if last is not conv:
                return None, (f"the BatchNormalization {bn.name} of the residual sum {add.name} is paired with "
                              f"{last.name}, the last conv before it")
            break
    if bn is None:
        return None, f"no BatchNormalization reads {conv_name}'s output (directly or through a residual Add)"
    problem = batch_norm_problem(bn, rank)
    return (None, problem) if problem else (bn, "")


def check_level(key: str, level) -> str:
    if level not in LEVELS:
        raise DefenseError(f"{key}={level!r} is not a level; use auto (BatchNormalization where the network has "
                           f"one, else the conv), bn or conv, e.g. {key}=auto")
    return str(level)


def bn_units(model, layers: list[str], level: str, key: str) -> dict[str, str]:
    """{conv: its BatchNormalization's name} for the pruned convs whose masks sit on a BatchNormalization.

    level `auto`: every conv with a paired BN; `conv`: none; `bn`: every conv, or a DefenseError naming
    `key` when one has no per-channel BatchNormalization."""
    check_level(key, level)
    if level == "conv":
        return {}
    units, missing = {}, []
    for name in layers:
        bn, why = find_batch_norm(model, name)
        if bn is None:
            missing.append(why)
        else:
            units[name] = bn.name
    if level == "bn" and missing:
        raise DefenseError(f"{key}=bn: {missing[0]}; use {key}=auto (the conv where there is no such "
                           f"BatchNormalization) or {key}=conv")
    return units


def variant(units: dict[str, str], layers: list[str]) -> str:
    """The `defense_variant` of a run: `bn`, `conv (adapted: no BatchNormalization)`, or, when some pruned
    convs have a BatchNormalization and others not, `bn` followed by the adapted convs."""
    if not units:
        return VARIANT_CONV
    rest = [name for name in layers if name not in units]
    if not rest:
        return VARIANT_BN
    return f"{VARIANT_BN}; {VARIANT_CONV} for {'+'.join(rest)}"
