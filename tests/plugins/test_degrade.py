"""The degradation ladder: a cheaper model, a lower max_tokens, a wrap-up, then a refusal."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from tbc_integrations import BudgetContract, BudgetManager, ContractError, Degrade
from tbc_integrations.events import BudgetEvent
from tbc_integrations.langgraph import BudgetMiddleware
from tbc_integrations.testing import OpenAIStub, UsageFakeChat


def test_a_ladder_is_checked_and_kept_in_the_contract() -> None:
    c = BudgetContract("a", degrade=[{"model": "mini"}, Degrade(max_tokens=50, below=0.2)])
    assert [s.name for s in c.degrade] == ["model mini", "max_tokens 50"]  # type: ignore[union-attr]
    assert BudgetContract.from_dict(c.to_dict()) == c
    for bad in (
        {"model": "m", "max_tokens": 5},
        {},
        {"max_tokens": 0},
        {"wrap_up": "x", "below": 2},
    ):
        with pytest.raises(ContractError):
            BudgetContract("a", degrade=[bad])
    with pytest.raises(ContractError, match="'a'"):
        BudgetContract("a", degrade=[{"colour": "red"}])


def agent_with(m: BudgetManager, big: Any, models: dict[str, Any]) -> Any:
    from langchain.agents import create_agent

    return create_agent(
        big,
        tools=[],
        name="writer",
        middleware=[BudgetMiddleware(m, min_call_tokens=1, models=models, default_max_tokens=400)],
    )


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_refused_call_takes_the_ladder_before_refusing(path: str) -> None:
    m = BudgetManager()
    m.register_agent(
        "writer",
        max_tokens=300,  # the 400-token output the big model asks for does not fit
        degrade=[{"max_tokens": 100}, {"model": "mini"}],
    )
    seen: list[BudgetEvent] = []
    m.subscribe(lambda e: seen.append(e) if e.kind in ("degrade", "refuse") else None)
    big, mini = UsageFakeChat(reply=" ".join(["big"] * 300)), UsageFakeChat(reply="small answer")
    agent = agent_with(m, big, {"mini": mini})
    question: Any = {"messages": [HumanMessage("write")]}
    out = agent.invoke(question) if path == "sync" else asyncio.run(agent.ainvoke(question))
    # the first step (max_tokens 100) already fits: the big model answers, shortened
    assert out["messages"][-1].content == " ".join(["big"] * 100)
    assert [e.kind for e in seen] == ["refuse", "degrade"]
    assert seen[1].reason == "max_tokens 100 (refused: budget)"
    assert big.calls == 1 and mini.calls == 0
    assert m.status()["writer"].output_tokens == 100


def test_below_a_fraction_the_cheaper_model_is_taken_before_the_call() -> None:
    from langchain_openai import ChatOpenAI

    m = BudgetManager()
    m.register_agent(
        "writer", max_tokens=10_000, degrade=[{"model": "gpt-3.5-turbo", "below": 0.5}]
    )
    m.commit(m.reserve("writer", 6_000, 0), (6_000, 0))  # 40% left
    seen: list[BudgetEvent] = []
    m.subscribe(lambda e: seen.append(e) if e.kind == "degrade" else None)
    with OpenAIStub(reply="from the small model") as stub:

        def chat(name: str, max_tokens: int | None) -> Any:
            return ChatOpenAI(
                model=name,
                base_url=stub.base_url,
                api_key="test",  # type: ignore[arg-type]
                max_completion_tokens=max_tokens,
                max_retries=0,
            )

        small = chat("gpt-3.5-turbo", None)  # no max_tokens of its own
        out = agent_with(m, chat("gpt-4", 20), {"gpt-3.5-turbo": small}).invoke(
            {"messages": [HumanMessage("write")]}
        )
        assert [r["model"] for r in stub.requests] == ["gpt-3.5-turbo"]
        assert stub.requests[0]["max_completion_tokens"] == 20  # what the call asked
    assert out["messages"][-1].content == "from the small model"
    assert [e.reason for e in seen] == ["model gpt-3.5-turbo (below 0.5)"]


def test_a_wrap_up_step_tells_the_agent_to_finish_and_a_refusal_comes_last() -> None:
    m = BudgetManager()
    m.register_agent(
        "writer",
        max_tokens=120,
        degrade=[{"wrap_up": "Budget nearly gone: answer in one line now."}],
    )
    big = UsageFakeChat(reply="x")
    agent = agent_with(m, big, {})
    with pytest.raises(Exception) as err:
        agent.invoke({"messages": [HumanMessage("write " * 10)]})
    assert "requested" in str(err.value)
    assert big.calls == 0  # 400 output tokens never fit: wrap-up tried, then refused


@pytest.mark.parametrize(
    ("max_cost", "chosen"), [("0.005", "gpt-4-turbo"), ("0.002", "gpt-3.5-turbo")]
)
def test_the_middleware_takes_the_model_the_remaining_money_affords(
    max_cost: str, chosen: str
) -> None:
    from langchain_openai import ChatOpenAI

    from tbc_integrations import ModelPrice

    m = BudgetManager(
        prices={
            "gpt-4": ModelPrice(input=30, output=60),  # up to ~$0.0064 for 100 out
            "gpt-4-turbo": ModelPrice(input=10, output=30),  # ~$0.0031
            "gpt-3.5-turbo": ModelPrice(input="0.5", output="1.5"),  # ~$0.0002
        }
    )
    m.register_agent(
        "writer", max_cost=max_cost, degrade=[{"model": "gpt-4-turbo"}, {"model": "gpt-3.5-turbo"}]
    )
    seen: list[BudgetEvent] = []
    m.subscribe(lambda e: seen.append(e) if e.kind == "degrade" else None)
    with OpenAIStub(reply="a line") as stub:

        def chat(name: str) -> Any:
            return ChatOpenAI(
                model=name,
                base_url=stub.base_url,
                api_key="test",  # type: ignore[arg-type]
                max_completion_tokens=100,
                max_retries=0,
            )

        models = {name: chat(name) for name in ("gpt-4-turbo", "gpt-3.5-turbo")}
        agent_with(m, chat("gpt-4"), models).invoke({"messages": [HumanMessage("write")]})
        assert [r["model"] for r in stub.requests] == [chosen]
    passed = "; passed over gpt-4-turbo: over the money left" if chosen != "gpt-4-turbo" else ""
    assert [e.reason for e in seen] == [f"model {chosen} (refused: cost cap{passed})"]
