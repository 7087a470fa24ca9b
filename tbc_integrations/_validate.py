"""Input checks shared by every verb: token counts, confidences, names."""

from __future__ import annotations

import math
import operator
from typing import Any

from ._errors import InvalidTokenCountError

__all__ = ["check_confidence", "check_tokens"]


def check_tokens(value: Any, field: str, agent: str) -> int:
    """Return ``value`` as a non-negative ``int`` or raise naming agent and value.

    Bools, floats (NaN and infinities included), strings and negatives are refused.

    Example:
        >>> check_tokens(12, "input_tokens", "writer")
        12
    """
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, (bool, float, str, bytes)) or value is None:
        raise InvalidTokenCountError(
            f"Agent '{agent}': {field} must be a non-negative integer, got {value!r}"
        )
    try:
        as_int = operator.index(value)
    except TypeError:
        raise InvalidTokenCountError(
            f"Agent '{agent}': {field} must be a non-negative integer, got {value!r}"
        ) from None
    if as_int < 0:
        raise InvalidTokenCountError(
            f"Agent '{agent}': {field} must be a non-negative integer, got {value!r}"
        )
    return as_int


def check_confidence(value: Any, agent: str) -> float:
    """Return ``value`` as a float in [0, 1] or raise naming agent and value.

    Example:
        >>> check_confidence(0.75, "critic")
        0.75
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTokenCountError(
            f"Agent '{agent}': confidence must be a number in [0, 1], got {value!r}"
        )
    as_float = float(value)
    if math.isnan(as_float) or not 0.0 <= as_float <= 1.0:
        raise InvalidTokenCountError(
            f"Agent '{agent}': confidence must be a number in [0, 1], got {value!r}"
        )
    return as_float
