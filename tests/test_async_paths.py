"""Async paths over every store: refusals before the call, cut streams, exact settlement,
no blocking store verb on the event loop, fail-open, and the async Redis client."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from langchain_core.messages import HumanMessage
from langchain_core.outputs import ChatResult
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from tbc_integrations import (
    BudgetExceededError,
    BudgetManager,
    StoreUnavailableError,
    Usage,
)
from tbc_integrations._ledger import UNRECORDED
from tbc_integrations.langchain import BudgetCallbackHandler
from tbc_integrations.langgraph import BudgetMiddleware, govern_graph
from tbc_integrations.stores import MemoryStore, Store
from tbc_integrations.stores._redis import RedisStore
from tbc_integrations.testing import UsageFakeChat, prompt_tokens
from tests.conftest import STORE_KINDS, redis_url, store_url

needs_redis = pytest.mark.skipif(
    "redis" not in STORE_KINDS, reason="no redis-server here (CI installs one and runs these)"
)


class AsyncChat(UsageFakeChat):
    """A provider whose async path awaits its latency instead of using a thread."""

    delay: float = 0.005


class Failing(AsyncChat):
    async def _agenerate(self, *args: Any, **kwargs: Any) -> ChatResult:
        self.calls += 1
        raise ConnectionResetError("provider went away")


def manager(kind: str, tmp_path: Path, **agents: int) -> BudgetManager:
    m = BudgetManager(store=store_url(kind, tmp_path))
    for name, tokens in agents.items():
        m.register_agent(name, max_tokens=tokens)
    return m


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------- the LangChain handler
@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_handler_takes_the_async_verbs_only_where_the_store_waits(
    kind: str, tmp_path: Path
) -> None:
    m = manager(kind, tmp_path, a=100)
    handler = BudgetCallbackHandler(m, agent="a")
    assert handler._async_io is (kind != "memory")
    assert handler.run_inline is True and handler.raise_error is True
    # the memory store's handlers keep the plain class: its events are plain lookups
    assert (type(handler) is BudgetCallbackHandler) is (kind == "memory")
    assert isinstance(handler, BudgetCallbackHandler)
    assert type(handler).__name__ == "BudgetCallbackHandler"


class CountingEnds(BudgetCallbackHandler):
    ends = 0

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        CountingEnds.ends += 1
        super().on_llm_end(response, **kwargs)


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_a_subclass_override_is_kept_on_every_path(kind: str, tmp_path: Path) -> None:
    m = manager(kind, tmp_path, a=10_000)
    handler = CountingEnds(m, agent="a", default_max_tokens=20)
    assert isinstance(handler, CountingEnds)
    replies = await asyncio.gather(
        *(AsyncChat().ainvoke(f"q{i}", config={"callbacks": [handler]}) for i in range(5))
    )
    AsyncChat().invoke("sync", config={"callbacks": [handler]})
    assert CountingEnds.ends == 6
    s = m.status()["a"]
    assert s.reserved == 0 and s.consumed > sum(
        r.usage_metadata["total_tokens"] for r in replies if r.usage_metadata
    )
    CountingEnds.ends = 0


@pytest.mark.parametrize("kind", STORE_KINDS)
@pytest.mark.parametrize("path", ["ainvoke", "astream", "abatch"])
async def test_a_refusal_raises_before_the_model_is_called(
    kind: str, path: str, tmp_path: Path
) -> None:
    m = manager(kind, tmp_path, a=10)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=500)
    model = AsyncChat()
    config: Any = {"callbacks": [handler]}
    with pytest.raises(BudgetExceededError) as info:
        if path == "ainvoke":
            await model.ainvoke("hi", config=config)
        elif path == "abatch":
            await model.abatch(["hi", "there"], config=config)
        else:
            async for _ in model.astream("hi", config=config):
                pass
    assert type(info.value) is BudgetExceededError and info.value.agent_name == "a"
    assert model.calls == 0
    s = m.status()["a"]
    assert s.reserved == 0 and s.consumed == 0 and s.refusals >= 1


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_sync_invoke_from_inside_a_coroutine_still_refuses(kind: str, tmp_path: Path) -> None:
    # the sync path on a thread that runs an event loop: LangChain's sync manager
    # would swallow a coroutine's refusal, so the handler must give it the sync method
    m = manager(kind, tmp_path, a=10)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=500)
    model = AsyncChat()
    with pytest.raises(BudgetExceededError):
        model.invoke("hi", config={"callbacks": [handler]})
    with pytest.raises(BudgetExceededError):
        list(model.stream("hi", config={"callbacks": [handler]}))
    assert model.calls == 0 and m.status()["a"].refusals == 2


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_astream_is_cut_at_its_reservation(kind: str, tmp_path: Path) -> None:
    m = BudgetManager(store=store_url(kind, tmp_path))
    m.register_agent("a", max_tokens=1_000, max_output_tokens=3)
    handler = BudgetCallbackHandler(m, agent="a")
    received = []
    with pytest.raises(BudgetExceededError, match="stream cut"):
        async for chunk in AsyncChat(reply="a b c d e f").astream(
            "go", config={"callbacks": [handler]}
        ):
            received.append(chunk.content)
    s = m.status()["a"]
    assert len(received) == 3 and s.reserved == 0
    assert s.output_tokens == 4  # the cut token was generated (and billed) before the cut
    assert s.input_tokens == prompt_tokens([HumanMessage("go")])


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_concurrent_ainvoke_settle_exactly(kind: str, tmp_path: Path) -> None:
    m = manager(kind, tmp_path, a=10**9)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=32)
    model = AsyncChat(reply="one two three four")
    replies = await asyncio.gather(
        *(model.ainvoke(f"question {i}", config={"callbacks": [handler]}) for i in range(300))
    )
    usage = [r.usage_metadata for r in replies]
    s = m.status()["a"]
    assert s.consumed == sum(u["total_tokens"] for u in usage if u)
    assert s.input_tokens == sum(u["input_tokens"] for u in usage if u)
    assert s.reserved == 0 and handler.open_runs == 0


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_a_provider_error_reaches_the_caller_and_releases(kind: str, tmp_path: Path) -> None:
    m = manager(kind, tmp_path, a=1_000)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=100)
    with pytest.raises(ConnectionResetError, match="went away"):
        await Failing().ainvoke("hi", config={"callbacks": [handler]})
    s = m.status()["a"]
    assert s.reserved == 0 and s.consumed == 0 and handler.open_runs == 0


# ------------------------------------------ blocking verbs stay off the event loop
WATCHED = ("reserve", "commit", "release", "check", "record_confidence", "complete", "contracts")


class Watch:
    """Records which of a store's blocking verbs ran on a thread with a running loop."""

    blocking_io = True
    on_loop: list[str]

    def _note(self, verb: str) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.on_loop.append(f"{verb} on {threading.current_thread().name}")

    def reserve(self, *args: Any, **kwargs: Any) -> Any:
        self._note("reserve")
        return super().reserve(*args, **kwargs)  # type: ignore[misc]

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        self._note("commit")
        return super().commit(*args, **kwargs)  # type: ignore[misc]

    def release(self, *args: Any, **kwargs: Any) -> Any:
        self._note("release")
        return super().release(*args, **kwargs)  # type: ignore[misc]

    def check(self, *args: Any, **kwargs: Any) -> Any:
        self._note("check")
        return super().check(*args, **kwargs)  # type: ignore[misc]

    def record_confidence(self, *args: Any, **kwargs: Any) -> Any:
        self._note("record_confidence")
        return super().record_confidence(*args, **kwargs)  # type: ignore[misc]

    def complete(self, *args: Any, **kwargs: Any) -> Any:
        self._note("complete")
        return super().complete(*args, **kwargs)  # type: ignore[misc]

    def contracts(self) -> Any:
        self._note("contracts")
        return super().contracts()  # type: ignore[misc]


class WatchedRedis(Watch, RedisStore):
    pass


class WatchedMemory(Watch, MemoryStore):
    """A memory store that says it blocks, with async verbs that do not call the sync ones."""

    async def areserve(self, *args: Any) -> Any:
        await asyncio.sleep(0)
        return MemoryStore.reserve(self, *args)

    async def acommit(self, *args: Any) -> Any:
        await asyncio.sleep(0)
        return MemoryStore.commit(self, *args)

    async def arelease(self, *args: Any) -> Any:
        await asyncio.sleep(0)
        return MemoryStore.release(self, *args)


WATCHED_KINDS = ["memory", *(["redis"] if "redis" in STORE_KINDS else [])]


@pytest.fixture(params=WATCHED_KINDS)
def watched(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    store: WatchedRedis | WatchedMemory
    if request.param == "redis":
        store = WatchedRedis(store_url("redis", tmp_path), namespace="watched")
    else:
        store = WatchedMemory()
    store.on_loop = []
    yield store
    store.close()


def on_loop(store: Store) -> list[str]:
    return cast(Watch, store).on_loop


async def test_the_handler_keeps_blocking_verbs_off_the_loop(watched: Store) -> None:
    m = BudgetManager(store=watched)
    m.register_agent("a", max_tokens=5_000, min_reserve=5_000)  # lends nothing
    m.register_agent("b", max_tokens=5)
    handler = BudgetCallbackHandler(
        m, default_agent="a", default_max_tokens=20, confidence_fn=lambda _: 0.9
    )
    config: Any = {"callbacks": [handler]}
    on_loop(watched).clear()
    await asyncio.gather(*(AsyncChat().ainvoke(f"q{i}", config=config) for i in range(20)))
    async for _ in AsyncChat(reply="a b c").astream("go", config=config):
        pass
    with pytest.raises(ConnectionResetError):
        await Failing().ainvoke("hi", config=config)
    as_b: Any = {**config, "metadata": {"tbc_agent": "b"}}
    with pytest.raises(BudgetExceededError):  # the refusal, through the async verb
        await AsyncChat().ainvoke("hi", config=as_b)
    # a node name the handler must look up among the agents (a store read, in a thread)
    as_node: Any = {**config, "metadata": {"langgraph_node": "b2"}}
    await AsyncChat().ainvoke("hi", config=as_node)
    assert on_loop(watched) == []
    s = m.status()
    assert s["a"].reserved == 0 and s["b"].refusals == 1 and s["a"].last_confidence == 0.9


def test_the_sync_path_still_uses_the_sync_verbs(watched: Store) -> None:
    m = BudgetManager(store=watched)
    m.register_agent("a", max_tokens=2_000)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=20)
    calls: Counter[str] = Counter()
    original = type(watched).reserve

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["reserve"] += 1
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(watched), "reserve", counting)
        AsyncChat().invoke("hi", config={"callbacks": [handler]})
    assert calls["reserve"] == 1 and m.status()["a"].reserved == 0


class Doc(TypedDict, total=False):
    text: str
    score: float


async def test_async_graph_nodes_keep_blocking_verbs_off_the_loop(watched: Store) -> None:
    m = BudgetManager(store=watched)
    m.register_agent("writer", max_tokens=2_000)
    m.register_agent("critic", max_tokens=2_000)

    async def writer(state: Doc) -> Doc:
        return {"text": str((await AsyncChat(reply="a draft").ainvoke(state["text"])).content)}

    async def critic(state: Doc) -> Doc:
        await AsyncChat(reply="fine").ainvoke(state["text"])
        return {"score": 0.8}

    b = StateGraph(Doc)
    b.add_node("writer", writer)
    b.add_node("critic", critic)
    b.add_edge(START, "writer")
    b.add_edge("writer", "critic")
    b.add_edge("critic", END)
    graph = govern_graph(
        b, m, confidence_key="score", complete="auto", default_max_tokens=16
    ).compile()
    on_loop(watched).clear()
    state = await graph.ainvoke({"text": "write"})
    assert on_loop(watched) == []
    s = m.status()
    assert state["text"] == "a draft" and s["writer"].consumed > 0 and s["critic"].consumed > 0
    assert s["critic"].last_confidence == 0.8 and s["writer"].complete


async def test_govern_on_a_coroutine_keeps_blocking_verbs_off_the_loop(watched: Store) -> None:
    m = BudgetManager(store=watched)
    m.register_agent("a", max_tokens=1_000)

    @m.govern("a", confidence_fn=lambda _: 0.7)
    async def answer(prompt: str) -> str:
        await asyncio.sleep(0)
        return "a short answer"

    on_loop(watched).clear()
    assert await answer("a question") == "a short answer"
    assert on_loop(watched) == []
    s = m.status()["a"]
    assert s.consumed > 0 and s.reserved == 0 and s.last_confidence == 0.7


async def test_the_middleware_keeps_blocking_verbs_off_the_loop(watched: Store) -> None:
    from langchain.agents import create_agent

    m = BudgetManager(store=watched)
    m.register_agent("bob", max_tokens=5_000)
    agent = create_agent(
        AsyncChat(reply="hello from bob"),
        tools=[],
        name="bob",
        middleware=[BudgetMiddleware(m, default_max_tokens=50)],
    )
    on_loop(watched).clear()
    out = await agent.ainvoke({"messages": [HumanMessage("hi")]})
    assert on_loop(watched) == []
    assert m.status()["bob"].consumed == out["messages"][-1].usage_metadata["total_tokens"]


# ------------------------------------------------------------------ fail-open
async def test_fail_open_on_an_unreachable_redis_lets_the_call_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens here
    opened = BudgetManager(store=RedisStore(url, socket_timeout=1.0), fail_open=True)
    handler = BudgetCallbackHandler(opened, agent="a", default_max_tokens=10)
    model = AsyncChat()
    with caplog.at_level(logging.WARNING, logger="tbc_integrations"):
        reply = await model.ainvoke("hi", config={"callbacks": [handler]})
        assert reply.content and model.calls == 1 and handler.open_runs == 0
        assert "FAILING OPEN" in caplog.text and "not recorded" in caplog.text
        r = await opened.areserve("a", 10, 5)
        assert r.id.startswith(UNRECORDED)
        assert await opened.acommit(r, (10, 5)) == 0
        await opened.arelease(await opened.areserve("a", 1))

    closed = BudgetManager(store=RedisStore(url, socket_timeout=1.0))
    handler = BudgetCallbackHandler(closed, agent="a", default_max_tokens=10)
    with pytest.raises(StoreUnavailableError):
        await model.ainvoke("hi", config={"callbacks": [handler]})
    assert model.calls == 1  # refused before the provider


# ------------------------------------------------------- the async Redis client
@needs_redis
async def test_the_async_client_has_the_sync_clients_timeouts(tmp_path: Path) -> None:
    store = RedisStore(store_url("redis", tmp_path), socket_timeout=2.5)
    m = BudgetManager(store=store)
    m.register_agent("a", max_tokens=100)
    await m.acommit(await m.areserve("a", 5, 5), (5, 1))
    pool = store._aclients[asyncio.get_running_loop()].client.connection_pool
    # connecting, and waiting for a pooled connection, time out as the sync client does;
    # each write and each batch of replies runs under a deadline of socket_timeout
    # (test_a_server_that_never_answers_times_out) instead of a timer per socket read
    assert pool.connection_kwargs["socket_connect_timeout"] == 2.5 and pool.timeout == 2.5
    sync = store.client.connection_pool.connection_kwargs
    assert sync["socket_timeout"] == 2.5 and sync["socket_connect_timeout"] == 2.5
    await store.aclose()


async def test_a_server_that_never_answers_times_out() -> None:
    with socket.socket() as server:  # accepts connections, never replies
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
        m = BudgetManager(store=RedisStore(url, socket_timeout=0.3))
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await m.areserve("a", 1, 1)
        assert time.monotonic() - started < 3
        opened = BudgetManager(store=RedisStore(url, socket_timeout=0.3), fail_open=True)
        assert (await opened.areserve("a", 1, 1)).id.startswith(UNRECORDED)


def connected(store: RedisStore, loop: asyncio.AbstractEventLoop) -> int:
    pool = store._aclients[loop].client.connection_pool
    return sum(c.is_connected for c in (*pool._available_connections, *pool._in_use_connections))


def clients_on_server(name: str) -> int:
    with redis.Redis.from_url(redis_url()) as admin:
        return sum(c.get("name") == name for c in admin.client_list())


@needs_redis
def test_close_closes_the_async_clients_of_every_loop(tmp_path: Path) -> None:
    url = store_url("redis", tmp_path) + "?client_name=tbc-close-test"
    store = RedisStore(url)
    m = BudgetManager(store=store)
    m.register_agent("a", max_tokens=10_000)

    async def one() -> None:
        await m.acommit(await m.areserve("a", 1, 1))

    async def spend() -> None:
        await asyncio.gather(*(one() for _ in range(5)))

    kept = asyncio.new_event_loop()  # a loop still open: its client is closed on it
    try:
        kept.run_until_complete(spend())
        assert connected(store, kept) >= 1
        asyncio.run(spend())  # a loop asyncio.run has already closed
        assert len(store._aclients) >= 1
        before = clients_on_server("tbc-close-test")
        link = store._aclients[kept]
        store.close()
        assert not store._aclients and not any(
            c.is_connected for c in link.client.connection_pool._available_connections
        )
        assert clients_on_server("tbc-close-test") < before
    finally:
        kept.close()
    store.close()  # twice is fine


@needs_redis
async def test_close_from_inside_the_loop_and_aclose(tmp_path: Path) -> None:
    store = RedisStore(store_url("redis", tmp_path))
    m = BudgetManager(store=store)
    m.register_agent("a", max_tokens=100)
    await m.acommit(await m.areserve("a", 1, 1))
    loop = asyncio.get_running_loop()
    pool = store._aclients[loop].client.connection_pool
    store.close()  # from code running on the loop: finished in a task
    for _ in range(50):
        if not any(c.is_connected for c in pool._available_connections):
            break
        await asyncio.sleep(0.01)
    assert not any(c.is_connected for c in pool._available_connections)
    await m.acommit(await m.areserve("a", 1, 1))  # a new client for this loop
    await store.aclose()
    assert not store._aclients and m.status()["a"].consumed == 4


# ------------------------------------------------ pipelined round trips on Redis
@needs_redis
async def test_concurrent_verbs_share_round_trips_and_end_with_exact_totals(
    tmp_path: Path,
) -> None:
    m = BudgetManager(store=store_url("redis", tmp_path))
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        m.register_agent(name, priority=1 + i, max_tokens=20_000)
    committed: Counter[str] = Counter()
    refused = Counter[str]()

    async def task(seed: int) -> None:
        local = random.Random(seed)
        for _ in range(40):
            agent = local.choice(names)
            try:
                async with m.aspend(agent, local.randint(0, 300), local.randint(0, 500)) as call:
                    await asyncio.sleep(0)
                    if local.random() < 0.1:
                        raise RuntimeError("provider error")
                    used = local.randint(0, call.reservation.amount)
                    call.set_usage(Usage(used, 0))
                committed[agent] += used
            except BudgetExceededError:
                refused[agent] += 1
            except RuntimeError:
                pass

    await asyncio.gather(*(task(seed) for seed in range(64)))
    s = m.status()
    assert sum(refused.values()) > 0 and sum(committed.values()) > 0
    assert {n: s[n].consumed for n in names} == {n: committed[n] for n in names}
    assert all(s[n].reserved == 0 and s[n].remaining >= 0 for n in names)
    assert sum(s[n].refusals for n in names) == sum(refused.values())


@needs_redis
@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
async def test_a_batch_loads_the_script_again_when_the_server_forgets_it(
    tmp_path: Path, functions: bool
) -> None:
    url = store_url("redis", tmp_path)
    store = RedisStore(url, namespace="forget-batch", functions=functions)
    m = BudgetManager(store=store)
    m.register_agent("a", max_tokens=10_000)
    await m.areserve("a", 1, 0)  # the loop's client exists
    with redis.Redis.from_url(url) as admin:
        admin.function_flush()
        admin.script_flush()
    held = await asyncio.gather(*(m.areserve("a", 1, 1) for _ in range(300)))
    await asyncio.gather(*(m.acommit(r, (1, 0)) for r in held))
    s = m.status()["a"]
    assert s.consumed == 300 and s.reserved == 1 and store.functions is functions
    await store.aclose()


@needs_redis
async def test_a_store_on_the_callers_client_runs_its_async_verbs_in_a_thread(
    tmp_path: Path,
) -> None:
    client = redis.Redis.from_url(store_url("redis", tmp_path))
    store = RedisStore(client=client, namespace="own-client")
    m = BudgetManager(store=store)
    m.register_agent("a", max_tokens=1_000)
    handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=10)
    replies = await asyncio.gather(
        *(AsyncChat().ainvoke(f"q{i}", config={"callbacks": [handler]}) for i in range(10))
    )
    total = sum(r.usage_metadata["total_tokens"] for r in replies if r.usage_metadata)
    assert m.status()["a"].consumed == total and not store._aclients
    client.close()


@needs_redis
async def test_cancelled_callers_leave_the_others_exact_and_leak_only_until_their_lease(
    tmp_path: Path,
) -> None:
    from tests.conftest import FakeClock

    clock = FakeClock()
    m = BudgetManager(store=store_url("redis", tmp_path), clock=clock, lease_seconds=10)
    m.register_agent("a", max_tokens=10**9)
    attempted = confirmed = 0

    async def call(i: int) -> None:
        nonlocal attempted, confirmed
        async with m.aspend("a", 10, 10) as spend:
            await asyncio.sleep(0.001 * (i % 7))
            spend.set_usage((5, i % 3))
            attempted += 5 + i % 3  # the commit leaves as the block ends
        confirmed += 5 + i % 3

    tasks = [asyncio.create_task(call(i)) for i in range(600)]
    for step in range(6):  # cancel some while they wait for Redis, some while they hold
        await asyncio.sleep(0.0015 * step)
        for task in tasks[step::9]:
            task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert 0 < cancelled < 600
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
    # a commit cancelled on its way may or may not have reached Redis; nothing else varies
    assert confirmed <= m.status()["a"].consumed <= attempted
    consumed = m.status()["a"].consumed
    clock.advance(11)  # a reserve applied for a caller cancelled meanwhile: its lease ends
    m.expire()
    s = m.status()["a"]
    assert s.reserved == 0 and s.consumed == consumed
