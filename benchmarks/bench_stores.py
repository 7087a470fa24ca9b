"""Store throughput: ledger verbs per second from 1 and 4 processes.

Each reserve and each commit counts one verb. Every process works on the
same shared agents (the memory store is per process, so it runs from 1 only).
Beside the Redis store, in the same run and on the same server: a bare redis-py
loop calling ``EVALSHA`` of a trivial script (one round trip per verb, the best
any Python client can do) from 1 and 4 processes, and ``redis-benchmark -c 4``
for the server's own ceiling. Redis is $TBC_REDIS_URL, or a ``redis-server``
started for the run.

The Redis rows run in interleaved rounds (``--rounds``, best of each): the store
through ``FCALL`` (its default), the store through ``EVALSHA`` (``?functions=no``,
the path of servers without functions), and the bare loop.

Run: ``python benchmarks/bench_stores.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tbc_integrations import BudgetManager, Limit, Usage

AGENTS = ("a", "b", "c", "d")


LIMITS = (
    Limit("user", max_tokens=10**14, window="day", warn_at=0.9),
    Limit("run", max_tokens=10**14),
    Limit("app", max_cost="1000000", window="month", default="all"),
)
SCOPE = {"user": "u-1", "run": "r-1"}


def setup(url: str, limits: int = 0) -> BudgetManager:
    m = BudgetManager(store=url, namespace="bench", limits=LIMITS[:limits])
    for i, name in enumerate(AGENTS):
        m.register_agent(name, priority=1 + i % 2, max_tokens=10**12)
    return m


def worker(url: str, pairs: int, start_at: float, limits: int = 0) -> tuple[float, float]:
    m = setup(url, limits)  # attaches to the agents another process created (same contracts)
    scope = SCOPE if limits else None
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.perf_counter()
    for i in range(pairs):
        r = m.reserve(AGENTS[i % len(AGENTS)], 100, 50, scope=scope)
        m.commit(r, Usage(90, 40))
    return t0, time.perf_counter()


def bare_worker(url: str, verbs: int, start_at: float) -> tuple[float, float]:
    import redis

    client = redis.Redis.from_url(url)
    script = client.register_script("return 1")
    script()
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.perf_counter()
    for _ in range(verbs):
        script()
    return t0, time.perf_counter()


def bare_per_second(url: str, processes: int, verbs: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0
    with ctx.Pool(processes) as pool:
        spans = pool.starmap(bare_worker, [(url, verbs, start_at)] * processes)
    return verbs * processes / (max(e for _, e in spans) - min(s for s, _ in spans))


def redis_benchmark(url: str, requests: int) -> float | None:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(
        [binary, "-p", port, "-c", "4", "-n", str(requests), "-t", "set", "-q"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    found = re.search(r"([\d.]+) requests per second", out)
    return float(found.group(1)) if found else None


@contextlib.contextmanager
def apart(server: Any) -> Iterator[bool]:
    """Run the block with a server we started on one CPU and this process on another.

    A lone client's round trip halves when the scheduler happens to put it on the
    server's core, which it does in some runs and not in others; keeping client and
    server on different cores (as on separate hosts) makes the x1 figures comparable.
    Processes started inside inherit the pinning. Yields whether it pinned.
    """
    if server is None or not hasattr(os, "sched_setaffinity"):
        yield False
        return
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        yield False
        return
    first, second = sorted(before)[:2]
    os.sched_setaffinity(server.pid, {first})
    os.sched_setaffinity(0, {second})
    try:
        yield True
    finally:
        os.sched_setaffinity(0, before)
        os.sched_setaffinity(server.pid, before)


def start_redis() -> tuple[str, Any]:
    if os.environ.get("TBC_REDIS_URL"):
        return os.environ["TBC_REDIS_URL"], None
    binary = shutil.which("redis-server")
    if binary is None:
        return "", None
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return f"redis://127.0.0.1:{port}/0", proc


def verbs_per_second(url: str, processes: int, pairs: int, limits: int = 0) -> float:
    if processes == 1:
        t0, t1 = worker(url, pairs, 0.0, limits)
        return 2 * pairs / (t1 - t0)
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0  # let every process import and connect first
    with ctx.Pool(processes) as pool:
        spans = pool.starmap(worker, [(url, pairs, start_at, limits)] * processes)
    begin = min(s for s, _ in spans)
    end = max(e for _, e in spans)
    return 2 * pairs * processes / (end - begin)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure and print verbs per second by store and process count."""
    parser = argparse.ArgumentParser(description="store throughput")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved Redis rounds")
    args = parser.parse_args(argv)
    pairs = 200 if args.quick else 5_000
    out: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="tbc-bench-stores-"))
    for n in (0, 1, 3):  # limits in the calls' scope, beside the team-only figure
        tail = "" if n == 0 else f" ({n} limit{'s' if n > 1 else ''})"
        out["memory x1" + tail] = verbs_per_second("memory://", 1, pairs * 10, n)
        out["sqlite x1" + tail] = verbs_per_second(f"sqlite:///{tmp / f'one{n}.db'}", 1, pairs, n)
    out["sqlite x4"] = verbs_per_second(f"sqlite:///{tmp / 'four.db'}", 4, pairs)
    url, server = start_redis()
    ceiling = None
    pinned_x1 = False
    if url:
        try:
            import redis

            # interleaved rounds: the store and the bare loop take turns, so a noisy
            # neighbour slows both; each figure is the best of its rounds
            for _ in range(args.rounds):
                for n in (1, 4):
                    with redis.Redis.from_url(url) as client:
                        client.flushdb()
                    with apart(server if n == 1 else None) as pinned:
                        pinned_x1 = pinned_x1 or pinned
                        rates = {
                            f"redis x{n}": verbs_per_second(url, n, pairs),
                            f"redis x{n} (3 limits)": verbs_per_second(url, n, pairs, 3),
                            f"redis (EVALSHA) x{n}": verbs_per_second(
                                url + "?functions=no", n, pairs
                            ),
                            f"bare EVALSHA x{n}": bare_per_second(url, n, 2 * pairs),
                        }
                    for name, rate in rates.items():
                        out[name] = max(out.get(name, 0.0), rate)
            ceiling = redis_benchmark(url, 20 * pairs)
        finally:
            if server is not None:
                server.terminate()
    print("ledger verbs per second (a reserve and a commit each count one)")
    for name, rate in out.items():
        pairs_text = (
            "" if name.startswith("bare") else f"   ({rate / 2:,.0f} reserve+commit pairs/s)"
        )
        print(f"  {name:<20}{rate:>12,.0f} verbs/s{pairs_text}")
    for x in ("x1", "x4"):
        if f"redis {x}" in out:
            bare = out[f"bare EVALSHA {x}"]
            print(
                f"  Redis store / bare EVALSHA {x}: {out[f'redis {x}'] / bare:.0%} "
                f"(through EVALSHA: {out[f'redis (EVALSHA) {x}'] / bare:.0%})"
            )
    if ceiling is not None:
        print(f"  redis-benchmark -c 4 (SET): {ceiling:,.0f} requests/s")
    if "redis x1" in out:
        print(
            "  x1: client and server pinned to different CPUs"
            if pinned_x1
            else "  x1: not pinned (an external server, or one CPU): expect run-to-run spread"
        )
    return out


if __name__ == "__main__":
    main()
