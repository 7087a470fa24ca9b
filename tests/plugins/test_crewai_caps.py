"""CrewAI output caps hold: each request asks for no more output than its agent may spend.

Real ``Crew`` runs with the real ``crewai.LLM`` (CrewAI's native OpenAI client) against
the local OpenAI stub, which clips every reply at the request's ``max_tokens`` and bills
what it sent: the ``max_tokens`` the stub receives is the cap left, per agent, also when
agents share one ``LLM`` and their calls overlap.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from crewai import LLM, Agent, Crew, Task
from crewai.crews.crew_output import CrewOutput

from tbc_integrations import BudgetManager
from tbc_integrations.crewai import CrewBudgetExceededError, govern_crew
from tbc_integrations.testing import OpenAIStub

LONG = "Final Answer: " + " ".join(f"w{i}" for i in range(80))  # longer than any cap here


def llm_for(stub: OpenAIStub, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 200)
    return LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="test", **kwargs)


def role_of(body: dict[str, Any]) -> str:
    """Whose request this is: CrewAI's system prompt opens with 'You are {role}.'."""
    text = " ".join(str(m.get("content")) for m in body["messages"])
    found = [r for r in ("Researcher", "Writer") if f"You are {r}" in text]
    assert len(found) == 1, text[:200]
    return found[0]


def two_agents(llm: Any, *, concurrent: bool = False, **agent_kwargs: Any) -> Crew:
    researcher = Agent(role="Researcher", goal="g", backstory="b", llm=llm, **agent_kwargs)
    writer = Agent(role="Writer", goal="g", backstory="b", llm=llm, **agent_kwargs)
    research = Task(
        description="Research.", expected_output="x", agent=researcher, async_execution=concurrent
    )
    write = Task(
        description="Write.", expected_output="x", agent=writer, async_execution=concurrent
    )
    tasks = [research, write]
    if concurrent:  # both run at once; a last synchronous task collects them
        tasks.append(
            Task(
                description="Sum up.", expected_output="x", agent=writer, context=[research, write]
            )
        )
    return Crew(agents=[researcher, writer], tasks=tasks)


CAPS = {
    "Researcher": {"max_tokens": 100_000, "max_output_tokens": 30},
    "Writer": {"max_tokens": 100_000, "max_output_tokens": 75},
}


def ledger_out(m: BudgetManager) -> dict[str, tuple[int, int]]:
    return {n: (s.output_tokens, s.overdraft) for n, s in m.status().items()}


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
def test_a_shared_llm_asks_each_agent_its_own_cap(stream: bool) -> None:
    with OpenAIStub(reply=LONG) as stub:
        llm = llm_for(stub, stream=stream)  # one LLM for both agents, asking 200
        crew = two_agents(llm)
        m = BudgetManager()
        govern_crew(crew, m, CAPS)
        crew.kickoff()
        assert all(bool(b.get("stream")) is stream for b in stub.requests)
        asked = [(role_of(b), b["max_tokens"]) for b in stub.requests]
        billed = sum(c for _, c in stub.reported)
    assert asked == [("Researcher", 30), ("Writer", 75)]
    assert ledger_out(m) == {"Researcher": (30, 0), "Writer": (75, 0)}  # no overdraft
    assert billed == 105
    # the shared LLM itself is untouched, and not routed once the run is over
    assert llm.max_tokens == 200
    assert "call" not in vars(llm) and "acall" not in vars(llm)


def test_the_cap_left_shrinks_call_by_call() -> None:
    with OpenAIStub(reply="Final Answer: " + " ".join(["w"] * 20)) as stub:
        llm = llm_for(stub)
        agent = Agent(role="Researcher", goal="g", backstory="b", llm=llm)
        tasks = [Task(description=f"Step {i}.", expected_output="x", agent=agent) for i in range(4)]
        crew = Crew(agents=[agent], tasks=tasks)
        m = BudgetManager()
        govern_crew(crew, m, {"Researcher": {"max_output_tokens": 50}})
        with pytest.raises(CrewBudgetExceededError) as info:
            crew.kickoff()
        asked = [b["max_tokens"] for b in stub.requests]
    # 22 words billed per call: 50 left, then 28, then 6 (all billed), then none
    assert asked == [50, 28, 6]
    assert info.value.reason == "output cap"
    assert m.status()["Researcher"].output_tokens == 50


def test_an_llm_without_max_tokens_gets_one_when_its_agent_has_a_cap() -> None:
    with OpenAIStub(reply=LONG) as stub:
        llm = LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="test")
        assert llm.max_tokens is None
        crew = two_agents(llm)
        m = BudgetManager()
        govern_crew(crew, m, {"Researcher": {"max_output_tokens": 30}, "Writer": {}})
        crew.kickoff()
        asked = [(role_of(b), b.get("max_tokens")) for b in stub.requests]
    # the uncapped Writer's request is left as its LLM makes it: no limit
    assert asked == [("Researcher", 30), ("Writer", None)]
    assert m.status()["Researcher"].overdraft == 0


def test_stop_words_still_apply_on_the_lowered_call() -> None:
    # CrewAI applies its ReAct stop words per call (keyed to the LLM object): the copy
    # a lowered call is made on must keep them, or the answer runs on past them
    with OpenAIStub(reply="Thought: ok\nFinal Answer: done\nObservation: junk") as stub:
        llm = llm_for(stub)
        agent = Agent(role="Researcher", goal="g", backstory="b", llm=llm)
        task = Task(description="Research.", expected_output="x", agent=agent)
        crew = Crew(agents=[agent], tasks=[task])
        govern_crew(crew, BudgetManager(), {"Researcher": {"max_output_tokens": 30}})
        out = crew.kickoff()
        assert stub.requests[0]["max_tokens"] == 30
    assert isinstance(out, CrewOutput)
    assert out.raw == "done"


def test_a_call_that_runs_its_hooks_itself_is_lowered_too() -> None:
    # an agent that reasons first makes that call straight on its LLM (no executor): the
    # hook runs inside the call, which is made on a copy of the LLM of its own
    with OpenAIStub(reply="Final Answer: " + " ".join(["w"] * 10)) as stub:
        llm = llm_for(stub)
        agent = Agent(
            role="Researcher",
            goal="g",
            backstory="b",
            llm=llm,
            reasoning=True,
            max_reasoning_attempts=1,
        )
        task = Task(description="Research.", expected_output="x", agent=agent)
        crew = Crew(agents=[agent], tasks=[task])
        m = BudgetManager()
        govern_crew(crew, m, {"Researcher": {"max_output_tokens": 30}})
        crew.kickoff()
        asked = [b["max_tokens"] for b in stub.requests]
    assert asked == [30, 18]  # the reasoning call (12 billed), then the task's call
    assert m.status()["Researcher"].output_tokens == 24
    assert llm.max_tokens == 200


def test_concurrent_agents_on_a_shared_llm_each_get_their_cap() -> None:
    with OpenAIStub(reply=LONG) as stub:
        llm = llm_for(stub)  # asks 200
        agents = {
            role: Agent(role=role, goal="g", backstory="b", llm=llm)
            for role in ("Researcher", "Writer", "Editor")
        }
        at_once = [
            Task(
                description=f"{r} work.", expected_output="x", agent=agents[r], async_execution=True
            )
            for r in ("Researcher", "Writer")
        ]
        edit = Task(
            description="Edit.", expected_output="x", agent=agents["Editor"], context=at_once
        )
        crew = Crew(agents=list(agents.values()), tasks=[*at_once, edit])
        m = BudgetManager()
        govern_crew(crew, m, {**CAPS, "Editor": {}})
        crew.kickoff()
        asked = {
            next(r for r in agents if f"You are {r}" in str(b["messages"])): b["max_tokens"]
            for b in stub.requests
        }
    assert asked == {"Researcher": 30, "Writer": 75, "Editor": 200}
    assert ledger_out(m) == {"Researcher": (30, 0), "Writer": (75, 0), "Editor": (82, 0)}


@pytest.mark.parametrize("run", ["kickoff_for_each", "kickoff_for_each_async"])
def test_crew_copies_on_a_shared_llm_each_get_their_agents_cap(run: str) -> None:
    # every call bills all it asks, so each asks min(40, what the cap has left) whatever
    # the order the calls reserve in: 40, 40, then 20 of the Researcher's 100
    with OpenAIStub(reply=LONG) as stub:
        llm = llm_for(stub, max_tokens=40)  # one LLM for every agent and every crew copy
        researcher = Agent(role="Researcher", goal="g", backstory="b", llm=llm)
        writer = Agent(role="Writer", goal="g", backstory="b", llm=llm)
        crew = Crew(
            agents=[researcher, writer],
            tasks=[
                Task(description="Research {n}.", expected_output="x", agent=researcher),
                Task(description="Write {n}.", expected_output="x", agent=writer),
            ],
        )
        m = BudgetManager()
        govern_crew(crew, m, {"Researcher": {"max_output_tokens": 100}, "Writer": {}})
        inputs = [{"n": str(i)} for i in range(3)]
        if run == "kickoff_for_each":
            crew.kickoff_for_each(inputs=inputs)
        else:
            asyncio.run(crew.kickoff_for_each_async(inputs=inputs))
        asked = [(role_of(b), b["max_tokens"]) for b in stub.requests]
        billed = sum(c for _, c in stub.reported)
    assert sorted(a for r, a in asked if r == "Researcher") == [20, 40, 40]
    assert [a for r, a in asked if r == "Writer"] == [40] * 3  # nothing leaks between agents
    status = m.status()
    assert status["Researcher"].output_tokens == 100 and status["Researcher"].overdraft == 0
    assert billed == status["Researcher"].output_tokens + status["Writer"].output_tokens
    assert llm.max_tokens == 40 and "call" not in vars(llm)


def test_the_crewai_internals_a_per_call_copy_relies_on() -> None:
    # CrewAI keys its per-call stop words and streaming to the LLM object, and marks an
    # executor's call as dispatched before it reaches the LLM: an upgrade that changes
    # these fails here, not silently in a crew
    from crewai.hooks.llm_hooks import (
        model_call_hooks_already_dispatched,
        model_call_hooks_dispatched,
    )
    from crewai.llms.base_llm import call_stop_override, call_stream_override

    from tbc_integrations.crewai import _own_copy

    llm = LLM(model="openai/gpt-4", base_url="http://127.0.0.1:9/v1", api_key="test")
    with call_stop_override(llm, ["\nObservation:"]), call_stream_override(llm, True):
        own = _own_copy(llm, llm)
    assert own.stop_sequences == ["\nObservation:"] and own._effective_stream() is True
    assert llm.stop_sequences == [] and not llm._effective_stream()
    assert own._token_usage is llm._token_usage  # the copy's usage is counted on the LLM
    assert not model_call_hooks_already_dispatched()
    with model_call_hooks_dispatched():
        assert model_call_hooks_already_dispatched()


def test_only_the_call_the_hook_saw_takes_its_change() -> None:
    # between an agent's hook and its call CrewAI may call the same LLM itself (it
    # summarises a context near the model's window): that call keeps its request
    from crewai.hooks.llm_hooks import model_call_hooks_dispatched

    from tbc_integrations.crewai import _Change, _pending, _routed, _unrouted

    with OpenAIStub(reply=LONG) as stub:
        llm = llm_for(stub)
        assert _routed(llm)
        turn = [{"role": "user", "content": "the agent's turn"}]
        token = _pending.set(_Change(llm, 7, sent=turn))  # what the hook names for its call
        try:
            with model_call_hooks_dispatched():
                llm.call([{"role": "user", "content": "summarise this"}])
                llm.call(turn)
        finally:
            _pending.reset(token)
            _unrouted(llm)
        asked = [b["max_tokens"] for b in stub.requests]
    assert asked == [200, 7]
    assert "call" not in vars(llm)
