"""What the rewritten engine must do: each test pins one defect of the current stores.

Every test runs on every store it concerns (memory, a SQLite file, Redis), goes
through the public API only, and checks that an input the engine refuses changes
nothing (``status()`` and the open reservations are compared before and after).

1. usage tuples are validated like dicts; counts above 2**53-1 are refused;
2. the store, not the caller's copy of a reservation, decides what is settled;
3. agent names are checked (control characters, surrogates, length);
4. namespaces are checked (no trailing newline, at most 128 characters);
5. ``depends_on`` and the weighted policy's ``alpha`` are checked;
6. a bad confidence or lease is an ``InvalidValueError``, not a token-count error;
7. events are delivered only for what happened (replay equals live);
8. two processes registering a dependency cycle at once never both succeed;
9. SQLite URLs: ``:memory:`` is one ledger, query options are checked;
10. the default clock does not follow the wall clock backwards;
11. a store that lost its state says so instead of starting from full budgets.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import tbc_integrations
from tbc_integrations import (
    AgentStatus,
    BudgetContract,
    BudgetExceededError,
    BudgetManager,
    ContractError,
    InvalidTokenCountError,
    Ledger,
    NamespaceLostError,
    Reservation,
    ReservationError,
    StoreUnavailableError,
    TBCError,
    Usage,
)
from tbc_integrations.audit import AuditLog, replay_log
from tbc_integrations.events import BudgetEvent, Expired
from tbc_integrations.policies import (
    ConfidenceWeightedPolicy,
    Donor,
    GreedyPolicy,
    Needy,
    ReallocationPolicy,
)
from tbc_integrations.replay import LedgerReplay
from tbc_integrations.stores import SQLiteStore, store_from_url
from tests.conftest import STORE_KINDS, FakeClock, store_url

# The class the fix adds (TBCError + ValueError, base of InvalidTokenCountError); looked
# up by name so that this file collects before it exists.
InvalidValueError: Any = getattr(tbc_integrations, "InvalidValueError", None)

MAX_SAFE = 2**53 - 1
DURABLE_KINDS = tuple(k for k in STORE_KINDS if k != "memory")
State = tuple[dict[str, AgentStatus], list[Reservation]]


# ------------------------------------------------------------------ helpers
@pytest.fixture(params=STORE_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def url(kind: str, tmp_path: Path) -> str:
    """A fresh, empty store of ``kind`` (the Redis database is flushed)."""
    return store_url(kind, tmp_path)


def team(
    url: str,
    namespace: str = "default",
    clock: FakeClock | None = None,
    policy: ReallocationPolicy | None = None,
) -> BudgetManager:
    """writer and critic (priority 2, 100 tokens each) and a big low-priority pool."""
    m = BudgetManager(store=url, namespace=namespace, clock=clock or FakeClock(), policy=policy)
    m.register_agent("writer", priority=2, max_tokens=100)
    m.register_agent("critic", priority=2, max_tokens=100)
    m.register_agent("pool", priority=1, max_tokens=1_000)
    return m


def state(m: Ledger) -> State:
    """Everything a refused verb must leave as it was."""
    return m.status(), sorted(m.store.open_reservations())


def names_value(message: str, value: object) -> bool:
    """True when an error message names ``value`` (long strings may be named by length)."""
    if repr(value) in message or (not isinstance(value, str) and str(value) in message):
        return True
    return isinstance(value, str) and len(value) > 64 and str(len(value)) in message


def invalid_value_error() -> type[BaseException]:
    if InvalidValueError is None:
        pytest.fail("tbc_integrations.InvalidValueError does not exist")
    assert isinstance(InvalidValueError, type) and issubclass(InvalidValueError, BaseException)
    return InvalidValueError


# --------------------------------------------- 1. usage tuples and big counts
BAD_COUNTS: list[tuple[Any, str]] = [
    (-500, "-500"),
    (1.5, "1.5"),
    (True, "True"),
    (float("nan"), "nan"),
    (2**53, str(2**53)),
]
BAD_COUNT_IDS = ["negative", "float", "bool", "nan", "2**53"]


@pytest.mark.parametrize(("bad", "text"), BAD_COUNTS, ids=BAD_COUNT_IDS)
@pytest.mark.parametrize("slot", [0, 1], ids=["input", "output"])
def test_commit_validates_a_usage_tuple(url: str, bad: Any, text: str, slot: int) -> None:
    m = team(url)
    r = m.reserve("writer", 60, 20)
    before = state(m)
    usage = Usage(bad, 0) if slot == 0 else Usage(0, bad)
    with pytest.raises(InvalidTokenCountError) as info:
        m.commit(r, usage)
    assert "writer" in str(info.value) and text in str(info.value)
    assert state(m) == before  # unchanged, and the reservation is still open
    assert m.commit(r, Usage(50, 10)) == 0  # a correct commit afterwards works
    after = m.status()["writer"]
    assert (after.consumed, after.reserved, after.remaining) == (60, 0, 40)


@pytest.mark.parametrize(("bad", "text"), BAD_COUNTS, ids=BAD_COUNT_IDS)
@pytest.mark.parametrize("verb", ["charge", "record_usage"])
def test_charge_and_record_usage_validate_a_usage_tuple(
    url: str, bad: Any, text: str, verb: str
) -> None:
    m = team(url)
    m.commit(m.reserve("writer", 10, 0), (10, 0))
    before = state(m)
    record: Callable[[str, Any], object] = m.charge if verb == "charge" else m.record_usage
    for usage in (Usage(bad, 0), Usage(0, bad)):
        with pytest.raises(InvalidTokenCountError) as info:
            record("writer", usage)
        assert "writer" in str(info.value) and text in str(info.value)
        assert state(m) == before
    record("writer", Usage(5, 5))
    assert m.status()["writer"].consumed == 20


def big_team(url: str) -> BudgetManager:
    """An agent with nearly the largest allowed budget, and a donor that could lend it more
    (a namespace holds at most 2**53 - 1 tokens in all)."""
    m = BudgetManager(store=url, clock=FakeClock())
    m.register_agent("big", priority=2, max_tokens=MAX_SAFE - 1_000)
    m.register_agent("donor", priority=1, max_tokens=1_000, min_reserve=0)
    return m


@pytest.mark.parametrize(
    ("inp", "out", "named"),
    [
        (2**53, 0, 2**53),
        (0, 2**53, 2**53),
        (MAX_SAFE, 1, 2**53),  # each count fits, their sum does not
        (2**64, 0, 2**64),
    ],
    ids=["input", "output", "sum", "2**64"],
)
def test_token_counts_above_2_53_are_refused_naming_the_value(
    url: str, inp: int, out: int, named: int
) -> None:
    m = big_team(url)
    before = state(m)
    for verb in (m.reserve, m.check):
        try:
            verb("big", inp, out)
        except TBCError as exc:  # an OverflowError (or no error) fails the test
            assert str(named) in str(exc), str(exc)
        else:
            pytest.fail(f"{verb.__name__}('big', {inp}, {out}) was accepted")
        assert state(m) == before  # not even counted as a budget refusal
    r = m.reserve("big", MAX_SAFE - 10, 10)  # the largest request that fits is fine
    assert r.amount == MAX_SAFE
    m.release(r)


def test_a_contract_above_2_53_is_refused(url: str) -> None:
    with pytest.raises(ContractError, match=str(2**53)):
        BudgetContract("big", max_tokens=2**53)
    m = BudgetManager(store=url)
    m.register_agent("ok", max_tokens=MAX_SAFE)  # the limit itself is allowed
    before = state(m)
    for value in (2**53, 2**64):
        with pytest.raises(ContractError) as info:
            m.register_agent("big", max_tokens=value)
        assert str(value) in str(info.value)
        assert state(m) == before and set(m.contracts) == {"ok"}


# ------------------------------------------------- 2. the store decides
TAMPERS: dict[str, Callable[[Reservation], Reservation]] = {
    "agent": lambda r: r._replace(agent="critic"),
    "amounts": lambda r: r._replace(input_tokens=3, output_tokens=4),
    "bigger-amounts": lambda r: r._replace(input_tokens=r.input_tokens + 50),
    "loans": lambda r: r._replace(loans=(("critic", 50),)),
    "no-loans": lambda r: r._replace(loans=()),
}


def twin_url(kind: str, url: str) -> tuple[str, str]:
    """A second, identical ledger: another namespace of a durable store, or a new memory one."""
    return ("memory://", "default") if kind == "memory" else (url, "twin")


@pytest.mark.parametrize("tamper", list(TAMPERS))
@pytest.mark.parametrize("verb", ["commit", "release"])
def test_settling_a_tampered_copy_settles_what_the_store_issued(
    kind: str, url: str, tamper: str, verb: str
) -> None:
    m = team(url)
    r = m.reserve("writer", 150, 30)  # 80 borrowed from pool
    assert r.loans == (("pool", 80),)
    twin = team(*twin_url(kind, url))
    genuine = twin.reserve("writer", 150, 30)
    critic_before = m.status()["critic"]
    forged = TAMPERS[tamper](r)
    if verb == "commit":
        assert m.commit(forged, (100, 20)) == 0
        twin.commit(genuine, (100, 20))
    else:
        m.release(forged)
        twin.release(genuine)
    assert m.status() == twin.status()  # writer's real amounts and loans were settled
    assert m.status()["critic"] == critic_before
    assert m.store.open_reservations() == []
    before = state(m)
    with pytest.raises(ReservationError):
        m.commit(r, (1, 0))  # it is settled now, whatever copy is used
    assert state(m) == before


FORGED_IDS: dict[str, Callable[[Reservation, Reservation], str]] = {
    "nope": lambda r, other: "nope",
    "empty": lambda r, other: "",
    "pipe-suffix": lambda r, other: f"{r.id}|0",
    "member-shaped": lambda r, other: f"{r.id}|150|30|6|writer",
    "other-agent-name": lambda r, other: "critic",
    "id-plus-name": lambda r, other: f"{r.id}critic",
    "other-id-with-pipe": lambda r, other: f"{other.id}|writer",
}


@pytest.mark.parametrize("forge", list(FORGED_IDS))
@pytest.mark.parametrize("verb", ["commit", "release"])
def test_an_id_the_store_never_issued_is_refused(url: str, forge: str, verb: str) -> None:
    m = team(url)
    r = m.reserve("writer", 150, 30)
    other = m.reserve("critic", 10, 0)
    before = state(m)
    forged = r._replace(id=FORGED_IDS[forge](r, other))
    with pytest.raises(ReservationError):
        if verb == "commit":
            m.commit(forged, (10, 0))
        else:
            m.release(forged)
    assert state(m) == before
    assert m.commit(r, (100, 20)) == 0 and m.commit(other, (10, 0)) == 0


@pytest.mark.parametrize("kind", DURABLE_KINDS)
def test_a_reservation_of_another_namespace_is_refused(url: str) -> None:
    x, y = team(url, "x"), team(url, "y")
    r = x.reserve("writer", 150, 30)
    before_x, before_y = state(x), state(y)
    for copy in (r, r._replace(namespace="y")):
        with pytest.raises(ReservationError):
            y.commit(copy, (10, 0))
        with pytest.raises(ReservationError):
            y.release(copy)
    assert state(x) == before_x and state(y) == before_y
    assert x.commit(r, (100, 20)) == 0 and x.status()["writer"].consumed == 120


# ------------------------------------------------------ 3. agent names
BAD_NAMES: list[Any] = ["", None, 5, "a\nb", "a\x00", "\ud800", "x" * 257]
BAD_NAME_IDS = ["empty", "None", "int", "newline", "nul", "surrogate", "257-chars"]
GOOD_NAMES = ["a|b", "a:b", "{a}", "{x}|y:z", "two words", "écrivain", "n" * 256]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=BAD_NAME_IDS)
def test_a_bad_agent_name_is_refused_everywhere(url: str, bad: Any) -> None:
    with pytest.raises(ContractError) as info:
        BudgetContract(bad)
    assert names_value(str(info.value), bad), str(info.value)
    m = team(url)
    before = state(m)
    with pytest.raises(ContractError) as info:
        m.register_agent(bad, max_tokens=10)
    assert names_value(str(info.value), bad), str(info.value)
    verbs: dict[str, Callable[[], object]] = {
        "reserve": lambda: m.reserve(bad, 1, 1),
        "check": lambda: m.check(bad, 1, 1),
        "charge": lambda: m.charge(bad, Usage(1, 0)),
        "reallocate": lambda: m.reallocate(bad, 1),
        "complete": lambda: m.complete(bad),
        "record_confidence": lambda: m.record_confidence(bad, 0.5),
        "remaining": lambda: m.remaining(bad),
    }
    for name, call in verbs.items():
        try:
            call()
        except ContractError as exc:
            assert names_value(str(exc), bad), f"{name}: {exc}"
        except Exception as exc:
            pytest.fail(f"{name}({bad!r}) raised {type(exc).__name__}, not ContractError: {exc}")
        else:
            pytest.fail(f"{name}({bad!r}) was accepted")
        assert state(m) == before, name
    assert set(m.contracts) == {"writer", "critic", "pool"}


def test_names_with_separators_braces_spaces_and_letters_work(kind: str, url: str) -> None:
    clock = FakeClock()
    m = BudgetManager(store=url, clock=clock, lease_seconds=30)
    path = Path(tempfile.mkdtemp()) / "audit.jsonl"
    log = AuditLog(path).attach(m)
    for name in GOOD_NAMES:
        assert BudgetContract(name).agent_name == name
        m.register_agent(name, priority=1, max_tokens=300, min_reserve=30)
    held: list[Reservation] = []
    for i, name in enumerate(GOOD_NAMES):
        r = m.reserve(name, 350, 0)  # more than its own 300: borrows from the others
        assert r.agent == name and r.amount == 350 and r.borrowed >= 50
        assert all(donor in GOOD_NAMES and donor != name for donor, _ in r.loans)
        if i % 3 == 0:
            m.commit(r, (120, 0))
        elif i % 3 == 1:
            m.release(r)
        else:
            held.append(r)
    assert {r.agent for r in m.store.open_reservations()} == {r.agent for r in held}
    clock.advance(60)
    assert m.expire() == len(held)
    for r in held:
        assert m.commit(r, (30, 0)) == 0  # late commits
    m.record_confidence(GOOD_NAMES[0], 0.5)
    m.complete(GOOD_NAMES[1])
    assert m.reallocate(GOOD_NAMES[2], 20) == 20
    before = state(m)
    with pytest.raises(BudgetExceededError):
        m.reserve(GOOD_NAMES[5], 10_000)
    after = state(m)
    refused = after[0][GOOD_NAMES[5]]
    assert refused.refusals == before[0][GOOD_NAMES[5]].refusals + 1
    assert {n: s for n, s in after[0].items() if n != GOOD_NAMES[5]} == {
        n: s for n, s in before[0].items() if n != GOOD_NAMES[5]
    }
    status = m.status()
    log.close()
    assert set(status) == set(GOOD_NAMES)
    assert all(s.agent == n for n, s in status.items())
    assert sum(s.allocated for s in status.values()) == 300 * len(GOOD_NAMES)
    assert sum(s.borrowed for s in status.values()) == sum(s.lent for s in status.values())
    consumed = {n: 120 if i % 3 == 0 else 30 if i % 3 == 2 else 0 for i, n in enumerate(GOOD_NAMES)}
    assert {n: s.consumed for n, s in status.items()} == consumed
    assert status[GOOD_NAMES[0]].last_confidence == 0.5 and status[GOOD_NAMES[1]].complete
    assert replay_log(path).status() == status
    if kind != "memory":
        assert BudgetManager(store=url).status() == status  # read back by another manager


# ---------------------------------------------------------- 4. namespaces
BAD_NAMESPACES = ["run\n", "", "a b", "x" * 129]


@pytest.mark.parametrize("bad", BAD_NAMESPACES, ids=["newline", "empty", "space", "129-chars"])
def test_a_bad_namespace_is_refused(kind: str, url: str, tmp_path: Path, bad: str) -> None:
    target = "sqlite:///" + str(tmp_path / "ns" / "fresh.db") if kind == "sqlite" else url
    client = redis.Redis.from_url(url) if kind == "redis" else None
    keys_before = client.dbsize() if client is not None else 0
    makers: dict[str, Callable[[], object]] = {
        "Ledger": lambda: Ledger(namespace=bad),
        "BudgetManager": lambda: BudgetManager(namespace=bad),
        "Ledger(url)": lambda: Ledger(store=target, namespace=bad),
        "BudgetManager(url)": lambda: BudgetManager(store=target, namespace=bad),
        "store_from_url": lambda: store_from_url(target, namespace=bad),
    }
    for name, make in makers.items():
        with pytest.raises(ContractError) as info:
            make()
        assert names_value(str(info.value), bad), f"{name}: {info.value}"
    assert not (tmp_path / "ns").exists()  # nothing created
    if client is not None:
        assert client.dbsize() == keys_before
        client.close()


@pytest.mark.parametrize("good", ["run-1", "a:b.c_d"])
def test_a_good_namespace_works(kind: str, url: str, good: str) -> None:
    m = team(url, good)
    assert m.namespace == good and store_from_url(url, namespace=good).namespace == good
    r = m.reserve("writer", 150, 30)
    assert r.namespace == good
    assert m.commit(r, (100, 20)) == 0
    if kind != "memory":
        assert BudgetManager(store=url, namespace=good).status() == m.status()
        assert BudgetManager(store=url, namespace="other").status() == {}


# --------------------------------------------- 5. depends_on and alpha
@pytest.mark.parametrize("deps", ["abc", 5], ids=["string", "int"])
def test_depends_on_must_be_a_list_of_names(url: str, deps: Any) -> None:
    with pytest.raises(ContractError) as info:
        BudgetContract("w", depends_on=deps)
    if isinstance(deps, str):
        assert "a string is not a list of names" in str(info.value)
    m = team(url)
    before = state(m)
    with pytest.raises(ContractError) as info:
        m.register_agent("w", depends_on=deps)
    if isinstance(deps, str):
        assert "a string is not a list of names" in str(info.value)
    assert state(m) == before and "w" not in m.contracts


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0, -1])
def test_the_weighted_policy_refuses_a_bad_alpha(alpha: float) -> None:
    with pytest.raises(ContractError) as info:
        ConfidenceWeightedPolicy(alpha=alpha)
    assert names_value(str(info.value), alpha), str(info.value)
    assert ConfidenceWeightedPolicy(alpha=0.5).alpha == 0.5


# ------------------------------------------------------ 6. InvalidValueError
def test_invalid_value_error_is_the_base_of_token_count_errors() -> None:
    cls = invalid_value_error()
    assert issubclass(cls, TBCError) and issubclass(cls, ValueError)
    assert issubclass(InvalidTokenCountError, cls)


@pytest.mark.parametrize("bad", [1.5, float("nan"), "x"], ids=["1.5", "nan", "str"])
def test_a_bad_confidence_is_an_invalid_value_not_a_token_count(url: str, bad: Any) -> None:
    cls = invalid_value_error()
    m = team(url)
    before = state(m)
    with pytest.raises(cls) as info:
        m.record_confidence("writer", bad)
    assert not isinstance(info.value, InvalidTokenCountError)
    assert "writer" in str(info.value) and names_value(str(info.value), bad)
    assert state(m) == before


@pytest.mark.parametrize("bad", [0, float("nan"), -1], ids=["0", "nan", "-1"])
def test_a_bad_lease_is_an_invalid_value_not_a_token_count(url: str, bad: Any) -> None:
    cls = invalid_value_error()
    for make in (Ledger, BudgetManager):
        with pytest.raises(cls) as info:
            make(lease_seconds=bad)
        assert not isinstance(info.value, InvalidTokenCountError)
    m = team(url)
    before = state(m)
    with pytest.raises(cls) as info:
        m.reserve("writer", 10, 0, lease_seconds=bad)
    assert not isinstance(info.value, InvalidTokenCountError)
    assert state(m) == before


# --------------------------------------- 7. events only for what happened
class PolicyBoom(Exception):
    """What the exploding policy raises."""


class ExplodingPolicy:
    """A reallocation policy whose plan always fails (the verb must roll back)."""

    name = "exploding"

    def plan(
        self, needy: Needy, need: int, donors: Iterator[Donor], *, partial: bool
    ) -> list[tuple[str, int]]:
        raise PolicyBoom(f"no plan for {needy.name}")


def without_refusals(status: dict[str, AgentStatus]) -> dict[str, dict[str, Any]]:
    return {n: {k: v for k, v in s.to_dict().items() if k != "refusals"} for n, s in status.items()}


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k != "redis"])  # custom policies
def test_a_rolled_back_verb_delivers_no_expiry(kind: str, url: str) -> None:
    clock = FakeClock()
    m = team(url, clock=clock, policy=ExplodingPolicy())
    seen: list[BudgetEvent] = []
    replay = LedgerReplay(m.contracts)
    m.subscribe(seen.append)
    m.subscribe(replay.apply)
    r = m.reserve("writer", 10, 0, lease_seconds=5)  # no borrowing: the policy is not asked
    clock.advance(10)  # the lease lapses, nothing has swept it yet
    with pytest.raises((PolicyBoom, TBCError)):
        m.reserve("writer", 500, 0)  # must borrow: the policy raises, the verb rolls back
    m.expire()
    expired = [e.reservation_id for e in seen if isinstance(e, Expired)]
    assert expired == [r.id], f"{len(expired)} Expired events delivered for one lapsed lease"
    assert m.status()["writer"].reserved == 0
    assert replay.status() == m.status()
    twin_clock = FakeClock()
    twin = team(*twin_url(kind, url), clock=twin_clock)
    twin.reserve("writer", 10, 0, lease_seconds=5)
    twin_clock.advance(10)
    twin.expire()
    assert without_refusals(m.status()) == without_refusals(twin.status())


# weighted by repetition: leases that lapse and refused settles are what catch a store
# that delivers events for work it rolled back
VERBS = (
    "reserve",
    "reserve",
    "reserve",
    "commit",
    "commit",
    "release",
    "resettle",
    "resettle",
    "charge",
    "reallocate",
    "complete",
    "confidence",
    "adjust",
    "advance",
    "advance",
    "bad",
)
AGENTS = ("lead", "scout", "pool")
LEASES = (5.0, 5.0, 600.0)
STEPS = (1.0, 10.0, 10.0)
Op = tuple[str, int, int, int, float]
ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(VERBS),
        st.integers(0, 11),
        st.integers(0, 400),
        st.integers(0, 200),
        st.floats(0, 1),
    ),
    min_size=10,
    max_size=50,
)
_runs = count()


def run_ops(m: BudgetManager, clock: FakeClock, ops: list[Op]) -> None:
    """Apply a list of verbs; refusals are expected, and a malformed call changes nothing."""
    held: list[Reservation] = []
    settled: list[Reservation] = []
    for verb, i, x, y, f in ops:
        agent = AGENTS[i % 3]
        try:
            if verb == "reserve":
                held.append(m.reserve(agent, x, y, lease_seconds=LEASES[(i // 3) % 3]))
            elif verb in ("commit", "release") and held:
                r = held.pop(i % len(held))
                settled.append(r)
                if verb == "commit":
                    m.commit(r, Usage(x, y // 2))
                else:
                    m.release(r)
            elif verb == "resettle" and settled:
                again = settled[i % len(settled)]  # refused: already settled
                if i % 2:
                    m.commit(again, Usage(1, 0))
                else:
                    m.release(again)
            elif verb == "charge":
                m.charge(agent, Usage(x // 4, y // 4))
            elif verb == "reallocate":
                m.reallocate(agent, x)
            elif verb == "complete":
                m.complete(agent)
            elif verb == "confidence":
                m.record_confidence(agent, f)
            elif verb == "adjust":
                m.adjust_allocation(agent, (x - 200) * 5)  # a revocation may be refused
            elif verb == "advance":
                clock.advance(STEPS[i % 3])
            elif verb == "bad":
                before = state(m)
                with pytest.raises(InvalidTokenCountError):
                    m.reserve(agent, -1 - x, y)
                assert state(m) == before
        except (BudgetExceededError, ReservationError):
            pass


@pytest.mark.parametrize("kind", STORE_KINDS)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=ops_strategy)
@example(
    ops=[
        ("reserve", 1, 50, 0, 0.0),  # scout, 5 s lease
        ("reserve", 2, 30, 0, 0.0),  # pool, 5 s lease
        ("commit", 1, 30, 0, 0.0),  # settles pool's
        ("advance", 1, 0, 0, 0.0),  # 10 s: scout's lease lapses
        ("resettle", 0, 0, 0, 0.0),  # refused; on SQLite it rolls back the sweep
        ("reserve", 0, 10, 10, 0.0),
    ]
)
@example(ops=[("confidence", 0, 0, 0, 0.1 + 0.2)])  # every digit of a float reaches the log
def test_replaying_the_audit_log_equals_live_status(
    kind: str, tmp_path: Path, ops: list[Op]
) -> None:
    n = next(_runs)
    url = store_url(kind, tmp_path)  # one SQLite file for every example: namespaces differ
    clock = FakeClock()
    m = BudgetManager(store=url, namespace=f"run-{n}", clock=clock)
    path = tmp_path / f"audit-{n}.jsonl"
    log = AuditLog(path).attach(m)
    m.register_agent("pool", priority=1, max_tokens=2_000, min_reserve=100)
    m.register_agent("scout", priority=2, max_tokens=400, depends_on=["pool"])
    m.register_agent(
        "lead", priority=3, max_tokens=600, confidence_threshold=0.8, max_output_tokens=400
    )
    try:
        run_ops(m, clock, ops)
        live = m.status()  # reclaims lapsed leases while the log still listens
    finally:
        log.close()
    assert replay_log(path).status() == live
    m.store.close()


# ------------------------------------------------- 8. registration races
_barrier: Any = None
FILLERS = 100


def _race_init(barrier: Any) -> None:
    global _barrier
    _barrier = barrier


def _race_register(url: str, namespace: str, name: str, dep: str) -> str:
    """Register ``name`` depending on ``dep`` at the same moment as the other process."""
    m = BudgetManager(store=url, namespace=namespace)
    m.status()  # connected before the start line
    _barrier.wait(timeout=30)
    try:
        m.register_agent(name, max_tokens=100, depends_on=[dep])
    except ContractError as exc:
        return f"refused: {exc}"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"
    finally:
        m.store.close()
    return "ok"


@pytest.mark.parametrize("kind", DURABLE_KINDS)
def test_two_processes_never_register_a_dependency_cycle(url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    outcomes: list[tuple[str, list[str], bool, list[str]]] = []
    with ctx.Pool(2, initializer=_race_init, initargs=(barrier,)) as pool:
        for i in range(20):
            ns = f"race-{i}"
            # a namespace of realistic size: reading its contracts takes a moment
            fill = BudgetManager(store=url, namespace=ns)
            for f in range(FILLERS):
                fill.register_agent(f"filler-{f}", max_tokens=10)
            fill.store.close()
            results = pool.starmap(
                _race_register, [(url, ns, "a", "b"), (url, ns, "b", "a")], chunksize=1
            )
            contracts = BudgetManager(store=url, namespace=ns).contracts
            cycle = (
                "a" in contracts
                and "b" in contracts
                and "b" in contracts["a"].depends_on
                and "a" in contracts["b"].depends_on
            )
            outcomes.append((ns, results, cycle, sorted(set(contracts) & {"a", "b"})))
    both = [o for o in outcomes if o[1].count("ok") == 2]
    cycles = [o for o in outcomes if o[2]]
    assert not both, f"{len(both)}/20 rounds registered both: {both[0]}"
    assert not cycles, f"{len(cycles)}/20 rounds left a cycle in the store"
    for ns, results, _, names in outcomes:
        assert results.count("ok") == 1, (ns, results)
        assert any(r.startswith("refused") for r in results), (ns, results)
        assert len(names) == 1, (ns, names)  # the refused registration left nothing


# ------------------------------------------------------- 9. SQLite URLs
def test_sqlite_memory_url_is_one_ledger_across_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        m = BudgetManager(store="sqlite:///:memory:")
    except ContractError as exc:
        assert ":memory:" in str(exc) or "memory" in str(exc)
        assert list(tmp_path.iterdir()) == []
        return
    m.register_agent("writer", max_tokens=100)
    got: list[Reservation | BaseException] = []

    def other_thread() -> None:
        try:
            got.append(m.reserve("writer", 30, 10))
        except BaseException as exc:
            got.append(exc)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(got) == 1 and isinstance(got[0], Reservation), got
    assert m.commit(got[0], (20, 10)) == 0
    assert m.status()["writer"].consumed == 30
    assert list(tmp_path.iterdir()) == []  # nothing on disk


@pytest.mark.parametrize("query", ["mode=ro", "bogus=1"])
def test_sqlite_url_options_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    monkeypatch.chdir(tmp_path)
    makers: list[Callable[[str], object]] = [store_from_url, lambda u: BudgetManager(store=u)]
    for make in makers:
        with pytest.raises(ContractError) as info:
            make(f"sqlite:///x.db?{query}")
        assert query.split("=")[0] in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == []  # no 'x.db?...' file, no file at all


def test_sqlite_url_timeout_option_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = store_from_url("sqlite:///x.db?timeout=2")
    assert isinstance(store, SQLiteStore) and store.timeout == 2.0
    assert "?" not in store.path
    m = BudgetManager(store=store)
    m.register_agent("writer", max_tokens=10)
    assert m.remaining("writer") == 10
    names = [p.name for p in tmp_path.iterdir()]
    assert "x.db" in names and not [n for n in names if "?" in n], names


# ------------------------------------------------------------- 10. clock
_CLOCK_SCRIPT = textwrap.dedent(
    """
    import json, time

    real = time.time
    offset = [0.0]
    time.time = lambda: real() + offset[0]  # patched before the package is imported

    from tbc_integrations import BudgetContract, BudgetManager, Ledger

    out = {}
    for cls in (Ledger, BudgetManager):
        offset[0] = 0.0
        m = cls()
        m.add_contract(BudgetContract("writer", max_tokens=1000))
        keep = m.reserve("writer", 10, 0, lease_seconds=60)
        short = m.reserve("writer", 20, 0, lease_seconds=0.5)
        before = m.clock()
        offset[0] = -3600.0  # the wall clock steps back an hour
        after = m.clock()
        still_open = sorted(r.id for r in m.store.open_reservations())
        reserved = m.status()["writer"].reserved
        committed = m.commit(keep, (5, 0))
        time.sleep(0.8)  # past the short lease, in real time
        expired = m.expire()
        out[cls.__name__] = {
            "backwards": after < before,
            "open_after_jump": still_open == sorted([keep.id, short.id]),
            "reserved_after_jump": reserved,
            "committed": committed,
            "expired_after_lease": expired,
            "reserved_at_end": m.status()["writer"].reserved,
            "consumed": m.status()["writer"].consumed,
        }
    print(json.dumps(out))
    """
)


def test_the_default_clock_does_not_follow_the_wall_clock_backwards(tmp_path: Path) -> None:
    # time.time is patched in a fresh interpreter before the import, so an engine whose
    # default clock is the wall clock (however it binds it) sees the jump.
    done = subprocess.run(
        [sys.executable, "-c", _CLOCK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {
        "backwards": False,
        "open_after_jump": True,  # nothing lapsed
        "reserved_after_jump": 30,
        "committed": 0,
        "expired_after_lease": 1,  # the short lease was not extended by the hour
        "reserved_at_end": 0,
        "consumed": 5,
    }
    for cls in ("Ledger", "BudgetManager"):
        wrong = {k: v for k, v in out[cls].items() if v != expected[k]}
        assert not wrong, f"{cls}() default clock: {wrong} (expected {expected})"


def test_an_explicit_clock_still_moves_time(url: str) -> None:
    clock = FakeClock()
    m = team(url, clock=clock)
    r = m.reserve("writer", 10, 0, lease_seconds=5)
    clock.advance(4)
    before = state(m)
    assert m.expire() == 0 and state(m) == before
    clock.advance(2)
    assert m.expire() == 1
    assert m.status()["writer"].reserved == 0 and m.store.open_reservations() == []
    assert m.commit(r, (10, 0)) == 0  # a late commit
    assert m.status()["writer"].consumed == 10


# ------------------------------------------------- 11. lost state
def remove_sqlite_files(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        target = Path(str(db) + suffix)
        if target.exists():
            os.remove(target)


def assert_refuses_as_unavailable(m: BudgetManager, r: Reservation) -> None:
    calls: dict[str, Callable[[], object]] = {
        "reserve": lambda: m.reserve("writer", 5, 0),
        "commit": lambda: m.commit(r, (5, 0)),
        "status": m.status,
    }
    for name, call in calls.items():
        try:
            call()
        except StoreUnavailableError:
            continue
        except Exception as exc:
            pytest.fail(f"{name} raised {type(exc).__name__}, not StoreUnavailableError: {exc}")
        pytest.fail(f"{name} worked on a store that lost its state")


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_sqlite_ledger_whose_file_went_away_says_so(tmp_path: Path, how: str) -> None:
    db = tmp_path / "budgets.db"
    url = "sqlite:///" + str(db)
    m = team(url)
    r = m.reserve("writer", 60, 20)
    remove_sqlite_files(db)
    if how == "replaced":
        with sqlite3.connect(db) as fresh:
            fresh.execute("CREATE TABLE unrelated (x INTEGER)")
        fresh.close()
    assert_refuses_as_unavailable(m, r)
    if how == "deleted":
        assert not db.exists()  # the refusals created nothing
    new = BudgetManager(store=url)
    new.register_agent("writer", priority=2, max_tokens=100)  # registers afresh
    assert new.commit(new.reserve("writer", 30, 0), (25, 0)) == 0
    assert new.status()["writer"].consumed == 25 and set(new.contracts) == {"writer"}
    assert_refuses_as_unavailable(m, r)  # the old manager's file is still gone


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k == "redis"])
def test_a_redis_ledger_after_flushdb_says_so(url: str) -> None:
    m = team(url)
    r = m.reserve("writer", 60, 20)
    client = redis.Redis.from_url(url)
    client.flushdb()  # what a restart without persistence leaves
    assert_refuses_as_unavailable(m, r)
    assert client.dbsize() == 0  # the refusals wrote nothing
    new = BudgetManager(store=url)
    new.register_agent("writer", priority=2, max_tokens=100)
    assert new.commit(new.reserve("writer", 30, 0), (25, 0)) == 0
    assert new.status()["writer"].consumed == 25 and set(new.contracts) == {"writer"}
    client.close()


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k in ("sqlite", "redis")])
def test_fail_open_does_not_hide_a_lost_namespace(url: str, tmp_path: Path) -> None:
    """fail_open lets calls through an outage; a lost ledger is not an outage."""
    m = BudgetManager(store=url, fail_open=True)
    m.register_agent("writer", max_tokens=100)
    m.commit(m.reserve("writer", 10, 0), (10, 0))
    if url.startswith("sqlite"):
        remove_sqlite_files(Path(url[len("sqlite:///") :]))
    else:
        with redis.Redis.from_url(url) as client:
            client.flushdb()
    with pytest.raises(NamespaceLostError, match="was lost"):
        m.reserve("writer", 10, 0)


def test_the_demo_runs_on_a_shared_in_memory_sqlite_store(tmp_path: Path) -> None:
    from tbc_integrations.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--store", "sqlite:///:memory:", "--no-live", "--out", str(out)]) == 0
    assert (out / "audit.jsonl").stat().st_size > 0


@pytest.mark.parametrize("kind", [k for k in STORE_KINDS if k == "redis"])
def test_redis_refuses_a_policy_it_cannot_run_when_the_manager_is_built(url: str) -> None:
    class Mine:
        name = "mine"

        def plan(self, needy: Needy, need: int, donors: Any, *, partial: bool) -> list[Any]:
            return []

    with pytest.raises(ContractError, match="'mine' cannot run there"):
        BudgetManager(store=url, policy=Mine())
    BudgetManager(store=url, policy=ConfidenceWeightedPolicy(alpha=0.5))  # built-ins run


def test_a_policy_that_raises_is_a_contract_error_and_moves_nothing() -> None:
    class Broken:
        name = "broken"

        def plan(self, needy: Needy, need: int, donors: Any, *, partial: bool) -> list[Any]:
            next(donors)  # takes a donor, then fails
            raise RuntimeError("boom")

    m = BudgetManager(policy=Broken())
    m.register_agent("idle", priority=1, max_tokens=500)
    m.register_agent("needy", priority=2, max_tokens=10)
    before = state(m)
    with pytest.raises(ContractError, match="'broken' failed while planning"):
        m.reserve("needy", 50)
    assert state(m) == before  # a refusal is not counted either: nothing was decided
    m.policy = GreedyPolicy()
    assert m.reserve("needy", 50).loans == (("idle", 40),)  # the donor is still offered
