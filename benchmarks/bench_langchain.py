"""Per-call cost of the LangChain handler, side by side with LangChain's own usage handler.

Prints microseconds per ``invoke`` of a fake chat model that reports usage:
with no handler, with ``UsageMetadataCallbackHandler`` (LangChain's own, which
only sums usage), and with ``BudgetCallbackHandler`` (which counts the prompt's
tokens, reserves, and settles). The three runs are interleaved, best of N.

Run: ``python benchmarks/bench_langchain.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import time
from collections.abc import Callable, Iterator

from langchain_core.callbacks import UsageMetadataCallbackHandler
from langchain_core.runnables import RunnableConfig

from tbc_integrations import BudgetManager
from tbc_integrations.langchain import BudgetCallbackHandler
from tbc_integrations.testing import UsageFakeChat


def timed(fn: Callable[[], object], calls: int) -> float:
    gc.disable()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    gc.enable()
    return elapsed / calls


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure and print; returns seconds per call by variant."""
    parser = argparse.ArgumentParser(description="LangChain handler overhead")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    args = parser.parse_args(argv)
    calls, rounds = (200, 1) if args.quick else (3_000, 7)

    model = UsageFakeChat(reply="the answer is short", model="gpt-4")
    manager = BudgetManager()
    manager.register_agent("bench", max_tokens=10**15)
    ours = BudgetCallbackHandler(manager, agent="bench", default_max_tokens=64)
    usage = UsageMetadataCallbackHandler()
    prompt = "Summarise the budget report in one line."
    configs: dict[str, RunnableConfig] = {
        "no handler": {},
        "UsageMetadataCallbackHandler": {"callbacks": [usage]},
        "BudgetCallbackHandler": {"callbacks": [ours]},
    }
    for config in configs.values():  # warm up: encodings, pydantic, caches
        for _ in range(50):
            model.invoke(prompt, config=config)
    # A fresh prompt per call defeats the token counter's cache of recent texts
    # (which real multi-turn calls hit for their history and system prompt).
    fresh = iter(f"{prompt} Variant {i}." for i in range(10**9))
    configs["no handler, new prompt each call"] = {}
    configs["BudgetCallbackHandler, new prompt each call"] = {"callbacks": [ours]}
    best = dict.fromkeys(configs, float("inf"))
    diffs: list[float] = []  # ours minus LangChain's own, round by round
    for _ in range(rounds):
        this_round: dict[str, float] = {}
        for name, config in configs.items():
            texts = fresh if name.endswith("each call") else itertools.repeat(prompt)

            def call(config: RunnableConfig = config, texts: Iterator[str] = texts) -> object:
                return model.invoke(next(texts), config=config)

            per = timed(call, calls)
            best[name] = min(best[name], per)
            this_round[name] = per
        diffs.append(
            this_round["BudgetCallbackHandler"] - this_round["UsageMetadataCallbackHandler"]
        )
    bare = best["no handler"]
    print(f"invoke on a fake chat model, best of {rounds} x {calls} calls")
    for name, per in best.items():
        extra = (
            ""
            if name == "no handler"
            else f"  (+{(per - bare) * 1e6:6.1f} us, {per / bare - 1:+.1%})"
        )
        print(f"  {name:<44}{per * 1e6:9.1f} us{extra}")
    ours_extra = best["BudgetCallbackHandler"] - best["UsageMetadataCallbackHandler"]
    print(
        f"  ours minus LangChain's own handler: {ours_extra * 1e6:+.1f} us "
        f"({ours_extra / bare:+.1%} of a bare invoke); round by round: median "
        f"{statistics.median(diffs) * 1e6:+.1f} us, from {min(diffs) * 1e6:+.1f} "
        f"to {max(diffs) * 1e6:+.1f} us"
    )
    fresh_bare = best["no handler, new prompt each call"]
    fresh_ours = best["BudgetCallbackHandler, new prompt each call"] - fresh_bare
    print(
        f"  with a new prompt each call, ours adds {fresh_ours * 1e6:+.1f} us "
        f"({fresh_ours / fresh_bare:+.1%}); LangChain's own adds "
        f"{(best['UsageMetadataCallbackHandler'] - bare) * 1e6:+.1f} us"
    )
    assert manager.status()["bench"].reserved == 0
    return best


if __name__ == "__main__":
    main()
