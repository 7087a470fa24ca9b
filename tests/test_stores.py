"""Stores: URLs, namespaces, sharing between managers and processes, leases, failures."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from tbc_integrations import BudgetManager, ContractError, ReservationError, StoreUnavailableError
from tbc_integrations.stores import MemoryStore, SQLiteStore, store_from_url
from tests import mp_workers
from tests.conftest import STORE_KINDS, store_url

pytestmark = pytest.mark.stress


def sqlite_url(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "budgets.db")


def test_urls_choose_stores(tmp_path: Path) -> None:
    assert isinstance(store_from_url("memory://"), MemoryStore)
    store = store_from_url(sqlite_url(tmp_path), namespace="run-1")
    assert isinstance(store, SQLiteStore) and store.namespace == "run-1"
    assert store.path == str(tmp_path / "budgets.db")
    for bad in ("postgres://x", "sqlite://", "sqlite:///", "nonsense"):
        with pytest.raises(ContractError):
            store_from_url(bad)
    for bad_ns in ("has space", "slash/ns", "", "é"):
        with pytest.raises(ContractError, match="namespace must be"):
            BudgetManager(namespace=bad_ns)


def test_relative_sqlite_url_follows_sqlalchemy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    m = BudgetManager(store="sqlite:///rel/b.db")
    m.register_agent("a", max_tokens=5)
    assert (tmp_path / "rel" / "b.db").exists()


def test_a_fresh_manager_sees_and_spends_a_namespace_without_registering(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    first = BudgetManager(store=url, namespace="run-42")
    first.register_agent("a", max_tokens=100)
    first.register_agent("b", priority=2, max_tokens=50)
    first.reserve("a", 30)
    second = BudgetManager(store=url, namespace="run-42")
    assert second.report() == first.report()
    r = second.reserve("b", 80)  # borrows from a, created by the other manager
    assert r.loans == (("a", 30),)
    second.commit(r, (80, 0))
    assert first.status()["b"].consumed == 80
    third = BudgetManager(store=url, namespace="run-42")
    third.register_agent("a", max_tokens=100)  # same contract: attaches, keeps allocation
    assert third.status()["a"].allocated == 70
    with pytest.raises(ContractError, match="different contract"):
        BudgetManager(store=url, namespace="run-42").register_agent("a", max_tokens=99)


def test_namespaces_never_see_each_other(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    one = BudgetManager(store=url, namespace="one")
    two = BudgetManager(store=url, namespace="two")
    one.register_agent("a", max_tokens=100)
    two.register_agent("a", max_tokens=7)
    one.reserve("a", 60)
    assert two.remaining("a") == 7 and one.remaining("a") == 40
    assert set(BudgetManager(store=url, namespace="three").report()) == set()


def test_settling_twice_through_another_manager_is_refused(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    a = BudgetManager(store=url)
    a.register_agent("x", max_tokens=100)
    r = a.reserve("x", 10, 10)
    a.commit(r, (5, 5))
    retry = BudgetManager(store=url)  # a retry after a lost reply, from another process
    with pytest.raises(ReservationError, match="already settled"):
        retry.commit(r, (5, 5))
    assert retry.status()["x"].consumed == 10


def test_an_unreachable_store_fails_closed(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailableError, match="unavailable"):
        BudgetManager(store="sqlite:///" + str(blocker / "sub" / "b.db"))


def test_four_processes_end_with_exact_totals(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(mp_workers.hammer, [(url, "mp", seed, 2_000) for seed in range(4)])
    committed: Counter[str] = Counter()
    for r in results:
        committed.update(r)
    status = BudgetManager(store=url, namespace="mp").status()
    total = sum(int(f["max_tokens"]) for f in mp_workers.AGENTS.values())
    assert sum(s.allocated for s in status.values()) == total
    assert sum(s.borrowed for s in status.values()) == sum(s.lent for s in status.values())
    for name, s in status.items():
        assert s.reserved == 0
        assert s.consumed == committed[name]
        assert s.remaining >= 0 and s.overdraft == 0
    assert sum(committed.values()) > 0


def test_a_killed_process_gets_its_reservation_back_after_the_lease(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    mp_workers.register(url, "kill")
    before = BudgetManager(store=url, namespace="kill").status()["researcher"]
    ready = tmp_path / "ready"
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=mp_workers.hold_and_wait, args=(url, "kill", 1.5, str(ready)))
    proc.start()
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    viewer = BudgetManager(store=url, namespace="kill")
    assert viewer.status()["researcher"].reserved == 3_000
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    time.sleep(1.6)
    after = viewer.status()["researcher"]
    assert after.reserved == 0 and after.remaining == before.remaining


# ------------------------------------------------------------------- Redis
needs_redis = pytest.mark.skipif(
    "redis" not in STORE_KINDS, reason="no redis-server here (CI installs one and runs these)"
)


@needs_redis
def test_redis_shares_agents_and_keeps_namespaces_apart(tmp_path: Path) -> None:
    url = store_url("redis", tmp_path)
    one = BudgetManager(store=url, namespace="one")
    one.register_agent("a", max_tokens=100)
    one.register_agent("b", priority=2, max_tokens=50)
    other = BudgetManager(store=url, namespace="two")
    other.register_agent("a", max_tokens=7)
    fresh = BudgetManager(store=url, namespace="one")
    r = fresh.reserve("b", 80)
    assert r.loans == (("a", 30),)
    fresh.commit(r, (80, 0))
    assert one.status()["b"].consumed == 80 and other.remaining("a") == 7
    with pytest.raises(ContractError, match="different contract"):
        BudgetManager(store=url, namespace="one").register_agent("a", max_tokens=1)
    with pytest.raises(ReservationError, match="already settled"):
        BudgetManager(store=url, namespace="one").commit(r, (80, 0))


@needs_redis
def test_redis_four_processes_end_with_exact_totals(tmp_path: Path) -> None:
    url = store_url("redis", tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(mp_workers.hammer, [(url, "mp", seed, 2_000) for seed in range(4)])
    committed: Counter[str] = Counter()
    for r in results:
        committed.update(r)
    status = BudgetManager(store=url, namespace="mp").status()
    total = sum(int(f["max_tokens"]) for f in mp_workers.AGENTS.values())
    assert sum(s.allocated for s in status.values()) == total
    for name, s in status.items():
        assert s.reserved == 0 and s.consumed == committed[name]
        assert s.remaining >= 0 and s.overdraft == 0


@needs_redis
def test_redis_killed_process_lease(tmp_path: Path) -> None:
    url = store_url("redis", tmp_path)
    mp_workers.register(url, "kill")
    viewer = BudgetManager(store=url, namespace="kill")
    before = viewer.status()["researcher"]
    ready = tmp_path / "ready"
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=mp_workers.hold_and_wait, args=(url, "kill", 1.5, str(ready)))
    proc.start()
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert viewer.status()["researcher"].reserved == 3_000
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    time.sleep(1.6)
    after = viewer.status()["researcher"]
    assert after.reserved == 0 and after.remaining == before.remaining


def _start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    assert binary is not None
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with redis.Redis(port=port) as client:
                client.ping()
            return proc
        except redis.ConnectionError:  # noqa: PERF203 - polling until the server is up
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@needs_redis
@pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs a local redis-server binary"
)
def test_redis_restart_mid_run_loses_nothing_and_counts_nothing_twice(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        m = BudgetManager(store=url, namespace="restart")
        m.register_agent("a", max_tokens=10_000)
        committed = 0
        held = [m.reserve("a", 10, 10) for _ in range(20)]
        for r in held[:10]:
            m.commit(r, (10, 5))
            committed += 15
        server.terminate()
        server.wait()
        with pytest.raises(StoreUnavailableError):
            m.commit(held[10], (10, 5))  # the server is down: refused loudly, not allowed
        server = _start_redis(port, tmp_path)  # same data directory: AOF replays
        for r in held[10:]:
            for _attempt in range(3):  # a client retries after the failure
                try:
                    m.commit(r, (10, 5))
                    committed += 15
                    break
                except StoreUnavailableError:
                    time.sleep(0.1)
                except ReservationError:
                    break  # already applied by an earlier attempt: never counted twice
        final = m.status()["a"]
        assert final.consumed == committed == 300 and final.reserved == 0
    finally:
        server.terminate()
        server.wait()


def test_unreachable_redis_fails_closed() -> None:
    pytest.importorskip("redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    with pytest.raises(StoreUnavailableError, match="unavailable"):
        BudgetManager(store=f"redis://127.0.0.1:{port}/0").register_agent("a", max_tokens=1)


@needs_redis
def test_fail_open_is_off_by_default_and_logged_when_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    closed = BudgetManager(store=url, namespace="f")
    closed.register_agent("a", max_tokens=100)
    opened = BudgetManager(store=url, namespace="f", fail_open=True)
    server.terminate()
    server.wait()
    with pytest.raises(StoreUnavailableError):
        closed.reserve("a", 10)
    r = opened.reserve("a", 10, 5)  # lets the call through, and says so
    assert "FAILING OPEN" in caplog.text and "'a'" in caplog.text
    assert opened.commit(r, (10, 5)) == 0
    assert "not recorded" in caplog.text
    opened.release(opened.reserve("a", 1))
    with pytest.raises(StoreUnavailableError):
        closed.check("a", 10)
    caplog.clear()
    opened.check("a", 10)  # a step's admission fails open too
    assert "admitted unchecked" in caplog.text


@needs_redis
def test_the_demo_runs_unchanged_on_redis(tmp_path: Path) -> None:
    from tbc_integrations.cli import main

    url = store_url("redis", tmp_path)
    assert main(["demo", "--no-live", "--out", str(tmp_path), "--store", url]) == 0
    status = BudgetManager(store=url, namespace="demo").status()
    assert status["researcher_a"].borrowed > 0 and status["writer"].consumed > 0
    assert all(s.reserved == 0 for s in status.values())


@needs_redis
@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_redis_loads_its_script_again_when_the_server_forgets_it(
    tmp_path: Path, functions: bool
) -> None:
    from tbc_integrations.stores._redis import _FUNCTION, RedisStore

    url = store_url("redis", tmp_path)
    client = redis.Redis.from_url(url)
    client.function_flush()
    store = RedisStore(url, namespace="forget", functions=functions)
    m = BudgetManager(store=store)
    m.register_agent("a", max_tokens=100)
    r = m.reserve("a", 10, 5)
    client.function_flush()  # what a restart without persistence does
    client.script_flush()
    assert m.commit(r, (10, 3)) == 0
    assert m.status()["a"].consumed == 13 and store.functions is functions

    async def async_spend() -> None:  # the async client loads it again too
        client.function_flush()
        client.script_flush()
        async with m.aspend("a", 4, 4) as call:
            call.set_usage((4, 1))

    asyncio.run(async_spend())
    assert m.status()["a"].consumed == 18 and store.functions is functions
    libraries = [dict(zip(lib[::2], lib[1::2], strict=True)) for lib in client.function_list()]
    loaded = [lib[b"library_name"] for lib in libraries]
    assert loaded == ([_FUNCTION.encode()] if functions else [])


@needs_redis
def test_redis_without_function_rights_runs_the_script_through_evalsha(tmp_path: Path) -> None:
    from tbc_integrations.stores._redis import RedisStore

    url = store_url("redis", tmp_path)
    admin = redis.Redis.from_url(url)
    admin.function_flush()
    admin.acl_setuser(
        "nofunc", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-function"]
    )
    try:
        limited = url.replace("redis://", "redis://nofunc:pw@")
        store = RedisStore(limited, namespace="acl")
        m = BudgetManager(store=store)
        m.register_agent("a", max_tokens=100)  # FUNCTION LOAD is refused: falls back
        m.commit(m.reserve("a", 10), (7, 0))
        assert store.functions is False and m.status()["a"].consumed == 7
        assert admin.function_list() == []
    finally:
        admin.acl_deluser("nofunc")


def test_redis_url_option_for_functions_is_checked() -> None:
    from tbc_integrations.stores._redis import RedisStore

    store = store_from_url("redis://127.0.0.1:1/0?functions=no&socket_timeout=1")
    assert isinstance(store, RedisStore) and store.functions is False
    assert store.url == "redis://127.0.0.1:1/0?socket_timeout=1"
    with pytest.raises(ContractError, match=r"functions= .* got 'maybe'"):
        store_from_url("redis://127.0.0.1:1/0?functions=maybe")


def test_the_script_reads_the_arguments_the_store_sends() -> None:
    from tbc_integrations.stores._redis import _FIELDS, _SCRIPT

    block = _SCRIPT.split("local CSV = {", 1)[1].split("\n}", 1)[0]
    lua: dict[str, tuple[str, ...]] = {}
    for verb, fields in re.findall(r"(\w+) = \{([^}]*)\}", block):
        lua[verb] = tuple(re.findall(r"'(\w+)'", fields))
    assert lua == _FIELDS


def test_sqlite_forgets_settled_reservations_after_their_memory(tmp_path: Path) -> None:
    import sqlite3

    from tbc_integrations._engine import EXPIRED_MEMORY_SECONDS, SETTLED_MEMORY_SECONDS
    from tests.conftest import FakeClock

    clock = FakeClock()
    path = tmp_path / "b.db"
    m = BudgetManager(store=f"sqlite:///{path}", clock=clock, lease_seconds=10)
    m.register_agent("a", max_tokens=10_000)
    settled = [m.reserve("a", 10) for _ in range(5)]
    for r in settled:
        m.commit(r, (10, 0))
    lapsed = m.reserve("a", 7)
    clock.advance(11)  # its lease lapses: kept for a late commit

    def rows() -> int:
        with sqlite3.connect(path) as db:
            return int(db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0])

    assert m.status()["a"].reserved == 0 and rows() == 6
    with pytest.raises(ReservationError, match="already settled"):
        m.commit(settled[0], (10, 0))  # a retry inside the memory
    clock.advance(SETTLED_MEMORY_SECONDS)
    m.commit(m.reserve("a", 1), (1, 0))  # a settle purges what is past its memory
    assert rows() == 2  # the lapsed one (waiting for a late commit) and the newest
    with pytest.raises(ReservationError, match="not issued"):
        m.commit(settled[0], (10, 0))  # forgotten: refused, never counted twice
    assert m.commit(lapsed, (7, 0)) == 0  # a late commit still counts in full
    assert m.status()["a"].consumed == 50 + 1 + 7
    clock.advance(EXPIRED_MEMORY_SECONDS + 1)
    m.commit(m.reserve("a", 1), (1, 0))
    assert rows() == 1


@needs_redis
def test_redis_remembers_settled_ids_an_hour_and_lapsed_reservations_a_day(
    tmp_path: Path,
) -> None:
    from tbc_integrations._engine import EXPIRED_MEMORY_SECONDS, SETTLED_MEMORY_SECONDS
    from tbc_integrations.stores._redis import _SCRIPT
    from tests.conftest import FakeClock

    assert f"local SETTLED_TTL = {SETTLED_MEMORY_SECONDS:.0f}" in _SCRIPT
    assert f"local EXPIRED_TTL = {EXPIRED_MEMORY_SECONDS:.0f}" in _SCRIPT
    url = store_url("redis", tmp_path)
    client = redis.Redis.from_url(url)
    clock = FakeClock()
    m = BudgetManager(store=url, namespace="mem", clock=clock, lease_seconds=10)
    m.register_agent("a", max_tokens=1_000)
    done = m.reserve("a", 10)
    m.commit(done, (10, 0))
    lapsed = m.reserve("a", 5)
    clock.advance(11)
    m.expire()
    settled_ttl = client.ttl(f"tbc:{{mem}}:res:{done.id}")
    lapsed_ttl = client.ttl(f"tbc:{{mem}}:res:{lapsed.id}")
    assert SETTLED_MEMORY_SECONDS - 60 < settled_ttl <= SETTLED_MEMORY_SECONDS
    assert EXPIRED_MEMORY_SECONDS - 60 < lapsed_ttl <= EXPIRED_MEMORY_SECONDS
    assert m.commit(lapsed, (5, 0)) == 0 and m.status()["a"].consumed == 15


def test_processes_opening_a_new_sqlite_file_at_once_all_get_in(tmp_path: Path) -> None:
    # switching a new file to WAL can answer "locked" at once instead of waiting
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        for attempt in range(3):
            url = f"sqlite:///{tmp_path / f'race{attempt}.db'}"
            start_at = time.time() + 1.5  # every process imported and waiting
            assert pool.starmap(mp_workers.open_at, [(url, start_at)] * 8) == [4] * 8


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_lapsed_reservation_waits_a_day_for_its_late_commit(kind: str, tmp_path: Path) -> None:
    # (Redis keeps it under a TTL on the server's own clock: see the Redis retention test)
    from tbc_integrations._engine import EXPIRED_MEMORY_SECONDS
    from tests.conftest import FakeClock

    clock = FakeClock()
    m = BudgetManager(store=store_url(kind, tmp_path), clock=clock)
    m.register_agent("a", max_tokens=100)
    kept, forgotten = m.reserve("a", 10, lease_seconds=5), m.reserve("a", 20, lease_seconds=5)
    clock.advance(6)
    assert m.expire() == 2
    assert m.commit(kept, (10, 0)) == 0  # a late commit inside the day: counted in full
    clock.advance(EXPIRED_MEMORY_SECONDS + 10)
    m.reserve("a", 1, lease_seconds=1)
    clock.advance(2)
    m.commit(m.reserve("a", 1), (1, 0))  # a sweep and a settle: both forget what is past
    with pytest.raises(ReservationError):
        m.commit(forgotten, (20, 0))  # forgotten: refused, changes nothing
    assert m.status()["a"].consumed == 11
