"""A team per run: every run key gets its own copy of the team, on every store.

``BudgetManager(team_per="run", forget_after=...)``: fresh allocations per run,
reallocation within one run's team only, the limits above the team shared by every
run and held with it in one step, forgetting after the idle time, and durability
across store objects and processes.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tbc_integrations import (
    BudgetExceededError,
    BudgetManager,
    ContractError,
    Limit,
    LimitExceededError,
    Usage,
)
from tbc_integrations.events import BudgetEvent, event_to_dict
from tests import run_team_workers

from .conftest import STORE_KINDS, FakeClock, store_url


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def manager(
    url: str, clock: Any = None, forget_after: Any = "7d", limits: list[Limit] | None = None
) -> BudgetManager:
    m = BudgetManager(
        url,
        namespace="teams",
        team_per="run",
        forget_after=forget_after,
        clock=clock or FakeClock(),
        limits=limits or [],
    )
    m.register_agent("hi", priority=3, max_tokens=100)
    m.register_agent("lo", priority=1, max_tokens=100, min_reserve=0)
    return m


def numbers(m: BudgetManager, run: str | None = None) -> dict[str, tuple[int, int, int]]:
    status = m.status() if run is None else m.team_status(run)
    return {n: (s.allocated, s.consumed, s.reserved) for n, s in status.items()}


FRESH = {"hi": (100, 0, 0), "lo": (100, 0, 0)}


def team_storage(m: BudgetManager, run: str) -> bool:
    """Whether the store still keeps anything of ``run``'s team (its storage)."""
    store: Any = m.store
    kind = type(store).__name__
    if kind == "MemoryStore":
        return run in store._tables.teams
    if kind == "SQLiteStore":
        with store._read() as tx:
            rows = tx.db.execute(
                "SELECT (SELECT COUNT(*) FROM teams WHERE ns = ? AND key = ?) + "
                "(SELECT COUNT(*) FROM team_agents WHERE ns = ? AND team = ?)",
                (store.namespace, run, store.namespace, run),
            ).fetchone()
        return bool(rows[0])
    return bool(store.client.exists(store._key + "team:" + run))


def test_each_run_has_fresh_allocations_and_borrows_only_within_its_team(
    kind: str, tmp_path: Path
) -> None:
    m = manager(store_url(kind, tmp_path))
    with m.scope(run="r1"):
        r1 = m.reserve("hi", 150, 30)  # borrows 80 from r1's lo
    assert r1.team == "r1" and r1.loans == (("lo", 80),)
    r2 = m.reserve("hi", 150, 30, scope={"run": "r2"})  # r2's own lo lends as much
    assert r2.loans == (("lo", 80),)
    assert numbers(m) == FRESH  # the registered team is the template: untouched
    assert numbers(m, "r1") == {"hi": (180, 0, 180), "lo": (20, 0, 0)}
    m.commit(r1, Usage(100, 10))  # 70 unused: back to r1's lo
    assert numbers(m, "r1") == {"hi": (110, 110, 0), "lo": (90, 0, 0)}
    assert numbers(m, "r2") == {"hi": (180, 0, 180), "lo": (20, 0, 0)}
    with m.scope(run="r2"):  # reallocation: within r2's team only
        assert m.reallocate("hi", 500) == 20
        m.complete("lo")
    assert numbers(m, "r2") == {"hi": (200, 0, 180), "lo": (0, 0, 0)}
    assert m.team_status("r2")["lo"].complete and not m.team_status("r1")["lo"].complete
    assert numbers(m, "r3") == FRESH  # a run never seen reads as fresh, and is not made
    assert not team_storage(m, "r3")
    m.commit(r2, Usage(180, 0))
    # every team conserves its allocation
    for run in ("r1", "r2", "r3"):
        assert sum(s.allocated for s in m.team_status(run).values()) == 200


def test_limits_above_the_team_are_shared_by_every_run(kind: str, tmp_path: Path) -> None:
    m = manager(store_url(kind, tmp_path), limits=[Limit("user", max_tokens=250)])
    with m.scope(user="ann", run="r1"):
        m.commit(m.reserve("hi", 100, 50), Usage(100, 50))
    with m.scope(user="ann", run="r2"):
        held = m.reserve("hi", 60, 20)  # held in r2's hi and in ann's limit, at once
        assert m.limit_status("user", "ann").reserved == 80
        assert m.team_status("r2")["hi"].reserved == 80
        with pytest.raises(LimitExceededError, match="user/ann"):
            m.reserve("lo", 21, 0)  # r2's lo has 100, ann has 20 left
        m.release(held)
    assert numbers(m, "r2") == FRESH  # nothing held after the refusal and the release
    assert m.limit_status("user", "ann").consumed == 150
    with m.scope(user="bob", run="r3"):  # another user's runs are not touched
        m.commit(m.reserve("hi", 100), Usage(100, 0))
    assert m.limit_status("user", "ann").remaining == 100


def test_a_call_without_its_run_is_refused_naming_the_key(kind: str, tmp_path: Path) -> None:
    m = manager(store_url(kind, tmp_path))
    for verb in (
        lambda: m.reserve("hi", 10),
        lambda: m.check("hi", 10),
        lambda: m.charge("hi", Usage(10, 0)),
        lambda: m.complete("hi"),
        lambda: m.record_confidence("hi", 0.5),
        lambda: m.reallocate("hi", 5),
    ):
        with pytest.raises(ContractError, match=r"team per 'run'.*no 'run'"):
            verb()
    assert numbers(m) == FRESH and not m.store.open_reservations()
    with pytest.raises(ContractError, match="team_per must be a scope key"):
        BudgetManager(team_per="")
    with pytest.raises(ContractError, match="forget_after must be"):
        BudgetManager(team_per="run", forget_after="a week")
    with pytest.raises(ContractError, match="team_status needs"):
        BudgetManager().team_status("r1")


def test_a_run_is_forgotten_a_configured_time_after_its_last_activity(
    kind: str, tmp_path: Path
) -> None:
    clock = FakeClock()
    m = manager(store_url(kind, tmp_path), clock, forget_after="60s")
    with m.scope(run="r1"):
        m.commit(m.reserve("hi", 30, lease_seconds=1), Usage(30, 0))
        clock.advance(59)
        m.commit(m.reserve("hi", 20, lease_seconds=1), Usage(20, 0))  # activity: 60 s more
        clock.advance(60)  # a reservation is activity until its lease end
        assert m.team_status("r1")["hi"].consumed == 50
        clock.advance(1)  # 60 s after the last activity: forgotten
        assert numbers(m, "r1") == FRESH
        assert m.reserve("hi", 100).amount == 100  # a fresh team: all of hi's 100
    # an open reservation keeps its run until its lease end plus the idle time
    with m.scope(run="r2"):
        m.reserve("hi", 40, lease_seconds=300)
    clock.advance(300 + 59)  # the lease lapsed (and was reclaimed), the run is kept
    assert numbers(m, "r2") == {"hi": (100, 0, 0), "lo": (100, 0, 0)}
    assert team_storage(m, "r2")
    clock.advance(1)
    assert numbers(m, "r2") == FRESH and team_storage(m, "r2")  # forgotten, not yet deleted
    m.reserve("lo", 1, scope={"run": "r4"})  # a new run's team deletes forgotten ones
    assert not team_storage(m, "r2") and not team_storage(m, "r1")


def test_a_late_commit_after_its_run_was_forgotten_counts_in_the_limits(
    kind: str, tmp_path: Path
) -> None:
    clock = FakeClock()
    m = manager(
        store_url(kind, tmp_path), clock, forget_after=30, limits=[Limit("app", max_tokens=10_000)]
    )
    seen: list[BudgetEvent] = []
    m.subscribe(seen.append)
    with m.scope(run="r1", app="all"):
        r = m.reserve("hi", 50, lease_seconds=10)
        clock.advance(45)  # lease lapsed at 10, the run was forgotten at 40
        assert numbers(m, "r1") == FRESH
        assert m.commit(r, Usage(70, 5)) == 0
    assert m.limit_status("app", "all").consumed == 75  # no usage is lost
    assert m.limit_status("app", "all").reserved == 0
    assert numbers(m, "r1") == FRESH
    assert [e.reason for e in seen if e.kind == "commit"] == ["forgotten"]


def test_events_name_the_run_whose_team_they_are_about(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    m = manager(store_url(kind, tmp_path), clock, limits=[Limit("app", max_tokens=10**6)])
    seen: list[BudgetEvent] = []
    m.subscribe(seen.append)
    with m.scope(run="r1", app="all"):
        r = m.reserve("hi", 150, lease_seconds=5)  # borrow + reserve
        m.commit(r, Usage(140, 0))  # commit + a loan returned
        m.release(m.reserve("hi", 10))
        m.reserve("hi", 10, lease_seconds=5)
        with pytest.raises(BudgetExceededError):
            m.reserve("hi", 500)  # a refusal
        m.complete("lo")
        m.record_confidence("hi", 0.5)
    clock.advance(10)
    m.reserve("hi", 1, scope={"run": "r2", "app": "all"})  # r1's lease lapses here
    assert {e.run for e in seen[:-1]} == {"r1"} and seen[-1].run == "r2"
    assert seen[-1].kind == "reserve" and seen[-2].kind == "expire"  # r1's, lapsed in r2's call
    kinds = {e.kind for e in seen}
    assert kinds >= {"transfer", "reserve", "commit", "release", "refuse", "complete"}
    assert kinds >= {"confidence", "expire"}
    # the registered team's events name no run (and their dicts read as before)
    plain = BudgetManager(store_url(kind, tmp_path), namespace="plain-events")
    plain.register_agent("a", max_tokens=10)
    events: list[BudgetEvent] = []
    plain.subscribe(events.append)
    plain.commit(plain.reserve("a", 5), Usage(5, 0))
    assert [e.run for e in events] == ["", ""]
    assert "run" not in event_to_dict(events[0])


def test_a_late_commit_is_activity_that_keeps_its_run(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    m = manager(store_url(kind, tmp_path), clock, forget_after=30)
    with m.scope(run="r1"):
        r = m.reserve("hi", 50, lease_seconds=10)
        clock.advance(35)  # lapsed; the run lives until 10 + 30
        m.commit(r, Usage(50, 0))  # activity at 35: the run lives until 65
        clock.advance(25)
        assert m.team_status("r1")["hi"].consumed == 50


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k != "memory"])
def test_a_run_survives_another_manager_object_on_a_durable_store(
    kind: str, tmp_path: Path
) -> None:
    url = store_url(kind, tmp_path)
    first = manager(url, forget_after="1h")
    with first.scope(run="r1"):
        first.commit(first.reserve("hi", 150), Usage(120, 0))
    second = manager(url, forget_after="1h")  # another process's manager (same clock time)
    assert numbers(second, "r1") == {"hi": (120, 120, 0), "lo": (80, 0, 0)}
    with pytest.raises(BudgetExceededError), second.scope(run="r1"):
        second.reserve("hi", 81)  # 80 left in r1 (lo lends to its reserve of 0)
    assert second.reserve("hi", 200, scope={"run": "r2"}).amount == 200


def test_plain_managers_keep_no_teams(kind: str, tmp_path: Path) -> None:
    m = BudgetManager(store_url(kind, tmp_path), namespace="plain")
    m.register_agent("a", max_tokens=100)
    r = m.reserve("a", 10, scope={"run": "r1"})  # a scope without team_per names no team
    assert r.team == ""
    m.commit(r, Usage(10, 0))
    assert m.status()["a"].consumed == 10
    assert not team_storage(m, "r1")


def test_fifty_concurrent_runs_keep_independent_budgets(kind: str, tmp_path: Path) -> None:
    m = manager(store_url(kind, tmp_path), limits=[Limit("app", max_tokens=1_000_000)])
    committed: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    lock = threading.Lock()

    def run(i: int) -> None:
        key = f"run-{i}"
        with m.scope(run=key, app="all"):
            for _ in range(12):  # 12 x 20: more than the run's 200 tokens
                try:
                    r = m.reserve("hi", 15, 5)
                except BudgetExceededError:
                    with lock:
                        refused[key] += 1
                    continue
                m.commit(r, Usage(15, 5))
                with lock:
                    committed[key] += 20

    threads = [threading.Thread(target=run, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(50):  # each run spent exactly its own team: 200 tokens, 2 refusals
        key = f"run-{i}"
        assert committed[key] == 200 and refused[key] == 2
        assert numbers(m, key) == {"hi": (200, 200, 0), "lo": (0, 0, 0)}
    assert m.limit_status("app", "all").consumed == 50 * 200
    assert numbers(m) == FRESH


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k != "memory"])
def test_four_processes_spend_in_shared_runs_with_exact_totals(kind: str, tmp_path: Path) -> None:
    url = store_url(kind, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(run_team_workers.spend, [(url, seed, 320) for seed in range(4)])
    committed: Counter[str] = Counter()
    for r in results:
        committed.update(r)
    m = run_team_workers.manager(url)
    for run in run_team_workers.RUNS:
        team = m.team_status(run)
        assert team["writer"].consumed == committed[run]  # every token, exactly once
        assert sum(s.reserved for s in team.values()) == 0
        assert committed[run] <= run_team_workers.PER_RUN  # the run's team, never more
        assert committed[run] > run_team_workers.PER_RUN - 100  # spent to the end
    for user in range(4):
        runs = run_team_workers.RUNS[2 * user : 2 * user + 2]
        assert m.limit_status("user", f"u{user}").consumed == sum(committed[r] for r in runs)
    assert m.status()["writer"].consumed == 0  # the registered team: a template
