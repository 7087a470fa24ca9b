"""Wall time of N concurrent ``ainvoke`` under the LangChain handler, memory store vs Redis.

N calls of a chat model whose ``_agenerate`` awaits ``asyncio.sleep(latency)``
(a provider's latency, 50 ms by default) and reports usage, all started at once
with ``asyncio.gather`` on one event loop, under:

- no handler: what LangChain itself costs for N concurrent calls;
- ``BudgetCallbackHandler`` on the memory store (its verbs never block);
- ``BudgetCallbackHandler`` on the Redis store (two round trips per call: a
  reserve before it and a commit after it).

A handler that blocks the event loop while it waits for Redis serialises the
round trips of all N calls; one that does not overlaps them with each other and
with the provider's latency. The variants take turns in interleaved rounds, in a
new random order each round, after one warm-up round each (it also opens the
Redis connections); figures are medians of the rounds. Every round checks that
the ledger settled exactly what the model reported.

As in ``_timing.py``, the garbage collector runs before each round and not during
it: a full collection walks every object of the process (LangChain's included) and
costs 0.1-0.2 s here, and whether a round gets three or four of them swings its
time by more than what is measured. ``--gc`` keeps it on.

Redis is ``--redis``, else $TBC_REDIS_URL, else a ``redis-server`` started for
the run (the Redis variant is left out when there is none).

Run: ``python benchmarks/bench_async.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

from langchain_core.runnables import RunnableConfig

from tbc_integrations import BudgetManager
from tbc_integrations.langchain import BudgetCallbackHandler
from tbc_integrations.testing import UsageFakeChat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_stores import start_redis

BARE = "no handler"
MEMORY = "handler, memory store"
REDIS = "handler, Redis store"


def budget(store: str | None) -> BudgetManager:
    # a namespace of its own per run: nothing to clean on a shared server
    manager = BudgetManager(store=store, namespace=f"bench-async-{uuid.uuid4().hex[:8]}")
    manager.register_agent("bench", max_tokens=10**15)
    return manager


async def gathered(
    model: UsageFakeChat, n: int, config: RunnableConfig, collect: bool = False
) -> tuple[float, int]:
    """Seconds to run ``n`` concurrent calls, and the tokens the model reported.

    The garbage collector runs before and, with ``collect``, during the calls.
    """
    gc.collect()
    if not collect:
        gc.disable()
    try:
        start = time.perf_counter()
        replies = await asyncio.gather(
            *(model.ainvoke(f"Question {i}: what is the budget?", config=config) for i in range(n))
        )
        seconds = time.perf_counter() - start
    finally:
        gc.enable()
    return seconds, sum(r.usage_metadata["total_tokens"] for r in replies if r.usage_metadata)


async def measure(
    n: int, rounds: int, latency: float, redis_url: str | None, collect: bool = False
) -> dict[str, list[float]]:
    model = UsageFakeChat(reply="the answer is short", model="gpt-4", delay=latency)
    managers: dict[str, BudgetManager | None] = {BARE: None, MEMORY: budget(None)}
    if redis_url:
        managers[REDIS] = budget(redis_url)
    configs: dict[str, RunnableConfig] = {
        name: {"callbacks": []}
        if m is None
        else {"callbacks": [BudgetCallbackHandler(m, agent="bench", default_max_tokens=64)]}
        for name, m in managers.items()
    }
    spent = dict.fromkeys(managers, 0)

    async def run(name: str) -> float:
        seconds, tokens = await gathered(model, n, configs[name], collect)
        spent[name] += tokens
        manager = managers[name]
        if manager is not None:  # settled exactly: every call committed what it reported
            status = manager.status()["bench"]
            assert status.reserved == 0, (name, status)
            assert status.consumed == spent[name], (name, status.consumed, spent[name])
        return seconds

    for name in managers:  # warm up: encodings, pydantic, the Redis connections
        await run(name)
    walls: dict[str, list[float]] = {name: [] for name in managers}
    order = list(managers)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            walls[name].append(await run(name))
    for manager in managers.values():
        if manager is not None:
            manager.store.close()
    return walls


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure and print; returns the median wall seconds by variant."""
    parser = argparse.ArgumentParser(description="concurrent ainvoke: memory vs Redis store")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("-n", type=int, default=2_000, help="concurrent calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--latency", type=float, default=0.05, help="provider latency, s")
    parser.add_argument("--redis", default=None, help="redis:// URL (default $TBC_REDIS_URL)")
    parser.add_argument("--gc", action="store_true", help="keep the garbage collector on")
    args = parser.parse_args(argv)
    n, rounds, latency = (20, 1, 0.01) if args.quick else (args.n, args.rounds, args.latency)

    url, server = (args.redis, None) if args.redis else start_redis()
    if not url:
        print("no Redis (--redis, $TBC_REDIS_URL or redis-server): the Redis variant is left out")
    try:
        walls = asyncio.run(measure(n, rounds, latency, url or None, args.gc))
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    median = {name: statistics.median(w) for name, w in walls.items()}
    print(
        f"{n:,} concurrent ainvoke (asyncio.gather) of a model with {latency * 1e3:.0f} ms "
        f"latency: median wall time of {rounds} interleaved rounds "
        f"(on {os.cpu_count()} CPUs; garbage collector {'on' if args.gc else 'off'} in rounds)"
    )
    for name, seconds in median.items():
        spread = f"{min(walls[name]):.3f} to {max(walls[name]):.3f}"
        print(f"  {name:<24}{seconds:8.3f} s   (rounds: {spread} s)")
    if REDIS in median:
        print(f"  Redis / memory: {median[REDIS] / median[MEMORY]:.2f}x")
    print(f"  memory / no handler: {median[MEMORY] / median[BARE]:.2f}x")
    return median


if __name__ == "__main__":
    main()
