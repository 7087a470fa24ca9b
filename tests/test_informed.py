"""The benchmark's ``informed`` reference row and the posterior it shares with the history."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from tbc_integrations import ContractError
from tbc_integrations.adaptive import RoundHistory, posterior
from tbc_integrations.bench import (
    AgentSpec,
    PaperConfig,
    _informed,
    _oracle,
    _p,
    _Task,
    _tasks,
    main,
    run_paper,
)

TEAM = (AgentSpec("a", 3, 100, 0.5), AgentSpec("b", 1, 150, 0.5))
CFG = PaperConfig(tasks=1, rounds=3, decay=0.5, team=TEAM)  # lift 0.5


def _task(luck_a: float, readings_a: list[float]) -> _Task:
    # b is right from round 1 and reads so; a reads as given
    return _Task(
        {"a": [100, 100, 100], "b": [150, 150, 150]},
        {"a": readings_a, "b": [1.0, 1.0, 1.0]},
        {"a": luck_a, "b": 0.1},
    )


def test_posterior_by_hand_with_first_and_lift_apart() -> None:
    # first 0.35, lift 0.4: priors p_1 = 0.35, p_2 = 1 - 0.65 x 0.6 = 0.61;
    # LR_1 = odds(0.8) / odds(0.35) = 4 / (0.35 / 0.65), LR_2 = odds(0.9) / odds(0.61);
    # right at 1: 0.35 LR_1 LR_2, at 2: 0.65 x 0.4 x LR_2, not yet: 0.65 x 0.6
    lr1, lr2 = 4 / (0.35 / 0.65), 9 / (0.61 / 0.39)
    right = 0.35 * lr1 * lr2 + 0.26 * lr2
    assert posterior(0.35, 0.4, [0.8, 0.9]) == pytest.approx(right / (right + 0.39))
    assert posterior(0.35, 0.4, [0.8, 0.9]) == pytest.approx(0.97685, abs=1e-5)
    # a second reading at its round's prior says nothing new: the first one's belief,
    # carried one round on (wrong answers turn right with chance lift)
    after_one = posterior(0.35, 0.4, [0.2])
    assert after_one is not None
    assert posterior(0.35, 0.4, [0.2, 0.61]) == pytest.approx(after_one + (1 - after_one) * 0.4)
    assert posterior(0.35, 0.4, []) is None


def test_history_belief_is_the_posterior_of_its_first_and_lift() -> None:
    h = RoundHistory()
    h.observe("a", [False, True, True], [100, 100, 100])
    h.observe("a", [True, True], [90, 90])
    assert (h.first("a"), h.lift("a")) == (0.5, 2 / 3)  # (1 + 1) / (2 + 2), (1 + 1) / (1 + 2)
    for readings in ([0.3], [0.3, 0.8], [0.9, 0.2, 0.95]):
        assert h.belief("a", readings) == posterior(0.5, 2 / 3, readings)


@pytest.mark.parametrize(
    ("budget", "tokens", "correct", "refusals", "starved"),
    [
        # a's first reading says wrong (ratio 3 x 0.5 / 100 beats b's 1 x 0.5 / 150), so
        # a runs again, reads right and stops; then b runs once: 350 tokens, both right
        (1_000, 350, 4, 0, 0),
        (350, 350, 4, 0, 0),
        # 150 left after a's two rounds is b's round exactly; 149 is not: b is closed
        (349, 200, 3, 1, 0),
        # a's second round does not fit after its first: a (the top agent) and b closed
        (150, 100, 0, 2, 1),
    ],
)
def test_informed_by_hand(
    budget: int, tokens: int, correct: int, refusals: int, starved: int
) -> None:
    tally = _informed(CFG, [_task(0.6, [0.0, 1.0, 1.0])], [budget])
    assert (tally.tokens, tally.correct, tally.weight) == (tokens, correct, 4)
    assert (tally.refusals, tally.starved) == (refusals, starved)


def test_informed_price_and_stop_by_hand() -> None:
    task = _task(0.6, [0.0, 1.0, 1.0])
    # at 0.01 a token a's rounds (0.015) run and b's first (0.0033) does not
    priced = _informed(dataclasses.replace(CFG, informed_price=0.01), [task], [1_000])
    assert (priced.tokens, priced.correct, priced.refusals) == (200, 3, 0)
    # a never reads right: it runs every round. b reads 0.99 each round: its belief is
    # 0.99 after one (under 0.999: it runs again), then (0.5 x 99 x 33 + 0.25 x 33) /
    # (that + 0.25) = 0.99985 after two, so it stops; at informed_stop 1 it runs all three
    hopeless = _Task(
        {"a": [100, 100, 100], "b": [150, 150, 150]},
        {"a": [0.0, 0.0, 0.0], "b": [0.99, 0.99, 0.99]},
        {"a": 0.99, "b": 0.1},
    )
    assert _informed(CFG, [hopeless], [1_000]).tokens == 300 + 300
    strict = dataclasses.replace(CFG, informed_stop=1.0)
    assert _informed(strict, [hopeless], [1_000]).tokens == 300 + 450


def test_informed_with_exact_readings_is_the_oracle_plus_the_never_right() -> None:
    # noise 0: every reading is 0 or 1, so the posterior is certain after each round;
    # with the budget ample it stops every agent at its first right round, as the
    # oracle does, and runs every round of an agent never right (which the oracle skips)
    cfg = PaperConfig(tasks=40, seed=3, noise=0.0, tightness=1.0)
    tasks = _tasks(cfg)
    budgets = [10**9] * len(tasks)
    informed, oracle = _informed(cfg, tasks, budgets), _oracle(cfg, tasks)
    never = sum(
        sum(task.costs[s.name])
        for task in tasks
        for s in cfg.team
        if task.luck[s.name] >= _p(s, cfg.rounds, cfg.decay)
    )
    assert never > 0  # the seed has agents never right, so the difference is tested
    assert informed.correct == oracle.correct and informed.weight == oracle.weight
    assert informed.tokens == oracle.tokens + never
    assert informed.refusals == 0


def test_informed_stays_within_every_task_budget() -> None:
    cfg = PaperConfig(tasks=30, seed=5, tightness=0.4)
    tasks = _tasks(cfg)
    budgets = [max(1, math.floor(sum(sum(c) for c in t.costs.values()) * 0.4)) for t in tasks]
    for task, budget in zip(tasks, budgets, strict=True):
        assert _informed(cfg, [task], [budget]).tokens <= budget
    rows = run_paper(cfg, ["informed"])["policies"]
    assert rows["informed"]["refusals"] > 0  # tight enough that the budget binds


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("informed_price", -0.5),
        ("informed_price", math.inf),
        ("informed_price", math.nan),
        ("informed_price", True),
        ("informed_stop", 0.0),
        ("informed_stop", 1.5),
        ("informed_stop", math.nan),
        ("informed_stop", True),
    ],
)
def test_informed_options_reject_bad_values(field: str, value: object) -> None:
    with pytest.raises(ContractError, match=f"{field} must be .*{value}"):
        PaperConfig(**{field: value})  # type: ignore[arg-type]


def test_command_line_informed_options_reach_the_row(tmp_path: Path) -> None:
    out = tmp_path / "informed.json"
    common = ["paper", "--tasks", "10", "--policies", "informed"]
    assert main([*common, "--json", str(out)]) == 0
    default = json.loads(out.read_text())
    assert default["config"]["informed_price"] == 0.0 and default["policies"]["informed"]["tokens"]
    assert main([*common, "--informed-price", "0.05", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["informed_price"] == 0.05
    # a round buys at most priority x first (no belief yet) or priority x lift: the most
    # a token is the planner's 2 x 0.55 over its cheapest round, far under 0.05
    cheapest = min(c for task in _tasks(PaperConfig(tasks=10)) for c in task.costs["planner"])
    assert 2 * 0.55 / cheapest < 0.05
    assert data["policies"]["informed"]["tokens"] == 0
    # stopping at belief one half spends less than at 0.999
    assert main([*common, "--informed-stop", "0.5", "--json", str(out)]) == 0
    half = json.loads(out.read_text())
    assert half["config"]["informed_stop"] == 0.5
    assert half["policies"]["informed"]["tokens"] < default["policies"]["informed"]["tokens"]


def test_command_line_refuses_a_bad_informed_value_naming_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["paper", "--tasks", "5", "--informed-stop", "1.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "informed_stop must be a finite number > 0 and <= 1, got 1.5" in err
    assert "usage: python -m tbc_integrations.bench paper" in err  # the subcommand's usage
