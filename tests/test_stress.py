"""Concurrency stress: threads and asyncio tasks hammering shared agents.

Every test ends with exact totals: what the workers committed equals what the
ledger recorded, allocations are conserved, and nobody spent past its budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from tbc_integrations import BudgetExceededError, BudgetManager, Reservation, Usage

pytestmark = pytest.mark.stress

AGENTS = {
    "planner": {"priority": 1, "max_tokens": 40_000},
    "researcher_a": {"priority": 3, "max_tokens": 30_000, "max_output_tokens": 20_000},
    "researcher_b": {"priority": 3, "max_tokens": 30_000},
    "critic": {"priority": 2, "max_tokens": 20_000, "min_reserve": 5_000},
    "writer": {"priority": 4, "max_tokens": 25_000},
}
TOTAL = sum(int(v["max_tokens"]) for v in AGENTS.values())


@pytest.fixture(autouse=True)
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    yield
    sys.setswitchinterval(old)


def manager() -> BudgetManager:
    m = BudgetManager()
    for name, fields in AGENTS.items():
        m.register_agent(name, **fields)  # type: ignore[arg-type]
    return m


def check_final(m: BudgetManager, committed: Counter[str], overdraft_ok: bool) -> None:
    status = m.status()
    assert sum(s.allocated for s in status.values()) == TOTAL
    assert sum(s.borrowed for s in status.values()) == sum(s.lent for s in status.values())
    for name, s in status.items():
        assert s.reserved == 0, f"{name} still holds {s.reserved}"
        assert s.consumed == committed[name], f"{name}: {s.consumed} != {committed[name]}"
        if not overdraft_ok:
            assert s.remaining >= 0 and s.overdraft == 0, f"{name} overspent"
            assert s.consumed <= s.allocated


def worker(
    m: BudgetManager, seed: int, ops: int, committed: Counter[str], over: bool, lock: threading.Lock
) -> None:
    rng = random.Random(seed)
    names = list(AGENTS)
    mine: Counter[str] = Counter()
    held: list[Reservation] = []
    for _ in range(ops):
        action = rng.random()
        if action < 0.55 or not held:
            agent = rng.choice(names)
            with contextlib.suppress(BudgetExceededError):
                held.append(m.reserve(agent, rng.randint(0, 400), rng.randint(0, 600)))
        elif action < 0.9:
            r = held.pop(rng.randrange(len(held)))
            limit = r.amount * 2 if over else r.amount
            used = rng.randint(0, limit)
            out = rng.randint(0, used)
            m.commit(r, Usage(used - out, out))
            mine[r.agent] += used
        else:
            m.release(held.pop(rng.randrange(len(held))))
    for r in held:
        m.release(r)
    with lock:
        committed.update(mine)


@pytest.mark.parametrize("over", [False, True], ids=["within-reservation", "with-overdrafts"])
def test_eight_threads_random_verbs_end_with_exact_totals(over: bool) -> None:
    m = manager()
    committed: Counter[str] = Counter()
    lock = threading.Lock()
    threads = [
        threading.Thread(target=worker, args=(m, seed, 3_000, committed, over, lock))
        for seed in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(committed.values()) > 0
    check_final(m, committed, overdraft_ok=over)


def test_threads_cannot_overspend_one_budget() -> None:
    """The tbcontracts race (1070/1000): 8 threads x 100 calls of 10 tokens on 1000."""
    m = BudgetManager()
    m.register_agent("solo", max_tokens=1000)
    granted = Counter[str]()
    lock = threading.Lock()

    def spend() -> None:
        for _ in range(100):
            try:
                with m.spend("solo", 10) as call:
                    call.set_usage(Usage(10, 0))
            except BudgetExceededError:
                continue
            with lock:
                granted["solo"] += 10

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = m.status()["solo"]
    assert (s.consumed, s.remaining, s.refusals) == (1000, 0, 700)
    assert granted["solo"] == 1000


async def test_asyncio_tasks_end_with_exact_totals() -> None:
    m = manager()
    committed: Counter[str] = Counter()
    rng = random.Random(7)
    names = list(AGENTS)

    async def task(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(300):
            agent = local.choice(names)
            try:
                async with m.aspend(agent, local.randint(0, 300), local.randint(0, 500)) as call:
                    await asyncio.sleep(0)
                    if local.random() < 0.1:
                        raise RuntimeError("provider error")
                    used = local.randint(0, call.reservation.amount)
                    call.set_usage(Usage(used, 0))
                committed[agent] += used
            except BudgetExceededError:
                pass
            except RuntimeError:
                pass

    await asyncio.gather(*(task(rng.randint(0, 10**9)) for _ in range(64)))
    assert sum(committed.values()) > 0
    check_final(m, committed, overdraft_ok=False)


async def test_cancelled_tasks_leak_nothing() -> None:
    m = manager()
    names = list(AGENTS) * 20
    started = asyncio.Semaphore(0)

    async def slow(agent: str) -> None:
        async with m.aspend(agent, 100, 100) as call:
            started.release()
            await asyncio.sleep(5)
            call.set_usage(Usage(1, 1))

    tasks = [asyncio.create_task(slow(name)) for name in names]
    for _ in names:
        await started.acquire()
    assert sum(s.reserved for s in m.status().values()) == 200 * len(tasks)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    check_final(m, Counter(), overdraft_ok=False)
