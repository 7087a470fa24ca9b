"""Money: cost caps in US dollars, priced by kind from a table or genai-prices, on every store."""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price

from tbc_integrations import (
    BudgetContract,
    BudgetExceededError,
    BudgetManager,
    ContractError,
    CostLimitError,
    InvalidValueError,
    ModelPrice,
    PriceNotFoundError,
    PriceTable,
    Usage,
)
from tbc_integrations.events import BudgetEvent
from tbc_integrations.langchain import BudgetCallbackHandler
from tbc_integrations.testing import AnthropicStub, OpenAIStub

from .conftest import STORE_KINDS, FakeClock, store_url

MINI = ModelPrice(input="0.15", output="0.60", cache_read="0.075")
BIG = ModelPrice(input="2.50", output="10", cache_read="1.25")
PRICES = {"mini": MINI, "big": BIG}


# ------------------------------------------------------------------ contracts
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("0.50", Decimal("0.50")),
        (2, Decimal("2.00")),
        (Decimal("1.234567891"), Decimal("1.234567891")),
        (0.1, Decimal("0.10")),  # a float through its decimal text, not 0.1000000000000000055
    ],
)
def test_max_cost_accepts_str_int_decimal_and_float(given: Any, expected: Decimal) -> None:
    assert BudgetContract("a", max_cost=given).max_cost == expected


@pytest.mark.parametrize(
    "bad", ["-1", -0.5, float("nan"), float("inf"), "NaN", "lots", True, "0.0000000001", [1]]
)
def test_bad_max_cost_is_refused_naming_the_agent_and_the_value(bad: Any) -> None:
    m = BudgetManager()
    with pytest.raises(ContractError) as err:
        m.register_agent("writer", max_cost=bad)
    assert "writer" in str(err.value) and "max_cost" in str(err.value)
    assert repr(bad) in str(err.value) or str(bad) in str(err.value)
    assert m.status() == {}  # nothing registered


def test_max_cost_alone_budgets_in_money_only_and_tokens_beside_it_stay() -> None:
    m = BudgetManager(prices=PRICES)
    money_only = m.register_agent("a", max_cost="0.01")
    both = m.register_agent("b", max_tokens=500, max_cost="0.01")
    plain = m.register_agent("c")
    assert (money_only.max_tokens, money_only.min_reserve) == (None, 0)
    assert (both.max_tokens, plain.max_tokens, plain.max_cost) == (500, 1000, None)
    with pytest.raises(ContractError, match="min_reserve"):
        BudgetContract("d", max_cost=1, min_reserve=10)
    # from a budgets.yaml-shaped mapping, the same
    spec: dict[str, dict[str, Any]] = {
        "a": {"max_cost": "0.25"},
        "b": {"max_tokens": 100, "max_cost": 0.5},
    }
    assert BudgetManager.from_contracts(spec).contracts["b"].max_cost == Decimal("0.50")


# --------------------------------------------------------------------- prices
@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"input": "abc", "output": 1}, "ModelPrice.input must be an amount of dollars"),
        ({"input": -1, "output": 1}, "ModelPrice.input must be a finite amount of dollars >= 0"),
        ({"input": 1, "output": 1, "cache_read": "-2"}, "ModelPrice.cache_read must be"),
        ({"input": 1}, "needs output"),
        ({"output": 1}, "needs input"),
        ({"input": 1, "output": 1, "cached": 2}, "unknown field(s) ['cached']"),
        ({"input": 1, "output": 1, "_nanos": 2}, "unknown field(s) ['_nanos']"),  # private
    ],
)
def test_a_bad_price_names_the_model_and_the_field_and_no_agent(
    given: dict[str, Any], message: str
) -> None:
    with pytest.raises(ContractError) as err:
        BudgetManager(prices={"mini": given})
    text = str(err.value)
    assert text.startswith("Price of model 'mini': ") and message in text
    assert "Agent" not in text and "__init__" not in text  # a price is no agent's
    with pytest.raises(InvalidValueError, match=r"^ModelPrice\.output must be an amount"):
        ModelPrice(input=1, output="lots")


def test_model_price_prices_each_kind_at_its_own_rate() -> None:
    price = ModelPrice(input=1, output=4, cache_read="0.1", cache_write="1.25", reasoning=8)
    usage = Usage(1000, 300, cache_read_tokens=600, cache_write_tokens=100, reasoning_tokens=200)
    expected = (
        Decimal(300) * 1 + 600 * Decimal("0.1") + 100 * Decimal("1.25") + 100 * 4 + 200 * 8
    ) / 10**6
    assert price.cost(usage) == expected
    assert price.cost_nanos(usage) == int(expected * 10**9)
    # the worst case: the output cap at the highest output price (reasoning here)
    assert price.worst_case(1000, 300) == (Decimal(1000) + 300 * 8) / 10**6


def test_a_price_finer_than_a_nano_dollar_per_token_rounds_a_call_up_once() -> None:
    price = ModelPrice(input="0.0375", output="0.0375")
    assert price.cost(Usage(3, 0)) == Decimal("0.0000001125")
    assert price.cost_nanos(Usage(3, 0)) == 113  # 112.5 nano-dollars, rounded up


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o", "openai"),
        ("gpt-4o-mini", "openai"),
        ("gpt-5", "openai"),
        ("claude-sonnet-4-5", "anthropic"),
        ("claude-haiku-4-5", "anthropic"),
    ],
)
def test_genai_prices_are_used_exactly_as_its_own_calc_price(model: str, provider: str) -> None:
    table = PriceTable()
    price = table.find(model, provider)
    assert price is not None
    usage = Usage(12_345, 678, cache_read_tokens=4_000, cache_write_tokens=1_000)
    theirs = calc_price(
        GenaiUsage(
            input_tokens=12_345,
            output_tokens=678,
            cache_read_tokens=4_000,
            cache_write_tokens=1_000,
        ),
        model,
        provider_id=provider,
    ).total_price
    assert price.cost(usage) == theirs
    # the same through a framework's provider/model name
    assert table.find(f"{provider}/{model}") is not None


def test_a_flat_genai_price_is_a_model_price_with_calc_prices_answers() -> None:
    """A genai-prices model with one rate per token kind, for good, is kept as a
    ModelPrice (priced in integers, not by calc_price on every call): every such model
    of the bundled snapshot, on usages of every kind, costs what calc_price says."""
    assert isinstance(PriceTable().find("gpt-4o-mini", "openai"), ModelPrice)
    assert not isinstance(PriceTable().find("claude-sonnet-4-5", "anthropic"), ModelPrice)  # tiers
    from genai_prices import data_snapshot

    from tbc_integrations._pricing import _flat_price

    usages = [
        Usage(12_345, 678, cache_read_tokens=4_000, cache_write_tokens=1_000),
        Usage(1_000, 300, input_audio_tokens=200, output_audio_tokens=50),
        Usage(999_999, 77_777, cache_read_tokens=3, reasoning_tokens=500),
        Usage(1, 1),
    ]
    flat = 0
    for provider in data_snapshot.get_snapshot().providers:
        for info in provider.models:
            price = _flat_price(info)
            if price is None:
                continue
            flat += 1
            for u in usages:
                theirs = info.calc_price(
                    GenaiUsage(
                        input_tokens=u.input_tokens,
                        cache_read_tokens=u.cache_read_tokens,
                        cache_write_tokens=u.cache_write_tokens,
                        input_audio_tokens=u.input_audio_tokens,
                        output_tokens=u.output_tokens,
                        output_audio_tokens=u.output_audio_tokens,
                    ),
                    provider,
                ).total_price
                assert price.cost(u) == theirs, (provider.id, info.id, u)
                # the hold: output at the highest output price (audio included)
                top = max(price.output, price.output_audio or 0)
                assert (
                    price.worst_case(u.input_tokens, u.output_tokens)
                    == (u.input_tokens * price.input + u.output_tokens * top) / 10**6
                )
    assert flat > 1_000  # most of the snapshot


def test_your_table_wins_over_genai_prices_and_unknown_models_have_no_price() -> None:
    table = PriceTable({"gpt-4o": ModelPrice(input=1, output=1)})
    assert table.find("gpt-4o", "openai") == ModelPrice(input=1, output=1)
    assert table.find("no-such-model-anywhere", "openai") is None
    fallback = ModelPrice(input=9, output=9)
    assert PriceTable(fallback=fallback).find("no-such-model-anywhere") == fallback


# --------------------------------------------------------------------- ledger
@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def manager(kind: str, tmp_path: Path, **kwargs: Any) -> BudgetManager:
    return BudgetManager(store_url(kind, tmp_path), prices=PRICES, **kwargs)


def test_reserve_holds_the_worst_case_and_commit_spends_the_priced_usage(
    kind: str, tmp_path: Path
) -> None:
    m = manager(kind, tmp_path)
    m.register_agent("a", max_tokens=100_000, max_cost="1")
    r = m.reserve("a", 1_000, 500, model="big")
    assert r.cost == Decimal("0.0075")  # 1000 x 2.50 + 500 x 10 per million
    s = m.status()["a"]
    assert (s.cost, s.cost_reserved, s.cost_remaining) == (
        Decimal(0),
        Decimal("0.0075"),
        Decimal("0.9925"),
    )
    m.commit(r, Usage(1_000, 200, cache_read_tokens=800))
    s = m.status()["a"]
    # 200 fresh + 800 cached input, 200 output
    assert s.cost == Decimal("0.0035")
    assert (s.cost_reserved, s.cost_remaining) == (Decimal(0), Decimal("0.9965"))
    assert s.consumed == 1_200


def test_release_and_a_lapsed_lease_return_the_money_held(kind: str, tmp_path: Path) -> None:
    clock = FakeClock(time_now := 1_000.0)
    m = manager(kind, tmp_path, clock=clock)
    m.register_agent("a", max_cost="0.01")
    m.release(m.reserve("a", 1_000, 100, model="mini"))
    m.reserve("a", 1_000, 100, model="mini", lease_seconds=5)
    assert m.status()["a"].cost_reserved == Decimal("0.00021")
    clock.advance(10)
    assert m.expire() == 1
    s = m.status()["a"]
    assert (s.cost, s.cost_reserved) == (Decimal(0), Decimal(0))
    assert time_now < clock()


def test_a_cost_cap_refuses_before_any_spend_and_changes_nothing(kind: str, tmp_path: Path) -> None:
    m = manager(kind, tmp_path)
    m.register_agent("a", max_tokens=1_000_000, max_cost="0.01")
    m.commit(m.reserve("a", 1_000, 0, model="big"), Usage(1_000, 0))  # $0.0025 spent
    before = m.status()["a"]
    with pytest.raises(CostLimitError) as err:
        m.reserve("a", 1_000, 1_000, model="big")  # worst case $0.0125 > $0.0075 left
    assert isinstance(err.value, BudgetExceededError)
    assert err.value.requested_cost == Decimal("0.0125")
    assert err.value.available_cost == Decimal("0.0075")
    assert "$0.0125" in str(err.value) and "'a'" in str(err.value)
    after = m.status()["a"]
    assert (after.cost, after.cost_reserved, after.reserved) == (before.cost, Decimal(0), 0)
    assert after.refusals == before.refusals + 1
    m.reserve("a", 1_000, 100, model="mini")  # a cheaper model still fits


def test_a_capped_agent_with_an_unpriced_model_is_refused_and_others_are_warned(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = BudgetManager(store_url(kind, tmp_path), prices=PriceTable(PRICES, default_source=False))
    m.register_agent("capped", max_cost="1")
    m.register_agent("free", max_tokens=1_000)
    with pytest.raises(PriceNotFoundError, match=r"capped.*'no-such-model'"):
        m.reserve("capped", 10, 10, model="no-such-model")
    with pytest.raises(PriceNotFoundError, match="names no model"):
        m.reserve("capped", 10, 10)
    assert m.status()["capped"].reserved == 0
    with caplog.at_level(logging.WARNING, logger="tbc_integrations"):
        m.commit(m.reserve("free", 10, 10, model="no-such-model"), Usage(10, 5))
    assert "no price known for model 'no-such-model'" in caplog.text
    assert m.status()["free"].consumed == 15 and m.status()["free"].cost == 0


def test_money_is_never_lent_and_a_money_only_agent_lends_no_tokens(
    kind: str, tmp_path: Path
) -> None:
    m = manager(kind, tmp_path)
    m.register_agent("rich", priority=1, max_cost="5")
    m.register_agent("donor", priority=1, max_tokens=1_000, max_cost="0.000001")
    m.register_agent("needy", priority=3, max_tokens=100)
    r = m.reserve("needy", 500, 0, model="mini")
    assert r.loans == (("donor", 400),)  # tokens from the token donor, none from "rich"
    m.commit(r, Usage(500, 0))
    assert m.status()["needy"].cost == Decimal("0.000075")
    # a money-only agent spends tokens without a token limit
    big = m.reserve("rich", 1_000_000, 1_000, model="big")  # $2.51 at worst: it fits
    m.commit(big, Usage(2_000_000, 1_000))
    s = m.status()["rich"]
    assert (s.max_tokens, s.consumed, s.overdraft) == (None, 2_001_000, 0)
    assert s.cost == Decimal("5.01")  # recorded in full, over its cap
    with pytest.raises(CostLimitError):
        m.reserve("rich", 1, 0, model="mini")


def test_an_overspend_past_the_cost_cap_is_recorded_and_evented(kind: str, tmp_path: Path) -> None:
    m = manager(kind, tmp_path)
    m.register_agent("a", max_tokens=10_000_000, max_cost="0.001")
    seen: list[BudgetEvent] = []
    m.subscribe(seen.append)
    r = m.reserve("a", 1_000, 100, model="mini")  # $0.00021 held
    m.commit(r, Usage(8_000, 0))  # $0.0012 really spent
    assert m.status()["a"].cost == Decimal("0.0012")
    over = [e for e in seen if e.kind == "overdraft" and e.reason == "cost cap"]
    assert [e.cost for e in over] == [Decimal("0.0002")]
    commit = next(e for e in seen if e.kind == "commit")
    assert commit.cost == Decimal("0.0012")


def test_explicit_costs_and_charges_are_kept_exactly(kind: str, tmp_path: Path) -> None:
    m = manager(kind, tmp_path)
    m.register_agent("a", max_cost="1")
    r = m.reserve("a", 10, 10, cost="0.123456789")
    assert m.status()["a"].cost_reserved == Decimal("0.123456789")
    m.commit(r, Usage(10, 3))  # no model: the money held is what it cost
    m.charge("a", Usage(100, 0), cost=Decimal("0.000000001"))
    m.charge("a", Usage(1_000, 0), model="mini")
    assert m.status()["a"].cost == Decimal("0.123456789") + Decimal("0.000000001") + Decimal(
        "0.00015"
    )


def test_every_store_keeps_the_same_money(tmp_path: Path) -> None:
    results = []
    for kind in STORE_KINDS:
        m = BudgetManager(
            store_url(kind, tmp_path / kind if kind == "sqlite" else tmp_path), prices=PRICES
        )
        (tmp_path / kind).mkdir(exist_ok=True)
        m.register_agent("a", max_tokens=1_000_000, max_cost="0.05")
        m.register_agent("b", max_cost="0.05", priority=2)
        for i in range(20):
            r = m.reserve("a" if i % 2 else "b", 100 + i, 50, model="big" if i % 3 else "mini")
            if i % 4 == 0:
                m.release(r)
            else:
                m.commit(r, Usage(100 + i, i, cache_read_tokens=i))
        results.append({k: v.to_dict() for k, v in m.status().items()})
    assert all(r == results[0] for r in results[1:])
    assert results[0]["a"]["cost"] != "0.00"


# ------------------------------------------------------------ real clients
@pytest.mark.filterwarnings("ignore:tiktoken encoding")
def test_chat_openai_cache_and_reasoning_tokens_are_priced_exactly() -> None:
    from langchain_openai import ChatOpenAI

    m = BudgetManager()  # prices from genai-prices
    m.register_agent("a", max_tokens=100_000, max_cost="0.10")
    handler = BudgetCallbackHandler(m, agent="a")
    with OpenAIStub(cached_tokens=64, reasoning_tokens=3) as stub:
        model = ChatOpenAI(
            model="gpt-5",
            base_url=stub.base_url,
            api_key="test",  # type: ignore[arg-type]
            max_completion_tokens=8,
            stream_usage=True,
            max_retries=0,
        )
        system = "You answer briefly and well. " * 30
        model.invoke([("system", system), ("human", "hi")], config={"callbacks": [handler]})
        list(
            model.stream([("system", system), ("human", "again")], config={"callbacks": [handler]})
        )
        billed = stub.usages
    expected = sum(
        calc_price(
            GenaiUsage(
                input_tokens=u["prompt_tokens"],
                cache_read_tokens=u["prompt_tokens_details"]["cached_tokens"],
                output_tokens=u["completion_tokens"],
            ),
            "gpt-5",
            provider_id="openai",
        ).total_price
        for u in billed
    )
    s = m.status()["a"]
    assert s.cost == expected
    assert s.consumed == sum(u["total_tokens"] for u in billed)
    assert s.cost_reserved == 0


@pytest.mark.filterwarnings("ignore:tiktoken encoding")
def test_chat_openai_over_its_cost_cap_sends_no_request() -> None:
    from langchain_openai import ChatOpenAI

    m = BudgetManager(prices={"gpt-4o": BIG})
    m.register_agent("a", max_cost="0.001")  # 100 output tokens at $10/M is all it has
    handler = BudgetCallbackHandler(m, agent="a")
    with OpenAIStub() as stub:
        model = ChatOpenAI(
            model="gpt-4o",
            base_url=stub.base_url,
            api_key="test",  # type: ignore[arg-type]
            max_completion_tokens=200,
            max_retries=0,
        )
        with pytest.raises(CostLimitError):
            model.invoke("hello", config={"callbacks": [handler]})
        assert stub.requests == []


def test_chat_anthropic_cache_reads_and_writes_are_priced_exactly() -> None:
    from langchain_anthropic import ChatAnthropic

    m = BudgetManager()
    m.register_agent("a", max_cost="0.50")
    handler = BudgetCallbackHandler(m, agent="a")
    with AnthropicStub(cache_read_tokens=300, cache_creation_tokens=40) as stub:
        model = ChatAnthropic(  # type: ignore[call-arg]
            model="claude-haiku-4-5",
            base_url=stub.base_url,
            api_key="test",  # type: ignore[arg-type]
            max_tokens=6,
            max_retries=0,
        )
        system = "You are a careful assistant. " * 40
        model.invoke([("system", system), ("human", "hi")], config={"callbacks": [handler]})
        list(model.stream([("system", system), ("human", "more")], config={"callbacks": [handler]}))
        billed = stub.usages
    price = ModelPrice(input=1, output=5, cache_read="0.1", cache_write="1.25")  # haiku 4.5
    expected = sum(
        (
            u["input_tokens"] * price.input
            + u["cache_read_input_tokens"] * Decimal("0.1")
            + u["cache_creation_input_tokens"] * Decimal("1.25")
            + u["output_tokens"] * price.output
        )
        / 10**6
        for u in billed
    )
    s = m.status()["a"]
    assert len(billed) == 2 and s.cost == expected
    theirs = sum(
        calc_price(
            GenaiUsage(
                input_tokens=u["input_tokens"]
                + u["cache_read_input_tokens"]
                + u["cache_creation_input_tokens"],
                cache_read_tokens=u["cache_read_input_tokens"],
                cache_write_tokens=u["cache_creation_input_tokens"],
                output_tokens=u["output_tokens"],
            ),
            "claude-haiku-4-5",
            provider_id="anthropic",
        ).total_price
        for u in billed
    )
    assert s.cost == theirs


@pytest.mark.filterwarnings("ignore:tiktoken encoding")
def test_a_graph_with_a_large_and_a_small_model_prices_each_call_by_its_own_model() -> None:
    from langchain_openai import ChatOpenAI
    from langgraph.graph import END, START, StateGraph
    from typing_extensions import TypedDict

    from tbc_integrations.langgraph import govern_graph

    class State(TypedDict, total=False):
        text: str

    m = BudgetManager(prices=PRICES)
    m.register_agent("planner", max_cost="1")
    m.register_agent("writer", max_cost="1")
    with OpenAIStub() as stub:

        def chat(name: str) -> Any:
            return ChatOpenAI(
                model=name,
                base_url=stub.base_url,
                api_key="test",  # type: ignore[arg-type]
                max_completion_tokens=5,
                max_retries=0,
            )

        big, mini = chat("big"), chat("mini")

        def planner(state: State) -> State:
            return {"text": str(big.invoke("plan: " + state.get("text", "")).content)}

        def writer(state: State) -> State:
            return {"text": str(mini.invoke("write: " + state["text"]).content)}

        g = StateGraph(State)
        g.add_node("planner", planner)
        g.add_node("writer", writer)
        g.add_edge(START, "planner")
        g.add_edge("planner", "writer")
        g.add_edge("writer", END)
        govern_graph(g, m).compile().invoke({"text": "go"})
        (p_in, p_out), (w_in, w_out) = stub.reported
    s = m.status()
    assert s["planner"].cost == BIG.cost(Usage(p_in, p_out))
    assert s["writer"].cost == MINI.cost(Usage(w_in, w_out))
    assert s["planner"].cost > 10 * s["writer"].cost / 2
