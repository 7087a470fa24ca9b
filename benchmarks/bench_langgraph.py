"""Per-step cost of governing a LangGraph node, side by side with the bare graph.

A one-node graph whose node makes one call to a fake chat model that reports
usage. Three variants are interleaved, best of N:

- bare: the graph as the user wrote it;
- handler only: the bare graph invoked with ``BudgetCallbackHandler`` in its config;
- governed: the graph after ``govern_graph`` (wrapper + admission check + handler).

Run: ``python benchmarks/bench_langgraph.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from tbc_integrations import BudgetManager
from tbc_integrations.langchain import BudgetCallbackHandler
from tbc_integrations.langgraph import govern_graph
from tbc_integrations.testing import UsageFakeChat


class State(TypedDict, total=False):
    text: str


MODEL = UsageFakeChat(reply="short answer", model="gpt-4")


def node(state: State) -> State:
    return {"text": str(MODEL.invoke(state["text"]).content)}


def plain_node(state: State) -> State:
    return {"text": state["text"].upper()}


def graph_builder(step: Any = node) -> StateGraph[Any, Any, Any, Any]:
    b = StateGraph(State)
    b.add_node("agent", step)
    b.add_edge(START, "agent")
    b.add_edge("agent", END)
    return b


def timed(fn: Callable[[], object], calls: int) -> float:
    gc.disable()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    gc.enable()
    return elapsed / calls


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure and print; returns seconds per graph step by variant."""
    parser = argparse.ArgumentParser(description="LangGraph governed-node overhead")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    args = parser.parse_args(argv)
    calls, rounds = (50, 1) if args.quick else (1_000, 7)

    manager = BudgetManager()
    manager.register_agent("agent", max_tokens=10**15)
    bare = graph_builder().compile()
    governed = govern_graph(graph_builder(), manager, default_max_tokens=64).compile()
    handler = BudgetCallbackHandler(manager, agent="agent", default_max_tokens=64)
    inp: State = {"text": "Summarise the findings in one line."}
    bare_plain = graph_builder(plain_node).compile()
    governed_plain = govern_graph(graph_builder(plain_node), manager).compile()
    variants: dict[str, Callable[[], object]] = {
        "bare graph": lambda: bare.invoke(inp),
        "bare graph + handler in config": lambda: bare.invoke(inp, {"callbacks": [handler]}),
        "governed graph": lambda: governed.invoke(inp),
        "bare graph, no LLM call": lambda: bare_plain.invoke(inp),
        "governed graph, no LLM call": lambda: governed_plain.invoke(inp),
    }
    for fn in variants.values():
        for _ in range(20):
            fn()
    best = dict.fromkeys(variants, float("inf"))
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            per = timed(fn, calls)
            runs[name].append(per)
            best[name] = min(best[name], per)
    pairs = {
        "bare graph + handler in config": "bare graph",
        "governed graph": "bare graph",
        "governed graph, no LLM call": "bare graph, no LLM call",
    }
    print(f"one-node graph; best of {rounds} x {calls} invokes, variants interleaved")
    for name, per in best.items():
        extra = ""
        if name in pairs:
            base = best[pairs[name]]
            extra = f"  (+{(per - base) * 1e6:6.1f} us, {per / base - 1:+.1%} vs {pairs[name]!r})"
        print(f"  {name:<32}{per * 1e6:9.1f} us{extra}")
    for name in ("bare graph", "bare graph, no LLM call"):
        spread = (max(runs[name]) - best[name]) / best[name]
        print(f"  run-to-run spread of {name!r}: {spread:.1%}")
    return best


if __name__ == "__main__":
    main()
