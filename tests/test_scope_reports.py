"""Reports by scope: status(scope=...), limit rows with each agent's spend, on every store;
``tbc report --by``, ``tbc plot --scope`` and ``tbc watch`` on real logs and stores."""

from __future__ import annotations

import io
import struct
from decimal import Decimal
from pathlib import Path

import pytest

from tbc_integrations import (
    AgentSpend,
    AgentStatus,
    BudgetManager,
    ContractError,
    InvalidValueError,
    Ledger,
    Limit,
    LimitStatus,
    Usage,
)
from tbc_integrations.audit import AuditLog, read_log
from tbc_integrations.cli import main
from tbc_integrations.reporting import live_view
from tbc_integrations.scope_report import scope_rows, scope_timeline

from .conftest import STORE_KINDS, FakeClock, store_url

DAY = 1_796_342_400.0 - 3_600  # 2026-12-03 23:00 UTC: an hour before midnight
LIMITS = [
    Limit("user", max_tokens=10_000, window="day", warn_at=0.5),
    Limit("org", key="tenant", max_cost="1.00"),
    Limit("app", max_tokens=1_000_000, default="all"),
]


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def team(url: str, clock: FakeClock, limits: list[Limit] = LIMITS) -> BudgetManager:
    m = BudgetManager(url, limits=limits, clock=clock)
    m.register_agent("writer", max_tokens=100_000, warn_at=0.08)
    m.register_agent("planner", max_tokens=100_000)
    return m


def run_calls(m: BudgetManager) -> None:
    """u-1 in acme: writer 3 x 1,000, planner 500; u-2 in acme: writer 4,000; u-3 in beta."""
    with m.scope(user="u-1", tenant="acme"):
        for _ in range(3):
            m.commit(m.reserve("writer", 800, 400, cost="0.02"), Usage(700, 300), cost="0.01")
        m.charge("planner", Usage(400, 100), cost="0.005")
        m.release(m.reserve("planner", 100, 100, cost="0.01"))  # settles nothing
    with m.scope(user="u-2", tenant="acme"):
        m.commit(m.reserve("writer", 3_000, 1_000), Usage(3_000, 1_000), cost="0.04")
    with m.scope(user="u-3", tenant="beta"):
        m.commit(m.reserve("planner", 10, 10), Usage(10, 10))


def test_status_by_scope_on_every_store(kind: str, tmp_path: Path) -> None:
    clock = FakeClock(DAY)
    m = team(store_url(kind, tmp_path), clock)
    run_calls(m)
    plain = m.status()
    assert set(plain) == {"writer", "planner"}
    assert all(isinstance(s, AgentStatus) for s in plain.values())  # status() unchanged

    u1 = m.status(scope={"user": "u-1"})
    assert list(u1) == ["user"]  # the scope names only the user: the org and app are left out
    row = u1["user"]
    assert isinstance(row, LimitStatus)
    assert (row.value, row.period, row.consumed, row.reserved) == ("u-1", "2026-12-03", 3_500, 0)
    assert row.remaining == 6_500 and row.ends == DAY + 3_600
    assert dict(row.agents) == {
        "planner": AgentSpend(500, Decimal("0.005"), 1),
        "writer": AgentSpend(3_000, Decimal("0.03"), 3),
    }
    assert row.warn_tokens == 5_000 and not row.warned

    acme = m.status(scope={"tenant": "acme", "user": "u-2", "app": "all"})
    assert list(acme) == ["user", "org", "app"]  # the limits' order
    assert acme["org"].value == "acme" and acme["org"].consumed == 7_500
    assert acme["org"].cost == Decimal("0.075") and acme["org"].cost_remaining == Decimal("0.925")
    assert acme["org"].agents["writer"] == AgentSpend(7_000, Decimal("0.07"), 4)
    assert acme["user"].agents == {"writer": AgentSpend(4_000, Decimal("0.04"), 1)}
    assert acme["app"].consumed == 7_520 and acme["app"].agents["planner"].calls == 2

    # a scope value never seen: the limit's full allowance, nobody's spend
    fresh = m.status(scope={"user": "u-9"})["user"]
    assert (fresh.consumed, fresh.remaining, dict(fresh.agents)) == (0, 10_000, {})
    assert m.status(scope={}) == {} and m.status(scope={"team": "x"}) == {}

    # the next day: a fresh row now, and both periods kept in the store's rows
    clock.advance(3_600)
    with m.scope(user="u-1", tenant="acme"):
        m.charge("writer", Usage(6_000, 0))
    now = m.status(scope={"user": "u-1"})["user"]
    assert (now.period, now.consumed, now.warned) == ("2026-12-04", 6_000, True)
    rows = m.limit_statuses("user", "u-1")
    assert [(s.period, s.consumed, s.warned) for s in rows] == [
        ("2026-12-03", 3_500, False),
        ("2026-12-04", 6_000, True),
    ]
    everything = m.limit_statuses()
    assert [(s.limit, s.value) for s in everything] == [
        ("app", "all"),
        ("org", "acme"),
        ("org", "beta"),
        ("user", "u-1"),
        ("user", "u-1"),
        ("user", "u-2"),
        ("user", "u-3"),
    ]
    # every row's agents add up to the row, and the app row to every agent's spend
    for s in everything:
        assert sum(a.tokens for a in s.agents.values()) == s.consumed
        assert sum(a.cost for a in s.agents.values()) == s.cost
    app = everything[0]
    assert {n: a.tokens for n, a in app.agents.items()} == {
        n: s.consumed for n, s in m.status().items()
    }
    with pytest.raises(ContractError, match="give the limit's name"):
        m.limit_statuses(value="u-1")
    import asyncio

    assert asyncio.run(m.astatus(scope={"user": "u-1"})) == m.status(scope={"user": "u-1"})
    with pytest.raises(InvalidValueError, match="scope must be a mapping"):
        m.status(scope="u-1")  # type: ignore[call-overload]


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k != "memory"])
def test_another_process_reads_the_rows_without_knowing_the_limits(
    kind: str, tmp_path: Path
) -> None:
    url = store_url(kind, tmp_path)
    m = team(url, FakeClock(DAY))
    run_calls(m)
    reader = Ledger(url)  # no limits, no agents registered: rows come from the store
    assert [s.to_dict() for s in reader.limit_statuses()] == [
        s.to_dict() for s in m.limit_statuses()
    ]
    assert reader.limit_statuses("org", "acme")[0].agents["planner"].tokens == 500


def test_the_audit_log_rebuilds_the_rows_the_store_keeps(tmp_path: Path) -> None:
    """Attached mid-run with a call open: the snapshot's rows, then every call's limits
    (a commit, a release, a lapse and its late commit, a charge) give the live rows."""
    clock = FakeClock(DAY)
    m = team(store_url("sqlite", tmp_path), clock)
    with m.scope(user="u-1", tenant="acme"):
        m.commit(m.reserve("writer", 100, 100), Usage(100, 50), cost="0.01")
        open_call = m.reserve("planner", 300, 0, cost="0.02")
    path = tmp_path / "audit.jsonl"
    with AuditLog(path).attach(m):
        with m.scope(user="u-1", tenant="acme"):
            m.commit(open_call, Usage(250, 0), cost="0.015")
            lapsing = m.reserve("writer", 500, 500, lease_seconds=5)
            clock.advance(10)
            m.expire()
            m.commit(lapsing, Usage(400, 400))  # late: recorded in full
        with m.scope(user="u-2", tenant="beta"):
            m.release(m.reserve("writer", 10, 10))
            m.charge("planner", Usage(5_000, 1_000))  # takes u-2 past its warning line
            still_open = m.reserve("writer", 70, 30, cost="0.003")
    record = read_log(path)
    assert [s.to_dict() for s in record.limit_statuses()] == [
        s.to_dict() for s in m.limit_statuses()
    ]
    u2 = next(s for s in record.limit_statuses() if s.value == "u-2")
    assert u2.warned and u2.reserved == 100 and u2.agents["planner"].tokens == 6_000
    assert u2.max_tokens == 10_000  # the caps come from the log's limits
    m.release(still_open)


def make_log(tmp_path: Path) -> tuple[Path, BudgetManager]:
    path = tmp_path / "audit.jsonl"
    m = team(store_url("sqlite", tmp_path), FakeClock(DAY))
    with AuditLog(path).attach(m):
        run_calls(m)
        with m.scope(user="u-2", tenant="acme"):
            m.charge("writer", Usage(2_000, 0), cost="0.01")  # u-2 past 5,000: warned
    return path, m


def line_of(out: str, *words: str) -> str:
    found = [line for line in out.splitlines() if all(w in line for w in words)]
    assert len(found) == 1, (words, out)
    return found[0]


def test_report_by_user_run_and_limit_from_a_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = make_log(tmp_path)
    assert main(["report", str(path), "--by", "user"]) == 0
    out = capsys.readouterr().out
    assert "Limits by user" in out
    u1 = line_of(out, "u-1 ")
    for cell in ("2026-12-03", "3,500", "10,000", "6,500", "writer 3,000 $0.03 (3)"):
        assert cell in u1
    assert "planner 500 $0.005 (1)" in u1 and "yes" not in u1
    u2 = line_of(out, "u-2 ")
    assert "6,000" in u2 and "4,000" in u2 and "yes" in u2  # used, left, warned
    assert "acme" not in out  # the org's rows are not the user's

    # by a scope key: the org limit is keyed 'tenant'
    assert main(["report", str(path), "--by", "tenant"]) == 0
    out = capsys.readouterr().out
    acme = line_of(out, "acme")
    assert "9,500" in acme and "$0.085" in acme and "$0.915" in acme
    assert "writer 9,000 $0.08 (5)" in acme

    assert main(["report", str(path), "--by", "limit", "--scope", "tenant=beta"]) == 0
    out = capsys.readouterr().out
    beta = line_of(out, "org", "beta")
    assert "planner 20" in beta and "u-" not in out

    # the plain report: the warned agent and the warnings table
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warned" in line_of(out, "writer", "100,000")
    assert "Budget warnings" in out
    assert "user=u-2 (2026-12-03)" in out and "agent writer" in out


def test_report_by_scope_from_store_urls(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "memory":
        assert main(["report", "memory://", "--by", "user"]) == 1
        assert "lives in one process" in capsys.readouterr().err
        return
    url = store_url(kind, tmp_path)
    m = team(url, FakeClock(DAY))
    m.store.close()
    m = BudgetManager(url, namespace="prod", limits=LIMITS, clock=FakeClock(DAY))
    m.register_agent("writer", max_tokens=100_000)
    m.register_agent("planner", max_tokens=100_000)
    run_calls(m)
    assert main(["report", url, "--namespace", "prod", "--by", "user"]) == 0
    out = capsys.readouterr().out
    assert "writer 3,000 $0.03 (3)" in line_of(out, "u-1 ")
    assert "4,000" in line_of(out, "u-2 ")
    # a bare store knows the rows' limit names, not their keys: by the name
    assert main(["report", url, "--namespace", "prod", "--by", "org"]) == 0
    assert "writer 7,000" in line_of(capsys.readouterr().out, "acme")
    assert main(["report", url, "--namespace", "prod", "--by", "tenant"]) == 1
    err = capsys.readouterr().err
    assert "no limit row of 'tenant'" in err and "'org'" in err
    # the other namespace has agents and no rows; a namespace never used is an error
    assert main(["report", url, "--by", "user"]) == 0
    assert "no limit rows" in capsys.readouterr().out
    assert main(["report", url, "--namespace", "typo"]) == 1
    assert "namespace 'typo'" in capsys.readouterr().err
    assert main(["report", url, "--namespace", "prod"]) == 0
    assert "planner" in capsys.readouterr().out


def test_report_errors_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = make_log(tmp_path)
    assert main(["report", str(path), "--scope", "user"]) == 1
    assert "key=value" in capsys.readouterr().err
    assert main(["report", str(path), "--by", "team"]) == 1
    assert "no limit row of 'team'" in capsys.readouterr().err
    assert main(["report", f"sqlite:///{tmp_path}/nothing.db", "--by", "user"]) == 1
    assert "no such SQLite store" in capsys.readouterr().err
    assert not (tmp_path / "nothing.db").exists()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_one_scope(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = make_log(tmp_path)
    target = tmp_path / "u2.png"
    assert main(["plot", str(path), "-o", str(target), "--scope", "user=u-2"]) == 0
    assert png_size(target) == (900, 450)
    record = read_log(path)
    line = scope_timeline(record.events, {"user": "u-2"}, limits=record.limits)
    assert line.total == [0, 4_000, 6_000] and line.spent == {"writer": [0, 4_000, 6_000]}
    assert (line.cap, line.warn, line.periods) == (10_000, 5_000, [(0, "2026-12-03")])
    by_key = scope_timeline(record.events, {"tenant": "acme"}, limits=record.limits)
    assert by_key.limit == "org" and by_key.total[-1] == 9_500
    assert by_key.spent["planner"][-1] == 500
    assert main(["plot", str(path), "-o", str(target), "--scope", "user=nobody"]) == 1
    assert "no call of the log was in scope user=nobody" in capsys.readouterr().err


def test_watch_a_store_once_and_the_live_view_of_a_scope(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = store_url("sqlite", tmp_path)
    m = team(url, FakeClock(DAY))
    run_calls(m)
    assert main(["watch", url, "--once", "--scope", "user=u-1"]) == 0
    out = capsys.readouterr().out
    assert "user=u-1 (2026-12-03)" in out and "3,500/10,000" in out
    assert "3,000 $0.03" in line_of(out, "writer")
    assert main(["watch", url, "--once"]) == 0
    assert "7,000/100,000" in line_of(capsys.readouterr().out, "writer")
    assert main(["watch", url, "--once", "--interval", "0"]) == 1
    assert main(["watch", "--help"]) == 0

    from rich.console import Console

    console = Console(file=io.StringIO(), width=100, record=True)
    with live_view(m, console=console, enabled=True, scope={"tenant": "acme"}) as refresh:
        with m.scope(user="u-1", tenant="acme"):
            m.charge("planner", Usage(1_000, 0), cost="0.01")
        refresh()
    shown = console.export_text()
    assert "org=acme (all)" in shown and "$0.085/$1.00" in shown


def test_scope_rows_generic_over_keys() -> None:
    m = BudgetManager(limits=[Limit("session", max_tokens=50, key="conversation")])
    m.register_agent("a")
    m.charge("a", (20, 5), scope={"conversation": "c-7"})
    columns, rows = scope_rows(m.limit_statuses(), "conversation", keys={"session": "conversation"})
    assert [c for c, _ in columns][:4] == ["conversation", "period", "used", "held"]
    assert rows == [["c-7", "all", "25", "0", "50", "25", "", "a 25 (1)"]]


def test_a_limit_read_through_the_ledger_shows_the_caps_it_enforces(tmp_path: Path) -> None:
    """A row made under an older cap: the ledger's limit (the cap a call must fit in now)
    is what its status shows; the store's listing shows the row as made."""
    url = store_url("sqlite", tmp_path)
    old = team(url, FakeClock(DAY), [Limit("user", max_tokens=1_000)])
    old.charge("writer", Usage(600, 0), scope={"user": "u-1"})
    new = BudgetManager(url, limits=[Limit("user", max_tokens=5_000)], clock=FakeClock(DAY))
    assert new.limit_status("user", "u-1").remaining == 4_400
    assert new.status(scope={"user": "u-1"})["user"].max_tokens == 5_000
    new.commit(new.reserve("writer", 1_000, 0, scope={"user": "u-1"}), Usage(1_000, 0))
    assert new.limit_statuses("user")[0].max_tokens == 1_000  # the row as it was made
