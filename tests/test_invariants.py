"""Property-based proofs of the ledger's invariants (hypothesis).

- allocations are conserved: reallocation moves budget, never creates or destroys it;
- no agent has negative remaining unless its real usage overdrew it;
- no donor is taken below its reserve (a completed agent excepted);
- every committed token is recorded exactly once;
- what is reserved is exactly what open reservations hold;
- a refused or malformed call changes nothing but the refusal count;
- the confidence gate: an agent whose last confidence reached its threshold is refused;
- under the expected-gain policy, every loan's worth met its donor's price;
- the event stream is complete: replaying it rebuilds the live state exactly;
- donors are taken in the design's order, found through the index, exactly as a
  brute-force sort of every agent would choose them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from tbc_integrations import (
    BudgetContract,
    BudgetExceededError,
    BudgetManager,
    ConfidenceGateError,
    InvalidTokenCountError,
    Reservation,
    ReservationError,
    Usage,
)
from tbc_integrations.events import BudgetEvent, Overdrawn
from tbc_integrations.policies import ExpectedGainPolicy, ReallocationPolicy, policy_from_name
from tbc_integrations.replay import LedgerReplay
from tests.conftest import STORE_KINDS, FakeClock, store_url

pytestmark = pytest.mark.stress

NAMES = ["a", "b", "c", "d", "e", "f"]


@st.composite
def contracts(draw: st.DrawFn) -> list[BudgetContract]:
    n = draw(st.integers(2, len(NAMES)))
    out = []
    for name in NAMES[:n]:
        max_tokens = draw(st.integers(0, 400))
        out.append(
            BudgetContract(
                name,
                priority=draw(st.integers(1, 4)),
                max_tokens=max_tokens,
                min_reserve=draw(st.none() | st.integers(0, max_tokens)),
                confidence_threshold=draw(st.none() | st.sampled_from([0.5, 0.9])),
                max_input_tokens=draw(st.none() | st.integers(0, max_tokens)),
                max_output_tokens=draw(st.none() | st.integers(0, max_tokens)),
            )
        )
    return out


def without_refusals(status: dict[str, Any]) -> dict[str, Any]:
    return {k: {**v.to_dict(), "refusals": 0} for k, v in status.items()}


class LedgerMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")
    settled = Bundle("settled")

    store_kind = "memory"
    policy_name = "greedy"

    @initialize(cs=contracts())
    def setup(self, cs: list[BudgetContract]) -> None:
        self.clock = FakeClock()
        url = store_url(self.store_kind, Path(tempfile.mkdtemp(prefix="tbc-inv-")))
        self.m = BudgetManager(
            store=url, clock=self.clock, lease_seconds=50, policy=self.make_policy()
        )
        self.replay = LedgerReplay()
        self.m.subscribe(self.replay.apply)
        self.events: list[BudgetEvent] = []
        self.m.subscribe(self.events.append)
        for c in cs:
            self.m.add_contract(c)
        self.contracts = {c.agent_name: c for c in cs}
        self.total = sum(c.max_tokens or 0 for c in cs)
        self.consumed = dict.fromkeys(self.contracts, 0)
        self.open: dict[str, Reservation] = {}
        self.overdrawn: set[str] = set()

    def agents(self) -> st.SearchStrategy[str]:
        return st.sampled_from(sorted(self.contracts))

    @rule(
        target=reservations,
        data=st.data(),
        inp=st.integers(0, 300),
        out=st.integers(0, 300),
        lease=st.sampled_from([None, 5.0, 500.0]),
    )
    def reserve(self, data: st.DataObject, inp: int, out: int, lease: float | None) -> Any:
        agent = data.draw(self.agents())
        before = self.m.status()
        me = before[agent]
        gate_closed = (
            me.confidence_threshold is not None
            and me.last_confidence is not None
            and me.last_confidence >= me.confidence_threshold
        )
        try:
            r = self.m.reserve(agent, inp, out, lease_seconds=lease)
        except BudgetExceededError as exc:
            assert isinstance(exc, ConfidenceGateError) == gate_closed, "the gate decides alone"
            after = self.m.status()
            assert after[agent].refusals == before[agent].refusals + 1
            assert without_refusals(after) == without_refusals(before)
            if not isinstance(exc, ConfidenceGateError) and exc.reason == "budget":
                # short of the request, or overdrawn: refused until the overdraft is covered
                assert exc.available < inp + out or agent in self.overdrawn
            return multiple()
        assert not gate_closed, "a gated agent was granted a reservation"
        after = self.m.status()
        self.check_loans(agent, before, r)
        for donor, tokens in r.loans:
            assert tokens > 0 and donor != agent
            d = after[donor]
            assert d.complete or d.priority <= self.contracts[agent].priority
            if not d.complete:
                assert d.remaining >= d.min_reserve, "donor taken below its reserve"
        assert after[agent].remaining >= 0 or agent in self.overdrawn
        self.open[r.id] = r
        return r

    def make_policy(self) -> ReallocationPolicy:
        return policy_from_name(self.policy_name)

    def check_loans(self, agent: str, before: dict[str, Any], r: Reservation) -> None:
        """What the policy itself promises about a reservation's loans (greedy: nothing more)."""

    @rule(
        target=settled, r=consumes(reservations), share=st.floats(0, 2), out_share=st.floats(0, 1)
    )
    def commit(self, r: Reservation, share: float, out_share: float) -> Reservation:
        used = int(r.amount * share)
        uo = int(used * out_share)
        ui = used - uo
        seen = len(self.events)
        overdraft = self.m.commit(r, Usage(ui, uo))
        self.consumed[r.agent] += used
        self.open.pop(r.id, None)
        if overdraft:
            self.overdrawn.add(r.agent)
        # the settlement's events tell what the call returned: the uncovered overdraft
        uncovered = [e for e in self.events[seen:] if isinstance(e, Overdrawn)]
        assert sum(e.tokens for e in uncovered) == overdraft
        assert all(e.agent == r.agent and e.reservation_id == r.id for e in uncovered)
        return r

    @rule(target=settled, r=consumes(reservations))
    def release(self, r: Reservation) -> Reservation:
        self.m.release(r)
        self.open.pop(r.id, None)
        return r

    @rule(r=settled, late=st.booleans())
    def settle_twice(self, r: Reservation, late: bool) -> None:
        before = self.m.status()
        try:
            if late:
                self.m.commit(r, Usage(1, 1))
            else:
                self.m.release(r)
        except ReservationError:
            assert self.m.status() == before
        else:  # a second settle must never be accepted
            raise AssertionError("a settled reservation was settled again")

    @rule(data=st.data(), tokens=st.integers(0, 300))
    def record_usage(self, data: st.DataObject, tokens: int) -> None:
        agent = data.draw(self.agents())
        try:
            self.m.record_usage(agent, tokens)
        except BudgetExceededError:
            self.overdrawn.add(agent)
        self.consumed[agent] += tokens

    @rule(data=st.data(), bad=st.sampled_from([-1, 1.5, float("nan"), True, "3"]))
    def bad_input_changes_nothing(self, data: st.DataObject, bad: Any) -> None:
        agent = data.draw(self.agents())
        before = self.m.status()
        with pytest.raises(InvalidTokenCountError):
            self.m.reserve(agent, bad)
        with pytest.raises(InvalidTokenCountError):
            self.m.record_usage(agent, bad)
        assert self.m.status() == before

    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        self.m.complete(data.draw(self.agents()))

    @rule(data=st.data(), confidence=st.sampled_from([0.1, 0.6, 0.95]))
    def confidence(self, data: st.DataObject, confidence: float) -> None:
        self.m.record_confidence(data.draw(self.agents()), confidence)

    @rule(seconds=st.sampled_from([1.0, 10.0, 100.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        now = self.clock()
        for rid in [rid for rid, r in self.open.items() if r.expires_at <= now]:
            del self.open[rid]  # the lease lapsed: its tokens must come back

    @invariant()
    def events_replay_to_the_live_state(self) -> None:
        live = self.m.status()
        assert self.replay.status() == live

    @invariant()
    def conserved_and_recorded_once(self) -> None:
        status = self.m.status()
        assert sum(s.allocated for s in status.values()) == self.total
        assert sum(s.borrowed for s in status.values()) == sum(s.lent for s in status.values())
        for name, s in status.items():
            assert s.consumed == self.consumed[name], "usage lost or counted twice"
            assert s.input_tokens + s.output_tokens == s.consumed
            held = sum(r.amount for r in self.open.values() if r.agent == name)
            assert s.reserved == held
            if s.remaining < 0:
                assert name in self.overdrawn and s.overdraft == -s.remaining
            else:
                assert s.overdraft == 0


LedgerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestLedgerInvariants = LedgerMachine.TestCase


class SQLiteLedgerMachine(LedgerMachine):
    """The same machine on the SQLite store: the invariants hold there too."""

    store_kind = "sqlite"


SQLiteLedgerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
TestSQLiteLedgerInvariants = SQLiteLedgerMachine.TestCase


class RedisLedgerMachine(LedgerMachine):
    """The same machine on the Redis store (every verb one server-side script)."""

    store_kind = "redis"


RedisLedgerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
if "redis" in STORE_KINDS:
    TestRedisLedgerInvariants = RedisLedgerMachine.TestCase


class WeightedLedgerMachine(LedgerMachine):
    """The same machine under the confidence-weighted policy."""

    policy_name = "weighted"


WeightedLedgerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
TestWeightedLedgerInvariants = WeightedLedgerMachine.TestCase


class ExpectedGainLedgerMachine(LedgerMachine):
    """The same machine under the expected-gain policy (the recommended rules)."""

    policy_name = "expected_gain"

    def make_policy(self) -> ReallocationPolicy:
        # a dear kappa, so that prices bind often at these budgets (0-400 tokens an agent)
        return ExpectedGainPolicy(first=0.5, lift=0.5, kappa=5.0)

    def check_loans(self, agent: str, before: dict[str, Any], r: Reservation) -> None:
        """Every loan's worth (gain / need) met the donor's price, from the state before it."""
        if not r.loans:
            return
        policy = self.m.policy
        assert isinstance(policy, ExpectedGainPolicy)
        me = before[agent]
        need = sum(tokens for _, tokens in r.loans)  # the plan covered exactly the shortfall
        gain = me.priority * (
            policy.first if me.last_confidence is None else (1.0 - me.last_confidence) * policy.lift
        )
        for donor, _ in r.loans:
            d = before[donor]
            if not d.complete:
                assert gain / need >= policy.kappa * d.priority / d.remaining, (donor, gain, need)


ExpectedGainLedgerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
TestExpectedGainLedgerInvariants = ExpectedGainLedgerMachine.TestCase


class SQLiteExpectedGainLedgerMachine(ExpectedGainLedgerMachine):
    """The expected-gain machine on the SQLite store."""

    store_kind = "sqlite"


SQLiteExpectedGainLedgerMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None
)
TestSQLiteExpectedGainLedgerInvariants = SQLiteExpectedGainLedgerMachine.TestCase


class RedisExpectedGainLedgerMachine(ExpectedGainLedgerMachine):
    """The expected-gain machine on the Redis store (the policy runs in the Lua port)."""

    store_kind = "redis"


RedisExpectedGainLedgerMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None
)
if "redis" in STORE_KINDS:
    TestRedisExpectedGainLedgerInvariants = RedisExpectedGainLedgerMachine.TestCase


def expected_plan(status: dict[str, Any], needy: str, need: int) -> list[tuple[str, int]]:
    """Brute force: sort every eligible agent the way the design orders donors."""
    me = status[needy]
    pool = []
    for name, s in status.items():
        if name == needy or not (s.complete or s.priority <= me.priority):
            continue
        spare = s.remaining - (0 if s.complete else s.min_reserve)
        if spare > 0:
            key = (0, 0, -s.remaining, name) if s.complete else (1, s.priority, -s.remaining, name)
            pool.append((key, name, spare))
    pool.sort()
    plan = []
    for _, name, spare in pool:
        if need <= 0:
            break
        take = min(spare, need)
        plan.append((name, take))
        need -= take
    return plan if need <= 0 else []


ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "commit", "release", "use", "complete", "grant"]),
        st.integers(0, 39),
        st.integers(0, 200),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prios=st.lists(st.integers(1, 3), min_size=40, max_size=40),
    budgets=st.lists(st.integers(0, 300), min_size=40, max_size=40),
    history=ops,
    needy=st.integers(0, 39),
    need=st.integers(1, 3000),
)
@pytest.mark.parametrize("kind", STORE_KINDS)
def test_indexed_donor_order_matches_a_full_sort(
    kind: str,
    prios: list[int],
    budgets: list[int],
    history: list[tuple[str, int, int]],
    needy: int,
    need: int,
) -> None:
    m = BudgetManager(store=store_url(kind, Path(tempfile.mkdtemp(prefix="tbc-order-"))))
    names = [f"ag{i:02d}" for i in range(40)]
    for name, p, b in zip(names, prios, budgets, strict=True):
        m.register_agent(name, priority=p, max_tokens=b)
    held: list[Reservation] = []
    for op, i, n in history:
        name = names[i]
        try:
            if op == "reserve":
                held.append(m.reserve(name, n))
            elif op == "commit" and held:
                r = held.pop(i % len(held))
                m.commit(r, Usage(min(n, r.amount), 0))
            elif op == "release" and held:
                m.release(held.pop(i % len(held)))
            elif op == "use":
                m.record_usage(name, n % 50)
            elif op == "complete":
                m.complete(name)
            elif op == "grant":  # remaining rises: the index must follow it up
                m.adjust_allocation(name, n)
        except BudgetExceededError:
            pass
    status = m.status()
    name = names[needy]
    shortfall = need - max(status[name].remaining, 0)
    try:
        r = m.reserve(name, need)
    except BudgetExceededError:
        assert shortfall > 0 and expected_plan(status, name, shortfall) == []
        return
    if shortfall <= 0:
        assert r.loans == ()
    else:
        assert list(r.loans) == expected_plan(status, name, shortfall)
