"""Governed LangGraph graphs: attribution, borrowing, exhaustion modes, gates, subgraphs."""

from __future__ import annotations

import asyncio
import operator
import threading
from typing import Annotated, Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.store.base import BaseStore
from langgraph.store.memory import InMemoryStore
from langgraph.types import RetryPolicy
from typing_extensions import TypedDict

from tbc_integrations import BudgetExceededError, BudgetManager, ContractError
from tbc_integrations.langgraph import BudgetMiddleware, budgeted_node, govern_graph
from tbc_integrations.testing import UsageFakeChat


class Team(TypedDict, total=False):
    topic: str
    plan: str
    findings: Annotated[list[str], operator.add]
    critique: str
    draft: str
    usage: Annotated[list[tuple[str, int, int]], operator.add]
    confidence: float
    rounds: int


def call(node: str, model: UsageFakeChat, prompt: str, config: RunnableConfig | None = None) -> Any:
    reply = model.invoke(prompt, config=config)
    u = reply.usage_metadata
    assert u is not None
    return reply.content, [(node, u["input_tokens"], u["output_tokens"])]


def planner(state: Team, config: RunnableConfig) -> Team:  # takes config: it must still get it
    assert config["metadata"]["langgraph_node"] == "planner"
    text, usage = call("planner", UsageFakeChat(reply="plan: two angles"), state["topic"], config)
    return {"plan": text, "usage": usage}


def researcher(state: Team) -> Team:  # takes only state
    model = UsageFakeChat(reply=" ".join(["finding"] * 150), max_tokens=300)
    text, usage = call("researcher", model, state["plan"])
    return {"findings": [text], "usage": usage}


def critic(state: Team) -> Team:
    text, usage = call("critic", UsageFakeChat(reply="looks thin"), state["plan"])
    return {"critique": text, "usage": usage}


def writer(state: Team) -> Team:
    prompt = " ".join(state.get("findings", [])) + state.get("critique", "")
    text, usage = call("writer", UsageFakeChat(reply="final report"), prompt)
    return {"draft": text, "usage": usage}


def cheap_writer(state: Team) -> Team:
    return {"draft": "fallback summary"}


def team_graph() -> StateGraph[Any, Any, Any, Any]:
    b = StateGraph(Team)
    b.add_node("planner", planner)
    b.add_node("researcher", researcher)
    b.add_node("critic", critic)
    b.add_node("writer", writer)
    b.add_edge(START, "planner")
    b.add_edge("planner", "researcher")
    b.add_edge("planner", "critic")
    b.add_edge(["researcher", "critic"], "writer")
    b.add_edge("writer", END)
    return b


def team_manager(**overrides: dict[str, Any]) -> BudgetManager:
    m = BudgetManager()
    spec: dict[str, dict[str, Any]] = {
        "planner": {"priority": 2, "max_tokens": 1_000},
        "researcher": {"priority": 3, "max_tokens": 1_000},
        "critic": {"priority": 1, "max_tokens": 2_000},
        "writer": {"priority": 2, "max_tokens": 1_000},
        "cheap_writer": {"priority": 1, "max_tokens": 100},
    }
    for name, fields in spec.items():
        m.register_agent(name, **{**fields, **overrides.get(name, {})})
    return m


def ledger_by_agent(m: BudgetManager) -> dict[str, tuple[int, int]]:
    return {n: (s.input_tokens, s.output_tokens) for n, s in m.status().items() if s.consumed}


def reported(state: Any) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for node, i, o in state["usage"]:
        a, b = out.get(node, (0, 0))
        out[node] = (a + i, b + o)
    return out


# --------------------------------------------------------------- attribution
def test_per_node_attribution_equals_reported_usage() -> None:
    m = team_manager()
    graph = govern_graph(team_graph(), m, default_max_tokens=100).compile()
    state = graph.invoke({"topic": "battery recycling"})
    assert state["draft"] == "final report"
    assert ledger_by_agent(m) == reported(state)
    assert all(s.reserved == 0 for s in m.status().values())


async def test_async_graph_with_async_nodes() -> None:
    m = team_manager()

    async def aresearcher(state: Team) -> Team:
        reply = await UsageFakeChat(reply="async finding").ainvoke(state["plan"])
        u = reply.usage_metadata
        assert u is not None
        return {
            "findings": [str(reply.content)],
            "usage": [("researcher", u["input_tokens"], u["output_tokens"])],
        }

    b = team_graph()
    b.nodes.pop("researcher")
    b.add_node("researcher", aresearcher)
    graph = govern_graph(b, m, default_max_tokens=100).compile()
    state = await graph.ainvoke({"topic": "batteries"})
    assert "async finding" in state["findings"]
    assert ledger_by_agent(m) == reported(state)


def test_agents_mapping_and_missing_contracts() -> None:
    m = team_manager()
    b = StateGraph(Team)
    b.add_node("research_step", researcher)
    b.add_edge(START, "research_step")
    with pytest.raises(ContractError, match=r"no contract for graph node.*'research_step'"):
        govern_graph(b, m)
    govern_graph(b, m, agents={"research_step": "researcher"}, default_max_tokens=50)
    b.compile().invoke({"plan": "p"})
    assert m.status()["researcher"].consumed > 0


def test_injection_of_config_store_and_runtime_is_kept() -> None:
    m = team_manager()
    seen: dict[str, Any] = {}

    def with_store(state: Team, *, store: BaseStore) -> Team:
        seen["store"] = store
        return {"plan": "stored"}

    def with_runtime(state: Team, runtime: Any) -> Team:
        seen["runtime"] = runtime
        return {"critique": "ok"}

    b = StateGraph(Team)
    b.add_node("planner", budgeted_node(m, "planner")(with_store))
    b.add_node("critic", budgeted_node(m)(with_runtime))  # agent from the node name
    b.add_edge(START, "planner")
    b.add_edge("planner", "critic")
    store = InMemoryStore()
    out = b.compile(store=store).invoke({"topic": "t"})
    assert out["critique"] == "ok" and seen["store"] is store
    assert seen["runtime"] is not None and seen["runtime"].store is store


# ----------------------------------------------------------------- borrowing
def test_high_priority_researcher_borrows_from_the_idle_critic() -> None:
    m = team_manager(researcher={"max_tokens": 120}, critic={"max_tokens": 3_000})
    graph = govern_graph(team_graph(), m, default_max_tokens=100).compile()
    state = graph.invoke({"topic": "t"})
    s = m.status()
    assert s["researcher"].borrowed > 0 and s["critic"].lent > 0
    assert s["researcher"].consumed == sum(reported(state)["researcher"], 0)
    assert s["critic"].remaining >= s["critic"].min_reserve
    assert sum(x.allocated for x in s.values()) == 1_000 + 120 + 3_000 + 1_000 + 100


def test_parallel_branches_racing_for_one_donor_never_overspend() -> None:
    m = BudgetManager()
    m.register_agent("donor", priority=1, max_tokens=600, min_reserve=100)
    for name in ("left", "right"):
        m.register_agent(name, priority=5, max_tokens=10, min_reserve=0)
    barrier = threading.Barrier(2, timeout=5)

    def branch(name: str) -> Any:
        def node(state: Team) -> Team:
            barrier.wait()  # both branches reach the donor at the same moment
            call(name, UsageFakeChat(reply="w " * 300, max_tokens=400), "go")
            return {"findings": [name]}

        return node

    b = StateGraph(Team)
    b.add_node("left", branch("left"))
    b.add_node("right", branch("right"))
    b.add_edge(START, "left")
    b.add_edge(START, "right")
    graph = govern_graph(b, m, on_exhausted="skip", default_max_tokens=400).compile()
    out = graph.invoke({"topic": "t"})
    s = m.status()
    assert len(out.get("findings", [])) == 1  # only one could borrow enough
    assert s["donor"].remaining >= 100 and s["donor"].lent <= 500
    assert s["left"].refusals + s["right"].refusals == 1
    assert all(x.remaining >= 0 and x.reserved == 0 for x in s.values())


# ---------------------------------------------------------- exhaustion modes
def exhausted_manager() -> BudgetManager:
    """The researcher (lowest priority) cannot cover a call even with what it may borrow."""
    return team_manager(researcher={"max_tokens": 50, "priority": 1}, critic={"priority": 4})


def test_raise_reaches_invoke_unchanged() -> None:
    m = exhausted_manager()
    graph = govern_graph(team_graph(), m, default_max_tokens=400).compile()
    with pytest.raises(BudgetExceededError) as info:
        graph.invoke({"topic": "t"})
    assert type(info.value) is BudgetExceededError and info.value.agent_name == "researcher"


def test_skip_moves_on_along_the_normal_edges() -> None:
    m = exhausted_manager()
    graph = govern_graph(
        team_graph(), m, on_exhausted={"researcher": "skip"}, default_max_tokens=100
    ).compile()
    m_research = m.status()["researcher"]
    state = graph.invoke({"topic": "t"})
    assert state.get("findings", []) == []  # no update from the skipped node
    assert state["draft"] == "final report"  # the writer still ran
    assert m.status()["researcher"].refusals == m_research.refusals + 1


def test_fallback_node_runs_instead_of_the_normal_edges() -> None:
    m = team_manager(writer={"max_tokens": 20, "priority": 1}, critic={"priority": 4})
    b = team_graph()
    b.add_node("cheap_writer", cheap_writer)
    b.add_edge("cheap_writer", END)
    graph = govern_graph(
        b, m, on_exhausted={"writer": "cheap_writer"}, default_max_tokens=100
    ).compile()
    state = graph.invoke({"topic": "t"})
    assert state["draft"] == "fallback summary"
    assert m.status()["writer"].refusals == 1


def test_end_stops_the_graph_without_the_out_edges() -> None:
    m = exhausted_manager()
    graph = govern_graph(
        team_graph(), m, on_exhausted={"researcher": END}, default_max_tokens=400
    ).compile()
    state = graph.invoke({"topic": "t"})
    assert "draft" not in state  # the writer never ran
    assert "plan" in state


def test_budgeted_node_alone_refuses_routing_modes() -> None:
    m = team_manager()
    with pytest.raises(ContractError, match=r"needs govern_graph|govern_graph\(\.\.\.\) installs"):
        budgeted_node(m, "writer", on_exhausted=END)
    with pytest.raises(ContractError, match="not 'raise', 'skip', END or a node"):
        govern_graph(team_graph(), m, on_exhausted={"writer": "nowhere"})


def test_a_refusal_is_not_retried_by_retry_policy() -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=10)
    attempts = []

    def counted_writer(state: Team) -> Team:
        attempts.append(1)
        return writer(state)

    b = StateGraph(Team)
    b.add_node(
        "writer", counted_writer, retry_policy=RetryPolicy(max_attempts=3, initial_interval=0)
    )
    b.add_edge(START, "writer")
    graph = govern_graph(b, m, default_max_tokens=5, min_call_tokens=1).compile()
    with pytest.raises(BudgetExceededError):
        graph.invoke({"findings": ["x" * 200]})
    assert len(attempts) == 1


def test_node_refused_before_it_starts_when_nothing_is_left() -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=8)
    ran = []
    b = StateGraph(Team)

    def writer_node(state: Team) -> Team:
        ran.append(1)
        return {}

    b.add_node("writer", writer_node)
    b.add_edge(START, "writer")
    with pytest.raises(BudgetExceededError):
        govern_graph(b, m, min_call_tokens=16).compile().invoke({"topic": "t"})
    assert ran == []


# --------------------------------------------------------------------- gate
def test_gate_stops_a_confident_node_and_the_graph_moves_on() -> None:
    m = team_manager(researcher={"max_tokens": 5_000, "confidence_threshold": 0.8})
    scores = iter([0.3, 0.6, 0.9, 0.95, 0.99])
    calls = []

    def looping_researcher(state: Team) -> Team:
        calls.append(1)
        call("researcher", UsageFakeChat(reply="more"), "dig")
        return {"confidence": next(scores), "rounds": state.get("rounds", 0) + 1}

    b = StateGraph(Team)
    b.add_node("researcher", looping_researcher)
    b.add_node("writer", lambda s: {"draft": f"after {s['rounds']} rounds"})
    b.add_edge(START, "researcher")
    b.add_conditional_edges(
        "researcher", lambda s: "researcher" if s.get("rounds", 0) < 5 else "writer"
    )
    b.add_edge("writer", END)
    graph = govern_graph(
        b,
        m,
        agents={"writer": "writer"},
        on_exhausted={"researcher": "writer"},
        confidence_key="confidence",
        default_max_tokens=50,
    ).compile()
    state = graph.invoke({"topic": "t"})
    assert len(calls) == 3  # the third round reached 0.9 >= 0.8: the fourth was refused
    assert state["draft"] == "after 3 rounds"
    assert m.status()["researcher"].gated


# ---------------------------------------------------------------- subgraphs
def sub_builder() -> StateGraph[Any, Any, Any, Any]:
    sb = StateGraph(Team)
    sb.add_node("researcher", researcher)
    sb.add_node("critic", critic)
    sb.add_edge(START, "researcher")
    sb.add_edge("researcher", "critic")
    return sb


def test_ungoverned_subgraph_counts_as_one_agent() -> None:
    m = team_manager()
    m.register_agent("research_team", max_tokens=2_000)
    outer = StateGraph(Team)
    outer.add_node("research_team", sub_builder().compile())
    outer.add_edge(START, "research_team")
    govern_graph(outer, m, default_max_tokens=100).compile().invoke({"plan": "p"})
    s = m.status()
    assert s["research_team"].consumed > 0
    assert s["researcher"].consumed == 0 and s["critic"].consumed == 0


def test_options_for_a_governed_subgraph_node_are_refused() -> None:
    m = team_manager()
    inner = govern_graph(sub_builder(), m, default_max_tokens=100).compile()
    outer = StateGraph(Team)
    outer.add_node("planner", planner)
    outer.add_node("research_team", inner)
    outer.add_edge(START, "planner")
    with pytest.raises(ContractError) as info:
        govern_graph(outer, m, on_exhausted={"research_team": "skip"}, complete=["planner"])
    assert str(info.value).startswith(
        "govern_graph: on_exhausted= names ['research_team'], which it does not govern"
    )


def test_governed_subgraph_charges_its_own_nodes() -> None:
    m = team_manager()
    inner = govern_graph(sub_builder(), m, default_max_tokens=100).compile()
    outer = StateGraph(Team)
    outer.add_node("planner", planner)
    outer.add_node("research_team", inner)
    outer.add_edge(START, "planner")
    outer.add_edge("planner", "research_team")
    state = govern_graph(outer, m, default_max_tokens=100).compile().invoke({"topic": "t"})
    # the subgraph hands back the whole shared state: count each call's record once
    state["usage"] = list(dict.fromkeys(state["usage"]))
    assert ledger_by_agent(m) == reported(state)
    assert set(ledger_by_agent(m)) == {"planner", "researcher", "critic"}


# --------------------------------------------------------------- completion
def test_auto_complete_frees_a_finished_node_for_the_rest() -> None:
    m = team_manager(planner={"priority": 9, "max_tokens": 5_000}, researcher={"max_tokens": 60})
    graph = govern_graph(team_graph(), m, complete="auto", default_max_tokens=150).compile()
    graph.invoke({"topic": "t"})
    s = m.status()
    assert s["planner"].complete and s["writer"].complete
    assert s["researcher"].borrowed > 0  # borrowed from the finished, more important planner


# -------------------------------------------------------------- middleware
def test_budget_middleware_for_create_agent() -> None:
    from langchain.agents import create_agent

    m = BudgetManager()
    m.register_agent("bob", max_tokens=5_000)
    agent = create_agent(
        UsageFakeChat(reply="hello from bob"),
        tools=[],
        name="bob",
        middleware=[BudgetMiddleware(m, default_max_tokens=50)],
    )
    out = agent.invoke({"messages": [HumanMessage("hi")]})
    assert out["messages"][-1].content == "hello from bob"
    usage = out["messages"][-1].usage_metadata
    assert m.status()["bob"].consumed == usage["total_tokens"]

    m2 = BudgetManager()
    m2.register_agent("bob", max_tokens=10)
    stopped = create_agent(
        UsageFakeChat(reply="never"),
        tools=[],
        name="bob",
        middleware=[BudgetMiddleware(m2, on_exhausted="end")],
    ).invoke({"messages": [HumanMessage("hi")]})
    final = stopped["messages"][-1].content
    assert final.startswith("[stopped: token budget exhausted]") and "'bob'" in final
    raising = create_agent(
        UsageFakeChat(reply="never"), tools=[], name="bob", middleware=[BudgetMiddleware(m2)]
    )
    with pytest.raises(BudgetExceededError):
        raising.invoke({"messages": [HumanMessage("hi")]})


@pytest.mark.parametrize("path", ["sync", "async"])
def test_middleware_end_also_ends_when_the_model_call_itself_is_refused(path: str) -> None:
    from langchain.agents import create_agent

    m = BudgetManager()
    m.register_agent("bob", max_tokens=100)
    chat = UsageFakeChat(reply="never")
    agent = create_agent(
        chat,
        tools=[],
        name="bob",
        middleware=[BudgetMiddleware(m, on_exhausted="end", default_max_tokens=50)],
    )
    question: Any = {"messages": [HumanMessage("tell me everything " * 40)]}  # ~160 tokens
    out = agent.invoke(question) if path == "sync" else asyncio.run(agent.ainvoke(question))
    final = out["messages"][-1]
    assert final.content.startswith("[stopped: token budget exhausted]")
    assert "'bob'" in final.content and "requested" in final.content  # says why
    assert chat.calls == 0 and m.status()["bob"].refusals == 1


# ------------------------------------------------------ options vs the graph
def test_a_compiled_graph_is_refused_with_how_to_pass_the_builder() -> None:
    m = team_manager()
    with pytest.raises(ContractError) as info:
        govern_graph(team_graph().compile(), m)  # type: ignore[arg-type]
    assert "compiled graph (CompiledStateGraph)" in str(info.value)
    assert "pass the StateGraph builder before compile()" in str(info.value)
    with pytest.raises(ContractError, match="needs a langgraph StateGraph builder, got dict"):
        govern_graph({"planner": planner}, m)  # type: ignore[arg-type]


def _govern_refused(m: BudgetManager, options: dict[str, Any]) -> str:
    """``govern_graph``'s refusal of ``options`` on the team graph, which it leaves untouched."""
    b = team_graph()
    before = {name: spec.runnable for name, spec in b.nodes.items()}
    with pytest.raises(ContractError) as info:
        govern_graph(b, m, **options)
    assert {name: spec.runnable for name, spec in b.nodes.items()} == before  # untouched
    return str(info.value)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"agents": {"reseacher": "researcher"}}, "agents= names ['reseacher']"),
        ({"on_exhausted": {"ghost": "skip"}}, "on_exhausted= names ['ghost']"),
        ({"confidence_key": {"critc": "confidence"}}, "confidence_key= names ['critc']"),
        ({"complete": ["writer", "editor"]}, "complete= names ['editor']"),
        (
            {"on_exhausted": {"ghost": END}, "complete": ("ghost", "planner")},
            "on_exhausted= names ['ghost']; complete= names ['ghost']",
        ),
    ],
)
def test_options_naming_nodes_the_graph_lacks_are_refused(
    options: dict[str, Any], expected: str
) -> None:
    message = _govern_refused(team_manager(), options)
    assert expected in message
    assert "the graph's nodes: ['critic', 'planner', 'researcher', 'writer']" in message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"default_max_token": 50}, "unknown option(s) ['default_max_token']"),
        ({"min_call_tokens": -5}, "min_call_tokens must be an integer from 0"),
        ({"min_call_tokens": "16"}, "min_call_tokens must be an integer from 0"),
    ],
)
def test_a_misspelled_or_bad_option_is_refused_when_governing_not_at_the_first_call(
    options: dict[str, Any], expected: str
) -> None:
    m = team_manager()
    message = _govern_refused(m, options)
    assert message.startswith("govern_graph: ") and expected in message
    with pytest.raises(ContractError, match=r"^budgeted_node: ") as info:
        budgeted_node(m, "planner", **options)
    assert expected in str(info.value)
    with pytest.raises(ContractError, match=r"^BudgetMiddleware: ") as info:
        BudgetMiddleware(m, "planner", **options)
    assert expected in str(info.value)
    assert m.status()["planner"].refusals == 0  # nothing was asked of the ledger


def looping_graph(node: Any) -> StateGraph[Any, Any, Any, Any]:
    b = StateGraph(Team)
    b.add_node("researcher", node)
    b.add_edge(START, "researcher")
    b.add_conditional_edges("researcher", lambda s: "researcher" if s["rounds"] < 3 else END)
    return b


def confidence_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tbc_integrations.langgraph" and r.levelname == "WARNING"
    ]


def test_a_confidence_key_missing_from_the_update_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = team_manager(researcher={"max_tokens": 5_000, "confidence_threshold": 0.5})

    def researcher_node(state: Team) -> Team:  # writes "confidence", not "score"
        call("researcher", UsageFakeChat(reply="more"), "dig")
        return {"confidence": 0.99, "rounds": state.get("rounds", 0) + 1}

    graph = govern_graph(
        looping_graph(researcher_node), m, confidence_key="score", default_max_tokens=50
    ).compile()
    with caplog.at_level("WARNING", logger="tbc_integrations.langgraph"):
        assert graph.invoke({"topic": "t"})["rounds"] == 3  # three rounds, one warning
    assert confidence_warnings(caplog) == [
        "node 'researcher' (agent 'researcher'): confidence_key 'score' is not in its "
        "update (keys ['confidence', 'rounds']); its agent's confidence gate is not fed"
    ]
    assert not m.status()["researcher"].gated  # 0.99 never reached the gate


async def test_an_async_node_missing_its_confidence_key_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = team_manager(researcher={"max_tokens": 5_000})

    async def researcher_node(state: Team) -> Team:
        await UsageFakeChat(reply="more").ainvoke("dig")
        return {"rounds": state.get("rounds", 0) + 1}

    graph = govern_graph(
        looping_graph(researcher_node), m, confidence_key="confidence", default_max_tokens=50
    ).compile()
    with caplog.at_level("WARNING", logger="tbc_integrations.langgraph"):
        assert (await graph.ainvoke({"topic": "t"}))["rounds"] == 3
    [message] = confidence_warnings(caplog)
    assert "confidence_key 'confidence' is not in its update (keys ['rounds'])" in message


def test_a_confidence_key_present_in_the_update_is_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = team_manager(researcher={"max_tokens": 5_000})
    seen = iter([{"confidence": 0.2}, {}, {}])  # present once: later omissions are partial updates

    def researcher_node(state: Team) -> Team:
        return {**next(seen), "rounds": state.get("rounds", 0) + 1}  # type: ignore[typeddict-item]

    graph = govern_graph(
        looping_graph(researcher_node), m, confidence_key="confidence", default_max_tokens=50
    ).compile()
    with caplog.at_level("WARNING", logger="tbc_integrations.langgraph"):
        graph.invoke({"topic": "t"})
    assert confidence_warnings(caplog) == []


def test_budgeted_node_logs_a_missing_confidence_key_naming_the_node(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = team_manager()
    b = StateGraph(Team)
    b.add_node("review", budgeted_node(m, "critic", confidence_key="score")(critic))
    b.add_edge(START, "review")
    with caplog.at_level("WARNING", logger="tbc_integrations.langgraph"):
        b.compile().invoke({"plan": "p"})
        b.compile().invoke({"plan": "p"})
    [message] = confidence_warnings(caplog)
    assert message.startswith("node 'review' (agent 'critic'): confidence_key 'score'")


def test_budgeted_node_governs_a_compiled_subgraph_as_one_agent() -> None:
    m = team_manager()
    m.register_agent("research_team", max_tokens=2_000)
    outer = StateGraph(Team)
    outer.add_node("research", budgeted_node(m, "research_team")(sub_builder().compile()))
    outer.add_edge(START, "research")
    state = outer.compile().invoke({"plan": "p"})
    reported_tokens = sum(i + o for _, i, o in dict.fromkeys(state["usage"]))
    assert m.status()["research_team"].consumed == reported_tokens > 0
    with pytest.raises(ContractError, match="wraps a node function or Runnable, got int"):
        budgeted_node(m, "writer")(42)  # type: ignore[call-overload]


# ------------------------------------------ LangGraph internals this plugin reads
def test_the_langgraph_internals_govern_graph_relies_on_are_still_there() -> None:
    """Fails loudly when a LangGraph upgrade moves what govern_graph reads or passes on.

    govern_graph re-adds every node with the fields of its ``StateNodeSpec``; it
    reads ``builder.nodes``, ``edges``, ``branches`` (with ``BranchSpec.ends``),
    ``waiting_edges`` and ``_node_defaults.error_handler``, and unwraps a plain
    function node from LangGraph's ``RunnableCallable`` (``func``/``afunc``).
    """
    import dataclasses
    import inspect

    b = team_graph()
    b.add_conditional_edges("writer", lambda s: END, {END: END})
    spec = b.nodes["planner"]
    assert dataclasses.is_dataclass(spec), f"a node spec is no longer a dataclass: {spec!r}"
    spec_fields = {f.name for f in dataclasses.fields(spec)}
    read = {
        "runnable", "metadata", "input_schema", "retry_policy", "cache_policy",
        "is_error_handler", "error_handler_node", "ends", "defer", "timeout", "trace_policy",
    }  # fmt: skip
    assert read <= spec_fields, f"StateNodeSpec lost {sorted(read - spec_fields)}"
    assert spec_fields <= read, (
        f"StateNodeSpec gained {sorted(spec_fields - read)}: govern_graph must pass them on"
    )
    params = inspect.signature(StateGraph.add_node).parameters
    passed = {
        "defer", "metadata", "input_schema", "retry_policy", "cache_policy",
        "error_handler", "destinations", "timeout", "trace_policy",
    }  # fmt: skip
    assert passed <= set(params), f"add_node lost {sorted(passed - set(params))}"
    assert isinstance(b.edges, set) and ("planner", "researcher") in b.edges
    assert ((("researcher", "critic"), "writer")) in b.waiting_edges
    [branch] = b.branches["writer"].values()
    assert branch.ends == {END: END}
    assert b._node_defaults.error_handler is None
    node = spec.runnable
    assert type(node).__name__ == "RunnableCallable"
    assert getattr(node, "func", None) is planner
    assert hasattr(node, "afunc")


@pytest.mark.parametrize("path", ["sync", "async"])
def test_middleware_lowers_the_request_to_what_the_output_cap_allows(path: str) -> None:
    from langchain.agents import create_agent

    m = BudgetManager()
    m.register_agent("bob", max_tokens=10_000, max_output_tokens=5)
    chat = UsageFakeChat(reply=" ".join(["word"] * 40), max_tokens=40)  # asks for 40
    agent = create_agent(
        chat,
        tools=[],
        name="bob",
        middleware=[BudgetMiddleware(m, min_call_tokens=2, default_max_tokens=40)],
    )
    question: Any = {"messages": [HumanMessage("write")]}
    out = agent.invoke(question) if path == "sync" else asyncio.run(agent.ainvoke(question))
    assert out["messages"][-1].content == " ".join(["word"] * 5)  # cut by the request itself
    s = m.status()["bob"]
    assert s.output_tokens == 5 and s.output_cap_left == 0 and s.overdraft == 0
