"""Store throughput: ledger verbs per second from 1 and 4 processes.

Each reserve and each commit counts one verb. Every process works on the
same shared agents (the memory store is per process, so it runs from 1 only).

Run: ``python benchmarks/bench_stores.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

from tbc_integrations import BudgetManager, Usage

AGENTS = ("a", "b", "c", "d")


def setup(url: str) -> BudgetManager:
    m = BudgetManager(store=url, namespace="bench")
    for i, name in enumerate(AGENTS):
        m.register_agent(name, priority=1 + i % 2, max_tokens=10**12)
    return m


def worker(url: str, pairs: int, start_at: float) -> tuple[float, float]:
    m = setup(url)  # attaches to the agents another process created (same contracts)

    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.perf_counter()
    for i in range(pairs):
        r = m.reserve(AGENTS[i % len(AGENTS)], 100, 50)
        m.commit(r, Usage(90, 40))
    return t0, time.perf_counter()


def verbs_per_second(url: str, processes: int, pairs: int) -> float:
    if processes == 1:
        t0, t1 = worker(url, pairs, 0.0)
        return 2 * pairs / (t1 - t0)
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0  # let every process import and connect first
    with ctx.Pool(processes) as pool:
        spans = pool.starmap(worker, [(url, pairs, start_at)] * processes)
    begin = min(s for s, _ in spans)
    end = max(e for _, e in spans)
    return 2 * pairs * processes / (end - begin)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure and print verbs per second by store and process count."""
    parser = argparse.ArgumentParser(description="store throughput")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    args = parser.parse_args(argv)
    pairs = 200 if args.quick else 5_000
    out: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="tbc-bench-stores-"))
    out["memory x1"] = verbs_per_second("memory://", 1, pairs * 10)
    out["sqlite x1"] = verbs_per_second(f"sqlite:///{tmp / 'one.db'}", 1, pairs)
    out["sqlite x4"] = verbs_per_second(f"sqlite:///{tmp / 'four.db'}", 4, pairs)
    print("ledger verbs per second (a reserve and a commit each count one)")
    for name, rate in out.items():
        print(f"  {name:<12}{rate:>12,.0f} verbs/s   ({rate / 2:,.0f} reserve+commit pairs/s)")
    return out


if __name__ == "__main__":
    main()
