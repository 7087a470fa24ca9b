"""Input checks shared by every verb: names, token counts, confidences, leases.

Every entry point runs these before a store sees the value, so every store
refuses the same inputs with the same error.

Example:
    >>> check_tokens(12, "input_tokens", "writer")
    12
    >>> check_agent_name("writer")
    'writer'
"""

from __future__ import annotations

import math
import operator
from typing import Any

from ._errors import ContractError, InvalidTokenCountError, InvalidValueError

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_TOKENS",
    "check_agent_name",
    "check_confidence",
    "check_lease",
    "check_tokens",
]

MAX_TOKENS = 2**53 - 1
"""The largest token count any store holds exactly (a double's integer range, as in Redis)."""

MAX_NAME_LENGTH = 256
"""The longest agent name, in characters."""


def check_agent_name(name: Any) -> str:
    """Return ``name`` if it is a valid agent name, or raise ``ContractError`` naming it.

    A name is a non-empty ``str`` of at most 256 printable characters
    (``str.isprintable``: letters, digits, punctuation, symbols and the ASCII
    space; no control or format characters, no lone surrogates).

    Example:
        >>> check_agent_name("écrivain | 2")
        'écrivain | 2'
    """
    if type(name) is str and 0 < len(name) <= MAX_NAME_LENGTH and name.isprintable():
        return name
    raise ContractError(
        f"an agent name must be a non-empty string of at most {MAX_NAME_LENGTH} printable "
        f"characters, got {name!r}"
    )


def check_tokens(value: Any, field: str, agent: str) -> int:
    """Return ``value`` as an ``int`` in [0, 2**53 - 1] or raise naming agent and value.

    Bools, floats (NaN and infinities included), strings, negatives and counts
    above :data:`MAX_TOKENS` are refused.

    Example:
        >>> check_tokens(12, "input_tokens", "writer")
        12
    """
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    if isinstance(value, (bool, float, str, bytes)) or value is None:
        as_int = -1
    else:
        try:
            as_int = operator.index(value)
        except TypeError:
            as_int = -1
    if 0 <= as_int <= MAX_TOKENS:
        return as_int
    raise InvalidTokenCountError(
        f"Agent '{agent}': {field} must be an integer from 0 to {MAX_TOKENS}, got {value!r}"
    )


def check_confidence(value: Any, agent: str, field: str = "confidence") -> float:
    """Return ``value`` as a float in [0, 1] or raise ``InvalidValueError`` naming it.

    Example:
        >>> check_confidence(0.75, "critic")
        0.75
    """
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        as_float = float(value)
        if 0.0 <= as_float <= 1.0:
            return as_float
    raise InvalidValueError(f"Agent '{agent}': {field} must be a number in [0, 1], got {value!r}")


def check_lease(value: Any) -> float:
    """Return ``value`` as a positive, finite number of seconds or raise ``InvalidValueError``.

    Example:
        >>> check_lease(30)
        30.0
    """
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        as_float = float(value)
        if 0.0 < as_float < math.inf:
            return as_float
    raise InvalidValueError(f"lease_seconds must be a positive number of seconds, got {value!r}")
