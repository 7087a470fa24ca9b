"""A durable SQLite store: one file, many processes on one host, every verb one transaction.

Each verb runs inside ``BEGIN IMMEDIATE`` (one writer at a time, across
processes), reads the rows it needs, does the same arithmetic as the memory
store, and writes them back. The file runs in WAL mode, so readers never block.
Donors are found through an index on (namespace, completed, priority,
remaining), in the design's order.

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
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._errors import (
    BudgetExceededError,
    ContractError,
    ReservationError,
    StoreUnavailableError,
    UnknownAgentError,
)
from tbc_integrations._records import AgentStatus, Reservation
from tbc_integrations._usage import Usage
from tbc_integrations.events import (
    AgentRegistered,
    Committed,
    Completed,
    Expired,
    Released,
    Reserved,
    Transferred,
)
from tbc_integrations.policies import Donor, Needy, ReallocationPolicy
from tbc_integrations.stores._base import (
    EXPIRED_MEMORY_SECONDS,
    SETTLED_MEMORY_SECONDS,
    EventSink,
    Store,
)
from tbc_integrations.stores._rules import (
    admission_refusal,
    agent_status,
    apply_plan,
    checked_plan,
    clamped_output,
    committed_event,
    gated,
    new_confidence,
    new_threshold,
    overdraft_events,
    plan_transfer,
    record_usage,
    refused_event,
    return_loans,
)

__all__ = ["SQLiteStore"]

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
    PRIMARY KEY (ns, name)
);
CREATE INDEX IF NOT EXISTS agents_donors
    ON agents (ns, complete DESC, priority, (allocated - consumed - reserved) DESC, name);
CREATE TABLE IF NOT EXISTS reservations (
    ns TEXT NOT NULL, id TEXT NOT NULL, agent TEXT NOT NULL,
    input INTEGER NOT NULL, output INTEGER NOT NULL, expires_at REAL NOT NULL,
    loans TEXT NOT NULL, state TEXT NOT NULL,
    PRIMARY KEY (ns, id)
);
CREATE INDEX IF NOT EXISTS reservations_open ON reservations (ns, state, expires_at);
"""

_FIELDS = (
    "name",
    "contract",
    "priority",
    "min_reserve",
    "max_input",
    "max_output",
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
    "complete",
)
_MUTABLE = _FIELDS[6:]  # threshold onwards


class _Row:
    """One agent's numbers, read in a transaction and written back when changed."""

    __slots__ = ("dirty", *_FIELDS)
    dirty: bool
    name: str
    contract: str
    priority: int
    min_reserve: int
    max_input: int | None
    max_output: int | None
    threshold: float | None
    allocated: int
    consumed: int
    consumed_in: int
    consumed_out: int
    reserved: int
    reserved_in: int
    reserved_out: int
    borrowed: int
    lent: int
    refusals: int
    last_confidence: float | None
    complete: int

    def __init__(self, values: tuple[Any, ...]) -> None:
        for name, value in zip(_FIELDS, values, strict=True):
            object.__setattr__(self, name, value)
        self.dirty = False

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name != "dirty":
            object.__setattr__(self, "dirty", True)

    @property
    def avail(self) -> int:
        return int(self.allocated - self.consumed - self.reserved)

    def gated(self) -> bool:
        return gated(self)


def path_from_url(url: str) -> str:
    """The file a ``sqlite:///`` URL names (SQLAlchemy's convention).

    Example:
        >>> path_from_url("sqlite:///rel/budgets.db"), path_from_url("sqlite:////abs/b.db")
        ('rel/budgets.db', '/abs/b.db')
    """
    if not url.lower().startswith("sqlite:///"):
        raise ContractError(f"a SQLite store URL looks like sqlite:///path.db, got {url!r}")
    path = url[len("sqlite:///") :]
    if not path:
        raise ContractError(f"SQLite store URL {url!r} names no file")
    return path


class _Tx:
    """Rows touched in one transaction."""

    def __init__(self, store: SQLiteStore, db: sqlite3.Connection) -> None:
        self.store = store
        self.db = db
        self.rows: dict[str, _Row] = {}
        self._dependents: dict[str, list[str]] | None = None

    def protected(self, row: _Row) -> bool:
        """An agent that has not run yet lends nothing while an active agent needs its output."""
        if row.consumed or row.reserved:
            return False
        if self._dependents is None:
            self._dependents = {}
            for name, contract in self.db.execute(
                "SELECT name, contract FROM agents WHERE ns = ?", (self.store.namespace,)
            ):
                for producer in json.loads(contract).get("depends_on") or ():
                    self._dependents.setdefault(producer, []).append(name)
        for name in self._dependents.get(row.name, ()):
            found = self.db.execute(
                "SELECT complete FROM agents WHERE ns = ? AND name = ?",
                (self.store.namespace, name),
            ).fetchone()
            dependent = self.rows.get(name)
            complete = dependent.complete if dependent is not None else (found and found[0])
            if found is not None and not complete:
                return True
        return False

    def row(self, name: str) -> _Row:
        row = self.rows.get(name)
        if row is None:
            found = self.db.execute(
                f"SELECT {', '.join(_FIELDS)} FROM agents WHERE ns = ? AND name = ?",
                (self.store.namespace, name),
            ).fetchone()
            if found is None:
                raise UnknownAgentError(name)
            row = self.rows[name] = _Row(found)
        return row

    def donors(self, needy: _Row) -> Iterator[Donor]:
        cursor = self.db.execute(
            "SELECT name FROM agents WHERE ns = ? AND name <> ? "
            "AND (complete = 1 OR priority <= ?) "
            "AND (allocated - consumed - reserved) - CASE WHEN complete = 1 THEN 0 "
            "ELSE min_reserve END > 0 "
            "ORDER BY complete DESC, CASE WHEN complete = 1 THEN 0 ELSE priority END, "
            "(allocated - consumed - reserved) DESC, name",
            (self.store.namespace, needy.name, needy.priority),
        )
        for (name,) in cursor:
            row = self.row(name)
            if not row.complete and self.protected(row):
                continue
            spare = row.avail if row.complete else row.avail - row.min_reserve
            if spare > 0:
                yield Donor(name, spare, row.priority, row.avail, bool(row.complete))

    def flush(self) -> None:
        for row in self.rows.values():
            if row.dirty:
                self.db.execute(
                    f"UPDATE agents SET {', '.join(f'{f} = ?' for f in _MUTABLE)} "
                    "WHERE ns = ? AND name = ?",
                    (*(getattr(row, f) for f in _MUTABLE), self.store.namespace, row.name),
                )
                row.dirty = False


class SQLiteStore(Store):
    """Ledger state in a SQLite file shared by every process on the host.

    Args:
        path: The database file (created with its tables if missing).
        namespace: Agents and reservations of other namespaces are invisible.
        timeout: Seconds to wait for another process's transaction.
    """

    def __init__(self, path: str | Path, namespace: str = "default", timeout: float = 30.0) -> None:
        self.path = str(path)
        self.namespace = namespace
        self.timeout = timeout
        self._local = threading.local()
        self._last_purge = float("-inf")
        self._connect()  # creates the file and its tables; fails loudly now if it cannot

    # ------------------------------------------------------------ plumbing
    def _connect(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None and getattr(self._local, "pid", None) == os.getpid():
            return db
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            self._prepare(db)
            db.execute("PRAGMA synchronous=NORMAL")
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailableError(f"SQLite store {self.path!r} unavailable: {exc}") from exc
        self._local.db = db
        self._local.pid = os.getpid()
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
                if str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:  # noqa: PERF203 - a retry loop
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _transaction(self) -> Generator[sqlite3.Connection, None, None]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"SQLite store {self.path!r} unavailable: {exc}") from exc
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreUnavailableError(
                f"SQLite store {self.path!r}: commit failed: {exc}"
            ) from exc

    @contextmanager
    def _tx(self, now: float | None, events: EventSink) -> Generator[_Tx, None, None]:
        """A transaction that reclaims lapsed leases first and writes rows back at the end."""
        with self._transaction() as db:
            tx = _Tx(self, db)
            if now is not None:
                self._sweep(tx, now, events)
            try:
                yield tx
            finally:
                tx.flush()

    # -------------------------------------------------------------- leases
    def _sweep(self, tx: _Tx, now: float, events: EventSink) -> int:
        lapsed = tx.db.execute(
            "SELECT id, agent, input, output, loans FROM reservations "
            "WHERE ns = ? AND state = 'open' AND expires_at <= ?",
            (self.namespace, now),
        ).fetchall()
        for rid, agent, inp, out, loans_json in lapsed:
            loans = tuple((d, int(t)) for d, t in json.loads(loans_json))
            self._unhold(tx, agent, inp, out, loans)
            tx.db.execute(  # expires_at now says when to forget it
                "UPDATE reservations SET state = 'expired', expires_at = ? WHERE ns = ? AND id = ?",
                (now + EXPIRED_MEMORY_SECONDS, self.namespace, rid),
            )
            if events is not None:
                events.append(
                    Expired(agent, now, self.namespace, inp + out, inp, out, rid, loans, "lease")
                )
        return len(lapsed)

    def _settle_row(self, tx: _Tx, rid: str, now: float) -> None:
        """Mark a reservation settled, remembered until SETTLED_MEMORY_SECONDS from now.

        At most once a second, rows past their memory are deleted in the same
        transaction, so the table holds recent reservations only.
        """
        tx.db.execute(
            "UPDATE reservations SET state = 'settled', expires_at = ? WHERE ns = ? AND id = ?",
            (now + SETTLED_MEMORY_SECONDS, self.namespace, rid),
        )
        if now - self._last_purge >= 1.0:
            self._last_purge = now
            tx.db.execute(
                "DELETE FROM reservations WHERE ns = ? AND state IN ('settled', 'expired') "
                "AND expires_at < ?",
                (self.namespace, now),
            )

    def _unhold(
        self, tx: _Tx, agent: str, inp: int, out: int, loans: tuple[tuple[str, int], ...]
    ) -> None:
        ag = tx.row(agent)
        ag.reserved -= inp + out
        ag.reserved_in -= inp
        ag.reserved_out -= out
        for donor_name, tokens in loans:
            donor = tx.row(donor_name)
            ag.allocated -= tokens
            ag.borrowed -= tokens
            donor.allocated += tokens
            donor.lent -= tokens

    # --------------------------------------------------------- reallocation
    def _borrow(
        self, tx: _Tx, needy: _Row, need: int, policy: ReallocationPolicy, partial: bool
    ) -> tuple[list[tuple[_Row, int]], int]:
        offered: dict[str, int] = {}

        def donors() -> Iterator[Donor]:
            for d in tx.donors(needy):
                offered[d.name] = d.spare
                yield d

        view = Needy(
            needy.name,
            needy.priority,
            needy.avail,
            needy.last_confidence,
            needy.threshold,
            BudgetContract.from_dict(json.loads(needy.contract)).max_tokens,
            needy.max_input,
            int(
                tx.db.execute(
                    "SELECT MAX(priority) FROM agents WHERE ns = ?", (self.namespace,)
                ).fetchone()[0]
            ),
        )
        raw = policy.plan(view, need, donors(), partial=partial)
        names, found = checked_plan(policy.name, needy.name, need, raw, offered)
        return [(tx.row(name), tokens) for name, tokens in names], found

    def _settle_overdraft(
        self,
        tx: _Tx,
        ag: _Row,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
        rid: str | None,
    ) -> int:
        short = -ag.avail
        if short <= 0:
            return 0
        plan, found = self._borrow(tx, ag, short, policy, partial=True)
        apply_plan(ag, plan)
        left = short - found
        overdraft_events(events, ag.name, now, self.namespace, rid, plan, left)
        return left

    # ----------------------------------------------------------------- verbs
    def register(self, contract: BudgetContract, now: float, events: EventSink) -> bool:
        data = json.dumps(contract.to_dict(), sort_keys=True)
        with self._transaction() as db:
            found = db.execute(
                "SELECT contract FROM agents WHERE ns = ? AND name = ?",
                (self.namespace, contract.agent_name),
            ).fetchone()
            if found is not None:
                if BudgetContract.from_dict(json.loads(found[0])) != contract:
                    raise ContractError(
                        f"Agent '{contract.agent_name}' already exists in namespace "
                        f"'{self.namespace}' with a different contract: {found[0]} != {data}"
                    )
                return False
            db.execute(
                "INSERT INTO agents (ns, name, contract, priority, min_reserve, max_input, "
                "max_output, threshold, allocated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.namespace,
                    contract.agent_name,
                    data,
                    contract.priority,
                    contract.reserve,
                    contract.max_input_tokens,
                    contract.max_output_tokens,
                    contract.confidence_threshold,
                    contract.max_tokens,
                ),
            )
        if events is not None:
            events.append(
                AgentRegistered(
                    contract.agent_name,
                    now,
                    self.namespace,
                    contract.max_tokens,
                    contract=contract.to_dict(),
                )
            )
        return True

    def contracts(self) -> dict[str, BudgetContract]:
        rows = self._connect().execute(
            "SELECT name, contract FROM agents WHERE ns = ? ORDER BY rowid", (self.namespace,)
        )
        return {name: BudgetContract.from_dict(json.loads(c)) for name, c in rows}

    def reserve(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        lease_seconds: float,
        policy: ReallocationPolicy,
        events: EventSink,
        clamp_output: bool = False,
    ) -> Reservation:
        res = self._reserve(
            agent,
            input_tokens,
            output_tokens,
            now,
            lease_seconds,
            policy,
            events,
            clamp_output,
            False,
        )
        assert res is not None
        return res

    def check(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
    ) -> None:
        self._reserve(agent, input_tokens, output_tokens, now, 0.0, policy, events, False, True)

    def _reserve(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        lease_seconds: float,
        policy: ReallocationPolicy,
        events: EventSink,
        clamp_output: bool,
        probe: bool,
    ) -> Reservation | None:
        refusal: BudgetExceededError | None = None
        with self._tx(now, events) as tx:
            ag = tx.row(agent)
            if clamp_output:
                output_tokens = clamped_output(ag, output_tokens)
            amount = input_tokens + output_tokens
            avail = ag.avail
            refusal = admission_refusal(ag, input_tokens, output_tokens)
            loans: tuple[tuple[str, int], ...] = ()
            if refusal is None and amount > avail:
                need = amount - avail
                plan, found = self._borrow(tx, ag, need, policy, partial=False)
                if found < need:
                    refusal = BudgetExceededError(agent, amount, max(avail, 0) + found)
                elif not probe:
                    apply_plan(ag, plan)
                    loans = tuple((d.name, t) for d, t in plan)
            if refusal is not None:
                ag.refusals += 1
                if events is not None:
                    why = refusal.reason
                    events.append(
                        refused_event(agent, now, self.namespace, input_tokens, output_tokens, why)
                    )
            elif probe:
                return None
            else:
                ag.reserved += amount
                ag.reserved_in += input_tokens
                ag.reserved_out += output_tokens
                rid = uuid.uuid4().hex
                expires = now + lease_seconds
                tx.db.execute(
                    "INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?, 'open')",
                    (
                        self.namespace,
                        rid,
                        agent,
                        input_tokens,
                        output_tokens,
                        expires,
                        json.dumps(loans),
                    ),
                )
                if events is not None:
                    if loans:
                        events.append(
                            plan_transfer(agent, now, self.namespace, rid, loans, "borrow")
                        )
                    events.append(
                        Reserved(
                            agent,
                            now,
                            self.namespace,
                            amount,
                            input_tokens,
                            output_tokens,
                            rid,
                            loans,
                        )
                    )
                return Reservation(
                    rid, agent, input_tokens, output_tokens, expires, loans, self.namespace
                )
        assert refusal is not None
        raise refusal

    def _lookup(self, tx: _Tx, reservation: Reservation) -> tuple[str, Any] | None:
        found = tx.db.execute(
            "SELECT state, loans FROM reservations WHERE ns = ? AND id = ?",
            (self.namespace, reservation.id),
        ).fetchone()
        return None if found is None else (found[0], found[1])

    def _settled_error(self, reservation: Reservation, known: bool) -> ReservationError:
        if known:
            return ReservationError(
                f"Reservation {reservation.id} of agent '{reservation.agent}' is already settled "
                "(committed or released); nothing was changed"
            )
        return ReservationError(
            f"Reservation {reservation.id} of agent '{reservation.agent}' was not issued by this "
            f"store (namespace '{self.namespace}'); nothing was changed"
        )

    def commit(
        self,
        reservation: Reservation,
        usage: Usage,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
        estimated: bool = False,
    ) -> int:
        with self._tx(now, events) as tx:
            found = self._lookup(tx, reservation)
            if found is None or found[0] == "settled":
                raise self._settled_error(reservation, found is not None)
            state, loans_json = found
            loans = tuple((d, int(t)) for d, t in json.loads(loans_json))
            rid = reservation.id
            self._settle_row(tx, rid, now)
            res = reservation._replace(loans=loans)
            ag = tx.row(reservation.agent)
            used = usage[0] + usage[1]
            record_usage(ag, usage)
            if state == "expired":  # the lease lapsed first: record usage in full
                if events is not None:
                    late = committed_event(res, usage, now, self.namespace, estimated, "late")
                    events.append(late)
                return self._settle_overdraft(tx, ag, now, policy, events, rid)
            amount = reservation.input_tokens + reservation.output_tokens
            ag.reserved -= amount
            ag.reserved_in -= reservation.input_tokens
            ag.reserved_out -= reservation.output_tokens
            if events is not None:
                events.append(committed_event(res, usage, now, self.namespace, estimated, ""))
            if used <= amount:
                return_loans(ag, loans, amount - used, tx.row, now, self.namespace, rid, events)
                return 0
            return self._settle_overdraft(tx, ag, now, policy, events, rid)

    def release(self, reservation: Reservation, now: float, events: EventSink) -> None:
        with self._tx(now, events) as tx:
            found = self._lookup(tx, reservation)
            if found is None or found[0] == "settled":
                raise self._settled_error(reservation, found is not None)
            state, loans_json = found
            self._settle_row(tx, reservation.id, now)
            if state == "expired":
                return  # the lease already gave everything back
            loans = tuple((d, int(t)) for d, t in json.loads(loans_json))
            self._unhold(
                tx, reservation.agent, reservation.input_tokens, reservation.output_tokens, loans
            )
            if events is not None:
                events.append(
                    Released(
                        reservation.agent,
                        now,
                        self.namespace,
                        reservation.amount,
                        reservation.input_tokens,
                        reservation.output_tokens,
                        reservation.id,
                        loans,
                    )
                )

    def charge(
        self,
        agent: str,
        usage: Usage,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
        estimated: bool = False,
    ) -> int:
        with self._tx(now, events) as tx:
            ag = tx.row(agent)
            record_usage(ag, usage)
            ui, uo = usage
            if events is not None:
                events.append(
                    Committed(
                        agent, now, self.namespace, ui + uo, ui, uo, None, (), "direct", estimated
                    )
                )
            return self._settle_overdraft(tx, ag, now, policy, events, None)

    def reallocate(
        self, agent: str, tokens: int, now: float, policy: ReallocationPolicy, events: EventSink
    ) -> int:
        with self._tx(now, events) as tx:
            ag = tx.row(agent)
            if tokens <= 0:
                return 0
            plan, found = self._borrow(tx, ag, tokens, policy, partial=True)
            apply_plan(ag, plan)
            if plan and events is not None:
                loans = tuple((d.name, t) for d, t in plan)
                events.append(plan_transfer(agent, now, self.namespace, None, loans, "reallocate"))
            return found

    def adjust(self, agent: str, delta: int, now: float, events: EventSink) -> None:
        with self._tx(now, events) as tx:
            ag = tx.row(agent)
            if delta < 0 and -delta > ag.avail:
                raise BudgetExceededError(agent, -delta, max(ag.avail, 0), "revocation")
            ag.allocated += delta
            if events is not None:
                events.append(
                    Transferred(agent, now, self.namespace, delta, 0, 0, None, (), "grant")
                )

    def complete(self, agent: str, now: float, events: EventSink) -> None:
        with self._tx(now, events) as tx:
            ag = tx.row(agent)
            if ag.complete:
                return
            ag.complete = 1
            if events is not None:
                events.append(Completed(agent, now, self.namespace, max(ag.avail, 0)))

    def record_confidence(
        self, agent: str, confidence: float, now: float, events: EventSink
    ) -> bool:
        with self._tx(None, events) as tx:
            return new_confidence(tx.row(agent), agent, confidence, now, self.namespace, events)

    def set_threshold(
        self, agent: str, threshold: float | None, now: float, events: EventSink
    ) -> None:
        with self._tx(None, events) as tx:
            new_threshold(tx.row(agent), agent, threshold, now, self.namespace, events)

    def expire(self, now: float, events: EventSink) -> int:
        db = self._connect()
        lapsed = db.execute(
            "SELECT 1 FROM reservations "
            "WHERE ns = ? AND state = 'open' AND expires_at <= ? LIMIT 1",
            (self.namespace, now),
        ).fetchone()
        if lapsed is None:
            return 0
        with self._transaction() as db:
            tx = _Tx(self, db)
            n = self._sweep(tx, now, events)
            tx.flush()
            return n

    def status(self, now: float) -> dict[str, AgentStatus]:
        rows = (
            self._connect()
            .execute(
                f"SELECT {', '.join(_FIELDS)} FROM agents WHERE ns = ? ORDER BY rowid",
                (self.namespace,),
            )
            .fetchall()
        )
        out = {}
        for values in rows:
            r = _Row(values)
            contract = BudgetContract.from_dict(json.loads(r.contract))
            out[r.name] = agent_status(
                r,
                max_tokens=contract.max_tokens,
                complete=bool(r.complete),
                depends_on=contract.depends_on,
            )
        return out

    def remaining(self, agent: str, now: float) -> int:
        found = (
            self._connect()
            .execute(
                "SELECT allocated - consumed - reserved FROM agents WHERE ns = ? AND name = ?",
                (self.namespace, agent),
            )
            .fetchone()
        )
        if found is None:
            raise UnknownAgentError(agent)
        return int(found[0])

    def open_reservations(self) -> list[Reservation]:
        rows = self._connect().execute(
            "SELECT id, agent, input, output, expires_at, loans FROM reservations "
            "WHERE ns = ? AND state = 'open'",
            (self.namespace,),
        )
        return [
            Reservation(
                rid,
                agent,
                inp,
                out,
                exp,
                tuple((d, int(t)) for d, t in json.loads(loans)),
                self.namespace,
            )
            for rid, agent, inp, out, exp, loans in rows
        ]

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
