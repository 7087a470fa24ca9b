"""Governed LangGraph nodes: their own chat-model calls lowered to the output cap, moved to
a cheaper model, told to wrap up, and degraded after a refusal, on real StateGraph runs
with the real ChatOpenAI client against the local stub server."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from tbc_integrations import BudgetExceededError, BudgetManager, Degrade, ModelPrice
from tbc_integrations._chat_shaping import SHAPED_METHODS
from tbc_integrations.events import BudgetEvent
from tbc_integrations.langchain import BudgetCallbackHandler
from tbc_integrations.langgraph import BudgetMiddleware, budgeted_node, govern_graph
from tbc_integrations.testing import OpenAIStub, UsageFakeChat

PATHS = ["invoke", "ainvoke", "stream", "astream"]


class S(TypedDict, total=False):
    text: str
    out: str


@pytest.fixture
def stub() -> Iterator[OpenAIStub]:
    with OpenAIStub(reply=" ".join(["word"] * 300)) as server:
        yield server


def chat(stub: OpenAIStub, model: str = "gpt-4", max_tokens: int | None = 200) -> ChatOpenAI:
    return ChatOpenAI(
        model=model,
        base_url=stub.base_url,
        api_key="test",  # type: ignore[arg-type]
        max_completion_tokens=max_tokens,
        max_retries=0,
        stream_usage=True,
    )


def ask(llm: Any, prompt: Any, path: str) -> str:
    """The node's own call, on one of the four paths a node may use."""
    if path == "invoke":
        return str(llm.invoke(prompt).content)
    if path == "stream":
        return "".join(str(c.content) for c in llm.stream(prompt))

    async def run() -> str:
        if path == "ainvoke":
            return str((await llm.ainvoke(prompt)).content)
        return "".join([str(c.content) async for c in llm.astream(prompt)])

    return asyncio.run(run())


def graph_of(llm: Any, m: BudgetManager, path: str = "invoke", **options: Any) -> Any:
    def writer(state: S) -> S:
        return {"out": ask(llm, state["text"], path)}

    b = StateGraph(S).add_node("writer", writer)
    b.add_edge(START, "writer").add_edge("writer", END)
    return govern_graph(b, m, **options).compile()


def degrades(m: BudgetManager) -> list[BudgetEvent]:
    seen: list[BudgetEvent] = []
    m.subscribe(lambda e: seen.append(e) if e.kind in ("degrade", "refuse") else None)
    return seen


def asked_max(request: dict[str, Any]) -> Any:
    return request.get("max_completion_tokens", request.get("max_tokens"))


# ------------------------------------------------------------------ output caps
@pytest.mark.parametrize("path", PATHS)
def test_the_request_is_lowered_to_the_output_cap(stub: OpenAIStub, path: str) -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=10_000, max_output_tokens=50)
    out = graph_of(chat(stub), m, path).invoke({"text": "write"})
    assert [asked_max(r) for r in stub.requests] == [50]  # the node asked for 200
    assert out["out"] == " ".join(["word"] * 50)
    status = m.status()["writer"]
    assert status.output_tokens == 50 and status.overdraft == 0


def test_a_bare_callback_handler_cannot_lower_the_request(stub: OpenAIStub) -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=10_000, max_output_tokens=50)
    graph_of(chat(stub), m)  # shaping installed: outside a governed node it passes through
    handler = BudgetCallbackHandler(m, "writer")
    chat(stub).invoke("write", config={"callbacks": [handler]})
    assert [asked_max(r) for r in stub.requests] == [200]  # what the caller asked
    assert m.status()["writer"].output_tokens == 200  # recorded: an overdraft of the cap


def test_what_is_left_of_the_cap_is_what_the_next_call_asks(stub: OpenAIStub) -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=10_000, max_output_tokens=80)
    graph = graph_of(chat(stub, max_tokens=50), m)
    graph.invoke({"text": "one"})
    graph.invoke({"text": "two"})
    assert [asked_max(r) for r in stub.requests] == [50, 30]
    with pytest.raises(BudgetExceededError):  # nothing left of the cap: refused
        graph.invoke({"text": "three"})
    assert len(stub.requests) == 2


# ------------------------------------------------------------------ cheaper model, wrap-up
@pytest.mark.parametrize("path", PATHS)
def test_on_a_low_budget_the_stub_receives_the_cheaper_model(stub: OpenAIStub, path: str) -> None:
    m = BudgetManager()
    m.register_agent(
        "writer", max_tokens=10_000, degrade=[{"model": "gpt-3.5-turbo", "below": 0.5}]
    )
    m.charge("writer", (6_000, 0))  # 40% left
    seen = degrades(m)
    small = chat(stub, "gpt-3.5-turbo", max_tokens=None)
    graph = graph_of(chat(stub), m, path, models={"gpt-3.5-turbo": small})
    graph.invoke({"text": "write"})
    assert [r["model"] for r in stub.requests] == ["gpt-3.5-turbo"]
    assert asked_max(stub.requests[0]) == 200  # the node's max_tokens goes with it
    assert [e.reason for e in seen] == ["model gpt-3.5-turbo (below 0.5)"]


def test_above_the_fraction_the_node_keeps_its_model(stub: OpenAIStub) -> None:
    m = BudgetManager()
    m.register_agent(
        "writer", max_tokens=10_000, degrade=[{"model": "gpt-3.5-turbo", "below": 0.5}]
    )
    seen = degrades(m)
    small = chat(stub, "gpt-3.5-turbo")
    graph_of(chat(stub), m, models={"gpt-3.5-turbo": small}).invoke({"text": "write"})
    assert [r["model"] for r in stub.requests] == ["gpt-4"] and seen == []


@pytest.mark.parametrize("path", ["invoke", "astream"])
def test_a_wrap_up_instruction_is_added_to_the_prompt(stub: OpenAIStub, path: str) -> None:
    wrap = "Budget nearly gone: answer in one line now."
    m = BudgetManager()
    m.register_agent("writer", max_tokens=10_000, degrade=[{"wrap_up": wrap, "below": 0.5}])
    m.charge("writer", (6_000, 0))
    seen = degrades(m)
    graph_of(chat(stub), m, path).invoke({"text": "write"})
    assert stub.requests[0]["messages"] == [
        {"role": "system", "content": wrap},
        {"role": "user", "content": "write"},
    ]
    assert [e.reason for e in seen] == ["wrap-up (below 0.5)"]


def test_a_wrap_up_is_appended_to_the_nodes_own_system_message(stub: OpenAIStub) -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=100, degrade=[{"wrap_up": "Finish.", "below": 0.9}])
    m.charge("writer", (20, 0))
    llm = chat(stub, max_tokens=10)

    def writer(state: S) -> S:
        return {"out": str(llm.invoke([SystemMessage("Be brief."), HumanMessage("go")]).content)}

    b = StateGraph(S).add_node("writer", writer)
    b.add_edge(START, "writer").add_edge("writer", END)
    govern_graph(b, m).compile().invoke({"text": ""})
    assert stub.requests[0]["messages"][0] == {"role": "system", "content": "Be brief.\n\nFinish."}


# ------------------------------------------------------------------ after a refusal
@pytest.mark.parametrize("path", PATHS)
def test_a_refused_call_takes_the_ladder_before_refusing(stub: OpenAIStub, path: str) -> None:
    m = BudgetManager()
    m.register_agent(
        "writer",
        max_tokens=300,  # the 400 output tokens the node asks for do not fit
        degrade=[{"max_tokens": 100}, {"wrap_up": "Short."}],
    )
    seen = degrades(m)
    graph_of(chat(stub, max_tokens=400), m, path).invoke({"text": "write"})
    assert [asked_max(r) for r in stub.requests] == [100]
    assert [e.kind for e in seen] == ["refuse", "degrade"]
    assert seen[1].reason == "max_tokens 100 (refused: budget)"
    assert "messages" in stub.requests[0] and len(stub.requests[0]["messages"]) == 1


def test_the_refusal_comes_only_after_the_whole_ladder(stub: OpenAIStub) -> None:
    m = BudgetManager()
    m.register_agent(
        "writer",
        max_tokens=60,
        degrade=[{"wrap_up": "Short."}, {"model": "gpt-3.5-turbo"}],
    )
    seen = degrades(m)
    small = chat(stub, "gpt-3.5-turbo", max_tokens=400)
    graph = graph_of(chat(stub, max_tokens=400), m, models={"gpt-3.5-turbo": small})
    with pytest.raises(BudgetExceededError):
        graph.invoke({"text": "write"})
    assert stub.requests == []  # never reached the provider
    assert [e.kind for e in seen] == ["refuse", "degrade", "refuse", "degrade", "refuse"]
    assert [e.reason for e in seen if e.kind == "degrade"] == [
        "wrap-up (refused: budget)",
        "model gpt-3.5-turbo (refused: budget)",
    ]
    skipped = graph_of(
        chat(stub, max_tokens=400), m, on_exhausted="skip", models={"gpt-3.5-turbo": small}
    )
    assert "out" not in skipped.invoke({"text": "write"})  # the node's mode after the ladder


# ------------------------------------------------------------------ priced choice
PRICES = {
    "gpt-4": ModelPrice(input=30, output=60),
    "gpt-4-turbo": ModelPrice(input=10, output=30),
    "gpt-3.5-turbo": ModelPrice(input="0.5", output="1.5"),
}


@pytest.mark.parametrize(
    ("max_cost", "chosen", "reason"),
    [
        # gpt-4 holds up to ~$0.0064 for 100 output tokens: refused by either cap
        ("0.005", "gpt-4-turbo", "model gpt-4-turbo (refused: cost cap)"),
        (
            "0.002",  # gpt-4-turbo would hold ~$0.0031: only gpt-3.5-turbo fits
            "gpt-3.5-turbo",
            "model gpt-3.5-turbo (refused: cost cap; passed over gpt-4-turbo: over the money left)",
        ),
    ],
)
def test_the_cheaper_model_is_the_one_the_remaining_money_affords(
    stub: OpenAIStub, max_cost: str, chosen: str, reason: str
) -> None:
    m = BudgetManager(prices=PRICES)
    m.register_agent(
        "writer",
        max_cost=max_cost,
        degrade=[{"model": "gpt-4-turbo"}, {"model": "gpt-3.5-turbo"}],
    )
    seen = degrades(m)
    models = {name: chat(stub, name, max_tokens=100) for name in ("gpt-4-turbo", "gpt-3.5-turbo")}
    graph_of(chat(stub, max_tokens=100), m, models=models).invoke({"text": "write a line"})
    assert [r["model"] for r in stub.requests] == [chosen]
    assert [e.kind for e in seen] == ["refuse", "degrade"]
    assert seen[1].reason == reason
    assert m.status()["writer"].cost > 0


# ------------------------------------------------------------------ who shapes what
def test_a_create_agent_node_is_shaped_by_its_middleware_alone(stub: OpenAIStub) -> None:
    from langchain.agents import create_agent

    m = BudgetManager()
    m.register_agent("outer", max_tokens=10_000, degrade=[{"wrap_up": "Outer.", "below": 0.9}])
    m.register_agent("writer", max_tokens=10_000, max_output_tokens=30)
    m.charge("outer", (5_000, 0))
    seen = degrades(m)
    agent = create_agent(
        chat(stub),
        tools=[],
        name="writer",
        middleware=[BudgetMiddleware(m, "writer", min_call_tokens=1)],
    )

    def outer(state: S) -> S:
        reply = agent.invoke({"messages": [HumanMessage("go")]})
        return {"out": str(reply["messages"][-1].content)}

    b = StateGraph(S).add_node("outer", outer)
    b.add_edge(START, "outer").add_edge("outer", END)
    govern_graph(b, m).compile().invoke({"text": ""})
    assert [asked_max(r) for r in stub.requests] == [30]  # the middleware's cap
    assert stub.requests[0]["messages"] == [{"role": "user", "content": "go"}]  # no "Outer."
    assert seen == []


def test_budgeted_node_shapes_calls_too() -> None:
    m = BudgetManager()
    m.register_agent("critic", max_tokens=10_000, max_output_tokens=20)
    llm = UsageFakeChat(reply=" ".join(["w"] * 50), max_tokens=40)

    @budgeted_node(m, "critic")
    def critic(state: S) -> S:
        return {"out": str(llm.invoke("judge").content)}

    b = StateGraph(S).add_node("critic", critic)
    b.add_edge(START, "critic").add_edge("critic", END)
    assert b.compile().invoke({"text": ""})["out"] == " ".join(["w"] * 20)  # it asked 40
    assert m.status()["critic"].output_tokens == 20


def test_a_langchain_upgrade_that_moves_the_entry_points_fails_here() -> None:
    """The shaping interposes on BaseChatModel's four public entry points: each must
    still exist with LangChain's signature, and the models we support must not override
    them (a call through an override would not be shaped)."""
    from langchain_anthropic import ChatAnthropic

    m = BudgetManager()
    m.register_agent("writer", max_tokens=100)
    govern_graph(StateGraph(S).add_node("writer", lambda s: s), m)  # installs
    for name in SHAPED_METHODS:
        method = getattr(BaseChatModel, name)
        assert getattr(method, "__tbc_shaped__", False), name
        params = list(inspect.signature(method.__wrapped__).parameters.values())
        assert [p.name for p in params[:3]] == ["self", "input", "config"], name
        assert params[3].name == "stop" and params[3].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[-1].kind is inspect.Parameter.VAR_KEYWORD, name
        for model in (ChatOpenAI, ChatAnthropic, UsageFakeChat):
            owner = next(k for k in model.__mro__ if name in k.__dict__)
            assert owner is BaseChatModel, f"{model.__name__}.{name} is overridden"
    assert set(SHAPED_METHODS) == {"invoke", "ainvoke", "stream", "astream"}
    assert "batch" not in BaseChatModel.__dict__  # batch goes through invoke


def test_degrade_steps_from_a_contract_object() -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=300, degrade=[Degrade(max_tokens=10)])
    llm = UsageFakeChat(reply=" ".join(["w"] * 50), max_tokens=400)

    def writer(state: S) -> S:
        return {"out": str(llm.invoke("go").content)}

    b = StateGraph(S).add_node("writer", writer)
    b.add_edge(START, "writer").add_edge("writer", END)
    assert govern_graph(b, m).compile().invoke({"text": ""})["out"] == " ".join(["w"] * 10)


def test_calls_through_bind_tools_and_batch_are_shaped() -> None:
    from langchain_core.tools import tool

    @tool
    def lookup(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    m = BudgetManager()
    m.register_agent("writer", max_tokens=10_000, max_output_tokens=150)
    with OpenAIStub(reply="ok") as short:  # one output token a call
        bound = chat(short).bind_tools([lookup])

        def writer(state: S) -> S:
            replies = [bound.invoke("weather?")]
            replies += chat(short).batch(["a", "b"], config={"max_concurrency": 1})
            return {"out": " ".join(str(r.content) for r in replies)}

        b = StateGraph(S).add_node("writer", writer)
        b.add_edge(START, "writer").add_edge("writer", END)
        govern_graph(b, m).compile().invoke({"text": ""})
        assert [asked_max(r) for r in short.requests] == [150, 149, 148]  # each asked 200
        assert "tools" in short.requests[0]  # the bound tools go with the shaped call
