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


POLICIES: dict[str, Callable[[], ReallocationPolicy]] = {
    "greedy": GreedyPolicy,
    "weighted": ConfidenceWeightedPolicy,
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
