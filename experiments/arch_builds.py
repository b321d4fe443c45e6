"""Build the embedded scenario on every architecture of `dataset.scenario.arch` and time it.

    python experiments/arch_builds.py                        # badnets on deepid, preact_resnet, vgg_bn
    python experiments/arch_builds.py --attacks badnets blended sig wanet prune_aware

For every (architecture, attack) pair the scenario is built with the defaults of
conf/dataset/badnets_mnist.yaml and conf/dataset/arch/<arch>.yaml (or reused from the cache: the time is
then the one its scenario.json recorded when it was built). The goal is a build within 3 minutes on 2
CPU cores; the build check (clean test accuracy >= 95 %, test ASR >= the attack's bound) is the
builder's own, never lowered. Writes experiments/results/arch_builds.{md,json}.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files as rf  # noqa: E402

rf.use_this_checkout()

NAME = "arch_builds"
ARCHS = ("deepid", "preact_resnet", "vgg_bn")
GOAL_SECONDS = 180.0


def build(arch: str, attack: str, seed: int) -> dict:
    """One scenario, every attack with its defaults (conf/dataset/attack/)."""
    import defense.pipeline.schemas  # noqa: F401  (registers the config schemas before the config is composed)
    from defense.nets import architectures
    from defense.scenario import common
    from defense.scenario.build import ScenarioTooWeak, ensure_scenario, read_metadata, resolve_config, scenario_dir

    extra: list[str] = []
    cfg = rf.compose([f"dataset.scenario.arch={arch}", f"dataset.scenario.attack={attack}",
                      f"dataset.scenario.seed={seed}", *extra]).dataset.scenario
    resolved = resolve_config(cfg)
    network = architectures.get(arch).build(common.IMAGE_SHAPE, common.NUM_CLASSES, **common.arch_options(resolved))
    row = {"arch": arch, "attack": attack, "settings": " ".join(extra) or "defaults", "seed": seed, "key": os.path.basename(scenario_dir(cfg)),
           "parameters": int(network.count_params()), "epochs": resolved["epochs"]}
    t0 = time.perf_counter()
    try:
        folder, weak = ensure_scenario(cfg), None
    except ScenarioTooWeak as err:  # too weak: the network is cached with its scores all the same
        folder, weak = scenario_dir(cfg), err
    meta = read_metadata(folder)
    wall = time.perf_counter() - t0
    cached = wall < 0.5 * float(meta["build_seconds"])
    row = {**row, "passed": weak is None, **meta["metrics"], "build_seconds": float(meta["build_seconds"]), "cached": cached}
    return row if weak is None else {**row, "error": str(weak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--attacks", nargs="+", default=["badnets"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [build(arch, attack, args.seed) for arch in args.archs for attack in args.attacks]
    table = rf.md_table(
        ["arch", "attack", "settings", "parameters", "epochs", "clean test acc (%)", "test ASR (%)", "build check",
         "build time (s)", f"within {GOAL_SECONDS / 60:g} min"],
        [[r["arch"], r["attack"], f"`{r['settings']}`" if r["settings"] != "defaults" else "defaults", r["parameters"], r["epochs"], f"{r['clean_test_accuracy']:.2f}",
          f"{r['test_asr']:.2f}", "passed" if r["passed"] else "FAILED", f"{r['build_seconds']:.1f}",
          "yes" if r["build_seconds"] <= GOAL_SECONDS else "no"] for r in rows],
        "lllrrrrlrl",
    )
    scope = ("every attack" if set(args.attacks) >= {"badnets", "blended", "sig", "wanet", "prune_aware"}
             else "attack(s) " + ", ".join(args.attacks) + " only (the other attacks were not timed)")
    body = (f"Scenario builds per architecture (`dataset.scenario.arch`), {scope}, scenario seed {args.seed}, "
            "default settings (conf/dataset/attack/); the build time is the one the builder recorded in scenario.json "
            f"(training, scoring, saving). Goal: each build within {GOAL_SECONDS / 60:g} minutes on 2 CPU cores.\n\n"
            + table)
    rf.write_results(NAME, body, {"goal_seconds": GOAL_SECONDS, "rows": rows})


if __name__ == "__main__":
    main()
