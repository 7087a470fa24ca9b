"""Switching from ``tbcontracts`` is a change of import; and where it fails, we don't."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import tbcontracts

import tbc_integrations
from tbc_integrations import BudgetExceededError, BudgetManager, TBCError, UnknownAgentError

NAMES = [
    "BudgetContract",
    "Ledger",
    "Reallocator",
    "ConfidenceGate",
    "BudgetManager",
    "TBCError",
    "BudgetExceededError",
    "UnknownAgentError",
]


@pytest.mark.parametrize("name", NAMES)
def test_every_tbcontracts_name_exists(name: str) -> None:
    assert hasattr(tbc_integrations, name) and name in tbc_integrations.__all__


def scenario(mod: Any) -> dict[str, Any]:
    """A run both packages handle correctly (sequential, within budget)."""
    m = mod.BudgetManager()
    m.register_agent("researcher", priority=3, max_tokens=400)
    m.register_agent("writer", priority=2, max_tokens=200, min_reserve=50)
    m.register_agent("critic", 1, 300, None, 0.9)
    m.record_usage("researcher", 380, note="search")
    m.record_usage("researcher", 100, confidence=0.5)  # borrows 80 from critic
    m.record_usage("writer", 120)
    contract = m.contracts["critic"]
    seen = {
        "remaining": m.remaining("writer"),
        "threshold": contract.confidence_threshold,
        "reserve": contract.min_reserve,
        "gate": mod.ConfidenceGate.allow_further_retrieval(contract, 0.95),
        "ledger": (m.ledger.consumed("writer"), m.ledger.allocated("researcher")),
    }
    try:
        m.record_usage("writer", 500)
    except mod.BudgetExceededError as exc:
        seen["refused"] = (exc.agent_name, exc.requested)
    seen["report"] = m.report()
    return seen


def test_same_calls_same_observable_results() -> None:
    ours, theirs = scenario(tbc_integrations), scenario(tbcontracts)
    theirs_report = theirs.pop("report")
    ours_report = ours.pop("report")
    assert ours == theirs
    # The only difference: tbcontracts drops the refused 500 tokens; we record them.
    assert ours_report["researcher"] == theirs_report["researcher"]
    assert ours_report["critic"] == theirs_report["critic"]
    assert theirs_report["writer"]["consumed"] == 120
    assert ours_report["writer"]["consumed"] == 620
    assert set(ours_report) == set(theirs_report)
    for row in ours_report.values():
        assert set(row) == {"allocated", "consumed", "remaining"}


def test_errors_keep_their_shapes() -> None:
    err = BudgetExceededError("a", 10, 3)
    theirs = tbcontracts.BudgetExceededError("a", 10, 3)
    assert str(err) == str(theirs)
    assert (err.agent_name, err.requested, err.available) == ("a", 10, 3)
    assert issubclass(UnknownAgentError, TBCError) and issubclass(UnknownAgentError, KeyError)
    with pytest.raises(UnknownAgentError):
        BudgetManager().govern("nobody")


def test_govern_reserves_before_the_call_and_settles_after() -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=60, min_reserve=0, confidence_threshold=0.8)
    calls: list[str] = []

    @m.govern("writer", confidence_fn=lambda out: 0.5)
    def write(prompt: str) -> str:
        calls.append(prompt)
        return "word " * 9 + "word"

    assert write("a short prompt") == "word " * 9 + "word"
    first = m.status()["writer"]
    assert first.input_tokens == 3 and first.output_tokens == 10
    assert first.reserved == 0 and first.last_confidence == 0.5
    with pytest.raises(BudgetExceededError):
        write("x " * 80)  # input alone is over budget: refused before the call
    assert calls == ["a short prompt"]


def test_govern_gate_blocks_before_the_call_with_the_real_request() -> None:
    m = BudgetManager()
    m.register_agent("critic", max_tokens=500, confidence_threshold=0.8)
    ran = []

    @m.govern("critic", confidence_fn=lambda out: 0.95)
    def review(text: str) -> str:
        ran.append(text)
        return "fine"

    review("first draft")
    with pytest.raises(tbc_integrations.ConfidenceGateError) as info:
        review("second draft")
    assert ran == ["first draft"]
    assert info.value.requested > 0  # tbcontracts reports requested=0


def test_govern_releases_when_the_function_raises() -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=100)

    @m.govern("a")
    def boom(prompt: str) -> str:
        raise ValueError("provider down")

    with pytest.raises(ValueError, match="provider down"):
        boom("some prompt here")
    s = m.status()["a"]
    assert (s.consumed, s.reserved) == (0, 0)


async def test_govern_async_counts_output_and_awaits() -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=100)

    @m.govern("a")
    async def answer(prompt: str) -> str:
        await asyncio.sleep(0)
        return "one two three four"

    assert await answer("hi there") == "one two three four"
    s = m.status()["a"]
    assert s.output_tokens == 4 and s.input_tokens == 2


def test_record_usage_under_threads_cannot_overspend_where_tbcontracts_does() -> None:
    """8 threads x 100 x 10 tokens on a 1000 budget, with the race window widened."""

    def run(mod: Any, slow: bool) -> int:
        m = mod.BudgetManager()
        m.register_agent("solo", max_tokens=1000, min_reserve=0)
        if slow:  # widen tbcontracts' check-then-act window, as the peer survey did
            original = m.ledger.remaining

            def remaining(name: str) -> int:
                value: int = original(name)
                time.sleep(0.0002)
                return value

            m.ledger.remaining = remaining

        def go() -> None:
            for _ in range(100):
                try:
                    if mod is tbcontracts:
                        m.record_usage("solo", 10)
                    else:
                        with m.spend("solo", 10) as call:
                            call.set_usage((10, 0))
                except mod.BudgetExceededError:  # noqa: PERF203 - refusals are expected here
                    pass

        threads = [threading.Thread(target=go) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        consumed: int = m.report()["solo"]["consumed"]
        return consumed

    assert run(tbc_integrations, slow=False) == 1000
    theirs = run(tbcontracts, slow=True)
    assert theirs > 1000, "the peer's race did not show; the comparison proves nothing"


def test_reallocator_takes_the_tbcontracts_argument_order() -> None:
    m = BudgetManager()
    m.register_agent("lo", priority=1, max_tokens=100)
    m.register_agent("hi", priority=2, max_tokens=10)
    compat = tbc_integrations.Reallocator(m.contracts, m.ledger)
    assert compat.reallocate("hi", 20) == 20
    assert tbc_integrations.Reallocator(m).find_donors(exclude="hi") == ["lo"]
    with pytest.raises(tbc_integrations.ContractError):
        tbc_integrations.Reallocator({"lo": None})


def test_tbcontracts_telemetry_arguments_are_accepted() -> None:
    m = BudgetManager(telemetry=object())
    assert m.telemetry is not None and m.enable_telemetry() is True
    m.register_agent("a", max_tokens=10)
    with m.spend("a", 1, 1) as call:
        call.set_usage((1, 1))
    m.telemetry.close()
