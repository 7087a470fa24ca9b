"""The paper's model: the confidence-weighted policy, adaptive gating, and dependencies."""

from __future__ import annotations

from pathlib import Path

import pytest

from tbc_integrations import (
    BudgetExceededError,
    BudgetManager,
    ContractError,
    InvalidValueError,
)
from tbc_integrations.adaptive import AdaptiveGating, Outcome, calibrate
from tbc_integrations.events import BudgetEvent, GateChanged
from tbc_integrations.policies import ConfidenceWeightedPolicy, Donor, Needy, policy_from_name
from tests.conftest import STORE_KINDS, store_url


def needy(**kw: object) -> Needy:
    base: dict[str, object] = {
        "name": "n",
        "priority": 2,
        "available": 0,
        "last_confidence": None,
        "confidence_threshold": 0.8,
        "max_tokens": 1_000,
        "max_input_tokens": None,
        "max_priority": 4,
    }
    base.update(kw)
    return Needy(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------- the policy
@pytest.mark.parametrize(
    ("kw", "alpha", "bound"),
    [
        ({"last_confidence": 0.4}, 0.5, 100),  # 0.5 x (2/4) x 0.4 x 1000
        ({"last_confidence": 0.4}, 1.0, 200),
        ({}, 1.0, 400),  # no confidence yet: the deficit is the whole threshold
        ({"confidence_threshold": None}, 1.0, 500),  # no gate: deficit 1
        ({"last_confidence": 0.9}, 1.0, 0),  # confident: nothing more
        ({"last_confidence": 0.4, "max_input_tokens": 300}, 1.0, 60),  # Imax = input cap
        ({"last_confidence": 0.4, "priority": 4}, 1.0, 400),  # top priority: Pw = 1
    ],
)
def test_bound_terms_by_hand(kw: dict[str, object], alpha: float, bound: int) -> None:
    assert ConfidenceWeightedPolicy(alpha).bound(needy(**kw)) == bound


def test_plan_takes_min_of_spare_bound_and_need_in_donor_order() -> None:
    donors = [
        Donor("low", spare=70, priority=1, available=100, complete=False),
        Donor("mid", spare=500, priority=2, available=600, complete=False),
    ]
    policy = ConfidenceWeightedPolicy(1.0)
    n = needy(last_confidence=0.4)  # bound 200
    assert policy.plan(n, 1_000, iter(donors), partial=True) == [("low", 70), ("mid", 130)]
    assert policy.plan(n, 50, iter(donors), partial=True) == [("low", 50)]
    assert policy.plan(needy(last_confidence=0.95), 50, iter(donors), partial=True) == []
    with pytest.raises(ContractError, match="alpha must be a positive, finite number"):
        ConfidenceWeightedPolicy(0)
    assert policy_from_name("weighted").name == "weighted"


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_weighted_manager_lends_to_the_unsure_not_to_the_confident(
    kind: str, tmp_path: Path
) -> None:
    m = BudgetManager(store=store_url(kind, tmp_path), policy=ConfidenceWeightedPolicy())
    m.register_agent("pool", priority=1, max_tokens=10_000)
    m.register_agent("unsure", priority=2, max_tokens=100, confidence_threshold=0.9)
    m.register_agent("sure", priority=2, max_tokens=100, confidence_threshold=0.9)
    m.record_confidence("unsure", 0.2)
    m.record_confidence("sure", 0.85)
    r = m.reserve("unsure", 0, 150)  # bound 1.0 x (2/2) x 0.7 x 100 = 70 >= 50 needed
    assert r.borrowed == 50
    with pytest.raises(BudgetExceededError):
        m.reserve("sure", 0, 150)  # bound 1.0 x 1 x 0.05 x 100 = 5 < 50 needed
    greedy = BudgetManager(store=store_url(kind, tmp_path / "g"))
    greedy.register_agent("pool", priority=1, max_tokens=10_000)
    greedy.register_agent("sure", priority=2, max_tokens=100, confidence_threshold=0.9)
    greedy.record_confidence("sure", 0.85)
    assert greedy.reserve("sure", 0, 150).borrowed == 50  # greedy covers it


# ------------------------------------------------------- adaptive gating
def test_calibration_by_hand() -> None:
    window = [
        Outcome(0.9, True, 10),
        Outcome(0.8, True, 10),
        Outcome(0.6, False, 10),
        Outcome(0.3, False, 10),
    ]
    # theta in (0.6, 0.8]: accuracy 1.0, cost below 20/40 -> 1 - 0.5 x 0.5 = 0.75 (the best)
    assert calibrate(window, lam=0.5) == 0.65
    # retrieval is free: the highest accuracy at the lowest such theta
    assert calibrate(window, lam=0.0) == 0.65
    # retrieval is dear: stop as early as possible
    assert calibrate(window, lam=10.0) == 0.0
    assert calibrate(window, lam=0.5, candidates=[0.5, 0.85]) == 0.8
    with pytest.raises(ContractError):
        calibrate([], lam=0.5)


def test_threshold_moves_only_after_enough_samples_and_is_evented() -> None:
    m = BudgetManager(adaptive=AdaptiveGating(window=6, min_samples=4, lam=0.5))
    m.register_agent("r", max_tokens=1_000, confidence_threshold=0.95)
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    outcomes = [(0.9, True, 10), (0.8, True, 10), (0.6, False, 10)]
    for c, ok, cost in outcomes:
        assert m.record_outcome("r", c, ok, cost) is None
    assert m.status()["r"].confidence_threshold == 0.95
    assert m.record_outcome("r", 0.3, False, 10) == 0.65
    assert m.status()["r"].confidence_threshold == 0.65
    assert [e.threshold for e in events if isinstance(e, GateChanged)] == [0.65]
    m.record_confidence("r", 0.7)
    with pytest.raises(BudgetExceededError):
        m.reserve("r", 1)  # 0.7 >= the calibrated 0.65: gated


def test_same_observations_same_thresholds() -> None:
    def run() -> list[float | None]:
        m = BudgetManager(adaptive=AdaptiveGating(window=5, min_samples=3, lam=0.3))
        m.register_agent("r", max_tokens=10, confidence_threshold=0.5)
        seq = [(0.1 * (i % 10), i % 3 != 0, float(i % 4)) for i in range(30)]
        return [m.record_outcome("r", c, ok, cost) for c, ok, cost in seq]

    assert run() == run()


def test_record_outcome_errors() -> None:
    m = BudgetManager()
    m.register_agent("r", max_tokens=10)
    with pytest.raises(ContractError, match="needs adaptive gating"):
        m.record_outcome("r", 0.5, True)
    m.adaptive = AdaptiveGating()
    with pytest.raises(InvalidValueError, match="confidence"):
        m.record_outcome("r", 1.5, True)
    with pytest.raises(InvalidValueError, match="cost must be"):
        m.record_outcome("r", 0.5, True, -1)
    with pytest.raises(ContractError):
        AdaptiveGating(window=0)
    with pytest.raises(ContractError):
        AdaptiveGating(window=5, min_samples=6)


# ------------------------------------------------------------ dependencies
@pytest.mark.parametrize("kind", STORE_KINDS)
def test_a_producer_is_not_lent_away_before_it_runs(kind: str, tmp_path: Path) -> None:
    m = BudgetManager(store=store_url(kind, tmp_path))
    m.register_agent("researcher", priority=1, max_tokens=1_000)
    m.register_agent("writer", priority=2, max_tokens=100, depends_on=["researcher"])
    m.register_agent("critic", priority=3, max_tokens=10)
    with pytest.raises(BudgetExceededError):
        m.reserve("critic", 0, 500)  # the writer still needs the researcher's output
    m.record_usage("researcher", 10)  # the researcher has run
    assert m.reserve("critic", 0, 500).loans == (("researcher", 490),)
    m2 = BudgetManager(store=store_url(kind, tmp_path / "b"))
    m2.register_agent("researcher", priority=1, max_tokens=1_000)
    m2.register_agent("writer", priority=2, max_tokens=100, depends_on=["researcher"])
    m2.register_agent("critic", priority=3, max_tokens=10)
    m2.complete("writer")  # nobody active depends on it any more
    # the finished writer gives all it has first, then the no-longer-protected researcher
    assert m2.reserve("critic", 0, 500).loans == (("writer", 100), ("researcher", 390))
