"""Switching from ``tbcontracts`` is a change of import; and where it fails, we don't."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tbcontracts

import tbc_integrations
from tbc_integrations import BudgetExceededError, BudgetManager, TBCError, UnknownAgentError
from tests.conftest import STORE_KINDS, store_url

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


# ------------------------------------------------- tbcontracts' ledger-first patterns
# The form tbcontracts documents for its lower layer: a bare ``Ledger()`` that only
# knows allocations, and the priorities and reserves in a contracts dict handed to
# ``Reallocator(contracts, ledger)``.


def bare_team(mod: Any) -> tuple[dict[str, Any], Any]:
    """A planner (priority 4) and a summariser (priority 2) on a bare ledger."""
    contracts = {
        "planner": mod.BudgetContract("planner", priority=4, max_tokens=800, min_reserve=80),
        "summariser": mod.BudgetContract("summariser", priority=2, max_tokens=600, min_reserve=60),
    }
    ledger = mod.Ledger()
    for name, contract in contracts.items():
        ledger.register(name, contract.max_tokens)
    return contracts, ledger


def test_given_contracts_stop_tokens_flowing_uphill() -> None:
    contracts, ledger = bare_team(tbc_integrations)
    ledger.record("summariser", 590)
    realloc = tbc_integrations.Reallocator(contracts, ledger)
    assert realloc.reallocate("summariser", 250) == 0  # the planner outranks it
    assert ledger.allocated("planner") == 800 and ledger.allocated("summariser") == 600
    assert realloc.find_donors(exclude="summariser") == []


def test_given_contracts_let_tokens_flow_down_to_their_reserve() -> None:
    contracts, ledger = bare_team(tbc_integrations)
    ledger.record("planner", 790)
    ledger.record("summariser", 400)  # 200 left, 60 of them its reserve
    realloc = tbc_integrations.Reallocator(contracts, ledger)
    assert realloc.find_donors(exclude="planner") == ["summariser"]
    assert realloc.reallocate("planner", 500) == 140
    assert ledger.remaining("summariser") == 60
    assert ledger.snapshot()["planner"] == {"allocated": 940, "consumed": 790, "remaining": 150}
    assert ledger.allocated("planner") + ledger.allocated("summariser") == 1400


def test_bare_ledger_reallocation_matches_tbcontracts() -> None:
    """The same calls on both packages move the same tokens, both ways."""

    def run(mod: Any) -> list[Any]:
        contracts, ledger = bare_team(mod)
        realloc = mod.Reallocator(contracts, ledger)
        ledger.record("summariser", 580)
        ledger.record("planner", 700)
        seen: list[Any] = [realloc.reallocate("summariser", 100)]
        seen.append(realloc.reallocate("planner", 50))  # summariser has nothing spare
        ledger.adjust_allocation("summariser", 300)
        seen.append(realloc.reallocate("planner", 400))
        seen.append(ledger.snapshot())
        return seen

    assert (
        run(tbc_integrations)
        == run(tbcontracts)
        == [
            0,
            0,
            260,
            {
                "planner": {"allocated": 1060, "consumed": 700, "remaining": 360},
                "summariser": {"allocated": 640, "consumed": 580, "remaining": 60},
            },
        ]
    )


def test_the_ledger_reserve_still_holds_under_a_smaller_given_one() -> None:
    """tbcontracts would drain the donor to its given reserve of 0; the ledger keeps 10%."""
    ledger = tbc_integrations.Ledger()
    ledger.register("lead", 100)
    ledger.register("helper", 500)  # the ledger's contract: reserve 50
    given = {
        "lead": tbc_integrations.BudgetContract("lead", priority=2, max_tokens=100),
        "helper": tbc_integrations.BudgetContract(
            "helper", priority=1, max_tokens=500, min_reserve=0
        ),
    }
    realloc = tbc_integrations.Reallocator(given, ledger)
    assert realloc.reallocate("lead", 1000) == 450
    assert ledger.remaining("helper") == 50


def test_reallocator_reads_the_given_dict_at_each_call() -> None:
    contracts, ledger = bare_team(tbc_integrations)
    realloc = tbc_integrations.Reallocator(contracts, ledger)
    ledger.record("summariser", 590)
    assert realloc.reallocate("summariser", 100) == 0
    contracts["planner"] = tbc_integrations.BudgetContract(
        "planner", priority=1, max_tokens=800, min_reserve=80
    )
    assert realloc.contracts is contracts
    assert realloc.reallocate("summariser", 100) == 100
    assert ledger.allocated("planner") == 700


def test_agreeing_contracts_take_the_ledgers_own_path() -> None:
    m = BudgetManager()
    m.register_agent("lo", priority=1, max_tokens=100)
    m.register_agent("hi", priority=2, max_tokens=10)
    events: list[Any] = []
    m.subscribe(events.append)
    assert tbc_integrations.Reallocator(m.contracts, m).reallocate("hi", 30) == 30
    assert [(e.kind, e.donors) for e in events] == [("transfer", (("lo", 30),))]


def test_reallocator_refuses_contracts_that_are_not_contracts() -> None:
    ledger = tbc_integrations.Ledger()
    ledger.register("a", 10)
    with pytest.raises(tbc_integrations.ContractError, match="BudgetContract"):
        tbc_integrations.Reallocator({"a": tbcontracts.BudgetContract("a")}, ledger)


# ----------------------------------------------------------------- find_donors


def test_find_donors_leaves_out_whom_reallocate_skips_where_tbcontracts_lists_them() -> None:
    def donors_and_moved(mod: Any) -> tuple[list[str], int]:
        contracts, ledger = bare_team(mod)
        ledger.record("summariser", 590)
        realloc = mod.Reallocator(contracts, ledger)
        return realloc.find_donors(exclude="summariser"), realloc.reallocate("summariser", 100)

    assert donors_and_moved(tbcontracts) == (["planner"], 0)  # listed, then skipped
    assert donors_and_moved(tbc_integrations) == ([], 0)


def test_find_donors_is_exactly_who_gives_in_order() -> None:
    m = BudgetManager()
    m.register_agent("boss", priority=5, max_tokens=100, min_reserve=0)
    m.register_agent("peer", priority=3, max_tokens=200, min_reserve=20)
    m.register_agent("idle", priority=1, max_tokens=300, min_reserve=30)
    m.register_agent("done", priority=4, max_tokens=50, min_reserve=50)
    m.register_agent("needy", priority=3, max_tokens=10, min_reserve=0)
    m.register_agent("source", priority=1, max_tokens=400, min_reserve=0)
    m.register_agent("user", priority=2, max_tokens=10, min_reserve=10, depends_on=["source"])
    m.complete("done")
    donors = m.reallocator.find_donors(exclude="needy")
    # done (complete) first; then lowest priority; boss outranks needy; source has not
    # run yet and user still needs its output.
    assert donors == ["done", "idle", "peer"]
    events: list[Any] = []
    m.subscribe(events.append)
    assert m.reallocator.reallocate("needy", 10_000) == 50 + 270 + 180
    assert [d for d, _ in events[0].donors] == donors
    assert m.reallocator.find_donors(exclude="needy") == []


def test_find_donors_for_a_money_only_agent_is_empty() -> None:
    m = BudgetManager()
    m.register_agent("paid", max_cost="1.00")
    m.register_agent("spare", max_tokens=100)
    assert m.reallocator.find_donors(exclude="paid") == []
    assert m.reallocator.reallocate("paid", 50) == 0
    with pytest.raises(UnknownAgentError):
        m.reallocator.find_donors(exclude="nobody")


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_find_donors_agrees_with_reallocate_on_every_store(kind: str, tmp_path: Path) -> None:
    m = BudgetManager(store=store_url(kind, tmp_path))
    m.register_agent("a", priority=1, max_tokens=100, min_reserve=10)
    m.register_agent("b", priority=2, max_tokens=200, min_reserve=20)
    m.register_agent("c", priority=2, max_tokens=5, min_reserve=0)
    m.register_agent("d", priority=3, max_tokens=400)
    m.record_usage("b", 50)
    events: list[Any] = []
    m.subscribe(events.append)
    donors = m.reallocator.find_donors(exclude="c")
    assert donors == ["a", "b"]
    assert m.reallocator.reallocate("c", 1000) == 90 + 130
    assert [d for d, _ in events[-1].donors] == donors


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_given_contracts_on_every_store(kind: str, tmp_path: Path) -> None:
    ledger = tbc_integrations.Ledger(store_url(kind, tmp_path))
    ledger.register("lead", 100)
    ledger.register("aide", 100)
    given = {
        "lead": tbc_integrations.BudgetContract("lead", priority=1, max_tokens=100),
        "aide": tbc_integrations.BudgetContract("aide", priority=2, max_tokens=100),
    }
    realloc = tbc_integrations.Reallocator(given, ledger)
    assert realloc.find_donors(exclude="lead") == []
    if kind.startswith("redis"):  # Redis runs only its built-in policies
        with pytest.raises(tbc_integrations.ContractError, match="'aide': priority 2"):
            realloc.reallocate("lead", 50)
    else:
        assert realloc.reallocate("lead", 50) == 0
        assert realloc.reallocate("aide", 50) == 50
    assert ledger.allocated("lead") + ledger.allocated("aide") == 200


# --------------------------------------------------------------------- history


def test_ledger_history_keeps_each_record_with_its_note() -> None:
    ledger = tbc_integrations.Ledger()
    ledger.register("scout", 500)
    ledger.register("judge", 500)
    ledger.record("scout", 120, note="web search")
    ledger.record("judge", 40)
    ledger.record("scout", 35, note="follow-up")
    scout = ledger.history("scout")
    assert [(e.agent_name, e.tokens, e.note) for e in scout] == [
        ("scout", 120, "web search"),
        ("scout", 35, "follow-up"),
    ]
    assert scout[0].timestamp <= scout[1].timestamp
    assert [e.tokens for e in ledger.history()] == [120, 40, 35]
    assert ledger.history("nobody") == []


def test_manager_history_has_record_usage_and_governed_calls() -> None:
    m = BudgetManager()
    m.register_agent("scout", max_tokens=50, min_reserve=0)

    @m.govern("scout")
    def look_up(query: str) -> str:
        return "three word answer"

    m.record_usage("scout", 20, note="provider usage")
    look_up("two words")
    with pytest.raises(BudgetExceededError):
        m.record_usage("scout", 100)  # recorded in full, then refused
    assert [(e.tokens, e.note) for e in m.ledger.history("scout")] == [
        (20, "provider usage"),
        (5, "look_up"),
        (100, "usage"),
    ]
    assert m.consumed("scout") == sum(e.tokens for e in m.history())


def test_history_keeps_the_most_recent_entries() -> None:
    ledger = tbc_integrations.Ledger()
    ledger.HISTORY_LIMIT = 2
    ledger.register("a", 100)
    for tokens in (1, 2, 3):
        ledger.record("a", tokens)
    assert [e.tokens for e in ledger.history("a")] == [2, 3]


# ------------------------------------------------------------ last_confidence


def test_last_confidence_follows_record_usage_like_tbcontracts() -> None:
    def seen(mod: Any) -> list[Any]:
        m = mod.BudgetManager()
        contract = m.register_agent("critic", max_tokens=1000, confidence_threshold=0.8)
        out = [contract.last_confidence]
        m.record_usage("critic", 50, confidence=0.65)
        out += [m.contracts["critic"].last_confidence, contract.last_confidence]
        m.record_usage("critic", 10)  # no confidence: the last one stays
        out.append(m.contracts["critic"].last_confidence)
        return out

    assert seen(tbc_integrations) == seen(tbcontracts) == [None, 0.65, 0.65, 0.65]


def test_last_confidence_from_govern_and_from_another_manager() -> None:
    store = tbc_integrations.stores.MemoryStore()
    m = BudgetManager(store=store)
    m.register_agent("critic", max_tokens=1000, confidence_threshold=0.8)

    @m.govern("critic", confidence_fn=lambda out: 0.3)
    def review(text: str) -> str:
        return "ok"

    review("draft")
    other = BudgetManager(store=store)
    assert other.contracts["critic"].last_confidence == 0.3
    m.record_usage("critic", 1, confidence=0.85)
    assert other.contracts["critic"].last_confidence == 0.85


def test_last_confidence_does_not_change_what_a_contract_is() -> None:
    import copy
    import pickle

    m = BudgetManager()
    bound = m.register_agent("a", max_tokens=100, confidence_threshold=0.5)
    m.record_usage("a", 1, confidence=0.2)
    plain = tbc_integrations.BudgetContract("a", max_tokens=100, confidence_threshold=0.5)
    assert bound == plain and hash(bound) == hash(plain)
    assert bound.to_dict() == plain.to_dict()
    assert bound.last_confidence == 0.2 and plain.last_confidence is None
    assert pickle.loads(pickle.dumps(bound)).last_confidence is None
    assert copy.copy(bound).last_confidence is None
    with pytest.raises(AttributeError):
        bound.last_confidence = 0.9  # type: ignore[misc]
