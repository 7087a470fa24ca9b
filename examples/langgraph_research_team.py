"""A governed LangGraph research team: planner -> (researcher, critic) -> writer.

Every node is an agent under a contract. The researcher is the most important
and runs short, so it borrows mid-run; the planner is
marked complete once it has run, so its leftover is spare for the rest; the
critic reports a confidence that closes its gate (a second review would be
refused); the writer falls back to a shorter node if its budget runs out. Offline: the models are
scripted fakes that report usage the way providers do.

Run: ``python examples/langgraph_research_team.py``
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, cast

from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from tbc_integrations import BudgetManager
from tbc_integrations.events import BudgetEvent
from tbc_integrations.langgraph import govern_graph
from tbc_integrations.testing import UsageFakeChat


class Research(TypedDict, total=False):
    topic: str
    plan: str
    findings: Annotated[list[str], operator.add]
    critique: str
    confidence: float
    reviews: int
    report: str


def planner(state: Research) -> Research:
    model = UsageFakeChat(reply="1. recovery rates 2. costs 3. policy", max_tokens=64)
    return {"plan": str(model.invoke(f"Plan research on {state['topic']}").content)}


def researcher(state: Research) -> Research:
    reply = " ".join(["finding"] * 180)  # a long answer: more than its own budget
    model = UsageFakeChat(reply=reply, max_tokens=400)
    return {"findings": [str(model.invoke(state["plan"]).content)]}


def critic(state: Research) -> Research:
    model = UsageFakeChat(reply="sound plan; the cost figures need a source", max_tokens=64)
    critique = str(model.invoke(f"Review the plan: {state['plan']}").content)
    return {"critique": critique, "confidence": 0.9, "reviews": state.get("reviews", 0) + 1}


def writer(state: Research) -> Research:
    model = UsageFakeChat(reply="Battery recycling: a three part report", max_tokens=200)
    prompt = "\n".join(state.get("findings", [])) + state.get("critique", "")
    return {"report": str(model.invoke(prompt).content)}


def short_writer(state: Research) -> Research:
    return {"report": "Battery recycling: see the findings (short version)"}


def build() -> StateGraph[Any, Any, Any, Any]:
    """The team's graph, not yet governed."""
    b = StateGraph(Research)
    b.add_node("planner", planner)
    b.add_node("researcher", researcher)
    b.add_node("critic", critic)
    b.add_node("writer", writer)
    b.add_node("short_writer", short_writer)
    b.add_edge(START, "planner")
    b.add_edge("planner", "researcher")
    b.add_edge("planner", "critic")
    b.add_edge(["researcher", "critic"], "writer")
    b.add_edge("writer", END)
    b.add_edge("short_writer", END)
    return b


def team() -> BudgetManager:
    """The contracts: who may spend what, and who outranks whom."""
    m = BudgetManager()
    m.register_agent("planner", priority=2, max_tokens=600)
    m.register_agent("researcher", priority=4, max_tokens=150)
    m.register_agent("critic", priority=1, max_tokens=1_500, confidence_threshold=0.8)
    m.register_agent("writer", priority=3, max_tokens=800, depends_on=["researcher", "critic"])
    m.register_agent("short_writer", priority=1, max_tokens=100)
    return m


def run() -> tuple[BudgetManager, Research, list[BudgetEvent]]:
    """Govern the graph, run it once, return the manager, final state and events."""
    manager = team()
    events: list[BudgetEvent] = []
    manager.subscribe(events.append)
    graph = govern_graph(
        build(),
        manager,
        on_exhausted={"critic": "skip", "writer": "short_writer"},
        confidence_key={"critic": "confidence"},
        complete="auto",
        default_max_tokens=128,
    ).compile()
    # one node at a time: who lends to the researcher does not depend on thread timing
    state = cast(Research, graph.invoke({"topic": "battery recycling"}, {"max_concurrency": 1}))
    return manager, state, events


def main() -> None:
    """Run and print the budget flow and the final status."""
    manager, state, events = run()
    print(f"report: {state['report']!r}")
    print(f"critic gated after its review: {manager.status()['critic'].gated}\n")
    print("budget flow:")
    for e in events:
        if e.kind == "transfer" and e.reason in ("borrow", "overdraft", "reallocate"):
            donors = ", ".join(f"{t} from {d}" for d, t in e.donors)
            print(f"  {e.agent} borrowed {e.tokens} ({donors})")
        elif e.kind == "transfer" and e.reason == "return":
            print(f"  {e.agent} got back {e.tokens} unused")
        elif e.kind in ("refuse", "gate", "complete"):
            print(f"  {e.agent}: {e.kind} {e.reason}".rstrip())
    print()
    print(
        f"{'agent':<13}{'allocated':>10}{'consumed':>10}{'borrowed':>10}{'lent':>6}{'refused':>9}"
    )
    for name, s in manager.status().items():
        print(
            f"{name:<13}{s.allocated:>10}{s.consumed:>10}{s.borrowed:>10}{s.lent:>6}{s.refusals:>9}"
        )


if __name__ == "__main__":
    main()
