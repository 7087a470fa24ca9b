"""A Redis store for many hosts: every verb, reallocation included, one server-side script.

The script (``ledger.lua``, shipped with the package) runs as a Redis function
(``FUNCTION LOAD`` once, then ``FCALL``; Redis 7+ and Valkey), so its helpers are
built once when it is loaded instead of on every call. The library's name carries
a hash of the script, so versions never clash, and it is loaded again whenever the
server has forgotten it (a restart without persistence, ``FUNCTION FLUSH``). On a
server without functions, or a user not allowed ``FUNCTION LOAD``, the same script
runs through ``EVALSHA`` (redis-py re-loads it after ``NOSCRIPT``); pass
``functions=False`` (or ``?functions=no`` in the URL) to choose that path.

Every key of a namespace (``tbc:{<namespace>}:...``: its agents, contracts, leases,
reservations, limit rows, counters and epoch) carries the hash tag ``{namespace}``,
and each call names one of them, so a namespace lives in one Redis Cluster slot:
every script runs on the one node that holds it, and namespaces spread over the
cluster's nodes. A ``redis+cluster://host:port`` URL (or ``cluster=True``, or a
``RedisCluster`` client) talks to a cluster: calls go straight to the node of the
namespace's slot (following ``MOVED``/``ASK`` when slots move), and the script is
loaded on every primary. Reallocation runs inside the script with the greedy, the
confidence-weighted or the expected-gain policy; custom Python policies cannot run
inside Redis and are refused.

Example:
    >>> RedisStore.__name__
    'RedisStore'
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import sys
import uuid
import weakref
from collections.abc import Awaitable, Coroutine, Sequence
from importlib import resources
from typing import Any

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._engine import (
    AgentRow,
    Events,
    LimitHold,
    LimitRow,
    TeamHold,
    agent_status,
)
from tbc_integrations._errors import (
    BudgetExceededError,
    ConfidenceGateError,
    ContractError,
    CostLimitError,
    InvalidTokenCountError,
    LimitExceededError,
    MissingDependencyError,
    NamespaceLostError,
    ReservationError,
    StoreUnavailableError,
    UnknownAgentError,
)
from tbc_integrations._records import AgentStatus, Reservation
from tbc_integrations._usage import Usage
from tbc_integrations.events import event_from_dict
from tbc_integrations.policies import (
    ConfidenceWeightedPolicy,
    ExpectedGainPolicy,
    GreedyPolicy,
    ReallocationPolicy,
)
from tbc_integrations.stores._base import Store

try:
    import redis
    import redis.asyncio as aioredis
    import redis.asyncio.cluster as aiocluster
    import redis.cluster
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "the Redis store needs redis-py: pip install 'tbc-integrations[redis]'"
    ) from exc

__all__ = ["RedisStore"]

if sys.version_info >= (3, 11):
    from asyncio import timeout as _deadline
else:  # pragma: no cover - redis-py requires async-timeout there
    from async_timeout import timeout as _deadline

_SCRIPT = resources.files("tbc_integrations.stores").joinpath("ledger.lua").read_text("utf-8")
_FUNCTION = "tbc_ledger_" + hashlib.sha1(_SCRIPT.encode("utf-8")).hexdigest()[:16]
_LIBRARY = f"#!lua name={_FUNCTION}\n" + _SCRIPT.replace("TBC_FUNCTION", _FUNCTION)
_SHA = hashlib.sha1(_SCRIPT.encode("utf-8")).hexdigest()  # the script's EVALSHA name


# each verb's comma-separated fields, in the order ledger.lua's CSV reads them
_POLICY = ("policy", "alpha", "first", "lift", "kappa")  # the reallocation policy's
_HOLD = ("input", "output", "lease", "clamp", *_POLICY, "cost", "forget")
_FIELDS: dict[str, tuple[str, ...]] = {
    "register": ("max_cost",),
    "reserve": _HOLD,
    "check": _HOLD,
    "commit": ("ui", "uo", "estimated", *_POLICY, "cost"),
    "release": (),
    "charge": ("ui", "uo", "estimated", *_POLICY, "cost", "forget"),
    "reallocate": ("tokens", *_POLICY, "forget"),
    "adjust": ("delta", "forget"),
    "complete": ("forget",),
    "confidence": ("value", "forget"),
    "threshold": ("value", "forget"),
    "expire": (),
    "status": (),
    "contracts": (),
    "open": (),
    "limit": (),
    "limits": (),
    "team": (),
}


def _args(verb: str, now: float, payload: dict[str, Any], epoch: str, events: bool) -> list[str]:
    """ARGV for the script: verb, agent, reservation id, contract JSON, the namespace's
    epoch, the comma-terminated fields, and the run key of the call's team (or ``""``).

    Few arguments keep redis-py's packing cheap; the agent's name and the id travel on
    their own, so any name is safe.
    """
    fields = [repr(now), "1" if events else "0"]
    for name in _FIELDS[verb]:
        value = payload.get(name)
        if value is None:
            fields.append("")
        elif value is True or value is False:
            fields.append("1" if value else "0")
        elif type(value) is float:
            fields.append(repr(value))
        else:
            fields.append(str(value))
    fields.append("")  # every field ends with a comma
    return [
        verb,
        payload.get("agent", ""),
        payload.get("id", ""),
        payload.get("contract") or payload.get("holds") or "",
        epoch,
        ",".join(fields),
        payload.get("team", ""),
    ]


def _with_team(payload: dict[str, Any], team: TeamHold | None) -> dict[str, Any]:
    """The payload with the call's run team (its key, and its forget seconds)."""
    if team is not None:
        payload["team"], payload["forget"] = team
    return payload


_INTS = ("tokens", "input_tokens", "output_tokens", "cost_nanos")
_FLOATS = ("time", "confidence", "threshold")


def _event(data: dict[str, Any], namespace: str, contract: BudgetContract | None) -> Any:
    """A typed event from the script's (numbers travel as strings, every digit kept)."""
    for key in _INTS:
        data[key] = int(data[key])
    for key in _FLOATS:
        if key in data:
            data[key] = float(data[key])
    data["namespace"] = namespace
    if data["kind"] == "register" and contract is not None:
        data["contract"] = contract.to_dict()
    return event_from_dict(data)


def _missing_function(exc: Exception) -> bool:
    return "function not found" in str(exc).lower()


def _no_functions(exc: Exception) -> bool:
    # an older server (no FUNCTION command) or a user not allowed to load functions
    text = str(exc).lower()
    return "unknown command" in text or "noperm" in text or "no permissions" in text


def _not_loaded(reply: Any) -> bool:
    """Whether a reply says the server lacks the script (restarted, flushed, or no functions)."""
    return isinstance(reply, redis.ResponseError) and (
        isinstance(reply, redis.exceptions.NoScriptError)
        or _missing_function(reply)
        or _no_functions(reply)
    )


_PIPELINE = 256
"""Most verbs one async round trip carries."""


def _bulk(value: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def _packed_call(head: bytes, args: list[Any]) -> bytes:
    """One ``command name 1 key *args`` in RESP (``head`` packs its first four words)."""
    return b"*%d\r\n%b%b" % (
        len(args) + 4,
        head,
        b"".join([_bulk(str(arg).encode("utf-8")) for arg in args]),
    )


def _call_head(command: str, name: str, key: str) -> bytes:
    return b"".join(_bulk(word.encode("utf-8")) for word in (command, name, "1", key))


async def _connection(pool: Any, seconds: float) -> Any:
    """A connection of ``pool``, ready (connected, greeted), within ``seconds``."""
    async with _deadline(seconds):
        try:
            return await pool.get_connection()
        except TypeError:  # redis-py before 5.3 wants the command's name
            return await pool.get_connection("FCALL")


async def _replies(conn: Any, packed: bytes, count: int) -> list[Any]:
    """The replies to ``count`` commands written on ``conn`` as ``packed``, in order.

    A connection found dropped before any reply (a stale pooled one) gets the commands
    once more, as redis-py does for one command; dropped after some replies, those are
    kept and the rest get the error.
    """
    replies: list[Any] = []
    for attempt in (1, 2):
        try:
            if attempt == 2:
                await conn.send_packed_command(packed, check_health=False)
            while len(replies) < count:
                replies.append(await _reply(conn))
            break
        except redis.ConnectionError as exc:
            if replies:
                return replies + [exc] * (count - len(replies))
            if attempt == 2:
                raise
    return replies


async def _reply(conn: Any) -> Any:
    try:
        # the caller's deadline covers the whole batch: no timer per reply
        return await conn.read_response(timeout=math.inf)
    except redis.ResponseError as exc:
        return exc


def _fail(batch: list[tuple[list[Any], asyncio.Future[Any]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)


class _AsyncLink:
    """One event loop's async client, and the verbs waiting for this turn of the loop to end.

    Verbs made in one turn of the loop (N concurrent calls reserving at once) leave
    together, in batches of up to ``_PIPELINE`` commands sent in one write: each is
    still its own atomic script call, but they share round trips and per-call costs.
    """

    __slots__ = ("client", "gate", "queue", "sending")

    def __init__(self, client: Any, connections: int = 0) -> None:
        self.client = client
        self.queue: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self.sending: set[asyncio.Task[None]] = set()
        # a cluster client's calls in flight (redis-py's raises past its pool's size)
        self.gate = asyncio.Semaphore(connections) if connections else None

    def spawn(self, loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(work)
        self.sending.add(task)  # a strong reference until it is done
        task.add_done_callback(self.sending.discard)


def _close_async(loop: asyncio.AbstractEventLoop, client: Any, keep: set[Any]) -> None:
    """Close an async client from sync code, on its own loop, as far as that loop allows."""
    if loop.is_closed():
        # Nothing can run on a closed loop: its sockets close when the client is
        # collected. (Closing them by descriptor number could close a reused descriptor.)
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:  # called from code running on that loop: finish in a task
        task = loop.create_task(client.aclose())
        keep.add(task)
        task.add_done_callback(keep.discard)
    elif loop.is_running():  # another thread's loop: hand it over, without waiting on it
        asyncio.run_coroutine_threadsafe(client.aclose(), loop)
    else:
        loop.run_until_complete(client.aclose())


def _policy_args(policy: ReallocationPolicy | None) -> dict[str, Any]:
    if policy is None or isinstance(policy, GreedyPolicy):
        return {"policy": "greedy"}
    if isinstance(policy, ConfidenceWeightedPolicy):
        return {"policy": "weighted", "alpha": policy.alpha}
    if isinstance(policy, ExpectedGainPolicy):
        return {
            "policy": "expected_gain",
            "first": policy.first,
            "lift": policy.lift,
            "kappa": policy.kappa,
        }
    raise ContractError(
        f"the Redis store runs reallocation inside Redis, with the 'greedy', 'weighted' or "
        f"'expected_gain' "
        f"policy; {getattr(policy, 'name', policy)!r} cannot run there"
    )


_ROW_INTS = (
    "priority",
    "min_reserve",
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
    "cost",
    "cost_reserved",
)


def _row(data: dict[str, Any]) -> AgentRow:
    row = AgentRow()
    row.name = data["name"]
    for key in _ROW_INTS:
        setattr(row, key, int(data[key]))
    for key in ("max_tokens", "max_cost", "max_input", "max_output"):
        setattr(row, key, int(data[key]) if key in data else None)
    for key in ("threshold", "last_confidence", "warn_at"):
        setattr(row, key, float(data[key]) if key in data else None)
    row.complete = data["complete"] == "1"
    row.warned = data.get("warned") == "1"
    return row


def _limit_row(found: dict[str, Any]) -> LimitRow:
    """A limit row from the script's reply (numbers travel as strings)."""

    def cap(field: str) -> int | None:
        return None if found.get(field) is None else int(found[field])

    row = LimitRow(
        (
            found["key"],
            cap("max_tokens"),
            cap("max_cost"),
            cap("warn_tokens"),
            cap("warn_cost"),
            float(found["ends"]),
        )
    )
    for field in ("consumed", "reserved", "cost", "cost_reserved"):
        setattr(row, field, int(found[field]))
    row.warned = bool(found["warned"])
    if found.get("rolling"):  # [[leaves, tokens, cost]] ({} when empty, as cjson says)
        row.buckets = {int(t): [int(n), int(c)] for t, n, c in found.get("buckets") or ()}
    row.agents = {
        str(name): [int(tokens), int(cost), int(calls)]
        for name, tokens, cost, calls in sorted(found.get("agents") or ())
    }
    return row


class RedisStore(Store):
    """Ledger state in Redis, shared by every process on every host.

    Args:
        url: A ``redis://`` URL (or pass ``client=``).
        namespace: Agents and reservations of other namespaces are invisible.
        client: An existing ``redis.Redis`` client.
        socket_timeout: Seconds before a call to the server counts as unreachable
            (sync and async clients alike).
        max_connections: Most connections the async client of one event loop opens;
            more concurrent round trips wait for one (up to ``socket_timeout``).
        functions: Run the script as a Redis function (``FCALL``) where the server
            allows it; ``False`` runs it through ``EVALSHA`` on every server.
        cluster: Talk to a Redis Cluster (given one node's address; the client finds
            the others). A ``redis+cluster://`` or ``rediss+cluster://`` URL, or a
            ``RedisCluster`` client, says so too.
    """

    blocking_io = True

    def __init__(
        self,
        url: str | None = None,
        namespace: str = "default",
        *,
        client: Any = None,
        socket_timeout: float = 5.0,
        max_connections: int = 32,
        functions: bool = True,
        cluster: bool = False,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.functions = functions
        self._key = f"tbc:{{{namespace}}}:"  # names the namespace's slot for cluster routing
        self._client_url = url
        if url is not None and "+cluster://" in url.split("?", 1)[0].lower():
            scheme, rest = url.split("://", 1)
            self._client_url = f"{scheme[: -len('+cluster')]}://{rest}"
            cluster = True
        self.cluster = cluster or isinstance(client, redis.cluster.RedisCluster)
        # reservation ids: a random prefix per store object and a counter (unique across
        # processes and hosts, cheaper than a uuid per call)
        self._id_prefix = uuid.uuid4().hex[:16] + "."
        self._ids = itertools.count(1)
        if client is not None:
            self.client = client
        elif self._client_url is not None:
            factory = redis.cluster.RedisCluster if self.cluster else redis.Redis
            self.client = factory.from_url(
                self._client_url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
            )
        else:
            raise ContractError("RedisStore needs a redis:// URL or a client")
        self.socket_timeout = socket_timeout
        self.max_connections = max_connections
        self._script = self.client.register_script(_SCRIPT)
        self._epoch: str | None = None  # read (or made) on the first call
        # one async client per event loop: a redis.asyncio client belongs to the loop it
        # first ran on, and scripts often run several loops (asyncio.run twice)
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncLink] = (
            weakref.WeakKeyDictionary()
        )
        self._closing: set[Any] = set()
        self._fcall_head = _call_head("FCALL", _FUNCTION, self._key)
        self._evalsha_head = _call_head("EVALSHA", _SHA, self._key)

    # ------------------------------------------------------------- plumbing
    def _fcall(self, args: list[Any]) -> Any:
        if self.cluster:  # straight to the slot's node (redis-py would ask a node for the key)
            node = self.client.get_node_from_key(self._key)
            return self.client.execute_command(
                "FCALL", _FUNCTION, 1, self._key, *args, target_nodes=node
            )
        return self.client.fcall(_FUNCTION, 1, self._key, *args)

    def _invoke(self, args: list[Any]) -> Any:
        if self.functions:
            try:
                return self._fcall(args)
            except redis.ResponseError as exc:
                if _missing_function(exc):
                    try:  # on a cluster, redis-py loads it on every primary
                        self.client.function_load(_LIBRARY, replace=True)
                        return self._fcall(args)
                    except redis.ResponseError as load_exc:
                        if not _no_functions(load_exc):
                            raise
                        self.functions = False
                elif _no_functions(exc):
                    self.functions = False
                else:
                    raise
        return self._script(keys=[self._key], args=args)

    def _alink(self, loop: asyncio.AbstractEventLoop, url: str) -> _AsyncLink:
        """The loop's async client (made on first use there)."""
        link = self._aclients.get(loop)
        if link is None:
            # A blocking pool: past max_connections a round trip waits for a connection
            # instead of failing (redis-py's default pool raises "Too many connections").
            # socket_timeout bounds each write and each batch of replies (_deadline)
            # rather than each socket operation: redis-py's own costs a timer per reply
            # and, before Python 3.12, a task per write (every write a turn late).
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=self.max_connections,
                timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                socket_timeout=None,
            )
            link = self._aclients[loop] = _AsyncLink(aioredis.Redis.from_pool(pool))
        return link

    def _ainvoke(self, args: list[Any]) -> Awaitable[Any]:
        """The script's reply to ``args``; the verbs of one turn of the loop share round trips.

        Mostly a future, so a verb waiting for Redis holds no coroutine of its own.
        """
        url = self._client_url
        if url is None:  # a client of the caller's: its calls, in a thread
            return asyncio.to_thread(self._invoke, args)
        if self.cluster:  # redis-py's async cluster client, one call per verb
            return self._acluster_invoke(args)
        loop = asyncio.get_running_loop()
        link = self._alink(loop, url)
        future: asyncio.Future[Any] = loop.create_future()
        queue = link.queue
        if not queue:
            loop.call_soon(self._flush, link, loop)
        queue.append((args, future))
        if len(queue) < _PIPELINE:
            return future
        # A full batch leaves now, written by this call: Redis works on it while the loop
        # prepares the next one (its replies are read by a task of their own).
        link.queue = []
        return self._write_then_wait(link, loop, queue, future)

    async def _write_then_wait(
        self,
        link: _AsyncLink,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[list[Any], asyncio.Future[Any]]],
        future: asyncio.Future[Any],
    ) -> Any:
        await self._write(link, loop, batch, future)
        return await future

    def _flush(self, link: _AsyncLink, loop: asyncio.AbstractEventLoop) -> None:
        """The end of a turn of the loop: what is queued leaves, written by a task."""
        queue, link.queue = link.queue, []
        if queue:
            link.spawn(loop, self._write(link, loop, queue))

    async def _write(
        self,
        link: _AsyncLink,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[list[Any], asyncio.Future[Any]]],
        caller: asyncio.Future[Any] | None = None,
    ) -> None:
        """Write ``batch`` on a connection of its own; a task reads the replies.

        ``caller`` is the future of the call writing it (a full batch leaves from the
        call that filled it): cancelled with that call, the others' verbs still go.
        """
        pool = link.client.connection_pool
        packed = self._packed([args for args, _ in batch])
        try:
            conn = await _connection(pool, self.socket_timeout)
        except asyncio.CancelledError:
            if caller is None:  # the writing task itself: the loop is going away
                _fail(batch, asyncio.CancelledError())
            else:  # the call that filled the batch: nothing written, a task sends the rest
                caller.cancel()
                rest = [item for item in batch if not item[1].done()]
                link.spawn(loop, self._write(link, loop, rest))
            raise
        except Exception as exc:
            _fail(batch, self._redis_error(exc, "no connection"))
            return
        try:
            async with _deadline(self.socket_timeout):
                await conn.send_packed_command(packed, check_health=False)
        except BaseException as exc:
            await pool.release(conn)  # redis-py disconnected it
            if isinstance(exc, Exception):
                _fail(batch, self._redis_error(exc, "could not send"))
                return
            # interrupted mid-write: whether Redis got the commands is unknown
            _fail(batch, redis.ConnectionError("interrupted while sending to Redis"))
            raise
        link.spawn(loop, self._read(link, conn, packed, batch))

    async def _read(
        self,
        link: _AsyncLink,
        conn: Any,
        packed: bytes,
        batch: list[tuple[list[Any], asyncio.Future[Any]]],
    ) -> None:
        """Read ``batch``'s replies; each waiting verb gets its reply or its error."""
        try:
            try:
                async with _deadline(self.socket_timeout):
                    replies = await _replies(conn, packed, len(batch))
            finally:
                await link.client.connection_pool.release(conn)
            missing = [i for i, reply in enumerate(replies) if _not_loaded(reply)]
            if missing:  # the server forgot the script: load it, send those again
                try:
                    await self._aload(link.client)
                    again = await self._around_trip(link.client, [batch[i][0] for i in missing])
                except Exception as exc:
                    again = [self._redis_error(exc, "no reply")] * len(missing)
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except BaseException as exc:
            if not isinstance(exc, Exception):
                _fail(batch, exc)
                raise
            _fail(batch, self._redis_error(exc, "no reply"))
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if not future.done():  # a caller cancelled meanwhile gets nothing
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _acluster_invoke(self, args: list[Any]) -> Any:
        """The script's reply to ``args`` from the node of the namespace's slot, through the
        loop's ``redis.asyncio.RedisCluster`` (which follows ``MOVED`` and ``ASK``)."""
        loop = asyncio.get_running_loop()
        link = self._aclients.get(loop)
        if link is None:
            assert self._client_url is not None
            client = aiocluster.RedisCluster.from_url(
                self._client_url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                max_connections=self.max_connections,
            )
            link = self._aclients[loop] = _AsyncLink(client, self.max_connections)
        assert link.gate is not None
        try:  # past max_connections calls in flight, a call waits (up to socket_timeout)
            async with _deadline(self.socket_timeout):
                await link.gate.acquire()
        except asyncio.TimeoutError:
            raise redis.TimeoutError(f"no connection within {self.socket_timeout} s") from None
        try:
            return await self._acluster_call(link.client, args)
        finally:
            link.gate.release()

    async def _acluster_call(self, client: Any, args: list[Any]) -> Any:
        await client.initialize()  # learns the slots once (nothing to do after)
        if self.functions:
            try:
                return await self._acluster_fcall(client, args)
            except redis.ResponseError as exc:
                if not (_missing_function(exc) or _no_functions(exc)):
                    raise
                if _missing_function(exc):
                    try:
                        await client.function_load(_LIBRARY, replace=True)
                        return await self._acluster_fcall(client, args)
                    except redis.ResponseError as load_exc:
                        if not _no_functions(load_exc):
                            raise
                self.functions = False
        node = client.get_node_from_key(self._key)
        try:
            return await client.execute_command(
                "EVALSHA", _SHA, 1, self._key, *args, target_nodes=node
            )
        except redis.exceptions.NoScriptError:
            await client.script_load(_SCRIPT)  # on every primary
            return await client.execute_command(
                "EVALSHA", _SHA, 1, self._key, *args, target_nodes=node
            )

    async def _acluster_fcall(self, client: Any, args: list[Any]) -> Any:
        node = client.get_node_from_key(self._key)
        return await client.execute_command(
            "FCALL", _FUNCTION, 1, self._key, *args, target_nodes=node
        )

    def _redis_error(self, exc: Exception, what: str) -> Exception:
        """``exc``, a deadline that passed told as redis-py tells a socket timeout."""
        if isinstance(exc, asyncio.TimeoutError):
            return redis.TimeoutError(f"{what} within {self.socket_timeout} s")
        return exc

    def _packed(self, calls: list[list[Any]]) -> bytes:
        head = self._fcall_head if self.functions else self._evalsha_head
        return b"".join([_packed_call(head, args) for args in calls])

    async def _around_trip(self, client: Any, calls: list[list[Any]]) -> list[Any]:
        """Write ``calls`` and read their replies, in this task."""
        pool = client.connection_pool
        packed = self._packed(calls)
        conn = await _connection(pool, self.socket_timeout)
        try:
            async with _deadline(self.socket_timeout):
                await conn.send_packed_command(packed, check_health=False)
                return await _replies(conn, packed, len(calls))
        finally:
            await pool.release(conn)

    async def _aload(self, client: Any) -> None:
        async with _deadline(self.socket_timeout):
            if self.functions:
                try:
                    await client.function_load(_LIBRARY, replace=True)
                    return
                except redis.ResponseError as exc:
                    if not _no_functions(exc):
                        raise
                    self.functions = False
            await client.script_load(_SCRIPT)

    def _epoch_key(self) -> str:
        return self._key + "epoch"

    def _known_epoch(self) -> str:
        """The namespace's epoch: made on the first call that finds none, then kept."""
        if self._epoch is None:
            self.client.set(self._epoch_key(), uuid.uuid4().hex, nx=True)
            self._epoch = _text(self.client.get(self._epoch_key()))
        return self._epoch

    async def _aknown_epoch(self) -> str:
        if self._epoch is None:  # once per store: the first async call asks in a thread
            return await asyncio.to_thread(self._known_epoch)
        return self._epoch

    def _unavailable(self, exc: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(f"Redis store {self.url!r} unavailable: {exc}")

    def _call(
        self,
        verb: str,
        now: float,
        payload: dict[str, Any],
        events: Events = None,
        contract: BudgetContract | None = None,
    ) -> Any:
        try:
            args = _args(verb, now, payload, self._known_epoch(), events is not None)
            raw = self._invoke(args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return self._finish(json.loads(raw), events, contract)

    async def _acall(
        self, verb: str, now: float, payload: dict[str, Any], events: Events = None
    ) -> Any:
        try:
            args = _args(verb, now, payload, await self._aknown_epoch(), events is not None)
            raw = await self._ainvoke(args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return self._finish(json.loads(raw), events, None)

    def _finish(
        self, reply: dict[str, Any], events: Events, contract: BudgetContract | None
    ) -> Any:
        """Deliver the reply's events, then raise its error or return its result."""
        if events is not None:
            for data in reply.get("v") or ():
                events.append(_event(data, self.namespace, contract))
        err = reply.get("e")
        if err:
            raise self._error(err)
        return reply.get("r")

    def _error(self, err: dict[str, Any]) -> Exception:
        kind = err.get("type")
        if kind == "lost":
            return NamespaceLostError(
                f"Redis store {self.url!r}: namespace '{self.namespace}' was lost (the server "
                "restarted without persistence, or its keys were deleted); nothing was "
                "changed. Open a new manager on the store to start the namespace anew (its "
                "budgets start full again: see the README's recovery steps)"
            )
        if kind == "unknown":
            return UnknownAgentError(str(err["agent"]))
        if kind == "gate":
            return ConfidenceGateError(
                err["agent"],
                int(err["requested"]),
                int(err["available"]),
                float(err["confidence"]),
                float(err["threshold"]),
            )
        if kind == "budget":
            return BudgetExceededError(
                err["agent"], int(err["requested"]), int(err["available"]), err["reason"]
            )
        if kind == "limit":
            return LimitExceededError(
                err["agent"],
                str(err["key"]),
                int(err["requested"]),
                int(err["available"]),
                bool(err["money"]),
            )
        if kind == "cost":
            return CostLimitError(err["agent"], int(err["requested"]), int(err["available"]))
        if kind == "tokens":
            return InvalidTokenCountError(
                f"Agent '{err['agent']}': {err['what']} would reach {err['value']} tokens, "
                f"above the 9007199254740991 every store holds exactly; nothing was changed"
            )
        if kind == "contract":
            return ContractError(str(err["message"]))
        if kind == "settled" and err.get("known"):
            return ReservationError(
                f"Reservation {err['id']!r} is already settled (committed or released); "
                "nothing was changed"
            )
        if kind == "settled":
            return ReservationError(
                f"Reservation {err['id']!r} was not issued by this store (namespace "
                f"'{self.namespace}'); nothing was changed"
            )
        return StoreUnavailableError(f"Redis store {self.url!r}: unexpected reply {err!r}")

    # ----------------------------------------------------------------- verbs
    def check_policy(self, policy: ReallocationPolicy) -> None:
        """Refuse a policy the script cannot run (only the built-in ones run inside Redis)."""
        _policy_args(policy)

    def register(self, contract: BudgetContract, now: float, events: Events) -> bool:
        text = json.dumps(contract.to_dict(), sort_keys=True)
        payload = {"contract": text, "max_cost": contract.max_cost_nanos}
        result = self._call("register", now, payload, events, contract)
        if not result["created"]:
            existing = BudgetContract.from_dict(json.loads(result["contract"]))
            if existing != contract:
                raise ContractError(
                    f"Agent '{contract.agent_name}' already exists in namespace "
                    f"'{self.namespace}' with a different contract: {result['contract']} != "
                    f"{text}"
                )
            return False
        return True

    def contracts(self) -> dict[str, BudgetContract]:
        rows = self._call("contracts", 0.0, {}) or []
        return {r["name"]: BudgetContract.from_dict(json.loads(r["contract"])) for r in rows}

    def _reserve_payload(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        lease_seconds: float,
        policy: ReallocationPolicy,
        clamp_output: bool,
        cost: int,
        holds: Sequence[LimitHold] = (),
    ) -> dict[str, Any]:
        return {
            "holds": json.dumps([list(h) for h in holds]) if holds else "",
            "agent": agent,
            "input": input_tokens,
            "output": output_tokens,
            "lease": lease_seconds,
            "clamp": clamp_output,
            "cost": cost,
            "id": f"{self._id_prefix}{next(self._ids)}",
            **_policy_args(policy),
        }

    def _reservation(
        self, agent: str, result: dict[str, Any], model: str | None, provider: str | None
    ) -> Reservation:
        loans = tuple((str(d), int(t)) for d, t in (result.get("loans") or ()))
        return Reservation(
            result["id"],
            agent,
            int(result["input"]),
            int(result["output"]),
            float(result["expires"]),
            loans,
            self.namespace,
            int(result["cost"]),
            model,
            provider,
            tuple(str(k) for k in (result.get("limits") or ())),
            str(result.get("team") or ""),
        )

    def reserve(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        lease_seconds: float,
        policy: ReallocationPolicy,
        events: Events,
        clamp_output: bool = False,
        cost: int = 0,
        holds: Sequence[LimitHold] = (),
        team: TeamHold | None = None,
        model: str | None = None,
        provider: str | None = None,
    ) -> Reservation:
        payload = self._reserve_payload(
            agent, input_tokens, output_tokens, lease_seconds, policy, clamp_output, cost, holds
        )
        if team is not None:
            _with_team(payload, team)
        return self._reservation(
            agent, self._call("reserve", now, payload, events), model, provider
        )

    async def areserve(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        lease_seconds: float,
        policy: ReallocationPolicy,
        events: Events,
        clamp_output: bool = False,
        cost: int = 0,
        holds: Sequence[LimitHold] = (),
        team: TeamHold | None = None,
        model: str | None = None,
        provider: str | None = None,
    ) -> Reservation:
        payload = self._reserve_payload(
            agent, input_tokens, output_tokens, lease_seconds, policy, clamp_output, cost, holds
        )
        if team is not None:
            _with_team(payload, team)
        result = await self._acall("reserve", now, payload, events)
        return self._reservation(agent, result, model, provider)

    def check(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        cost: int = 0,
        holds: Sequence[LimitHold] = (),
        team: TeamHold | None = None,
    ) -> None:
        payload = self._reserve_payload(
            agent, input_tokens, output_tokens, 0.0, policy, False, cost, holds
        )
        self._call("check", now, _with_team(payload, team), events)

    @staticmethod
    def _commit_payload(
        rid: str, usage: Usage | None, policy: ReallocationPolicy, estimated: bool, cost: int | None
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "ui": None if usage is None else usage[0],
            "uo": None if usage is None else usage[1],
            "estimated": estimated,
            "cost": cost,
            **_policy_args(policy),
        }

    def commit(
        self,
        rid: str,
        usage: Usage | None,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        estimated: bool = False,
        cost: int | None = None,
    ) -> int:
        payload = self._commit_payload(rid, usage, policy, estimated, cost)
        return int(self._call("commit", now, payload, events) or 0)

    async def acommit(
        self,
        rid: str,
        usage: Usage | None,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        estimated: bool = False,
        cost: int | None = None,
    ) -> int:
        payload = self._commit_payload(rid, usage, policy, estimated, cost)
        return int(await self._acall("commit", now, payload, events) or 0)

    def release(self, rid: str, now: float, events: Events) -> None:
        self._call("release", now, {"id": rid}, events)

    async def arelease(self, rid: str, now: float, events: Events) -> None:
        await self._acall("release", now, {"id": rid}, events)

    def charge(
        self,
        agent: str,
        usage: Usage,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        estimated: bool = False,
        cost: int = 0,
        holds: Sequence[LimitHold] = (),
        team: TeamHold | None = None,
    ) -> int:
        payload = {
            "agent": agent,
            "ui": usage[0],
            "uo": usage[1],
            "estimated": estimated,
            "cost": cost,
            "holds": json.dumps([list(h) for h in holds]) if holds else "",
            **_policy_args(policy),
        }
        return int(self._call("charge", now, _with_team(payload, team), events) or 0)

    def reallocate(
        self,
        agent: str,
        tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        team: TeamHold | None = None,
    ) -> int:
        payload = {"agent": agent, "tokens": tokens, **_policy_args(policy)}
        return int(self._call("reallocate", now, _with_team(payload, team), events) or 0)

    def adjust(
        self, agent: str, delta: int, now: float, events: Events, team: TeamHold | None = None
    ) -> None:
        self._call("adjust", now, _with_team({"agent": agent, "delta": delta}, team), events)

    def complete(
        self, agent: str, now: float, events: Events, team: TeamHold | None = None
    ) -> None:
        self._call("complete", now, _with_team({"agent": agent}, team), events)

    def record_confidence(
        self,
        agent: str,
        confidence: float,
        now: float,
        events: Events,
        team: TeamHold | None = None,
    ) -> bool:
        payload = {"agent": agent, "value": confidence}
        return bool(self._call("confidence", now, _with_team(payload, team), events))

    def set_threshold(
        self,
        agent: str,
        threshold: float | None,
        now: float,
        events: Events,
        team: TeamHold | None = None,
    ) -> None:
        payload: dict[str, Any] = {"agent": agent}
        if threshold is not None:
            payload["value"] = threshold
        self._call("threshold", now, _with_team(payload, team), events)

    def expire(self, now: float, events: Events) -> int:
        return int(self._call("expire", now, {}, events) or 0)

    def status(self, now: float) -> dict[str, AgentStatus]:
        out = {}
        for r in self._call("status", now, {}) or []:
            contract = BudgetContract.from_dict(json.loads(r["contract"]))
            out[r["name"]] = agent_status(_row(r), contract.depends_on)
        return out

    def team_status(self, key: str, now: float) -> dict[str, AgentStatus]:
        out = {}
        for r in self._call("team", now, {"team": key}) or []:
            contract = BudgetContract.from_dict(json.loads(r["contract"]))
            out[r["name"]] = agent_status(_row(r), contract.depends_on)
        return out

    def limit(self, key: str) -> LimitRow | None:
        found = self._call("limit", 0.0, {"id": key})
        return _limit_row(found) if found else None

    def limit_rows(self, prefix: str = "") -> list[LimitRow]:
        rows = [_limit_row(found) for found in self._call("limits", 0.0, {"id": prefix}) or ()]
        return sorted(rows, key=lambda row: row.key)

    def remaining(self, agent: str, now: float) -> int:
        status = self.status(now).get(agent)
        if status is None:
            raise UnknownAgentError(agent)
        return status.remaining

    def open_reservations(self) -> list[Reservation]:
        rows = self._call("open", 0.0, {}) or []
        rows.sort(key=lambda r: (float(r["expires"]), int(r["seq"])))
        return [
            Reservation(
                r["id"],
                r["agent"],
                int(r["input"]),
                int(r["output"]),
                float(r["expires"]),
                tuple((str(d), int(t)) for d, t in (r.get("loans") or ())),
                self.namespace,
                int(r["cost"]),
                None,
                None,
                tuple(str(k) for k in (r.get("limits") or ())),
                str(r.get("team") or ""),
            )
            for r in rows
        ]

    def close(self) -> None:
        """Close the sync client and every event loop's async client.

        An async client belongs to its loop: it is closed there when that loop can
        still run it (in a task when called from the loop itself). A loop already
        closed (``asyncio.run`` has returned) can run nothing; its client's sockets
        close when the client is collected. Async code should ``await aclose()``.
        """
        self.client.close()
        links = list(self._aclients.items())
        self._aclients.clear()
        for loop, link in links:
            _close_async(loop, link.client, self._closing)

    async def aclose(self) -> None:
        """Close every client, this event loop's async client before returning."""
        link = self._aclients.pop(asyncio.get_running_loop(), None)
        if link is not None:
            await link.client.aclose()
        self.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
