"""Model prices: a table of your own, merged over genai-prices (the ``prices`` extra).

A call is priced by its own model. :class:`ModelPrice` gives US dollars per
million tokens of each kind; :class:`PriceTable` finds a model's price in your
table first, then in genai-prices (pydantic's price database, tiered and
cache prices included), then in the fallback price, if any.

Example:
    >>> from tbc_integrations import ModelPrice, Usage
    >>> price = ModelPrice(input="2.50", output="10", cache_read="1.25")
    >>> price.cost(Usage(1000, 200, cache_read_tokens=400))
    Decimal('0.004')
    >>> price.worst_case(1000, 200)
    Decimal('0.0045')
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Protocol

from ._errors import ContractError, InvalidValueError, MissingDependencyError
from ._money import ceil_nanos, to_decimal
from ._usage import Usage

__all__ = ["ModelPrice", "Price", "PriceTable"]

logger = logging.getLogger("tbc_integrations")
_MILLION = Decimal(1_000_000)
_NO_KINDS = (0, 0, 0, 0, 0)
Amount = Decimal | str | int | float
"""US dollars as the API takes them (a float through its decimal text)."""

# LangChain's ls_provider and CrewAI/LiteLLM prefixes, in genai-prices' provider ids
_PROVIDERS = {
    "openai": "openai",
    "azure": "azure",
    "azure_openai": "azure",
    "anthropic": "anthropic",
    "google": "google",
    "google_genai": "google",
    "google_vertexai": "google",
    "gemini": "google",
    "vertex_ai": "google",
    "groq": "groq",
    "mistral": "mistral",
    "mistralai": "mistral",
    "bedrock": "aws",
    "amazon_bedrock": "aws",
    "deepseek": "deepseek",
    "xai": "x-ai",
    "together": "together",
    "fireworks": "fireworks",
    "openrouter": "openrouter",
    "cohere": "cohere",
    "perplexity": "perplexity",
}


class Price(Protocol):
    """What the ledger asks of a model's price."""

    def cost(self, usage: Usage) -> Decimal:
        """The exact cost of a call's usage, in US dollars."""

    def worst_case(self, input_tokens: int, output_tokens: int) -> Decimal:
        """The most a call of that many input and output tokens can cost."""

    def cost_nanos(self, usage: Usage) -> int:
        """:meth:`cost` rounded up to whole nano-dollars (what the stores keep)."""

    def worst_case_nanos(self, input_tokens: int, output_tokens: int) -> int:
        """:meth:`worst_case` rounded up to whole nano-dollars."""


def _optional(value: Any, what: str) -> Decimal | None:
    return None if value is None else to_decimal(value, None, what)


@dataclass(frozen=True, init=False)
class ModelPrice:
    """A model's prices in US dollars per million tokens.

    Amounts are ``str``, ``int``, ``Decimal`` or ``float`` (read through its decimal
    text). Kinds left ``None`` cost what their plain kind costs: cache reads,
    cache writes and audio input the ``input`` price; reasoning and audio output
    the ``output`` price.

    Args:
        input: Price of uncached input tokens.
        output: Price of output tokens.
        cache_read: Price of input tokens read from the provider's prompt cache.
        cache_write: Price of input tokens written to the cache.
        reasoning: Price of reasoning tokens (part of the output).
        input_audio: Price of audio input tokens.
        output_audio: Price of audio output tokens.

    Raises:
        InvalidValueError: a price that is negative, not finite or not an amount.

    Example:
        >>> ModelPrice(input=3, output=15).cost(Usage(1_000_000, 0))
        Decimal('3')
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    reasoning: Decimal | None = None
    input_audio: Decimal | None = None
    output_audio: Decimal | None = None
    # nano-dollars per token of each kind, in the order above (None: not whole numbers)
    _nanos: tuple[int, ...] | None = field(init=False, repr=False, compare=False)
    _worst_out: int | None = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        input: Amount,
        output: Amount,
        cache_read: Amount | None = None,
        cache_write: Amount | None = None,
        reasoning: Amount | None = None,
        input_audio: Amount | None = None,
        output_audio: Amount | None = None,
    ) -> None:
        object.__setattr__(self, "input", to_decimal(input, None, "ModelPrice.input"))
        object.__setattr__(self, "output", to_decimal(output, None, "ModelPrice.output"))
        given = {
            "cache_read": cache_read,
            "cache_write": cache_write,
            "reasoning": reasoning,
            "input_audio": input_audio,
            "output_audio": output_audio,
        }
        for kind, value in given.items():
            object.__setattr__(self, kind, _optional(value, f"ModelPrice.{kind}"))
        # nano-dollars per token, as integers when every price allows (the common case:
        # then a call is priced in integer arithmetic, exactly)
        per_token = [
            p * 1000
            for p in (
                self.input,
                self.output,
                _or(self.cache_read, self.input),
                _or(self.cache_write, self.input),
                _or(self.reasoning, self.output),
                _or(self.input_audio, self.input),
                _or(self.output_audio, self.output),
            )
        ]
        whole = all(p == p.to_integral_value() for p in per_token)
        nanos = tuple(int(p) for p in per_token) if whole else None
        object.__setattr__(self, "_nanos", nanos)
        # the worst output price (output, reasoning, audio output): what a reservation holds
        object.__setattr__(
            self, "_worst_out", None if nanos is None else max(nanos[1], nanos[4], nanos[6])
        )

    def cost_nanos(self, usage: Usage) -> int:
        """:meth:`cost` in nano-dollars, rounded up.

        Example:
            >>> ModelPrice(input="0.15", output="0.60").cost_nanos(Usage(1000, 100))
            210000
        """
        n = self._nanos
        if n is None:
            return ceil_nanos(self.cost(usage))
        pin, pout, pread, pwrite, preason, pain, paout = n
        if usage[2:] == _NO_KINDS:
            return usage[0] * pin + usage[1] * pout  # integers: exact
        return (
            usage.uncached_input_tokens * pin
            + int(usage.cache_read_tokens) * pread
            + int(usage.cache_write_tokens) * pwrite
            + int(usage.input_audio_tokens) * pain
            + usage.text_output_tokens * pout
            + int(usage.reasoning_tokens) * preason
            + int(usage.output_audio_tokens) * paout
        )

    def worst_case_nanos(self, input_tokens: int, output_tokens: int) -> int:
        """:meth:`worst_case` in nano-dollars, rounded up.

        Example:
            >>> ModelPrice(input="0.15", output="0.60").worst_case_nanos(1000, 100)
            210000
        """
        n, worst_out = self._nanos, self._worst_out
        if n is None or worst_out is None:
            return ceil_nanos(self.worst_case(input_tokens, output_tokens))
        return input_tokens * n[0] + output_tokens * worst_out

    def cost(self, usage: Usage) -> Decimal:
        """The exact cost of ``usage`` in US dollars, each kind at its own price.

        Example:
            >>> ModelPrice(input=1, output=2, reasoning=4).cost(Usage(0, 10, reasoning_tokens=5))
            Decimal('0.00003')
        """
        pin, pout = self.input, self.output
        total = (
            usage.uncached_input_tokens * pin
            + int(usage.cache_read_tokens) * _or(self.cache_read, pin)
            + int(usage.cache_write_tokens) * _or(self.cache_write, pin)
            + int(usage.input_audio_tokens) * _or(self.input_audio, pin)
            + usage.text_output_tokens * pout
            + int(usage.reasoning_tokens) * _or(self.reasoning, pout)
            + int(usage.output_audio_tokens) * _or(self.output_audio, pout)
        )
        return total / _MILLION

    def worst_case(self, input_tokens: int, output_tokens: int) -> Decimal:
        """Input at the input price, output at the highest output price (reasoning, audio).

        Example:
            >>> ModelPrice(input=1, output=2, reasoning=4).worst_case(100, 100)
            Decimal('0.0005')
        """
        top = max(self.output, self.reasoning or 0, self.output_audio or 0)
        return (input_tokens * self.input + output_tokens * top) / _MILLION

    @classmethod
    def from_value(cls, model: str, value: ModelPrice | Mapping[str, Any]) -> ModelPrice:
        """A price from a :class:`ModelPrice` or a mapping of its fields (``budgets.yaml``).

        Raises:
            ContractError: naming the model and the bad value.

        Example:
            >>> ModelPrice.from_value("m", {"input": "0.15", "output": "0.60"}).output
            Decimal('0.60')
        """
        if isinstance(value, ModelPrice):
            return value
        if not isinstance(value, Mapping):
            raise ContractError(f"Price of model {model!r} must be a ModelPrice, got {value!r}")
        known = [f.name for f in fields(cls) if f.init]
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise ContractError(
                f"Price of model {model!r}: unknown field(s) {unknown} (a price has {known})"
            )
        missing = [k for k in ("input", "output") if k not in value]
        if missing:
            raise ContractError(f"Price of model {model!r}: needs {' and '.join(missing)}")
        try:
            return cls(**value)
        except (TypeError, InvalidValueError) as exc:
            raise ContractError(f"Price of model {model!r}: {exc}") from None


def _or(price: Decimal | None, default: Decimal) -> Decimal:
    return default if price is None else price


class _GenaiPrice:
    """A model's price from genai-prices: tiers, per-kind and time-dependent prices."""

    def __init__(self, model_info: Any, usage_type: Any) -> None:
        self.model_info = model_info
        self._usage = usage_type

    def _calc(self, usage: Any) -> Decimal:
        prices = self.model_info.get_prices(datetime.now(tz=timezone.utc))
        return Decimal(prices.calc_price(usage)["total_price"])

    def cost(self, usage: Usage) -> Decimal:
        return self._calc(
            self._usage(
                input_tokens=usage.input_tokens,
                cache_read_tokens=int(usage.cache_read_tokens),
                cache_write_tokens=int(usage.cache_write_tokens),
                input_audio_tokens=int(usage.input_audio_tokens),
                output_tokens=usage.output_tokens,
                output_audio_tokens=int(usage.output_audio_tokens),
            )
        )

    def worst_case(self, input_tokens: int, output_tokens: int) -> Decimal:
        return self._calc(self._usage(input_tokens=input_tokens, output_tokens=output_tokens))

    def cost_nanos(self, usage: Usage) -> int:
        return ceil_nanos(self.cost(usage))

    def worst_case_nanos(self, input_tokens: int, output_tokens: int) -> int:
        return ceil_nanos(self.worst_case(input_tokens, output_tokens))


def provider_id(provider: str | None, model: str | None = None) -> str | None:
    """genai-prices' provider id for a framework's provider name or a ``provider/model`` name.

    Example:
        >>> provider_id("google_genai"), provider_id(None, "anthropic/claude-haiku-4-5")
        ('google', 'anthropic')
    """
    if provider:
        return _PROVIDERS.get(provider.lower(), provider.lower())
    if model and "/" in model:
        return _PROVIDERS.get(model.split("/", 1)[0].lower())
    return None


class PriceTable:
    """Prices by model: your table, then genai-prices, then a fallback.

    Args:
        prices: ``{model: ModelPrice}`` (or mappings of its fields); a key matches
            the model name as the framework reports it, or its part after the
            provider's ``provider/`` prefix.
        default_source: Look models up in genai-prices (the ``prices`` extra) when
            your table has none. Without the extra installed, only your table is used.
        fallback: The price of any model neither source knows; ``None``: such a
            call has no price (refused for an agent with a cost cap).

    Example:
        >>> table = PriceTable({"my-model": ModelPrice(input=1, output=2)}, default_source=False)
        >>> table.find("openai/my-model") is not None, table.find("other") is None
        (True, True)
    """

    def __init__(
        self,
        prices: Mapping[str, ModelPrice | Mapping[str, Any]] | None = None,
        *,
        default_source: bool = True,
        fallback: ModelPrice | None = None,
    ) -> None:
        if prices is not None and not isinstance(prices, Mapping):
            raise ContractError(f"prices must map model names to ModelPrice, got {prices!r}")
        self.table = {str(k): ModelPrice.from_value(str(k), v) for k, v in (prices or {}).items()}
        self.default_source = default_source
        self.fallback = fallback
        self._found: dict[tuple[str | None, str | None], Price | None] = {}
        self._lock = threading.Lock()

    def find(self, model: str | None, provider: str | None = None) -> Price | None:
        """The price of ``model`` (served by ``provider``), or ``None`` when unknown."""
        key = (model, provider)
        try:
            return self._found[key]
        except KeyError:
            pass
        price = self._lookup(model, provider)
        with self._lock:
            self._found[key] = price
        return price

    def _lookup(self, model: str | None, provider: str | None) -> Price | None:
        if model:
            short = model.rsplit("/", 1)[-1]
            for name in (model, short):
                if name in self.table:
                    return self.table[name]
            if self.default_source:
                found = _from_genai_prices(short, provider_id(provider, model))
                if found is not None:
                    return found
        return self.fallback


def _from_genai_prices(model: str, provider: str | None) -> Price | None:
    try:
        from genai_prices import Usage as GenaiUsage
        from genai_prices import data_snapshot
    except ImportError:
        return None
    snapshot = data_snapshot.get_snapshot()
    found: Any = None
    for prov in (provider, None) if provider else (None,):
        try:
            found = snapshot.find_provider_model(model, None, prov, None)
            break
        except LookupError:
            continue
    if found is None:
        return None
    return _flat_price(found[1]) or _GenaiPrice(found[1], GenaiUsage)


# genai-prices' keys for the kinds a Usage reports, and ModelPrice's names for them
_GENAI_TOKEN_KEYS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cache_read",
    "cache_write_mtok": "cache_write",
    "input_audio_mtok": "input_audio",
    "output_audio_mtok": "output_audio",
}


def _flat_price(model_info: Any) -> ModelPrice | None:
    """A genai-prices model's price as a :class:`ModelPrice`, when it is one flat rate
    per token kind for good; ``None`` when it is not (the call is then priced by
    genai-prices' ``calc_price`` on each call, which costs about a hundred microseconds).

    Flat: a single price (not conditional on the date or the time of day), no tier,
    and no price per request. Prices of units a :class:`Usage` never reports (web
    searches, images, characters, hour-long cache writes) apply to none of its
    tokens, so they change nothing here; reasoning tokens are billed as output, as
    ``calc_price`` bills them when given a ``Usage``'s kinds.
    """
    from genai_prices.types import ModelPrice as GenaiModelPrice

    prices = model_info.prices
    if not isinstance(prices, GenaiModelPrice) or prices.requests_kcount is not None:
        return None
    values = {key: getattr(prices, key) for key in _GENAI_TOKEN_KEYS}
    if values["input_mtok"] is None or values["output_mtok"] is None:
        return None
    if not all(v is None or isinstance(v, Decimal) for v in vars(prices).values()):
        return None  # tiered somewhere: the tier depends on the call's input
    return ModelPrice(**{_GENAI_TOKEN_KEYS[k]: v for k, v in values.items() if v is not None})


def require_prices_extra() -> None:
    """Raise a clear error when genai-prices is not installed."""
    try:
        import genai_prices  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "Prices from genai-prices need the 'prices' extra: pip install "
            "'tbc-integrations[prices]' (or give BudgetManager(prices={...}))"
        ) from exc
