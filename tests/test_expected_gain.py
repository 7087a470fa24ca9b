"""The expected-gain rules of the recommended configuration, on hand-worked cases.

The simulator's scheduler (:mod:`tbc_integrations.adaptive`) and the run-time ledger
policy (:class:`~tbc_integrations.policies.ExpectedGainPolicy`) on every store.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from tbc_integrations import BudgetExceededError, BudgetManager, ContractError
from tbc_integrations.adaptive import (
    RoundHistory,
    best_tier,
    expected_gain,
    shadow_price,
    worth_another_round,
)
from tbc_integrations.bench import (
    RECOMMENDED,
    AgentSpec,
    PaperConfig,
    _expected_gain_runs,
    _Task,
    main,
    run_paper,
    run_tiers,
)
from tbc_integrations.policies import Donor, ExpectedGainPolicy, Needy, policy_from_name
from tests.conftest import STORE_KINDS, store_url


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


def test_belief_combines_readings_by_hand() -> None:
    h = RoundHistory()  # first = lift = 0.5: p_1 = 0.5, p_2 = 0.75
    assert h.belief("a", []) is None
    assert h.belief("a", [0.8]) == pytest.approx(0.8)  # one reading is its own posterior
    # LR_1 = odds(0.8) / odds(0.5) = 4, LR_2 = odds(0.9) / odds(0.75) = 3;
    # right at 1: 0.5 x 4 x 3 = 6, at 2: 0.25 x 3 = 0.75, not yet: 0.25 -> 6.75 / 7
    assert h.belief("a", [0.8, 0.9]) == pytest.approx(6.75 / 7)
    # unsure, then sure: 0.5 x 1/4 x 3 = 0.375, 0.75, 0.25 -> 1.125 / 1.375
    assert h.belief("a", [0.2, 0.9]) == pytest.approx(1.125 / 1.375)
    # a reading at its prior says nothing: the prior p_2 comes back
    assert h.belief("a", [0.5, 0.75]) == pytest.approx(0.75)
    assert h.belief("a", [1.0, 1.0]) == pytest.approx(1.0)  # clipped, not a division by zero


def test_oracle_in_budget_by_hand() -> None:
    from tbc_integrations.bench import AgentSpec, _oracle_budget, _Task

    team = (AgentSpec("a", 3, 100, 0.5), AgentSpec("b", 1, 150, 0.5))
    cfg = PaperConfig(tasks=1, rounds=3, decay=0.5, team=team)
    # a is first right at round 2 (0.5 <= 0.6 < 0.75): 200 tokens; b at round 1: 150
    task = _Task({"a": [100, 100, 100], "b": [150, 150, 150]}, {}, {"a": 0.6, "b": 0.1})
    for budget, tokens, correct in ((200, 200, 3), (349, 200, 3), (350, 350, 4), (149, 0, 0)):
        tally = _oracle_budget(cfg, [task], [budget])
        assert (tally.tokens, tally.correct, tally.weight) == (tokens, correct, 4), budget
    hopeless = _Task({"a": [100] * 3, "b": [150] * 3}, {}, {"a": 0.99, "b": 0.1})
    assert _oracle_budget(cfg, [hopeless], [1_000]).tokens == 150  # never right: no spend


def test_shadow_price_rises_as_the_budget_runs_down() -> None:
    assert shadow_price(10.0, 4000) == pytest.approx(0.0025)
    assert shadow_price(10.0, 2000, kappa=0.1) == pytest.approx(0.0005)
    assert shadow_price(10.0, 1000) > shadow_price(10.0, 2000)
    assert shadow_price(1.0, 0) == math.inf


def test_history_hold_is_the_mean_plus_two_deviations_by_hand() -> None:
    h = RoundHistory()
    assert h.hold("a", default=70) == 140.0  # nothing seen: twice the default
    h.observe("a", [False], [90])
    assert h.hold("a", default=70) == 180.0  # one round: twice its cost
    h.observe("a", [False, True], [130, 80])  # mean 100, sample deviation 26.46
    assert h.hold("a", default=70) == pytest.approx(100 + 2 * math.sqrt((100 + 900 + 400) / 2))
    h.observe("b", [True, True, True], [50, 50, 50])
    assert h.hold("b", default=70) == 50.0  # rounds that never vary: their cost


def test_history_optimism_adds_posterior_deviations_by_hand() -> None:
    h = RoundHistory()
    for _ in range(3):
        h.observe("c", [False], [150])  # first: 0 of 3, Beta(1, 4): mean 0.2, var 4/150
    assert h.first("c") == pytest.approx(0.2)
    assert h.first("c", optimism=1.0) == pytest.approx(0.2 + math.sqrt(4 / 150))
    assert h.first("c", optimism=100.0) == 1.0  # capped
    assert h.lift("c", optimism=1.0) == pytest.approx(0.5 + math.sqrt(1 / 12))  # Beta(1, 1)
    # the belief stays on the means whatever the scheduler's optimism
    assert h.belief("c", [0.2]) == pytest.approx(0.2)


def _one_agent_task(priority: int, cost: int, luck: float) -> tuple[PaperConfig, _Task]:
    spec = AgentSpec("solo", priority, cost, 0.5)
    cfg = PaperConfig(tasks=1, rounds=1, team=(spec,))
    return cfg, _Task(costs={"solo": [cost]}, confidence={"solo": [0.9]}, luck={"solo": luck})


def test_scheduler_holds_the_mean_plus_two_deviations_not_twice_the_mean() -> None:
    # a 400-token round in a 500-token budget, after rounds that always cost 400: the hold
    # is 400 and the round runs (twice the mean, 800, was refused and starved the agent)
    cfg, task = _one_agent_task(priority=4, cost=400, luck=0.1)
    history = RoundHistory()
    history.observe("solo", [True], [400])
    history.observe("solo", [True], [400])
    tally, _ = _expected_gain_runs(cfg, [task], [500], history=history)
    assert (tally.tokens, tally.refusals, tally.starved, tally.correct) == (400, 0, 0, 4)


@pytest.mark.parametrize(("optimism", "tokens"), [(0.0, 0), (1.0, 150)])
def test_scheduler_tries_again_an_agent_with_little_history(optimism: float, tokens: int) -> None:
    # first right 0 times of 3: mean 0.2, a round worth 0.2 / 150 = 0.00133 a token; the price
    # is kappa x priority / budget = 1 / 600 = 0.00167: on the mean it is written off, one
    # posterior deviation up (0.363 / 150 = 0.00242) it is tried again
    cfg, task = _one_agent_task(priority=1, cost=150, luck=0.1)
    cfg = dataclasses.replace(cfg, kappa=1.0, optimism=optimism)
    history = RoundHistory()
    for _ in range(3):
        history.observe("solo", [False], [150])
    tally, _ = _expected_gain_runs(cfg, [task], [600], history=history)
    assert tally.tokens == tokens


@pytest.mark.parametrize(("floor", "tokens"), [(0.0, 150), (0.0052, 150), (0.0053, 0)])
def test_scheduler_price_floor_by_hand(floor: float, tokens: int) -> None:
    # no history: first read one deviation up, 0.5 + sqrt(1/12) = 0.7887, over the default
    # cost 150: 0.005258 a token; the shadow price, 0.1 x 1 / 600 = 0.00017, lets it run;
    # a floor of 0.0052 still does, one of 0.0053 prices the round out
    cfg, task = _one_agent_task(priority=1, cost=150, luck=0.1)
    cfg = dataclasses.replace(cfg, price_floor=floor)
    tally, _ = _expected_gain_runs(cfg, [task], [600], history=RoundHistory())
    assert tally.tokens == tokens


@pytest.mark.parametrize("floor", [-0.001, math.nan, math.inf])
def test_price_floor_rejects_bad_values(floor: float) -> None:
    with pytest.raises(ContractError, match=f"price_floor must be .*{floor}"):
        PaperConfig(price_floor=floor)


def test_command_line_price_floor_is_in_the_json_config(tmp_path: Path) -> None:
    out, off = tmp_path / "floor.json", tmp_path / "off.json"
    common = ["paper", "--tasks", "10", "--policies", "expected_gain"]
    assert main([*common, "--price-floor", "0.05", "--json", str(out)]) == 0
    assert main([*common, "--json", str(off)]) == 0
    floor, default = json.loads(out.read_text()), json.loads(off.read_text())
    assert floor["config"]["price_floor"] == 0.05 and default["config"]["price_floor"] == 0.0
    # a round buys at most its agent's priority: at 0.05 a token, a round must cost under
    # 80 tokens (the researcher) or 40 (the planner) to run, and none does: nothing runs
    assert floor["policies"]["expected_gain"]["tokens"] == 0
    assert default["policies"]["expected_gain"]["tokens"] > 0


def test_stopping_rule_by_hand() -> None:
    # a round of 100 tokens at 0.0025 a token must win at least 0.25
    assert worth_another_round(0.25, 100, 0.0025)
    assert not worth_another_round(0.24, 100, 0.0025)
    assert not worth_another_round(10.0, 1, math.inf)  # nothing left: never


def test_degradation_rule_by_hand() -> None:
    # a round of 4 tokens at 0.25 a token (1 to pay); the cheap tier: half the gain for a
    # quarter of the tokens (0.25 to pay). Surpluses, full against cheap:
    assert best_tier(2.0, 4, 0.25, 0.5, 0.25) == "full"  # 1 against 0.75
    assert best_tier(1.5, 4, 0.25, 0.5, 0.25) == "full"  # 0.5 against 0.5: a tie
    assert best_tier(1.25, 4, 0.25, 0.5, 0.25) == "cheap"  # 0.25 against 0.375
    assert best_tier(0.75, 4, 0.25, 0.5, 0.25) == "cheap"  # not worth it in full
    assert best_tier(0.5, 4, 0.25, 0.5, 0.25) == "cheap"  # 0 surplus: still worth it
    assert best_tier(0.25, 4, 0.25, 0.5, 0.25) is None  # worth neither
    assert best_tier(10.0, 1, math.inf, 0.5, 0.25) is None  # nothing left: never
    assert best_tier(0.25, 4, 0.0, 0.5, 0.25) == "full"  # free tokens: the better model
    # a cheap tier as dear as the full one and worse is never chosen
    assert best_tier(0.75, 4, 0.25, 0.5, 1.0) is None


def test_oracle_keeps_every_answer_and_no_policy_passes_it() -> None:
    rows = run_paper(PaperConfig(tasks=30, seed=5))["policies"]
    oracle = rows["oracle"]
    assert oracle["preservation"] == 1.0 and oracle["refusals"] == 0
    for name, row in rows.items():
        assert row["accuracy"] <= oracle["accuracy"], name
    held = rows["oracle_budget"]
    assert held["accuracy"] <= oracle["accuracy"] and held["refusals"] == 0


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


# ------------------------------------------------- the run-time ledger policy
def needy_at(confidence: float | None, priority: int = 3) -> Needy:
    return Needy("w", priority, 0, confidence, None, 500, None)


@pytest.mark.parametrize(
    ("confidence", "priority", "gain"),
    [
        (None, 3, 1.5),  # before a call: 3 x first (0.5)
        (0.4, 3, 0.9),  # 3 x (1 - 0.4) x lift (0.5)
        (1.0, 4, 0.0),  # certain: nothing to win
        (0.0, 1, 0.5),  # surely wrong: the whole lift
    ],
)
def test_policy_gain_by_hand(confidence: float | None, priority: int, gain: float) -> None:
    assert ExpectedGainPolicy().gain(needy_at(confidence, priority)) == pytest.approx(gain)


def test_policy_price_by_hand() -> None:
    policy = ExpectedGainPolicy(kappa=0.1)
    assert policy.price(Donor("d", 40, 2, 50, False)) == pytest.approx(0.1 * 2 / 50)
    assert policy.price(Donor("d", 40, 2, 50, True)) == 0.0  # complete: needs nothing more
    assert ExpectedGainPolicy(kappa=0.0).price(Donor("d", 1, 4, 1, False)) == 0.0


def test_policy_plan_passes_over_dear_donors_by_hand() -> None:
    policy = ExpectedGainPolicy(first=0.5, lift=0.5, kappa=0.1)
    donors = [
        Donor("scarce", spare=40, priority=1, available=5, complete=False),  # 0.02 a token
        Donor("idle", spare=60, priority=1, available=450, complete=False),  # 0.000222
        Donor("done", spare=80, priority=1, available=80, complete=True),  # free
    ]
    # worth 0.9 / 100 = 0.009: 'scarce' is passed over, 'idle' gives all, 'done' the rest
    assert policy.plan(needy_at(0.4), 100, iter(donors), partial=False) == [
        ("idle", 60),
        ("done", 40),
    ]
    # confident (worth 3 x 0.02 x 0.5 / 100 = 0.0003): only the free and the cheap give
    assert policy.plan(needy_at(0.98), 100, iter(donors), partial=False) == [
        ("idle", 60),
        ("done", 40),
    ]
    # dearer still (worth 0.0003 / 10 per token for 1000): only the completed donor gives
    assert policy.plan(needy_at(0.98), 1000, iter(donors), partial=True) == [("done", 80)]
    assert policy.plan(needy_at(0.4), 0, iter(donors), partial=False) == []
    assert policy_from_name("expected_gain").name == "expected_gain"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"first": 1.5}, "first must be a number in"),
        ({"lift": -0.1}, "lift must be a number in"),
        ({"lift": True}, "lift must be a number in"),
        ({"kappa": -1}, "kappa must be a non-negative, finite number"),
        ({"kappa": math.inf}, "kappa must be a non-negative, finite number"),
    ],
)
def test_policy_rejects_bad_parameters(kw: dict[str, float], message: str) -> None:
    with pytest.raises(ContractError, match=message):
        ExpectedGainPolicy(**kw)


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_manager_lends_to_the_unsure_and_a_scarce_donor_keeps_its_tokens(
    kind: str, tmp_path: Path
) -> None:
    m = BudgetManager(store=store_url(kind, tmp_path), policy=ExpectedGainPolicy(kappa=0.1))
    m.register_agent("pool", priority=1, max_tokens=1_000, min_reserve=0)
    m.register_agent("unsure", priority=3, max_tokens=100)
    m.register_agent("sure", priority=3, max_tokens=100)
    m.record_confidence("unsure", 0.4)
    m.record_confidence("sure", 0.999)
    # unsure: worth 3 x 0.6 x 0.5 / 50 = 0.018 >= the pool's 0.1 x 1 / 1000 = 0.0001
    assert m.reserve("unsure", 0, 150).loans == (("pool", 50),)
    # sure: worth 3 x 0.001 x 0.5 / 50 = 0.00003 < 0.1 x 1 / 950: refused, nothing moves
    before = m.status()
    with pytest.raises(BudgetExceededError):
        m.reserve("sure", 0, 150)
    assert m.status()["pool"] == before["pool"]
    m.complete("pool")  # a completed donor's tokens are free: now it lends
    assert m.reserve("sure", 0, 150).loans == (("pool", 50),)


@pytest.mark.parametrize("tightness", [0.4, 0.5])
def test_degrading_keeps_more_accuracy_than_refusing_for_no_more_money(tightness: float) -> None:
    rows = run_tiers(PaperConfig(tasks=40, seed=7, tightness=tightness))
    refuse, degrade = rows["refuse"], rows["degrade"]
    assert degrade["accuracy"] > refuse["accuracy"]
    assert degrade["dollars"] <= refuse["dollars"]
    assert degrade["cheap_tokens"] > 0 and degrade["refusals"] < refuse["refusals"]


def test_tiered_rows_differ_only_by_the_ladder() -> None:
    # with nothing ever short (a budget twice the unconstrained spend) and a cheap tier
    # that never leaves more surplus than the full one (1% of the gain for 99% of the
    # tokens), the ladder is never taken: same readings and history, the very same row
    cfg = PaperConfig(tasks=20, seed=3, tightness=2.0, cheap_gain=0.01, cheap_cost=0.99)
    rows = run_tiers(cfg)
    same = ("tokens", "accuracy", "refusals", "dollars")
    assert {k: rows["refuse"][k] for k in same} == {k: rows["degrade"][k] for k in same}
    assert rows["degrade"]["cheap_tokens"] == 0


def test_degradation_takes_a_cheap_round_where_refusal_would_stop() -> None:
    # nothing is ever refused here, and refusing already keeps every answer; the cheap
    # tier still runs the rounds whose surplus it leaves larger, so the ladder keeps as
    # much for less money (under the 20% line alone it was never taken here)
    rows = run_tiers(PaperConfig(tasks=40, seed=3, tightness=2.0))
    refuse, degrade = rows["refuse"], rows["degrade"]
    assert refuse["refusals"] == 0 and refuse["preservation"] == 1.0
    assert degrade["cheap_tokens"] > 0
    assert degrade["accuracy"] == refuse["accuracy"]
    assert degrade["dollars"] < refuse["dollars"]
