"""Benchmarks anyone can rerun: ``python -m tbc_integrations.bench paper``.

``paper`` puts the Token Budget Contracts paper's claim (40-60% fewer tokens at
97%+ of the accuracy of unconstrained operation) to a seeded simulation. Each
task has a team of agents; each agent spends tokens on rounds of retrieval and
reasoning; every round raises its chance of a correct answer with diminishing
returns (``p_k = 1 - (1 - p0) * decay**k``); its confidence after a round is a
noisy, calibrated signal of that chance. Whether an answer is right is drawn
once per (task, agent) and shared by every policy (common random numbers), so
policies differ only in when they stop and what they are allowed to spend.

Policies, on the same tasks:

- ``unconstrained``: every agent runs every round;
- ``flat_caps``: each agent gets an equal share of the budget, no reallocation, no gate;
- ``tbcontracts``: the ``token-budget-contracts`` package's own ``BudgetManager``
  (post-hoc ``record_usage`` with its reallocation, its fixed confidence gate);
  tokens it refuses after they were spent still count as spent;
- ``tbc_greedy``: this library, greedy reallocation, fixed gate, reserve before each round;
- ``paper``: the paper's formulas: confidence-weighted reallocation and adaptive gating;
- ``expected_gain``: the configuration we recommend (``RECOMMENDED``), see
  ``_expected_gain_runs``;
- ``informed``: knows the simulator's model and each round's cost, not the answers
  (a reference, not a policy anyone can run), see ``_informed``;
- ``oracle_budget``: knows each answer and is held to the task's budget;
- ``oracle``: knows each answer and stops every agent at its first right round.

The budget of a task is ``--tightness`` times what the unconstrained run spends on it.
``--policies`` runs only the named rows (``unconstrained`` always runs: it is the base).

Example:
    >>> result = run_paper(PaperConfig(tasks=5, seed=1))
    >>> sorted(result["policies"])[:2]
    ['expected_gain', 'flat_caps']
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tbc_integrations._errors import BudgetExceededError, ContractError
from tbc_integrations._manager import BudgetManager
from tbc_integrations._records import Reservation
from tbc_integrations.adaptive import (
    AdaptiveGating,
    RoundHistory,
    best_tier,
    expected_gain,
    posterior,
    shadow_price,
    worth_another_round,
)
from tbc_integrations.policies import (
    ConfidenceWeightedPolicy,
    ExpectedGainPolicy,
    ReallocationPolicy,
)

__all__ = ["RECOMMENDED", "PaperConfig", "main", "run_ablation", "run_paper", "run_tiers"]

POLICY_NAMES = (
    "unconstrained",
    "flat_caps",
    "tbcontracts",
    "tbc_greedy",
    "paper",
    "expected_gain",
    "informed",
    "oracle_budget",
    "oracle",
)
RECOMMENDED = "expected_gain"
"""The configuration the README recommends: the same name and defaults on every workload."""


@dataclass(frozen=True)
class AgentSpec:
    """An agent of the simulated team."""

    name: str
    priority: int
    base_cost: int
    p0: float


DEFAULT_TEAM = (
    AgentSpec("planner", 2, 120, 0.55),
    AgentSpec("researcher", 4, 400, 0.35),
    AgentSpec("critic", 1, 150, 0.50),
    AgentSpec("writer", 3, 250, 0.45),
)


@dataclass(frozen=True)
class PaperConfig:
    """The workload (every field is a command-line option).

    ``price_floor`` (``--price-floor``, 0 = off) is a scan, not a default: the least
    priority-weighted accuracy a token must buy under the ``expected_gain`` scheduler,
    whatever the shadow price (the price is ``max(price_floor, shadow_price)``).
    ``informed_price`` (``--informed-price``, 0 = off) is a fixed price a token for the
    ``informed`` row (which has no shadow price), and ``informed_stop`` the belief at
    which it stops an agent.

    Example:
        >>> PaperConfig(price_floor=0.0013).price_floor
        0.0013
    """

    seed: int = 7
    tasks: int = 200
    rounds: int = 8
    decay: float = 0.6
    noise: float = 0.2
    tightness: float = 0.5
    threshold: float = 0.85
    alpha: float = 1.0
    lam: float = 0.3
    window: int = 40
    min_samples: int = 10
    kappa: float = 0.1
    optimism: float = 1.0
    price_floor: float = 0.0
    informed_price: float = 0.0
    informed_stop: float = 0.999
    cheap_cost: float = 0.3
    cheap_gain: float = 0.5
    degrade_below: float = 0.0
    price_full: float = 10.0
    price_cheap: float = 1.0
    team: tuple[AgentSpec, ...] = field(default=DEFAULT_TEAM)

    def __post_init__(self) -> None:
        _check_number("price_floor", self.price_floor, low=0.0)
        _check_number("informed_price", self.informed_price, low=0.0)
        _check_number("informed_stop", self.informed_stop, low=0.0, high=1.0, low_open=True)


def _check_number(
    name: str, value: object, low: float, high: float | None = None, low_open: bool = False
) -> None:
    """Refuse a value that is not a finite number in range, naming the field and the value."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < low
        or (low_open and value == low)
        or (high is not None and value > high)
    ):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        if high is not None:
            bound += f" and <= {high:g}"
        raise ContractError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass
class _Task:
    costs: dict[str, list[int]]
    confidence: dict[str, list[float]]
    luck: dict[str, float]


def _p(spec: AgentSpec, k: int, decay: float) -> float:
    """Chance the answer is right after k rounds (k >= 1)."""
    return 1.0 - (1.0 - spec.p0) * decay ** (k - 1)


def _confidence(prior: float, right: bool, noise: float, rng: random.Random) -> float:
    """A calibrated confidence that carries information about this answer.

    The agent sees a noisy reading of whether its answer is right,
    ``z = right + N(0, sigma)`` with ``sigma = noise / (1 - noise)``, and reports
    the posterior ``P(right | z)`` from its prior (the chance of being right after
    this many rounds). A posterior is calibrated by construction: of the answers
    reported at confidence c, a fraction c is right. ``noise`` 0 reveals the answer
    exactly; towards 1 the reading says nothing and the confidence falls back to
    the prior.
    """
    if noise <= 0.0:
        return 1.0 if right else 0.0
    if noise >= 1.0 or prior <= 0.0 or prior >= 1.0:
        return min(1.0, max(0.0, prior))
    sigma = noise / (1.0 - noise)
    z = float(right) + rng.gauss(0.0, sigma)
    # log-likelihood ratio of right against wrong for the reading z
    llr = (2.0 * z - 1.0) / (2.0 * sigma * sigma)
    log_odds = math.log(prior / (1.0 - prior)) + llr
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, log_odds))))


def _tasks(cfg: PaperConfig) -> list[_Task]:
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.tasks):
        costs: dict[str, list[int]] = {}
        conf: dict[str, list[float]] = {}
        luck: dict[str, float] = {}
        for spec in cfg.team:
            costs[spec.name] = [
                max(1, round(spec.base_cost * rng.lognormvariate(0.0, 0.25)))
                for _ in range(cfg.rounds)
            ]
            luck[spec.name] = rng.random()
            conf[spec.name] = [
                _confidence(
                    _p(spec, k, cfg.decay), luck[spec.name] < _p(spec, k, cfg.decay), cfg.noise, rng
                )
                for k in range(1, cfg.rounds + 1)
            ]
        out.append(_Task(costs, conf, luck))
    return out


@dataclass
class _Tally:
    tokens: int = 0
    correct: float = 0.0
    weight: float = 0.0
    refusals: int = 0
    starved: int = 0

    def answer(self, spec: AgentSpec, rounds: int, luck: float, cfg: PaperConfig) -> bool:
        right = rounds > 0 and luck < _p(spec, rounds, cfg.decay)
        self.correct += spec.priority * right
        self.weight += spec.priority
        return right


def _unconstrained(cfg: PaperConfig, tasks: list[_Task]) -> tuple[_Tally, list[int]]:
    tally, per_task = _Tally(), []
    for task in tasks:
        spent = 0
        for spec in cfg.team:
            spent += sum(task.costs[spec.name])
            tally.answer(spec, cfg.rounds, task.luck[spec.name], cfg)
        tally.tokens += spent
        per_task.append(spent)
    return tally, per_task


def _shares(cfg: PaperConfig, budget: int, flat: bool) -> dict[str, int]:
    if flat:
        return {s.name: budget // len(cfg.team) for s in cfg.team}
    total = sum(s.priority * s.base_cost for s in cfg.team)
    return {s.name: budget * s.priority * s.base_cost // total for s in cfg.team}


def _flat(cfg: PaperConfig, tasks: list[_Task], budgets: list[int]) -> _Tally:
    tally = _Tally()
    top = max(cfg.team, key=lambda s: s.priority)
    for task, budget in zip(tasks, budgets, strict=True):
        caps = _shares(cfg, budget, flat=True)
        for spec in cfg.team:
            left, k = caps[spec.name], 0
            while k < cfg.rounds and task.costs[spec.name][k] <= left:
                left -= task.costs[spec.name][k]
                tally.tokens += task.costs[spec.name][k]
                k += 1
            if k < cfg.rounds:
                tally.refusals += 1
                tally.starved += spec is top and k < cfg.rounds
            tally.answer(spec, k, task.luck[spec.name], cfg)
    return tally


def _tbcontracts(cfg: PaperConfig, tasks: list[_Task], budgets: list[int]) -> _Tally | None:
    try:
        import tbcontracts
    except ImportError:
        return None
    tally = _Tally()
    top = max(cfg.team, key=lambda s: s.priority)
    for task, budget in zip(tasks, budgets, strict=True):
        shares = _shares(cfg, budget, flat=False)
        m = tbcontracts.BudgetManager()
        for spec in cfg.team:
            m.register_agent(
                spec.name,
                priority=spec.priority,
                max_tokens=shares[spec.name],
                confidence_threshold=cfg.threshold,
            )
        for spec in sorted(cfg.team, key=lambda s: -s.priority):
            k = 0
            while k < cfg.rounds:
                contract = m.contracts[spec.name]
                if not tbcontracts.ConfidenceGate.allow_further_retrieval(
                    contract, contract.last_confidence
                ):
                    break
                cost = task.costs[spec.name][k]
                tally.tokens += cost  # spent before the package checks (and even if it refuses)
                k += 1
                try:
                    m.record_usage(spec.name, cost, confidence=task.confidence[spec.name][k - 1])
                except tbcontracts.BudgetExceededError:
                    tally.refusals += 1
                    tally.starved += spec is top
                    break
            tally.answer(spec, k, task.luck[spec.name], cfg)
    return tally


def _ours(
    cfg: PaperConfig,
    tasks: list[_Task],
    budgets: list[int],
    full: bool,
    weighted: bool | None = None,
    policy: ReallocationPolicy | None = None,
) -> _Tally:
    """Our ledger; ``full`` adds adaptive gating, ``weighted`` the weighted policy.

    ``weighted`` defaults to ``full`` (the full model has both); ``policy``, when
    given, replaces the reallocation policy either would choose.
    """
    weighted = full if weighted is None else weighted
    tally = _Tally()
    top = max(cfg.team, key=lambda s: s.priority)
    adaptive = AdaptiveGating(window=cfg.window, min_samples=cfg.min_samples, lam=cfg.lam)
    thresholds = {s.name: cfg.threshold for s in cfg.team}
    for task, budget in zip(tasks, budgets, strict=True):
        shares = _shares(cfg, budget, flat=False)
        m = BudgetManager(
            policy=policy or (ConfidenceWeightedPolicy(cfg.alpha) if weighted else None),
            adaptive=adaptive if full else None,
        )
        for spec in cfg.team:
            m.register_agent(
                spec.name,
                priority=spec.priority,
                max_tokens=shares[spec.name],
                min_reserve=0,
                confidence_threshold=thresholds[spec.name],
            )
        order = sorted(cfg.team, key=lambda s: -s.priority)
        for spec in order:
            k, spent = 0, 0
            while k < cfg.rounds:
                cost = task.costs[spec.name][k]
                estimate = spec.base_cost * 2  # reserve a pessimistic estimate, settle the truth
                try:
                    r = m.reserve(spec.name, 0, min(estimate, max(cost, estimate)))
                except BudgetExceededError as exc:
                    if exc.reason != "confidence gate":
                        tally.refusals += 1
                        tally.starved += spec is top
                    break
                m.commit(r, (0, cost))
                spent += cost
                k += 1
                m.record_confidence(spec.name, task.confidence[spec.name][k - 1])
            tally.tokens += spent
            tally.answer(spec, k, task.luck[spec.name], cfg)
            m.complete(spec.name)  # done: its leftover is spare for the rest of the team
            if full:
                # every round's result is an observation (confidence, right or not, its cost);
                # reporting only the final one would bias the window toward the old threshold
                for j in range(k):
                    right_j = task.luck[spec.name] < _p(spec, j + 1, cfg.decay)
                    new = m.record_outcome(
                        spec.name, task.confidence[spec.name][j], right_j, task.costs[spec.name][j]
                    )
                    if new is not None:
                        thresholds[spec.name] = new
    return tally


def _informed(cfg: PaperConfig, tasks: list[_Task], budgets: list[int]) -> _Tally:
    """Knows the simulator's model and each round's cost, not the answers: a reference.

    Every agent's belief is the posterior of its readings under the true model
    (:func:`~tbc_integrations.adaptive.posterior` with the true ``first``, ``p0``,
    and ``lift``, ``1 - decay``; exact but for its clipping of each confidence to
    [1e-9, 1 - 1e-9]), where ``expected_gain`` must learn the model.
    Within a task it runs, one round at a time, the open agent whose next round buys
    the most expected priority-weighted accuracy per token of that round's true
    cost, while that is at least ``informed_price`` (0: any); an agent stops once
    its belief reaches ``informed_stop`` (0.999), and is closed (a refusal) when
    its next round does not fit what the task has left, so it never needs a hold.
    No policy can know what it knows. At price 0 it spends until every agent's
    belief reaches ``informed_stop``, its rounds end or the budget is gone, so it
    spends more than the recommended rules; it is a greedy, one-round-at-a-time
    reference, not a bound.
    """
    tally = _Tally()
    top = max(cfg.team, key=lambda s: s.priority)
    lift = 1.0 - cfg.decay
    for task, budget in zip(tasks, budgets, strict=True):
        readings: dict[str, list[float]] = {s.name: [] for s in cfg.team}
        closed: set[str] = set()
        left = budget
        while True:
            best, best_worth = None, -1.0
            for spec in cfg.team:
                seen = readings[spec.name]
                k = len(seen)
                if spec.name in closed or k >= cfg.rounds:
                    continue
                belief = posterior(spec.p0, lift, seen)
                if belief is not None and belief >= cfg.informed_stop:
                    continue
                worth = expected_gain(spec.priority, belief, spec.p0, lift)
                worth /= task.costs[spec.name][k]
                if worth > best_worth:
                    best, best_worth = spec, worth
            if best is None or best_worth < cfg.informed_price:
                break
            seen = readings[best.name]
            cost = task.costs[best.name][len(seen)]
            if cost > left:
                closed.add(best.name)
                tally.refusals += 1
                tally.starved += best is top
                continue
            left -= cost
            tally.tokens += cost
            seen.append(task.confidence[best.name][len(seen)])
        for spec in cfg.team:
            tally.answer(spec, len(readings[spec.name]), task.luck[spec.name], cfg)
    return tally


def _oracle(cfg: PaperConfig, tasks: list[_Task]) -> _Tally:
    """Knows each answer: stops every agent at its first right round, skips hopeless ones.

    Its accuracy is the unconstrained run's and its tokens the fewest that reach it:
    the limit no policy can pass. It is not held to the budget (it needs less).
    """
    tally = _Tally()
    for task in tasks:
        for spec in cfg.team:
            luck = task.luck[spec.name]
            first = next((k for k in range(1, cfg.rounds + 1) if luck < _p(spec, k, cfg.decay)), 0)
            tally.tokens += sum(task.costs[spec.name][:first])
            tally.answer(spec, first, luck, cfg)
    return tally


def _oracle_budget(cfg: PaperConfig, tasks: list[_Task], budgets: list[int]) -> _Tally:
    """Knows each answer and is held to the task's budget: the best it can do within it.

    For each task, of the agents that are ever right, it brings to their first right
    round the set with the most priority that fits in the budget (fewest tokens among
    equals); the others spend nothing. No policy held to the budget can pass it.
    """
    tally = _Tally()
    for task, budget in zip(tasks, budgets, strict=True):
        items = []
        for spec in cfg.team:
            luck = task.luck[spec.name]
            first = next((k for k in range(1, cfg.rounds + 1) if luck < _p(spec, k, cfg.decay)), 0)
            if first:
                items.append((spec.priority, sum(task.costs[spec.name][:first])))
        best_value, best_cost = 0, 0
        for mask in range(1 << len(items)):
            chosen = [item for i, item in enumerate(items) if mask >> i & 1]
            value, cost = sum(v for v, _ in chosen), sum(c for _, c in chosen)
            if cost <= budget and (value, -cost) > (best_value, -best_cost):
                best_value, best_cost = value, cost
        tally.tokens += best_cost
        tally.correct += best_value
        tally.weight += sum(s.priority for s in cfg.team)
    return tally


def _try_reserve(m: BudgetManager, agent: str, tokens: int) -> Reservation | None:
    try:
        return m.reserve(agent, 0, tokens)
    except BudgetExceededError:
        return None


@dataclass
class _Run:
    """One agent's state within a task under the expected-gain scheduler."""

    spec: AgentSpec
    k: int = 0
    progress: float = 0.0  # the chance its answer is right now
    confidence: float | None = None  # the belief that its answer is right now
    confidences: list[float] = field(default_factory=list)  # every confidence it reported
    rights: list[bool] = field(default_factory=list)
    costs: list[int] = field(default_factory=list)
    full_rounds: int = 0  # rounds run on the full tier before the first cheap one
    open: bool = True


def _advance(progress: float, spec: AgentSpec, decay: float, gain: float) -> float:
    """The chance of a right answer after one more round with ``gain`` of the full tier's."""
    if progress <= 0.0:
        return spec.p0 * gain
    return 1.0 - (1.0 - progress) * (1.0 - (1.0 - decay) * gain)


def _expected_gain_runs(
    cfg: PaperConfig,
    tasks: list[_Task],
    budgets: list[int],
    history: RoundHistory | None = None,
    tiers: bool = False,
    degrade: bool = False,
    combine: bool = True,
    record: list[RoundHistory] | None = None,
    replay: Sequence[RoundHistory] | None = None,
) -> tuple[_Tally, int]:
    """The recommended configuration: our ledger under the expected-gain rules.

    Within a task, the scheduler runs, one round at a time, the open agent whose
    next round buys the most expected priority-weighted accuracy per token
    (:func:`~tbc_integrations.adaptive.expected_gain` over the agent's mean
    round cost, both from its :class:`~tbc_integrations.adaptive.RoundHistory`,
    whose ``first`` and ``lift`` are read ``optimism`` posterior standard
    deviations above their means, so an agent unlucky in its first few tasks is
    tried again rather than written off; the confidence it weighs is
    :meth:`~tbc_integrations.adaptive.RoundHistory.belief`, every confidence the
    agent reported in this task combined, from the history's means), and stops the
    task when even that round is not worth its cost at the shadow price of what the
    budget leaves (:func:`~tbc_integrations.adaptive.shadow_price` of the team's
    priority, ``kappa`` from the config; never below ``price_floor``, 0 by
    default). Each round is reserved on the ledger first
    (:meth:`~tbc_integrations.adaptive.RoundHistory.hold`: the agent's mean
    round cost plus two standard deviations; a round that costs more is covered by
    lending, as any overrun on the ledger is) with greedy lending, shares by expected
    need and one ledger priority, since the scheduler itself chooses, team-wide,
    whom the budget serves next (at run time, without such a scheduler,
    :class:`~tbc_integrations.policies.ExpectedGainPolicy` applies the same rule
    when a loan is asked for); a refused agent is closed. Outcomes feed the
    history after each task, as an evaluator's verdicts would. ``combine`` False
    weighs each round's own confidence alone (the ablation).

    With ``tiers`` the rounds follow the tiered model; with ``degrade`` each round
    runs on the tier that leaves the more surplus at the shadow price
    (:func:`~tbc_integrations.adaptive.best_tier`: the cheap tier's gain is
    ``cheap_gain`` of the full one's, its cost ``cheap_cost``), so the cheap tier
    takes over as the budget runs down, and also where a full round is not worth
    its cost but a cheap one is; a full round the ledger refuses is tried on the
    cheap tier, and so is every round once the team has less than ``degrade_below``
    of its budget left (0 by default: off). Without ``degrade`` a refusal closes
    the agent. In the tiered model, the noise of the reading
    after round k of an agent on a task is drawn once for (task, agent, k), on
    either tier. ``record`` receives a copy of the history before each task;
    ``replay`` gives the history for each task instead of learning one (so two
    runs can be compared with the same history). Returns the tally and the
    tokens spent on the cheap tier.
    """
    history = history if history is not None else RoundHistory()
    tally, cheap_tokens = _Tally(), 0
    top = max(cfg.team, key=lambda s: s.priority)
    for index, (task, budget) in enumerate(zip(tasks, budgets, strict=True)):
        if replay is not None:
            history = replay[index]
        elif record is not None:
            record.append(copy.deepcopy(history))
        # shares by expected need; one ledger priority, since the scheduler weighs priority
        need = sum(s.base_cost for s in cfg.team)
        m = BudgetManager()
        for spec in cfg.team:
            m.register_agent(
                spec.name, priority=1, max_tokens=budget * spec.base_cost // need, min_reserve=0
            )
        runs = [_Run(spec) for spec in cfg.team]
        spent = 0
        while True:
            live = [r for r in runs if r.open and r.k < cfg.rounds]
            if not live:
                break
            price = max(
                cfg.price_floor,
                shadow_price(sum(s.priority for s in cfg.team), budget - spent, cfg.kappa),
            )

            def value(r: _Run, h: RoundHistory = history) -> float:
                name = r.spec.name
                first, lift = h.first(name, cfg.optimism), h.lift(name, cfg.optimism)
                gain = expected_gain(r.spec.priority, r.confidence, first, lift)
                return gain / h.cost(name, r.spec.base_cost)

            best = max(live, key=value)
            name = best.spec.name
            mean_cost = history.cost(name, best.spec.base_cost)
            gain = value(best) * mean_cost
            if degrade:  # the tier of more surplus at the price, or none
                tier = best_tier(gain, mean_cost, price, cfg.cheap_gain, cfg.cheap_cost)
                if tier is None:
                    break
                cheap = tier == "cheap" or (budget - spent) < cfg.degrade_below * budget
            elif worth_another_round(gain, mean_cost, price):
                cheap = False
            else:
                break
            cost = task.costs[name][best.k]
            hold = history.hold(name, best.spec.base_cost)
            held: Reservation | None = None
            if not cheap:
                held = _try_reserve(m, name, math.ceil(hold))
            if held is None and degrade:
                cheap = True
                held = _try_reserve(m, name, math.ceil(hold * cfg.cheap_cost))
            if held is None:
                best.open = False
                tally.refusals += 1
                tally.starved += best.spec is top
                continue
            if cheap:
                cost = max(1, round(cost * cfg.cheap_cost))
                cheap_tokens += cost
            elif best.full_rounds == best.k:
                best.full_rounds += 1
            m.commit(held, (0, cost))
            spent += cost
            best.k += 1
            luck = task.luck[name]
            if tiers:
                best.progress = _advance(
                    best.progress, best.spec, cfg.decay, cfg.cheap_gain if cheap else 1.0
                )
                right = luck < best.progress
                readings = random.Random(f"{cfg.seed}/{index}/{name}/{best.k}")
                reported = _confidence(best.progress, right, cfg.noise, readings)
            else:
                right = luck < _p(best.spec, best.k, cfg.decay)
                reported = task.confidence[name][best.k - 1]
            best.confidences.append(reported)
            best.confidence = history.belief(name, best.confidences) if combine else reported
            best.rights.append(right)
            best.costs.append(cost)
        tally.tokens += spent
        for run in runs:
            if tiers:
                right = run.k > 0 and run.rights[-1]
                tally.correct += run.spec.priority * right
                tally.weight += run.spec.priority
            else:
                tally.answer(run.spec, run.k, task.luck[run.spec.name], cfg)
            if replay is not None:
                continue
            # the history calibrates the full tier: a cheap round is another model's
            history.observe(
                run.spec.name, run.rights[: run.full_rounds], run.costs[: run.full_rounds]
            )
    return tally, cheap_tokens


def _row(tally: _Tally, base: _Tally) -> dict[str, float | int]:
    accuracy = tally.correct / tally.weight
    return {
        "tokens": tally.tokens,
        "accuracy": round(accuracy, 4),
        "reduction": round(1 - tally.tokens / base.tokens, 4),
        "preservation": round(accuracy / (base.correct / base.weight), 4),
        "refusals": tally.refusals,
        "starved_high_priority": tally.starved,
    }


def run_tiers(cfg: PaperConfig) -> dict[str, dict[str, float | int]]:
    """Degradation against refusal at the same budget, on the tiered model.

    Every agent has a cheap tier: a round costs ``cheap_cost`` of the tokens and
    buys ``cheap_gain`` of the full tier's gain (the wrong-to-right chance of a
    round, and of a first round); tokens are priced at ``price_full`` and
    ``price_cheap`` dollars per million. Both rows run the recommended
    configuration on the same tasks and budgets, the same readings, and the same
    history: the one ``refuse`` learns, task by task, so that the two rows differ
    only by the ladder; ``refuse`` stops an agent its ledger refuses, ``degrade``
    moves it to the cheap tier (see ``_expected_gain_runs``). ``unconstrained``
    runs every full round.

    Example:
        >>> sorted(run_tiers(PaperConfig(tasks=3, seed=1)))
        ['degrade', 'refuse', 'unconstrained']
    """
    tasks = _tasks(cfg)
    base, per_task = _unconstrained(cfg, tasks)
    budgets = [max(1, math.floor(spent * cfg.tightness)) for spent in per_task]
    out: dict[str, dict[str, float | int]] = {}
    learned: list[RoundHistory] = []
    for name, degrade in (("refuse", False), ("degrade", True)):
        tally, cheap = _expected_gain_runs(
            cfg,
            tasks,
            budgets,
            tiers=True,
            degrade=degrade,
            record=None if degrade else learned,
            replay=learned if degrade else None,
        )
        row = _row(tally, base)
        row["cheap_tokens"] = cheap
        row["dollars"] = round(
            ((tally.tokens - cheap) * cfg.price_full + cheap * cfg.price_cheap) / 1e6, 4
        )
        out[name] = row
    row = _row(base, base)
    row["cheap_tokens"] = 0
    row["dollars"] = round(base.tokens * cfg.price_full / 1e6, 4)
    return {"unconstrained": row, **out}


def run_paper(cfg: PaperConfig, policies: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the policies (every one by default) on the same tasks; the JSON-ready result.

    Example:
        >>> rows = run_paper(PaperConfig(tasks=3, seed=1), ["paper"])["policies"]
        >>> sorted(rows)
        ['paper', 'unconstrained']
    """
    wanted = set(POLICY_NAMES if policies is None else policies)
    unknown = sorted(wanted - set(POLICY_NAMES))
    if unknown:
        raise ContractError(f"unknown benchmark policy {unknown}; known: {list(POLICY_NAMES)}")
    tasks = _tasks(cfg)
    base, per_task = _unconstrained(cfg, tasks)
    budgets = [max(1, math.floor(spent * cfg.tightness)) for spent in per_task]
    runners: dict[str, Callable[[], _Tally | None]] = {
        "unconstrained": lambda: base,
        "flat_caps": lambda: _flat(cfg, tasks, budgets),
        "tbcontracts": lambda: _tbcontracts(cfg, tasks, budgets),
        "tbc_greedy": lambda: _ours(cfg, tasks, budgets, full=False),
        "paper": lambda: _ours(cfg, tasks, budgets, full=True),
        "expected_gain": lambda: _expected_gain_runs(cfg, tasks, budgets)[0],
        "informed": lambda: _informed(cfg, tasks, budgets),
        "oracle_budget": lambda: _oracle_budget(cfg, tasks, budgets),
        "oracle": lambda: _oracle(cfg, tasks),
    }
    tallies = {
        name: run() for name, run in runners.items() if name == "unconstrained" or name in wanted
    }
    rows = {name: _row(tally, base) for name, tally in tallies.items() if tally is not None}
    config = asdict(cfg)
    config["team"] = [asdict(s) for s in cfg.team]
    return {"config": config, "recommended": RECOMMENDED, "policies": rows}


def run_ablation(cfg: PaperConfig) -> dict[str, dict[str, float]]:
    """Each element of the paper's model and of the recommended one alone.

    ``weighted_only``: the confidence-weighted policy with the fixed gate;
    ``adaptive_only``: greedy reallocation with adaptive gating;
    ``last_confidence``: ``expected_gain`` weighing each round's own confidence
    instead of every confidence of the task combined;
    ``expected_gain_policy``: ``tbc_greedy``'s run (agents by priority, fixed gate)
    with :class:`~tbc_integrations.policies.ExpectedGainPolicy` lending instead of
    greedy: the run-time policy without the scheduler.

    Example:
        >>> sorted(run_ablation(PaperConfig(tasks=3, seed=1)))[:2]
        ['adaptive_only', 'expected_gain_policy']
    """
    tasks = _tasks(cfg)
    base, per_task = _unconstrained(cfg, tasks)
    budgets = [max(1, math.floor(spent * cfg.tightness)) for spent in per_task]
    base_acc = base.correct / base.weight
    out = {}
    runs: dict[str, Callable[[], _Tally]] = {
        "weighted_only": lambda: _ours(cfg, tasks, budgets, full=False, weighted=True),
        "adaptive_only": lambda: _ours(cfg, tasks, budgets, full=True, weighted=False),
        "last_confidence": lambda: _expected_gain_runs(cfg, tasks, budgets, combine=False)[0],
        "expected_gain_policy": lambda: _ours(
            cfg, tasks, budgets, full=False, policy=ExpectedGainPolicy(kappa=cfg.kappa)
        ),
    }
    for name, run in runs.items():
        tally = run()
        accuracy = tally.correct / tally.weight
        out[name] = {
            "tokens": tally.tokens,
            "accuracy": round(accuracy, 4),
            "reduction": round(1 - tally.tokens / base.tokens, 4),
            "preservation": round(accuracy / base_acc, 4),
            "refusals": tally.refusals,
        }
    return out


def _ahead(row: dict[str, Any], peer: dict[str, Any] | None) -> bool:
    """No more tokens and no less accuracy than ``peer``, and strictly better in one."""
    return peer is not None and (
        row["tokens"] <= peer["tokens"]
        and row["accuracy"] >= peer["accuracy"]
        and (row["tokens"] < peer["tokens"] or row["accuracy"] > peer["accuracy"])
    )


def _print_table(result: dict[str, Any]) -> None:
    print(
        f"{'policy':<15}{'tokens':>10}{'accuracy':>10}{'reduction':>11}{'preserved':>11}"
        f"{'refusals':>10}{'starved':>9}"
    )
    for name, row in result["policies"].items():
        print(
            f"{name:<15}{row['tokens']:>10,}{row['accuracy']:>10.3f}{row['reduction']:>11.1%}"
            f"{row['preservation']:>11.1%}{row['refusals']:>10}{row['starved_high_priority']:>9}"
        )


def _plot(results: Sequence[tuple[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = dict(zip(POLICY_NAMES, "osD^*PvXx", strict=True))
    for label, result in results:
        for name, row in result["policies"].items():
            recommended = name == result.get("recommended")
            ax.scatter(
                row["tokens"],
                row["accuracy"],
                marker=markers.get(name, "o"),
                s=70 if recommended else 36,
                label=f"{name}{' (recommended)' if recommended else ''} {label}".strip(),
            )
    ax.set_xlabel("tokens spent")
    ax.set_ylabel("accuracy (priority-weighted)")
    ax.set_title("Tokens against accuracy, by policy (the oracles bound every policy)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tbc_integrations.bench paper [options]``."""
    parser = argparse.ArgumentParser(prog="python -m tbc_integrations.bench")
    sub = parser.add_subparsers(dest="bench", required=True)
    paper = sub.add_parser("paper", help="test the paper's claim on a seeded simulation")
    defaults = PaperConfig()
    for name in ("seed", "tasks", "rounds", "window", "min_samples"):
        paper.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in (
        "decay",
        "noise",
        "tightness",
        "threshold",
        "alpha",
        "lam",
        "kappa",
        "optimism",
        "cheap_cost",
        "cheap_gain",
        "degrade_below",
        "price_full",
        "price_cheap",
    ):
        paper.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name)
        )
    paper.add_argument(
        "--price-floor",
        type=float,
        default=defaults.price_floor,
        metavar="X",
        help="expected_gain: a token must buy at least X priority-weighted accuracy, "
        "whatever the shadow price (default 0: off; for scans, not a recommended setting)",
    )
    paper.add_argument(
        "--informed-price",
        type=float,
        default=defaults.informed_price,
        metavar="X",
        help="informed: run a round only if it buys at least X priority-weighted accuracy "
        "a token (default 0; for scans)",
    )
    paper.add_argument(
        "--informed-stop",
        type=float,
        default=defaults.informed_stop,
        metavar="B",
        help=f"informed: stop an agent at belief B (default {defaults.informed_stop})",
    )
    paper.add_argument(
        "--policies",
        nargs="+",
        choices=POLICY_NAMES,
        metavar="NAME",
        help=f"run only these rows (default: all): {', '.join(POLICY_NAMES)}",
    )
    paper.add_argument("--json", type=Path, help="write the result as JSON here")
    paper.add_argument("--plot", type=Path, help="write a tokens-against-accuracy PNG here")
    paper.add_argument("--sweep", action="store_true", help="also sweep noise and tightness")
    paper.add_argument(
        "--ablation", action="store_true", help="also run each of the paper's two elements alone"
    )
    paper.add_argument(
        "--tiers",
        action="store_true",
        help="also run the tiered model: degradation to a cheap tier against refusal",
    )
    args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k in PaperConfig.__dataclass_fields__}
    try:
        cfg = PaperConfig(**fields)
    except ContractError as exc:
        paper.error(str(exc))
    result = run_paper(cfg, args.policies)
    if "tbcontracts" in (args.policies or POLICY_NAMES) and "tbcontracts" not in result["policies"]:
        print(
            "note: the tbcontracts row is left out: the token-budget-contracts package is not "
            "installed (pip install 'tbc-integrations[bench]')",
            file=sys.stderr,
        )
    print(
        f"paper benchmark: {cfg.tasks} tasks, seed {cfg.seed}, noise {cfg.noise}, "
        f"tightness {cfg.tightness}"
    )
    _print_table(result)
    plotted = [("", result)]
    if args.ablation:
        result["ablation"] = run_ablation(cfg)
        print("\nablation: each element of the paper's and of the recommended model alone")
        for name, row in result["ablation"].items():
            print(
                f"  {name:<22}{row['tokens']:>10,}{row['accuracy']:>10.3f}"
                f"{row['reduction']:>11.1%}{row['preservation']:>11.1%}{row['refusals']:>10}"
            )
    if args.sweep:
        result["sweep"] = []
        print(
            f"\nsweep: {RECOMMENDED} (recommended) and paper against tbcontracts, "
            "informed and the oracles"
        )
        for noise in (0.1, 0.2, 0.4):
            for tightness in (0.4, 0.5, 0.7):
                r = run_paper(PaperConfig(**{**fields, "noise": noise, "tightness": tightness}))
                rows = r["policies"]
                peer = rows.get("tbcontracts")
                ahead = {name: _ahead(rows[name], peer) for name in (RECOMMENDED, "paper")}
                r["ahead_of_tbcontracts"] = ahead
                result["sweep"].append({"noise": noise, "tightness": tightness, **r})
                rec, oracle, held = rows[RECOMMENDED], rows["oracle"], rows["oracle_budget"]
                informed = rows["informed"]
                peer_text = (
                    "n/a" if peer is None else f"{peer['tokens']:>9,} {peer['accuracy']:.3f}"
                )
                print(
                    f"  noise {noise:.1f} tightness {tightness:.1f}: "
                    f"{RECOMMENDED} {rec['tokens']:>9,} {rec['accuracy']:.3f} "
                    f"({rec['reduction']:.0%} fewer, {rec['preservation']:.1%} kept)"
                    f" | tbcontracts {peer_text}"
                    f" | informed {informed['tokens']:>9,} {informed['accuracy']:.3f}"
                    f" ({informed['preservation']:.1%} kept)"
                    f" | oracle {oracle['tokens']:>9,} {oracle['accuracy']:.3f}"
                    f" (in budget {held['tokens']:>9,} {held['accuracy']:.3f})"
                    f" | ahead: {'yes' if ahead[RECOMMENDED] else 'NO'}"
                    f" (paper {'yes' if ahead['paper'] else 'NO'})"
                )
    if args.tiers:
        result["tiers"] = run_tiers(cfg)
        print(
            f"\ntiers (cheap tier: {cfg.cheap_cost:.0%} of the tokens, {cfg.cheap_gain:.0%} of "
            f"the gain; ${cfg.price_full}/M against ${cfg.price_cheap}/M), same budget:"
        )
        print(
            f"  {'row':<14}{'tokens':>10}{'cheap':>9}{'dollars':>10}"
            f"{'accuracy':>10}{'refusals':>10}"
        )
        for name, row in result["tiers"].items():
            print(
                f"  {name:<14}{row['tokens']:>10,}{row['cheap_tokens']:>9,}{row['dollars']:>10.2f}"
                f"{row['accuracy']:>10.3f}{row['refusals']:>10}"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        _plot(plotted, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
