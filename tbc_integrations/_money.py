"""Money as the stores keep it: whole nano-dollars (10**-9 US dollars), exactly.

The API speaks :class:`~decimal.Decimal` US dollars; every store keeps integers,
so memory, SQLite and Redis give the same answers to the last nano-dollar. A
call's exact cost is rounded *up* to a whole nano-dollar once, when it is
recorded (never more than a billionth of a dollar per call).

Example:
    >>> to_nanos("0.50", "writer")
    500000000
    >>> dollars(1_234_500)
    Decimal('0.0012345')
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import Any

from ._errors import InvalidValueError
from ._validate import MAX_TOKENS

__all__ = ["MAX_NANOS", "NANOS_PER_DOLLAR", "ceil_nanos", "dollars", "to_decimal", "to_nanos"]

NANOS_PER_DOLLAR = 10**9
MAX_NANOS = MAX_TOKENS
"""The largest amount of money a store holds exactly: about 9 million dollars."""

_NANO = Decimal(1) / NANOS_PER_DOLLAR


def _whose(agent: str | None, what: str) -> str:
    """``what``, prefixed with its agent when it belongs to one (a price or a limit does not)."""
    return what if agent is None else f"Agent '{agent}': {what}"


def to_decimal(value: Any, agent: str | None, what: str) -> Decimal:
    """A finite, non-negative amount of dollars from ``str``, ``int``, ``Decimal`` or ``float``.

    A ``float`` is read through its shortest decimal text (``0.1`` is ``Decimal('0.1')``).

    Raises:
        InvalidValueError: naming the agent (``None``: an amount of no agent's, such
            as a model's price) and the value.

    Example:
        >>> to_decimal(0.1, "a", "max_cost")
        Decimal('0.1')
    """
    if isinstance(value, bool):
        raise InvalidValueError(
            f"{_whose(agent, what)} must be an amount of dollars, got {value!r}"
        )
    try:
        if isinstance(value, Decimal):
            amount = value
        elif isinstance(value, float):
            amount = Decimal(repr(value))
        elif isinstance(value, (int, str)):
            amount = Decimal(value.strip() if isinstance(value, str) else value)
        else:
            raise TypeError
    except (InvalidOperation, TypeError, ValueError):
        raise InvalidValueError(
            f"{_whose(agent, what)} must be an amount of dollars (str, int, Decimal or float), "
            f"got {value!r}"
        ) from None
    if not amount.is_finite() or amount < 0:
        raise InvalidValueError(
            f"{_whose(agent, what)} must be a finite amount of dollars >= 0, got {value!r}"
        )
    return amount


def to_nanos(value: Any, agent: str | None, what: str = "max_cost") -> int:
    """Whole nano-dollars of an amount given in dollars; refuses finer amounts.

    Raises:
        InvalidValueError: naming the agent and the value (not an amount, negative,
            not finite, finer than a nano-dollar, or above :data:`MAX_NANOS`).

    Example:
        >>> to_nanos(2, "a")
        2000000000
    """
    amount = to_decimal(value, agent, what)
    nanos = amount * NANOS_PER_DOLLAR
    if nanos != nanos.to_integral_value():
        raise InvalidValueError(
            f"{_whose(agent, what)} {value!r} is finer than a nano-dollar (10**-9 USD)"
        )
    if nanos > MAX_NANOS:
        raise InvalidValueError(
            f"{_whose(agent, what)} {value!r} is above {dollars(MAX_NANOS)} dollars, the most "
            "every store holds exactly"
        )
    return int(nanos)


def ceil_nanos(amount: Decimal) -> int:
    """An exact cost in dollars, rounded up to whole nano-dollars.

    Example:
        >>> ceil_nanos(Decimal("0.0000000001"))
        1
    """
    return math.ceil(amount * NANOS_PER_DOLLAR)


def dollars(nanos: int) -> Decimal:
    """Nano-dollars as exact ``Decimal`` dollars (no trailing zeros beyond the cents).

    Example:
        >>> dollars(500_000_000)
        Decimal('0.50')
    """
    value = (Decimal(nanos) * _NANO).normalize()
    if value.as_tuple().exponent > -2:  # type: ignore[operator]
        value = value.quantize(Decimal("0.01"))
    return value
