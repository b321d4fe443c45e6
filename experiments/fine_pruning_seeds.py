"""Fine-pruning, fine-tuning alone and pruning alone on fresh instances of the embedded scenario.

    python experiments/fine_pruning_seeds.py                  # scenario seeds 1-5
    python experiments/fine_pruning_seeds.py --seeds 1 2      # fewer

The `experiment=fine_pruning` preset was fixed on the development instance (the embedded scenario
with `dataset.scenario.seed=0`). This study runs it, never re-tuned, on other instances: for every
seed S the scenario is built anew with `dataset.scenario.seed=S` (another split of the digits, other
poisoned training digits, another trained B) and one run goes through `defense.run.run_defense`:

  python -m defense.run experiment=fine_pruning dataset.scenario.seed=S prune.drops=[0,2,4,10,30]

The preset's drops with 0 in front: the drop-0 row fine-tunes the unpruned B with the preset's
settings (no channel pruned), which is the Fine-Pruning paper's control, fine-tuning alone (does pruning
help fine-tuning?), and the same as `prune.drops=[0]` in a run of its own; one run ranks and sweeps once
for both. The other rows give pruning alone (G(B, B') at each accuracy drop) and fine-pruning (B'' and
G(B, B'')), and the defender's point (defense/pipeline/select.py: the drop and the fine-tuning chosen on
held-out clean validation images) is reported beside them. Every score is on the scenario's
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
DROPS = (0, 2, 4, 10, 30)  # 0: fine-tuning alone; 2, 4, 10, 30: the preset's (and Lab 3's) thresholds


def run_seed(seed: int, out_dir: Path) -> dict:
    from defense.core import metrics
    from defense.run import run_defense
    from defense.scenario.build import ensure_scenario, read_metadata

    fp_cfg = rf.compose([*BASE, f"dataset.scenario.seed={seed}", f"prune.drops=[{','.join(map(str, DROPS))}]"])
    scenario = read_metadata(ensure_scenario(fp_cfg.dataset.scenario))
    t0 = time.perf_counter()
    fp = run_defense(fp_cfg, out_dir / f"seed_{seed}" / "fine_pruning")
    t1 = time.perf_counter()

    base = fp["curves"][0]
    b_acc, b_asr = base["pruned_test_acc"], base["pruned_test_asr"]

    def scores(row: dict) -> dict:
        reached = bool(row.get("reached"))

        def get(key):  # a diverged fine-tuning's scores are blank (NaN) in the summary: never a defense's score
            value = row.get(key)
            return float(value) if reached and value not in (None, "") else float("nan")

        return {
            "drop": float(row["drop"]),
            "reached": reached,
            "diverged": bool(row.get("diverged")),
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
        }

    drop_rows = [r for r in fp["summary"] if r.get("point", "drop") == "drop"]
    (ft_row,) = [r for r in drop_rows if float(r["drop"]) == 0]
    if int(ft_row["channels_pruned"]) != 0:
        raise RuntimeError(f"seed {seed}: the drop-0 row pruned {ft_row['channels_pruned']} channels, expected 0")
    rows = [scores(r) for r in drop_rows if float(r["drop"]) != 0]
    (defender,) = [r for r in fp["summary"] if r.get("point") == "defender"]
    ft = scores(ft_row)
    return {
        "seed": seed,
        "scenario": {"key": scenario.get("key"), **{k: scenario["metrics"][k] for k in sorted(scenario["metrics"])}},
        "seconds": {"scenario_build": scenario.get("build_seconds"), "fine_pruning_run": round(t1 - t0, 1)},
        "b_test_acc": b_acc,
        "b_test_asr": b_asr,
        "fine_tuning_alone": {"acc": ft["fp_acc"], "asr": ft["fp_asr"], "der": ft["fp_der"],
                              "g_acc": ft["fp_g_acc"], "g_asr": ft["fp_g_asr"], "g_der": ft["fp_g_der"],
                              "diverged": ft["diverged"]},
        "defender": {**scores(defender), "ft_within_budget": defender.get("ft_within_budget")},
        "thresholds": rows,
    }


stats = rf.stats  # mean, sample std, min, max and n over the seeds


def summarize(per_seed: list[dict]) -> dict:
    """The numbers the tables show, computed from the per-seed values (also written to the json)."""
    build = {key: stats([s["scenario"][key] for s in per_seed]) for key in ("clean_test_accuracy", "test_asr")}
    rows = [{"network": "B (backdoored, no defense)", "drop": None, "channels_pruned": stats([0] * len(per_seed)),
             "diverged": 0,
             "acc": stats([s["b_test_acc"] for s in per_seed]), "asr": stats([s["b_test_asr"] for s in per_seed]),
             "der": stats([])}]
    def scored(label: str, drop, found: list[dict], prefix: str) -> dict:
        """One table row over the seeds: `found` holds each seed's entry, `prefix` picks its network's scores."""
        return {"network": label, "drop": drop,
                "channels_pruned": stats([t.get("channels_pruned", 0) for t in found]),
                "diverged": sum(bool(t.get("diverged")) for t in found) if prefix != "pruning_g_" else 0,
                **{k: stats([t[prefix + k] for t in found]) for k in ("acc", "asr", "der")}}

    ft = [s["fine_tuning_alone"] for s in per_seed]
    rows += [scored(label, 0.0, ft, prefix) for label, prefix in (
        ("fine-tuning alone: B'' of the unpruned B", ""), ("fine-tuning alone: G(B, B'')", "g_"))]
    drops = [r["drop"] for r in per_seed[0]["thresholds"]]
    for label, prefix in (("pruning alone: G(B, B')", "pruning_g_"), ("fine-pruning: B''", "fp_"),
                          ("fine-pruning: G(B, B'')", "fp_g_")):
        rows += [scored(label, drop, [s["thresholds"][i] for s in per_seed], prefix) for i, drop in enumerate(drops)]
    rows += [scored(label, "defender", [s["defender"] for s in per_seed], prefix) for label, prefix in (
        ("defender's point: G(B, B')", "pruning_g_"), ("defender's point: B''", "fp_"),
        ("defender's point: G(B, B'')", "fp_g_"))]
    seconds = {key: stats([s["seconds"][key] for s in per_seed])
               for key in ("scenario_build", "fine_pruning_run")}
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
        n, reached = row["acc"]["n"], row["channels_pruned"]["n"]
        drop = "-" if row["drop"] is None else "held-out rule" if row["drop"] == "defender" else f"{row['drop']:g}"
        if reached < len(seeds):
            drop += f" (reached at {reached} of {len(seeds)} seeds)"
        if row.get("diverged"):
            drop += f" (fine-tuning diverged at {row['diverged']} of {len(seeds)} seeds: not scored)"
        elif n < reached:
            drop += f" (scored at {n} of {len(seeds)} seeds)"
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
        f"`experiment=fine_pruning` with `prune.drops=[{','.join(map(str, DROPS))}]` on each (fine-tuning alone: "
        f"the drop-0 row, the unpruned B fine-tuned with the preset's settings; the defender's point: the drop and "
        f"the fine-tuning chosen on held-out clean validation images, `select.max_drop` points below B there, "
        f"where no fine-tuning within that budget leaves B' itself, not fine-tuned, and B'' unscored; "
        f"DER against the unpruned B of the same seed; worst seed: the lowest clean accuracy and the highest ASR "
        f"over the seeds):\n\n{table}\n\n"
        f"Time per seed on this machine (mean): scenario build {sec['scenario_build']:.0f} s (once; cached "
        f"afterwards), the run (ranking, sweep, the drop-0 row and the 4 thresholds each fine-tuned, the "
        f"defender's and the oracle's points with their fine-tuning grids) {sec['fine_pruning_run']:.0f} s."
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
    body = "\n\n".join(filter(None, [markdown(per_seed, summary), rf.too_weak_md(skipped)]))
    rf.write_results(NAME, body, {**data, "summary": summary, "per_seed": per_seed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
