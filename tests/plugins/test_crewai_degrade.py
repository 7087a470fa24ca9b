"""The degradation ladder in the CrewAI hook: a cheaper model, a lower max_tokens, a
wrap-up instruction, and only then a refusal; each step a ``Degraded`` event.

Real ``Crew`` runs with the real ``crewai.LLM`` against the local OpenAI stub: the stub
receives the cheaper model's name, the lower ``max_tokens`` and the wrap-up message. The
ladder's decisions are the core's (``_degrade``); these tests check the hook applies them
to the one call they are for, also when agents share one ``LLM`` and crews are copied.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from crewai import LLM, Agent, Crew, Task

from tbc_integrations import BudgetManager, ModelPrice
from tbc_integrations.crewai import (
    CrewBudgetExceededError,
    CrewConfidenceGateError,
    govern_crew,
)
from tbc_integrations.events import BudgetEvent
from tbc_integrations.testing import OpenAIStub

ANSWER = "Final Answer: " + " ".join(f"w{i}" for i in range(10))  # 12 words
WRAP_UP = "Budget nearly gone: give your final answer now with what you have."
PRICES = {
    "gpt-4": ModelPrice(input=30, output=60),
    "gpt-4-turbo": ModelPrice(input=10, output=30),
    "gpt-3.5-turbo": ModelPrice(input="0.5", output="1.5"),
}


def llm_for(stub: OpenAIStub, model: str = "openai/gpt-4", **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 200)
    return LLM(model=model, base_url=stub.base_url, api_key="test", **kwargs)


def crew_of(llm: Any, *roles: str, template: bool = False) -> Crew:
    agents: list[Any] = [Agent(role=r, goal="g", backstory="b", llm=llm) for r in roles]
    suffix = " {n}" if template else ""
    tasks = [Task(description=f"Work{suffix}.", expected_output="x", agent=a) for a in agents]
    return Crew(agents=agents, tasks=tasks)


def role_of(body: dict[str, Any], roles: tuple[str, ...] = ("Researcher", "Writer")) -> str:
    text = str(body["messages"])
    found = [r for r in roles if f"You are {r}" in text]
    assert len(found) == 1, text[:200]
    return found[0]


def watch(m: BudgetManager, *kinds: str) -> list[BudgetEvent]:
    seen: list[BudgetEvent] = []
    m.subscribe(lambda e: seen.append(e) if e.kind in kinds else None)
    return seen


def test_a_cheaper_model_when_the_money_left_cannot_pay_for_the_big_one() -> None:
    with OpenAIStub(reply=ANSWER) as stub:
        llm = llm_for(stub)  # shared: the Writer keeps gpt-4
        m = BudgetManager(prices=PRICES)
        crew = crew_of(llm, "Researcher", "Writer")
        govern_crew(
            crew,
            m,
            {
                # gpt-4 may cost $0.0141 for a 200-token answer; gpt-3.5-turbo $0.0003
                "Researcher": {"max_cost": "0.001", "degrade": [{"model": "gpt-3.5-turbo"}]},
                "Writer": {"max_tokens": 100_000},
            },
        )
        seen = watch(m, "degrade", "refuse")
        crew.kickoff()
        sent = [(role_of(b), b["model"], b["max_tokens"]) for b in stub.requests]
        prompt, completion = stub.reported[0]
    assert sent == [("Researcher", "gpt-3.5-turbo", 200), ("Writer", "gpt-4", 200)]
    assert [(e.kind, e.agent, e.reason) for e in seen] == [
        ("refuse", "Researcher", "cost cap"),
        ("degrade", "Researcher", "model gpt-3.5-turbo (refused: cost cap)"),
    ]
    # the call is priced and charged as the model that answered it
    cost = (prompt * Decimal("0.5") + completion * Decimal("1.5")) / 1_000_000
    assert m.status()["Researcher"].cost == cost
    assert llm.model == "gpt-4"


def test_a_model_step_the_money_left_cannot_pay_for_is_passed_over() -> None:
    with OpenAIStub(reply=ANSWER) as stub:
        m = BudgetManager(prices=PRICES)
        crew = crew_of(llm_for(stub), "Researcher")
        # a 200-token answer may cost $0.006 on gpt-4-turbo, $0.0003 on gpt-3.5-turbo
        ladder = [{"model": "gpt-4-turbo"}, {"model": "gpt-3.5-turbo"}]
        govern_crew(crew, m, {"Researcher": {"max_cost": "0.001", "degrade": ladder}})
        seen = watch(m, "degrade")
        crew.kickoff()
        sent = [(b["model"], b["max_tokens"]) for b in stub.requests]
    assert sent == [("gpt-3.5-turbo", 200)]
    assert [e.reason for e in seen] == [
        "model gpt-3.5-turbo (refused: cost cap; passed over gpt-4-turbo: over the money left)"
    ]


def test_a_refusal_by_the_confidence_gate_takes_no_step() -> None:
    with OpenAIStub(reply=ANSWER) as stub:
        llm = llm_for(stub)
        researcher = Agent(role="Researcher", goal="g", backstory="b", llm=llm)
        tasks = [
            Task(description=f"Pass {n}.", expected_output="x", agent=researcher) for n in (1, 2)
        ]
        crew = Crew(agents=[researcher], tasks=tasks)
        m = BudgetManager()
        contract = {"max_tokens": 5_000, "confidence_threshold": 0.8}
        ladder = [{"max_tokens": 50}, {"wrap_up": WRAP_UP}]
        govern_crew(
            crew, m, {"Researcher": {**contract, "degrade": ladder}}, confidence_fn=lambda o: 0.9
        )
        seen = watch(m, "degrade", "refuse")
        with pytest.raises(CrewConfidenceGateError):
            crew.kickoff()
        sent = [b["max_tokens"] for b in stub.requests]
    assert sent == [200]  # the first task's call; the second is gated, not degraded
    assert [(e.kind, e.reason) for e in seen] == [("refuse", "confidence gate")]


def test_a_lower_max_tokens_when_the_answer_asked_for_does_not_fit() -> None:
    with OpenAIStub(reply=ANSWER) as stub:
        m = BudgetManager()
        crew = crew_of(llm_for(stub, max_tokens=400), "Researcher")
        govern_crew(crew, m, {"Researcher": {"max_tokens": 300, "degrade": [{"max_tokens": 100}]}})
        seen = watch(m, "degrade")
        crew.kickoff()
        sent = [(b["model"], b["max_tokens"]) for b in stub.requests]
    assert sent == [("gpt-4", 100)]
    assert [e.reason for e in seen] == ["max_tokens 100 (refused: budget)"]


def test_a_wrap_up_below_a_fraction_is_appended_to_that_call_only() -> None:
    with OpenAIStub(reply=ANSWER) as stub:
        m = BudgetManager()
        crew = crew_of(llm_for(stub), "Researcher", "Writer")
        crew.tasks.append(Task(description="More.", expected_output="x", agent=crew.agents[0]))
        govern_crew(
            crew,
            m,
            {
                "Researcher": {
                    "max_tokens": 4_000,
                    "degrade": [{"wrap_up": WRAP_UP, "below": 0.5}],
                },
                "Writer": {"max_tokens": 4_000},
            },
        )
        m.commit(m.reserve("Researcher", 2_500, 0), (2_500, 0))  # 37.5% left
        seen = watch(m, "degrade")
        reserved = watch(m, "reserve")
        crew.kickoff()
        bodies = [(role_of(b), b["messages"]) for b in stub.requests]
        billed = [p for p, _ in stub.reported]
    roles = [r for r, _ in bodies]
    assert roles == ["Researcher", "Writer", "Researcher"]
    for (role, messages), held, bill in zip(bodies, reserved, billed, strict=True):
        wraps = [msg for msg in messages if msg["content"] == WRAP_UP]
        if role == "Researcher":  # once, last, on each of its calls: never carried over
            assert wraps == [{"role": "user", "content": WRAP_UP}] and messages[-1] == wraps[0]
        else:
            assert wraps == []
        assert bill - 10 <= held.input_tokens <= bill  # the wrap-up is reserved too
    assert [e.reason for e in seen] == ["wrap-up (below 0.5)"] * 2


def test_the_whole_ladder_in_order_then_the_refusal() -> None:
    with OpenAIStub(reply=ANSWER) as stub:
        m = BudgetManager()
        crew = crew_of(llm_for(stub), "Researcher")
        ladder = [{"model": "gpt-3.5-turbo"}, {"max_tokens": 20}, {"wrap_up": WRAP_UP}]
        govern_crew(crew, m, {"Researcher": {"max_tokens": 60, "degrade": ladder}})
        seen = watch(m, "degrade", "refuse")
        with pytest.raises(CrewBudgetExceededError) as info:
            crew.kickoff()
        assert stub.requests == []  # no step made the prompt fit: nothing was sent
    assert [(e.kind, e.reason) for e in seen] == [
        ("refuse", "budget"),
        ("degrade", "model gpt-3.5-turbo (refused: budget)"),
        ("refuse", "budget"),
        ("degrade", "max_tokens 20 (refused: budget)"),
        ("refuse", "budget"),
        ("degrade", "wrap-up (refused: budget)"),
        ("refuse", "budget"),
    ]
    assert info.value.agent_name == "Researcher"
    assert m.status()["Researcher"].reserved == 0


def test_a_model_step_named_in_models_goes_to_that_llm() -> None:
    with OpenAIStub(reply=ANSWER) as big, OpenAIStub(reply=ANSWER) as small:
        m = BudgetManager()
        crew = crew_of(llm_for(big), "Researcher")
        cheap = llm_for(small, "openai/gpt-3.5-turbo", max_tokens=500)
        govern_crew(
            crew,
            m,
            {
                "Researcher": {
                    "max_tokens": 1_000,
                    "degrade": [{"model": "gpt-3.5-turbo", "below": 0.9}],
                }
            },
            models={"gpt-3.5-turbo": cheap},
        )
        m.commit(m.reserve("Researcher", 200, 0), (200, 0))  # 80% left
        crew.kickoff()
        sent_big, sent_small = big.requests, small.requests
    assert sent_big == []
    assert [(b["model"], b["max_tokens"]) for b in sent_small] == [("gpt-3.5-turbo", 200)]
    assert cheap.max_tokens == 500  # the request asks what was held, not its own 500


@pytest.mark.parametrize("run", ["kickoff", "kickoff_for_each", "kickoff_for_each_async"])
def test_a_model_switch_is_that_agents_alone_on_a_shared_llm(run: str) -> None:
    with OpenAIStub(reply=ANSWER) as stub:
        llm = llm_for(stub)
        m = BudgetManager()
        crew = crew_of(llm, "Researcher", "Writer", template=True)
        govern_crew(
            crew,
            m,
            {
                "Researcher": {
                    "max_tokens": 10_000,
                    "degrade": [{"model": "gpt-3.5-turbo", "below": 0.5}],
                },
                "Writer": {"max_tokens": 10_000},
            },
        )
        m.commit(m.reserve("Researcher", 6_000, 0), (6_000, 0))
        seen = watch(m, "degrade")
        inputs = [{"n": str(i)} for i in range(3)]
        if run == "kickoff":
            crew.kickoff(inputs=inputs[0])
        elif run == "kickoff_for_each":
            crew.kickoff_for_each(inputs=inputs)
        else:
            asyncio.run(crew.kickoff_for_each_async(inputs=inputs))
        sent = {(role_of(b), b["model"]) for b in stub.requests}
        n = len(stub.requests)
    assert sent == {("Researcher", "gpt-3.5-turbo"), ("Writer", "gpt-4")}
    assert n == (2 if run == "kickoff" else 6)
    assert [e.reason for e in seen] == ["model gpt-3.5-turbo (below 0.5)"] * (n // 2)
    assert llm.model == "gpt-4" and "call" not in vars(llm)


def test_a_call_that_runs_its_hooks_itself_is_degraded_too() -> None:
    # an agent that reasons first makes that call straight on its LLM (no executor)
    with OpenAIStub(reply=ANSWER) as stub:
        llm = llm_for(stub)
        agent = Agent(
            role="Researcher",
            goal="g",
            backstory="b",
            llm=llm,
            reasoning=True,
            max_reasoning_attempts=1,
        )
        crew = Crew(
            agents=[agent], tasks=[Task(description="Work.", expected_output="x", agent=agent)]
        )
        m = BudgetManager()
        # a model named as crewai.LLM names it: the provider's client gets the bare name
        steps = [
            {"model": "openai/gpt-3.5-turbo", "below": 0.5},
            {"wrap_up": WRAP_UP, "below": 0.5},
        ]
        govern_crew(crew, m, {"Researcher": {"max_tokens": 10_000, "degrade": steps}})
        m.commit(m.reserve("Researcher", 6_000, 0), (6_000, 0))
        seen = watch(m, "degrade")
        crew.kickoff()
        sent = [(b["model"], b["messages"][-1]["content"]) for b in stub.requests]
    assert sent == [("gpt-3.5-turbo", WRAP_UP)] * 2  # the reasoning call, then the task's
    assert [e.reason for e in seen] == [
        "model openai/gpt-3.5-turbo (below 0.5)",
        "wrap-up (below 0.5)",
    ] * 2
    assert llm.model == "gpt-4"
