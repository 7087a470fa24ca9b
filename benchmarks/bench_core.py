"""Core engine benchmark, side by side with the ``token-budget-contracts`` package.

Prints, measured in one run on this machine:

1. one reserve+commit pair on the in-memory store, against tbcontracts'
   ``record_usage`` (its only settle verb, which checks after the spend), and
   against a floor: the least a pair can do in Python (:class:`FloorLedger`);
2. one reallocation at 10, 100, 1,000 and 10,000 agents, against tbcontracts'
   ``Reallocator.reallocate`` (which sorts every agent on every call).

Run: ``python benchmarks/bench_core.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tbc_integrations import BudgetExceededError, BudgetManager, ModelPrice, Reservation, Usage

MAX_TOKENS = 2**53 - 1


def _offline_tiktoken() -> None:
    """tbcontracts loads cl100k at import; serve it from the bundled offline file."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return
    try:
        import tiktoken_ext
    except ImportError:
        return
    source = Path(next(iter(tiktoken_ext.__path__))) / "data" / "cl100k_base.tiktoken"
    if not source.exists():
        return
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    cache = Path(tempfile.mkdtemp(prefix="tbc-bench-tiktoken-"))
    shutil.copy(source, cache / hashlib.sha1(url.encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


class FloorLedger:
    """The least a reserve+commit pair can do in Python: the floor under ours.

    The same checks of the arguments and of the usage, one lock, a clock read per
    verb, the agent's caps and budget, a 12-field ``Reservation`` kept by id and
    found by it on commit; none of what the library adds to that (a contract
    layer, a store interface, the engine's verbs, money, policies, events, leases
    swept, loans returned, limits, teams). Written inline in two methods, it is
    what no layered design can beat on this interpreter and machine.
    """

    def __init__(self, agent: str, max_tokens: int) -> None:
        self.lock = threading.Lock()
        self.open: dict[str, Reservation] = {}
        self.issued = 0
        self.rows = {agent: [max_tokens, 0, 0, 0, 0, 0, 0]}  # allocated, consumed, reserved

    def reserve(self, agent: str, input_tokens: int, output_tokens: int) -> Reservation:
        if not (type(agent) is str and 0 < len(agent) <= 256 and agent.isprintable()):
            raise ValueError(agent)
        if not (
            type(input_tokens) is int
            and type(output_tokens) is int
            and input_tokens >= 0
            and output_tokens >= 0
            and input_tokens + output_tokens <= MAX_TOKENS
        ):
            raise ValueError((input_tokens, output_tokens))
        now = time.monotonic()
        amount = input_tokens + output_tokens
        with self.lock:
            row = self.rows[agent]
            if amount > row[0] - row[1] - row[2]:
                raise BudgetExceededError(agent, amount, row[0] - row[1] - row[2])
            row[2] += amount
            row[5] += input_tokens
            row[6] += output_tokens
            self.issued += 1
            rid = f"floor.{self.issued}"
            res = self.open[rid] = Reservation(rid, agent, input_tokens, output_tokens, now + 300.0)
            return res

    def commit(self, reservation: Reservation, usage: Usage) -> int:
        i, o = usage[0], usage[1]
        if not (
            type(i) is int and type(o) is int and 0 <= i <= MAX_TOKENS and 0 <= o <= MAX_TOKENS
        ):
            raise ValueError(usage)
        time.monotonic()
        with self.lock:
            held = self.open.pop(reservation.id)
            row = self.rows[held.agent]
            row[1] += i + o
            row[3] += i
            row[4] += o
            row[2] -= held.input_tokens + held.output_tokens
            row[5] -= held.input_tokens
            row[6] -= held.output_tokens
            return 0


def per_call(fn: Callable[[], None], calls: int, repeats: int) -> float:
    """Best-of-``repeats`` seconds per call of ``fn`` over ``calls`` calls."""
    best = float("inf")
    for _ in range(repeats):
        gc.disable()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        gc.enable()
        best = min(best, elapsed / calls)
    return best


def bench_pair(calls: int, repeats: int) -> tuple[float, float, float, float]:
    """Seconds per pair: tokens only, priced (a cost cap and a ModelPrice), tbcontracts'
    one verb, and the floor (:class:`FloorLedger`)."""
    import tbcontracts

    ours = BudgetManager()
    ours.register_agent("agent", max_tokens=10**15)
    reserve, commit = ours.reserve, ours.commit
    usage = Usage(90, 40)

    def ours_pair() -> None:
        commit(reserve("agent", 100, 50), usage)

    priced = BudgetManager(prices={"gpt-4o-mini": ModelPrice(input="0.15", output="0.60")})
    priced.register_agent("agent", max_tokens=10**15, max_cost=10**6)
    p_reserve, p_commit = priced.reserve, priced.commit

    def priced_pair() -> None:
        p_commit(p_reserve("agent", 100, 50, model="gpt-4o-mini"), usage)

    theirs = tbcontracts.BudgetManager()
    theirs.register_agent("agent", max_tokens=10**15)
    record = theirs.record_usage

    def theirs_call() -> None:
        record("agent", 130)

    floor = FloorLedger("agent", 10**15)
    f_reserve, f_commit = floor.reserve, floor.commit

    def floor_pair() -> None:
        f_commit(f_reserve("agent", 100, 50), usage)

    # interleaved, so all see the same machine
    best_ours = best_priced = best_theirs = best_floor = float("inf")
    for _ in range(repeats):
        best_ours = min(best_ours, per_call(ours_pair, calls, 1))
        best_priced = min(best_priced, per_call(priced_pair, calls, 1))
        best_theirs = min(best_theirs, per_call(theirs_call, calls, 1))
        best_floor = min(best_floor, per_call(floor_pair, calls, 1))
    return best_ours, best_priced, best_theirs, best_floor


def team(manager: object, agents: int) -> None:
    """``agents - 1`` donors over three priorities, and one empty priority-3 agent."""
    register = manager.register_agent  # type: ignore[attr-defined]
    for i in range(agents - 1):
        register(f"donor{i}", priority=1 + i % 3, max_tokens=10**9)
    register("needy", priority=3, max_tokens=0)


def bench_reallocation(agents: int, calls: int, theirs_calls: int) -> tuple[float, float, float]:
    import tbcontracts

    ours, borrower, theirs = BudgetManager(), BudgetManager(), tbcontracts.BudgetManager()
    for manager in (ours, borrower, theirs):
        team(manager, agents)
    ours_move = ours.reallocator.reallocate
    theirs_move = theirs.reallocator.reallocate

    def ours_call() -> None:
        ours_move("needy", 10)

    def borrow_call() -> None:  # a reservation that borrows, then returns its loan
        borrower.release(borrower.reserve("needy", 0, 10))

    def theirs_call() -> None:
        theirs_move("needy", 10)

    return (
        per_call(ours_call, calls, 3),
        per_call(borrow_call, calls, 3),
        per_call(theirs_call, theirs_calls, 1),
    )


def main(argv: list[str] | None = None) -> None:
    """Run both comparisons and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    args = parser.parse_args(argv)
    _offline_tiktoken()
    calls, repeats = (2_000, 1) if args.quick else (200_000, 5)
    ours, priced, theirs, floor = bench_pair(calls, repeats)
    print("reserve+commit pair vs tbcontracts record_usage (in-memory, 1 thread)")
    print(
        f"  tbc_integrations reserve+commit : {ours * 1e6:8.2f} us ({ours / floor:.2f}x the floor)"
    )
    print(f"  the same, priced (cost cap)     : {priced * 1e6:8.2f} us ({priced / ours:.2f}x)")
    print(f"  tbcontracts record_usage        : {theirs * 1e6:8.2f} us")
    print(f"  ratio (theirs / ours)           : {theirs / ours:8.2f}x")
    print(f"  floor: the least a pair can do  : {floor * 1e6:8.2f} us (FloorLedger)")
    print()
    sizes = [10, 1_000] if args.quick else [10, 100, 1_000, 10_000]
    print("one reallocation (10 tokens to a priority-3 agent), microseconds per call")
    print(f"  {'agents':>8} {'ours':>10} {'ours borrow':>12} {'tbcontracts':>13} {'speedup':>9}")
    previous: tuple[float, int] | None = None
    for n in sizes:
        theirs_calls = 20 if n >= 10_000 or args.quick else (300 if n >= 1_000 else 3_000)
        # a reallocation sorts the team (see _engine._borrow): fewer calls for big teams
        ours_calls = 200 if args.quick else max(20, 2_000_000 // (n * 10))
        ours_r, borrow_r, theirs_r = bench_reallocation(n, ours_calls, theirs_calls)
        growth = ""
        if previous is not None:
            growth = f"  (ours x{ours_r / previous[0]:.2f} for x{n // previous[1]} agents)"
        print(
            f"  {n:>8} {ours_r * 1e6:>10.2f} {borrow_r * 1e6:>12.2f} "
            f"{theirs_r * 1e6:>13.1f} {theirs_r / ours_r:>8.0f}x{growth}"
        )
        previous = (ours_r, n)


if __name__ == "__main__":
    main()
