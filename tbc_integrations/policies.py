"""Reallocation policies: who gives how much when an agent needs more budget.

A store walks eligible donors lazily in the design's order (completed agents
first, then lowest priority, then most remaining) and never offers a donor
below its reserve or above the needy agent's priority. A policy decides how
much to take from each; the store checks the plan and applies it atomically.

Example:
    >>> from tbc_integrations.policies import Donor, GreedyPolicy, Needy
    >>> needy = Needy("writer", priority=3, available=0, last_confidence=None,
    ...               confidence_threshold=None, max_tokens=100, max_input_tokens=None)
    >>> donors = iter([Donor("idle", spare=40, priority=1, available=50, complete=False)])
    >>> GreedyPolicy().plan(needy, 30, donors, partial=False)
    [('idle', 30)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = [
    "POLICIES",
    "ConfidenceWeightedPolicy",
    "Donor",
    "ExpectedGainPolicy",
    "GreedyPolicy",
    "Needy",
    "ReallocationPolicy",
    "policy_from_name",
]


class Donor(NamedTuple):
    """An eligible donor as the store offers it.

    Attributes:
        name: The donor agent.
        spare: Tokens it can give: its remaining above its reserve, or all of
            its remaining once it is complete.
        priority: Its contract priority.
        available: Its remaining budget.
        complete: Whether it was marked complete.
    """

    name: str
    spare: int
    priority: int
    available: int
    complete: bool


class Needy(NamedTuple):
    """The agent that needs budget, with what a policy may weigh."""

    name: str
    priority: int
    available: int
    last_confidence: float | None
    confidence_threshold: float | None
    max_tokens: int
    max_input_tokens: int | None
    max_priority: int = 1
    """The highest priority among the namespace's agents (for normalised weights)."""


@runtime_checkable
class ReallocationPolicy(Protocol):
    """Decides transfers; see :class:`GreedyPolicy` for the default."""

    name: str

    def plan(
        self, needy: Needy, need: int, donors: Iterator[Donor], *, partial: bool
    ) -> list[tuple[str, int]]:
        """Return ``(donor, tokens)`` pairs covering up to ``need`` tokens.

        ``donors`` is lazy and ordered; consume only what you use. With
        ``partial=False`` a plan that does not cover ``need`` is refused by the
        store (nothing moves); with ``partial=True`` (settling an overdraft)
        whatever the plan gives is applied.
        """
        ...


class GreedyPolicy:
    """The design's default: drain donors in order until the need is covered.

    Lowest priority first, most remaining first among equals; a completed
    agent gives everything it has left. Touches only the donors it takes from.

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(policy=GreedyPolicy())
        >>> m.policy.name
        'greedy'
    """

    name = "greedy"

    def plan(
        self, needy: Needy, need: int, donors: Iterator[Donor], *, partial: bool
    ) -> list[tuple[str, int]]:
        """Take from each donor in order until ``need`` is covered."""
        out: list[tuple[str, int]] = []
        left = need
        for donor in donors:
            take = donor.spare if donor.spare < left else left
            out.append((donor.name, take))
            left -= take
            if left == 0:
                break
        return out


class ConfidenceWeightedPolicy:
    """The paper's weighted form: delta = min(R, alpha x Pw x deficit x Imax).

    Terms, as implemented:

    - **R**: a donor's spare: its remaining above its reserve (all of its
      remaining once complete), offered in the design's donor order;
    - **Pw**: the needy agent's normalised priority weight, its priority divided
      by the highest priority in the namespace (so in (0, 1]);
    - **deficit**: ``threshold - last confidence``, clipped at zero. With no
      confidence known yet, the deficit is the whole threshold (confidence is
      taken as 0); an agent without a threshold has a deficit of 1 (nothing
      ever says it is confident enough);
    - **Imax**: the needy agent's input cap, or its total budget when it has none;
    - **alpha**: a tuning factor (default 1.0).

    ``alpha x Pw x deficit x Imax`` (rounded up) bounds how much one
    reallocation may move to the needy agent in all; each donor gives
    ``min(R, what that bound and the need still allow)``. A confident agent
    (small deficit) borrows little; a low-priority or confident one may be
    refused where the greedy policy would have covered it.

    Example:
        >>> policy = ConfidenceWeightedPolicy(alpha=0.5)
        >>> needy = Needy("r", priority=2, available=0, last_confidence=0.4,
        ...               confidence_threshold=0.8, max_tokens=1000, max_input_tokens=None,
        ...               max_priority=4)
        >>> donors = iter([Donor("idle", spare=500, priority=1, available=600, complete=False)])
        >>> policy.plan(needy, 300, donors, partial=True)  # 0.5 x 0.5 x 0.4 x 1000 = 100
        [('idle', 100)]
    """

    name = "weighted"

    def __init__(self, alpha: float = 1.0) -> None:
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0 < alpha < math.inf
        ):
            from tbc_integrations._errors import ContractError

            raise ContractError(f"alpha must be a positive, finite number, got {alpha!r}")
        self.alpha = float(alpha)

    @staticmethod
    def deficit(needy: Needy) -> float:
        """The needy agent's confidence deficit (see the class docstring for the rules)."""
        threshold = needy.confidence_threshold
        if threshold is None:
            return 1.0
        confidence = needy.last_confidence if needy.last_confidence is not None else 0.0
        return max(threshold - confidence, 0.0)

    def bound(self, needy: Needy) -> int:
        """alpha x Pw x deficit x Imax, rounded up: the most one reallocation may move."""
        weight = needy.priority / max(needy.max_priority, needy.priority, 1)
        imax = needy.max_input_tokens if needy.max_input_tokens is not None else needy.max_tokens
        return math.ceil(self.alpha * weight * self.deficit(needy) * imax)

    def plan(
        self, needy: Needy, need: int, donors: Iterator[Donor], *, partial: bool
    ) -> list[tuple[str, int]]:
        """Take min(R, bound left, need left) from each donor in order."""
        left = min(need, self.bound(needy))
        out: list[tuple[str, int]] = []
        if left <= 0:
            return out
        for donor in donors:
            take = min(donor.spare, left)
            out.append((donor.name, take))
            left -= take
            if left == 0:
                break
        return out


class ExpectedGainPolicy:
    """The recommended rules: lend only where a token buys more than it is worth to its donor.

    Rules, as implemented (the same as the benchmark's recommended configuration,
    :mod:`tbc_integrations.adaptive`):

    - **gain** of the needy agent's next call, in priority-weighted accuracy:
      ``priority x first`` before any confidence is known, then
      ``priority x (1 - confidence) x lift`` (a calibrated confidence: the answer
      is wrong with chance ``1 - confidence``, and one more call turns a wrong
      answer right with chance ``lift``). ``first`` and ``lift`` come from the
      agent's calibrated history (:class:`~tbc_integrations.adaptive.RoundHistory`);
      0.5 each is the history of an agent never seen;
    - **worth** of a borrowed token to the needy agent: ``gain / need``, since the
      call the loan makes possible is what buys the gain;
    - **price** of a donor's token: ``kappa x priority / available`` (its own
      priority spread over what it has left: the scarcer a donor's budget, the dearer
      its tokens), 0 for a completed donor, which needs nothing more;
    - a donor gives ``min(spare, need left)`` when the worth is at least its price,
      and is passed over otherwise (donors are offered in the design's order; the
      store keeps reserves, priorities and dependencies as for any policy).

    So a confident agent (small gain) borrows only from donors with plenty left,
    an unsure, important one from nearly anyone, and a donor close to its end keeps
    its last tokens. The confidence gate still refuses an agent whose last
    confidence reached its threshold, before any lending.

    Example:
        >>> policy = ExpectedGainPolicy(first=0.5, lift=0.5, kappa=0.1)
        >>> needy = Needy("writer", priority=3, available=0, last_confidence=0.4,
        ...               confidence_threshold=None, max_tokens=500, max_input_tokens=None)
        >>> round(policy.gain(needy), 3)  # 3 x 0.6 x 0.5
        0.9
        >>> donors = iter([Donor("low", spare=40, priority=1, available=5, complete=False),
        ...                Donor("idle", spare=400, priority=1, available=450, complete=False)])
        >>> policy.plan(needy, 100, donors, partial=False)  # 0.009 a token; 'low' asks 0.02
        [('idle', 100)]
    """

    name = "expected_gain"

    def __init__(self, first: float = 0.5, lift: float = 0.5, kappa: float = 0.1) -> None:
        from tbc_integrations._errors import ContractError

        for label, value, top in (("first", first, 1.0), ("lift", lift, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ContractError(f"{label} must be a number in [0, 1], got {value!r}")
            if not 0.0 <= value <= top:
                raise ContractError(f"{label} must be a number in [0, 1], got {value!r}")
        if (
            isinstance(kappa, bool)
            or not isinstance(kappa, (int, float))
            or not 0 <= kappa < math.inf
        ):
            raise ContractError(f"kappa must be a non-negative, finite number, got {kappa!r}")
        self.first = float(first)
        self.lift = float(lift)
        self.kappa = float(kappa)

    def gain(self, needy: Needy) -> float:
        """The priority-weighted accuracy the needy agent's next call is expected to add."""
        if needy.last_confidence is None:
            return needy.priority * self.first
        return needy.priority * (1.0 - needy.last_confidence) * self.lift

    def price(self, donor: Donor) -> float:
        """What one of the donor's tokens is worth to the donor."""
        if donor.complete:
            return 0.0
        return self.kappa * donor.priority / donor.available

    def plan(
        self, needy: Needy, need: int, donors: Iterator[Donor], *, partial: bool
    ) -> list[tuple[str, int]]:
        """Take min(spare, need left) from each donor whose price the loan's worth meets."""
        out: list[tuple[str, int]] = []
        if need <= 0:
            return out
        worth = self.gain(needy) / need
        left = need
        for donor in donors:
            if worth < self.price(donor):
                continue
            take = min(donor.spare, left)
            out.append((donor.name, take))
            left -= take
            if left == 0:
                break
        return out


POLICIES: dict[str, Callable[[], ReallocationPolicy]] = {
    "greedy": GreedyPolicy,
    "weighted": ConfidenceWeightedPolicy,
    "expected_gain": ExpectedGainPolicy,
}
"""Policies by name (for the command line and configuration files)."""


def policy_from_name(name: str) -> ReallocationPolicy:
    """A new policy by its registered name.

    Example:
        >>> policy_from_name("greedy").name
        'greedy'
    """
    factory = POLICIES.get(name)
    if factory is None:
        from tbc_integrations._errors import ContractError

        raise ContractError(f"unknown reallocation policy {name!r}; known: {sorted(POLICIES)}")
    return factory()
