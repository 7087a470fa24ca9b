"""Real token usage, by kind, and the provider shapes it arrives in.

``input_tokens`` counts every input token (cache reads, cache writes and audio
included) and ``output_tokens`` every output token (reasoning and audio
included): the kinds split those totals for pricing, so a total never drops a
token.

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
    ("prompt_token_count", "candidates_token_count"),  # Gemini usage_metadata
    ("inputTokens", "outputTokens"),  # Bedrock Converse
)
_PLAIN = {"input_tokens", "output_tokens", "total_tokens"}
_NO_KINDS = (0, 0, 0, 0, 0)
_KINDS = (
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
)


def _get(value: Any, key: str) -> Any:
    if isinstance(value, Mapping):
        return value.get(key)
    return getattr(value, key, None)


def _kinds(value: Any, in_key: str) -> dict[str, Any]:
    """The kinds a provider reports beside its totals, in ``Usage``'s names."""
    out: dict[str, Any] = {}
    if in_key == "prompt_token_count":  # Gemini: cache inside the prompt, thoughts beside
        out["cache_read_tokens"] = _get(value, "cached_content_token_count")
        out["reasoning_tokens"] = _get(value, "thoughts_token_count")
        out["_outside_output"] = True
        return out
    if in_key == "inputTokens":  # Bedrock Converse: cache beside the input
        out["cache_read_tokens"] = _get(value, "cacheReadInputTokens")
        out["cache_write_tokens"] = _get(value, "cacheWriteInputTokens")
        out["_outside_input"] = True
        return out
    if in_key == "prompt_tokens":  # OpenAI: details inside the totals
        pd, cd = _get(value, "prompt_tokens_details"), _get(value, "completion_tokens_details")
        if pd is not None:
            out["cache_read_tokens"] = _get(pd, "cached_tokens")
            out["input_audio_tokens"] = _get(pd, "audio_tokens")
        if cd is not None:
            out["reasoning_tokens"] = _get(cd, "reasoning_tokens")
            out["output_audio_tokens"] = _get(cd, "audio_tokens")
        return out
    idet, odet = _get(value, "input_token_details"), _get(value, "output_token_details")
    if idet is not None or odet is not None:  # LangChain usage_metadata: inside the totals
        if idet is not None:
            out["cache_read_tokens"] = _get(idet, "cache_read")
            out["cache_write_tokens"] = _get(idet, "cache_creation")
            out["input_audio_tokens"] = _get(idet, "audio")
        if odet is not None:
            out["reasoning_tokens"] = _get(odet, "reasoning")
            out["output_audio_tokens"] = _get(odet, "audio")
        return out
    for kind in _KINDS:
        out[kind] = _get(value, kind)
    # Anthropic's raw usage counts cache reads and writes beside input_tokens
    read, write = _get(value, "cache_read_input_tokens"), _get(value, "cache_creation_input_tokens")
    if read is not None or write is not None:
        out["cache_read_tokens"], out["cache_write_tokens"] = read, write
        out["_outside_input"] = True
    return out


class Usage(NamedTuple):
    """Tokens a call really used: input and output totals, and the kinds within them.

    ``cache_read_tokens``, ``cache_write_tokens`` and ``input_audio_tokens`` are
    parts of ``input_tokens``; ``reasoning_tokens`` and ``output_audio_tokens``
    parts of ``output_tokens``. Prices apply per kind (see
    :class:`~tbc_integrations.ModelPrice`); budgets count the totals.

    Example:
        >>> Usage(10, 5).total_tokens
        15
        >>> Usage(100, 40, cache_read_tokens=80, reasoning_tokens=30).uncached_input_tokens
        20
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    @property
    def uncached_input_tokens(self) -> int:
        """Input tokens billed at the plain input price (no cache, no audio)."""
        return (
            self.input_tokens
            - self.cache_read_tokens
            - self.cache_write_tokens
            - self.input_audio_tokens
        )

    @property
    def text_output_tokens(self) -> int:
        """Output tokens billed at the plain output price (no reasoning, no audio)."""
        return self.output_tokens - self.reasoning_tokens - self.output_audio_tokens

    @classmethod
    def parse(cls, value: UsageLike, *, agent: str = "?") -> Usage:
        """Read usage from a :class:`Usage`, a provider dict or an object with attributes.

        Accepts LangChain's ``usage_metadata`` (``input_tokens``/``output_tokens`` with
        ``input_token_details``/``output_token_details``), OpenAI's ``usage``
        (``prompt_tokens``/``completion_tokens`` with their ``*_details``), Anthropic's
        ``usage`` (cache reads and writes beside ``input_tokens``: they are added to
        it), Gemini's ``usage_metadata`` (``prompt_token_count``, ``candidates_token_count``,
        thoughts added to the output, ``cached_content_token_count`` within the prompt),
        Bedrock Converse's ``usage`` (``inputTokens``, ``outputTokens``, cache reads and
        writes added to the input), and objects carrying any of these as attributes (the
        OpenAI SDK's ``CompletionUsage``).

        Raises:
            InvalidTokenCountError: naming the agent and the value when neither
                pair is present, a count is not a non-negative integer, or the
                kinds add up to more than their total.

        Example:
            >>> Usage.parse({"input_tokens": 3, "output_tokens": 4, "total_tokens": 7})
            Usage(input_tokens=3, output_tokens=4)
            >>> Usage.parse({"prompt_tokens": 50, "completion_tokens": 9,
            ...              "prompt_tokens_details": {"cached_tokens": 40}})
            Usage(input_tokens=50, output_tokens=9, cache_read_tokens=40)
            >>> Usage.parse({"prompt_token_count": 120, "candidates_token_count": 30,
            ...              "thoughts_token_count": 50, "cached_content_token_count": 100})
            Usage(input_tokens=120, output_tokens=80, cache_read_tokens=100, reasoning_tokens=50)
        """
        return parse_usage(value, agent)

    def __repr__(self) -> str:
        kinds = "".join(f", {k}={v!r}" for k, v in zip(_KINDS, self[2:], strict=True) if v)
        return f"Usage(input_tokens={self[0]!r}, output_tokens={self[1]!r}{kinds})"

    def _checked(self, agent: str) -> Usage:
        if self.uncached_input_tokens < 0 or self.text_output_tokens < 0:
            raise InvalidTokenCountError(
                f"Agent '{agent}': usage kinds add up to more than their totals: {self!r}"
            )
        return self


def parse_usage(value: UsageLike, agent: str = "?") -> Usage:
    """:meth:`Usage.parse` as a plain function (what the ledger calls on every commit).

    Example:
        >>> parse_usage({"input_tokens": 3, "output_tokens": 4}, "writer")
        Usage(input_tokens=3, output_tokens=4)
    """
    if type(value) is dict:
        if value.keys() <= _PLAIN:  # the plain provider shape, fast
            i, o = value.get("input_tokens"), value.get("output_tokens")
            if type(i) is int and type(o) is int and 0 <= i <= MAX_TOKENS and 0 <= o <= MAX_TOKENS:
                return Usage(i, o)
        else:
            usage = _with_details(value)
            if usage is not None:
                return usage
    elif type(value) is Usage:  # what most callers pass, fast
        if value[2:] == _NO_KINDS:
            i, o = value[0], value[1]
            if type(i) is int and type(o) is int and 0 <= i <= MAX_TOKENS and 0 <= o <= MAX_TOKENS:
                return value
        elif _exact(value):
            return value
    return _parse_any(value, agent)


def _exact(counts: tuple[Any, ...]) -> bool:
    """Whether ``counts`` (a ``Usage``'s seven fields) are ints in range whose kinds fit
    within their totals: what :func:`_parse_any` would return unchanged."""
    for n in counts:
        if type(n) is not int or not 0 <= n <= MAX_TOKENS:
            return False
    i, o, read, write, reasoning, audio_in, audio_out = counts
    fits: bool = i >= read + write + audio_in and o >= reasoning + audio_out
    return fits


def _with_details(value: dict[str, Any]) -> Usage | None:
    """LangChain's ``usage_metadata`` with its ``input_token_details`` and
    ``output_token_details`` (what chat models such as ``ChatOpenAI`` and
    ``ChatAnthropic`` report on every call), read directly when its counts are plain
    ints; ``None`` leaves anything else to :func:`_parse_any`, which reads it the same.

    Example:
        >>> _with_details({"input_tokens": 50, "output_tokens": 9, "total_tokens": 59,
        ...     "input_token_details": {"cache_read": 40}, "output_token_details": {}})
        Usage(input_tokens=50, output_tokens=9, cache_read_tokens=40)
    """
    idet, odet = value.get("input_token_details"), value.get("output_token_details")
    if idet is None and odet is None:  # read as another shape (Anthropic's raw usage...)
        return None
    if idet is None:
        idet = {}
    if odet is None:
        odet = {}
    if type(idet) is not dict or type(odet) is not dict:
        return None
    # Usage's order; a missing or None count is 0, as _parse_any reads it
    counts: tuple[Any, ...] = (
        value.get("input_tokens"),
        value.get("output_tokens"),
        idet.get("cache_read") or 0,
        idet.get("cache_creation") or 0,
        odet.get("reasoning") or 0,
        idet.get("audio") or 0,
        odet.get("audio") or 0,
    )
    return Usage(*counts) if _exact(counts) else None


def _parse_any(value: UsageLike, agent: str) -> Usage:
    """:func:`parse_usage` for every shape (the fast paths aside)."""
    if isinstance(value, tuple) and not isinstance(value, Mapping):
        # a Usage too: its fields are whatever it was built with, so they are checked
        if not 2 <= len(value) <= len(Usage._fields):
            raise InvalidTokenCountError(
                f"Agent '{agent}': cannot read token usage from {value!r}; expected "
                "(input_tokens, output_tokens)"
            )
        return Usage(
            *(check_tokens(x, f, agent) for f, x in zip(Usage._fields, value, strict=False))
        )._checked(agent)
    for in_key, out_key in _KEY_PAIRS:
        if isinstance(value, Mapping):
            found = in_key in value or out_key in value
        else:
            found = hasattr(value, in_key) or hasattr(value, out_key)
        if not found:
            continue
        inp = check_tokens(_get(value, in_key) or 0, in_key, agent)
        out = check_tokens(_get(value, out_key) or 0, out_key, agent)
        kinds = _kinds(value, in_key)
        outside_in = kinds.pop("_outside_input", False)
        outside_out = kinds.pop("_outside_output", False)
        checked = {k: check_tokens(v or 0, k, agent) for k, v in kinds.items()}
        if outside_in:
            inp = check_tokens(
                inp + checked["cache_read_tokens"] + checked["cache_write_tokens"],
                in_key,
                agent,
            )
        if outside_out:
            out = check_tokens(out + checked["reasoning_tokens"], out_key, agent)
        return Usage(inp, out, **checked)._checked(agent)
    raise InvalidTokenCountError(
        f"Agent '{agent}': cannot read token usage from {value!r}; expected "
        "input_tokens/output_tokens or prompt_tokens/completion_tokens"
    )


UsageLike = Usage | Mapping[str, Any] | tuple[int, ...] | Any
