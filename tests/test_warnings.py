"""Soft limits: an agent's ``warn_at`` and a limit's, one ``BudgetWarning`` per crossing.

Decided in the engine (and its Lua port) and kept in the store, so every store
delivers each warning exactly once, however many threads or managers share it; the
warning reaches subscribers, ``on_warning``, the audit log (replayed) and OpenTelemetry.
"""

from __future__ import annotations

import logging
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tbc_integrations import (
    BudgetContract,
    BudgetManager,
    ContractError,
    Limit,
    LimitExceededError,
    Usage,
)
from tbc_integrations.audit import AuditLog, read_log, replay_log
from tbc_integrations.budgets import load_budgets
from tbc_integrations.events import BudgetEvent, BudgetWarning

from .conftest import STORE_KINDS, FakeClock, store_url


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def warnings_of(m: BudgetManager) -> list[BudgetWarning]:
    seen: list[BudgetWarning] = []
    m.subscribe(lambda e: seen.append(e) if isinstance(e, BudgetWarning) else None)
    return seen


def test_an_agent_warns_once_per_crossing_and_a_grant_rearms_it(kind: str, tmp_path: Path) -> None:
    m = BudgetManager(store_url(kind, tmp_path), clock=FakeClock())
    m.register_agent("writer", max_tokens=1_000, warn_at=0.8)
    m.register_agent("planner", max_tokens=1_000)  # no warn_at: never warns
    seen = warnings_of(m)
    for _ in range(7):  # 700: below the line (800)
        m.commit(m.reserve("writer", 60, 40), Usage(60, 40))
        m.commit(m.reserve("planner", 60, 40), Usage(60, 40))
    assert seen == [] and not m.status()["writer"].warned
    m.commit(m.reserve("writer", 60, 40), Usage(60, 40))  # 800: the line reached
    assert [(w.agent, w.reason, w.tokens) for w in seen] == [("writer", "agent", 800)]
    assert m.status()["writer"].warned
    m.commit(m.reserve("writer", 60, 40), Usage(60, 40))  # still past it: no second warning
    m.charge("writer", Usage(10, 0))
    assert len(seen) == 1
    # a top-up that takes the writer back below its line re-arms it: 910 of 1,500 (line 1,200)
    m.adjust_allocation("writer", 500)
    assert not m.status()["writer"].warned and len(seen) == 1
    m.commit(m.reserve("writer", 200, 0), Usage(200, 0))  # 1,110: below
    assert len(seen) == 1
    m.commit(m.reserve("writer", 100, 0), Usage(100, 0))  # 1,210: the second crossing
    assert [w.tokens for w in seen] == [800, 1_210]
    # a top-up too small to take it below the line leaves it warned (no third warning)
    m.adjust_allocation("writer", 10)
    m.charge("writer", Usage(1, 0))
    assert len(seen) == 2 and m.status()["writer"].warned
    assert not m.status()["planner"].warned


def test_a_reallocation_rearms_and_borrowing_does_not(kind: str, tmp_path: Path) -> None:
    m = BudgetManager(store_url(kind, tmp_path), clock=FakeClock())
    m.register_agent("donor", priority=1, max_tokens=10_000)
    m.register_agent("writer", priority=2, max_tokens=100, warn_at=0.5)
    seen = warnings_of(m)
    # a call that borrows: 90 of an allocation of 130 for the call (the unused 40 goes back)
    m.commit(m.reserve("writer", 130, 0), Usage(90, 0))
    assert [w.tokens for w in seen] == [90] and m.status()["writer"].allocated == 100
    # a reallocation that moves 500 for good: 90 of 600 is below the line (300) again
    assert m.reallocate("writer", 500) == 500
    assert not m.status()["writer"].warned
    m.commit(m.reserve("writer", 300, 0), Usage(300, 0))
    assert [w.tokens for w in seen] == [90, 390]


def test_an_agent_warns_on_money_too(kind: str, tmp_path: Path) -> None:
    m = BudgetManager(store_url(kind, tmp_path), clock=FakeClock())
    m.register_agent("writer", max_tokens=1_000_000, max_cost="1.00", warn_at=0.5)
    seen = warnings_of(m)
    m.commit(m.reserve("writer", 10, 0, cost="0.3"), Usage(10, 0), cost="0.3")
    assert seen == []
    m.commit(m.reserve("writer", 10, 0, cost="0.3"), Usage(10, 0), cost="0.2")
    assert len(seen) == 1 and seen[0].cost == Decimal("0.5") and seen[0].tokens == 20


def test_threads_and_two_managers_get_each_warning_exactly_once(kind: str, tmp_path: Path) -> None:
    """8 threads over two managers on one store: one warning for the agent, one per
    limit row crossed, whichever thread's commit crossed the line."""
    url = store_url(kind, tmp_path)
    limits = [Limit("user", max_tokens=100_000, warn_at=0.5)]
    managers = [BudgetManager(url, limits=limits) for _ in range(2)]
    if kind == "memory":  # the memory store is one process's: share one
        managers = [managers[0], managers[0]]
    distinct = list(dict.fromkeys(managers))
    for m in distinct:
        m.register_agent("writer", max_tokens=100_000, warn_at=0.3)
    seen: list[BudgetWarning] = []
    lock = threading.Lock()

    def keep(event: BudgetEvent) -> None:
        if isinstance(event, BudgetWarning):
            with lock:
                seen.append(event)

    for m in distinct:
        m.subscribe(keep)

    def work(i: int) -> None:
        m = managers[i % 2]
        with m.scope(user=f"u{i % 2}"):
            for _ in range(50):
                m.commit(m.reserve("writer", 60, 40), Usage(70, 30))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 8 x 50 x 100 = 40,000 tokens: the agent's line is 30,000, each user's 50,000 is not
    # reached (20,000 each); a second round takes u0 past it
    with managers[0].scope(user="u0"):
        for _ in range(310):
            managers[0].commit(managers[0].reserve("writer", 0, 0), Usage(100, 0))
    reasons = sorted(w.reason for w in seen)
    assert reasons[0] == "agent" and reasons.count("agent") == 1
    assert [r for r in reasons if r != "agent"] == ["user/u0/all"]
    status = managers[0].status()["writer"]
    assert status.consumed == 71_000 and status.warned
    assert managers[0].limit_status("user", "u0").warned
    assert not managers[0].limit_status("user", "u1").warned


def test_on_warning_gets_only_warnings_and_its_errors_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    got: list[Any] = []
    m = BudgetManager(limits=[Limit("run", max_tokens=1_000, warn_at=0.1)], on_warning=got.append)
    m.register_agent("writer", max_tokens=1_000, warn_at=0.2)
    with m.scope(run="r-1"):
        m.commit(m.reserve("writer", 100, 0), Usage(100, 0))  # the run's line
        m.commit(m.reserve("writer", 100, 0), Usage(100, 0))  # the agent's line
    assert [(type(w).__name__, w.reason) for w in got] == [
        ("BudgetWarning", "run/r-1/all"),
        ("BudgetWarning", "agent"),
    ]
    assert (got[0].limit, got[0].scope_value, got[0].period) == ("run", "r-1", "all")

    def broken(warning: BudgetWarning) -> None:
        raise RuntimeError("pager down")

    m2 = BudgetManager(on_warning=broken)
    m2.register_agent("writer", max_tokens=100, warn_at=0.5)
    with caplog.at_level(logging.ERROR, logger="tbc_integrations"):
        assert m2.commit(m2.reserve("writer", 60, 0), Usage(60, 0)) == 0
    assert "pager down" in caplog.text
    assert m2.status()["writer"].consumed == 60 and m2.status()["writer"].warned
    with pytest.raises(ContractError, match="on_warning must be callable"):
        BudgetManager(on_warning="page me")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, float("nan"), True, "0.8"])
def test_a_bad_warn_at_names_the_agent_and_the_value(bad: Any) -> None:
    m = BudgetManager()
    with pytest.raises(ContractError, match=r"Agent 'writer': warn_at must be in \(0, 1\]"):
        m.register_agent("writer", max_tokens=100, warn_at=bad)
    assert m.status() == {}


def test_warn_at_in_contracts_files_and_equal_registrations(kind: str, tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("writer:\n  max_tokens: 500\n  warn_at: 0.9\nplanner:\n  max_tokens: 5\n")
    contracts = load_budgets(budgets)
    assert contracts["writer"].warn_at == 0.9 and contracts["planner"].warn_at is None
    assert "warn_at" not in contracts["planner"].to_dict()  # the form stores compare
    url = store_url(kind, tmp_path)
    first = BudgetManager.from_contracts(contracts.values(), store=url)
    if kind != "memory":  # a second manager attaches to the equal contract, refuses another
        BudgetManager.from_contracts(contracts.values(), store=url)
        with pytest.raises(ContractError, match="different contract"):
            BudgetManager(url).add_contract(BudgetContract("writer", max_tokens=500, warn_at=0.5))
    first.charge("writer", Usage(450, 0))
    assert first.status()["writer"].warned


def test_warnings_in_the_audit_log_replay_to_the_live_state(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    m = BudgetManager(limits=[Limit("user", max_tokens=500, warn_at=0.5)], clock=FakeClock())
    m.register_agent("writer", max_tokens=1_000, warn_at=0.3)
    m.register_agent("donor", max_tokens=1_000)
    with AuditLog(path).attach(m):
        with m.scope(user="u-1"):
            m.commit(m.reserve("writer", 300, 0), Usage(300, 0))
        m.adjust_allocation("writer", 1_000)  # re-armed: 300 of 2,000
        m.charge("writer", Usage(400, 0), scope={"user": "u-3"})  # warned again: 700 of 2,000
        with m.scope(user="u-2"), pytest.raises(LimitExceededError):
            m.reserve("writer", 600, 0)
    record = read_log(path)
    warnings = [e for e in record.events if isinstance(e, BudgetWarning)]
    assert [(w.reason, w.tokens) for w in warnings] == [
        ("user/u-1/all", 300),
        ("agent", 300),
        ("user/u-3/all", 400),
        ("agent", 700),
    ]
    assert replay_log(path).status() == m.status()
    assert m.status()["writer"].warned


def test_warnings_reach_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tbc_integrations.telemetry import BudgetTelemetry

    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    m = BudgetManager(limits=[Limit("user", max_cost="1", warn_at=0.5, window="day")])
    m.register_agent("writer", max_tokens=100, warn_at=0.5)
    telemetry = BudgetTelemetry(m, tracer_provider=tracer_provider, meter_provider=meter_provider)
    with m.scope(user="u-42"):
        m.commit(m.reserve("writer", 60, 0, cost="0.6"), Usage(60, 0), cost="0.6")
    data = reader.get_metrics_data()
    telemetry.close()
    spans = [s for s in exporter.get_finished_spans() if s.name == "tbc.warning writer"]
    limits = sorted(str(s.attributes["tbc.limit"]) for s in spans)  # type: ignore[index]
    assert limits == ["agent", "user"]
    user = next(s for s in spans if s.attributes["tbc.limit"] == "user")  # type: ignore[index]
    assert user.attributes["tbc.scope_value"] == "u-42"  # type: ignore[index]
    assert user.attributes["tbc.cost.usd"] == 0.6  # type: ignore[index]
    points: list[tuple[Any, Any]] = []
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "tbc.warnings":
                    got: Any = metric.data.data_points
                    points += [(p.attributes["tbc.limit"], p.value) for p in got]
    assert sorted(points) == [("agent", 1), ("user", 1)]
    meter_provider.shutdown()
    tracer_provider.shutdown()


def test_asyncio_tasks_get_each_warning_exactly_once(kind: str, tmp_path: Path) -> None:
    import asyncio

    m = BudgetManager(
        store_url(kind, tmp_path), limits=[Limit("run", max_tokens=10_000, warn_at=0.2)]
    )
    m.register_agent("writer", max_tokens=10_000, warn_at=0.3)
    seen = warnings_of(m)

    async def call() -> None:
        reservation = await m.areserve("writer", 60, 40, scope={"run": "r-1"})
        await asyncio.sleep(0)
        await m.acommit(reservation, Usage(60, 40))

    async def main() -> None:
        await asyncio.gather(*(call() for _ in range(40)))

    asyncio.run(main())
    m.store.close()
    assert sorted(w.reason for w in seen) == ["agent", "run/r-1/all"]
    assert {w.reason: w.tokens for w in seen}["agent"] >= 3_000


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k != "memory"])
def test_stores_written_before_soft_limits_and_spend_per_agent_still_read(
    kind: str, tmp_path: Path
) -> None:
    """A SQLite file without the new columns, a Redis row of 21 packed numbers and a limit
    row without its agents: read as not warned, no warn_at, no spend per agent yet."""
    url = store_url(kind, tmp_path)
    m = BudgetManager(url, namespace="old", limits=[Limit("user", max_tokens=1_000)])
    m.register_agent("writer", max_tokens=1_000)
    m.charge("writer", Usage(100, 0), scope={"user": "u-1"})
    m.store.close()
    if kind == "sqlite":
        import sqlite3

        db = sqlite3.connect(tmp_path / "budgets.db")
        db.execute("ALTER TABLE agents DROP COLUMN warned")
        db.execute("ALTER TABLE limits DROP COLUMN agents")
        db.commit()
        db.close()
    else:
        import json

        import redis

        client = redis.Redis.from_url(url)
        key = "tbc:{old}:num:writer"
        client.set(key, client.get(key)[: 21 * 8])  # type: ignore[index]
        row_key = next(iter(client.scan_iter("tbc:{old}:lim:*")))
        data = json.loads(client.get(row_key))  # type: ignore[arg-type]
        del data["a"]
        client.set(row_key, json.dumps(data))
        client.close()
    again = BudgetManager(url, namespace="old", limits=[Limit("user", max_tokens=1_000)])
    again.register_agent("writer", max_tokens=1_000)  # the same contract: attaches
    status = again.status()["writer"]
    assert (status.consumed, status.warned) == (100, False)
    row = again.limit_status("user", "u-1")
    assert row.consumed == 100 and dict(row.agents) == {}
    again.charge("writer", Usage(50, 0), scope={"user": "u-1"})
    assert again.limit_status("user", "u-1").agents["writer"].tokens == 50
    again.store.close()
