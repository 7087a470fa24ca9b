"""Per-call cost of the LangChain handler, side by side with LangChain's own usage handler.

Prints microseconds per ``invoke`` of a fake chat model that reports usage:
with no handler, with ``UsageMetadataCallbackHandler`` (LangChain's own, which
only sums usage), with ``BudgetCallbackHandler`` (which counts the prompt's
tokens, reserves, and settles), and with a handler that does nothing: what
LangChain's callback machinery costs any handler, the floor under both.

The variants are interleaved call by call in random order and every call is
timed (``benchmarks/_timing.py`` says why); figures are medians per call. The
calls are cut into blocks; the difference between our handler and LangChain's
is also given block by block (its median and range), which shows how far the
figure can be trusted.

Then ``ainvoke``, where LangChain sends a handler that does not ask to run
inline through an executor thread, the real ``ChatOpenAI`` client talking
HTTP to a local OpenAI-compatible stub server (what a call costs with a real
client stack under it, the network aside), and an agent's turn: a history of
ten messages with tool calls and three tools, one new message each call, with
our handler kept for all calls or made for each call (as ``budget_scope`` and
``BudgetMiddleware`` do).

Run: ``python benchmarks/bench_langchain.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from langchain_core.callbacks import BaseCallbackHandler, UsageMetadataCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tbc_integrations import BudgetManager
from tbc_integrations.langchain import BudgetCallbackHandler, budget_scope
from tbc_integrations.testing import OpenAIStub, UsageFakeChat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import block_differences, interleaved, medians

OURS = "BudgetCallbackHandler"
THEIRS = "UsageMetadataCallbackHandler"
BARE = "no handler"
NOOP = "a handler that does nothing"


class NoopHandler(BaseCallbackHandler):
    """Receives the events and does nothing (the base class would raise on chat starts)."""

    def on_chat_model_start(self, *args: object, **kwargs: object) -> None:
        """Do nothing."""


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure and print; returns the median seconds per call by variant."""
    parser = argparse.ArgumentParser(description="LangChain handler overhead")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--calls", type=int, default=20_000, help="calls of each variant")
    args = parser.parse_args(argv)
    calls, blocks = (200, 2) if args.quick else (args.calls, 20)

    model = UsageFakeChat(reply="the answer is short", model="gpt-4")
    manager = BudgetManager()
    manager.register_agent("bench", max_tokens=10**15)
    ours = BudgetCallbackHandler(manager, agent="bench", default_max_tokens=64)
    usage = UsageMetadataCallbackHandler()
    prompt = "Summarise the budget report in one line."
    # A fresh prompt per call defeats the token counter's cache of recent texts
    # (which real multi-turn calls hit for their history and system prompt).
    fresh = (f"{prompt} Variant {i}." for i in range(10**12))

    def call(config: RunnableConfig, new_prompt: bool = False) -> Callable[[], object]:
        if new_prompt:
            return lambda: model.invoke(next(fresh), config=config)
        return lambda: model.invoke(prompt, config=config)

    variants = {
        BARE: call({}),
        NOOP: call({"callbacks": [NoopHandler()]}),
        THEIRS: call({"callbacks": [usage]}),
        OURS: call({"callbacks": [ours]}),
        "no handler, new prompt each call": call({}, new_prompt=True),
        f"{OURS}, new prompt each call": call({"callbacks": [ours]}, new_prompt=True),
    }
    for fn in variants.values():  # warm up: encodings, pydantic, caches
        for _ in range(200 if not args.quick else 20):
            fn()
    times = interleaved(variants, calls, blocks)
    median = medians(times)
    diffs = block_differences(times, OURS, THEIRS)

    bare = median[BARE]
    print(
        f"invoke on a fake chat model: median of {calls:,} calls of each, "
        f"interleaved call by call in random order, in {blocks} blocks"
    )
    for name, per in median.items():
        extra = "" if name == BARE else f"  (+{(per - bare) * 1e6:6.1f} us, {per / bare - 1:+.1%})"
        print(f"  {name:<44}{per * 1e6:9.1f} us{extra}")
    ours_extra = median[OURS] - median[THEIRS]
    print(
        f"  ours minus LangChain's own handler: {ours_extra * 1e6:+.1f} us "
        f"({ours_extra / bare:+.1%} of a bare invoke); block by block: median "
        f"{statistics.median(diffs):+.1f} us, from {min(diffs):+.1f} to {max(diffs):+.1f} us"
    )
    floor = median[NOOP] - bare
    print(
        f"  over a handler that does nothing (+{floor * 1e6:.1f} us): ours "
        f"{(median[OURS] - median[NOOP]) * 1e6:+.1f} us, LangChain's "
        f"{(median[THEIRS] - median[NOOP]) * 1e6:+.1f} us"
    )
    fresh_bare = median["no handler, new prompt each call"]
    fresh_ours = median[f"{OURS}, new prompt each call"] - fresh_bare
    print(
        f"  with a new prompt each call, ours adds {fresh_ours * 1e6:+.1f} us "
        f"({fresh_ours / fresh_bare:+.1%}); LangChain's own adds "
        f"{(median[THEIRS] - bare) * 1e6:+.1f} us to the same prompt"
    )
    median.update(async_calls(model, usage, ours, prompt, max(calls // 10, 20), blocks))
    median.update(http_calls(usage, ours, prompt, max(calls // 10, 10), blocks))
    median.update(agent_turns(model, manager, usage, ours, max(calls // 10, 20), blocks))
    assert manager.status()["bench"].reserved == 0
    return median


def warmed_up(
    label: str,
    call: Callable[[RunnableConfig], Callable[[], object]],
    usage: UsageMetadataCallbackHandler,
    ours: BudgetCallbackHandler,
    times: int,
) -> dict[str, Callable[[], object]]:
    """No handler, LangChain's and ours on one call path, each called ``times`` first."""
    variants = {
        f"{label}, {BARE}": call({}),
        f"{label}, {THEIRS}": call({"callbacks": [usage]}),
        f"{label}, {OURS}": call({"callbacks": [ours]}),
    }
    for fn in variants.values():
        for _ in range(times):
            fn()
    return variants


def async_calls(
    model: UsageFakeChat,
    usage: UsageMetadataCallbackHandler,
    ours: BudgetCallbackHandler,
    prompt: str,
    calls: int,
    blocks: int,
) -> dict[str, float]:
    """``ainvoke`` the same way, each call run to completion on one event loop.

    LangChain runs a synchronous handler in an executor thread on the async path
    unless it asks to run inline (``run_inline``); ours does, its own does not.
    """
    loop = asyncio.new_event_loop()

    def call(config: RunnableConfig) -> Callable[[], object]:
        return lambda: loop.run_until_complete(model.ainvoke(prompt, config=config))

    try:
        variants = warmed_up("ainvoke", call, usage, ours, 20)
        median = medians(interleaved(variants, calls, blocks))
    finally:
        loop.close()
    bare = median[f"ainvoke, {BARE}"]
    theirs, mine = median[f"ainvoke, {THEIRS}"] - bare, median[f"ainvoke, {OURS}"] - bare
    print(
        f"ainvoke, median of {calls:,} calls of each, interleaved: bare {bare * 1e6:.1f} us; "
        f"LangChain's handler adds {theirs * 1e6:+.1f} us, ours {mine * 1e6:+.1f} us"
    )
    return median


def http_calls(
    usage: UsageMetadataCallbackHandler,
    ours: BudgetCallbackHandler,
    prompt: str,
    calls: int,
    blocks: int,
) -> dict[str, float]:
    """``invoke`` on the real ``ChatOpenAI`` client over HTTP to a local stub server."""
    with OpenAIStub(reply="the answer is short") as stub:
        model = ChatOpenAI(
            model="gpt-4",  # the encoding the fake model's runs use (cl100k, offline too)
            base_url=stub.base_url,
            api_key=SecretStr("bench-key"),
            max_completion_tokens=64,
            max_retries=0,
        )

        def call(config: RunnableConfig) -> Callable[[], object]:
            return lambda: model.invoke(prompt, config=config)

        times = interleaved(warmed_up("ChatOpenAI", call, usage, ours, 5), calls, blocks)
    median = medians(times)
    diffs = block_differences(times, f"ChatOpenAI, {OURS}", f"ChatOpenAI, {THEIRS}")
    bare = median[f"ChatOpenAI, {BARE}"]
    theirs = median[f"ChatOpenAI, {THEIRS}"] - bare
    mine = median[f"ChatOpenAI, {OURS}"] - bare
    print(
        f"ChatOpenAI over HTTP to a local stub, median of {calls:,} calls of each, interleaved: "
        f"bare {bare * 1e6:.0f} us; LangChain's handler adds {theirs * 1e6:+.1f} us "
        f"({theirs / bare:+.1%}), ours {mine * 1e6:+.1f} us ({mine / bare:+.1%}); ours minus "
        f"LangChain's block by block: median {statistics.median(diffs):+.1f} us, "
        f"from {min(diffs):+.1f} to {max(diffs):+.1f} us"
    )
    return median


def agent_turns(
    model: UsageFakeChat,
    manager: BudgetManager,
    usage: UsageMetadataCallbackHandler,
    ours: BudgetCallbackHandler,
    calls: int,
    blocks: int,
) -> dict[str, float]:
    """An agent's turn: its system prompt, a history with tool calls, its tools, one new
    message each call; our handler kept, or made for each call."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f"{name.capitalize()} what the user asks for.",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "What to look up."}},
                    "required": ["query"],
                },
            },
        }
        for name in ("search", "fetch", "calculate")
    ]
    history: list[BaseMessage] = [
        SystemMessage("You are a careful research assistant. Cite every source you use. " * 12),
        HumanMessage("Find the population of Lyon and of Marseille, and add them up."),
    ]
    for i in range(4):
        call = {"name": "search", "args": {"query": f"population {i}"}, "id": f"call_{i}"}
        history.append(AIMessage("", tool_calls=[call]))
        history.append(
            ToolMessage(f"Result {i}: about 520,000 inhabitants. " * 6, tool_call_id=call["id"])
        )
    turns = (HumanMessage(f"Now the next step, number {i}.") for i in range(10**12))

    def turn(config: RunnableConfig) -> Callable[[], object]:
        return lambda: model.invoke([*history, next(turns)], config=config, tools=tools)

    def turn_in_scope() -> object:
        with budget_scope(manager, agent="bench", default_max_tokens=64):
            return model.invoke([*history, next(turns)], tools=tools)

    variants = warmed_up("agent turn", turn, usage, ours, 20)
    variants[f"agent turn, {OURS} made for the call"] = turn_in_scope
    for _ in range(20):
        turn_in_scope()
    median = medians(interleaved(variants, calls, blocks))
    bare = median[f"agent turn, {BARE}"]
    added = {name: (per - bare) * 1e6 for name, per in median.items()}
    print(
        f"an agent's turn ({len(history) + 1} messages, {len(tools)} tools), median of "
        f"{calls:,} calls of each, interleaved: bare {bare * 1e6:.1f} us; LangChain's handler "
        f"adds {added[f'agent turn, {THEIRS}']:+.1f} us, ours {added[f'agent turn, {OURS}']:+.1f} "
        f"us, ours made for the call {added[f'agent turn, {OURS} made for the call']:+.1f} us"
    )
    return median


if __name__ == "__main__":
    main()
