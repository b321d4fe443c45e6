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
