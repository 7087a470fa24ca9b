"""CrewAI agents with tools: the tool schemas CrewAI sends are reserved before the call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from crewai import LLM, Agent, Crew, Task
from crewai.tools import tool

from tbc_integrations import BudgetManager, NamespaceLostError
from tbc_integrations.crewai import CrewBudgetExceededError, CrewGovernanceError, govern_crew
from tbc_integrations.testing import OpenAIStub


def tools() -> list[Any]:
    out = []
    for i in range(8):

        def lookup(query: str, limit: int = 5) -> str:
            return "nothing"

        lookup.__name__ = f"lookup_archive_{i}"
        lookup.__doc__ = (
            f"Look up archive {i} for records matching the query; returns titles, dates and "
            "a short summary of each record, most relevant first."
        )
        out.append(tool(lookup.__name__)(lookup))
    return out


def crew(llm: Any) -> Crew:
    agent = Agent(
        role="Archivist", goal="find records", backstory="meticulous", llm=llm, tools=tools()
    )
    task = Task(description="Find the records.", expected_output="a list", agent=agent)
    return Crew(agents=[agent], tasks=[task])


def test_a_crew_agent_with_tools_is_reserved_for_its_tool_schemas() -> None:
    reserved: list[int] = []
    with OpenAIStub(reply="Final Answer: two records") as stub:
        llm = LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="test", max_tokens=40)
        m = BudgetManager()
        m.subscribe(lambda e: reserved.append(e.input_tokens) if e.kind == "reserve" else None)
        c = crew(llm)
        govern_crew(c, m, {"Archivist": {"max_tokens": 100_000}})
        c.kickoff()
        body = stub.requests[0]
        billed = stub.usages[0]["prompt_tokens"]
    assert body.get("tools"), "CrewAI sent no tools: native tool calling is off"
    # the stub adds 7 of its own; the tools are counted from the executor's _openai_tools,
    # a CrewAI internal: if an upgrade renames it, this fails by the tools' tokens
    assert billed - 10 <= reserved[0] <= billed


def test_a_crew_agent_that_cannot_afford_its_tools_never_reaches_the_server() -> None:
    with OpenAIStub(reply="Final Answer: two records") as stub:
        llm = LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="test", max_tokens=40)
        m = BudgetManager()
        c = crew(llm)
        govern_crew(c, m, {"Archivist": {"max_tokens": 420}})  # the messages alone fit
        with pytest.raises(CrewBudgetExceededError):
            c.kickoff()
        assert stub.requests == []


def test_a_call_that_cannot_be_governed_is_refused_not_let_through(tmp_path: Path) -> None:
    # CrewAI runs a call whose hook raises anything but HookAborted: a lost store must
    # not turn into an unbudgeted call
    path = tmp_path / "budgets.db"
    with OpenAIStub(reply="Final Answer: two records") as stub:
        llm = LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="test", max_tokens=40)
        m = BudgetManager(f"sqlite:///{path}")
        c = crew(llm)
        govern_crew(c, m, {"Archivist": {"max_tokens": 100_000}})
        for leftover in tmp_path.iterdir():
            leftover.unlink()  # the ledger's file is gone under the running manager
        with pytest.raises(CrewGovernanceError) as info:
            c.kickoff()
        assert isinstance(info.value.__cause__, NamespaceLostError)
        assert stub.requests == []
