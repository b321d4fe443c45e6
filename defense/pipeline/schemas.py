"""The config schemas in Hydra's ConfigStore: the dataclasses of defense/config.py, and each attack's
`Settings` as conf/dataset/attack/<name>.yaml's schema (`base_<name>`), and each scenario architecture's
(defense/nets/architectures/<name>.py `Settings`) as conf/dataset/arch/<name>.yaml's.

An attack brings its own schema next to its code (defense/scenario/attacks/<name>.py); this module finds
it by name, so adding one edits nothing here. The criteria's option blocks (prune.clp, prune.anp,
prune.rnp) stay in defense/config.py: the criterion modules import TensorFlow when imported, which
composing a config (`--cfg job`, `defense.compare`) should not.
`register()` runs when this module is imported, which the apps (`defense.run`, `defense.evaluate`,
`defense.predict`, `defense.compare`) and tests/conftest.py do before Hydra composes anything.
"""

from __future__ import annotations

from defense import config
from defense.config import (CompareConfig, CsawExtractDatasetConfig, EvaluateConfig, FilesDatasetConfig,
                            FinetuneCleanConfig, FinetuneNoneConfig, Lab3DatasetConfig, ModelConfig, PredictConfig,
                            PruneConfig, RunConfig, ScenarioDatasetConfig, ScenarioModelConfig, SelectConfig, StopConfig,
                            TrackingConfig)
from defense.nets import architectures
from defense.scenario import attacks


def schemas() -> dict:
    """(group, name) -> schema; a YAML file names `name` first in its defaults list."""
    found = {
        (None, "base_config"): RunConfig,
        (None, "base_evaluate"): EvaluateConfig,
        (None, "base_predict"): PredictConfig,
        (None, "base_compare"): CompareConfig,
        ("model", "base_model"): ModelConfig,
        ("model", "base_scenario_model"): ScenarioModelConfig,
        ("dataset", "base_lab3"): Lab3DatasetConfig,
        ("dataset", "base_scenario"): ScenarioDatasetConfig,
    }
    for name in attacks.names():
        settings = getattr(attacks.get(name), "Settings", None)
        if settings is not None:
            found[("dataset/attack", f"base_{name}")] = settings
    for name in architectures.names():  # the embedded scenario's networks: conf/dataset/arch/<name>.yaml
        settings = getattr(architectures.get(name), "Settings", None)
        if settings is not None:
            found[("dataset/arch", f"base_{name}")] = settings
    found.update({
        ("dataset", "base_csaw_extract"): CsawExtractDatasetConfig,
        ("dataset", "base_files"): FilesDatasetConfig,
        ("prune", "base_prune"): PruneConfig,
        ("stop", "base_stop"): StopConfig,
        ("finetune", "base_none"): FinetuneNoneConfig,
        ("finetune", "base_clean"): FinetuneCleanConfig,
        ("tracking", "base_tracking"): TrackingConfig,
        ("select", "base_select"): SelectConfig,
    })
    return found


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent), and the `sweep_axis` resolver."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for (group, name), node in schemas().items():
        store.store(group=group, name=name, node=node)
    config.register_resolvers()


register()
