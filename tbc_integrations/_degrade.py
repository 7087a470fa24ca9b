"""The degradation ladder's decisions, shared by every plugin (no framework imports).

A plugin describes the model call it is about to make as a :class:`Call` (its model,
the ``max_tokens`` it asks, its estimated input tokens) and asks the agent's
:class:`Ladder` what to do: :meth:`Ladder.plan` lowers ``max_tokens`` to what the
agent's output cap allows and takes the steps whose ``below`` fraction the agent's
remaining budget has fallen under; after a refusal, :meth:`Ladder.after_refusal`
takes the next step, until none is left and the refusal stands. The plugin only
translates the resulting :class:`Call` into its framework's request (the LangChain
middleware's ``ModelRequest``, a LangGraph node's chat-model call, a CrewAI
pre-call hook) and delivers one ``Degraded`` event per :class:`Taken` step.

**Which cheaper model** (priced in money). When the ladder calls for a model step
and the agent has a cost cap (``max_cost``), the candidates are the model steps it
could take now (after a refusal: every model step left; before a call: every
``below`` model step it has fallen under), in ladder order. The first whose
worst-case cost for this call (the call's input estimate at the model's input price
and its ``max_tokens``, else the handler's default output, at the model's highest
output price: what the ledger will hold) fits the agent's remaining money, and
whose tokens fit its remaining tokens, is taken. When none fits, the cheapest is
taken (unpriced models last, ladder order among equals), so that the steps after it
start from the cheapest call. Model steps before the chosen one are passed over
(no event; the event of the chosen one names them). An agent without a cost cap
takes its model steps in ladder order.

Example:
    >>> from tbc_integrations import BudgetManager, Degrade, ModelPrice
    >>> m = BudgetManager(prices={"big": ModelPrice(input=10, output=30),
    ...                           "mid": ModelPrice(input=3, output=15),
    ...                           "small": ModelPrice(input="0.5", output="1.5")})
    >>> _ = m.register_agent("a", max_cost="0.01", max_output_tokens=300,
    ...                      degrade=[Degrade(model="mid", below=0.5),
    ...                               Degrade(model="small", below=0.5)])
    >>> m.charge("a", (200, 200), model="big")  # $0.008 spent: a fifth of the money left
    0
    >>> ladder = Ladder(m.contracts["a"].degrade, prices=m.prices)
    >>> plan = ladder.plan(Call("big", 500, input_tokens=200), m.status()["a"])
    >>> plan.call.model, plan.call.max_tokens  # max_tokens lowered to the output cap
    ('small', 100)
    >>> [t.reason for t in plan.taken]  # mid: up to $0.0021 for this call, $0.002 left
    ['model small (below 0.5; passed over mid: over the money left)']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ._contracts import Degrade
from ._records import AgentStatus

if TYPE_CHECKING:
    from ._pricing import PriceTable

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "GATE_REASON",
    "Call",
    "Ladder",
    "Plan",
    "Taken",
    "budget_share",
    "output_cap",
]

_NANOS = 1_000_000_000  # nano-dollars a dollar
GATE_REASON = "confidence gate"
"""The reason of a refusal by the confidence gate, which no step can help."""
DEFAULT_OUTPUT_TOKENS = 1024
"""Output tokens a call without ``max_tokens`` is priced at (the handler's default)."""


@dataclass(frozen=True)
class Call:
    """A model call as the ladder sees it: what the plugin would send.

    Args:
        model: The model's name (``None``: unknown).
        max_tokens: The output tokens the request asks (``None``: none set).
        input_tokens: The prompt's estimated tokens (prices a model choice).
        provider: The model's provider, to find its price.
        wrap_up: Wrap-up instructions to add to the prompt, in order.

    Example:
        >>> Call("gpt-4", 400).with_step(Degrade(max_tokens=100)).max_tokens
        100
    """

    model: str | None = None
    max_tokens: int | None = None
    input_tokens: int = 0
    provider: str | None = None
    wrap_up: tuple[str, ...] = ()

    def with_step(self, step: Degrade) -> Call:
        """The call with one ladder step taken.

        Example:
            >>> Call("gpt-4").with_step(Degrade(wrap_up="Finish now.")).wrap_up
            ('Finish now.',)
        """
        if step.model is not None:
            return replace(self, model=step.model)
        if step.max_tokens is not None:
            asked = self.max_tokens
            return replace(
                self, max_tokens=step.max_tokens if asked is None else min(asked, step.max_tokens)
            )
        return replace(self, wrap_up=(*self.wrap_up, step.wrap_up or ""))


@dataclass(frozen=True)
class Taken:
    """One ladder step taken for a call: what a ``Degraded`` event reports.

    ``why`` is ``"below 0.5"`` (taken before the call) or ``"refused: budget"``
    (after a refusal, with the refusal's reason), and names the model steps passed
    over when a cheaper model was chosen by price.

    Example:
        >>> Taken(Degrade(model="small"), "refused: cost cap").reason
        'model small (refused: cost cap)'
    """

    step: Degrade
    why: str

    @property
    def reason(self) -> str:
        """The ``Degraded`` event's reason: the step and why it was taken."""
        return f"{self.step.name} ({self.why})"


@dataclass(frozen=True)
class Plan:
    """A call with the ladder applied so far.

    Attributes:
        call: The call to make: model, ``max_tokens`` and wrap-up instructions.
        taken: The steps taken for it, in order.
        left: The steps still available after a refusal, in ladder order.
        status: The agent's status the plan was made from (``None``: unknown).
    """

    call: Call
    taken: tuple[Taken, ...] = ()
    left: tuple[Degrade, ...] = ()
    status: AgentStatus | None = None


def output_cap(asked: int | None, status: AgentStatus | None) -> int | None:
    """The ``max_tokens`` a request must carry to respect the agent's output cap.

    ``None`` when the request can stay as it is: no cap, a request already within it,
    or nothing left of the cap (then the reservation refuses the call).

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("a", max_output_tokens=50)
        >>> output_cap(200, m.status()["a"]), output_cap(None, m.status()["a"])
        (50, 50)
        >>> output_cap(20, m.status()["a"]) is None
        True
    """
    left = None if status is None else status.output_cap_left
    if not left or (asked is not None and asked <= left):
        return None
    return left


def budget_share(status: AgentStatus | None) -> float | None:
    """The fraction of the agent's budget left, what a step's ``below`` is compared to.

    The smaller of its tokens' share (``remaining / allocated``, when it has a token
    budget) and its money's (``cost_remaining / max_cost``, when it has a cost cap);
    ``None`` when it has neither.

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=1000, max_cost="1")
        >>> m.charge("a", (300, 0), cost="0.5")  # 70% of its tokens, 50% of its money left
        0
        >>> budget_share(m.status()["a"])
        0.5
    """
    if status is None:
        return None
    shares = []
    if status.max_tokens is not None and status.allocated > 0:
        shares.append(status.remaining / status.allocated)
    if status.max_cost is not None and status.cost_remaining is not None and status.max_cost > 0:
        shares.append(float(status.cost_remaining / status.max_cost))
    return min(shares) if shares else None


@dataclass(frozen=True, init=False)
class Ladder:
    """An agent's degradation ladder, with what it needs to choose a model by price.

    Args:
        steps: The agent's steps, in order (its contract's ``degrade``).
        prices: The manager's price table (``manager.prices``); without it model
            steps are taken in ladder order.
        default_output_tokens: Output tokens a call without ``max_tokens`` is
            priced at (the plugin's ``default_max_tokens``).

    Example:
        >>> ladder = Ladder([Degrade(max_tokens=100), Degrade(wrap_up="Finish.")])
        >>> plan = ladder.plan(Call("gpt-4", 400), None)
        >>> plan.taken, plan.left == ladder.steps
        ((), True)
        >>> plan = ladder.after_refusal(plan, "budget")
        >>> plan.call.max_tokens, [t.reason for t in plan.taken]
        (100, ['max_tokens 100 (refused: budget)'])
        >>> ladder.after_refusal(ladder.after_refusal(plan, "budget"), "budget") is None
        True
    """

    steps: tuple[Degrade, ...]
    prices: PriceTable | None = None
    default_output_tokens: int = DEFAULT_OUTPUT_TOKENS

    def __init__(
        self,
        steps: Iterable[Degrade],
        *,
        prices: PriceTable | None = None,
        default_output_tokens: int = DEFAULT_OUTPUT_TOKENS,
    ) -> None:
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "prices", prices)
        object.__setattr__(self, "default_output_tokens", default_output_tokens)

    def __bool__(self) -> bool:
        return bool(self.steps)

    def priced(self, status: AgentStatus | None) -> bool:
        """Whether a model choice for this agent depends on the call's input estimate
        (it has model steps and a cost cap): a plugin counts the prompt only then.

        Example:
            >>> Ladder([Degrade(model="small")]).priced(None)
            False
        """
        return (
            status is not None
            and status.cost_remaining is not None
            and any(s.model is not None for s in self.steps)
        )

    def plan(self, call: Call, status: AgentStatus | None) -> Plan:
        """The call to make: ``max_tokens`` lowered to the output cap, then the steps
        whose ``below`` the agent's remaining budget (:func:`budget_share`) has fallen
        under, in order (of several such model steps, the one the money affords).

        Example:
            >>> from tbc_integrations import BudgetManager
            >>> m = BudgetManager()
            >>> _ = m.register_agent("a", max_tokens=1000, max_output_tokens=300,
            ...                      degrade=[Degrade(wrap_up="Wrap up.", below=0.5)])
            >>> _ = m.commit(m.reserve("a", 600, 0), (600, 0))
            >>> plan = Ladder(m.contracts["a"].degrade).plan(Call("gpt-4", 500), m.status()["a"])
            >>> plan.call.max_tokens, plan.call.wrap_up, [t.reason for t in plan.taken]
            (300, ('Wrap up.',), ['wrap-up (below 0.5)'])
        """
        cap = output_cap(call.max_tokens, status)
        if cap is not None:
            call = replace(call, max_tokens=cap)
        share = budget_share(status)
        due = [
            s for s in self.steps if s.below is not None and share is not None and share < s.below
        ]
        left = tuple(s for s in self.steps if not _among(s, due))
        taken: list[Taken] = []
        chosen, passed = self._choose(call, status, [s for s in due if s.model is not None])
        for step in due:
            if step.model is not None and step is not chosen:
                continue
            why = f"below {step.below:g}"
            if step is chosen and passed:
                why += _passed_over(passed)
            call = call.with_step(step)
            taken.append(Taken(step, why))
        return Plan(call, tuple(taken), left, status)

    def after_refusal(self, plan: Plan, reason: str) -> Plan | None:
        """The plan with the next step taken after the call was refused for ``reason``
        (the refusal's ``BudgetExceededError.reason``); ``None`` when no step is left, or
        when the confidence gate refused (the agent is done, not short): the refusal
        stands.

        A model step next: the model the agent's remaining money affords is chosen
        among the model steps left (see the module's docs).

        Example:
            >>> ladder = Ladder([Degrade(model="small")])
            >>> plan = ladder.after_refusal(ladder.plan(Call("big", 100), None), "budget")
            >>> plan.call.model, plan.left
            ('small', ())
        """
        if not plan.left or reason == GATE_REASON:
            return None
        step = plan.left[0]
        why = f"refused: {reason}"
        left = plan.left[1:]
        if step.model is not None:
            models = [s for s in plan.left if s.model is not None]
            chosen, passed = self._choose(plan.call, plan.status, models)
            step = chosen or step
            if passed:
                why += _passed_over(passed)
            before = models[: next(i for i, s in enumerate(models) if s is step)]
            left = tuple(s for s in plan.left if s is not step and not _among(s, before))
        return Plan(plan.call.with_step(step), (*plan.taken, Taken(step, why)), left, plan.status)

    def _cost(self, call: Call, model: str) -> int | None:
        """Nano-dollars the call could cost at most on ``model`` (``None``: no price)."""
        if self.prices is None:
            return None
        price = self.prices.find(model, call.provider)
        if price is None:
            return None
        out = call.max_tokens if call.max_tokens is not None else self.default_output_tokens
        return price.worst_case_nanos(call.input_tokens, out)

    def _choose(
        self, call: Call, status: AgentStatus | None, models: list[Degrade]
    ) -> tuple[Degrade | None, list[Degrade]]:
        """The model step to take among ``models`` (ladder order) and those passed over."""
        if not models:
            return None, []
        if status is None or status.cost_remaining is None:
            return models[0], []  # no cost cap: ladder order
        money = int(status.cost_remaining * _NANOS)  # negative while overdrawn: none fits
        out = call.max_tokens if call.max_tokens is not None else self.default_output_tokens
        tokens_fit = call.input_tokens + out <= status.remaining
        costs = [self._cost(call, s.model or "") for s in models]
        for i, (step, cost) in enumerate(zip(models, costs, strict=True)):
            if tokens_fit and cost is not None and cost <= money:
                return step, models[:i]
        order = sorted(range(len(models)), key=lambda i: (costs[i] is None, costs[i] or 0, i))
        best = order[0]
        return models[best], models[:best]


def _among(step: Degrade, steps: list[Degrade]) -> bool:
    """Whether this very step (not an equal one) is in ``steps``."""
    return any(step is s for s in steps)


def _passed_over(steps: list[Degrade]) -> str:
    names = ", ".join(s.model or "" for s in steps)
    return f"; passed over {names}: over the money left"
