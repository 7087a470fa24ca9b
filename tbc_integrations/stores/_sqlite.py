"""A durable SQLite store: one file, many processes on one host, every verb one transaction.

Each verb runs the engine inside ``BEGIN IMMEDIATE`` (one writer at a time,
across processes): rows are read as the engine asks for them and the changed
ones are written back before ``COMMIT``. The file runs in WAL mode, so readers
never block.

A namespace carries an epoch, written when it is first used. If the file is
deleted or replaced under a running store, or the namespace's epoch changes,
every verb raises :class:`~tbc_integrations.NamespaceLostError` instead of
spending again from full budgets (see the README's recovery steps).

Example:
    >>> import tempfile, pathlib
    >>> from tbc_integrations import BudgetManager
    >>> url = "sqlite:///" + str(pathlib.Path(tempfile.mkdtemp()) / "budgets.db")
    >>> m = BudgetManager(store=url, namespace="run-1")
    >>> _ = m.register_agent("a", max_tokens=100)
    >>> BudgetManager(store=url, namespace="run-1").remaining("a")  # another process's view
    100
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._engine import (
    EXPIRED_MEMORY_SECONDS,
    LIMIT_MEMORY_SECONDS,
    SETTLED_MEMORY_SECONDS,
    AgentRow,
    LimitRow,
    TeamRow,
    Transaction,
)
from tbc_integrations._errors import ContractError, NamespaceLostError, StoreUnavailableError
from tbc_integrations._records import Reservation

from ._base import EngineStore

__all__ = ["SQLiteStore", "options_from_url"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    ns TEXT NOT NULL, name TEXT NOT NULL, contract TEXT NOT NULL,
    priority INTEGER NOT NULL, min_reserve INTEGER NOT NULL,
    max_input INTEGER, max_output INTEGER, threshold REAL,
    allocated INTEGER NOT NULL, consumed INTEGER NOT NULL DEFAULT 0,
    consumed_in INTEGER NOT NULL DEFAULT 0, consumed_out INTEGER NOT NULL DEFAULT 0,
    reserved INTEGER NOT NULL DEFAULT 0, reserved_in INTEGER NOT NULL DEFAULT 0,
    reserved_out INTEGER NOT NULL DEFAULT 0, borrowed INTEGER NOT NULL DEFAULT 0,
    lent INTEGER NOT NULL DEFAULT 0, refusals INTEGER NOT NULL DEFAULT 0,
    last_confidence REAL, complete INTEGER NOT NULL DEFAULT 0,
    cost INTEGER NOT NULL DEFAULT 0, cost_reserved INTEGER NOT NULL DEFAULT 0,
    warned INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ns, name)
);
CREATE TABLE IF NOT EXISTS reservations (
    ns TEXT NOT NULL, id TEXT NOT NULL, agent TEXT NOT NULL,
    input INTEGER NOT NULL, output INTEGER NOT NULL, expires_at REAL NOT NULL,
    loans TEXT NOT NULL, state TEXT NOT NULL, cost INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ns, id)
);
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (ns, state, expires_at);
CREATE TABLE IF NOT EXISTS limits (
    ns TEXT NOT NULL, key TEXT NOT NULL, max_tokens INTEGER, max_cost INTEGER,
    warn_tokens INTEGER, warn_cost INTEGER, until REAL NOT NULL,
    consumed INTEGER NOT NULL DEFAULT 0, reserved INTEGER NOT NULL DEFAULT 0,
    cost INTEGER NOT NULL DEFAULT 0, cost_reserved INTEGER NOT NULL DEFAULT 0,
    warned INTEGER NOT NULL DEFAULT 0, buckets TEXT, agents TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (ns, key)
);
CREATE TABLE IF NOT EXISTS namespaces (
    ns TEXT PRIMARY KEY, epoch TEXT NOT NULL, total INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS teams (
    ns TEXT NOT NULL, key TEXT NOT NULL, forget REAL NOT NULL, until REAL NOT NULL,
    PRIMARY KEY (ns, key)
);
CREATE INDEX IF NOT EXISTS teams_until ON teams (ns, until);
CREATE TABLE IF NOT EXISTS team_agents (
    ns TEXT NOT NULL, team TEXT NOT NULL, name TEXT NOT NULL,
    threshold REAL, allocated INTEGER NOT NULL, consumed INTEGER NOT NULL,
    consumed_in INTEGER NOT NULL, consumed_out INTEGER NOT NULL,
    reserved INTEGER NOT NULL, reserved_in INTEGER NOT NULL, reserved_out INTEGER NOT NULL,
    borrowed INTEGER NOT NULL, lent INTEGER NOT NULL, refusals INTEGER NOT NULL,
    last_confidence REAL, cost INTEGER NOT NULL, cost_reserved INTEGER NOT NULL,
    complete INTEGER NOT NULL, warned INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ns, team, name)
);
"""
IDLE_TEAMS = 16
"""Forgotten teams a new run's team deletes the rows of (their storage only: a team past
its idle time is never read again either way)."""

# the agent columns the engine changes, in AgentRow's names
_NUMBERS = (
    "threshold",
    "allocated",
    "consumed",
    "consumed_in",
    "consumed_out",
    "reserved",
    "reserved_in",
    "reserved_out",
    "borrowed",
    "lent",
    "refusals",
    "last_confidence",
    "cost",
    "cost_reserved",
    "complete",
    "warned",
)
# columns added after 0.2, for files made before them: (table, column, definition)
_ADDED = (
    ("agents", "cost", "INTEGER NOT NULL DEFAULT 0"),
    ("agents", "cost_reserved", "INTEGER NOT NULL DEFAULT 0"),
    ("reservations", "cost", "INTEGER NOT NULL DEFAULT 0"),
    ("reservations", "limits", "TEXT NOT NULL DEFAULT '[]'"),
    ("limits", "buckets", "TEXT"),
    ("agents", "warned", "INTEGER NOT NULL DEFAULT 0"),
    ("limits", "agents", "TEXT NOT NULL DEFAULT '{}'"),
    ("reservations", "team", "TEXT NOT NULL DEFAULT ''"),
)
_RESERVATION = "id, agent, input, output, expires_at, loans, cost, limits, team"
# a limit row's numbers, in LimitRow's names
_LIMIT = (
    "max_tokens",
    "max_cost",
    "warn_tokens",
    "warn_cost",
    "until",
    "consumed",
    "reserved",
    "cost",
    "cost_reserved",
    "warned",
    "buckets",
    "agents",
)
_SELECT_ROWS = f"SELECT name, contract, {', '.join(_NUMBERS)} FROM agents WHERE ns = ?"
_UPDATE_ROW = (
    f"UPDATE agents SET {', '.join(f'{f} = ?' for f in _NUMBERS)} WHERE ns = ? AND name = ?"
)
_SELECT_TEAM_ROW = (
    f"SELECT {', '.join(_NUMBERS)} FROM team_agents WHERE ns = ? AND team = ? AND name = ?"
)
_INSERT_TEAM_ROW = (
    f"INSERT INTO team_agents (ns, team, name, {', '.join(_NUMBERS)}) "
    f"VALUES (?, ?, ?{', ?' * len(_NUMBERS)})"
)
_UPDATE_TEAM_ROW = (
    f"UPDATE team_agents SET {', '.join(f'{f} = ?' for f in _NUMBERS)} "
    "WHERE ns = ? AND team = ? AND name = ?"
)
_OPTIONS = {"timeout"}


def has_namespace(path: str | Path, namespace: str) -> bool:
    """Whether the SQLite store file at ``path`` holds ``namespace``, read without writing
    (opening a store on it would create the namespace); ``False`` for a file that is not
    a store.

    Example:
        >>> import tempfile
        >>> db = Path(tempfile.mkdtemp()) / "ledger.db"
        >>> SQLiteStore(db, namespace="run-1").close()
        >>> has_namespace(db, "run-1"), has_namespace(db, "run-2")
        (True, False)
    """
    from urllib.parse import quote

    uri = f"file:{quote(str(Path(path).resolve()))}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        found = db.execute(
            "SELECT 1 FROM namespaces WHERE ns = ? UNION ALL SELECT 1 FROM agents WHERE ns = ?",
            (namespace, namespace),
        ).fetchone()
    except sqlite3.Error:
        return False  # not a store of ours
    finally:
        db.close()
    return found is not None


def options_from_url(url: str) -> tuple[str, dict[str, float]]:
    """The file a ``sqlite:///`` URL names (SQLAlchemy's convention) and its options.

    ``?timeout=SECONDS`` sets the busy timeout; any other option is refused.

    Example:
        >>> options_from_url("sqlite:///rel/budgets.db?timeout=5")
        ('rel/budgets.db', {'timeout': 5.0})
        >>> options_from_url("sqlite:////abs/b.db")
        ('/abs/b.db', {})
    """
    if not isinstance(url, str) or not url.lower().startswith("sqlite:///"):
        raise ContractError(f"a SQLite store URL looks like sqlite:///path.db, got {url!r}")
    path, _, query = url[len("sqlite:///") :].partition("?")
    if not path:
        raise ContractError(f"SQLite store URL {url!r} names no file")
    options: dict[str, float] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in _OPTIONS:
            raise ContractError(
                f"SQLite store URL {url!r}: unknown option {key!r} (known: "
                f"{', '.join(sorted(_OPTIONS))}); a ledger's file is always opened read-write"
            )
        try:
            seconds = float(value)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds < float("inf"):
            raise ContractError(
                f"SQLite store URL {url!r}: timeout must be a positive number of seconds, "
                f"got {value!r}"
            )
        options[key] = seconds
    return path, options


class _Tx(Transaction):
    """The rows one transaction read, written back (when changed) before it commits."""

    due = -math.inf  # lapsed leases are looked for by query, on every verb

    def __init__(self, store: SQLiteStore, db: sqlite3.Connection) -> None:
        self.store = store
        self.namespace = store.namespace
        self.db = db
        self.cache: dict[str, AgentRow] = {}
        self.read: dict[str, tuple[Any, ...]] = {}  # each row's numbers as read
        self.limit_cache: dict[str, LimitRow] = {}
        self.limit_read: dict[str, tuple[Any, ...]] = {}
        self._contracts: dict[str, BudgetContract] | None = None
        # teams per run: the one worked on ("" the namespace's own), each team's rows
        # (and their numbers as read), and team records (None: none, or deleted)
        self.team = ""
        self.swept = -math.inf
        self.caches: dict[str, dict[str, AgentRow]] = {"": self.cache}
        self.reads: dict[str, dict[str, tuple[Any, ...]]] = {"": self.read}
        self.team_recs: dict[str, TeamRow | None] = {}
        self.team_read: dict[str, tuple[float, float]] = {}

    def _row(self, values: Sequence[Any]) -> AgentRow:
        name = values[0]
        row = self.cache.get(name)
        if row is None:
            contract = self.store.contract(values[1])
            row = AgentRow.new(contract)
            for field, value in zip(_NUMBERS, values[2:], strict=True):
                setattr(row, field, value)
            row.complete = bool(row.complete)
            row.warned = bool(row.warned)
            self.cache[name] = row
            self.read[name] = _numbers(row)
        return row

    def agent(self, name: str) -> AgentRow | None:
        row = self.cache.get(name)
        if row is None and self.team:
            return self._team_row(name)
        if row is None:
            found = self.db.execute(
                _SELECT_ROWS + " AND name = ?", (self.namespace, name)
            ).fetchone()
            if found is None:
                return None
            row = self._row(found)
        return row

    def rows(self) -> Iterable[AgentRow]:
        found = self.db.execute(_SELECT_ROWS + " ORDER BY rowid", (self.namespace,)).fetchall()
        if self.team:  # the namespace's own team's rows, cached as such
            self.enter("")
        return [self._row(values) for values in found]

    # ----------------------------------------------------------- teams per run
    def _team_row(self, name: str) -> AgentRow | None:
        if self.team_recs.get(self.team) is None:
            return None  # no team (or deleted in this transaction): no rows
        found = self.db.execute(_SELECT_TEAM_ROW, (self.namespace, self.team, name)).fetchone()
        contract = self.contracts().get(name)
        if found is None or contract is None:
            return None
        row = AgentRow.new(contract)
        for field, value in zip(_NUMBERS, found, strict=True):
            setattr(row, field, value)
        row.complete = bool(row.complete)
        self.cache[name] = row
        self.read[name] = _numbers(row)
        return row

    def enter(self, key: str) -> TeamRow | None:
        self.team = key
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = {}
            self.reads[key] = {}
        self.cache, self.read = cache, self.reads[key]
        if not key:
            return None
        if key not in self.team_recs:
            found = self.db.execute(
                "SELECT forget, until FROM teams WHERE ns = ? AND key = ?", (self.namespace, key)
            ).fetchone()
            if found is None:
                self.team_recs[key] = None
            else:
                self.team_recs[key] = TeamRow(key, found[0], found[1])
                self.team_read[key] = (found[0], found[1])
        return self.team_recs[key]

    def add_team(self, row: TeamRow) -> None:
        self.db.execute(
            "INSERT INTO teams (ns, key, forget, until) VALUES (?, ?, ?, ?)",
            (self.namespace, row.key, row.forget, row.until),
        )
        self.team_recs[row.key] = row
        self.team_read[row.key] = (row.forget, row.until)

    def add_row(self, row: AgentRow) -> None:
        self.db.execute(_INSERT_TEAM_ROW, (self.namespace, self.team, row.name, *_numbers(row)))
        self.cache[row.name] = row
        self.read[row.name] = _numbers(row)

    def forget_team(self, key: str) -> None:
        self.db.execute("DELETE FROM teams WHERE ns = ? AND key = ?", (self.namespace, key))
        self.db.execute("DELETE FROM team_agents WHERE ns = ? AND team = ?", (self.namespace, key))
        self.team_recs[key] = None
        self.team_read.pop(key, None)
        self.caches[key], self.reads[key] = {}, {}
        if self.team == key:
            self.cache, self.read = self.caches[key], self.reads[key]

    def idle_teams(self, now: float) -> list[str]:
        found = self.db.execute(
            "SELECT key FROM teams WHERE ns = ? AND until <= ? LIMIT ?",
            (self.namespace, now, IDLE_TEAMS),
        )
        return [key for (key,) in found]

    def contracts(self) -> Mapping[str, BudgetContract]:
        if self._contracts is None:
            self._contracts = {
                name: self.store.contract(text)
                for name, text in self.db.execute(
                    "SELECT name, contract FROM agents WHERE ns = ? ORDER BY rowid",
                    (self.namespace,),
                )
            }
        return self._contracts

    def add_agent(self, contract: BudgetContract, row: AgentRow) -> None:
        text = json.dumps(contract.to_dict(), sort_keys=True)
        self.db.execute(
            "INSERT INTO agents (ns, name, contract, priority, min_reserve, max_input, "
            "max_output, threshold, allocated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                self.namespace,
                row.name,
                text,
                row.priority,
                row.min_reserve,
                row.max_input,
                row.max_output,
                row.threshold,
                row.allocated,
            ),
        )
        self.cache[row.name] = row
        if self._contracts is not None:
            self._contracts[row.name] = contract

    def dependents(self, name: str) -> Iterable[str]:
        return [n for n, c in self.contracts().items() if name in c.depends_on]

    def total(self) -> int:
        found = self.db.execute("SELECT total FROM namespaces WHERE ns = ?", (self.namespace,))
        return int(found.fetchone()[0])

    def set_total(self, total: int) -> None:
        self.db.execute("UPDATE namespaces SET total = ? WHERE ns = ?", (total, self.namespace))

    def hold(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        expires_at: float,
        loans: tuple[tuple[str, int], ...],
        cost: int,
        limits: tuple[str, ...],
        model: str | None = None,
        provider: str | None = None,
    ) -> Reservation:
        res = Reservation(
            self.store.new_id(),
            agent,
            input_tokens,
            output_tokens,
            expires_at,
            loans,
            self.namespace,
            cost,
            model,
            provider,
            limits,
            self.team,
        )
        self.db.execute(
            f"INSERT INTO reservations (ns, {_RESERVATION}, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open')",
            (
                self.namespace,
                res.id,
                res.agent,
                res.input_tokens,
                res.output_tokens,
                res.expires_at,
                json.dumps(res.loans),
                cost,
                json.dumps(limits),
                self.team,
            ),
        )
        return res

    def limit(self, key: str) -> LimitRow | None:
        row = self.limit_cache.get(key)
        if row is None:
            found = self.db.execute(
                f"SELECT key, {', '.join(_LIMIT)} FROM limits WHERE ns = ? AND key = ?",
                (self.namespace, key),
            ).fetchone()
            if found is None:
                return None
            row = self._limit_row(found)
        return row

    def _limit_row(self, found: Sequence[Any]) -> LimitRow:
        row = LimitRow((found[0], *found[1:5], found[5]))
        for field, value in zip(_LIMIT[5:-3], found[6:-3], strict=True):
            setattr(row, field, value)
        row.warned = bool(found[-3])
        if found[-2] is not None:  # a rolling window's buckets: [[leaves, tokens, cost]]
            row.buckets = {int(t): [int(n), int(c)] for t, n, c in json.loads(found[-2])}
        row.agents = {str(k): [int(x) for x in v] for k, v in json.loads(found[-1]).items()}
        self.limit_cache[row.key] = row
        self.limit_read[row.key] = _limit_numbers(row)
        return row

    def limit_rows(self, prefix: str) -> list[LimitRow]:
        """Every limit row kept whose key starts with ``prefix``, by key."""
        found = self.db.execute(
            f"SELECT key, {', '.join(_LIMIT)} FROM limits WHERE ns = ? "
            "AND substr(key, 1, ?) = ? ORDER BY key",
            (self.namespace, len(prefix), prefix),
        ).fetchall()
        return [self.limit_cache.get(values[0]) or self._limit_row(values) for values in found]

    def add_limit(self, row: LimitRow, now: float) -> None:
        self.db.execute(
            "DELETE FROM limits WHERE ns = ? AND until < ? AND reserved = 0 AND cost_reserved = 0",
            (self.namespace, now - LIMIT_MEMORY_SECONDS),
        )
        self.db.execute(
            f"INSERT INTO limits (ns, key, {', '.join(_LIMIT)}) VALUES (?, ?{', ?' * len(_LIMIT)})",
            (self.namespace, row.key, *_limit_numbers(row)),
        )
        self.limit_cache[row.key] = row
        self.limit_read[row.key] = _limit_numbers(row)

    def _reservation(self, values: Sequence[Any]) -> Reservation:
        rid, agent, inp, out, expires, loans, cost, limits, team = values
        pairs = tuple((str(d), int(t)) for d, t in json.loads(loans))
        keys = tuple(str(k) for k in json.loads(limits))
        return Reservation(
            rid, agent, inp, out, expires, pairs, self.namespace, cost, None, None, keys, team
        )

    def find(self, rid: str) -> tuple[str, Reservation] | None:
        found = self.db.execute(
            f"SELECT state, {_RESERVATION} FROM reservations WHERE ns = ? AND id = ?",
            (self.namespace, rid),
        ).fetchone()
        return None if found is None else (found[0], self._reservation(found[1:]))

    def settle(self, rid: str, now: float) -> None:
        self.db.execute(
            "UPDATE reservations SET state = 'settled', expires_at = ? WHERE ns = ? AND id = ?",
            (now + SETTLED_MEMORY_SECONDS, self.namespace, rid),
        )
        self.store.purge(self.db, now)

    def lapse(self, rid: str, now: float) -> None:
        # expires_at now says when to forget it
        self.db.execute(
            "UPDATE reservations SET state = 'expired', expires_at = ? WHERE ns = ? AND id = ?",
            (now + EXPIRED_MEMORY_SECONDS, self.namespace, rid),
        )

    def lapsed(self, now: float) -> Sequence[Reservation]:
        if now == self.swept:
            return []  # looked for at this time in this transaction (a verb in a run's team)
        self.swept = now
        found = self.db.execute(
            f"SELECT {_RESERVATION} FROM reservations "
            "WHERE ns = ? AND state = 'open' AND expires_at <= ? ORDER BY expires_at, rowid",
            (self.namespace, now),
        ).fetchall()
        return [self._reservation(values) for values in found]

    def flush(self) -> None:
        """Write back every row the engine changed (new rows were inserted whole)."""
        for team, cache in self.caches.items():
            read = self.reads[team]
            for name, row in cache.items():
                values = _numbers(row)
                if values == read.get(name, values):
                    continue
                if team:
                    self.db.execute(_UPDATE_TEAM_ROW, (*values, self.namespace, team, name))
                else:
                    self.db.execute(_UPDATE_ROW, (*values, self.namespace, name))
        for key, rec in self.team_recs.items():
            if rec is not None and self.team_read.get(key) != (rec.forget, rec.until):
                self.db.execute(
                    "UPDATE teams SET forget = ?, until = ? WHERE ns = ? AND key = ?",
                    (rec.forget, rec.until, self.namespace, key),
                )
        for key, limit in self.limit_cache.items():
            values = _limit_numbers(limit)
            if values != self.limit_read.get(key, values):
                self.db.execute(
                    f"UPDATE limits SET {', '.join(f'{f} = ?' for f in _LIMIT)} "
                    "WHERE ns = ? AND key = ?",
                    (*values, self.namespace, key),
                )


def _limit_numbers(row: LimitRow) -> tuple[Any, ...]:
    buckets = row.buckets
    text = None if buckets is None else json.dumps([[t, *buckets[t]] for t in sorted(buckets)])
    return (
        *(getattr(row, f) for f in _LIMIT[:-3]),
        int(row.warned),
        text,
        json.dumps(row.agents, sort_keys=True, separators=(",", ":")),
    )


def _numbers(row: AgentRow) -> tuple[Any, ...]:
    return (*(getattr(row, f) for f in _NUMBERS[:-2]), int(row.complete), int(row.warned))


class SQLiteStore(EngineStore):
    """Ledger state in a SQLite file shared by every process on the host.

    Args:
        path: The database file (created with its tables if missing), or
            ``":memory:"`` for one private database shared by the store's threads.
        namespace: Agents and reservations of other namespaces are invisible.
        timeout: Seconds to wait for another process's transaction.
    """

    blocking_io = True

    def __init__(self, path: str | Path, namespace: str = "default", timeout: float = 30.0) -> None:
        self.path = str(path)
        self.namespace = namespace
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ContractError(f"SQLite store timeout must be a positive number, got {timeout!r}")
        self.timeout = float(timeout)
        self._local = threading.local()
        self._shared: sqlite3.Connection | None = None  # the one connection of ":memory:"
        self._shared_lock = threading.RLock()
        self._last_purge = float("-inf")
        self._contracts: dict[str, BudgetContract] = {}
        self._prefix = uuid.uuid4().hex[:16] + "."
        self._ids = iter(range(1, 2**63))
        self._ids_lock = threading.Lock()
        self._file: tuple[int, int] | None = None
        self._epoch = ""
        with self._begin("BEGIN IMMEDIATE", check=False) as db:  # creates file, tables, epoch
            db.execute(  # agents written by an earlier version count in the total
                "INSERT OR IGNORE INTO namespaces SELECT ?, ?, COALESCE(SUM(allocated), 0) "
                "FROM agents WHERE ns = ?",
                (namespace, uuid.uuid4().hex, namespace),
            )
            self._epoch = db.execute(
                "SELECT epoch FROM namespaces WHERE ns = ?", (namespace,)
            ).fetchone()[0]
        self._file = self._identity()

    # ------------------------------------------------------------ plumbing
    def _identity(self) -> tuple[int, int] | None:
        if self.path == ":memory:":
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _connect(self) -> sqlite3.Connection:
        if self.path == ":memory:":
            if self._shared is None:
                self._shared = self._open(check_same_thread=False)
            return self._shared
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None and getattr(self._local, "pid", None) == os.getpid():
            return db
        db = self._open(check_same_thread=True)
        self._local.db = db
        self._local.pid = os.getpid()
        return db

    def _open(self, check_same_thread: bool) -> sqlite3.Connection:
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path,
                timeout=self.timeout,
                isolation_level=None,
                check_same_thread=check_same_thread,
            )
            db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            self._prepare(db)
            db.execute("PRAGMA synchronous=NORMAL")
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailableError(f"SQLite store {self.path!r} unavailable: {exc}") from exc
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        """Switch the file to WAL and create the tables, however many processes race to.

        Switching to WAL takes the file for itself and SQLite can answer "locked" at
        once rather than wait, so a process that opens the file while another is
        switching it retries (within the store's timeout). WAL is kept by the file:
        once it is on, nobody switches again.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if self.path != ":memory:" and (
                    str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal"
                ):
                    db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                for table, column, definition in _ADDED:
                    have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        try:
                            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                        except sqlite3.OperationalError as exc:
                            if "duplicate column" not in str(exc):  # another process added it
                                raise
                return
            except sqlite3.OperationalError as exc:  # noqa: PERF203 - a retry loop
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _lost(self, why: str) -> NamespaceLostError:
        return NamespaceLostError(
            f"SQLite store {self.path!r}: namespace '{self.namespace}' was lost ({why}); "
            "nothing was changed. Open a new manager on the store to start the namespace "
            "anew (its budgets start full again: see the README's recovery steps)"
        )

    @contextmanager
    def _begin(self, begin: str, check: bool = True) -> Iterator[sqlite3.Connection]:
        shared = self.path == ":memory:"
        if shared:
            self._shared_lock.acquire()
        try:
            db = self._connect()
            if check and self._file is not None and self._identity() != self._file:
                raise self._lost("its file was deleted or replaced")
            try:
                db.execute(begin)
            except sqlite3.Error as exc:
                raise StoreUnavailableError(
                    f"SQLite store {self.path!r} unavailable: {exc}"
                ) from exc
            try:
                if check:
                    found = db.execute(
                        "SELECT epoch FROM namespaces WHERE ns = ?", (self.namespace,)
                    ).fetchone()
                    if found is None or found[0] != self._epoch:
                        raise self._lost("its records are gone or were made anew")
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise StoreUnavailableError(
                    f"SQLite store {self.path!r}: commit failed: {exc}"
                ) from exc
        finally:
            if shared:
                self._shared_lock.release()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._begin("BEGIN IMMEDIATE") as db:
            tx = _Tx(self, db)
            yield tx
            tx.flush()

    @contextmanager
    def _read(self) -> Iterator[Transaction]:
        with self._begin("BEGIN") as db:
            yield _Tx(self, db)

    def contract(self, text: str) -> BudgetContract:
        """The contract a row stores as JSON (contracts never change, so they are cached)."""
        contract = self._contracts.get(text)
        if contract is None:
            contract = self._contracts[text] = BudgetContract.from_dict(json.loads(text))
        return contract

    def new_id(self) -> str:
        """A reservation id: this store object's random prefix and a counter."""
        with self._ids_lock:
            return self._prefix + str(next(self._ids))

    def purge(self, db: sqlite3.Connection, now: float) -> None:
        """At most once a second, delete reservations past their memory."""
        if now - self._last_purge >= 1.0:
            self._last_purge = now
            db.execute(
                "DELETE FROM reservations WHERE ns = ? AND state IN ('settled', 'expired') "
                "AND expires_at < ?",
                (self.namespace, now),
            )

    # ---------------------------------------------------------------- reads
    def limit_rows(self, prefix: str = "") -> list[LimitRow]:
        with self._read() as tx:
            assert isinstance(tx, _Tx)
            return tx.limit_rows(prefix)

    def open_reservations(self) -> list[Reservation]:
        with self._read() as tx:
            assert isinstance(tx, _Tx)
            found = tx.db.execute(
                f"SELECT {_RESERVATION} FROM reservations "
                "WHERE ns = ? AND state = 'open' ORDER BY rowid",
                (self.namespace,),
            ).fetchall()
            return [tx._reservation(values) for values in found]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        if self._shared is not None:
            self._shared.close()
            self._shared = None
