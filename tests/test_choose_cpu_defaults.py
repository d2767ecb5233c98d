"""benchmarks/choose_cpu_defaults.py: the pre-registered rule on hand-made val Dice (points)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import choose_cpu_defaults as rule

SEEDS = [1337, 2024]
SELECTORS = [*rule.PATH_ROWS.values(), rule.DROPOUT, *rule.NETWORK_ROWS.values()]
NAMES = {sel: f"row {sel}" for sel in SELECTORS}  # the plan's names do not matter to the rule


STEP_TWO = {
    "dropout": rule.DROPOUT,
    **{
        key: rule.NETWORK_ROWS[net] for key, net in (("teacher", "EMA teacher"), ("rectified", "rectified EMA teacher"))
    },
}


def _dice(crln: dict, mt: dict, **step_two: tuple[float, float]) -> dict[str, dict[int, float]]:
    """Row name -> seed -> val Dice: CRLN's and the mean teacher's per data path, plus the step-2 rows given."""
    dice = {}
    for (path, method), sel in rule.PATH_ROWS.items():
        dice[NAMES[sel]] = dict(zip(SEEDS, (crln if method == "CRLN" else mt)[path]))
    for key, values in step_two.items():
        dice[NAMES[STEP_TWO[key]]] = dict(zip(SEEDS, values))
    return dice


STORED = {rule.AS_STORED: (66.0, 68.0), rule.ZSCORE: (70.0, 70.0), rule.AUTHORS: (74.0, 76.0)}
MT = {rule.AS_STORED: (60.0, 62.0), rule.ZSCORE: (64.0, 66.0), rule.AUTHORS: (56.0, 58.0)}


def test_scores_are_the_mean_of_crln_and_the_mean_teacher_over_seeds():
    decision = rule.decide(_dice(STORED, MT), NAMES, SEEDS, 3.0)
    # as stored: CRLN 67, MT 61 -> 64; z-score: 70, 65 -> 67.5; authors': 75, 57 -> 66
    assert decision.scores == pytest.approx({rule.AS_STORED: 64.0, rule.ZSCORE: 67.5, rule.AUTHORS: 66.0})
    assert decision.path == rule.ZSCORE  # +3.5; the authors' path is +2 only, even though CRLN gains 8 there
    assert decision.dropout is None and decision.network is None  # step 2 only when the authors' path wins
    assert "| z-score | 70.00 (70.00, 70.00) | 65.00 (64.00, 66.00) | 67.50 | +3.50 |" in decision.lines


def test_a_gain_below_the_margin_keeps_the_stored_path():
    decision = rule.decide(_dice(STORED, MT), NAMES, SEEDS, 4.0)
    assert decision.path == rule.AS_STORED


def test_the_highest_of_the_paths_above_the_margin_wins_and_step_two_follows():
    mt = {**MT, rule.AUTHORS: (66.0, 66.0)}  # authors': (75 + 66) / 2 = 70.5 > z-score 67.5
    dice = _dice(STORED, mt, dropout=(79.0, 78.0), teacher=(80.0, 79.0), rectified=(83.0, 81.0))
    decision = rule.decide(dice, NAMES, SEEDS, 3.0)
    assert decision.path == rule.AUTHORS
    assert decision.dropout is True  # 78.5 >= 75 + 3
    assert decision.network == "rectified EMA teacher"  # 82 >= 78.5 + 3; the plain teacher's 79.5 is not
    small = rule.decide(
        _dice(STORED, mt, dropout=(77.0, 77.0), teacher=(79.0, 79.0), rectified=(79.0, 80.0)), NAMES, SEEDS, 3.0
    )
    assert small.dropout is False and small.network == "student"


def test_missing_seeds_are_named_and_give_no_verdict():
    dice = _dice(STORED, MT)
    del dice[NAMES[rule.PATH_ROWS[rule.ZSCORE, "CRLN"]]][2024]
    decision = rule.decide(dice, NAMES, SEEDS, 3.0)
    assert decision.path is None and decision.missing == [f"{NAMES[rule.PATH_ROWS[rule.ZSCORE, 'CRLN']]} (seed 2024)"]
    mt = {**MT, rule.AUTHORS: (66.0, 66.0)}
    waiting = rule.decide(_dice(STORED, mt), NAMES, SEEDS, 3.0)  # the authors' path wins; step 2 rows absent
    assert waiting.path == rule.AUTHORS and waiting.dropout is None and len(waiting.missing) == 6


def test_a_diverged_run_is_named_as_such_among_those_waited_for():
    # crln bench does not train a recorded divergence again: waiting for it plainly would be waiting forever.
    line = rule.waiting_line(["A (seed 1)", "B (seed 2)"], {"B (seed 2)": "diverged at iteration 40"})
    assert (
        line == "No verdict yet; waiting for: A (seed 1); B (seed 2): diverged at iteration 40, see its diverged.json"
    )


def test_the_selectors_name_one_row_each_of_the_fidelity_plan():
    from crln.bench import load_plan, select_rows

    plan = load_plan(Path(__file__).resolve().parents[1] / "benchmarks" / "plans" / "la80_cpu_fidelity.yaml")
    rows = [select_rows(plan, [sel]) for sel in SELECTORS]
    assert all(len(r) == 1 for r in rows) and len(set().union(*rows)) == len(SELECTORS)
