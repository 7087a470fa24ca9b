"""``tbcontracts.adapters`` patterns, with only the import changed, on real graphs and crews.

Each test follows that package's README: ``TBCGraphGovernor().register(...)``, then
``graph.add_node(name, governor.wrap(name, node, usage_key="tokens_used"))``; and
``TBCCrewGovernor().wrap(name, lambda: ..., usage_fn=lambda out: out.token_usage...)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph

from tbc_integrations import (
    BudgetExceededError,
    BudgetManager,
    ConfidenceGateError,
    InvalidTokenCountError,
    UnknownAgentError,
)
from tbc_integrations.adapters import TBCCrewGovernor, TBCGraphGovernor, govern_agent, govern_node
from tests.conftest import STORE_KINDS, store_url


class State(TypedDict, total=False):
    question: str
    notes: str
    verdict: str
    tokens_used: int
    score: float


def two_node_graph(governor: TBCGraphGovernor, ran: list[str], used: dict[str, int]) -> Any:
    def researcher(state: State) -> State:
        ran.append("researcher")
        return {"notes": "three sources", "tokens_used": used["researcher"]}

    def critic(state: State) -> State:
        ran.append("critic")
        return {"verdict": "fine", "tokens_used": used["critic"]}

    graph = StateGraph(State)
    graph.add_node("researcher", governor.wrap("researcher", researcher, usage_key="tokens_used"))
    graph.add_node("critic", governor.wrap("critic", critic, usage_key="tokens_used"))
    graph.add_edge(START, "researcher")
    graph.add_edge("researcher", "critic")
    graph.add_edge("critic", END)
    return graph.compile()


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_graph_governor_records_the_exact_usage_each_node_reports(kind: str, tmp_path: Any) -> None:
    governor = TBCGraphGovernor(BudgetManager(store=store_url(kind, tmp_path)))
    governor.register("researcher", priority=3, max_tokens=4000)
    governor.register("critic", priority=1, max_tokens=2000)
    ran: list[str] = []
    app = two_node_graph(governor, ran, {"researcher": 1234, "critic": 321})
    app.invoke({"question": "what changed?"})
    assert ran == ["researcher", "critic"]
    report = governor.report()
    assert report["researcher"] == {"allocated": 4000, "consumed": 1234, "remaining": 2766}
    assert report["critic"] == {"allocated": 2000, "consumed": 321, "remaining": 1679}
    assert [(e.agent_name, e.tokens) for e in governor.manager.history()] == [
        ("researcher", 1234),
        ("critic", 321),
    ]
    assert governor.manager.history()[0].note == "langgraph:researcher"


def test_an_exhausted_node_is_refused_before_it_runs() -> None:
    governor = TBCGraphGovernor()
    governor.register("researcher", priority=3, max_tokens=20)
    governor.register("critic", priority=1, max_tokens=10)
    ran: list[str] = []
    app = two_node_graph(governor, ran, {"researcher": 30, "critic": 1})
    with pytest.raises(BudgetExceededError):  # used more than it and its donors had
        app.invoke({"question": "q"})
    assert ran == ["researcher"] and governor.report()["researcher"]["consumed"] == 30
    ran.clear()
    with pytest.raises(BudgetExceededError) as err:
        app.invoke({"question": "a question long enough to need tokens"})
    assert err.value.agent_name == "researcher" and ran == []  # tbcontracts would have run it
    assert governor.manager.status()["researcher"].reserved == 0


def test_reallocation_follows_priority_never_uphill() -> None:
    governor = TBCGraphGovernor()
    governor.register("researcher", priority=3, max_tokens=100)
    governor.register("critic", priority=1, max_tokens=100, min_reserve=30)
    ran: list[str] = []
    app = two_node_graph(governor, ran, {"researcher": 150, "critic": 10})
    app.invoke({"question": "q"})
    report = governor.report()
    assert report["researcher"]["consumed"] == 150
    assert report["critic"]["allocated"] == 50  # lent 50, kept well above its reserve
    assert report["researcher"]["allocated"] + report["critic"]["allocated"] == 200


def test_confidence_key_feeds_the_gate() -> None:
    governor = TBCGraphGovernor()
    governor.register("critic", priority=1, max_tokens=500, confidence_threshold=0.8)

    def critic(state: State) -> State:
        return {"verdict": "good", "score": 0.95}

    graph = StateGraph(State)
    graph.add_node("critic", governor.wrap("critic", critic, confidence_key="score"))
    graph.add_edge(START, "critic")
    graph.add_edge("critic", END)
    app = graph.compile()
    app.invoke({"question": "is it right?"})
    assert governor.manager.last_confidence("critic") == 0.95
    with pytest.raises(ConfidenceGateError):
        app.invoke({"question": "again?"})


def test_without_usage_key_the_state_and_update_text_is_estimated() -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=1000)
    counter = m.token_counter
    node: Callable[..., Any] = govern_node(
        m, "writer", lambda state: {"draft": "a short draft of the report"}
    )
    node({"topic": "quarterly revenue figures", "n": 3})
    expected = counter.count("quarterly revenue figures") + counter.count(
        "a short draft of the report"
    )
    assert m.consumed("writer") == expected > 0


def test_async_nodes_are_governed_on_ainvoke() -> None:
    governor = TBCGraphGovernor()
    governor.register("researcher", priority=2, max_tokens=1000)

    async def researcher(state: State) -> State:
        await asyncio.sleep(0)
        return {"notes": "done", "tokens_used": 250}

    graph = StateGraph(State)
    graph.add_node("researcher", governor.wrap("researcher", researcher, usage_key="tokens_used"))
    graph.add_edge(START, "researcher")
    graph.add_edge("researcher", END)
    asyncio.run(graph.compile().ainvoke({"question": "q"}))
    assert governor.report()["researcher"]["consumed"] == 250


def test_a_failing_node_releases_its_hold_and_records_nothing() -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=100)

    def broken(state: State) -> State:
        raise RuntimeError("tool failed")

    with pytest.raises(RuntimeError):
        govern_node(m, "a", broken)({"question": "q"})
    status = m.status()["a"]
    assert (status.reserved, status.consumed) == (0, 0)


@pytest.mark.parametrize("bad", [-5, float("nan"), float("inf")])
def test_a_bad_exact_usage_is_refused_naming_the_agent_and_changes_nothing(bad: float) -> None:
    m = BudgetManager()
    m.register_agent("critic", max_tokens=100)
    node: Callable[..., Any] = govern_node(
        m, "critic", lambda s: {"tokens_used": bad}, usage_key="tokens_used"
    )
    with pytest.raises(InvalidTokenCountError, match="critic"):
        node({"question": "q"})
    status = m.status()["critic"]
    assert (status.reserved, status.consumed, status.remaining) == (0, 0, 100)


def test_non_numeric_usage_falls_back_to_the_estimate_as_tbcontracts_does() -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=100)
    govern_node(m, "a", lambda s: {"tokens_used": "many"}, usage_key="tokens_used")({"q": "x"})
    assert m.consumed("a") == m.token_counter.count("x") + m.token_counter.count("many")


def test_unknown_agents_are_refused_at_wrap_time() -> None:
    with pytest.raises(UnknownAgentError):
        TBCGraphGovernor().wrap("nobody", lambda s: s)
    with pytest.raises(UnknownAgentError):
        TBCCrewGovernor().wrap("nobody", lambda: "x")


def test_crew_governor_reads_a_real_crews_token_usage() -> None:
    from crewai import Agent, Crew, Task

    from tests.crew_support import ScriptedCrewLLM

    llm = ScriptedCrewLLM("two records")
    researcher = Agent(role="researcher", goal="find", backstory="b", llm=llm)
    task = Task(description="Find the records.", expected_output="records", agent=researcher)
    crew = Crew(agents=[researcher], tasks=[task])

    governor = TBCCrewGovernor()
    governor.register("researcher", priority=3, max_tokens=4000)
    run_researcher: Callable[[], Any] = governor.wrap(
        "researcher", lambda: crew.kickoff(), usage_fn=lambda out: out.token_usage.total_tokens
    )
    output = run_researcher()
    assert output.raw == "two records"
    billed = sum(p + c for p, c in llm.reported["researcher"])
    assert billed > 0 and governor.report()["researcher"]["consumed"] == billed


def test_crew_usage_fn_that_raises_falls_back_to_the_output_estimate() -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=500)

    def broken_usage(out: Any) -> int:
        raise AttributeError("token_usage")

    run: Callable[[str], str] = govern_agent(
        m, "writer", lambda topic: "the draft text", usage_fn=broken_usage
    )
    assert run("a topic") == "the draft text"
    counter = m.token_counter
    assert m.consumed("writer") == counter.count("a topic") + counter.count("the draft text")
