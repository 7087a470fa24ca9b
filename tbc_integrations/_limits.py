"""Limits above the team: budgets per run, per user, per tenant or for the whole app, per period.

A :class:`Limit` caps the tokens and/or the money of every call whose scope names
its key (``user="u-42"``), in calendar periods (``"hour"``, ``"day"``, ``"week"``,
``"month"``, in UTC or a given timezone) or a rolling window of a duration (``"30m"``,
``"24h"``, ``"30d"``: what was spent in the last 24 hours). A call is held and settled
in its agent and in every limit of its scope in one atomic step, on every store; a
period's counters start fresh at its boundary, and a rolling window's spend leaves it
a duration after it was made, with no job to run.

A rolling window keeps its spend in :data:`ROLLING_BUCKETS` buckets of a 60th of its
duration (a second for ``"1m"``, a minute for ``"1h"``, 24 minutes for ``"24h"``, 12
hours for ``"30d"``): a call's spend is counted from the time it was held until the end
of that time's bucket plus the duration, so for at least the duration and less than
a bucket more, never less.

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
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ._engine import LimitHold, LimitRow, limit_view
from ._errors import ContractError, InvalidValueError
from ._money import dollars, to_nanos
from ._records import AgentSpend, LimitStatus
from ._validate import MAX_TOKENS, check_agent_name

__all__ = [
    "CALENDAR_WINDOWS",
    "NEVER",
    "ROLLING_BUCKETS",
    "Limit",
    "scoped_value",
    "current_scope",
    "limit_holds",
    "row_status",
    "parse_duration",
    "scoped",
    "split_key",
]

CALENDAR_WINDOWS = ("hour", "day", "week", "month")
NEVER = float(2**53)
"""The end of a limit without a window: a time no clock reaches, exact in every store."""
_DURATION = re.compile(r"^(\d+)([mhd])$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400}
ROLLING_BUCKETS = 60
"""The buckets of a rolling window: each a 60th of its duration (a whole number of seconds)."""

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
            Monday) or ``"month"`` (calendar periods in ``tz``), or a rolling
            duration ``"<n>m"``, ``"<n>h"``, ``"<n>d"``: a call's spend counts for that
            long after it was held (rounded up to a 60th of the duration).
        warn_at: A fraction in (0, 1]: a ``BudgetWarning`` event is delivered once per
            scope value and period (for a rolling window: once per crossing, again
            after its spend fell back below) when the tokens or the money spent reach it.
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
                nanos = to_nanos(self.max_cost, None, "max_cost")
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
        span = 0  # a rolling window's duration and bucket width, in seconds
        if self.window is not None and self.window not in CALENDAR_WINDOWS:
            span = int(self.window[:-1]) * _UNIT_SECONDS[self.window[-1]]
        object.__setattr__(self, "_rolling", (span, span // ROLLING_BUCKETS))

    @property
    def scope_key(self) -> str:
        """The scope key this limit is per."""
        return self.key or self.name

    @property
    def rolling(self) -> bool:
        """Whether the window is a rolling duration (not a calendar period)."""
        return bool(self._rolling[0])  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (money as an exact decimal string), as the audit log records it.

        Example:
            >>> Limit.from_dict(Limit("user", max_cost="2", window="day").to_dict()).max_cost
            Decimal('2.00')
        """
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.max_cost is not None:
            out["max_cost"] = str(self.max_cost)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limit:
        """The limit :meth:`to_dict` wrote (unknown fields are refused).

        Raises:
            ContractError: naming the limit and what is wrong.
        """
        if not isinstance(data, Mapping):
            raise ContractError(f"a limit must be a mapping of fields, got {data!r}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ContractError(f"Limit {data.get('name')!r}: unknown field(s) {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ContractError(f"Limit {data.get('name')!r}: {exc}") from None

    def period(self, now: float) -> tuple[str, float]:
        """The period ``now`` falls in: its label and when it ends (:data:`NEVER`: never).

        For a rolling window: its label and when spend made at ``now`` leaves it (the
        end of ``now``'s bucket plus the duration).

        Example:
            >>> Limit("u", max_tokens=1, window="day").period(86_400 * 3 + 5)
            ('1970-01-04', 345600.0)
            >>> Limit("u", max_tokens=1, window="1h").period(3_600 * 5 + 61)
            ('1h', 21720.0)
        """
        w = self.window
        if w is None:
            return "all", NEVER
        span, width = self._rolling  # type: ignore[attr-defined]
        if span:
            return w, float(math.ceil(now / width) * width + span)
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
        """The row a call of scope value ``value`` at ``now`` is held in (for a rolling
        window, the row and ``now``'s bucket: ``key@leaves``, see ``LimitHold``)."""
        max_tokens, max_cost, warn_tokens, warn_cost = self._caps  # type: ignore[attr-defined]
        span, width = self._rolling  # type: ignore[attr-defined]
        if span:
            leaves = math.ceil(now / width) * width + span
            key = f"{self.name}/{value}/{self.window}@{leaves}"
            return (key, max_tokens, max_cost, warn_tokens, warn_cost, float(leaves))
        seen, until, label = self._current  # type: ignore[attr-defined]
        if not seen <= now < until:  # not in the period last computed: compute it once
            label, until = self.period(now)
            object.__setattr__(self, "_current", (now, until, label))
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


def split_key(key: str) -> tuple[str, str, str]:
    """A limit row's key as ``(limit, scope value, period)`` (a value may hold ``/``).

    Example:
        >>> split_key("user/team/a/2026-12-03")
        ('user', 'team/a', '2026-12-03')
    """
    name, rest = key.split("/", 1)
    value, period = rest.rsplit("/", 1)
    return name, value, period


def row_status(
    row: LimitRow | LimitHold, hold: LimitHold | None = None, now: float = -math.inf
) -> LimitStatus:
    """A limit row's numbers as a :class:`~tbc_integrations.LimitStatus` (a hold: a row
    no call has reached yet). With ``hold`` (the limit as the ledger has it now), the caps
    are the hold's: what a new call must fit in. A rolling window's row counts what its
    buckets hold at ``now`` and ``ends`` when its oldest counted spend leaves.

    Example:
        >>> from tbc_integrations import Limit
        >>> row_status(Limit("user", max_tokens=10).hold("u-1", 0.0)).remaining
        10
    """
    if not isinstance(row, LimitRow):
        row = LimitRow(row)
    name, value, period = split_key(row.key)
    max_tokens, max_cost = (row.max_tokens, row.max_cost) if hold is None else hold[1:3]
    consumed, cost, warned, ends = limit_view(row, now)
    if row.buckets is None:
        ends = None if row.until >= NEVER else row.until
    used, spent = consumed + row.reserved, cost + row.cost_reserved
    return LimitStatus(
        limit=name,
        value=value,
        period=period,
        ends=ends,
        max_tokens=max_tokens,
        max_cost=None if max_cost is None else dollars(max_cost),
        consumed=consumed,
        reserved=row.reserved,
        remaining=None if max_tokens is None else max_tokens - used,
        cost=dollars(cost),
        cost_reserved=dollars(row.cost_reserved),
        cost_remaining=None if max_cost is None else dollars(max_cost - spent),
        warned=bool(warned),
        agents=MappingProxyType(
            {
                agent: AgentSpend(tokens, dollars(cost), calls)
                for agent, (tokens, cost, calls) in sorted(row.agents.items())
            }
        ),
        warn_tokens=row.warn_tokens,
        warn_cost=None if row.warn_cost is None else dollars(row.warn_cost),
    )
