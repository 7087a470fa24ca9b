"""The degradation ladder's planner (``_degrade``), against hand-worked cases.

Prices in dollars per million tokens: big (10 in, 30 out), mid (3, 15), small (0.5, 1.5).
A call of 200 input tokens and max_tokens 100 costs at most, in nano-dollars:
big 200*10_000 + 100*30_000 = 5_000_000 ($0.005), mid 600_000 + 1_500_000 = 2_100_000
($0.0021), small 100_000 + 150_000 = 250_000 ($0.00025).
"""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from tbc_integrations import BudgetManager, Degrade, ModelPrice, PriceTable
from tbc_integrations._degrade import Call, Ladder, Plan, budget_share, output_cap
from tbc_integrations._records import AgentStatus

PRICES = {
    "big": ModelPrice(input=10, output=30),
    "mid": ModelPrice(input=3, output=15),
    "small": ModelPrice(input="0.5", output="1.5"),
}
CALL = Call("big", 100, input_tokens=200)


def status_with(
    spent: str | None = None, degrade: list[Degrade] | None = None, **contract: object
) -> tuple[BudgetManager, AgentStatus]:
    """A real manager whose agent 'a' has spent ``spent`` dollars (on 'big')."""
    m = BudgetManager(prices=PRICES)
    m.register_agent("a", degrade=degrade or [], **contract)  # type: ignore[arg-type]
    if spent is not None:
        m.charge("a", (0, 0), cost=spent)
    return m, m.status()["a"]


def refused(ladder: Ladder, status: AgentStatus | None, call: Call = CALL) -> Plan:
    plan = ladder.after_refusal(ladder.plan(call, status), "cost cap")
    assert plan is not None
    return plan


# ---------------------------------------------------------------- output cap
def test_output_cap_lowers_max_tokens_to_what_the_cap_allows() -> None:
    m, status = status_with(max_tokens=1000, max_output_tokens=50)
    assert output_cap(200, status) == 50
    assert output_cap(None, status) == 50  # no max_tokens asked: the cap's
    assert output_cap(50, status) is None  # within the cap: unchanged
    assert output_cap(20, status) is None
    m.charge("a", (0, 30))
    assert output_cap(200, m.status()["a"]) == 20  # what is left of it
    m.charge("a", (0, 20))
    assert output_cap(200, m.status()["a"]) is None  # none left: the reservation refuses
    _, uncapped = status_with(max_tokens=1000)
    assert output_cap(200, uncapped) is None
    assert output_cap(200, None) is None


def test_plan_applies_the_output_cap_before_any_step() -> None:
    _, status = status_with(max_tokens=1000, max_output_tokens=80)
    plan = Ladder([Degrade(max_tokens=50)]).plan(Call("gpt-4", 400), status)
    assert plan.call.max_tokens == 80 and plan.taken == ()
    after = Ladder([Degrade(max_tokens=50)]).after_refusal(plan, "budget")
    assert after is not None and after.call.max_tokens == 50


# ---------------------------------------------------------------- budget share
def test_budget_share_is_the_smaller_of_tokens_and_money_left() -> None:
    m, status = status_with(max_tokens=1000, max_cost="0.01")
    assert budget_share(status) == 1.0
    m.charge("a", (400, 0), cost="0.002")  # tokens 60% left, money 80%
    assert budget_share(m.status()["a"]) == 0.6
    m.charge("a", (0, 0), cost="0.007")  # money 10% left
    assert budget_share(m.status()["a"]) == 0.1
    _, money_only = status_with(max_cost="0.01", spent="0.0075")
    assert money_only.allocated == 0 and budget_share(money_only) == 0.25
    assert budget_share(None) is None


# ---------------------------------------------------------------- below
def test_steps_below_a_fraction_are_taken_before_the_call_in_order() -> None:
    ladder = [
        Degrade(wrap_up="Finish.", below=0.5),
        Degrade(max_tokens=30),
        Degrade(max_tokens=60, below=0.3),
    ]
    m, status = status_with(max_tokens=1000, degrade=ladder)
    m.charge("a", (600, 0))  # 40% left: only the first is due
    plan = Ladder(ladder).plan(Call("gpt-4", 400), m.status()["a"])
    assert [t.reason for t in plan.taken] == ["wrap-up (below 0.5)"]
    assert plan.call == Call("gpt-4", 400, wrap_up=("Finish.",))
    assert plan.left == (ladder[1], ladder[2])
    m.charge("a", (200, 0))  # 20% left: both
    plan = Ladder(ladder).plan(Call("gpt-4", 400), m.status()["a"])
    assert [t.reason for t in plan.taken] == ["wrap-up (below 0.5)", "max_tokens 60 (below 0.3)"]
    assert plan.call.max_tokens == 60 and plan.left == (ladder[1],)
    assert Ladder(ladder).plan(Call("gpt-4", 400), status).taken == ()  # all left: none


def test_below_model_steps_take_the_one_the_money_affords() -> None:
    steps = [Degrade(model="mid", below=0.5), Degrade(model="small", below=0.5)]
    _, status = status_with(max_cost="0.01", spent="0.008", degrade=steps)  # $0.002 left
    plan = Ladder(steps, prices=BudgetManager(prices=PRICES).prices).plan(CALL, status)
    assert plan.call.model == "small"  # mid would cost up to $0.0021
    assert [t.reason for t in plan.taken] == [
        "model small (below 0.5; passed over mid: over the money left)"
    ]
    _, richer = status_with(max_cost="0.01", spent="0.006", degrade=steps)  # $0.004 left
    plan = Ladder(steps, prices=BudgetManager(prices=PRICES).prices).plan(CALL, richer)
    assert plan.call.model == "mid"
    assert [t.reason for t in plan.taken] == ["model mid (below 0.5)"]  # small not taken


# ---------------------------------------------------------------- after a refusal
def test_refusals_take_the_steps_in_order_then_the_refusal_stands() -> None:
    steps = [Degrade(max_tokens=100), Degrade(model="mini"), Degrade(wrap_up="Now.")]
    ladder = Ladder(steps)
    plan: Plan | None = ladder.plan(Call("gpt-4", 400), None)
    reasons = []
    while plan is not None:
        last = plan
        plan = ladder.after_refusal(plan, "budget")
        if plan is not None:
            reasons.append(plan.taken[-1].reason)
    assert reasons == [
        "max_tokens 100 (refused: budget)",
        "model mini (refused: budget)",
        "wrap-up (refused: budget)",
    ]
    assert last.call == Call("mini", 100, wrap_up=("Now.",))


def test_a_refusal_by_the_confidence_gate_takes_no_step() -> None:
    from tbc_integrations import ConfidenceGateError

    gate = ConfidenceGateError("a", 10, 100, 0.9, 0.8)
    ladder = Ladder([Degrade(max_tokens=10)])
    assert ladder.after_refusal(ladder.plan(CALL, None), gate.reason) is None


def test_a_refused_call_moves_to_the_first_model_the_money_affords() -> None:
    prices = BudgetManager(prices=PRICES).prices
    steps = [Degrade(model="mid"), Degrade(max_tokens=50), Degrade(model="small")]
    ladder = Ladder(steps, prices=prices)
    _, rich = status_with(max_cost="0.01", spent="0.006")  # $0.004 left: mid fits
    plan = refused(ladder, rich)
    assert plan.call.model == "mid" and plan.left == (steps[1], steps[2])
    _, poor = status_with(max_cost="0.01", spent="0.008")  # $0.002 left: only small
    plan = refused(ladder, poor)
    assert plan.call.model == "small"
    assert plan.taken[-1].reason == (
        "model small (refused: cost cap; passed over mid: over the money left)"
    )
    assert plan.left == (steps[1],)  # mid passed over, max_tokens 50 still to come
    plan2 = ladder.after_refusal(plan, "cost cap")
    assert plan2 is not None and plan2.call == Call("small", 50, input_tokens=200)
    assert ladder.after_refusal(plan2, "cost cap") is None


def test_ladder_order_wins_among_models_that_all_fit() -> None:
    prices = BudgetManager(prices=PRICES).prices
    _, rich = status_with(max_cost="1")
    plan = refused(Ladder([Degrade(model="mid"), Degrade(model="small")], prices=prices), rich)
    assert plan.call.model == "mid"  # the first that fits, not the cheapest


def test_when_no_model_fits_the_cheapest_is_taken() -> None:
    prices = BudgetManager(prices=PRICES).prices
    steps = [Degrade(model="mid"), Degrade(model="small"), Degrade(model="big")]
    _, broke = status_with(max_cost="0.01", spent="0.0099")  # $0.0001 left: none fits
    plan = refused(Ladder(steps, prices=prices), broke)
    assert plan.call.model == "small" and plan.left == (steps[2],)
    # tokens that fit no model: the money still picks the cheapest
    _, short = status_with(max_tokens=250, max_cost="1")  # 200 + 100 > 250
    assert refused(Ladder(steps, prices=prices), short).call.model == "small"


def test_an_unpriced_model_does_not_fit_a_cost_cap() -> None:
    prices = PriceTable(PRICES, default_source=False)
    steps = [Degrade(model="mystery"), Degrade(model="small")]
    _, capped = status_with(max_cost="0.01")
    assert refused(Ladder(steps, prices=prices), capped).call.model == "small"
    _, broke = status_with(max_cost="0.01", spent="0.01")
    assert refused(Ladder(steps, prices=prices), broke).call.model == "small"  # unpriced last


def test_without_a_cost_cap_models_go_in_ladder_order() -> None:
    prices = BudgetManager(prices=PRICES).prices
    _, tokens_only = status_with(max_tokens=100)  # not even the tokens fit
    steps = [Degrade(model="mid"), Degrade(model="small")]
    assert refused(Ladder(steps, prices=prices), tokens_only).call.model == "mid"
    assert refused(Ladder(steps), None).call.model == "mid"


def test_a_call_without_max_tokens_is_priced_at_the_default_output() -> None:
    prices = BudgetManager(prices=PRICES).prices
    steps = [Degrade(model="mid"), Degrade(model="small")]
    _, status = status_with(max_cost="0.01")  # mid: 600 + 1024*15_000 nano = $0.01596
    call = Call("big", None, input_tokens=200)
    assert refused(Ladder(steps, prices=prices), status, call).call.model == "small"
    ladder = Ladder(steps, prices=prices, default_output_tokens=100)
    assert refused(ladder, status, call).call.model == "mid"


def test_equal_steps_are_each_taken_once() -> None:
    steps = [Degrade(max_tokens=100), Degrade(max_tokens=100)]
    ladder = Ladder(steps)
    plan = refused(ladder, None)
    assert len(plan.left) == 1 and plan.left[0] is steps[1]


def test_priced_says_when_a_plugin_must_count_the_prompt() -> None:
    _, capped = status_with(max_cost="1")
    _, tokens_only = status_with(max_tokens=100)
    assert Ladder([Degrade(model="small")]).priced(capped)
    assert not Ladder([Degrade(model="small")]).priced(tokens_only)
    assert not Ladder([Degrade(max_tokens=5)]).priced(capped)


# ---------------------------------------------------------------- every ladder
step_st = st.one_of(
    st.builds(Degrade, model=st.sampled_from(["big", "mid", "small", "odd"])),
    st.builds(Degrade, max_tokens=st.integers(1, 500)),
    st.builds(Degrade, wrap_up=st.sampled_from(["Finish.", "Now."])),
    st.builds(
        Degrade, max_tokens=st.integers(1, 500), below=st.floats(0.01, 0.99, allow_nan=False)
    ),
    st.builds(
        Degrade,
        model=st.sampled_from(["mid", "small"]),
        below=st.floats(0.01, 0.99, allow_nan=False),
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(step_st, max_size=6),
    spent=st.integers(0, 12_000),
    asked=st.one_of(st.none(), st.integers(1, 2_000)),
    inp=st.integers(0, 1_000),
)
def test_every_step_is_taken_at_most_once_and_never_raises_max_tokens(
    steps: list[Degrade], spent: int, asked: int | None, inp: int
) -> None:
    m = BudgetManager(prices=PRICES)
    m.register_agent("a", max_tokens=10_000, max_cost="0.01", max_output_tokens=800)
    m.charge("a", (min(spent, 10_000), 0), cost=Decimal(spent) / 1_000_000)
    status = m.status()["a"]
    ladder = Ladder(steps, prices=m.prices)
    plan: Plan | None = ladder.plan(Call("big", asked, input_tokens=inp), status)
    seen: list[Degrade] = []
    cap = status.output_cap_left
    refusals = 0
    while plan is not None:
        seen = [t.step for t in plan.taken]
        mt = plan.call.max_tokens
        assert mt is None or (asked is None or mt <= asked) or mt == cap
        if cap:
            assert mt is not None and mt <= cap
        assert all(any(s is x for x in steps) for s in seen)
        assert len({id(s) for s in seen}) == len(seen)  # no step twice
        assert not any(any(s is x for x in plan.left) for s in seen)
        assert len(plan.taken) + len(plan.left) <= len(steps)
        plan = ladder.after_refusal(plan, "budget")
        refusals += 1
    assert refusals <= len(steps) + 1  # the ladder ends: the refusal stands
