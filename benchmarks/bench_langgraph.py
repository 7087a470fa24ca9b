"""Per-step cost of governing a LangGraph node, side by side with the bare graph.

A one-node graph whose node makes one call to a fake chat model that reports
usage. The variants are interleaved call by call in random order and every
graph step is timed (``benchmarks/_timing.py`` says why); figures are medians:

- bare: the graph as the user wrote it;
- handler only: the bare graph invoked with ``BudgetCallbackHandler`` in its config;
- governed: the graph after ``govern_graph`` (wrapper + admission check + handler);
- and the bare and governed graphs again with a node that makes no LLM call.

Run: ``python benchmarks/bench_langgraph.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from tbc_integrations import BudgetManager
from tbc_integrations.langchain import BudgetCallbackHandler
from tbc_integrations.langgraph import govern_graph
from tbc_integrations.testing import UsageFakeChat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import block_differences, interleaved, medians


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


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure and print; returns the median seconds per graph step by variant."""
    parser = argparse.ArgumentParser(description="LangGraph governed-node overhead")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    args = parser.parse_args(argv)
    calls, blocks = (50, 2) if args.quick else (5_000, 10)

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
    times = interleaved(variants, calls, blocks)
    median = medians(times)
    pairs = {
        "bare graph + handler in config": "bare graph",
        "governed graph": "bare graph",
        "governed graph, no LLM call": "bare graph, no LLM call",
    }
    print(
        f"one-node graph: median of {calls:,} invokes of each, "
        f"interleaved call by call in random order, in {blocks} blocks"
    )
    for name, per in median.items():
        extra = ""
        if name in pairs:
            base = median[pairs[name]]
            extra = f"  (+{(per - base) * 1e6:6.1f} us, {per / base - 1:+.1%} vs {pairs[name]!r})"
        print(f"  {name:<32}{per * 1e6:9.1f} us{extra}")
    for name, other in (
        ("governed graph", "bare graph + handler in config"),
        ("governed graph, no LLM call", "bare graph, no LLM call"),
    ):
        diffs = block_differences(times, name, other)
        print(
            f"  {name!r} minus {other!r}, block by block: median "
            f"{statistics.median(diffs):+.1f} us, from {min(diffs):+.1f} to {max(diffs):+.1f} us"
        )
    return median


if __name__ == "__main__":
    main()
