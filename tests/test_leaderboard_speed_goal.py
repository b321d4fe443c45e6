"""experiments/leaderboard.py states the speed goal of the default leaderboard (30 min wall clock for the preset's axes on
2 cores, scenario builds included) as met or missed, with the cold cache's build time set apart; the values are
computed here by hand."""

from __future__ import annotations

import importlib.util
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
spec = importlib.util.spec_from_file_location("leaderboard_study", REPO / "experiments" / "leaderboard.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def test_a_cold_default_leaderboard_over_the_goal_is_reported_missed_with_its_builds_apart():
    profiles = [{"setup": 40.0}, {"setup": 20.0}, {"setup": 0.5}, {"setup": 0.5}]
    goal = study.speed_goal(3600.0, profiles, default=True, n_jobs=2, before=3, after=5)
    assert goal["goal_met"] is False
    assert goal["times_goal"] == 2.0
    assert goal["scenarios_built"] == 2
    assert goal["setup_seconds"] == 61.0
    assert goal["warm_estimate_seconds"] == 3600.0 - 61.0 / 2
    text = " ".join(study.speed_goal_text(goal, 3600.0))
    assert "MISSED (60.0 min, 2.00x the goal)" in text
    assert "2 scenarios built" in text and "59.5 min" in text


def test_a_warm_default_leaderboard_within_the_goal_is_met_and_another_leaderboard_has_no_goal():
    goal = study.speed_goal(1700.0, [{"setup": 0.1}], default=True, n_jobs=2, before=25, after=25)
    assert goal["goal_met"] is True
    text = " ".join(study.speed_goal_text(goal, 1700.0))
    assert ": met." in text and "warm (no scenario built)" in text
    assert study.speed_goal(1700.0, [], default=False, n_jobs=2, before=0, after=0) is None
    assert study.speed_goal_text(None, 1700.0) == []


def test_a_reduced_board_has_no_verdict_and_a_scaled_estimate_of_the_full_board():
    board = "the default leaderboard on `dataset.scenario.arch=preact_resnet`"
    goal = study.reduced_goal(900.0, jobs=40, full_jobs=200, goal_seconds=3600.0, board=board)
    assert goal["scaled_estimate_seconds"] == 4500.0  # 900 s x 200 / 40
    assert goal["times_goal_estimate"] == 1.25
    text = " ".join(study.reduced_goal_text(goal))
    assert "40 of the full board's 200 jobs" in text and "no verdict" in text
    assert "at most 60 min" in text and "about 75 min" in text and "1.2x the goal" in text
    assert "MISSED" not in text and ": met" not in text
    missed = study.speed_goal(4000.0, [], default=True, n_jobs=2, before=0, after=0, goal_seconds=3600.0, board=board)
    assert f"Speed goal: {board} in at most 60 min" in " ".join(study.speed_goal_text(missed, 4000.0))


def test_a_warm_board_estimates_a_cold_cache_from_the_recorded_builds_of_the_scenarios_its_jobs_used(tmp_path):
    import json

    cache = tmp_path / "cache" / "scenarios"
    for key, seconds in (("0123456789abcdef", 50.0), ("fedcba9876543210", 30.0), ("aaaaaaaaaaaaaaaa", 999.0)):
        (cache / key).mkdir(parents=True)
        (cache / key / "scenario.json").write_text(json.dumps({"build_seconds": seconds}))
    sweep = tmp_path / "sweep"
    for job, key in (("0", "0123456789abcdef"), ("1", "0123456789abcdef"), ("2", "fedcba9876543210")):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "run.log").write_text(f"[..][defense.run][INFO] - model badnets_mnist ({cache / key}/bd_net.h5); "
                                             "1000 clean images\n")
    builds = study.scenario_builds(sweep)
    assert builds == {str(cache / "0123456789abcdef"): 50.0, str(cache / "fedcba9876543210"): 30.0}  # not the unused one
    goal = study.speed_goal(1200.0, [], default=True, n_jobs=2, before=3, after=3, builds=builds)
    assert goal["cold_scenarios"] == 2 and goal["cold_build_seconds"] == 80.0
    assert goal["cold_estimate_seconds"] == 1200.0 + 80.0 / 2
    text = " ".join(study.speed_goal_text(goal, 1200.0))
    assert "warm (no scenario built)" in text and "the 2 scenarios the jobs used: 80 s" in text and "20.7 min" in text
    cold = study.speed_goal(1200.0, [{"setup": 60.0}], default=True, n_jobs=2, before=1, after=3, builds=builds)
    assert "cold_estimate_seconds" not in cold  # a cold run measured the builds itself


def test_the_defenses_whose_jobs_alone_took_more_than_the_goal_are_named():
    profiles = ([{"defense": "anp", "total": 1000.0}] * 4 + [{"defense": "fp", "total": 10.0}] * 4
                + [{"defense": "clp", "total": 900.0}] * 4)
    shares = study.defense_shares(profiles, n_jobs=2)
    assert [r["defense"] for r in shares] == ["anp", "clp", "fp"]
    assert shares[0] == {"defense": "anp", "jobs": 4, "job_seconds": 4000.0, "wall_share_seconds": 2000.0}
    goal = study.speed_goal(3900.0, profiles, default=True, n_jobs=2, before=0, after=0)
    assert [r["defense"] for r in goal["over_goal_alone"]] == ["anp"]  # 2000 s > 1800 s; clp's 1800 s is not more
    text = " ".join(study.speed_goal_text(goal, 3900.0))
    assert "`anp`'s 4 jobs alone took 4000 job-seconds, 33.3 min of the workers' time" in text
    assert "`clp`" not in text


def test_a_board_that_built_some_of_its_scenarios_estimates_both_a_warm_and_a_cold_cache():
    builds = {"a": 50.0, "b": 30.0, "c": 40.0}  # recorded build seconds of the three scenarios the jobs used
    goal = study.speed_goal(1000.0, [{"setup": 20.0}, {"setup": 0.5}], default=True, n_jobs=2, before=9, after=10,
                            builds=builds)
    assert goal["warm_estimate_seconds"] == 1000.0 - 20.5 / 2
    assert goal["cold_estimate_seconds"] == 1000.0 - 20.5 / 2 + 120.0 / 2
    text = " ".join(study.speed_goal_text(goal, 1000.0))
    assert "lacked 1 of the 3 scenarios the jobs used (1 built)" in text and "was cold" not in text
    assert "about 16.5 min (an estimate" in text and "120 s as the cache recorded" in text and "about 17.5 min in all" in text
    everything = study.speed_goal(1000.0, [{"setup": 20.0}], default=True, n_jobs=2, before=0, after=3, builds=builds)
    assert "cold_estimate_seconds" not in everything  # every scenario built here: the cold time is the measured one
    assert "The cache was cold (3 scenarios built)" in " ".join(study.speed_goal_text(everything, 1000.0))


def test_a_report_made_again_names_the_run_that_made_the_sweep():
    earlier = {"command": "python experiments/leaderboard.py", "commit": "c739fc56b0db0f6f378aecb6ab2322a8863222ec",
               "machine": {"load_average_at_start": [1.85, 1.45, 1.29]}}
    run = study.sweep_provenance(earlier)
    assert run == {"command": "python experiments/leaderboard.py", "commit": earlier["commit"],
                   "load_average_at_start": [1.85, 1.45, 1.29]}
    assert study.sweep_provenance_text(run) == ("The sweep was run by `python experiments/leaderboard.py` at commit "
                                                "c739fc56b0db, load average 1.85 when it started.")
    again = {**earlier, "command": "python experiments/leaderboard.py --report-again"}
    assert study.sweep_provenance(again) == {}  # that file's header is a report's, not the sweep's
    assert "not recorded" in study.sweep_provenance_text({})
    assert study.sweep_provenance()["commit"] == study.rf.STARTED["commit"]  # this run: taken when it started
