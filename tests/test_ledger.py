"""The three verbs, reallocation, overdraft, leases, gating and events."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tbc_integrations import (
    BudgetExceededError,
    BudgetManager,
    ConfidenceGateError,
    ContractError,
    InvalidTokenCountError,
    InvalidValueError,
    Reservation,
    ReservationError,
    UnknownAgentError,
    Usage,
)
from tbc_integrations.events import (
    BudgetEvent,
    Committed,
    Expired,
    GateChanged,
    Overdrawn,
    Refused,
    Released,
    Reserved,
    Transferred,
)
from tests.conftest import STORE_KINDS, FakeClock, store_url

_STORE: dict[str, str] = {"url": "memory://"}


@pytest.fixture(
    autouse=True,
    params=STORE_KINDS + (("redis-eval",) if "redis" in STORE_KINDS else ()),
)
def every_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Run every test of this module once per store: the conformance suite."""
    _STORE["url"] = store_url(request.param, tmp_path)
    yield request.param
    _STORE["url"] = "memory://"


def make(clock: FakeClock | None = None, **agents: dict[str, Any]) -> BudgetManager:
    url = _STORE["url"]
    m = BudgetManager(store=url, clock=clock) if clock is not None else BudgetManager(store=url)
    for name, fields in agents.items():
        m.register_agent(name, **fields)
    return m


def total_allocated(m: BudgetManager) -> int:
    return sum(s.allocated for s in m.status().values())


# ------------------------------------------------------------------ reserve
def test_reserve_holds_tokens_and_commit_returns_the_unused_part() -> None:
    m = make(a={"max_tokens": 100})
    r = m.reserve("a", input_tokens=20, output_tokens=50)
    assert (r.agent, r.amount, r.loans) == ("a", 70, ())
    assert m.status()["a"].reserved == 70 and m.remaining("a") == 30
    assert m.commit(r, Usage(18, 12)) == 0
    s = m.status()["a"]
    assert (s.consumed, s.reserved, s.remaining, s.input_tokens, s.output_tokens) == (
        30,
        0,
        70,
        18,
        12,
    )


def test_refusal_happens_before_spend_and_changes_nothing_but_the_refusal_count() -> None:
    m = make(a={"max_tokens": 100, "priority": 2}, b={"max_tokens": 100, "priority": 3})
    before = m.status()
    with pytest.raises(BudgetExceededError) as info:
        m.reserve("a", 200)  # b is more important: it never gives to a
    err = info.value
    assert isinstance(err, RuntimeError)
    assert (err.agent_name, err.requested, err.available) == ("a", 200, 100)
    after = m.status()
    assert after["b"] == before["b"]
    assert after["a"].refusals == 1
    assert after["a"].reserved == 0 and after["a"].allocated == 100


@pytest.mark.parametrize(
    "bad", [-1, 1.0, float("nan"), float("inf"), True, "10", None, 2.5, [3], b"1"]
)
@pytest.mark.parametrize("field", ["input_tokens", "output_tokens"])
def test_bad_token_counts_are_refused_naming_agent_and_value(field: str, bad: Any) -> None:
    m = make(a={"max_tokens": 100})
    before = m.status()
    with pytest.raises(InvalidTokenCountError) as info:
        m.reserve("a", **{field: bad})
    assert "Agent 'a'" in str(info.value) and repr(bad) in str(info.value)
    assert field in str(info.value)
    assert m.status() == before


def test_integer_like_counts_are_accepted() -> None:
    class Tokens:
        def __index__(self) -> int:
            return 7

    m = make(a={"max_tokens": 100})
    assert m.reserve("a", Tokens()).input_tokens == 7  # type: ignore[arg-type]


def test_unknown_agent_is_a_key_error_naming_it() -> None:
    m = make(a={"max_tokens": 100})
    with pytest.raises(UnknownAgentError) as info:
        m.reserve("ghost", 1)
    assert isinstance(info.value, KeyError)
    assert str(info.value) == "Agent 'ghost' was never registered."
    with pytest.raises(UnknownAgentError):
        m.remaining("ghost")
    with pytest.raises(UnknownAgentError):
        m.record_usage("ghost", 3)


def test_input_and_output_caps_refuse_without_reallocation() -> None:
    m = make(
        a={"max_tokens": 100, "max_input_tokens": 30, "max_output_tokens": 40, "priority": 5},
        idle={"max_tokens": 1000, "priority": 1},
    )
    r = m.reserve("a", 20, 30)
    with pytest.raises(BudgetExceededError, match="input cap") as info:
        m.reserve("a", 11, 0)
    assert (info.value.requested, info.value.available, info.value.reason) == (11, 10, "input cap")
    with pytest.raises(BudgetExceededError, match="output cap") as info:
        m.reserve("a", 0, 11)
    assert info.value.available == 10
    m.commit(r, Usage(5, 5))  # caps count what is spent and held
    m.reserve("a", 25, 35)
    assert m.status()["idle"].lent == 0


# ------------------------------------------------------------- reallocation
def test_borrowing_follows_priority_then_idleness_and_keeps_reserves() -> None:
    m = make(
        needy={"max_tokens": 100, "priority": 3},
        low_busy={"max_tokens": 200, "priority": 1, "min_reserve": 20},
        low_idle={"max_tokens": 500, "priority": 1, "min_reserve": 50},
        mid={"max_tokens": 1000, "priority": 2, "min_reserve": 100},
        high={"max_tokens": 5000, "priority": 4},
    )
    m.record_usage("low_busy", 100)
    r = m.reserve("needy", 700)
    # lowest priority first; among equals the most remaining first; never below reserve.
    assert r.loans == (("low_idle", 450), ("low_busy", 80), ("mid", 70))
    s = m.status()
    assert s["low_idle"].remaining == 50 and s["low_busy"].remaining == 20
    assert s["high"].lent == 0
    assert s["needy"].borrowed == 600


def test_completed_agent_gives_everything_to_anyone_first() -> None:
    m = make(
        needy={"max_tokens": 10, "priority": 1},
        done={"max_tokens": 100, "priority": 9, "min_reserve": 50},
        peer={"max_tokens": 100, "priority": 1},
    )
    with pytest.raises(BudgetExceededError):
        m.reserve("needy", 200)  # done is more important and not complete yet
    m.complete("done")
    r = m.reserve("needy", 110)
    assert r.loans == (("done", 100),)
    assert m.status()["done"].remaining == 0


def test_unused_loans_go_back_to_donors_last_loan_first() -> None:
    m = make(
        needy={"max_tokens": 100, "priority": 2},
        d1={"max_tokens": 110, "priority": 1, "min_reserve": 10},
        d2={"max_tokens": 60, "priority": 1, "min_reserve": 10},
    )
    total = total_allocated(m)
    r = m.reserve("needy", 250)
    assert r.loans == (("d1", 100), ("d2", 50))
    m.commit(r, Usage(120, 10))  # used 130: 100 own + 30 borrowed kept
    s = m.status()
    assert (s["d1"].allocated, s["d1"].lent) == (80, 30)
    assert (s["d2"].allocated, s["d2"].lent) == (60, 0)
    assert (s["needy"].allocated, s["needy"].borrowed, s["needy"].remaining) == (130, 30, 0)
    assert total_allocated(m) == total


def test_release_returns_tokens_and_loans() -> None:
    m = make(needy={"max_tokens": 10, "priority": 2}, d={"max_tokens": 100, "priority": 1})
    before = m.status()
    r = m.reserve("needy", 50)
    assert r.borrowed == 40
    m.release(r)
    assert m.status() == before


def test_refused_borrow_moves_nothing() -> None:
    m = make(needy={"max_tokens": 10, "priority": 2}, d={"max_tokens": 100, "priority": 1})
    before = m.status()
    with pytest.raises(BudgetExceededError) as info:
        m.reserve("needy", 101)
    assert info.value.available == 10 + 90
    after = m.status()
    assert after["d"] == before["d"] and after["needy"].allocated == 10


def test_reallocator_compat_moves_budget_for_good() -> None:
    m = make(hi={"max_tokens": 10, "priority": 2}, lo={"max_tokens": 100, "priority": 1})
    assert m.reallocator.find_donors(exclude="hi") == ["lo"]
    assert m.reallocator.reallocate("hi", 500) == 90
    assert m.report() == {
        "hi": {"allocated": 100, "consumed": 0, "remaining": 100},
        "lo": {"allocated": 10, "consumed": 0, "remaining": 10},
    }


# ---------------------------------------------------------------- overdraft
def test_usage_above_the_reservation_is_recorded_in_full_and_borrowed() -> None:
    m = make(a={"max_tokens": 100, "priority": 2}, d={"max_tokens": 100, "priority": 1})
    r = m.reserve("a", 10, 10)
    assert m.commit(r, Usage(10, 140)) == 0  # 150 used: 100 own + 50 from d
    s = m.status()
    assert (s["a"].consumed, s["a"].allocated, s["a"].overdraft) == (150, 150, 0)
    assert s["d"].allocated == 50


def test_uncovered_overdraft_is_recorded_evented_and_refuses_until_covered() -> None:
    m = make(a={"max_tokens": 100, "priority": 2}, d={"max_tokens": 100, "priority": 1})
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    r = m.reserve("a", 50)
    assert m.commit(r, Usage(300, 0)) == 110  # 100 own + 90 from d, 110 short
    s = m.status()
    assert (s["a"].consumed, s["a"].overdraft, s["a"].remaining) == (300, 110, -110)
    assert s["d"].remaining == 10  # its reserve stays
    assert next(e for e in events if isinstance(e, Overdrawn)).tokens == 110
    with pytest.raises(BudgetExceededError):
        m.reserve("a", 1)
    m.adjust_allocation("a", 200)  # an outside grant covers it
    assert m.reserve("a", 1).amount == 1


def test_record_usage_never_drops_usage_and_raises_after_recording() -> None:
    m = make(hi={"max_tokens": 100, "priority": 3}, lo={"max_tokens": 100, "priority": 1})
    with pytest.raises(BudgetExceededError) as info:
        m.record_usage("hi", 300)
    assert info.value.requested == 300
    s = m.status()
    assert s["hi"].consumed == 300  # tbcontracts would have recorded 0
    assert s["hi"].overdraft == 110 and s["lo"].remaining == 10


# ----------------------------------------------------------- double settle
def test_second_commit_or_release_is_an_error_that_changes_nothing() -> None:
    m = make(a={"max_tokens": 100})
    r = m.reserve("a", 10)
    m.commit(r, Usage(5, 0))
    before = m.status()
    with pytest.raises(ReservationError, match="already settled"):
        m.commit(r, Usage(5, 0))
    with pytest.raises(ReservationError, match="already settled"):
        m.release(r)
    r2 = m.reserve("a", 10)
    m.release(r2)
    with pytest.raises(ReservationError, match="already settled"):
        m.commit(r2, Usage(1, 1))
    assert m.status()["a"].consumed == before["a"].consumed


def test_foreign_reservation_is_refused() -> None:
    m = make(a={"max_tokens": 100})
    fake = Reservation("elsewhere.1", "a", 1, 1, math.inf)
    with pytest.raises(ReservationError, match="not issued by this store"):
        m.commit(fake, Usage(1, 1))


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1, "completion_tokens": 2},
        {"input_tokens": 1.5, "output_tokens": 2},
        {"input_tokens": float("nan")},
        {"total_tokens": 10},
        "ten tokens",
        (1, True),
        None,
    ],
)
def test_malformed_usage_is_refused_and_the_reservation_stays_open(usage: Any) -> None:
    m = make(a={"max_tokens": 100})
    r = m.reserve("a", 10, 10)
    before = m.status()
    if usage is None:
        return  # None means "settle the estimate": covered elsewhere
    with pytest.raises(InvalidTokenCountError, match="Agent 'a'"):
        m.commit(r, usage)
    assert m.status() == before
    assert m.commit(r, {"input_tokens": 5, "output_tokens": 5}) == 0


def test_provider_shapes_are_read() -> None:
    class OpenAIUsage:
        prompt_tokens = 7
        completion_tokens = 3
        total_tokens = 10

    assert Usage.parse(OpenAIUsage()) == Usage(7, 3)
    assert Usage.parse({"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}) == Usage(1, 2)
    assert Usage.parse({"prompt_tokens": 4, "completion_tokens": 5}) == Usage(4, 5)
    assert Usage.parse((6, 7)) == Usage(6, 7)


def test_commit_without_usage_settles_the_estimate() -> None:
    m = make(a={"max_tokens": 100})
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    r = m.reserve("a", 10, 20)
    m.commit(r)
    assert m.status()["a"].consumed == 30
    committed = [e for e in events if isinstance(e, Committed)]
    assert committed[0].estimated is True


# ------------------------------------------------------------------- leases
def test_an_expired_reservation_returns_its_tokens_and_loans(clock: FakeClock) -> None:
    m = make(clock, a={"max_tokens": 10, "priority": 2}, d={"max_tokens": 100, "priority": 1})
    m.lease_seconds = 60
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    before = m.status()
    r = m.reserve("a", 50)
    clock.advance(59)
    assert m.status()["a"].reserved == 50
    clock.advance(2)
    assert m.status() == before  # reclaimed lazily on the next verb
    m.reserve("a", 1)
    expired = [e for e in events if isinstance(e, Expired)]
    assert len(expired) == 1 and expired[0].reservation_id == r.id
    assert expired[0].donors == (("d", 40),)


def test_a_late_commit_still_records_usage_in_full(clock: FakeClock) -> None:
    m = make(clock, a={"max_tokens": 100})
    r = m.reserve("a", 30, lease_seconds=5)
    clock.advance(10)
    assert m.expire() == 1
    assert m.commit(r, Usage(30, 20)) == 0
    assert m.status()["a"].consumed == 50
    with pytest.raises(ReservationError):
        m.commit(r, Usage(30, 20))
    r2 = m.reserve("a", 5, lease_seconds=1)
    clock.advance(2)
    m.release(r2)  # releasing an expired reservation is a no-op, not an error
    assert m.remaining("a") == 50


def test_lease_override_and_bad_lease() -> None:
    m = make(a={"max_tokens": 100})
    r = m.reserve("a", 1, lease_seconds=0.5)
    assert r.expires_at - m.clock() <= 0.5
    for bad in (0, -1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(InvalidValueError, match="lease_seconds") as info:
            m.reserve("a", 1, lease_seconds=bad)  # type: ignore[arg-type]
        assert not isinstance(info.value, InvalidTokenCountError)  # a lease is not a count


# ---------------------------------------------------------------- spend()
def test_spend_commits_on_success_and_releases_on_exception() -> None:
    m = make(a={"max_tokens": 100})
    with m.spend("a", 10, 40) as call:
        call.set_usage({"prompt_tokens": 9, "completion_tokens": 11})
    assert m.status()["a"].consumed == 20
    with pytest.raises(ZeroDivisionError), m.spend("a", 10, 40):
        _ = 1 / 0
    s = m.status()["a"]
    assert (s.consumed, s.reserved) == (20, 0)


async def test_aspend_releases_on_cancellation() -> None:
    m = make(a={"max_tokens": 100})
    started = asyncio.Event()

    async def call() -> None:
        async with m.aspend("a", 10, 40) as handle:
            started.set()
            await asyncio.sleep(10)
            handle.set_usage(Usage(1, 1))

    task = asyncio.create_task(call())
    await started.wait()
    assert m.status()["a"].reserved == 50
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert m.status()["a"].reserved == 0 and m.status()["a"].consumed == 0
    async with m.aspend("a", 5, 5) as handle:
        handle.set_usage(Usage(2, 3))
    assert m.status()["a"].consumed == 5


# -------------------------------------------------------------------- gate
def test_confidence_gate_refuses_with_its_own_error_and_events() -> None:
    m = make(a={"max_tokens": 100, "confidence_threshold": 0.8})
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    m.reserve("a", 1)  # no confidence yet: open
    assert m.record_confidence("a", 0.5) is False
    m.reserve("a", 1)
    assert m.record_confidence("a", 0.8) is True
    with pytest.raises(ConfidenceGateError) as info:
        m.reserve("a", 7)
    err = info.value
    assert isinstance(err, BudgetExceededError)
    assert (err.requested, err.confidence, err.threshold) == (7, 0.8, 0.8)
    assert "confidence gate" in str(err)
    gates = [e for e in events if isinstance(e, GateChanged)]
    assert [g.reason for g in gates] == ["closed"]
    refused = [e for e in events if isinstance(e, Refused)]
    assert refused[0].reason == "confidence gate"
    m.record_confidence("a", 0.1)
    assert [g.reason for g in events if isinstance(g, GateChanged)] == ["closed", "opened"]
    m.reserve("a", 1)


@pytest.mark.parametrize("bad", [float("nan"), -0.01, 1.01, "0.5", None, True])
def test_bad_confidence_is_refused(bad: Any) -> None:
    m = make(a={"max_tokens": 100, "confidence_threshold": 0.5})
    with pytest.raises(InvalidValueError, match="Agent 'a': confidence") as info:
        m.record_confidence("a", bad)
    assert not isinstance(info.value, InvalidTokenCountError)  # a confidence is not a count
    assert m.status()["a"].last_confidence is None


def test_threshold_can_change_at_run_time() -> None:
    m = make(a={"max_tokens": 100, "confidence_threshold": 0.9})
    m.record_confidence("a", 0.85)
    m.reserve("a", 1)
    m.set_threshold("a", 0.8)
    with pytest.raises(ConfidenceGateError):
        m.reserve("a", 1)
    m.set_threshold("a", None)
    m.reserve("a", 1)


# ------------------------------------------------------------------ events
def test_every_verb_emits_typed_events_in_order() -> None:
    m = make(a={"max_tokens": 10, "priority": 2}, d={"max_tokens": 100, "priority": 1})
    events: list[BudgetEvent] = []
    off = m.subscribe(events.append)
    r = m.reserve("a", 30)
    m.commit(r, Usage(15, 0))
    m.release(m.reserve("a", 1))
    kinds = [(type(e).__name__, e.reason) for e in events]
    assert kinds == [
        ("Transferred", "borrow"),
        ("Reserved", ""),
        ("Committed", ""),
        ("Transferred", "return"),
        ("Transferred", "borrow"),  # a kept all it had: the next call borrows again
        ("Reserved", ""),
        ("Released", ""),
    ]
    assert isinstance(events[1], Reserved) and events[1].donors == (("d", 20),)
    assert isinstance(events[3], Transferred) and events[3].agent == "d"
    assert events[3].tokens == 15 and isinstance(events[6], Released)
    off()
    m.reserve("a", 1)
    assert len(events) == 7


def test_a_failing_subscriber_does_not_break_the_ledger(caplog: pytest.LogCaptureFixture) -> None:
    m = make(a={"max_tokens": 100})

    def broken(_: BudgetEvent) -> None:
        raise RuntimeError("sink down")

    seen: list[BudgetEvent] = []
    m.subscribe(broken)
    m.subscribe(seen.append)
    m.reserve("a", 1)
    assert len(seen) == 1
    assert "subscriber" in caplog.text


def test_report_is_exactly_the_tbcontracts_shape() -> None:
    m = make(a={"max_tokens": 100})
    m.reserve("a", 10)
    m.record_usage("a", 5)
    assert m.report() == {"a": {"allocated": 100, "consumed": 5, "remaining": 85}}
    assert m.ledger.snapshot() == m.report()
    assert (m.ledger.consumed("a"), m.ledger.allocated("a")) == (5, 100)


def test_clamp_output_lowers_the_request_to_the_remaining_output_cap() -> None:
    m = make(a={"max_tokens": 1000, "max_output_tokens": 100})
    r = m.reserve("a", 10, 80)
    clamped = m.reserve("a", 10, 500, clamp_output=True)
    assert clamped.output_tokens == 20 and clamped.input_tokens == 10
    with pytest.raises(BudgetExceededError, match="output cap"):
        m.reserve("a", 10, 5, clamp_output=True)  # nothing left to clamp to
    m.release(r)
    assert m.reserve("a", 0, 500, clamp_output=True).output_tokens == 80


def test_check_refuses_like_reserve_but_holds_and_moves_nothing() -> None:
    m = make(
        a={"max_tokens": 10, "priority": 2, "confidence_threshold": 0.5},
        d={"max_tokens": 100, "priority": 1},
    )
    before = m.status()
    m.check("a", 0, 50)  # coverable by borrowing: passes, borrows nothing
    assert m.status() == before
    with pytest.raises(BudgetExceededError):
        m.check("a", 0, 500)
    m.record_confidence("a", 0.7)
    with pytest.raises(ConfidenceGateError):
        m.check("a", 0, 1)
    after = m.status()
    assert after["a"].refusals == 2 and after["d"] == before["d"]
    assert after["a"].allocated == 10 and after["a"].reserved == 0


def test_any_agent_name_survives_the_round_trip() -> None:
    odd = ["a|b|3|x", "com,ma", "ünï ✓", '{"json": [1]}']
    m = make()
    for name in odd:
        m.register_agent(name, max_tokens=100, priority=1)
    m.register_agent("needy", max_tokens=10, priority=2)
    r = m.reserve("needy", 0, 250)  # borrows from the odd names
    assert sum(t for _, t in r.loans) == 240 and {d for d, _ in r.loans} <= set(odd)
    assert [(x.id, x.agent, x.loans) for x in m.store.open_reservations()] == [
        (r.id, "needy", r.loans)
    ]
    assert m.commit(r, (0, 40)) == 0
    for name in odd:
        m.commit(m.reserve(name, 1, 2), (1, 1))
    status = m.status()
    assert all(status[name].consumed == 2 for name in odd)
    assert sum(s.allocated for s in status.values()) == 410


def test_a_lapsed_lease_of_any_agent_name_comes_back() -> None:
    clock = FakeClock()
    m = make(clock)
    m.register_agent("a|1|2|b", max_tokens=100, priority=1)
    m.register_agent("needy|x", max_tokens=10, priority=2)
    r = m.reserve("needy|x", 0, 60, lease_seconds=5)
    assert r.loans == (("a|1|2|b", 50),)
    clock.advance(6)
    assert m.expire() == 1
    status = m.status()
    assert status["needy|x"].reserved == 0 and status["a|1|2|b"].remaining == 100
    assert m.commit(r, (0, 30)) == 0  # late: recorded in full, the shortfall borrowed again
    status = m.status()
    assert (status["needy|x"].consumed, status["needy|x"].borrowed) == (30, 20)
    assert status["a|1|2|b"].remaining == 80


def test_async_forms_work_across_event_loops() -> None:
    m = make(a={"max_tokens": 100})

    async def call() -> None:
        async with m.aspend("a", 5, 5) as handle:
            handle.set_usage(Usage(2, 3))

    asyncio.run(call())  # a script that runs asyncio.run twice: the second loop works too
    asyncio.run(call())
    assert m.status()["a"].consumed == 10


def test_a_lapsed_lease_comes_back_on_the_next_reserve(clock: FakeClock) -> None:
    m = make(clock, a={"max_tokens": 100}, b={"max_tokens": 100})
    m.reserve("a", 80, lease_seconds=5)
    m.reserve("b", 80, lease_seconds=50)
    clock.advance(6)
    assert m.reserve("a", 90).amount == 90  # only if the lapsed 80 came back first
    clock.advance(50)
    held = m.reserve("b", 95)  # b's lease lapsed too, with no status() or expire() between
    assert held.amount == 95


def test_usage_of_every_provider_keeps_its_kinds_and_never_drops_a_token() -> None:
    from types import SimpleNamespace

    gemini = {
        "prompt_token_count": 1_200,
        "candidates_token_count": 300,
        "thoughts_token_count": 500,
        "cached_content_token_count": 1_000,
        "total_token_count": 2_000,
    }
    assert Usage.parse(gemini) == Usage(1_200, 800, cache_read_tokens=1_000, reasoning_tokens=500)
    bedrock = {
        "inputTokens": 15,
        "outputTokens": 40,
        "cacheReadInputTokens": 3_000,
        "cacheWriteInputTokens": 200,
        "totalTokens": 3_255,
    }
    parsed = Usage.parse(bedrock)
    assert parsed == Usage(3_215, 40, cache_read_tokens=3_000, cache_write_tokens=200)
    assert parsed.total_tokens == bedrock["totalTokens"]
    anthropic_sdk = SimpleNamespace(
        input_tokens=15,
        output_tokens=40,
        cache_read_input_tokens=3_000,
        cache_creation_input_tokens=0,
    )
    assert Usage.parse(anthropic_sdk) == Usage(3_015, 40, cache_read_tokens=3_000)
    with pytest.raises(InvalidTokenCountError, match=r"reasoning_tokens"):
        Usage.parse({**gemini, "thoughts_token_count": -1})


def test_a_policy_that_is_not_one_is_refused_when_the_manager_is_made() -> None:
    with pytest.raises(ContractError, match=r"policy must be a ReallocationPolicy.*'fancy'"):
        BudgetManager(policy="fancy")  # type: ignore[arg-type]


@pytest.mark.parametrize("usage", [Usage(-5, 0), {"input_tokens": "many"}, (1.5, 0)])
def test_a_commit_with_bad_usage_says_the_reservation_is_still_held(usage: Any) -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=100)
    held = m.reserve("writer", 30, 10)
    with pytest.raises(InvalidTokenCountError, match=r"Agent 'writer'.*still held") as info:
        m.commit(held, usage)
    assert held.id in str(info.value)
    assert m.status()["writer"].reserved == 40  # nothing settled: the hold is as it was
    m.release(held)
    assert m.status()["writer"].reserved == 0 and m.remaining("writer") == 100


def test_a_commit_with_bad_usage_says_so_on_the_async_path_too() -> None:
    m = BudgetManager()
    m.register_agent("writer", max_tokens=100)
    held = m.reserve("writer", 30, 10)
    with pytest.raises(InvalidTokenCountError, match="still held"):
        asyncio.run(m.acommit(held, Usage(-1, 0)))
    assert m.status()["writer"].reserved == 40
