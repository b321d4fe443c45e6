"""The backdoor attacks the embedded scenario (defense/scenario/build.py) can build, one module each.

`dataset.scenario.attack` names one of `ATTACK_NAMES` (every module here); every module implements the same small interface:

    NAME            the attack's name (the value of dataset.scenario.attack; the module's name)
    Settings        a dataclass of its own settings (the schema of conf/dataset/attack/<NAME>.yaml, stored
                    by defense/pipeline/schemas.py); none for badnets
    DEFAULTS        its own settings (the block dataset.scenario.<NAME>; None for badnets, whose
                    square trigger is dataset.scenario.trigger, kept where it always was)
    USES_TRIGGER    whether dataset.scenario.trigger (the BadNets square) is part of the attack
    CHANGES_LABELS  whether it relabels poisoned training images (sig is clean-label: it does not)
    MIN_ASR         the test attack success rate (%) its network must reach when built
    check(cfg)                    its block checked and normalised (DefenseError naming the key)
    poison_train(x, y, cfg, rng)  -> (x', y', counts): the training set as the attacker hands it over
    poison_test(x, y, cfg)        -> (x_bd, y_bd, indices): the test-time inputs with the trigger,
                                     their attack labels and which of the given images they come from
    describe(cfg)                 a short text for the build log
and optionally `train(x_train, y_train, cfg, context)` -> (network, details for scenario.json) when
the network is not simply trained on the poisoned set (prune_aware); `context` holds the attacker's
clean training digits before poisoning (`x_train_clean`, `y_train_clean`), never the validation
digits, which are the defender's. An attack imports defense/scenario/common.py, never the builder or another
attack. Adding an attack = one module here (its `Settings` included) and one config
file conf/dataset/attack/<name>.yaml; it is found by its module name.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from defense.core.errors import DefenseError


DEFAULT_ATTACK = "badnets"


def names() -> list[str]:
    """Every attack module in this package: the default (badnets) first, then by name."""
    found = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(found, key=lambda name: (name != DEFAULT_ATTACK, name))


def _modules() -> dict[str, ModuleType]:
    return {name: importlib.import_module(f"{__name__}.{name}") for name in names()}


ATTACK_NAMES = tuple(names())


def get(name) -> ModuleType:
    """The module of attack `name`; DefenseError for an unknown one."""
    modules = _modules()
    if not isinstance(name, str) or name not in modules:
        raise DefenseError(
            f"dataset.scenario.attack={name!r} is not known; use one of {list(ATTACK_NAMES)}, "
            "e.g. dataset.scenario.attack=blended"
        )
    return modules[name]


def blocks() -> dict[str, dict]:
    """Every attack's own default settings block (dataset.scenario.<name>), by name."""
    return {name: dict(m.DEFAULTS) for name, m in _modules().items() if m.DEFAULTS is not None}
