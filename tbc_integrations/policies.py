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

from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["POLICIES", "Donor", "GreedyPolicy", "Needy", "ReallocationPolicy", "policy_from_name"]


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


POLICIES: dict[str, Callable[[], ReallocationPolicy]] = {"greedy": GreedyPolicy}
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
