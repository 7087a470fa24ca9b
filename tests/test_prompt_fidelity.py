"""Reservations count what the provider bills beside the messages: tools and schemas."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from tbc_integrations import BudgetExceededError, BudgetManager
from tbc_integrations.langchain import BudgetCallbackHandler
from tbc_integrations.testing import AnthropicStub, OpenAIStub
from tbc_integrations.tokens import TokenCounter, openai_function_tokens

pytestmark = pytest.mark.filterwarnings("ignore:tiktoken encoding")


def make_tools(n: int) -> list[Any]:
    out = []
    for i in range(n):

        def run(query: str, limit: int = 5, region: str = "eu") -> str:
            return query

        run.__name__ = f"search_source_{i}"
        run.__doc__ = (
            f"Search source number {i} for documents that match the query, ranked by "
            "relevance, and return the titles and the first paragraph of each."
        )
        out.append(tool(run))
    return out


class Report(BaseModel):
    """A short research report."""

    title: str = Field(description="The report's title")
    findings: list[str] = Field(description="One sentence per finding")
    confidence: float = Field(description="How sure the author is, from 0 to 1")


def openai_chat(stub: OpenAIStub, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model="gpt-4o",
        base_url=stub.base_url,
        api_key="test",  # type: ignore[arg-type]
        max_retries=0,
        **kwargs,
    )


def test_ten_bound_tools_are_reserved_so_a_short_agent_is_refused_before_the_request() -> None:
    m = BudgetManager()
    m.register_agent("a", priority=3, max_tokens=100_000)  # lends nothing to "short"
    m.register_agent("short", priority=1, max_tokens=200)
    handler = BudgetCallbackHandler(m)
    tools = make_tools(10)
    with OpenAIStub() as stub:
        model = openai_chat(stub, max_completion_tokens=20).bind_tools(tools)
        model.invoke("find papers", config={"callbacks": [handler], "metadata": {"tbc_agent": "a"}})
        billed = stub.usages[0]["prompt_tokens"]
        assert billed > 500  # the tool definitions are most of the prompt
        with pytest.raises(BudgetExceededError):
            model.invoke(
                "find papers", config={"callbacks": [handler], "metadata": {"tbc_agent": "short"}}
            )
        assert len(stub.requests) == 1  # the refused call never reached the server
    s = m.status()
    assert s["short"].consumed == 0 and s["short"].overdraft == 0
    assert s["a"].consumed == billed + stub.usages[0]["completion_tokens"]


def test_the_input_estimate_with_tools_and_a_schema_is_within_the_billed_count() -> None:
    reserved: list[int] = []
    m = BudgetManager()
    m.register_agent("a", max_tokens=1_000_000)
    m.subscribe(lambda e: reserved.append(e.input_tokens) if e.kind == "reserve" else None)
    handler = BudgetCallbackHandler(m, agent="a")
    with OpenAIStub() as stub:
        chat = openai_chat(stub, max_completion_tokens=5)
        chat.bind_tools(make_tools(3)).invoke("hello", config={"callbacks": [handler]})
        chat.invoke("no tools here", config={"callbacks": [handler]})
        structured = chat.with_structured_output(Report, method="json_schema")
        with pytest.raises(Exception):  # noqa: B017 - the stub's text is no Report
            structured.invoke("write it", config={"callbacks": [handler]})
        billed = [u["prompt_tokens"] for u in stub.usages]
    assert len(reserved) == len(billed) == 3
    for estimate, real in zip(reserved, billed, strict=True):
        # the stub adds 7 tokens of provider overhead the client cannot see
        assert real - 10 <= estimate <= real, (estimate, real)


def test_anthropic_tools_are_reserved_with_the_tool_system_prompt() -> None:
    from langchain_anthropic import ChatAnthropic

    reserved: list[int] = []
    m = BudgetManager()
    m.register_agent("a", max_tokens=1_000_000)
    m.subscribe(lambda e: reserved.append(e.input_tokens) if e.kind == "reserve" else None)
    handler = BudgetCallbackHandler(m, agent="a")
    with AnthropicStub() as stub:
        chat = ChatAnthropic(  # type: ignore[call-arg]
            model="claude-haiku-4-5",
            base_url=stub.base_url,
            api_key="test",  # type: ignore[arg-type]
            max_tokens=5,
            max_retries=0,
        )
        chat.bind_tools(make_tools(4)).invoke("hello", config={"callbacks": [handler]})
        billed = stub.usages[0]["input_tokens"]
    assert billed > 300
    assert reserved[0] >= billed  # errs high: the documented tool prompt is counted too


def test_openai_tools_follow_the_documented_recipe_and_others_count_their_json() -> None:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    counter = TokenCounter(model="gpt-4o")
    tools = [convert_to_openai_tool(t) for t in make_tools(10)]
    documented = openai_function_tokens(tools, counter)
    assert counter.count_tools(tools, "openai") == documented
    json_count = counter.count_tools(tools, None)  # an unknown provider: the JSON, errs high
    assert documented < json_count < 2 * documented
    assert counter.count_tools(tools, "anthropic") == json_count + 346


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_billed_call_that_raises_is_recorded_not_released(path: str) -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=100_000)
    handler = BudgetCallbackHandler(m, agent="a")
    with OpenAIStub(reply=" ".join(["word"] * 50)) as stub:
        structured = openai_chat(stub, max_completion_tokens=8).with_structured_output(
            Report, method="json_schema"
        )
        with pytest.raises(Exception) as err:
            config: Any = {"callbacks": [handler]}
            if path == "sync":
                structured.invoke("write it", config=config)
            else:
                asyncio.run(structured.ainvoke("write it", config=config))
        assert "length" in type(err.value).__name__.lower() or "length" in str(err.value).lower()
        billed = stub.usages[0]
    s = m.status()["a"]
    assert s.consumed == billed["total_tokens"] and s.reserved == 0


def test_output_past_the_cap_on_a_plain_call_is_an_evented_overdraft_of_the_cap() -> None:
    from tbc_integrations.events import BudgetEvent

    m = BudgetManager()
    m.register_agent("a", max_tokens=100_000, max_output_tokens=50)
    seen: list[BudgetEvent] = []
    m.subscribe(seen.append)
    handler = BudgetCallbackHandler(m, agent="a")
    with OpenAIStub(reply=" ".join(["word"] * 300)) as stub:
        chat = openai_chat(stub, max_completion_tokens=200)
        chat.invoke("write at length", config={"callbacks": [handler]})
        reserve = next(e for e in seen if e.kind == "reserve")
        assert reserve.output_tokens == 50  # the hold was cut to the cap; the request was not
        assert stub.usages[0]["completion_tokens"] == 200
        over = [e for e in seen if e.kind == "overdraft"]
        assert [(e.reason, e.output_tokens) for e in over] == [("output cap", 150)]
        assert m.status()["a"].output_tokens == 200  # recorded in full
        with pytest.raises(BudgetExceededError) as err:
            chat.invoke("more", config={"callbacks": [handler]})
        assert err.value.reason == "output cap"
        assert len(stub.requests) == 1
