"""A Redis store for many hosts: every verb, reallocation included, one server-side script.

The script (``ledger.lua``, shipped with the package) runs as a Redis function
(``FUNCTION LOAD`` once, then ``FCALL``; Redis 7+ and Valkey), so its helpers are
built once when it is loaded instead of on every call. The library's name carries
a hash of the script, so versions never clash, and it is loaded again whenever the
server has forgotten it (a restart without persistence, ``FUNCTION FLUSH``). On a
server without functions, or a user not allowed ``FUNCTION LOAD``, the same script
runs through ``EVALSHA`` (redis-py re-loads it after ``NOSCRIPT``); pass
``functions=False`` (or ``?functions=no`` in the URL) to choose that path.

Every key of a namespace carries the hash tag ``{namespace}``, and each call names
one of them, so a namespace lives in one Redis Cluster slot and a cluster client
routes the call there. Reallocation runs inside the script with the greedy or the
confidence-weighted policy; custom Python policies cannot run inside Redis and are
refused.

Example:
    >>> RedisStore.__name__
    'RedisStore'
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import uuid
import weakref
from importlib import resources
from typing import Any

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._engine import AgentRow, Events, agent_status
from tbc_integrations._errors import (
    BudgetExceededError,
    ConfidenceGateError,
    ContractError,
    InvalidTokenCountError,
    MissingDependencyError,
    NamespaceLostError,
    ReservationError,
    StoreUnavailableError,
    UnknownAgentError,
)
from tbc_integrations._records import AgentStatus, Reservation
from tbc_integrations._usage import Usage
from tbc_integrations.events import event_from_dict
from tbc_integrations.policies import ConfidenceWeightedPolicy, GreedyPolicy, ReallocationPolicy
from tbc_integrations.stores._base import Store

try:
    import redis
    import redis.asyncio as aioredis
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "the Redis store needs redis-py: pip install 'tbc-integrations[redis]'"
    ) from exc

__all__ = ["RedisStore"]

_SCRIPT = resources.files("tbc_integrations.stores").joinpath("ledger.lua").read_text("utf-8")
_FUNCTION = "tbc_ledger_" + hashlib.sha1(_SCRIPT.encode("utf-8")).hexdigest()[:16]
_LIBRARY = f"#!lua name={_FUNCTION}\n" + _SCRIPT.replace("TBC_FUNCTION", _FUNCTION)


# each verb's comma-separated fields, in the order ledger.lua's CSV reads them
_FIELDS: dict[str, tuple[str, ...]] = {
    "register": (),
    "reserve": ("input", "output", "lease", "clamp", "policy", "alpha"),
    "check": ("input", "output", "lease", "clamp", "policy", "alpha"),
    "commit": ("ui", "uo", "estimated", "policy", "alpha"),
    "release": (),
    "charge": ("ui", "uo", "estimated", "policy", "alpha"),
    "reallocate": ("tokens", "policy", "alpha"),
    "adjust": ("delta",),
    "complete": (),
    "confidence": ("value",),
    "threshold": ("value",),
    "expire": (),
    "status": (),
    "contracts": (),
    "open": (),
}


def _args(verb: str, now: float, payload: dict[str, Any], epoch: str, events: bool) -> list[str]:
    """ARGV for the script: verb, agent, reservation id, contract JSON, the namespace's
    epoch, and the comma-terminated fields.

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
        payload.get("contract", ""),
        epoch,
        ",".join(fields),
    ]


_INTS = ("tokens", "input_tokens", "output_tokens")
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


def _policy_args(policy: ReallocationPolicy | None) -> dict[str, Any]:
    if policy is None or isinstance(policy, GreedyPolicy):
        return {"policy": "greedy"}
    if isinstance(policy, ConfidenceWeightedPolicy):
        return {"policy": "weighted", "alpha": policy.alpha}
    raise ContractError(
        f"the Redis store runs reallocation inside Redis, with the 'greedy' or 'weighted' "
        f"policy; {getattr(policy, 'name', policy)!r} cannot run there"
    )


_ROW_INTS = (
    "priority",
    "min_reserve",
    "max_tokens",
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
)


def _row(data: dict[str, Any]) -> AgentRow:
    row = AgentRow()
    row.name = data["name"]
    for key in _ROW_INTS:
        setattr(row, key, int(data[key]))
    for key in ("max_input", "max_output"):
        setattr(row, key, int(data[key]) if key in data else None)
    for key in ("threshold", "last_confidence"):
        setattr(row, key, float(data[key]) if key in data else None)
    row.complete = data["complete"] == "1"
    return row


class RedisStore(Store):
    """Ledger state in Redis, shared by every process on every host.

    Args:
        url: A ``redis://`` URL (or pass ``client=``).
        namespace: Agents and reservations of other namespaces are invisible.
        client: An existing ``redis.Redis`` client.
        socket_timeout: Seconds before a call to the server counts as unreachable.
        functions: Run the script as a Redis function (``FCALL``) where the server
            allows it; ``False`` runs it through ``EVALSHA`` on every server.
    """

    blocking_io = True

    def __init__(
        self,
        url: str | None = None,
        namespace: str = "default",
        *,
        client: Any = None,
        socket_timeout: float = 5.0,
        functions: bool = True,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.functions = functions
        self._key = f"tbc:{{{namespace}}}:"  # names the namespace's slot for cluster routing
        # reservation ids: a random prefix per store object and a counter (unique across
        # processes and hosts, cheaper than a uuid per call)
        self._id_prefix = uuid.uuid4().hex[:16] + "."
        self._ids = itertools.count(1)
        if client is not None:
            self.client = client
        elif url is not None:
            self.client = redis.Redis.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
        else:
            raise ContractError("RedisStore needs a redis:// URL or a client")
        self.socket_timeout = socket_timeout
        self._script = self.client.register_script(_SCRIPT)
        self._epoch: str | None = None  # read (or made) on the first call
        # one async client per event loop: a redis.asyncio client belongs to the loop it
        # first ran on, and scripts often run several loops (asyncio.run twice)
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )

    # ------------------------------------------------------------- plumbing
    def _invoke(self, args: list[Any]) -> Any:
        if self.functions:
            try:
                return self.client.fcall(_FUNCTION, 1, self._key, *args)
            except redis.ResponseError as exc:
                if _missing_function(exc):
                    try:
                        self.client.function_load(_LIBRARY, replace=True)
                        return self.client.fcall(_FUNCTION, 1, self._key, *args)
                    except redis.ResponseError as load_exc:
                        if not _no_functions(load_exc):
                            raise
                        self.functions = False
                elif _no_functions(exc):
                    self.functions = False
                else:
                    raise
        return self._script(keys=[self._key], args=args)

    def _aclient(self) -> tuple[Any, Any]:
        """The running event loop's async client and script (made on first use there)."""
        loop = asyncio.get_running_loop()
        pair = self._aclients.get(loop)
        if pair is None:
            if self.url is None:
                raise ContractError("async verbs need the store to be opened from a URL")
            client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
            )
            pair = self._aclients[loop] = (client, client.register_script(_SCRIPT))
        return pair

    async def _ainvoke(self, args: list[Any]) -> Any:
        client, script = self._aclient()
        if self.functions:
            try:
                return await client.fcall(_FUNCTION, 1, self._key, *args)
            except redis.ResponseError as exc:
                if _missing_function(exc):
                    try:
                        await client.function_load(_LIBRARY, replace=True)
                        return await client.fcall(_FUNCTION, 1, self._key, *args)
                    except redis.ResponseError as load_exc:
                        if not _no_functions(load_exc):
                            raise
                        self.functions = False
                elif _no_functions(exc):
                    self.functions = False
                else:
                    raise
        return await script(keys=[self._key], args=args)

    def _epoch_key(self) -> str:
        return self._key + "epoch"

    def _known_epoch(self) -> str:
        """The namespace's epoch: made on the first call that finds none, then kept."""
        if self._epoch is None:
            self.client.set(self._epoch_key(), uuid.uuid4().hex, nx=True)
            self._epoch = _text(self.client.get(self._epoch_key()))
        return self._epoch

    async def _aknown_epoch(self) -> str:
        if self._epoch is None:
            client, _ = self._aclient()
            await client.set(self._epoch_key(), uuid.uuid4().hex, nx=True)
            self._epoch = _text(await client.get(self._epoch_key()))
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
        result = self._call("register", now, {"contract": text}, events, contract)
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
    ) -> dict[str, Any]:
        return {
            "agent": agent,
            "input": input_tokens,
            "output": output_tokens,
            "lease": lease_seconds,
            "clamp": clamp_output,
            "id": f"{self._id_prefix}{next(self._ids)}",
            **_policy_args(policy),
        }

    def _reservation(self, agent: str, result: dict[str, Any]) -> Reservation:
        loans = tuple((str(d), int(t)) for d, t in (result.get("loans") or ()))
        return Reservation(
            result["id"],
            agent,
            int(result["input"]),
            int(result["output"]),
            float(result["expires"]),
            loans,
            self.namespace,
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
    ) -> Reservation:
        payload = self._reserve_payload(
            agent, input_tokens, output_tokens, lease_seconds, policy, clamp_output
        )
        return self._reservation(agent, self._call("reserve", now, payload, events))

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
    ) -> Reservation:
        payload = self._reserve_payload(
            agent, input_tokens, output_tokens, lease_seconds, policy, clamp_output
        )
        return self._reservation(agent, await self._acall("reserve", now, payload, events))

    def check(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
    ) -> None:
        payload = self._reserve_payload(agent, input_tokens, output_tokens, 0.0, policy, False)
        self._call("check", now, payload, events)

    @staticmethod
    def _commit_payload(
        rid: str, usage: Usage | None, policy: ReallocationPolicy, estimated: bool
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "ui": None if usage is None else usage[0],
            "uo": None if usage is None else usage[1],
            "estimated": estimated,
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
    ) -> int:
        payload = self._commit_payload(rid, usage, policy, estimated)
        return int(self._call("commit", now, payload, events) or 0)

    async def acommit(
        self,
        rid: str,
        usage: Usage | None,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        estimated: bool = False,
    ) -> int:
        payload = self._commit_payload(rid, usage, policy, estimated)
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
    ) -> int:
        payload = {
            "agent": agent,
            "ui": usage[0],
            "uo": usage[1],
            "estimated": estimated,
            **_policy_args(policy),
        }
        return int(self._call("charge", now, payload, events) or 0)

    def reallocate(
        self, agent: str, tokens: int, now: float, policy: ReallocationPolicy, events: Events
    ) -> int:
        payload = {"agent": agent, "tokens": tokens, **_policy_args(policy)}
        return int(self._call("reallocate", now, payload, events) or 0)

    def adjust(self, agent: str, delta: int, now: float, events: Events) -> None:
        self._call("adjust", now, {"agent": agent, "delta": delta}, events)

    def complete(self, agent: str, now: float, events: Events) -> None:
        self._call("complete", now, {"agent": agent}, events)

    def record_confidence(self, agent: str, confidence: float, now: float, events: Events) -> bool:
        payload = {"agent": agent, "value": confidence}
        return bool(self._call("confidence", now, payload, events))

    def set_threshold(
        self, agent: str, threshold: float | None, now: float, events: Events
    ) -> None:
        payload: dict[str, Any] = {"agent": agent}
        if threshold is not None:
            payload["value"] = threshold
        self._call("threshold", now, payload, events)

    def expire(self, now: float, events: Events) -> int:
        return int(self._call("expire", now, {}, events) or 0)

    def status(self, now: float) -> dict[str, AgentStatus]:
        out = {}
        for r in self._call("status", now, {}) or []:
            contract = BudgetContract.from_dict(json.loads(r["contract"]))
            out[r["name"]] = agent_status(_row(r), contract.depends_on)
        return out

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
            )
            for r in rows
        ]

    def close(self) -> None:
        self.client.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
