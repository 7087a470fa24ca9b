"""Real CrewAI crews under contracts: a BaseLLM fake and crewai.LLM over HTTP to a stub."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from crewai import LLM, Agent, Crew, Process, Task
from crewai.crews.crew_output import CrewOutput
from crewai.events import crewai_event_bus
from crewai.hooks import InterceptionPoint, get_hooks

from tbc_integrations import BudgetExceededError, BudgetManager, ContractError
from tbc_integrations._validate import MAX_TOKENS
from tbc_integrations.budgets import load_budgets
from tbc_integrations.crewai import (
    CrewBudgetExceededError,
    CrewConfidenceGateError,
    CrewUnknownAgentError,
    crew_summary,
    govern_crew,
)
from tbc_integrations.testing import OpenAIStub
from tests.crew_support import ScriptedCrewLLM


def crew_of(llm: Any, *, async_first: bool = False, **crew_kwargs: Any) -> Crew:
    researcher = Agent(role="Researcher", goal="find facts", backstory="careful", llm=llm)
    writer = Agent(role="Writer", goal="write", backstory="clear", llm=llm)
    research = Task(
        description="Research battery recycling.",
        expected_output="facts",
        agent=researcher,
        async_execution=async_first,
    )
    write = Task(description="Write it up.", expected_output="text", agent=writer)
    if async_first:
        write.context = [research]
    return Crew(agents=[researcher, writer], tasks=[research, write], **crew_kwargs)


BUDGETS = {
    "Researcher": {"priority": 3, "max_tokens": 2_000},
    "Writer": {"priority": 1, "max_tokens": 3_000},
}


def ledger(m: BudgetManager) -> dict[str, tuple[int, int]]:
    return {n: (s.input_tokens, s.output_tokens) for n, s in m.status().items() if s.consumed}


def no_hooks_left() -> bool:
    return not get_hooks(InterceptionPoint.PRE_MODEL_CALL)


# ------------------------------------------------------------- attribution
@pytest.mark.parametrize("async_first", [False, True], ids=["sequential", "async-task"])
def test_shared_llm_usage_is_attributed_per_agent(async_first: bool) -> None:
    llm = ScriptedCrewLLM(answer="the findings")  # one LLM instance for both agents
    crew = crew_of(llm, async_first=async_first)
    m = BudgetManager()
    govern_crew(crew, m, BUDGETS, default_max_tokens=100)
    out = crew.kickoff()
    assert isinstance(out, CrewOutput)
    assert out.raw == "the findings"
    assert ledger(m) == llm.totals()
    # crew.usage_metrics sums per agent's LLM: a shared LLM is counted once per agent
    truth = sum(p + c for p, c in llm.totals().values())
    assert out.token_usage.total_tokens == 2 * truth
    summary = crew_summary(m, crew)
    assert summary["Researcher"]["consumed"] + summary["Writer"]["consumed"] == truth
    assert all(s.reserved == 0 for s in m.status().values())
    assert summary["Researcher"]["complete"] and summary["Writer"]["complete"]
    assert no_hooks_left()


def test_crewai_llm_over_http_ledger_equals_server_usage() -> None:
    with OpenAIStub(reply="Thought: done\nFinal Answer: the report") as stub:
        llm = LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="test", max_tokens=60)
        crew = crew_of(llm)
        m = BudgetManager()
        govern_crew(crew, m, BUDGETS)
        crew.kickoff()
    per_role: dict[str, tuple[int, int]] = {}
    for body, (prompt, completion) in zip(stub.requests, stub.reported, strict=True):
        system = str(body["messages"][0]["content"])
        role = "Researcher" if "You are Researcher" in system else "Writer"
        a, b = per_role.get(role, (0, 0))
        per_role[role] = (a + prompt, b + completion)
    assert set(per_role) == {"Researcher", "Writer"}
    assert ledger(m) == per_role


def test_refused_agent_never_reaches_the_server_and_is_not_retried() -> None:
    with OpenAIStub(reply="Thought: done\nFinal Answer: x") as stub:
        llm = LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="test", max_tokens=500)
        crew = crew_of(llm)
        m = BudgetManager()
        govern_crew(
            crew,
            m,
            {"Researcher": {"priority": 1, "max_tokens": 100}, "Writer": {"max_tokens": 100}},
        )
        with pytest.raises(CrewBudgetExceededError) as info:
            crew.kickoff()
    assert isinstance(info.value, BudgetExceededError)
    assert info.value.agent_name == "Researcher"
    assert stub.requests == []
    assert m.status()["Researcher"].refusals == 1  # one refusal: CrewAI did not retry
    assert no_hooks_left()


def test_high_priority_agent_borrows_from_a_low_priority_one_mid_run() -> None:
    llm = ScriptedCrewLLM(answer="facts")
    crew = crew_of(llm)
    m = BudgetManager()
    govern_crew(
        crew,
        m,
        {
            "Researcher": {"priority": 3, "max_tokens": 80},
            "Writer": {"priority": 1, "max_tokens": 3_000},
        },
        default_max_tokens=200,
    )
    events: list[Any] = []
    m.subscribe(events.append)
    crew.kickoff()
    borrows = [e for e in events if e.kind == "transfer" and e.reason == "borrow"]
    assert borrows and borrows[0].agent == "Researcher" and borrows[0].donors[0][0] == "Writer"
    assert ledger(m) == llm.totals()


def test_a_failed_call_releases_its_reservation() -> None:
    llm = ScriptedCrewLLM(fail=True)
    crew = crew_of(llm)
    m = BudgetManager()
    govern_crew(crew, m, BUDGETS, default_max_tokens=100)
    with pytest.raises(Exception, match="provider unavailable"):
        crew.kickoff()
    s = m.status()["Researcher"]
    assert llm.requests >= 1  # CrewAI retried the provider error; every attempt was released
    assert (s.reserved, s.consumed, s.refusals) == (0, 0, 0)
    assert no_hooks_left()


# --------------------------------------------------------- confidence, gate
def test_task_confidence_closes_the_gate_for_the_next_task() -> None:
    llm = ScriptedCrewLLM(answer="sure")
    researcher = Agent(role="Researcher", goal="g", backstory="b", llm=llm)
    first = Task(description="First pass.", expected_output="x", agent=researcher)
    second = Task(description="Second pass.", expected_output="x", agent=researcher)
    crew = Crew(agents=[researcher], tasks=[first, second])
    m = BudgetManager()
    govern_crew(
        crew,
        m,
        {"Researcher": {"max_tokens": 5_000, "confidence_threshold": 0.8}},
        confidence_fn=lambda output: 0.9,
        default_max_tokens=100,
    )
    with pytest.raises(CrewConfidenceGateError):
        crew.kickoff()
    assert llm.requests == 1 and m.status()["Researcher"].gated


# ------------------------------------------------------ agents without a budget
def test_missing_contracts_are_reported_before_the_run() -> None:
    llm = ScriptedCrewLLM()
    with pytest.raises(ContractError, match=r"no budget for crew agent.*'Writer'"):
        govern_crew(crew_of(llm), BudgetManager(), {"Researcher": {"max_tokens": 100}})
    assert llm.requests == 0
    with pytest.raises(ContractError, match="not in this crew: \\['Editor'\\]"):
        govern_crew(crew_of(llm), BudgetManager(), {**BUDGETS, "Editor": {"max_tokens": 5}})


def test_refused_budgets_register_nothing_so_the_corrected_ones_start_clean() -> None:
    llm = ScriptedCrewLLM()
    m = BudgetManager()
    lowercase = {"researcher": {"max_tokens": 3_000}, "writer": {"max_tokens": 3_000}}
    with pytest.raises(ContractError, match=r"no budget for crew agent.*'Researcher'"):
        govern_crew(crew_of(llm), m, lowercase)  # roles are 'Researcher' and 'Writer'
    with pytest.raises(ContractError, match="not in this crew: \\['Editor'\\]"):
        govern_crew(crew_of(llm), m, {**BUDGETS, "Editor": {"max_tokens": 5}})
    assert m.contracts == {}  # no stray agent left holding budget, lending it to others
    govern_crew(crew_of(llm), m, BUDGETS)
    assert sorted(m.contracts) == sorted(BUDGETS)


def test_default_agent_takes_the_hierarchical_manager_and_unbudgeted_agents() -> None:
    llm = ScriptedCrewLLM(answer="ok")
    m = BudgetManager()
    m.register_agent("shared", max_tokens=20_000)
    crew = crew_of(llm, process=Process.hierarchical, manager_llm=llm)
    govern_crew(crew, m, {"Researcher": {"max_tokens": 3_000}}, default_agent="shared")
    crew.kickoff()
    s = m.status()
    totals = llm.totals()
    assert "Crew Manager" in totals  # the manager's own calls belong to no crew agent
    assert s["Researcher"].consumed == sum(totals.get("Researcher", (0, 0)))
    others = sum(sum(v) for role, v in totals.items() if role != "Researcher")
    assert s["shared"].consumed == others > 0


def test_calls_of_no_agent_are_refused_with_how_to_configure_a_default() -> None:
    llm = ScriptedCrewLLM(answer="ok")
    crew = crew_of(llm, process=Process.hierarchical, manager_llm=llm)
    govern_crew(crew, BudgetManager(), BUDGETS)
    with pytest.raises(CrewUnknownAgentError, match="pass default_agent="):
        crew.kickoff()
    assert "Crew Manager" not in llm.totals()


# ------------------------------------------------------------- run scoping
def test_other_crews_are_not_touched_and_nothing_stays_registered() -> None:
    llm = ScriptedCrewLLM(answer="ok")
    m = BudgetManager()
    governed = govern_crew(crew_of(llm), m, BUDGETS, default_max_tokens=50)
    other_llm = ScriptedCrewLLM(answer="free")
    other = crew_of(other_llm)
    governed.kickoff()
    before = m.status()
    other.kickoff()  # an ungoverned crew: no budget, no refusal, no ledger change
    assert m.status() == before and other_llm.requests == 2
    assert no_hooks_left()
    handlers = crewai_event_bus._sync_handlers  # checking our own cleanup
    assert not any(
        getattr(h, "__self__", None).__class__.__name__ == "_Run"
        for hs in handlers.values()
        for h in hs
    )


def test_kickoff_async_akickoff_and_kickoff_for_each_are_governed() -> None:
    llm = ScriptedCrewLLM(answer="ok")
    m = BudgetManager()
    crew = govern_crew(
        crew_of(llm),
        m,
        {k: {**v, "max_tokens": 50_000} for k, v in BUDGETS.items()},
        default_max_tokens=50,
    )
    asyncio.run(crew.kickoff_async())
    asyncio.run(crew.akickoff())
    results = crew.kickoff_for_each(inputs=[{}, {}])
    assert len(results) == 2
    assert ledger(m) == llm.totals()  # kickoff_for_each's crew copies share the fake's record
    assert sum(len(calls) for calls in llm.reported.values()) == 8  # 4 runs x 2 agents
    assert no_hooks_left()


# ------------------------------------------------------------------- YAML
def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_budgets_yaml_by_role_or_agents_yaml_key(tmp_path: Path) -> None:
    write(tmp_path / "agents.yaml", "researcher:\n  role: Researcher\n  goal: g\n  backstory: b\n")
    budgets = write(
        tmp_path / "budgets.yaml",
        "researcher:\n  priority: 3\n  max_tokens: 2000\n  max_output_tokens: 500\n"
        "Writer:\n  max_tokens: 3000\n  depends_on: [Researcher]\n",
    )
    contracts = load_budgets(budgets)
    assert contracts["Researcher"].max_output_tokens == 500
    assert contracts["Writer"].depends_on == ("Researcher",)
    llm = ScriptedCrewLLM(answer="ok")
    m = BudgetManager()
    govern_crew(crew_of(llm), m, budgets, default_max_tokens=50).kickoff()
    assert ledger(m) == llm.totals()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "Researcher:\n  max_tokens: -5\n",
            f"Agent 'Researcher': max_tokens must be an integer from 0 to {MAX_TOKENS}, got -5",
        ),
        (
            "Researcher:\n  max_tokens: lots\n",
            f"Agent 'Researcher': max_tokens must be an integer from 0 to {MAX_TOKENS}, got 'lots'",
        ),
        (
            "Researcher:\n  priority: 0\n",
            "Agent 'Researcher': priority must be an integer >= 1, got 0",
        ),
        ("Researcher:\n  budget: 5\n", "Agent 'Researcher': unknown contract field(s) ['budget']"),
        (
            "Researcher:\n  confidence_threshold: 2\n",
            "confidence_threshold must be in [0, 1], got 2",
        ),
        ("Researcher: 100\n", "Agent 'Researcher': contract must be a mapping"),
        ("Researcher: [\n", "not valid YAML"),
        ("- Researcher\n", "expected a mapping of agent to contract"),
    ],
)
def test_bad_budgets_yaml_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "budgets.yaml", text)
    with pytest.raises(ContractError) as info:
        load_budgets(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_sandboxed_environment() -> None:
    home = Path(os.environ["HOME"])
    assert "tbc-tests-" in str(home) and os.environ["CREWAI_DISABLE_TELEMETRY"] == "true"
    assert os.environ["OTEL_SDK_DISABLED"] == "true"
    assert "tbc-tests-" in os.environ["TMPDIR"] and "tbc-tests-" in os.environ["XDG_DATA_HOME"]
