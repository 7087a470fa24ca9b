"""Worker processes for the multi-process store tests (importable under spawn)."""

from __future__ import annotations

import contextlib
import random
import time

from tbc_integrations import BudgetExceededError, BudgetManager, Reservation, Usage

AGENTS = {
    "planner": {"priority": 1, "max_tokens": 400_000},
    "researcher": {"priority": 3, "max_tokens": 150_000},
    "critic": {"priority": 2, "max_tokens": 200_000, "min_reserve": 20_000},
    "writer": {"priority": 4, "max_tokens": 100_000},
}


def register(url: str, namespace: str) -> BudgetManager:
    m = BudgetManager(store=url, namespace=namespace)
    for name, fields in AGENTS.items():
        m.register_agent(name, **fields)  # type: ignore[arg-type]  # attaches if it exists
    return m


def hammer(url: str, namespace: str, seed: int, ops: int) -> dict[str, int]:
    """Random reserve/commit/release; returns what this process committed per agent."""
    m = register(url, namespace)
    rng = random.Random(seed)
    names = list(AGENTS)
    committed = dict.fromkeys(names, 0)
    held: list[Reservation] = []
    for _ in range(ops):
        if rng.random() < 0.55 or not held:
            with contextlib.suppress(BudgetExceededError):
                held.append(m.reserve(rng.choice(names), rng.randint(0, 400), rng.randint(0, 600)))
        elif rng.random() < 0.85:
            r = held.pop(rng.randrange(len(held)))
            used = rng.randint(0, r.amount)
            out = rng.randint(0, used)
            m.commit(r, Usage(used - out, out))
            committed[r.agent] += used
        else:
            m.release(held.pop(rng.randrange(len(held))))
    for r in held:
        m.release(r)
    return committed


def hold_and_wait(url: str, namespace: str, lease: float, ready_path: str) -> None:
    """Reserve with a short lease, say so, then wait to be killed."""
    m = BudgetManager(store=url, namespace=namespace)
    m.reserve("researcher", 1_000, 2_000, lease_seconds=lease)
    with open(ready_path, "w") as f:
        f.write("held")
    time.sleep(600)


def open_at(url: str, start_at: float) -> int:
    """Open the store at the same moment as the other processes; register; return agents."""
    while time.time() < start_at:
        time.sleep(0.0005)
    m = register(url, "race")
    return len(m.status())
