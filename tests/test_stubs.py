"""The provider stubs bill like the providers: real LangChain clients read their usage."""

from __future__ import annotations

import json
import warnings
from importlib.metadata import version
from typing import Any

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from pydantic import BaseModel

from tbc_integrations.testing import AnthropicStub, OpenAIStub, prompt_tokens
from tbc_integrations.tokens import TokenCounter, openai_function_tokens

pytest.importorskip("langchain_openai")
pytest.importorskip("langchain_anthropic")

SYSTEM = "You are a careful assistant. " * 20  # a prefix long enough to have been cached


def chat_openai(stub: OpenAIStub, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model="gpt-5-mini",
        base_url=stub.base_url,
        api_key="test-key",  # type: ignore[arg-type]
        stream_usage=True,
        max_retries=0,
        **kwargs,
    )


def chat_anthropic(stub: AnthropicStub, **kwargs: Any) -> Any:
    from langchain_anthropic import ChatAnthropic

    return ChatAnthropic(  # type: ignore[call-arg]
        model="claude-sonnet-4-5",
        base_url=stub.base_url,
        api_key="test",  # type: ignore[arg-type]
        max_retries=0,
        **kwargs,
    )


def joined(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


# --- OpenAI -----------------------------------------------------------------------------


def test_openai_stub_keeps_the_plain_usage_shape_without_cache_or_reasoning() -> None:
    with OpenAIStub() as stub:
        reply = chat_openai(stub, max_completion_tokens=3).invoke("hi")
    assert reply.content == "one two three"
    assert stub.usages == [
        {
            "prompt_tokens": stub.reported[0][0],
            "completion_tokens": 3,
            "total_tokens": stub.reported[0][0] + 3,
        }
    ]
    assert reply.usage_metadata == {
        "input_tokens": stub.reported[0][0],
        "output_tokens": 3,
        "total_tokens": stub.reported[0][0] + 3,
        "input_token_details": {},
        "output_token_details": {},
    }


def test_chat_openai_invoke_reads_cached_and_reasoning_tokens() -> None:
    with OpenAIStub(cached_tokens=128, reasoning_tokens=5) as stub:
        reply = chat_openai(stub).invoke([SystemMessage(SYSTEM), HumanMessage("hello")])
    usage = stub.usages[0]
    prompt, completion = stub.reported[0]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 128}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 5}
    assert completion == 8 + 5  # reasoning counted inside completion_tokens
    assert isinstance(reply, AIMessage)
    assert reply.content == "one two three four five six seven eight"
    assert reply.usage_metadata == {
        "input_tokens": prompt,  # cached tokens are part of it
        "output_tokens": completion,
        "total_tokens": prompt + completion,
        "input_token_details": {"cache_read": 128},
        "output_token_details": {"reasoning": 5},
    }


def test_chat_openai_stream_reads_cached_and_reasoning_tokens() -> None:
    with OpenAIStub(cached_tokens=64, reasoning_tokens=3) as stub:
        chunks = list(chat_openai(stub).stream([SystemMessage(SYSTEM), HumanMessage("hello")]))
    assert stub.requests[0]["stream_options"] == {"include_usage": True}
    prompt, completion = stub.reported[0]
    total = joined(chunks)
    assert total.usage_metadata == {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": prompt + completion,
        "input_token_details": {"cache_read": 64},
        "output_token_details": {"reasoning": 3},
    }
    # the usage arrives once, on the tail chunk that has no choices
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1


def test_openai_reasoning_is_spent_inside_the_completion_limit() -> None:
    with OpenAIStub(reasoning_tokens=4) as stub:
        model = chat_openai(stub, max_completion_tokens=6)
        short = model.invoke("hi")
        starved = model.bind(max_completion_tokens=3).invoke("hi")
    assert short.content == "one two"
    assert stub.usages[0]["completion_tokens"] == 6
    assert stub.usages[0]["completion_tokens_details"] == {"reasoning_tokens": 4}
    assert starved.content == ""  # the limit went to reasoning, as on OpenAI
    assert stub.usages[1]["completion_tokens"] == 3
    assert stub.usages[1]["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_cached_tokens_are_at_most_the_prompt() -> None:
    with OpenAIStub(cached_tokens=10**6) as stub:
        reply = chat_openai(stub).invoke("hi")
    prompt = stub.reported[0][0]
    assert stub.usages[0]["prompt_tokens_details"] == {"cached_tokens": prompt}
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_token_details"] == {"cache_read": prompt}


class Answer(BaseModel):
    text: str


def _json_tokens(value: Any) -> int:
    return TokenCounter(model="gpt-4").count(json.dumps(value, sort_keys=True))


def _before(installed: str, release: tuple[int, ...]) -> bool:
    parts: list[int] = []
    for part in installed.split(".")[:3]:
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts) < release


def test_openai_stub_bills_tools_and_response_format_as_prompt() -> None:
    def lookup(city: str) -> str:
        """Look up the weather of a city."""
        return city

    with OpenAIStub(reply='{"text": "ok"}') as stub:
        model = chat_openai(stub)
        model.invoke("plain")
        model.bind_tools([lookup]).invoke("plain")
        with warnings.catch_warnings():
            if _before(version("langchain-openai"), (1, 1, 11)):
                # langchain-openai < 1.1.11 dumps the parsed Answer through the SDK's model
                # and pydantic warns; 1.1.11 leaves `parsed` out of the dump
                warnings.filterwarnings("ignore", "Pydantic serializer warnings", UserWarning)
            model.with_structured_output(Answer, method="json_schema").invoke("plain")
    plain, with_tools, with_format = stub.requests
    base = prompt_tokens(plain["messages"]) + 7
    assert stub.reported[0][0] == base
    assert "tools" in with_tools and "response_format" in with_format
    documented = openai_function_tokens(with_tools["tools"], TokenCounter(model="gpt-4"))
    assert documented > 20
    assert stub.reported[1][0] == base + documented
    assert stub.reported[2][0] == base + _json_tokens(with_format["response_format"])


# --- Anthropic --------------------------------------------------------------------------


def test_anthropic_stub_base_url_has_no_v1() -> None:
    with AnthropicStub() as stub:
        assert not stub.base_url.endswith("/v1")


def test_chat_anthropic_invoke_sums_cache_into_input_tokens() -> None:
    with AnthropicStub(cache_read_tokens=100, cache_creation_tokens=20) as stub:
        reply = chat_anthropic(stub, max_tokens=5).invoke(
            [SystemMessage(SYSTEM), HumanMessage("hello")]
        )
    usage = stub.usages[0]
    assert stub.requests[0]["system"] == SYSTEM
    prompt = prompt_tokens([{"role": "system", "content": SYSTEM}, *stub.requests[0]["messages"]])
    assert usage == {
        "input_tokens": prompt - 120,  # Anthropic reports the uncached part only
        "cache_creation_input_tokens": 20,
        "cache_read_input_tokens": 100,
        "output_tokens": 5,
    }
    assert reply.content == "one two three four five"
    assert reply.response_metadata["stop_reason"] == "max_tokens"
    # LangChain adds the cache reads and writes back: input_tokens is the whole prompt
    assert reply.usage_metadata == {
        "input_tokens": prompt,
        "output_tokens": 5,
        "total_tokens": prompt + 5,
        "input_token_details": {"cache_read": 100, "cache_creation": 20},
    }


def test_chat_anthropic_stream_reads_usage_from_message_delta() -> None:
    with AnthropicStub(cache_read_tokens=100, cache_creation_tokens=20) as stub:
        chunks = list(
            chat_anthropic(stub, max_tokens=50).stream(
                [SystemMessage(SYSTEM), HumanMessage("hello")]
            )
        )
    usage = stub.usages[0]
    prompt = usage["input_tokens"] + 120
    total = joined(chunks)
    assert total.content == "one two three four five six seven eight"
    assert total.response_metadata["stop_reason"] == "end_turn"
    assert total.usage_metadata == {
        "input_tokens": prompt,
        "output_tokens": 8,
        "total_tokens": prompt + 8,
        "input_token_details": {"cache_read": 100, "cache_creation": 20},
    }
    # one chunk, the message_delta one, carries the usage (message_start's is not used)
    assert [c.usage_metadata is not None for c in chunks].count(True) == 1


async def test_chat_anthropic_astream_and_ainvoke() -> None:
    with AnthropicStub(cache_read_tokens=3) as stub:
        model = chat_anthropic(stub, max_tokens=2)
        reply = await model.ainvoke("hello")
        chunks = [c async for c in model.astream("hello")]
    assert stub.usages[0] == stub.usages[1]
    assert reply.usage_metadata == joined(chunks).usage_metadata
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_token_details"] == {"cache_read": 3, "cache_creation": 0}


def test_anthropic_stub_bills_tools_and_counts_tokens() -> None:
    def lookup(city: str) -> str:
        """Look up the weather of a city."""
        return city

    with AnthropicStub() as stub:
        model = chat_anthropic(stub, max_tokens=4)
        model.invoke("plain")
        model.bind_tools([lookup]).invoke("plain")
        counted = model.get_num_tokens_from_messages([HumanMessage("plain")])
    plain, with_tools = stub.usages
    assert counted == plain["input_tokens"]
    assert with_tools["input_tokens"] == plain["input_tokens"] + _json_tokens(
        stub.requests[1]["tools"]
    )
