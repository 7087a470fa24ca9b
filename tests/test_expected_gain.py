"""The expected-gain rules of the recommended configuration, on hand-worked cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tbc_integrations import ContractError
from tbc_integrations.adaptive import (
    RoundHistory,
    expected_gain,
    shadow_price,
    worth_another_round,
)
from tbc_integrations.bench import RECOMMENDED, PaperConfig, main, run_paper, run_tiers


def test_history_reads_half_before_any_run() -> None:
    h = RoundHistory()
    assert h.first("x") == 0.5 and h.lift("x") == 0.5 and h.cost("x", default=70) == 70.0


def test_history_counts_first_rounds_lifts_and_costs_by_hand() -> None:
    h = RoundHistory()
    h.observe("a", [False, False, True], [100, 120, 80])  # first: 0/1; lifts: 0/1, 1/1
    h.observe("a", [True, True], [50, 50])  # first: 1/1; no wrong round followed
    assert h.first("a") == pytest.approx((1 + 1) / (2 + 2))
    assert h.lift("a") == pytest.approx((1 + 1) / (2 + 2))
    assert h.cost("a", default=0) == pytest.approx(400 / 5)
    h.observe("a", [], [])  # an agent that never ran teaches nothing
    assert h.first("a") == pytest.approx(0.5)
    with pytest.raises(ContractError):
        h.observe("a", [True], [])


@pytest.mark.parametrize(
    ("priority", "confidence", "first", "lift", "gain"),
    [
        (4, None, 0.35, 0.4, 1.4),  # before a round: priority x first
        (4, 0.75, 0.35, 0.4, 0.4),  # 4 x 0.25 x 0.4
        (2, 1.0, 0.5, 0.9, 0.0),  # certain: nothing to win
        (1, 0.0, 0.5, 0.5, 0.5),  # surely wrong: the whole lift
    ],
)
def test_expected_gain_by_hand(
    priority: int, confidence: float | None, first: float, lift: float, gain: float
) -> None:
    assert expected_gain(priority, confidence, first, lift) == pytest.approx(gain)


def test_shadow_price_rises_as_the_budget_runs_down() -> None:
    assert shadow_price(10.0, 4000) == pytest.approx(0.0025)
    assert shadow_price(10.0, 2000, kappa=0.1) == pytest.approx(0.0005)
    assert shadow_price(10.0, 1000) > shadow_price(10.0, 2000)
    assert shadow_price(1.0, 0) == math.inf


def test_stopping_rule_by_hand() -> None:
    # a round of 100 tokens at 0.0025 a token must win at least 0.25
    assert worth_another_round(0.25, 100, 0.0025)
    assert not worth_another_round(0.24, 100, 0.0025)
    assert not worth_another_round(10.0, 1, math.inf)  # nothing left: never


def test_oracle_keeps_every_answer_and_no_policy_passes_it() -> None:
    rows = run_paper(PaperConfig(tasks=30, seed=5))["policies"]
    oracle = rows["oracle"]
    assert oracle["preservation"] == 1.0 and oracle["refusals"] == 0
    for name, row in rows.items():
        assert row["accuracy"] <= oracle["accuracy"], name


def test_recommended_stays_within_the_budget() -> None:
    r = run_paper(PaperConfig(tasks=30, seed=5, tightness=0.4))["policies"]
    assert r[RECOMMENDED]["tokens"] <= 0.4 * r["unconstrained"]["tokens"] * 1.05


def test_tiers_rows_degrade_against_refuse() -> None:
    rows = run_tiers(PaperConfig(tasks=30, seed=5, tightness=0.4))
    assert set(rows) == {"unconstrained", "refuse", "degrade"}
    assert rows["refuse"]["cheap_tokens"] == 0
    assert rows["degrade"]["refusals"] <= rows["refuse"]["refusals"]
    for row in rows.values():
        assert {"tokens", "dollars", "accuracy", "cheap_tokens"} <= set(row)
    assert rows["unconstrained"]["dollars"] == pytest.approx(
        rows["unconstrained"]["tokens"] * 10.0 / 1e6, abs=1e-4
    )


def test_command_line_tiers_and_recommended_in_json(tmp_path: Path) -> None:
    out = tmp_path / "paper.json"
    assert main(["paper", "--tasks", "10", "--tiers", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["recommended"] == RECOMMENDED and RECOMMENDED in data["policies"]
    assert "oracle" in data["policies"] and set(data["tiers"]) >= {"refuse", "degrade"}
