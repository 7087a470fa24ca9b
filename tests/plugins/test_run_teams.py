"""A team per run under the real frameworks: one compiled governed graph, one governed
crew, one LangChain handler or middleware served to many runs, each with its own team.

Real parts: LangGraph ``StateGraph`` with a checkpointer and ``interrupt()``,
``create_agent`` with ``BudgetMiddleware``, ``ChatOpenAI`` and ``crewai.LLM`` over HTTP
to the local OpenAI stub, real SQLite files and a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
from crewai import LLM, Agent, Crew, Task
from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from tbc_integrations import (
    BudgetExceededError,
    BudgetManager,
    ConfidenceGateError,
    ContractError,
    Limit,
)
from tbc_integrations.crewai import CrewBudgetExceededError, govern_crew
from tbc_integrations.langchain import BudgetCallbackHandler
from tbc_integrations.langgraph import BudgetMiddleware, govern_graph
from tbc_integrations.testing import OpenAIStub
from tests import run_team_workers
from tests.conftest import STORE_KINDS, store_url
from tests.run_team_workers import chat

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def billed(stub: OpenAIStub, text: str) -> int:
    """Tokens the stub billed for the requests whose messages hold ``text``."""
    total = 0
    for body, (prompt, completion) in zip(stub.requests, stub.reported, strict=True):
        if text in json.dumps(body["messages"]):
            total += prompt + completion
    return total


# ------------------------------------------------------------------ LangGraph
def test_a_per_run_graph_serves_fifty_concurrent_runs_with_independent_budgets(
    kind: str, tmp_path: Path
) -> None:
    m = BudgetManager(
        store_url(kind, tmp_path),
        namespace="graph-50",
        team_per="run",
        limits=[Limit("app", max_tokens=1_000_000, default="all")],
    )
    # each agent can afford one call of one run, not two: shared budgets would refuse
    m.register_agent("planner", priority=1, max_tokens=30, min_reserve=30)
    m.register_agent("writer", priority=1, max_tokens=30, min_reserve=30)

    class State(TypedDict, total=False):
        topic: str
        plan: str
        text: str

    with OpenAIStub(reply="one two three four five six seven eight") as stub:
        llm = chat(stub.base_url, 6)

        async def planner(state: State) -> State:
            reply = await llm.ainvoke(f"Plan {state['topic']}")
            return {"plan": str(reply.content)}

        async def writer(state: State) -> State:
            reply = await llm.ainvoke(f"Write {state['topic']}")
            return {"text": str(reply.content)}

        g = StateGraph(State)
        g.add_node("planner", planner)
        g.add_node("writer", writer)
        g.add_edge(START, "planner")
        g.add_edge("planner", "writer")
        g.add_edge("writer", END)
        graph = govern_graph(g, m).compile(checkpointer=InMemorySaver())

        async def serve() -> list[Any]:
            return list(
                await asyncio.gather(
                    *(
                        graph.ainvoke(
                            {"topic": f"topic-{i:02d}"}, {"configurable": {"thread_id": f"t-{i}"}}
                        )
                        for i in range(50)
                    )
                )
            )

        results = asyncio.run(serve())
        assert all(r["text"] for r in results)
        assert len(stub.requests) == 100  # nobody was refused
        for i in range(50):  # each run's team holds exactly its own calls
            team = m.team_status(f"t-{i}")
            used = team["planner"].consumed + team["writer"].consumed
            assert used == billed(stub, f"topic-{i:02d}") > 0
            assert team["planner"].consumed and team["writer"].consumed
            assert team["planner"].reserved == team["writer"].reserved == 0
        assert m.limit_status("app", "all").consumed == sum(p + c for p, c in stub.reported)
        assert all(s.consumed == 0 for s in m.status().values())  # the template
        with pytest.raises(BudgetExceededError):  # run t-0 spent its team ...
            asyncio.run(graph.ainvoke({"topic": "again"}, {"configurable": {"thread_id": "t-0"}}))
        out = asyncio.run(graph.ainvoke({"topic": "new"}, {"configurable": {"thread_id": "t-50"}}))
        assert out["text"]  # ... a new run has its own


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k != "memory"])
def test_an_interrupted_run_resumed_in_another_process_keeps_its_budget(
    kind: str, tmp_path: Path
) -> None:
    url = store_url(kind, tmp_path)
    m = run_team_workers.graph_manager(url)
    config: Any = {"configurable": {"thread_id": "job-1", "user_id": "ann"}}
    with OpenAIStub(reply="a fine draft line") as stub:
        saver = InMemorySaver()
        graph = run_team_workers.build_graph(m, stub.base_url, saver)
        paused = graph.invoke({"text": "batteries"}, config)
        assert "__interrupt__" in paused  # waiting for a person
        drafted = m.team_status("job-1")["writer"].consumed
        assert drafted == sum(p + c for p, c in stub.reported) > 0
        checkpoints = tmp_path / "checkpoints.pickle"
        run_team_workers.save_checkpoints(saver, checkpoints)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-m", "tests.run_team_workers", url, stub.base_url,
             str(checkpoints), "job-1"],
            capture_output=True, text=True, env=env, cwd=ROOT, check=False, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        resumed = json.loads(done.stdout.strip().splitlines()[-1])
        total = sum(p + c for p, c in stub.reported)
    assert len(stub.requests) == 2  # the draft here, the final call in the other process
    assert resumed["consumed"] == total > drafted  # the run's team went on, not afresh
    assert resumed["reserved"] == 0
    assert m.team_status("job-1")["writer"].consumed == total  # and this process sees it
    assert m.limit_status("user", "ann").consumed == total
    assert m.team_status("job-2")["writer"].consumed == 0
    assert m.status()["writer"].consumed == 0


# ------------------------------------------------------------- LangChain
def test_the_handler_and_middleware_work_in_the_run_named_by_tbc_scope(
    kind: str, tmp_path: Path
) -> None:
    m = BudgetManager(store_url(kind, tmp_path), namespace="lc-runs", team_per="run")
    m.register_agent("writer", max_tokens=2_000, confidence_threshold=0.8)
    m.register_agent("bob", max_tokens=2_000)
    with OpenAIStub(reply="a short answer") as stub:
        llm = chat(stub.base_url, 10)
        handler = BudgetCallbackHandler(m, agent="writer", confidence_fn=lambda _: 0.9)

        def call(run: str, text: str) -> None:
            llm.invoke(
                text, config={"callbacks": [handler], "metadata": {"tbc_scope": {"run": run}}}
            )

        call("x", "first in x")
        with pytest.raises(ConfidenceGateError):  # x's writer reached its threshold ...
            call("x", "second in x")
        call("y", "first in y")  # ... y's writer has its own gate
        assert m.team_status("x")["writer"].gated and not m.status()["writer"].gated
        assert m.team_status("x")["writer"].consumed == billed(stub, "first in x")
        assert m.team_status("y")["writer"].consumed == billed(stub, "first in y")
        with pytest.raises(ContractError, match="no 'run'"):
            llm.invoke("no run", config={"callbacks": [handler]})

        agent = create_agent(llm, tools=[], name="bob", middleware=[BudgetMiddleware(m)])
        agent.invoke(
            {"messages": [HumanMessage("hello from x")]},
            cast(Any, {"metadata": {"tbc_scope": {"run": "x"}}}),
        )
        agent.invoke(
            {"messages": [HumanMessage("hello from t")]},
            cast(Any, {"configurable": {"thread_id": "t"}}),
        )
        assert m.team_status("x")["bob"].consumed == billed(stub, "hello from x") > 0
        assert m.team_status("t")["bob"].consumed == billed(stub, "hello from t") > 0
        assert m.status()["bob"].consumed == m.status()["writer"].consumed == 0


# -------------------------------------------------------------------- CrewAI
def test_a_governed_crew_gives_each_kickoff_its_own_team(kind: str, tmp_path: Path) -> None:
    m = BudgetManager(
        store_url(kind, tmp_path),
        namespace="crew-runs",
        team_per="run",
        limits=[Limit("user", max_tokens=1_000_000)],
    )
    budgets = {
        "Researcher": {"priority": 2, "max_tokens": 1_500, "min_reserve": 1_500},
        "Writer": {"priority": 1, "max_tokens": 1_500, "min_reserve": 1_500},
    }
    with OpenAIStub(reply="Thought: done\nFinal Answer: the report") as stub:
        llm = LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="test", max_tokens=60)
        researcher = Agent(role="Researcher", goal="find facts", backstory="careful", llm=llm)
        writer = Agent(role="Writer", goal="write", backstory="clear", llm=llm)
        crew = Crew(
            agents=[researcher, writer],
            tasks=[
                Task(description="Research {topic}.", expected_output="facts", agent=researcher),
                Task(description="Write about {topic}.", expected_output="text", agent=writer),
            ],
        )
        govern_crew(
            crew, m, budgets, scope=lambda inputs: {"run": inputs["job"], "user": inputs["user"]}
        )
        crew.kickoff(inputs={"topic": "batteries", "job": "j1", "user": "ann"})
        crew.kickoff(inputs={"topic": "solar", "job": "j2", "user": "ann"})
        for job, topic in (("j1", "batteries"), ("j2", "solar")):
            team = m.team_status(job)
            assert team["Researcher"].consumed + team["Writer"].consumed == billed(stub, topic)
            assert team["Researcher"].consumed and team["Writer"].consumed
        assert m.limit_status("user", "ann").consumed == sum(p + c for p, c in stub.reported)
        assert all(s.consumed == 0 for s in m.status().values())
        runs: Counter[str] = Counter()
        with pytest.raises(CrewBudgetExceededError):  # j1 goes on until its team is spent
            for _ in range(20):
                crew.kickoff(inputs={"topic": "wind", "job": "j1", "user": "ann"})
                runs["j1"] += 1
        assert runs["j1"] < 20
        sent = len(stub.requests)
        crew.kickoff(inputs={"topic": "tides", "job": "j3", "user": "ann"})  # a new run's own
        assert len(stub.requests) == sent + 2
        with pytest.raises(ContractError, match="kickoff_for_each"):
            crew.kickoff_for_each(inputs=[{"topic": "a", "job": "j4", "user": "ann"}])


def test_the_middleware_reads_the_output_cap_left_in_the_run(kind: str, tmp_path: Path) -> None:
    m = BudgetManager(store_url(kind, tmp_path), namespace="lc-cap", team_per="run")
    m.register_agent("bob", max_tokens=5_000, max_output_tokens=12)
    with OpenAIStub(reply="one two three four five six seven eight") as stub:
        llm = chat(stub.base_url, 10)
        middleware = BudgetMiddleware(m, min_call_tokens=1)
        agent = create_agent(llm, tools=[], name="bob", middleware=[middleware])
        for _ in range(2):
            agent.invoke(
                {"messages": [HumanMessage("hi")]}, cast(Any, {"configurable": {"thread_id": "x"}})
            )
        agent.invoke(
            {"messages": [HumanMessage("hi")]}, cast(Any, {"configurable": {"thread_id": "y"}})
        )
    asked = [b.get("max_completion_tokens") or b.get("max_tokens") for b in stub.requests]
    assert asked == [10, 4, 10]  # x's second call gets what x's cap has left; y is fresh
    assert m.team_status("x")["bob"].output_tokens == 12
    assert m.team_status("y")["bob"].output_tokens == 8


class Note(TypedDict, total=False):
    text: str


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_a_governed_node_lowers_max_tokens_to_its_runs_cap(kind: str, tmp_path: Path) -> None:
    """A plain node's own model call is shaped by the output cap left in its run's team."""
    m = BudgetManager(store_url(kind, tmp_path), namespace="node-cap", team_per="run")
    m.register_agent("bob", max_tokens=5_000, max_output_tokens=12)
    with OpenAIStub(reply="one two three four five six seven eight") as stub:
        llm = chat(stub.base_url, 10)

        def bob(state: Note) -> Note:
            return {"text": str(llm.invoke("hi").content)}

        builder = StateGraph(Note)
        builder.add_node("bob", bob)
        builder.add_edge(START, "bob")
        builder.add_edge("bob", END)
        app = govern_graph(builder, m, min_call_tokens=1).compile()
        for thread in ("x", "x", "y"):
            app.invoke({"text": ""}, cast(Any, {"configurable": {"thread_id": thread}}))
    asked = [b.get("max_completion_tokens") or b.get("max_tokens") for b in stub.requests]
    assert asked == [10, 4, 10]  # x's second call gets what x's cap has left; y is fresh
    assert m.team_status("x")["bob"].output_tokens == 12
    assert m.team_status("y")["bob"].output_tokens == 8


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_a_governed_crew_lowers_max_tokens_to_its_runs_cap(kind: str, tmp_path: Path) -> None:
    """The CrewAI hook asks each kickoff's call for what its run's output cap has left."""
    m = BudgetManager(store_url(kind, tmp_path), namespace="crew-cap", team_per="run")
    reply = "Thought: done\nFinal Answer: one two three four five six"
    with OpenAIStub(reply=reply) as stub:
        llm = LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="test", max_tokens=40)
        bob = Agent(role="Bob", goal="answer", backstory="brief", llm=llm)
        crew = Crew(
            agents=[bob], tasks=[Task(description="Answer.", expected_output="x", agent=bob)]
        )
        govern_crew(
            crew,
            m,
            {"Bob": {"max_tokens": 5_000, "max_output_tokens": 30}},
            scope=lambda inputs: {"run": inputs["job"]},
        )
        for job in ("j1", "j1", "j2"):
            crew.kickoff(inputs={"job": job})
    asked = [b.get("max_completion_tokens") or b.get("max_tokens") for b in stub.requests]
    first = stub.reported[0][1]  # the output tokens the first call was billed
    assert 0 < first < 30
    assert asked == [30, 30 - first, 30]  # j1's second call: what j1 has left; j2 is fresh
    assert m.team_status("j2")["Bob"].output_tokens == stub.reported[2][1]
