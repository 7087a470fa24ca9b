"""Worker processes for the multi-process limit tests (importable under spawn)."""

from __future__ import annotations

import random
from collections import Counter

from tbc_integrations import BudgetManager, Limit, LimitExceededError, Usage

USERS = ("u0", "u1", "u2", "u3", "u4")
PER_USER = 20_000


def manager(url: str) -> BudgetManager:
    m = BudgetManager(
        store=url,
        namespace="limits-mp",
        limits=[Limit("user", max_tokens=PER_USER, window="day")],
    )
    m.register_agent("planner", priority=1, max_tokens=10_000_000)  # attaches if it exists
    m.register_agent("writer", priority=2, max_tokens=10_000_000)
    return m


def spend(url: str, seed: int, calls: int) -> Counter[str]:
    """Random calls of random users; returns the tokens this process committed per user."""
    m = manager(url)
    rng = random.Random(seed)
    committed: Counter[str] = Counter()
    for _ in range(calls):
        user = rng.choice(USERS)
        try:
            r = m.reserve(rng.choice(["planner", "writer"]), 200, 100, scope={"user": user})
        except LimitExceededError:
            continue
        used = rng.randint(100, 300)
        m.commit(r, Usage(used, 0))
        committed[user] += used
    return committed
