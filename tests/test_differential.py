"""The one engine on every store: random verb sequences leave the same state and events.

The memory and SQLite stores run ``tbc_integrations._engine`` in their own
transactions; the Redis store runs its Lua port (through FCALL and EVALSHA). The
same sequence of verbs (leases lapsing, both policies, overdrafts, late commits,
refusals, bad references, limits with calendar and rolling windows, agents' and limits'
soft limits) must give each verb the same outcome, leave the same ``status()``, limit
statuses (read after every move of the clock too) and limit rows (with each agent's
spend in them) and deliver the same events (warnings too), reservation ids aside.

``python scripts/differential.py --runs 2000`` runs the same check longer.
"""

from __future__ import annotations

import contextlib
import random
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tbc_integrations import BudgetContract, BudgetManager, Limit, Reservation, TBCError
from tbc_integrations.events import BudgetEvent, event_to_dict
from tbc_integrations.policies import (
    ConfidenceWeightedPolicy,
    ExpectedGainPolicy,
    GreedyPolicy,
    ReallocationPolicy,
)
from tests.conftest import STORE_KINDS, FakeClock, redis_url

AGENTS = ("planner", "researcher", "writer", "critic", "idle")
COSTS = (None, None, "0", "0.0001", "0.000999999", "0.01")
SCOPES: tuple[dict[str, str], ...] = ({"user": "u1"}, {"user": "u2"}, {"user": "u/3"}, {})
"""A call's scope: a user of the limits, or none (refused when a limit needs its key)."""
"""Money a reservation holds or a commit spends (``None``: unpriced / what was held)."""
RUNS = ("r1", "r2", "r/3", None)
"""The run a verb runs in, on a manager with a team per run (``None``: refused, naming it)."""


@dataclass(frozen=True)
class Teams:
    """A script's teams per run: how long a run's team outlives its last activity, and the
    run each verb runs in (an enclosing ``manager.scope(run=...)``)."""

    forget_after: float
    runs: tuple[str | None, ...]


def teams_of(seed: int, steps: int) -> Teams | None:
    """Half the scripts keep a team per run (drawn apart, so the verbs stay the same)."""
    rng = random.Random(seed * 7919 + 17)
    if rng.random() < 0.5:
        return None
    forget = rng.choice([20.0, 200.0, 3_600.0])
    return Teams(forget, tuple(rng.choice(RUNS) for _ in range(steps)))


def team(rng: random.Random) -> list[BudgetContract]:
    """A random team: priorities, budgets, reserves, caps, thresholds and dependencies."""
    out = []
    for i, name in enumerate(AGENTS):
        budget = rng.choice([0, 50, 200, 1_000])
        caps = rng.random() < 0.3
        max_cost = rng.choice([None, None, "0.0005", "0.002", "0.05"])
        money_only = max_cost is not None and rng.random() < 0.3
        out.append(
            BudgetContract(
                name,
                priority=rng.randint(1, 3),
                max_tokens=None if money_only else budget,
                max_cost=max_cost,
                min_reserve=None if money_only else rng.choice([None, 0, budget // 2]),
                confidence_threshold=rng.choice([None, None, 0.5, 0.8]),
                max_input_tokens=budget // 2 if caps else None,
                max_output_tokens=budget // 3 if caps else None,
                depends_on=[AGENTS[i - 1]] if i and rng.random() < 0.3 else [],
                warn_at=rng.choice([None, None, 0.3, 0.8, 1.0]),
            )
        )
    return out


def limits_of(rng: random.Random) -> list[Limit]:
    """Random limits above the team: per user (some per period, some soft) and app-wide."""
    out = []
    if rng.random() < 0.7:
        max_tokens = rng.choice([None, 300, 2_000])
        out.append(
            Limit(
                "user",
                max_tokens=max_tokens,
                max_cost="0.005" if max_tokens is None or rng.random() < 0.3 else None,
                window=rng.choice([None, "hour", "2m", "2m", "30m"]),
                warn_at=rng.choice([None, 0.5, 0.9]),
            )
        )
    if rng.random() < 0.3:
        out.append(Limit("app", max_tokens=4_000, window="day", default="all", warn_at=0.8))
    if rng.random() < 0.3:  # a rolling money limit across the app
        out.append(Limit("spend", max_cost="0.02", window="5m", default="all", warn_at=0.5))
    return out


def script(
    seed: int, steps: int
) -> tuple[list[BudgetContract], ReallocationPolicy, list[Any], list[Limit]]:
    """A random sequence of verbs (plain data, so every store gets the very same one)."""
    rng = random.Random(seed)
    limits = limits_of(rng)
    draw = rng.random()
    policy: ReallocationPolicy = (
        GreedyPolicy()
        if draw < 0.4
        else ConfidenceWeightedPolicy(alpha=rng.choice([0.1, 0.3, 1.0, 2.5]))
        if draw < 0.7
        else ExpectedGainPolicy(
            first=rng.choice([0.1, 0.5, 0.9]),
            lift=rng.choice([0.2, 0.5, 1.0]),
            kappa=rng.choice([0.0, 0.1, 1.0, 30.0]),
        )
    )
    ops: list[Any] = []
    for _ in range(steps):
        agent = rng.choice([*AGENTS, "nobody"]) if rng.random() < 0.05 else rng.choice(AGENTS)
        kind = rng.choices(
            [
                "reserve",
                "commit",
                "release",
                "check",
                "charge",
                "reallocate",
                "adjust",
                "complete",
                "confidence",
                "threshold",
                "advance",
                "expire",
            ],
            weights=[30, 25, 8, 4, 4, 4, 3, 2, 5, 2, 10, 3],
        )[0]
        if kind in ("reserve", "check"):
            ops.append(
                (
                    kind,
                    agent,
                    rng.choice([0, 10, 60, 300]),
                    rng.choice([0, 20, 150, 800]),
                    rng.choice([5.0, 30.0, 300.0]),
                    rng.random() < 0.3,
                    rng.choice(COSTS),
                    rng.choice(SCOPES),
                )
            )
        elif kind in ("commit", "release"):
            # which reservation (by issue order; may be settled, lapsed or unknown)
            usage = (rng.choice([0, 10, 60, 400]), rng.choice([0, 15, 200, 900]))
            ops.append((kind, rng.randint(-1, 30), usage, rng.random() < 0.2, rng.choice(COSTS)))
        elif kind == "charge":
            usage = (rng.choice([0, 30, 500]), rng.choice([0, 40, 700]))
            ops.append((kind, agent, usage, rng.choice(COSTS) or "0", rng.choice(SCOPES)))
        elif kind == "reallocate":
            ops.append((kind, agent, rng.choice([0, 25, 400])))
        elif kind == "adjust":
            ops.append((kind, agent, rng.choice([-300, -20, 15, 250])))
        elif kind == "confidence":
            ops.append((kind, agent, rng.choice([0.0, 0.3, 0.1 + 0.2, 0.5, 0.79, 0.8, 1.0])))
        elif kind == "threshold":
            ops.append((kind, agent, rng.choice([None, 0.4, 0.9])))
        elif kind == "advance":
            ops.append((kind, rng.choice([1.0, 6.0, 31.0, 400.0])))
        else:
            ops.append((kind, agent))
    return team(rng), policy, ops, limits


@dataclass
class Run:
    """What one store did with a script."""

    outcomes: list[Any] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    limits: list[dict[str, Any]] = field(default_factory=list)


def _normal(event: BudgetEvent, ids: dict[str, str]) -> dict[str, Any]:
    data = event_to_dict(event)
    del data["namespace"]
    rid = data["reservation_id"]
    if rid is not None:
        data["reservation_id"] = ids.setdefault(rid, f"r{len(ids)}")
    return data


def limit_numbers(m: BudgetManager) -> list[Any]:
    """Every limit's status for every scope value the scripts use."""
    values = [scope["user"] for scope in SCOPES if scope] + ["all"]
    return [m.limit_status(name, v).to_dict() for name in m.limit_names for v in values]


def play(
    url: str,
    contracts: list[BudgetContract],
    policy: ReallocationPolicy,
    ops: list[Any],
    limits: list[Limit] | None = None,
    teams: Teams | None = None,
) -> Run:
    clock = FakeClock()
    m = BudgetManager(
        store=url,
        namespace=f"d-{uuid.uuid4().hex[:12]}",
        policy=policy,
        clock=clock,
        limits=limits or (),
        team_per=None if teams is None else "run",
        forget_after=3_600.0 if teams is None else teams.forget_after,
    )
    run = Run()
    seen: list[BudgetEvent] = []
    m.subscribe(seen.append)
    issued: list[Reservation] = []
    ids: dict[str, str] = {}
    try:
        for contract in contracts:
            m.add_contract(contract)
        for step, op in enumerate(ops):
            kind = op[0]
            run_key = None if teams is None else teams.runs[step]
            try:
                scope = m.scope(run=run_key) if run_key is not None else contextlib.nullcontext()
                with scope:
                    out = _play_one(m, clock, op, issued)
            except TBCError as exc:
                out = type(exc).__name__
            run.outcomes.append((kind, out))
        run.status = {name: s.to_dict() for name, s in m.status().items()}
        run.status["limits"] = limit_numbers(m)
        run.limits = [s.to_dict() for s in m.limit_statuses()]
        for key in RUNS if teams is not None else ():
            if key is not None:
                run.status[f"team {key}"] = {n: s.to_dict() for n, s in m.team_status(key).items()}
        run.events = [_normal(e, ids) for e in seen]
    finally:
        m.store.close()
    return run


def _play_one(m: BudgetManager, clock: FakeClock, op: Any, issued: list[Reservation]) -> Any:
    """One verb of a script; its outcome."""
    kind = op[0]
    if kind == "reserve":
        r = m.reserve(
            op[1],
            op[2],
            op[3],
            lease_seconds=op[4],
            clamp_output=op[5],
            cost=op[6],
            scope=op[7],
        )
        issued.append(r)
        out: Any = (r.agent, r.input_tokens, r.output_tokens, r.expires_at, r.loans)
        out = (*out, r.cost_nanos, r.limits, r.team)
    elif kind == "check":
        m.check(op[1], op[2], op[3], cost=op[6], scope=op[7])
        out = None
    elif kind in ("commit", "release"):
        k = op[1]
        if k < 0 or k >= len(issued):
            target = Reservation("never-issued", "planner", 1, 1, 0.0)
        else:
            target = issued[k]
        if kind == "commit":
            out = m.commit(target, None if op[3] else op[2], cost=op[4])
        else:
            m.release(target)
            out = None
    elif kind == "charge":
        out = m.charge(op[1], op[2], cost=op[3], scope=op[4])
    elif kind == "reallocate":
        out = m.reallocate(op[1], op[2])
    elif kind == "adjust":
        m.adjust_allocation(op[1], op[2])
        out = None
    elif kind == "complete":
        m.complete(op[1])
        out = None
    elif kind == "confidence":
        out = m.record_confidence(op[1], op[2])
    elif kind == "threshold":
        m.set_threshold(op[1], op[2])
        out = None
    elif kind == "advance":  # what each limit counts, once the time moved
        clock.advance(op[1])
        out = limit_numbers(m)
    else:
        out = m.expire()
    return out


def urls(tmp: Path) -> dict[str, str]:
    out = {"memory": "memory://", "sqlite": "sqlite:///" + str(tmp / "diff.db")}
    if "redis" in STORE_KINDS:
        out["redis"] = redis_url()
        out["redis-eval"] = redis_url() + "?functions=no"
    return out


def compare(seed: int, steps: int, tmp: Path) -> None:
    """Play the script of ``seed`` on every store; fail on the first difference."""
    contracts, policy, ops, limits = script(seed, steps)
    teams = teams_of(seed, len(ops))
    runs = {
        kind: play(url, contracts, policy, ops, limits, teams) for kind, url in urls(tmp).items()
    }
    base = runs.pop("memory")
    for kind, run in runs.items():
        for i, (a, b) in enumerate(zip(base.outcomes, run.outcomes, strict=True)):
            assert a == b, f"seed {seed}: verb {i} {ops[i]!r}: memory {a!r}, {kind} {b!r}"
        assert base.status == run.status, f"seed {seed}: status differs on {kind}"
        assert base.limits == run.limits, f"seed {seed}: limit rows differ on {kind}"
        for i, (a, b) in enumerate(zip(base.events, run.events, strict=False)):
            assert a == b, f"seed {seed}: event {i}: memory {a!r}, {kind} {b!r}"
        assert len(base.events) == len(run.events), f"seed {seed}: event count on {kind}"
    # the script did something worth comparing
    assert base.events
    # each row's spend per agent adds up to the row (tokens and money)
    # (a rolling window's row counts only its window; its agents keep all it settled)
    for row in base.limits:
        spent = row["agents"].values()
        tokens, cost = sum(a["tokens"] for a in spent), sum(Decimal(a["cost"]) for a in spent)
        if re.fullmatch(r"\d+[smhd]", row["period"]):
            assert tokens >= row["consumed"] and cost >= Decimal(row["cost"]), f"seed {seed}"
        else:
            assert tokens == row["consumed"], f"seed {seed}: {row}"
            assert cost == Decimal(row["cost"]), f"seed {seed}"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(5, 60))
@pytest.mark.stress
def test_every_store_runs_the_same_engine(seed: int, steps: int, tmp_path: Path) -> None:
    compare(seed, steps, tmp_path)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 5, 7, 8, 42, 23, 43])
def test_fixed_scripts_agree(seed: int, tmp_path: Path) -> None:
    compare(seed, 120, tmp_path)


def test_the_fixed_scripts_cover_warnings_and_their_rearming() -> None:
    """Seeds 0, 23 and 43 re-arm an agent's warning (a grant or reallocation after it warned)
    and warn it again; the fixed scripts warn agents and limits and fill limit rows."""
    kinds: Counter[str] = Counter()
    for seed in (0, 1, 2, 3, 7, 42, 23, 43):
        contracts, policy, ops, limits = script(seed, 120)
        run = play("memory://", contracts, policy, ops, limits)
        warnings = [e for e in run.events if e["kind"] == "warning"]
        warned = Counter(e["agent"] for e in warnings if e["reason"] == "agent")
        kinds["agent"] += sum(warned.values())
        kinds["again"] += sum(1 for n in warned.values() if n > 1)
        kinds["limit"] += sum(1 for e in warnings if e["reason"] != "agent")
        kinds["spend"] += sum(len(row["agents"]) for row in run.limits)
    assert kinds["again"] >= 2 and kinds["agent"] > kinds["again"]
    assert kinds["limit"] > 0 and kinds["spend"] > 0
