"""Fine-pruning, fine-tuning alone and pruning alone on fresh instances of the embedded scenario.

    python experiments/fine_pruning_seeds.py                  # scenario seeds 1-5
    python experiments/fine_pruning_seeds.py --seeds 1 2      # fewer

The `experiment=fine_pruning` preset was fixed on the development instance (the embedded scenario
with `dataset.scenario.seed=0`). This study runs it, never re-tuned, on other instances: for every
seed S the scenario is built anew with `dataset.scenario.seed=S` (another split of the digits, other
poisoned training digits, another trained B) and two runs go through `defense.run.run_defense`:

  python -m defense.run experiment=fine_pruning dataset.scenario.seed=S               # fine-pruning
  python -m defense.run experiment=fine_pruning dataset.scenario.seed=S prune.drops=[0]  # fine-tuning alone

The first gives pruning alone (G(B, B') at each accuracy drop) and fine-pruning (B'' and
G(B, B'')); the second fine-tunes the unpruned B with the same settings (no channel pruned), which is
the Fine-Pruning paper's control: does pruning help fine-tuning? Every score is on the scenario's
test digits; DER is against the unpruned B of the same seed. Writes
experiments/results/fine_pruning_seeds.md (mean ± sample std over the seeds) and .json (per seed).
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

NAME = "fine_pruning_seeds"
BASE = ["experiment=fine_pruning", "tracking=none", "progress=false"]


def run_seed(seed: int, out_dir: Path) -> dict:
    from defense.core import metrics
    from defense.run import run_defense
    from defense.scenario.build import ensure_scenario, read_metadata

    fp_cfg = rf.compose([*BASE, f"dataset.scenario.seed={seed}"])
    scenario = read_metadata(ensure_scenario(fp_cfg.dataset.scenario))
    t0 = time.perf_counter()
    fp = run_defense(fp_cfg, out_dir / f"seed_{seed}" / "fine_pruning")
    t1 = time.perf_counter()
    ft_cfg = rf.compose([*BASE, f"dataset.scenario.seed={seed}", "prune.drops=[0]"])
    ft = run_defense(ft_cfg, out_dir / f"seed_{seed}" / "fine_tuning")
    t2 = time.perf_counter()

    base = fp["curves"][0]
    b_acc, b_asr = base["pruned_test_acc"], base["pruned_test_asr"]
    rows = []
    for row in fp["summary"]:
        if row.get("point", "drop") != "drop":  # the accuracy-drop rows only (not the defender's / oracle's)
            continue
        reached = bool(row["reached"])
        def get(key, row=row, reached=reached):
            return float(row[key]) if reached else float("nan")

        rows.append({
            "drop": float(row["drop"]),
            "reached": reached,
            "channels_pruned": int(row["channels_pruned"]) if reached else None,
            "pruning_g_acc": get("test_acc"),
            "pruning_g_asr": get("test_asr"),
            "pruning_g_der": metrics.defense_effectiveness_rating(b_acc, get("test_acc"), b_asr, get("test_asr"))
            if reached else float("nan"),
            "fp_acc": get("ft_test_acc"),
            "fp_asr": get("ft_test_asr"),
            "fp_der": get("ft_der"),
            "fp_g_acc": get("ft_g_test_acc"),
            "fp_g_asr": get("ft_g_test_asr"),
            "fp_g_der": get("ft_g_der"),
        })
    (ft_row,) = ft["summary"]
    if int(ft_row["channels_pruned"]) != 0:
        raise RuntimeError(f"seed {seed}: prune.drops=[0] pruned {ft_row['channels_pruned']} channels, expected 0")
    return {
        "seed": seed,
        "scenario": {"key": scenario.get("key"), **{k: scenario["metrics"][k] for k in sorted(scenario["metrics"])}},
        "seconds": {"scenario_build": scenario.get("build_seconds"), "fine_pruning_run": round(t1 - t0, 1),
                    "fine_tuning_run": round(t2 - t1, 1)},
        "b_test_acc": b_acc,
        "b_test_asr": b_asr,
        "fine_tuning_alone": {
            "acc": float(ft_row["ft_test_acc"]), "asr": float(ft_row["ft_test_asr"]),
            "der": float(ft_row["ft_der"]), "g_acc": float(ft_row["ft_g_test_acc"]),
            "g_asr": float(ft_row["ft_g_test_asr"]), "g_der": float(ft_row["ft_g_der"]),
        },
        "thresholds": rows,
    }


stats = rf.stats  # mean, sample std, min, max and n over the seeds


def summarize(per_seed: list[dict]) -> dict:
    """The numbers the tables show, computed from the per-seed values (also written to the json)."""
    build = {key: stats([s["scenario"][key] for s in per_seed]) for key in ("clean_test_accuracy", "test_asr")}
    rows = [{"network": "B (backdoored, no defense)", "drop": None, "channels_pruned": stats([0] * len(per_seed)),
             "acc": stats([s["b_test_acc"] for s in per_seed]), "asr": stats([s["b_test_asr"] for s in per_seed]),
             "der": stats([])}]
    ft = [s["fine_tuning_alone"] for s in per_seed]
    for label, prefix in (("fine-tuning alone: B'' of the unpruned B", ""), ("fine-tuning alone: G(B, B'')", "g_")):
        rows.append({"network": label, "drop": 0.0, "channels_pruned": stats([0] * len(per_seed)),
                     **{k: stats([f[prefix + k] for f in ft]) for k in ("acc", "asr", "der")}})
    drops = [r["drop"] for r in per_seed[0]["thresholds"]]
    for label, prefix in (("pruning alone: G(B, B')", "pruning_g_"), ("fine-pruning: B''", "fp_"),
                          ("fine-pruning: G(B, B'')", "fp_g_")):
        for i, drop in enumerate(drops):
            rows.append({"network": label, "drop": drop,
                         "channels_pruned": stats([s["thresholds"][i]["channels_pruned"] for s in per_seed]),
                         **{k: stats([s["thresholds"][i][prefix + k] for s in per_seed]) for k in ("acc", "asr", "der")}})
    seconds = {key: stats([s["seconds"][key] for s in per_seed])
               for key in ("scenario_build", "fine_pruning_run", "fine_tuning_run")}
    return {"seeds": [s["seed"] for s in per_seed], "build": build, "rows": rows, "seconds": seconds}


def _ms(st: dict, digits: int = 2) -> str:
    if not st["n"]:
        return "-"
    if st["std"] is None:
        return f"{st['mean']:.{digits}f}"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def markdown(per_seed: list[dict], summary: dict) -> str:
    seeds = summary["seeds"]
    build = rf.md_table(
        ["scenario seed", "B clean test acc (%)", "B test ASR (%)"],
        [[s["seed"], f"{s['scenario']['clean_test_accuracy']:.2f}", f"{s['scenario']['test_asr']:.2f}"]
         for s in per_seed]
        + [["mean ± std", _ms(summary["build"]["clean_test_accuracy"]), _ms(summary["build"]["test_asr"])]],
    )
    header = ["defended network", "accuracy drop (pp)", "channels pruned", "clean test acc (%)", "test ASR (%)",
              "DER", "worst seed: acc / ASR (%)"]
    rows = []
    for row in summary["rows"]:
        n = row["acc"]["n"]
        drop = "-" if row["drop"] is None else f"{row['drop']:g}"
        if n < len(seeds):
            drop += f" (reached at {n} of {len(seeds)} seeds)"
        worst = f"{row['acc']['min']:.2f} / {row['asr']['max']:.2f}" if n else "-"
        rows.append([row["network"], drop, _ms(row["channels_pruned"], 1), _ms(row["acc"]), _ms(row["asr"]),
                     _ms(row["der"], 3), worst])
    table = rf.md_table(header, rows, align="lrrrrrr")
    sec = {k: v["mean"] for k, v in summary["seconds"].items()}
    return (
        f"Scenario seeds {', '.join(map(str, seeds))} (`dataset.scenario.seed=S`; seed 0, the development "
        f"instance, is not among them), mean ± sample std over the {len(seeds)} seeds, scores on each "
        f"scenario's test digits.\n\n"
        f"The scenario builds (the backdoored B of each seed, as `defense.scenario.build` measured it):\n\n{build}\n\n"
        f"`experiment=fine_pruning` on each (fine-tuning alone: the same preset with `prune.drops=[0]`; "
        f"DER against the unpruned B of the same seed; worst seed: the lowest clean accuracy and the highest ASR "
        f"over the seeds):\n\n{table}\n\n"
        f"Time per seed on this machine (mean): scenario build {sec['scenario_build']:.0f} s, the fine-pruning "
        f"run (4 thresholds, each fine-tuned) {sec['fine_pruning_run']:.0f} s, fine-tuning alone "
        f"{sec['fine_tuning_run']:.0f} s."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                        help="scenario seeds (dataset.scenario.seed); 0 is the development instance")
    parser.add_argument("--out", default=str(rf.REPO / "outputs" / "experiments" / NAME),
                        help="folder for the run folders (default outputs/experiments/fine_pruning_seeds)")
    args = parser.parse_args(argv)
    if 0 in args.seeds:
        parser.error("seed 0 is the development instance the preset was chosen on; report other seeds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    from defense.scenario.build import ScenarioTooWeak

    per_seed, skipped = [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        try:
            per_seed.append(run_seed(seed, Path(args.out)))
        except ScenarioTooWeak as err:  # the builder's check failed: named in the results, left out of the means
            skipped.append(rf.too_weak_record(seed, err))
            print(f"seed {seed}: scenario too weak, left out: {skipped[-1]['error']}", flush=True)
            continue
        print(f"seed {seed} done in {time.perf_counter() - t0:.0f} s", flush=True)
    if not per_seed:
        print("error: no scenario seed passed the build check; choose others with --seeds", file=sys.stderr)
        return 2
    data = {"seeds": [s["seed"] for s in per_seed], "too_weak": skipped, "preset": "experiment=fine_pruning", "std": "sample (n - 1)",
            "cache": os.environ.get("BACKDOOR_PRUNE_CACHE", "~/.cache/backdoor-prune"),
            "seconds": round(time.perf_counter() - started, 1)}
    summary = summarize(per_seed)
    rf.write_results(NAME, "\n\n".join(filter(None, [markdown(per_seed, summary), rf.too_weak_md(skipped)])), {**data, "summary": summary, "per_seed": per_seed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
