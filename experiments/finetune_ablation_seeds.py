"""Does pruning first let a smaller fine-tuning budget remove the backdoor? Fine-pruning next to
fine-tuning alone (and B, pruning alone, random pruning) at small fine-tuning budgets, on fresh
instances of the embedded scenario.

    python experiments/finetune_ablation_seeds.py                        # BadNets, scenario seeds 1-5
    python experiments/finetune_ablation_seeds.py --seeds 1 2            # fewer
    python experiments/finetune_ablation_seeds.py --attack prune_aware   # another attack of the scenario
                                                                         # (dataset.scenario.attack)

The settings are fixed here, before any seed was run, and never tuned on these seeds (EPOCHS,
LEARNING_RATES, DROPS, CRITERIA below): for every scenario seed S (another split of the digits, other
poisoned training digits, another trained B; seed 0, the development instance the fine-tuning settings
were chosen on, is refused) two runs go through `defense.run.run_defense`:

  python -m defense.run experiment=finetune_ablation dataset.scenario.seed=S prune.criterion=activation \\
      prune.drops=[4,30] ablation.epochs=[1,2,5,10] ablation.learning_rate=[0.05]
  (the same with prune.criterion=random)

Each fine-tunes, with the fine-tuning of defense=fine_pruning (conf/finetune/sgd_cosine.yaml: SGD,
momentum 0.9, cosine decay to 0 over the budget, 2-pixel shifts, the 1000 clean validation digits)
shortened to 1, 2, 5 and 10 epochs, the unpruned B (drop 0: fine-tuning alone, defense=fine_tuning's
network) and B' at the 4- and 30-point accuracy drops: pruned by mean activation (fine-pruning,
defense=fine_pruning's network) or in a random order (random pruning, then fine-tuning). The
presets' own 30-epoch budget on the same seeds is experiments/fine_pruning_seeds.py's table. The
drop-0 cells of the two runs are the same fine-tuning of the same B; the study checks they agree.
Every score is on the scenario's test digits; DER is against the unpruned B of the same seed. Writes
experiments/results/finetune_ablation_seeds.md (mean ± sample std over the seeds) and .json (per
seed); with --attack A other than badnets, finetune_ablation_seeds_A.md / .json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files as rf  # noqa: E402

rf.use_this_checkout()

NAME = "finetune_ablation_seeds"
# fixed before any seed was run (see the module docstring); the defaults of experiment=finetune_ablation
# are not used so that a later change of that preset does not change this study
EPOCHS = [1, 2, 5, 10]
LEARNING_RATES = [0.05]
DROPS = [4, 30]
CRITERIA = ("activation", "random")
BASE = ["experiment=finetune_ablation", "tracking=none", "progress=false", "compact=false",
        f"prune.drops=[{','.join(f'{d:g}' for d in DROPS)}]",
        f"ablation.epochs=[{','.join(str(e) for e in EPOCHS)}]",
        f"ablation.learning_rate=[{','.join(f'{r:g}' for r in LEARNING_RATES)}]"]
SCORES = ("ft_test_acc", "ft_test_asr", "ft_der", "ft_g_test_acc", "ft_g_test_asr", "ft_g_der")
# the defended networks of the tables: (key, label)
DEFENSES = (
    ("fine_tuning", "fine-tuning alone (no channel pruned)"),
    ("fine_pruning", "fine-pruning (activation pruning, then fine-tuning)"),
    ("random_fine_tuning", "random pruning, then fine-tuning"),
)


def attack_overrides(attack: str) -> list[str]:
    """badnets (the default scenario) needs no override; another attack is `dataset.scenario.attack`."""
    return [] if attack == "badnets" else [f"dataset.scenario.attack={attack}"]


def results_name(attack: str) -> str:
    return NAME if attack == "badnets" else f"{NAME}_{attack}"


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def run_seed(seed: int, attack: str, out_dir: Path) -> dict:
    from defense.core import metrics
    from defense.reporting import report
    from defense.run import run_defense
    from defense.scenario.build import ensure_scenario, read_metadata

    overrides = [*BASE, *attack_overrides(attack), f"dataset.scenario.seed={seed}"]
    scenario = read_metadata(ensure_scenario(rf.compose(overrides).dataset.scenario))
    record = {"seed": seed, "attack": attack,
              "scenario": {"key": scenario.get("key"), **{k: scenario["metrics"][k] for k in sorted(scenario["metrics"])}},
              "seconds": {"scenario_build": scenario.get("build_seconds")}, "pruning": {}, "cells": {}}
    for criterion in CRITERIA:
        cfg = rf.compose([*overrides, f"prune.criterion={criterion}"])
        run_dir = out_dir / f"seed_{seed}" / criterion
        t0 = time.perf_counter()
        result = run_defense(cfg, run_dir)
        record["seconds"][f"{criterion}_run"] = round(time.perf_counter() - t0, 1)
        base = result["curves"][0]
        record["b_test_acc"], record["b_test_asr"] = base["pruned_test_acc"], base["pruned_test_asr"]
        # pruning alone: B' itself and the repaired G(B, B') of every threshold, no fine-tuning
        record["pruning"][criterion] = [
            {"drop": float(t["drop"]), "reached": bool(t["reached"]),
             "channels_pruned": int(t["channels_pruned"]) if t["reached"] else None,
             "b_prime_acc": _float(t["pruned_test_acc"]), "b_prime_asr": _float(t["pruned_test_asr"]),
             "g_acc": _float(t["test_acc"]), "g_asr": _float(t["test_asr"]),
             "b_prime_der": metrics.defense_effectiveness_rating(base["pruned_test_acc"], t["pruned_test_acc"],
                                                                  base["pruned_test_asr"], t["pruned_test_asr"])
             if t["reached"] else float("nan"),
             "g_der": _float(t["der"])}
            for t in result["summary"] if t.get("point", "drop") == "drop"]
        cells = []
        for row in report.read_csv(run_dir / "ablation.csv"):
            reached = row["reached"] == "True"
            cells.append({"drop": float(row["drop"]), "epochs": int(row["epochs"]),
                          "learning_rate": float(row["learning_rate"]), "reached": reached,
                          "channels_pruned": int(row["channels_pruned"]) if reached else None,
                          "diverged": row.get("diverged") == "True",  # its scores are blank (defense/core/divergence.py)
                          **{k: _float(row[k]) for k in SCORES}})
        record["cells"][criterion] = cells
    # drop 0 of both runs is the same fine-tuning of the same B
    zero = [[(c["epochs"], c["learning_rate"], c["ft_test_acc"], c["ft_test_asr"]) for c in record["cells"][k]
             if c["drop"] == 0] for k in CRITERIA]
    record["drop0_runs_agree"] = all(z == zero[0] for z in zero)
    return record


def entries(record: dict) -> list[dict]:
    """The seed's defended networks as rows (defense, drop, epochs, learning_rate, acc, asr, der, ...):
    epochs 0 is no fine-tuning (B itself at drop 0, B' of the pruning otherwise)."""
    rows = [{"defense": "fine_tuning", "drop": 0.0, "epochs": 0, "learning_rate": None, "channels_pruned": 0,
             "acc": record["b_test_acc"], "asr": record["b_test_asr"], "der": 0.5,
             "g_acc": record["b_test_acc"], "g_asr": record["b_test_asr"], "g_der": 0.5}]
    for criterion, key in (("activation", "fine_pruning"), ("random", "random_fine_tuning")):
        for t in record["pruning"][criterion]:
            rows.append({"defense": key, "drop": t["drop"], "epochs": 0, "learning_rate": None,
                         "channels_pruned": t["channels_pruned"], "acc": t["b_prime_acc"], "asr": t["b_prime_asr"],
                         "der": t["b_prime_der"], "g_acc": t["g_acc"], "g_asr": t["g_asr"], "g_der": t["g_der"]})
        for c in record["cells"][criterion]:
            if c["drop"] == 0 and criterion != "activation":
                continue  # the same cells as the activation run's (drop0_runs_agree)
            rows.append({"defense": "fine_tuning" if c["drop"] == 0 else key, "drop": c["drop"],
                         "epochs": c["epochs"], "learning_rate": c["learning_rate"],
                         "channels_pruned": c["channels_pruned"], "diverged": bool(c.get("diverged")),
                         "acc": c["ft_test_acc"], "asr": c["ft_test_asr"],
                         "der": c["ft_der"], "g_acc": c["ft_g_test_acc"], "g_asr": c["ft_g_test_asr"],
                         "g_der": c["ft_g_der"]})
    return rows


stats = rf.stats  # mean, sample std, min, max and n over the seeds


def summarize(per_seed: list[dict]) -> dict:
    """Per (defense, drop, epochs, learning rate): the statistics over the seeds of every score."""
    seeds = [entries(s) for s in per_seed]
    keys = [(r["defense"], r["drop"], r["epochs"], r["learning_rate"]) for r in seeds[0]]
    rows = []
    for key in keys:
        found = [next(r for r in rs if (r["defense"], r["drop"], r["epochs"], r["learning_rate"]) == key)
                 for rs in seeds]
        rows.append({"defense": key[0], "drop": key[1], "epochs": key[2], "learning_rate": key[3],
                     "diverged": sum(bool(r.get("diverged")) for r in found),
                     **{k: stats([r[k] for r in found])
                        for k in ("channels_pruned", "acc", "asr", "der", "g_acc", "g_asr", "g_der")}})
    seconds = sorted({k for s in per_seed for k in s["seconds"]})
    return {"seeds": [s["seed"] for s in per_seed], "rows": rows,
            "drop0_runs_agree": all(s["drop0_runs_agree"] for s in per_seed),
            "seconds": {k: stats([s["seconds"].get(k) for s in per_seed]) for k in seconds}}


def _ms(st: dict, digits: int = 2) -> str:
    if not st["n"]:
        return "-"
    if st["std"] is None:
        return f"{st['mean']:.{digits}f}"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def _diverged(row: dict) -> str:
    """" (k diverged)" after a cell whose fine-tuning diverged at k seeds (left out of its mean), else ""."""
    return f" ({row['diverged']} diverged)" if row.get("diverged") else ""


def markdown(per_seed: list[dict], summary: dict, attack: str) -> str:
    seeds = summary["seeds"]
    rows = summary["rows"]
    by_key = {(r["defense"], r["drop"], r["epochs"]): r for r in rows if r["learning_rate"] in (None, LEARNING_RATES[0])}
    columns = [("fine_tuning", 0.0, "fine-tuning alone")] + [
        (key, drop, f"{name}, drop {drop:g}") for key, name in (("fine_pruning", "fine-pruning"),
                                                              ("random_fine_tuning", "random pruning + FT"))
        for drop in DROPS]

    def pivot(metric: str) -> str:
        body = []
        for epochs in [0, *EPOCHS]:
            label = "0 (no fine-tuning: B, B')" if epochs == 0 else str(epochs)
            body.append([label] + [_ms(by_key[(k, d, epochs)][metric]) + _diverged(by_key[(k, d, epochs)])
                                   for k, d, _ in columns])
        return rf.md_table(["epochs"] + [c[2] for c in columns], body)

    def channels(s: dict, criterion: str, drop: float) -> str:
        t = next(t for t in s["pruning"][criterion] if t["drop"] == drop)
        return str(t["channels_pruned"]) if t["reached"] else "not reached"

    build = rf.md_table(
        ["scenario seed", "B clean test acc (%)", "B test ASR (%)"]
        + [f"{c} pruning: channels at drop {d:g}" for c in CRITERIA for d in DROPS],
        [[s["seed"], f"{s['b_test_acc']:.2f}", f"{s['b_test_asr']:.2f}"]
         + [channels(s, c, d) for c in CRITERIA for d in DROPS] for s in per_seed])
    full_rows = []
    names = dict(DEFENSES)
    unfinetuned = {"fine_tuning": "B (no defense)", "fine_pruning": "pruning alone (activation): B'",
                   "random_fine_tuning": "random pruning alone: B'"}
    for r in sorted(rows, key=lambda r: ([k for k, _ in DEFENSES].index(r["defense"]), r["drop"], r["epochs"])):
        n = r["channels_pruned"]["n"]
        drop = f"{r['drop']:g}" + ("" if n == len(seeds) else f" (reached at {n} of {len(seeds)} seeds)")
        worst = f"{r['acc']['min']:.2f} / {r['asr']['max']:.2f}" if n else "-"
        full_rows.append([(unfinetuned if r["epochs"] == 0 else names)[r["defense"]], drop, _ms(r["channels_pruned"], 1), r["epochs"],
                          _ms(r["acc"]) + _diverged(r),
                          _ms(r["asr"]), _ms(r["der"], 3), worst, _ms(r["g_acc"]), _ms(r["g_asr"]),
                          _ms(r["g_der"], 3)])
    full = rf.md_table(["defense", "accuracy drop (pp)", "channels pruned", "epochs", "clean acc (%)", "ASR (%)", "DER",
                        "worst seed: acc / ASR (%)", "G clean acc (%)", "G ASR (%)", "G DER"], full_rows,
                       align="lrrrrrrrrrr")
    sec = {k: v["mean"] for k, v in summary["seconds"].items()}
    agree = ("The drop-0 cells of the activation and the random run agree at every seed (the same fine-tuning of the "
             "same B)." if summary["drop0_runs_agree"] else
             "WARNING: the drop-0 cells of the activation and the random run differ at some seed (see the .json).")
    return (
        f"Attack `{attack}`, scenario seeds {', '.join(map(str, seeds))} (`dataset.scenario.seed=S`; seed 0, the "
        f"development instance, is not among them), mean ± sample std over the {len(seeds)} seeds, scores on each "
        f"scenario's test digits; DER against the unpruned B of the same seed. "
        f"`python -m defense.run experiment=finetune_ablation prune.drops=[{','.join(f'{d:g}' for d in DROPS)}] "
        f"ablation.epochs=[{','.join(map(str, EPOCHS))}] ablation.learning_rate=[{LEARNING_RATES[0]:g}]` with "
        f"`prune.criterion=activation` (fine-pruning) and `prune.criterion=random`: the fine-tuning of "
        f"`defense=fine_pruning` (SGD, momentum 0.9, cosine decay to 0 over the budget, 2-pixel shifts, the clean "
        f"validation digits) shortened to {', '.join(map(str, EPOCHS))} epochs, applied to B (fine-tuning alone) "
        f"and to B' at the {' and '.join(f'{d:g}' for d in DROPS)}-point accuracy drops. Epochs 0: no "
        f"fine-tuning, i.e. B itself and the pruned B' (pruning alone).\n\n"
        f"The backdoored B of each seed and the channels of the pruned layer removed at each threshold:\n\n{build}\n\n"
        f"A cell marked \"(k diverged)\" left out the k seeds whose fine-tuning diverged by the package's rule "
        f"(defense/core/divergence.py: a loss that is not finite, or clean accuracy at chance on the held-out "
        f"clean validation images); their scores are never reported.\n\n"
        f"Test ASR (%) of the defended network (B'' after fine-tuning; B or B' at 0 epochs), learning rate "
        f"{LEARNING_RATES[0]:g}:\n\n{pivot('asr')}\n\n"
        f"Clean test accuracy (%) of the same networks:\n\n{pivot('acc')}\n\n"
        f"Every cell, the network itself and the repaired G (B's label where B and the network agree, "
        f"\"backdoored\" where they differ); worst seed: the lowest clean accuracy and the highest ASR over the "
        f"seeds:\n\n{full}\n\n{agree} "
        f"Time per seed on this machine (mean): scenario build {sec.get('scenario_build') or 0:.0f} s (once; "
        f"cached afterwards), the activation run {sec.get('activation_run') or 0:.0f} s, the random run "
        f"{sec.get('random_run') or 0:.0f} s."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                        help="scenario seeds (dataset.scenario.seed); 0 is the development instance")
    parser.add_argument("--attack", default="badnets",
                        help="the scenario's attack (dataset.scenario.attack); default badnets, the embedded BadNets")
    parser.add_argument("--reuse", action="store_true",
                        help="take a seed's numbers from <out>/seed_S/seed_result.json when an earlier run of this "
                             "script with the same settings wrote it (the run folders stay as they were)")
    parser.add_argument("--out", default=None,
                        help="folder for the run folders (default outputs/experiments/finetune_ablation_seeds[_ATTACK])")
    args = parser.parse_args(argv)
    if 0 in args.seeds:
        parser.error("seed 0 is the development instance the fine-tuning settings were chosen on; report other seeds")
    name = results_name(args.attack)
    out = Path(args.out or rf.REPO / "outputs" / "experiments" / name)
    import defense.pipeline.schemas  # noqa: F401  (registers the config schemas before any compose)
    from defense.core.errors import DefenseError

    try:
        rf.compose([*BASE, *attack_overrides(args.attack)])
    except Exception as err:  # an attack (or a dataset.scenario.attack key) this checkout does not know
        if args.attack == "badnets":
            raise
        print(f"error: --attack {args.attack}: {str(err).splitlines()[0]} (dataset.scenario.attack lists the attacks "
              f"of conf/dataset)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    settings = {"epochs": EPOCHS, "learning_rates": LEARNING_RATES, "drops": DROPS, "criteria": list(CRITERIA),
                "attack": args.attack}
    from defense.scenario.build import ScenarioTooWeak

    per_seed, skipped = [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        saved = out / f"seed_{seed}" / "seed_result.json"
        if args.reuse and saved.is_file():
            found = json.loads(saved.read_text())
            if found.get("settings") == settings:
                per_seed.append(found["record"])
                print(f"seed {seed}: reused {saved}", flush=True)
                continue
        try:
            per_seed.append(run_seed(seed, args.attack, out))
        except ScenarioTooWeak as err:  # the builder's check failed: named in the results, left out of the means
            skipped.append(rf.too_weak_record(seed, err))
            print(f"seed {seed}: scenario too weak, left out: {skipped[-1]['error']}", flush=True)
            continue
        except DefenseError as err:  # e.g. an attack the scenario builder does not know: one line, exit 2
            print(f"error: {err}", file=sys.stderr)
            return 2
        saved.write_text(json.dumps(rf._clean({"settings": settings, "record": per_seed[-1]}), indent=1) + "\n")
        print(f"seed {seed} done in {time.perf_counter() - t0:.0f} s", flush=True)
    if not per_seed:
        print("error: no scenario seed passed the build check; choose others with --seeds", file=sys.stderr)
        return 2
    data = {"seeds": [s["seed"] for s in per_seed], "too_weak": skipped, "settings": settings, "std": "sample (n - 1)",
            "cache": os.environ.get("BACKDOOR_PRUNE_CACHE", "~/.cache/backdoor-prune"),
            "seconds": round(time.perf_counter() - started, 1)}
    summary = summarize(per_seed)
    body = "\n\n".join(filter(None, [markdown(per_seed, summary, args.attack), rf.too_weak_md(skipped)]))
    rf.write_results(name, body, {**data, "summary": summary, "per_seed": per_seed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
