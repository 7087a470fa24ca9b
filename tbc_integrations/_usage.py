"""Real token usage, and the provider shapes it arrives in.

Example:
    >>> from tbc_integrations import Usage
    >>> Usage.parse({"prompt_tokens": 12, "completion_tokens": 30}, agent="writer")
    Usage(input_tokens=12, output_tokens=30)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from ._errors import InvalidTokenCountError
from ._validate import MAX_TOKENS, check_tokens

__all__ = ["Usage", "UsageLike"]

_KEY_PAIRS = (
    ("input_tokens", "output_tokens"),  # LangChain usage_metadata, Anthropic
    ("prompt_tokens", "completion_tokens"),  # OpenAI chat completions
)


class Usage(NamedTuple):
    """Tokens a call really used, split into input and output.

    Example:
        >>> Usage(10, 5).total_tokens
        15
    """

    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    @classmethod
    def parse(cls, value: UsageLike, *, agent: str = "?") -> Usage:
        """Read usage from a :class:`Usage`, a provider dict or an object with attributes.

        Accepts LangChain's ``usage_metadata`` (``input_tokens``/``output_tokens``),
        OpenAI's ``usage`` (``prompt_tokens``/``completion_tokens``), and objects
        carrying either pair as attributes (the OpenAI SDK's ``CompletionUsage``).

        Raises:
            InvalidTokenCountError: naming the agent and the value when neither
                pair is present or a count is not a non-negative integer.

        Example:
            >>> Usage.parse({"input_tokens": 3, "output_tokens": 4, "total_tokens": 7})
            Usage(input_tokens=3, output_tokens=4)
        """
        if type(value) is dict:  # the common provider shape, checked without the ABC
            i, o = value.get("input_tokens"), value.get("output_tokens")
            if type(i) is int and type(o) is int and 0 <= i <= MAX_TOKENS and 0 <= o <= MAX_TOKENS:
                return cls(i, o)
        if type(value) is cls or (
            isinstance(value, tuple) and len(value) == 2 and not isinstance(value, Mapping)
        ):
            # a Usage too: its fields are whatever it was built with, so they are checked
            i, o = value
            if type(i) is int and type(o) is int and 0 <= i <= MAX_TOKENS and 0 <= o <= MAX_TOKENS:
                return value if type(value) is cls else cls(i, o)
            return cls(
                check_tokens(i, "input_tokens", agent), check_tokens(o, "output_tokens", agent)
            )
        for in_key, out_key in _KEY_PAIRS:
            if isinstance(value, Mapping):
                if in_key in value or out_key in value:
                    return cls(
                        check_tokens(value.get(in_key, 0), in_key, agent),
                        check_tokens(value.get(out_key, 0), out_key, agent),
                    )
            elif hasattr(value, in_key) or hasattr(value, out_key):
                return cls(
                    check_tokens(getattr(value, in_key, 0), in_key, agent),
                    check_tokens(getattr(value, out_key, 0), out_key, agent),
                )
        raise InvalidTokenCountError(
            f"Agent '{agent}': cannot read token usage from {value!r}; expected "
            "input_tokens/output_tokens or prompt_tokens/completion_tokens"
        )


UsageLike = Usage | Mapping[str, Any] | tuple[int, int] | Any
