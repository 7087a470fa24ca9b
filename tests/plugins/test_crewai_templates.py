"""Crews whose roles hold {placeholders} (the ``crewai create crew`` scaffold) under contracts.

``kickoff(inputs={"topic": "AI"})`` turns ``"{topic} Senior Data Researcher"`` into
``"AI Senior Data Researcher"``; a budget keyed by the template role, or by the
agents.yaml key in a budgets.yaml beside agents.yaml, must still govern that agent.
Every crew here is a real ``Crew`` calling ``crewai.LLM`` over HTTP against the local
``OpenAIStub``; the ledger is compared with what the stub billed for each agent's calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from crewai import LLM, Agent, Crew, Task
from crewai.crews.crew_output import CrewOutput
from crewai.flow.flow import Flow, start
from crewai.project import CrewBase, agent, crew, task

from tbc_integrations import BudgetManager, ContractError
from tbc_integrations.crewai import CrewBudgetExceededError, crew_summary, govern_crew
from tbc_integrations.testing import OpenAIStub

RESEARCHER = "{topic} Senior Data Researcher"
ANALYST = "{topic} Reporting Analyst"
TEMPLATE_BUDGETS = {
    RESEARCHER: {"priority": 3, "max_tokens": 20_000},
    ANALYST: {"priority": 1, "max_tokens": 20_000},
}
REPLY = "Thought: done\nFinal Answer: the report"


def stub_llm(stub: OpenAIStub) -> LLM:
    return LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="test", max_tokens=60)


def templated_crew(llm: LLM) -> Crew:
    researcher = Agent(
        role=RESEARCHER,
        goal="Uncover cutting-edge developments in {topic}",
        backstory="You find the latest developments in {topic}.",
        llm=llm,
    )
    analyst = Agent(
        role=ANALYST,
        goal="Create detailed reports on {topic}",
        backstory="You turn findings about {topic} into reports.",
        llm=llm,
    )
    research = Task(
        description="Research {topic}.", expected_output="10 bullet points", agent=researcher
    )
    report = Task(description="Report on {topic}.", expected_output="a report", agent=analyst)
    return Crew(agents=[researcher, analyst], tasks=[research, report])


def billed_by_role(stub: OpenAIStub) -> dict[str, tuple[int, int]]:
    """What the stub billed, per interpolated role (read from CrewAI's system prompt)."""
    out: dict[str, tuple[int, int]] = {}
    for body, (prompt, completion) in zip(stub.requests, stub.reported, strict=True):
        system = str(body["messages"][0]["content"])
        assert system.startswith("You are "), system
        role = system.removeprefix("You are ").split(". ", 1)[0].strip()
        a, b = out.get(role, (0, 0))
        out[role] = (a + prompt, b + completion)
    return out


def by_template(billed: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Billed usage summed per template role (``"AI Reporting Analyst"`` -> ``ANALYST``)."""
    out: dict[str, tuple[int, int]] = {}
    for role, (prompt, completion) in billed.items():
        template = RESEARCHER if role.endswith(" Senior Data Researcher") else ANALYST
        a, b = out.get(template, (0, 0))
        out[template] = (a + prompt, b + completion)
    return out


def ledger(m: BudgetManager) -> dict[str, tuple[int, int]]:
    return {n: (s.input_tokens, s.output_tokens) for n, s in m.status().items() if s.consumed}


@pytest.mark.parametrize("default_agent", [None, "shared"], ids=["no-default", "default-agent"])
def test_budget_keyed_by_template_role_governs_the_interpolated_role(
    default_agent: str | None,
) -> None:
    m = BudgetManager()
    if default_agent is not None:  # before the fix, every call went here silently
        m.register_agent(default_agent, max_tokens=50_000)
    with OpenAIStub(reply=REPLY) as stub:
        crew_ = govern_crew(
            templated_crew(stub_llm(stub)), m, TEMPLATE_BUDGETS, default_agent=default_agent
        )
        out = crew_.kickoff(inputs={"topic": "AI"})
    assert isinstance(out, CrewOutput) and out.raw == "the report"
    billed = billed_by_role(stub)
    assert set(billed) == {"AI Senior Data Researcher", "AI Reporting Analyst"}
    assert ledger(m) == by_template(billed)  # each agent: exactly what the stub billed it
    s = m.status()
    assert s[RESEARCHER].complete and s[ANALYST].complete  # their one task each finished
    assert all(st.reserved == 0 for st in s.values())
    if default_agent is not None:
        assert s[default_agent].consumed == 0
    summary = crew_summary(m, crew_)
    assert set(summary) == {RESEARCHER, ANALYST}
    assert summary[RESEARCHER]["consumed"] == sum(billed["AI Senior Data Researcher"])


def test_a_small_template_budget_refuses_the_interpolated_agent_before_the_server() -> None:
    m = BudgetManager()
    budgets = {RESEARCHER: {"max_tokens": 10}, ANALYST: {"max_tokens": 10}}  # nothing to borrow
    with OpenAIStub(reply=REPLY) as stub:
        crew_ = govern_crew(templated_crew(stub_llm(stub)), m, budgets)
        with pytest.raises(CrewBudgetExceededError) as info:
            crew_.kickoff(inputs={"topic": "AI"})
    assert info.value.agent_name == RESEARCHER
    assert stub.requests == []
    assert m.status()[RESEARCHER].refusals == 1


def test_kickoff_for_each_charges_every_interpolation_to_its_template() -> None:
    m = BudgetManager()
    with OpenAIStub(reply=REPLY) as stub:
        crew_ = govern_crew(templated_crew(stub_llm(stub)), m, TEMPLATE_BUDGETS)
        results = crew_.kickoff_for_each(inputs=[{"topic": "AI"}, {"topic": "Batteries"}])
    assert [r.raw for r in results if isinstance(r, CrewOutput)] == ["the report"] * 2
    billed = billed_by_role(stub)
    assert set(billed) == {
        "AI Senior Data Researcher",
        "AI Reporting Analyst",
        "Batteries Senior Data Researcher",
        "Batteries Reporting Analyst",
    }
    assert ledger(m) == by_template(billed)


@pytest.mark.parametrize("method", ["kickoff_for_each_async", "akickoff_for_each"])
def test_async_for_each_is_governed(method: str) -> None:
    m = BudgetManager()
    with OpenAIStub(reply=REPLY) as stub:
        crew_ = govern_crew(templated_crew(stub_llm(stub)), m, TEMPLATE_BUDGETS)
        results = asyncio.run(getattr(crew_, method)(inputs=[{"topic": "AI"}, {"topic": "ML"}]))
    assert len(results) == 2
    billed = billed_by_role(stub)
    assert set(billed) == {
        "AI Senior Data Researcher",
        "AI Reporting Analyst",
        "ML Senior Data Researcher",
        "ML Reporting Analyst",
    }
    assert ledger(m) == by_template(billed)  # before: nothing charged, no budget held
    assert all(st.reserved == 0 for st in m.status().values())


def test_a_flow_kicking_off_a_templated_crew_is_governed() -> None:
    m = BudgetManager()
    with OpenAIStub(reply=REPLY) as stub:
        governed = govern_crew(templated_crew(stub_llm(stub)), m, TEMPLATE_BUDGETS)

        class ResearchFlow(Flow[dict[str, Any]]):
            @start()
            def research(self) -> str:
                out = governed.kickoff(inputs={"topic": "Robotics"})
                assert isinstance(out, CrewOutput)
                return out.raw

        assert ResearchFlow().kickoff() == "the report"
    billed = billed_by_role(stub)
    assert set(billed) == {"Robotics Senior Data Researcher", "Robotics Reporting Analyst"}
    assert ledger(m) == by_template(billed)


def test_a_budget_for_one_interpolation_does_not_take_the_others() -> None:
    m = BudgetManager()
    with OpenAIStub(reply=REPLY) as stub:
        crew_ = templated_crew(stub_llm(stub))
        crew_.kickoff(inputs={"topic": "AI"})  # ungoverned: the roles now read "AI ..."
        budgets = {"AI Senior Data Researcher": {"max_tokens": 20_000}}
        m.register_agent("shared", max_tokens=20_000)
        govern_crew(crew_, m, budgets, default_agent="shared")
        stub.requests.clear()
        stub.reported.clear()
        crew_.kickoff(inputs={"topic": "ML"})
    billed = billed_by_role(stub)
    assert set(billed) == {"ML Senior Data Researcher", "ML Reporting Analyst"}
    s = m.status()
    assert s["AI Senior Data Researcher"].consumed == 0  # ML is not AI
    assert s["shared"].consumed == sum(sum(v) for v in billed.values())


# -------------------------------------------------- the crewai create crew scaffold
AGENTS_YAML = """\
researcher:
  role: >
    {topic} Senior Data Researcher
  goal: >
    Uncover cutting-edge developments in {topic}
  backstory: >
    You're a seasoned researcher with a knack for uncovering the latest
    developments in {topic}.
reporting_analyst:
  role: >
    {topic} Reporting Analyst
  goal: >
    Create detailed reports based on {topic} data analysis and research findings
  backstory: >
    You're a meticulous analyst with a keen eye for detail.
"""
TASKS_YAML = """\
research_task:
  description: >
    Conduct a thorough research about {topic}.
  expected_output: >
    A list with 10 bullet points of the most relevant information about {topic}
  agent: researcher
reporting_task:
  description: >
    Review the context you got and expand each topic into a full section for a report.
  expected_output: >
    A fully fledged report with the main topics.
  agent: reporting_analyst
"""


def scaffold_crew(
    config: Path, llm: LLM, govern: Callable[[Crew, Any], Crew] | None = None
) -> Crew:
    """The ``crewai create crew`` scaffold; ``govern(crew, self.agents_config)`` in ``@crew``."""
    agents_path = str(config / "agents.yaml")
    tasks_path = str(config / "tasks.yaml")

    @CrewBase
    class LatestAiDevelopment:
        agents_config: Any = agents_path  # CrewBase replaces the paths by the loaded yaml
        tasks_config: Any = tasks_path
        agents: list[Any]
        tasks: list[Any]

        @agent
        def researcher(self) -> Agent:
            return Agent(config=self.agents_config["researcher"], llm=llm)

        @agent
        def reporting_analyst(self) -> Agent:
            return Agent(config=self.agents_config["reporting_analyst"], llm=llm)

        @task
        def research_task(self) -> Task:
            return Task(config=self.tasks_config["research_task"])  # type: ignore[call-arg]

        @task
        def reporting_task(self) -> Task:
            return Task(config=self.tasks_config["reporting_task"])  # type: ignore[call-arg]

        @crew
        def crew(self) -> Crew:
            built = Crew(agents=self.agents, tasks=self.tasks)
            return built if govern is None else govern(built, self.agents_config)

    built: Crew = LatestAiDevelopment().crew()
    return built


def test_scaffold_crew_with_budgets_yaml_keyed_by_agents_yaml_keys(tmp_path: Path) -> None:
    write_scaffold(tmp_path)
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(
        "researcher:\n  priority: 3\n  max_tokens: 20000\n"
        "reporting_analyst:\n  max_tokens: 20000\n",
        encoding="utf-8",
    )
    m = BudgetManager()
    with OpenAIStub(reply=REPLY) as stub:
        crew_ = govern_crew(scaffold_crew(tmp_path, stub_llm(stub)), m, budgets)
        crew_.kickoff(inputs={"topic": "AI LLMs"})
    billed = billed_by_role(stub)
    assert set(billed) == {"AI LLMs Senior Data Researcher", "AI LLMs Reporting Analyst"}
    # budgets.yaml names agents.yaml keys; the ledger names them by their template role
    assert ledger(m) == by_template(billed)
    assert m.status()[RESEARCHER].priority == 3


# --------------------------------------------- the CrewAI internal this relies on
def test_crewai_keeps_the_template_role_in_original_role() -> None:
    """Fails loudly if a CrewAI upgrade stops keeping the role as written."""
    a = Agent(role=RESEARCHER, goal="g {topic}", backstory="b")
    a.interpolate_inputs({"topic": "AI"})
    assert a.role == "AI Senior Data Researcher"
    assert a._original_role == RESEARCHER


def write_scaffold(config: Path) -> None:
    (config / "agents.yaml").write_text(AGENTS_YAML, encoding="utf-8")
    (config / "tasks.yaml").write_text(TASKS_YAML, encoding="utf-8")


KEYED_BUDGETS = {
    "researcher": {"priority": 3, "max_tokens": 20_000},
    "reporting_analyst": {"max_tokens": 20_000},
}


@pytest.mark.parametrize("where", ["in-crewbase", "path"])
def test_budgets_mapping_keyed_by_agents_yaml_keys_with_agents_config(
    tmp_path: Path, where: str
) -> None:
    write_scaffold(tmp_path)
    m = BudgetManager()
    with OpenAIStub(reply=REPLY) as stub:
        if where == "in-crewbase":  # inside @crew: self.agents_config is the loaded agents.yaml

            def govern(built: Crew, agents_config: Any) -> Crew:
                return govern_crew(built, m, KEYED_BUDGETS, agents_config=agents_config)

            crew_ = scaffold_crew(tmp_path, stub_llm(stub), govern)
        else:
            crew_ = govern_crew(
                scaffold_crew(tmp_path, stub_llm(stub)),
                m,
                KEYED_BUDGETS,
                agents_config=tmp_path / "agents.yaml",
            )
        crew_.kickoff(inputs={"topic": "AI LLMs"})
    assert ledger(m) == by_template(billed_by_role(stub))
    assert m.status()[RESEARCHER].priority == 3


def test_agents_config_errors_are_contract_errors(tmp_path: Path) -> None:
    write_scaffold(tmp_path)
    crew_ = scaffold_crew(tmp_path, LLM(model="openai/gpt-4", api_key="test"))
    both = {**KEYED_BUDGETS, RESEARCHER: {"max_tokens": 5}}
    with pytest.raises(ContractError, match=r"'\{topic\} Senior Data Researcher' is given two"):
        govern_crew(crew_, BudgetManager(), both, agents_config=tmp_path / "agents.yaml")
    with pytest.raises(ContractError, match=r"agents_config .*missing\.yaml"):
        govern_crew(crew_, BudgetManager(), KEYED_BUDGETS, agents_config=tmp_path / "missing.yaml")
    with pytest.raises(ContractError, match=r"no budget for crew agent.*agents_config=\.\.\."):
        govern_crew(crew_, BudgetManager(), KEYED_BUDGETS)  # keys without agents_config
