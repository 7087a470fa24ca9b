"""The LangChain handler on real runnables, fake providers and the real ChatOpenAI client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda

from tbc_integrations import (
    BudgetExceededError,
    BudgetManager,
    ConfidenceGateError,
    ContractError,
    InvalidTokenCountError,
    InvalidValueError,
    UnknownAgentError,
)
from tbc_integrations.events import BudgetEvent, Committed
from tbc_integrations.langchain import (
    FORGET_RUNS_AFTER_SECONDS,
    BudgetCallbackHandler,
    budget_scope,
    logprob_confidence,
)
from tbc_integrations.testing import OpenAIStub, UsageFakeChat, prompt_tokens
from tests.conftest import FakeClock, RecordingEncoding


def team(**budgets: int) -> BudgetManager:
    m = BudgetManager()
    for name, tokens in budgets.items():
        m.register_agent(name, max_tokens=tokens)
    return m


def consumed(m: BudgetManager, agent: str) -> tuple[int, int]:
    s = m.status()[agent]
    return s.input_tokens, s.output_tokens


# ------------------------------------------------------------------ attribution
@pytest.mark.parametrize(
    ("handler_kwargs", "config", "expected"),
    [
        ({"agent": "explicit"}, {"metadata": {"tbc_agent": "meta"}}, "explicit"),
        ({}, {"metadata": {"tbc_agent": "meta", "lc_agent_name": "lc"}}, "meta"),
        ({}, {"metadata": {"lc_agent_name": "lc", "langgraph_node": "node"}}, "lc"),
        ({}, {"metadata": {"langgraph_node": "node"}}, "node"),
        (
            {"default_agent": "fallback"},
            {"metadata": {"langgraph_node": "unregistered"}},
            "fallback",
        ),
        ({"default_agent": "fallback"}, {}, "fallback"),
    ],
)
def test_attribution_follows_the_documented_order(
    handler_kwargs: dict[str, Any], config: dict[str, Any], expected: str
) -> None:
    m = team(explicit=500, meta=500, lc=500, node=500, fallback=500)
    handler = BudgetCallbackHandler(m, default_max_tokens=20, **handler_kwargs)
    model = UsageFakeChat()
    reply = model.invoke("hello", config=cast(RunnableConfig, {**config, "callbacks": [handler]}))
    usage = reply.usage_metadata
    assert usage is not None
    assert consumed(m, expected) == (usage["input_tokens"], usage["output_tokens"])
    others = [name for name in m.contracts if name != expected]
    assert all(m.status()[name].consumed == 0 for name in others)


def test_no_agent_is_a_clear_error_and_no_call() -> None:
    m = team(a=100)
    model = UsageFakeChat()
    with pytest.raises(UnknownAgentError, match="pass agent= or default_agent="):
        model.invoke("hi", config={"callbacks": [BudgetCallbackHandler(m)]})
    assert model.calls == 0


def test_with_config_binds_an_agent_to_a_model() -> None:
    m = team(writer=500, critic=500)
    handler = BudgetCallbackHandler(m, default_max_tokens=10)
    writer = UsageFakeChat().with_config(metadata={"tbc_agent": "writer"})
    critic = UsageFakeChat().with_config(metadata={"tbc_agent": "critic"})
    chain: Runnable[Any, Any] = RunnableLambda(lambda x: writer.invoke(x).content) | RunnableLambda(
        lambda x: critic.invoke(x).content
    )
    chain.invoke("draft", config={"callbacks": [handler]})
    assert m.status()["writer"].consumed > 0 and m.status()["critic"].consumed > 0


# ------------------------------------------------------------- real usage
def test_prompt_model_parser_settles_provider_usage_token_for_token() -> None:
    m = team(writer=1_000)
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    handler = BudgetCallbackHandler(m, agent="writer")
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("user", "{q}")])
    model = UsageFakeChat(max_tokens=3)
    chain = prompt | model | StrOutputParser()
    assert (
        chain.invoke({"q": "Why budgets?"}, config={"callbacks": [handler]}) == "alpha beta gamma"
    )
    expected_in = prompt_tokens(prompt.invoke({"q": "Why budgets?"}).to_messages())
    assert consumed(m, "writer") == (expected_in, 3)
    reserved = next(e for e in events if e.kind == "reserve")
    assert reserved.input_tokens == expected_in  # the estimate used the real encoding
    assert reserved.output_tokens == 3  # ls_max_tokens
    committed = next(e for e in events if isinstance(e, Committed))
    assert committed.estimated is False
    assert m.status()["writer"].reserved == 0 and handler.open_runs == 0


def test_reservation_uses_request_max_tokens_then_default_and_clamps_to_output_cap() -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=1_000, max_output_tokens=50)
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=40)
    model = UsageFakeChat()
    model.invoke("x", config={"callbacks": [handler]}, max_tokens=7)
    model.invoke("x", config={"callbacks": [handler]})
    UsageFakeChat(max_tokens=500).invoke("x", config={"callbacks": [handler]})
    outs = [e.output_tokens for e in events if e.kind == "reserve"]
    assert outs == [7, 40, 50 - 4 - 4]  # the output cap left after two 4-token replies


def test_no_usage_reported_settles_the_estimate_marked_estimated() -> None:
    m = team(a=1_000)
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=100)
    model = UsageFakeChat(report_usage=False)
    model.invoke("count me", config={"callbacks": [handler]})
    committed = next(e for e in events if isinstance(e, Committed))
    assert committed.estimated is True
    assert consumed(m, "a") == (prompt_tokens([HumanMessage("count me")]), 4)


def test_malformed_provider_usage_settles_the_estimate(caplog: pytest.LogCaptureFixture) -> None:
    m = team(a=1_000)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=100)
    from langchain_core.outputs import ChatGeneration, LLMResult

    bad = AIMessage(
        "x y", usage_metadata={"input_tokens": -5, "output_tokens": 2, "total_tokens": -3}
    )
    from uuid import uuid4

    run_id = uuid4()
    handler.on_chat_model_start({}, [[]], run_id=run_id)
    handler.on_llm_end(LLMResult(generations=[[ChatGeneration(message=bad)]]), run_id=run_id)
    assert "Agent 'a': malformed provider usage" in caplog.text and "-5" in caplog.text
    s = m.status()["a"]
    assert s.reserved == 0 and s.consumed == prompt_tokens([]) + 2


# --------------------------------------------------------------- refusals
REFUSED_PATHS = ["invoke", "batch", "stream", "ainvoke", "abatch", "astream"]


@pytest.mark.parametrize("path", REFUSED_PATHS)
def test_refusal_stops_the_call_before_the_provider_on_every_path(path: str) -> None:
    m = team(a=10)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=500)
    model = UsageFakeChat()
    config: Any = {"callbacks": [handler]}

    async def run_async() -> None:
        if path == "ainvoke":
            await model.ainvoke("hi", config=config)
        elif path == "abatch":
            await model.abatch(["hi", "there"], config=config)
        else:
            async for _ in model.astream("hi", config=config):
                pass

    with pytest.raises(BudgetExceededError) as info:
        if path == "invoke":
            model.invoke("hi", config=config)
        elif path == "batch":
            model.batch(["hi", "there"], config=config)
        elif path == "stream":
            list(model.stream("hi", config=config))
        else:
            asyncio.run(run_async())
    assert type(info.value) is BudgetExceededError
    assert info.value.agent_name == "a"
    assert model.calls == 0
    s = m.status()["a"]
    assert s.reserved == 0 and s.consumed == 0 and s.refusals >= 1


def test_degrading_to_a_cheaper_model_with_fallbacks() -> None:
    m = team(writer=300)
    handler = BudgetCallbackHandler(m, agent="writer")
    big = UsageFakeChat(reply="long " * 50, max_tokens=2_000, model="big")
    small = UsageFakeChat(reply="short answer", max_tokens=100, model="small")
    robust = big.with_fallbacks([small], exceptions_to_handle=(BudgetExceededError,))
    reply = robust.invoke("summarise", config={"callbacks": [handler]})
    assert reply.content == "short answer"
    assert (big.calls, small.calls) == (0, 1)
    assert m.status()["writer"].refusals == 1 and m.status()["writer"].consumed > 0


# ----------------------------------------------------------------- streams
def test_stream_reports_usage_on_the_last_chunk_and_is_settled() -> None:
    m = team(a=1_000)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=10)
    chunks = list(UsageFakeChat().stream("go", config={"callbacks": [handler]}))
    usage = next(c.usage_metadata for c in chunks if c.usage_metadata)
    assert consumed(m, "a") == (usage["input_tokens"], usage["output_tokens"])


def test_stream_is_cut_at_the_output_reservation_and_what_streamed_is_settled() -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=1_000, max_output_tokens=5)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=200)
    model = UsageFakeChat(reply=" ".join(["w"] * 40))
    received: list[str] = []
    with pytest.raises(BudgetExceededError, match="stream cut"):
        for chunk in model.stream("go", config={"callbacks": [handler]}):
            received.append(str(chunk.content))
    assert len(received) == 5  # the caller keeps what it already received
    s = m.status()["a"]
    assert s.reserved == 0
    assert s.output_tokens == 6  # the sixth token was generated (and billed) before the cut
    assert s.input_tokens == prompt_tokens([HumanMessage("go")])


async def test_astream_is_cut_too() -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=1_000, max_output_tokens=3)
    handler = BudgetCallbackHandler(m, agent="a")
    received = []
    with pytest.raises(BudgetExceededError):
        async for chunk in UsageFakeChat(reply="a b c d e f").astream(
            "go", config={"callbacks": [handler]}
        ):
            received.append(chunk.content)
    assert len(received) == 3 and m.status()["a"].reserved == 0


def test_an_abandoned_stream_settles_what_it_streamed() -> None:
    m = team(a=1_000)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=100)
    stream = cast(
        Generator[Any, None, None],
        UsageFakeChat(reply="a b c d e f g").stream("go", config={"callbacks": [handler]}),
    )
    next(stream)
    next(stream)
    stream.close()  # the caller walks away
    s = m.status()["a"]
    assert s.reserved == 0 and s.output_tokens == 2


def test_provider_error_releases_everything() -> None:
    class Broken(UsageFakeChat):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("provider down")

    m = team(a=1_000)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=100)
    with pytest.raises(ConnectionError):
        Broken().invoke("hi", config={"callbacks": [handler]})
    s = m.status()["a"]
    assert (s.reserved, s.consumed) == (0, 0)


def test_a_later_handler_raising_at_start_is_covered_by_the_lease(clock: FakeClock) -> None:
    class Veto(BaseCallbackHandler):
        raise_error = True

        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("policy says no")

    m = BudgetManager(clock=clock)
    m.register_agent("a", max_tokens=1_000)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=100, lease_seconds=30)
    with pytest.raises(PermissionError):
        UsageFakeChat().invoke("hi", config={"callbacks": [handler, Veto()]})
    assert m.status()["a"].reserved > 0  # LangChain sends no end or error event now
    clock.advance(31)
    assert m.status()["a"].reserved == 0 and m.remaining("a") == 1_000


def test_a_call_that_outlives_its_lease_is_still_settled_in_full(clock: FakeClock) -> None:
    class Slow(UsageFakeChat):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            clock.advance(60)  # the provider takes longer than the lease
            return super()._generate(*args, **kwargs)

    m = BudgetManager(clock=clock)
    m.register_agent("a", max_tokens=1_000)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=100, lease_seconds=30)
    reply = Slow().invoke("hi", config={"callbacks": [handler]})
    assert reply.usage_metadata is not None
    s = m.status()["a"]
    assert s.consumed == reply.usage_metadata["total_tokens"] and s.reserved == 0
    assert handler.open_runs == 0


def test_calls_that_never_end_are_forgotten_once_no_late_commit_can_count(
    clock: FakeClock,
) -> None:
    class Veto(BaseCallbackHandler):
        raise_error = True

        def on_chat_model_start(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("policy says no")

    m = BudgetManager(clock=clock)
    m.register_agent("a", max_tokens=10**9)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=10, lease_seconds=30)
    model = UsageFakeChat()

    def vetoed(calls: int) -> None:
        for _ in range(calls):
            with pytest.raises(PermissionError):
                model.invoke("hi", config={"callbacks": [handler, Veto()]})

    vetoed(1_100)
    assert handler.open_runs == 1_100  # their ends may still come, late: kept
    clock.advance(30 + FORGET_RUNS_AFTER_SECONDS + 1)
    vetoed(951)  # the open runs grow past twice what the last look left
    assert handler.open_runs == 951  # the old ones are gone, the recent ones kept
    held = prompt_tokens([HumanMessage("hi")]) + 10
    assert m.status()["a"].reserved == 951 * held  # the old leases gave their tokens back


# -------------------------------------------------------------- confidence
def test_logprob_confidence_feeds_the_gate() -> None:
    class Confident(UsageFakeChat):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            result = super()._generate(*args, **kwargs)
            logprobs = {"content": [{"token": "a", "logprob": -0.01}]}
            result.generations[0].message.response_metadata["logprobs"] = logprobs
            return result

    m = BudgetManager()
    m.register_agent("r", max_tokens=1_000, confidence_threshold=0.9)
    handler = BudgetCallbackHandler(
        m, agent="r", default_max_tokens=50, confidence_fn=logprob_confidence
    )
    model = Confident()
    model.invoke("q", config={"callbacks": [handler]})
    assert m.status()["r"].last_confidence == pytest.approx(0.990, abs=1e-3)
    with pytest.raises(ConfidenceGateError):
        model.invoke("q again", config={"callbacks": [handler]})
    assert model.calls == 1
    assert logprob_confidence(AIMessage("no logprobs")) is None


# ------------------------------------------------------------- scope, reuse
def test_budget_scope_reaches_calls_without_any_wiring_and_ends_with_the_block() -> None:
    m = team(a=1_000)
    model = UsageFakeChat()
    with budget_scope(m, agent="a", default_max_tokens=10) as handler:
        model.batch(["one", "two", "three"])  # runs on worker threads
        assert isinstance(handler, BudgetCallbackHandler)
    first = m.status()["a"].consumed
    assert first > 0
    model.invoke("outside the scope")
    assert m.status()["a"].consumed == first


def test_a_handler_made_for_each_call_does_not_count_the_history_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """budget_scope and BudgetMiddleware make a handler for each model call: an agent's
    system prompt and history are tokenized once, not again on every turn."""
    from tbc_integrations import testing, tokens

    testing._COUNTER.count("the fake provider counts with an encoding of its own")
    encoding, used = tokens._load_encoding("cl100k_base", 10.0)
    spy = RecordingEncoding(encoding)
    monkeypatch.setitem(tokens._cache, "cl100k_base", (spy, used))
    m = team(a=100_000)
    model = UsageFakeChat(model="gpt-4-history-test")  # a counter no other test made
    system = "You are a careful assistant. " * 40
    history: list[BaseMessage] = [
        SystemMessage(system),
        HumanMessage("first question"),
        AIMessage("answer"),
    ]
    for turn in range(3):
        history.append(HumanMessage(f"question {turn}"))
        with budget_scope(m, agent="a", default_max_tokens=10):
            model.invoke(history)
    assert spy.texts.count(system) == 1
    assert spy.texts.count("first question") == 1


def test_two_handlers_on_one_ledger_never_reserve_one_call_twice() -> None:
    m = team(a=1_000)
    explicit = BudgetCallbackHandler(m, agent="a", default_max_tokens=10)
    with budget_scope(m, agent="a", default_max_tokens=10):
        reply = UsageFakeChat().invoke("hi", config={"callbacks": [explicit]})
    usage = reply.usage_metadata
    assert usage is not None
    assert m.status()["a"].consumed == usage["total_tokens"]


def test_two_handlers_on_one_ledger_count_a_stream_once() -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=1_000, max_output_tokens=5)
    first = BudgetCallbackHandler(m, agent="a", default_max_tokens=200)
    second = BudgetCallbackHandler(m, agent="a", default_max_tokens=200)
    received: list[str] = []
    with pytest.raises(BudgetExceededError, match="stream cut"):
        for chunk in UsageFakeChat(reply=" ".join(["w"] * 40)).stream(
            "go", config={"callbacks": [first, second]}
        ):
            received.append(str(chunk.content))
    assert len(received) == 5  # cut at the reservation, not at half of it
    s = m.status()["a"]
    assert s.reserved == 0 and s.output_tokens == 6


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    words=st.integers(1, 30),
    cap=st.one_of(st.none(), st.integers(1, 25)),
    report_usage=st.booleans(),
    handlers=st.integers(1, 3),
    asynchronous=st.booleans(),
)
def test_any_stream_is_cut_at_its_reservation_and_settled_once(
    words: int, cap: int | None, report_usage: bool, handlers: int, asynchronous: bool
) -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=100_000, max_output_tokens=cap)
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    hs = [BudgetCallbackHandler(m, agent="a", default_max_tokens=20) for _ in range(handlers)]
    model = UsageFakeChat(reply=" ".join(["w"] * words), report_usage=report_usage)
    config: RunnableConfig = {"callbacks": list(hs)}
    received: list[Any] = []

    async def astream() -> None:
        async for chunk in model.astream("go", config=config):
            received.append(chunk)

    cut = False
    try:
        if asynchronous:
            asyncio.run(astream())
        else:
            received.extend(model.stream("go", config=config))
    except BudgetExceededError:
        cut = True
    held_for_output = 20 if cap is None else min(20, cap)
    text = [c for c in received if c.content]
    s = m.status()["a"]
    assert s.reserved == 0 and all(h.open_runs == 0 for h in hs)
    assert len([e for e in events if isinstance(e, Committed)]) == 1  # settled once
    assert s.input_tokens == prompt_tokens([HumanMessage("go")])
    if words > held_for_output:  # cut once past the reservation; the caller keeps its text
        assert cut and len(text) == held_for_output
        assert s.output_tokens == held_for_output + 1  # the cut token was generated
    else:
        assert not cut and len(text) == words
        usage = next((c.usage_metadata for c in received if c.usage_metadata), None)
        if report_usage:
            assert usage is not None and s.output_tokens == usage["output_tokens"]
        else:
            assert usage is None and s.output_tokens == words  # the estimate of what streamed


# ----------------------------------------------------------------- threads
def test_eight_threads_on_one_handler_never_overspend() -> None:
    m = team(shared=2_000)
    handler = BudgetCallbackHandler(m, agent="shared", default_max_tokens=20)
    model = UsageFakeChat(reply=" ".join(["w"] * 15), delay=0.001)
    done: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(25):
            try:
                reply = model.invoke("the same short prompt", config={"callbacks": [handler]})
            except BudgetExceededError:
                with lock:
                    refused.append(1)
                continue
            usage = reply.usage_metadata
            assert usage is not None
            with lock:
                done.append(usage["total_tokens"])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = m.status()["shared"]
    assert refused and done
    assert s.consumed == sum(done) <= 2_000
    assert s.reserved == 0 and s.remaining >= 0


async def test_async_gather_settles_every_call() -> None:
    m = team(a=100_000)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=10)
    model = UsageFakeChat()
    replies = await asyncio.gather(
        *(model.ainvoke(f"q{i}", config={"callbacks": [handler]}) for i in range(50))
    )
    total = sum(r.usage_metadata["total_tokens"] for r in replies if r.usage_metadata)
    assert m.status()["a"].consumed == total and handler.open_runs == 0


# ------------------------------------------------ the real ChatOpenAI client
pytestmark_openai = pytest.mark.filterwarnings("ignore:tiktoken encoding 'o200k_base'")


@pytestmark_openai
def test_chat_openai_over_http_ledger_equals_server_usage() -> None:
    from langchain_openai import ChatOpenAI

    m = team(a=5_000, b=5_000)
    handler = BudgetCallbackHandler(m)
    with OpenAIStub() as stub:
        model = ChatOpenAI(
            model="gpt-4o-mini",
            base_url=stub.base_url,
            api_key="test-key",  # type: ignore[arg-type]
            max_completion_tokens=6,
            stream_usage=True,
            max_retries=0,
        )
        model.invoke("first", config={"callbacks": [handler], "metadata": {"tbc_agent": "a"}})
        chunks = list(
            model.stream("second", config={"callbacks": [handler], "metadata": {"tbc_agent": "b"}})
        )
        assert "".join(str(c.content) for c in chunks) == "one two three four five six"
        assert stub.requests[1]["stream_options"] == {"include_usage": True}
        assert consumed(m, "a") == stub.reported[0]
        assert consumed(m, "b") == stub.reported[1]


@pytestmark_openai
def test_chat_openai_refused_call_sends_no_request() -> None:
    from langchain_openai import ChatOpenAI

    m = team(a=50)
    handler = BudgetCallbackHandler(m, agent="a")
    with OpenAIStub() as stub:
        model = ChatOpenAI(
            model="gpt-4o-mini",
            base_url=stub.base_url,
            api_key="test-key",  # type: ignore[arg-type]
            max_completion_tokens=400,
            max_retries=0,
        )
        with pytest.raises(BudgetExceededError):
            model.invoke("too big", config={"callbacks": [handler]})
        with pytest.raises(BudgetExceededError):
            asyncio.run(model.ainvoke("too big", config={"callbacks": [handler]}))
        assert stub.requests == []
        cheap = model.bind(max_tokens=5)
        cheap.invoke("small", config={"callbacks": [handler]})
        assert len(stub.requests) == 1 and consumed(m, "a") == stub.reported[0]


@pytestmark_openai
async def test_chat_openai_astream_cut_at_output_budget() -> None:
    from langchain_openai import ChatOpenAI

    m = BudgetManager()
    m.register_agent("a", max_tokens=1_000, max_output_tokens=3)
    handler = BudgetCallbackHandler(m, agent="a")
    with OpenAIStub() as stub:
        model = ChatOpenAI(
            model="gpt-4o-mini",
            base_url=stub.base_url,
            api_key="test-key",  # type: ignore[arg-type]
            max_completion_tokens=8,
            stream_usage=True,
            max_retries=0,
        )
        got = []
        with pytest.raises(BudgetExceededError):
            async for chunk in model.astream("go", config={"callbacks": [handler]}):
                got.append(chunk.content)
        assert got == ["one", " two", " three"]
        s = m.status()["a"]
        assert s.reserved == 0 and s.output_tokens == 4


def test_refusals_are_not_logged_as_callback_errors_but_other_errors_are(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = team(a=10)
    with pytest.raises(BudgetExceededError):
        UsageFakeChat().invoke("hi", config={"callbacks": [BudgetCallbackHandler(m, agent="a")]})
    assert "Error in BudgetCallbackHandler" not in caplog.text
    with pytest.raises(UnknownAgentError):
        UsageFakeChat().invoke("hi", config={"callbacks": [BudgetCallbackHandler(m, agent="x")]})
    assert "Error in BudgetCallbackHandler.on_chat_model_start" in caplog.text


def test_a_node_without_contract_costs_no_store_lookup_per_call() -> None:
    class CountingManager(BudgetManager):
        lookups = 0

        @property
        def contracts(self) -> Any:
            type(self).lookups += 1
            return super().contracts

    m = CountingManager()
    m.register_agent("fallback", max_tokens=10_000)
    handler = BudgetCallbackHandler(m, default_agent="fallback", default_max_tokens=10)
    model = UsageFakeChat()
    for _ in range(20):
        model.invoke("hi", config={"callbacks": [handler], "metadata": {"langgraph_node": "tools"}})
    assert CountingManager.lookups == 1
    assert m.status()["fallback"].consumed > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "said"),
    [
        ({"default_max_tokens": -1}, InvalidTokenCountError, "default_max_tokens.*-1"),
        ({"default_max_tokens": "a"}, InvalidTokenCountError, "default_max_tokens.*'a'"),
        ({"lease_seconds": -1}, InvalidValueError, "lease_seconds.*-1"),
        ({"default_agent": ""}, ContractError, "agent name.*''"),
    ],
)
def test_a_handler_with_a_bad_option_is_refused_when_made(
    kwargs: dict[str, Any], error: type[Exception], said: str
) -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=100)
    with pytest.raises(error, match=said):
        BudgetCallbackHandler(m, "writer", **kwargs)
    with pytest.raises(error, match=said), budget_scope(m, agent="writer", **kwargs):
        pass


def test_a_handler_needs_a_manager() -> None:
    with pytest.raises(ContractError, match=r"needs a BudgetManager.*'m'"):
        BudgetCallbackHandler("m")  # type: ignore[arg-type]
    with pytest.raises(ContractError, match="needs a BudgetManager"), budget_scope("m"):  # type: ignore[arg-type]
        pass
