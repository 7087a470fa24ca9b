"""Limits above the team: per user, per run, per period, soft warnings; on every store."""

from __future__ import annotations

import multiprocessing
import threading
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal
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
from tbc_integrations.events import BudgetEvent
from tests import limit_workers

from .conftest import STORE_KINDS, FakeClock, store_url

DAY = datetime(2026, 12, 3, 23, 0, tzinfo=timezone.utc).timestamp()  # an hour before midnight


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def manager(kind: str, tmp_path: Path, limits: list[Limit], clock: Any = None) -> BudgetManager:
    m = BudgetManager(store_url(kind, tmp_path), limits=limits, clock=clock or FakeClock(DAY))
    m.register_agent("planner", priority=1, max_tokens=1_000_000)
    m.register_agent("writer", priority=2, max_tokens=1_000_000)
    return m


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": None},
        {"max_tokens": -1},
        {"max_tokens": 10, "window": "fortnight"},
        {"max_tokens": 10, "window": "0h"},
        {"max_tokens": 10, "warn_at": 1.5},
        {"max_tokens": 10, "tz": "Mars/Olympus"},
        {"max_cost": "-1"},
    ],
)
def test_a_bad_limit_is_refused_naming_it_and_the_value(bad: dict[str, Any]) -> None:
    with pytest.raises(ContractError, match="'user'") as err:
        Limit("user", **bad)
    assert "Agent" not in str(err.value)  # a limit is not an agent


def test_a_bad_limit_cost_reads_as_the_limits() -> None:
    with pytest.raises(ContractError) as err:
        Limit("user", max_cost="lots")
    assert str(err.value) == (
        "Limit 'user': max_cost must be an amount of dollars (str, int, Decimal or float), "
        "got 'lots'"
    )


def test_calendar_periods_and_rolling_buckets() -> None:
    t = datetime(2026, 12, 31, 23, 30, tzinfo=timezone.utc).timestamp()
    assert Limit("u", max_tokens=1, window="hour").period(t)[0] == "2026-12-31T23"
    assert Limit("u", max_tokens=1, window="day").period(t) == (
        "2026-12-31",
        datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp(),
    )
    assert Limit("u", max_tokens=1, window="week").period(t)[0] == "2026-W53"
    assert Limit("u", max_tokens=1, window="month").period(t) == (
        "2026-12",
        datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp(),
    )
    # in a timezone: 23:30 UTC on Dec 31 is already Jan 1 in Tokyo
    assert Limit("u", max_tokens=1, window="day", tz="Asia/Tokyo").period(t)[0] == "2027-01-01"
    # a rolling 30 minutes has buckets of 30 s: spend at 12,605 s counts until the end of
    # its bucket (12,630) plus 1,800 s; spend on a bucket's edge for exactly 1,800 s
    assert Limit("u", max_tokens=1, window="30m").period(1_800 * 7 + 5) == ("30m", 14_430)
    rolling = Limit("u", max_tokens=1, window="30m")
    assert rolling.hold("a@b", 12_630)[0] == "u/a@b/30m@14430" and rolling.rolling
    assert Limit("u", max_tokens=1, window="1m").period(100.5) == ("1m", 161)


def test_each_user_has_its_own_limit_and_the_team_keeps_its_rules(
    kind: str, tmp_path: Path
) -> None:
    m = manager(kind, tmp_path, [Limit("user", max_tokens=1_000, window="day")])
    with m.scope(user="alice"):
        m.commit(m.reserve("writer", 600, 200), Usage(600, 200))
        with pytest.raises(LimitExceededError) as err:
            m.reserve("planner", 150, 100)  # 800 + 250 > 1,000: the team could pay, alice not
    assert err.value.limit.startswith("user/alice/") and err.value.available == 200
    assert isinstance(err.value, BudgetExceededError)
    m.commit(m.reserve("planner", 150, 100, scope={"user": "bob"}), Usage(150, 100))
    alice, bob = m.limit_status("user", "alice"), m.limit_status("user", "bob")
    assert (alice.consumed, alice.remaining, bob.consumed, bob.remaining) == (800, 200, 250, 750)
    assert m.status()["planner"].refusals == 1 and m.status()["writer"].consumed == 800


def test_a_call_without_the_limits_key_is_an_error_naming_it(kind: str, tmp_path: Path) -> None:
    m = manager(kind, tmp_path, [Limit("user", max_tokens=1_000)])
    with pytest.raises(ContractError, match="'user'"):
        m.reserve("writer", 10, 10)
    assert m.status()["writer"].reserved == 0
    app = manager(kind, tmp_path / "app", [Limit("app", max_tokens=100, default="all")])
    app.commit(app.reserve("writer", 60, 0), Usage(60, 0))
    with pytest.raises(LimitExceededError, match="app/all/all"):
        app.reserve("planner", 50, 0)


def test_a_period_boundary_starts_fresh_and_an_open_call_settles_in_its_own_period(
    kind: str, tmp_path: Path
) -> None:
    clock = FakeClock(DAY)  # 23:00 UTC
    m = manager(kind, tmp_path, [Limit("user", max_tokens=1_000, window="day")], clock)
    with m.scope(user="alice"):
        m.commit(m.reserve("writer", 500, 0), Usage(500, 0))
        across = m.reserve("writer", 400, 0, lease_seconds=7_200)  # held over midnight
        clock.advance(3_600 + 60)  # 00:01 the next day
        fresh = m.reserve("writer", 900, 0)  # the new day has all its 1,000
        m.commit(across, Usage(450, 0))  # settles in yesterday's row
        m.commit(fresh, Usage(900, 0))
        today = m.limit_status("user")
    assert (today.period, today.consumed, today.reserved) == ("2026-12-04", 900, 0)
    clock.advance(-3_600 - 60)
    yesterday = m.limit_status("user", "alice")
    assert (yesterday.period, yesterday.consumed, yesterday.reserved) == ("2026-12-03", 950, 0)


def test_money_limits_and_release_and_lapse_give_the_hold_back(kind: str, tmp_path: Path) -> None:
    clock = FakeClock(DAY)
    m = manager(kind, tmp_path, [Limit("run", max_cost="0.01")], clock)
    with m.scope(run="r-1"):
        m.release(m.reserve("writer", 10, 10, cost="0.009"))
        m.reserve("writer", 10, 10, cost="0.009", lease_seconds=5)
        with pytest.raises(LimitExceededError) as err:
            m.reserve("planner", 10, 10, cost="0.002")
        assert err.value.money and "$0.002" in str(err.value)
        clock.advance(10)
        assert m.expire() == 1
        r = m.reserve("planner", 10, 10, cost="0.002")
        m.commit(r, Usage(10, 5), cost="0.0015")
        s = m.limit_status("run")
    assert (s.cost, s.cost_reserved, s.cost_remaining) == (
        Decimal("0.0015"),
        Decimal("0.00"),
        Decimal("0.0085"),
    )


def test_a_soft_limit_warns_exactly_once_per_crossing_and_period(kind: str, tmp_path: Path) -> None:
    clock = FakeClock(DAY)
    m = manager(
        kind, tmp_path, [Limit("user", max_tokens=1_000, window="hour", warn_at=0.8)], clock
    )
    warnings: list[BudgetEvent] = []
    m.subscribe(lambda e: warnings.append(e) if e.kind == "warning" else None)
    with m.scope(user="alice"):
        for _ in range(6):  # 6 x 150: crosses 800 on the 6th
            m.commit(m.reserve("writer", 150, 0), Usage(150, 0))
        assert [w.tokens for w in warnings] == [900]
        m.commit(m.reserve("writer", 50, 0), Usage(50, 0))  # still above: no second warning
        clock.advance(3_600)  # the next hour: a fresh row
        for _ in range(6):
            m.commit(m.reserve("writer", 150, 0), Usage(150, 0))
    assert [w.reason.split("/")[1] for w in warnings] == ["alice", "alice"]
    assert len({w.reason for w in warnings}) == 2  # one per period
    assert m.limit_status("user", "alice").warned


def test_eight_threads_and_three_users_never_pass_a_limit(kind: str, tmp_path: Path) -> None:
    m = manager(kind, tmp_path, [Limit("user", max_tokens=5_000, window="day")])
    committed: Counter[str] = Counter()
    lock = threading.Lock()

    def work(seed: int) -> None:
        user = f"u{seed % 3}"
        with m.scope(user=user):
            for i in range(60):
                try:
                    r = m.reserve("writer" if i % 2 else "planner", 80, 40)
                except LimitExceededError:
                    continue
                used = 60 + (seed + i) % 60
                m.commit(r, Usage(used, 0))
                with lock:
                    committed[user] += used

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for user in ("u0", "u1", "u2"):
        s = m.limit_status("user", user)
        assert s.consumed == committed[user] and s.reserved == 0
        assert s.consumed <= 5_000
    assert sum(x.consumed for x in m.status().values()) == sum(committed.values())


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k != "memory"])
def test_four_processes_many_users_a_daily_window_exact_totals(kind: str, tmp_path: Path) -> None:
    url = store_url(kind, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(limit_workers.spend, [(url, seed, 300) for seed in range(4)])
    committed: Counter[str] = Counter()
    for r in results:
        committed.update(r)
    m = limit_workers.manager(url)
    for user in limit_workers.USERS:
        s = m.limit_status("user", user)
        assert s.consumed == committed[user] and s.reserved == 0
        assert s.consumed <= limit_workers.PER_USER
    assert sum(committed.values()) > 0
    # 4 x 300 calls of up to 300 tokens over 5 users: some users reach their 20,000
    assert max(committed.values()) > limit_workers.PER_USER - 300


def test_langchain_metadata_and_langgraph_thread_ids_name_the_scope() -> None:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import END, START, StateGraph
    from typing_extensions import TypedDict

    from tbc_integrations.langchain import BudgetCallbackHandler
    from tbc_integrations.langgraph import govern_graph
    from tbc_integrations.testing import UsageFakeChat

    m = BudgetManager(limits=[Limit("run", max_tokens=60), Limit("user", max_tokens=10_000)])
    m.register_agent("writer", max_tokens=1_000_000)
    chat = UsageFakeChat(reply="a short answer")
    handler = BudgetCallbackHandler(m, agent="writer", default_max_tokens=5)
    chat.invoke(
        "hi", config={"callbacks": [handler], "metadata": {"tbc_scope": {"run": "x", "user": "u"}}}
    )
    assert m.limit_status("run", "x").consumed > 0

    class State(TypedDict, total=False):
        text: str

    def write(state: State) -> State:
        return {"text": str(chat.invoke("write " + state.get("text", "")).content)}

    g = StateGraph(State)
    g.add_node("write", write)
    g.add_edge(START, "write")
    g.add_edge("write", END)
    graph = govern_graph(g, m, agents={"write": "writer"}, default_max_tokens=5).compile(
        checkpointer=InMemorySaver()
    )
    for thread in ("t-1", "t-2"):  # each run has its own 60 tokens
        config: Any = {"configurable": {"thread_id": thread, "user_id": "u-7"}}
        graph.invoke({"text": "go"}, config)
        assert 0 < m.limit_status("run", thread).consumed <= 60
    with pytest.raises(BudgetExceededError):
        for _ in range(10):  # one run past its limit
            graph.invoke({"text": "go"}, {"configurable": {"thread_id": "t-1", "user_id": "u-7"}})
    user = m.limit_status("user", "u-7")
    assert (
        user.consumed
        == m.limit_status("run", "t-1").consumed + m.limit_status("run", "t-2").consumed
    )


def test_a_rolling_window_counts_spend_for_exactly_its_duration(kind: str, tmp_path: Path) -> None:
    t0 = DAY  # on a bucket's edge: a rolling hour has buckets of a minute
    clock = FakeClock(t0)
    m = manager(kind, tmp_path, [Limit("user", max_tokens=1_000, window="1h")], clock)
    with m.scope(user="alice"):
        m.commit(m.reserve("writer", 600, 0), Usage(600, 0))  # spent at t0
        clock.advance(1_800)
        across = m.reserve("writer", 300, 0, lease_seconds=600)  # held at t0 + 30 min
        clock.advance(90)  # a bucket boundary passes while it is open
        m.commit(across, Usage(350, 0))  # counted from when it was held
        clock.now = t0 + 3_600 - 0.5  # just before the first spend's hour is over
        s = m.limit_status("user")
        assert (s.period, s.consumed, s.remaining, s.ends) == ("1h", 950, 50, t0 + 3_600)
        with pytest.raises(LimitExceededError) as err:
            m.reserve("planner", 100, 0)
        assert err.value.limit == "user/alice/1h" and err.value.available == 50
        clock.now = t0 + 3_600  # the 600 left the window, the 350 did not
        s = m.limit_status("user")
        assert (s.consumed, s.remaining, s.ends) == (350, 650, t0 + 1_800 + 3_600)
        held = m.reserve("planner", 600, 0, lease_seconds=7_200)
        clock.advance(1_800)  # the 350 leaves too; the open 600 is still held
        s = m.limit_status("user")
        assert (s.consumed, s.reserved, s.remaining, s.ends) == (0, 600, 400, None)
        m.commit(held, Usage(600, 0))  # in the bucket it was held in: leaves at t0 + 2 h
        s = m.limit_status("user")
    assert (s.consumed, s.reserved, s.ends) == (600, 0, t0 + 7_200)
    assert m.status()["writer"].consumed + m.status()["planner"].consumed == 1_550


def test_a_rolling_window_keeps_a_bounded_number_of_buckets(kind: str, tmp_path: Path) -> None:
    clock = FakeClock(DAY + 7)  # off the buckets' edges
    m = manager(kind, tmp_path, [Limit("user", max_tokens=10**9, window="1h")], clock)
    spent: list[tuple[float, int]] = []
    for i in range(200):  # every 45 s for 2.5 hours
        m.commit(m.reserve("writer", i, 0, scope={"user": "bob"}), Usage(i, 0))
        spent.append((clock.now, i))
        clock.advance(45)
    row = m.store.limit("user/bob/1h")
    assert row is not None and row.buckets is not None
    assert len(row.buckets) <= 61  # a 60th of the hour each, and the one being filled
    # what is counted: every spend of the last hour, and none older than an hour and a minute
    s = m.limit_status("user", "bob")
    assert sum(n for t, n in spent if t > clock.now - 3_600) <= s.consumed
    assert s.consumed <= sum(n for t, n in spent if t > clock.now - 3_660)


def test_a_rolling_soft_limit_warns_once_per_crossing(kind: str, tmp_path: Path) -> None:
    clock = FakeClock(DAY)
    m = manager(kind, tmp_path, [Limit("user", max_cost="1", window="24h", warn_at=0.8)], clock)
    warnings: list[BudgetEvent] = []
    m.subscribe(lambda e: warnings.append(e) if e.kind == "warning" else None)
    with m.scope(user="alice"):
        m.commit(m.reserve("writer", 10, 0, cost="0.9"), Usage(10, 0))  # crosses $0.80
        m.commit(m.reserve("writer", 10, 0, cost="0.05"), Usage(10, 0))  # still above
        assert len(warnings) == 1 and m.limit_status("user").warned
        clock.advance(86_400)  # off a bucket's edge: counted up to a bucket (24 min) longer
        assert m.limit_status("user").cost == Decimal("0.95")
        clock.advance(1_440)  # both left the window: below again
        assert not m.limit_status("user").warned
        m.commit(m.reserve("writer", 10, 0, cost="0.5"), Usage(10, 0))
        assert len(warnings) == 1
        m.commit(m.reserve("writer", 10, 0, cost="0.3"), Usage(10, 0))  # crosses again
    assert [(w.reason, w.cost) for w in warnings] == [
        ("user/alice/24h", Decimal("0.90")),
        ("user/alice/24h", Decimal("0.80")),
    ]
