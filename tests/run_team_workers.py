"""Worker processes for the tests of a team per run (importable under spawn, runnable
with ``python -m tests.run_team_workers``)."""

from __future__ import annotations

import json
import pickle
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tbc_integrations import BudgetExceededError, BudgetManager, Limit, Usage

RUNS = tuple(f"run-{i}" for i in range(8))
PER_RUN = 3_000  # the writer's allocation in every run's team
PER_USER = 40_000


def manager(url: str) -> BudgetManager:
    m = BudgetManager(
        store=url,
        namespace="teams-mp",
        team_per="run",
        forget_after="1d",
        limits=[Limit("user", max_tokens=PER_USER, window="day")],
    )
    m.register_agent("planner", priority=1, max_tokens=1_000, min_reserve=0)  # attaches
    m.register_agent("writer", priority=2, max_tokens=PER_RUN - 1_000)
    return m


def spend(url: str, seed: int, calls: int) -> dict[str, int]:
    """Calls in every run (one user per two runs) until refused; tokens committed per run."""
    m = manager(url)
    committed: Counter[str] = Counter()
    for i in range(calls):
        run = RUNS[(seed + i) % len(RUNS)]
        user = f"u{RUNS.index(run) // 2}"
        try:
            r = m.reserve("writer", 60, 40, scope={"run": run, "user": user})
        except BudgetExceededError:
            continue
        used = 50 + (seed * 7 + i) % 50
        m.commit(r, Usage(used, 0))
        committed[run] += used
    return dict(committed)


# ------------------------------------------------- LangGraph interrupt and resume
def chat(base_url: str, max_tokens: int) -> Any:
    """ChatOpenAI talking to the local stub at ``base_url``."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model="gpt-4",
        base_url=base_url,
        api_key="test",  # type: ignore[arg-type]
        max_tokens=max_tokens,  # type: ignore[call-arg]
    )


def build_graph(m: BudgetManager, base_url: str, saver: Any) -> Any:
    """draft (an LLM call) -> ask (``interrupt()``: a person approves) -> final (an LLM
    call); every node governed, the run's team per ``thread_id``."""
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import interrupt
    from typing_extensions import TypedDict

    from tbc_integrations.langgraph import govern_graph

    llm = chat(base_url, 20)

    class State(TypedDict, total=False):
        text: str
        approved: str

    def draft(state: State) -> State:
        return {"text": str(llm.invoke("Draft a line about " + state.get("text", "")).content)}

    def ask(state: State) -> State:
        return {"approved": str(interrupt({"draft": state.get("text", "")}))}

    def final(state: State) -> State:
        reply = llm.invoke("Polish: " + state.get("text", "") + " " + state.get("approved", ""))
        return {"text": str(reply.content)}

    g = StateGraph(State)
    g.add_node("draft", draft)
    g.add_node("ask", ask)
    g.add_node("final", final)
    g.add_edge(START, "draft")
    g.add_edge("draft", "ask")
    g.add_edge("ask", "final")
    g.add_edge("final", END)
    agents = {"draft": "writer", "ask": "reviewer", "final": "writer"}
    return govern_graph(g, m, agents=agents).compile(checkpointer=saver)


def graph_manager(url: str) -> BudgetManager:
    m = BudgetManager(
        store=url,
        namespace="teams-resume",
        team_per="run",
        limits=[Limit("user", max_tokens=100_000, window="day")],
    )
    m.register_agent("writer", priority=2, max_tokens=400)
    m.register_agent("reviewer", priority=1, max_tokens=50, min_reserve=50)
    return m


def save_checkpoints(saver: Any, path: Path) -> None:
    """Write an ``InMemorySaver``'s checkpoints to ``path`` (its dicts, made plain)."""
    storage = {k: {ns: dict(v) for ns, v in d.items()} for k, d in saver.storage.items()}
    path.write_bytes(pickle.dumps((storage, dict(saver.writes), dict(saver.blobs))))


def load_checkpoints(path: Path) -> Any:
    """An ``InMemorySaver`` holding the checkpoints :func:`save_checkpoints` wrote."""
    from langgraph.checkpoint.memory import InMemorySaver

    saver = InMemorySaver()
    storage, writes, blobs = pickle.loads(path.read_bytes())
    for thread, namespaces in storage.items():
        for ns, checkpoints in namespaces.items():
            saver.storage[thread][ns].update(checkpoints)
    saver.writes.update(writes)
    saver.blobs.update(blobs)
    return saver


def resume(url: str, base_url: str, checkpoints: str, thread: str) -> dict[str, Any]:
    """In this (another) process: resume ``thread`` after its interrupt; report its team."""
    from langgraph.types import Command

    m = graph_manager(url)
    graph = build_graph(m, base_url, load_checkpoints(Path(checkpoints)))
    config: Any = {"configurable": {"thread_id": thread, "user_id": "ann"}}
    out = graph.invoke(Command(resume="approved"), config)
    writer = m.team_status(thread)["writer"]
    return {"text": out["text"], "consumed": writer.consumed, "reserved": writer.reserved}


def main(argv: list[str]) -> int:
    print(json.dumps(resume(*argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["RUNS", "build_graph", "chat", "manager", "resume", "spend"]
