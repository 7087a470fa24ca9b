"""Limits above the team: budgets per run, per user, per tenant or for the whole app, per period.

A :class:`Limit` caps the tokens and/or the money of every call whose scope names
its key (``user="u-42"``), in calendar periods (``"hour"``, ``"day"``, ``"week"``,
``"month"``, in UTC or a given timezone) or fixed periods of a duration (``"30m"``,
``"24h"``, ``"7d"``, counted from the Unix epoch). A call is held and settled in its
agent and in every limit of its scope in one atomic step, on every store; a period's
counters start fresh at its boundary, with no job to run.

Example:
    >>> from tbc_integrations import BudgetManager, Limit
    >>> m = BudgetManager(limits=[Limit("user", max_tokens=100, window="day")])
    >>> _ = m.register_agent("writer", max_tokens=1_000)
    >>> with m.scope(user="u-42"):
    ...     r = m.reserve("writer", 30, 20)
    >>> r.limits[0].startswith("user/u-42/")
    True
"""

from __future__ import annotations

import contextvars
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ._engine import LimitHold
from ._errors import ContractError, InvalidValueError
from ._money import dollars, to_nanos
from ._validate import MAX_TOKENS, check_agent_name

__all__ = [
    "CALENDAR_WINDOWS",
    "NEVER",
    "Limit",
    "scoped_value",
    "current_scope",
    "limit_holds",
    "parse_duration",
    "scoped",
]

CALENDAR_WINDOWS = ("hour", "day", "week", "month")
NEVER = float(2**53)
"""The end of a limit without a window: a time no clock reaches, exact in every store."""
_DURATION = re.compile(r"^(\d+)([mhd])$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400}

_scope: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "tbc_scope", default=MappingProxyType({})
)


@dataclass(frozen=True)
class Limit:
    """A budget above the team, per value of one scope key, optionally per period.

    Args:
        name: The limit's name, and the scope key it is per unless ``key`` says.
        max_tokens: Tokens every call of one scope value may use in a period.
        max_cost: US dollars (``str``, ``int``, ``Decimal`` or ``float``) likewise.
        window: ``None`` (for good), ``"hour"``, ``"day"``, ``"week"`` (ISO, from
            Monday) or ``"month"`` (calendar periods in ``tz``), or a fixed
            duration ``"<n>m"``, ``"<n>h"``, ``"<n>d"`` counted from the Unix epoch.
        warn_at: A fraction in (0, 1]: a ``BudgetWarning`` event is delivered once per
            scope value and period when the tokens or the money spent reach it.
        key: The scope key the limit is per (``"user"``, ``"run"``); ``name`` by default.
        default: The key's value for a call whose scope lacks it (``"all"`` makes an
            app-wide limit); without one, such a call is an error naming the key.
        tz: The timezone of calendar periods (an IANA name).

    Raises:
        ContractError: naming the limit and the bad value.

    Example:
        >>> Limit("user", max_cost="2", window="day", warn_at=0.8).max_cost
        Decimal('2.00')
    """

    name: str
    max_tokens: int | None = None
    max_cost: Decimal | str | int | float | None = None
    window: str | None = None
    warn_at: float | None = None
    key: str | None = None
    default: str | None = None
    tz: str = "UTC"

    def __post_init__(self) -> None:
        try:
            check_agent_name(self.name)
        except InvalidValueError as exc:
            raise ContractError(f"Limit name: {exc}") from None
        if "/" in self.name:
            raise ContractError(f"Limit {self.name!r}: a name cannot hold '/'")
        mt = self.max_tokens
        if mt is not None and (
            isinstance(mt, bool) or not isinstance(mt, int) or not 0 <= mt <= MAX_TOKENS
        ):
            raise ContractError(
                f"Limit {self.name!r}: max_tokens must be an integer from 0 to {MAX_TOKENS}, "
                f"got {mt!r}"
            )
        if self.max_cost is not None:
            try:
                nanos = to_nanos(self.max_cost, self.name, "max_cost")
            except InvalidValueError as exc:
                raise ContractError(f"Limit {self.name!r}: {exc}") from None
            object.__setattr__(self, "max_cost", dollars(nanos))
        if self.max_tokens is None and self.max_cost is None:
            raise ContractError(f"Limit {self.name!r}: give max_tokens, max_cost or both")
        w = self.warn_at
        if w is not None and (
            isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1
        ):
            raise ContractError(f"Limit {self.name!r}: warn_at must be in (0, 1], got {w!r}")
        if self.window is not None and self.window not in CALENDAR_WINDOWS:
            if not isinstance(self.window, str) or not _DURATION.match(self.window):
                raise ContractError(
                    f"Limit {self.name!r}: window must be one of {CALENDAR_WINDOWS} or a "
                    f"duration like '30m', '24h', '7d', got {self.window!r}"
                )
            if int(self.window[:-1]) <= 0:
                raise ContractError(f"Limit {self.name!r}: window {self.window!r} is empty")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ContractError(f"Limit {self.name!r}: unknown timezone {self.tz!r}") from None
        # the caps in the stores' units; the period last computed (a time in it, its end,
        # its label): every time from that one to the end is in it
        max_cost = None if self.max_cost is None else to_nanos(self.max_cost, self.name)
        warn_tokens = warn_cost = None
        if self.warn_at is not None:
            if self.max_tokens is not None:
                warn_tokens = math.ceil(self.max_tokens * self.warn_at)
            if max_cost is not None:
                warn_cost = math.ceil(max_cost * self.warn_at)
        object.__setattr__(self, "_caps", (self.max_tokens, max_cost, warn_tokens, warn_cost))
        object.__setattr__(self, "_current", (math.inf, -math.inf, ""))

    @property
    def scope_key(self) -> str:
        """The scope key this limit is per."""
        return self.key or self.name

    def period(self, now: float) -> tuple[str, float]:
        """The period ``now`` falls in: its label and when it ends (:data:`NEVER`: never).

        Example:
            >>> Limit("u", max_tokens=1, window="day").period(86_400 * 3 + 5)
            ('1970-01-04', 345600.0)
        """
        w = self.window
        if w is None:
            return "all", NEVER
        if w not in CALENDAR_WINDOWS:
            seconds = int(w[:-1]) * _UNIT_SECONDS[w[-1]]
            index = math.floor(now / seconds)
            return f"{w}#{index}", float((index + 1) * seconds)
        t = datetime.fromtimestamp(now, ZoneInfo(self.tz))
        if w == "hour":
            start = t.replace(minute=0, second=0, microsecond=0)
            return start.strftime("%Y-%m-%dT%H"), _ts(start + timedelta(hours=1))
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        if w == "day":
            return start.strftime("%Y-%m-%d"), _ts(_add_days(start, 1))
        if w == "week":
            monday = _add_days(start, -start.weekday())
            return monday.strftime("%G-W%V"), _ts(_add_days(monday, 7))
        first = start.replace(day=1)
        following = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
        return first.strftime("%Y-%m"), _ts(following)

    def hold(self, value: str, now: float) -> LimitHold:
        """The row a call of scope value ``value`` at ``now`` is held in."""
        seen, until, label = self._current  # type: ignore[attr-defined]
        if not seen <= now < until:  # not in the period last computed: compute it once
            label, until = self.period(now)
            object.__setattr__(self, "_current", (now, until, label))
        max_tokens, max_cost, warn_tokens, warn_cost = self._caps  # type: ignore[attr-defined]
        key = f"{self.name}/{value}/{label}"
        return (key, max_tokens, max_cost, warn_tokens, warn_cost, until)


_SPAN = re.compile(r"^(\d+)([smhd])$")


def parse_duration(value: Any, what: str) -> float:
    """Seconds from a positive number of seconds or ``"<n>s"``, ``"<n>m"``, ``"<n>h"``,
    ``"<n>d"``.

    Raises:
        ContractError: naming ``what`` and the bad value.

    Example:
        >>> parse_duration("7d", "forget_after"), parse_duration(90, "forget_after")
        (604800.0, 90.0)
    """
    seconds = math.nan
    if isinstance(value, str):
        found = _SPAN.match(value)
        if found:
            seconds = float(int(found[1]) * {"s": 1, **_UNIT_SECONDS}[found[2]])
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    if not 0 < seconds < NEVER:
        raise ContractError(
            f"{what} must be a positive number of seconds or a duration like '90s', '30m', "
            f"'24h', '7d', got {value!r}"
        )
    return seconds


def _add_days(t: datetime, days: int) -> datetime:
    """``t`` plus whole calendar days (the same wall time, across DST changes)."""
    return (t.replace(tzinfo=None) + timedelta(days=days)).replace(tzinfo=t.tzinfo)


def _ts(t: datetime) -> float:
    return t.astimezone(timezone.utc).timestamp()


def check_scope(scope: Any) -> dict[str, str]:
    """A scope as ``{key: value}`` strings, or an error naming the bad entry."""
    if scope is None:
        return {}
    if not isinstance(scope, Mapping):
        raise InvalidValueError(f"scope must be a mapping of keys to values, got {scope!r}")
    out: dict[str, str] = {}
    for k, v in scope.items():
        if not isinstance(k, str) or not k or v is None:
            raise InvalidValueError(f"scope entry {k!r}: {v!r} is not a key and a value")
        value = str(v)
        if not value or len(value) > 256 or not value.isprintable():
            raise InvalidValueError(f"scope {k!r}: value {value!r} is not a printable name")
        out[k] = value
    return out


def current_scope() -> Mapping[str, str]:
    """The scope the calling context runs in (see :func:`scoped`)."""
    return _scope.get()


@contextmanager
def scoped(**keys: Any) -> Iterator[Mapping[str, str]]:
    """Run the block in a scope: its keys are added to any enclosing scope's.

    Example:
        >>> with scoped(user="u-1"):
        ...     with scoped(run="r-9"):
        ...         dict(current_scope())
        {'user': 'u-1', 'run': 'r-9'}
    """
    merged = {**_scope.get(), **check_scope(keys)}
    token = _scope.set(merged)
    try:
        yield merged
    finally:
        _scope.reset(token)


def scoped_value(limit: Limit) -> str | None:
    """The current scope's value for ``limit``'s key, else its default."""
    return _scope.get().get(limit.scope_key, limit.default)


def limit_holds(
    limits: Iterable[Limit], scope: Mapping[str, str] | None, now: float, agent: str
) -> tuple[LimitHold, ...]:
    """The limit rows a call of ``agent`` in ``scope`` must fit in, at ``now``.

    Raises:
        ContractError: a limit's key is missing from the scope and it has no default.
    """
    merged = {**_scope.get(), **(scope or {})}
    out = []
    for limit in limits:
        value = merged.get(limit.scope_key, limit.default)
        if value is None:
            raise ContractError(
                f"Agent '{agent}': limit {limit.name!r} is per {limit.scope_key!r}, and the "
                f"call's scope has no {limit.scope_key!r} (give it with "
                f"manager.scope({limit.scope_key}=...) or scope={{...}}); nothing was held"
            )
        out.append(limit.hold(value, now))
    return tuple(out)
