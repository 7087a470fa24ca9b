"""The innermost governed agent owns its call: subgraphs and create_agent inside nodes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from tbc_integrations import BudgetExceededError, BudgetManager
from tbc_integrations.langgraph import BudgetMiddleware, govern_graph
from tbc_integrations.testing import UsageFakeChat


class State(TypedDict, total=False):
    topic: str
    notes: str
    draft: str


def inner_subgraph(chat: UsageFakeChat, m: BudgetManager) -> Any:
    def research(state: State) -> State:
        return {"notes": str(chat.invoke("research " + state["topic"]).content)}

    sub = StateGraph(State)
    sub.add_node("research", research)
    sub.add_edge(START, "research")
    sub.add_edge("research", END)
    return govern_graph(sub, m, agents={"research": "researcher"}).compile()


def outer_graph(body: Any, m: BudgetManager) -> Any:
    g = StateGraph(State)
    g.add_node("write", body)
    g.add_edge(START, "write")
    g.add_edge("write", END)
    return govern_graph(g, m, agents={"write": "writer"}).compile()


def manager(researcher: int) -> BudgetManager:
    m = BudgetManager()
    m.register_agent("writer", priority=2, max_tokens=10_000)  # lends nothing downhill
    m.register_agent("researcher", priority=1, max_tokens=researcher, min_reserve=0)
    return m


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_governed_subgraph_in_a_governed_node_charges_its_own_agent(path: str) -> None:
    m = manager(researcher=5_000)
    chat = UsageFakeChat(reply="found three papers")
    sub = inner_subgraph(chat, m)

    def write(state: State) -> State:
        return {"draft": sub.invoke({"topic": state["topic"]})["notes"]}

    async def awrite(state: State) -> State:
        return {"draft": (await sub.ainvoke({"topic": state["topic"]}))["notes"]}

    graph = outer_graph(write if path == "sync" else awrite, m)
    run = graph.invoke if path == "sync" else (lambda x: asyncio.run(graph.ainvoke(x)))
    assert run({"topic": "batteries"})["draft"] == "found three papers"
    s = m.status()
    assert chat.calls == 1
    assert s["researcher"].consumed > 0 and s["writer"].consumed == 0  # the outer sees nothing


def test_the_inner_agents_budget_refuses_the_call_before_the_request() -> None:
    m = manager(researcher=30)  # less than one call needs; the writer is rich
    chat = UsageFakeChat(reply="never sent")
    sub = inner_subgraph(chat, m)

    def write(state: State) -> State:
        return {"draft": sub.invoke({"topic": "a long topic " * 20})["notes"]}

    with pytest.raises(BudgetExceededError) as err:
        outer_graph(write, m).invoke({"topic": "t"})
    assert err.value.agent_name == "researcher"
    assert chat.calls == 0 and m.status()["writer"].consumed == 0


def test_create_agent_with_budget_middleware_inside_a_governed_node() -> None:
    from langchain.agents import create_agent

    m = manager(researcher=5_000)
    chat = UsageFakeChat(reply="an answer")
    agent = create_agent(
        chat, tools=[], name="researcher", middleware=[BudgetMiddleware(m, "researcher")]
    )

    def write(state: State) -> State:
        out = agent.invoke({"messages": [HumanMessage(state["topic"])]})
        return {"draft": str(out["messages"][-1].content)}

    assert outer_graph(write, m).invoke({"topic": "t"})["draft"] == "an answer"
    s = m.status()
    assert s["researcher"].consumed > 0 and s["writer"].consumed == 0

    poor = manager(researcher=30)
    quiet = UsageFakeChat(reply="never sent")
    stopped = create_agent(
        quiet,
        tools=[],
        name="researcher",
        middleware=[BudgetMiddleware(poor, "researcher", on_exhausted="end")],
    )

    def write_poor(state: State) -> State:
        out = stopped.invoke({"messages": [HumanMessage("explain " * 60)]})
        return {"draft": str(out["messages"][-1].content)}

    draft = outer_graph(write_poor, poor).invoke({"topic": "t"})["draft"]
    assert draft.startswith("[stopped: token budget exhausted]") and "'researcher'" in draft
    assert quiet.calls == 0 and poor.status()["writer"].consumed == 0


def test_a_middleware_named_by_its_agent_graph_inside_a_governed_node_charges_that_agent() -> None:
    """``BudgetMiddleware(m)`` without ``agent=``: the innermost name, the agent graph's own
    (``create_agent(name=...)``), owns the call when it has a contract; an unknown one
    leaves the call with the governed node's agent."""
    from langchain.agents import create_agent

    m = manager(researcher=5_000)
    chat = UsageFakeChat(reply="an answer")
    agent = create_agent(chat, tools=[], name="researcher", middleware=[BudgetMiddleware(m)])

    def write(state: State) -> State:
        out = agent.invoke({"messages": [HumanMessage(state["topic"])]})
        return {"draft": str(out["messages"][-1].content)}

    assert outer_graph(write, m).invoke({"topic": "t"})["draft"] == "an answer"
    s = m.status()
    assert s["researcher"].consumed > 0 and s["writer"].consumed == 0

    helper = create_agent(
        UsageFakeChat(reply="helped"), tools=[], name="helper", middleware=[BudgetMiddleware(m)]
    )

    def write_with_helper(state: State) -> State:
        out = helper.invoke({"messages": [HumanMessage(state["topic"])]})
        return {"draft": str(out["messages"][-1].content)}

    before = m.status()["writer"].consumed
    assert outer_graph(write_with_helper, m).invoke({"topic": "t"})["draft"] == "helped"
    assert m.status()["writer"].consumed > before  # no contract for "helper": the node's agent


def test_the_agent_graphs_own_name_owns_the_call_on_the_async_path_too() -> None:
    from langchain.agents import create_agent

    m = manager(researcher=5_000)
    agent = create_agent(
        UsageFakeChat(reply="an answer"),
        tools=[],
        name="researcher",
        middleware=[BudgetMiddleware(m)],
    )

    async def write(state: State) -> State:
        out = await agent.ainvoke({"messages": [HumanMessage(state["topic"])]})
        return {"draft": str(out["messages"][-1].content)}

    result = asyncio.run(outer_graph(write, m).ainvoke({"topic": "t"}))
    assert result["draft"] == "an answer"
    s = m.status()
    assert s["researcher"].consumed > 0 and s["writer"].consumed == 0
