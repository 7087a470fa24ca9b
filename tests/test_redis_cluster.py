"""The Redis store on a real three-node Redis Cluster, started on loopback ports.

Every key of a namespace carries the hash tag ``{namespace}``: a namespace (its team,
its reservations and leases, its limit rows) lives in one slot, on one node, where
its scripts run; namespaces spread over the nodes. The store's tests of verbs,
limits, money, threads, processes and the differential scripts run here against
the cluster, and each namespace's keys are looked for on every node.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster

from tbc_integrations import BudgetManager, Limit, LimitExceededError, Usage
from tbc_integrations.stores import store_from_url
from tests import limit_workers, mp_workers
from tests.test_differential import play, script

# The store-parametrized tests of limits and money, collected here again with
# ``kind`` = "redis-cluster" (this module's fixture below).
from tests.test_limits import (  # noqa: F401
    test_a_period_boundary_starts_fresh_and_an_open_call_settles_in_its_own_period,
    test_a_rolling_soft_limit_warns_once_per_crossing,
    test_a_rolling_window_counts_spend_for_exactly_its_duration,
    test_a_rolling_window_keeps_a_bounded_number_of_buckets,
    test_a_soft_limit_warns_exactly_once_per_crossing_and_period,
    test_each_user_has_its_own_limit_and_the_team_keeps_its_rules,
    test_eight_threads_and_three_users_never_pass_a_limit,
    test_money_limits_and_release_and_lapse_give_the_hold_back,
)
from tests.test_money import (  # noqa: F401
    test_a_cost_cap_refuses_before_any_spend_and_changes_nothing,
    test_an_overspend_past_the_cost_cap_is_recorded_and_evented,
    test_explicit_costs_and_charges_are_kept_exactly,
    test_money_is_never_lent_and_a_money_only_agent_lends_no_tokens,
    test_release_and_a_lapsed_lease_return_the_money_held,
    test_reserve_holds_the_worst_case_and_commit_spends_the_priced_usage,
)

from .conftest import store_url


@pytest.fixture(autouse=True)
def _cluster(redis_cluster: str) -> str:
    return redis_cluster


@pytest.fixture
def kind() -> str:
    return "redis-cluster"


def nodes(url: str) -> dict[int, redis.Redis]:
    """A plain client per node of the cluster, by port."""
    with redis.cluster.RedisCluster.from_url(url.replace("+cluster", "")) as client:
        ports = [node.port for node in client.get_primaries()]
    return {port: redis.Redis(host="127.0.0.1", port=port) for port in ports}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def node_of(url: str, namespace: str) -> int:
    """The port of the node that holds ``namespace``'s slot."""
    with redis.cluster.RedisCluster.from_url(url.replace("+cluster", "")) as client:
        return int(client.get_node_from_key(f"tbc:{{{namespace}}}:").port)


def test_the_cluster_has_three_nodes_that_share_the_slots(tmp_path: Path) -> None:
    url = store_url("redis-cluster", tmp_path)
    clients = nodes(url)
    assert len(clients) == 3
    for client in clients.values():
        info = client.cluster("info")
        assert info["cluster_state"] == "ok" and int(info["cluster_slots_assigned"]) == 16384
        client.close()


def test_namespaces_land_on_different_nodes_and_keep_every_key_in_one_slot(
    tmp_path: Path,
) -> None:
    url = store_url("redis-cluster", tmp_path)
    clients = nodes(url)
    by_node: dict[int, str] = {}
    i = 0
    while len(by_node) < len(clients):  # a namespace on each node
        namespace = f"team-{i}"
        by_node.setdefault(node_of(url, namespace), namespace)
        i += 1
    limits = [Limit("user", max_tokens=500, window="1h"), Limit("app", max_cost="1", default="all")]
    for port, namespace in by_node.items():
        m = BudgetManager(store=url, namespace=namespace, limits=limits)
        m.register_agent("planner", priority=1, max_tokens=1_000)
        m.register_agent("writer", priority=2, max_tokens=100)
        with m.scope(user="u-1"):
            r = m.reserve("writer", 150, 50, cost="0.01")  # borrows from the planner
            assert r.loans == (("planner", 100),)
            assert m.commit(r, Usage(120, 30), cost="0.002") == 0
            held = m.reserve("writer", 10, 10)
        m.release(held)
        assert m.status()["writer"].consumed == 150 and m.status()["planner"].lent == 50
        assert m.limit_status("user", "u-1").consumed == 150
        m.store.close()
        # every key of the namespace is on its node, and in one slot
        for other, client in clients.items():
            keys = [_text(k) for k in client.keys(f"tbc:{{{namespace}}}:*")]
            if other == port:
                kinds = {k.split(":", 2)[2].split(":")[0] for k in keys}
                assert kinds >= {"num", "con", "agents", "res", "lim", "epoch"}
                assert len({client.cluster("keyslot", k) for k in keys}) == 1
            else:
                assert keys == []
    for client in clients.values():
        client.close()


@pytest.mark.parametrize("suffix", ["", "?functions=no"], ids=["fcall", "evalsha"])
@pytest.mark.parametrize("seed", [0, 3, 7])
def test_the_differential_scripts_give_the_same_answers_on_the_cluster(
    tmp_path: Path, seed: int, suffix: str
) -> None:
    contracts, policy, ops, limits = script(seed, 120)
    base = play("memory://", contracts, policy, ops, limits)
    run = play(store_url("redis-cluster", tmp_path) + suffix, contracts, policy, ops, limits)
    assert run.outcomes == base.outcomes
    assert run.status == base.status
    assert run.events == base.events and base.events


def test_four_processes_on_the_cluster_end_with_exact_totals(tmp_path: Path) -> None:
    url = store_url("redis-cluster", tmp_path)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        teams = pool.starmap(mp_workers.hammer, [(url, "mp", seed, 600) for seed in range(4)])
        users = pool.starmap(limit_workers.spend, [(url, seed, 200) for seed in range(4)])
    committed: Counter[str] = Counter()
    for r in teams:
        committed.update(r)
    status = BudgetManager(store=url, namespace="mp").status()
    assert sum(s.allocated for s in status.values()) == sum(
        int(f["max_tokens"]) for f in mp_workers.AGENTS.values()
    )
    for name, s in status.items():
        assert s.reserved == 0 and s.consumed == committed[name] and s.overdraft == 0
    spent: Counter[str] = Counter()
    for r in users:
        spent.update(r)
    m = limit_workers.manager(url)
    for user in limit_workers.USERS:
        limit = m.limit_status("user", user)
        assert limit.consumed == spent[user] and limit.reserved == 0
        assert limit.consumed <= limit_workers.PER_USER
    assert max(spent.values()) > limit_workers.PER_USER - 300  # some users reached the limit


def test_concurrent_async_calls_on_the_cluster_settle_exactly(tmp_path: Path) -> None:
    url = store_url("redis-cluster", tmp_path)
    m = BudgetManager(store=url, namespace="async", limits=[Limit("run", max_tokens=3_000)])
    m.register_agent("writer", max_tokens=10_000)

    async def call(i: int) -> int:
        try:
            async with m.aspend("writer", 40, 40, scope={"run": "r-1"}) as spend:
                spend.set_usage(Usage(40, i % 30))
        except LimitExceededError:  # refused past the run's limit
            return 0
        return 40 + i % 30

    async def main() -> list[int]:
        return list(await asyncio.gather(*(call(i) for i in range(80))))

    used = asyncio.run(main())
    m.store.close()
    s = m.limit_status("run", "r-1")
    assert s.consumed == sum(used) == m.status()["writer"].consumed
    assert s.consumed <= 3_000 < 80 * 40 and s.reserved == 0


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_the_script_is_loaded_again_on_the_node_that_forgot_it(
    tmp_path: Path, functions: bool
) -> None:
    from tbc_integrations.stores._redis import RedisStore

    url = store_url("redis-cluster", tmp_path)
    clients = nodes(url)
    store = RedisStore(url, namespace="forget", functions=functions)
    assert store.cluster
    m = BudgetManager(store=store)
    m.register_agent("a", max_tokens=100)
    r = m.reserve("a", 10, 5)
    for client in clients.values():  # what a node restarted without persistence forgets
        client.function_flush()
        client.script_flush()
    assert m.commit(r, (10, 3)) == 0

    async def async_spend() -> None:
        for client in clients.values():
            client.function_flush()
            client.script_flush()
        async with m.aspend("a", 4, 4) as call:
            call.set_usage((4, 1))

    asyncio.run(async_spend())
    assert m.status()["a"].consumed == 18 and store.functions is functions
    store.close()
    for client in clients.values():
        client.close()


def test_cluster_urls_and_clients_choose_the_cluster(tmp_path: Path) -> None:
    from tbc_integrations.stores._redis import RedisStore

    url = store_url("redis-cluster", tmp_path)
    store = store_from_url(url + "?functions=no", namespace="n")
    assert isinstance(store, RedisStore) and store.cluster and store.functions is False
    assert isinstance(store.client, redis.cluster.RedisCluster)
    store.close()
    client = redis.cluster.RedisCluster.from_url(url.replace("+cluster", ""))
    given = RedisStore(client=client, namespace="n")  # async verbs run in a thread
    m: Any = BudgetManager(store=given)
    m.register_agent("a", max_tokens=10)
    assert given.cluster and m.remaining("a") == 10
    client.close()


def _run(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _move_slot(url: str, namespace: str, to_port: int) -> None:
    """Migrate the namespace's slot, keys and all, to the node on ``to_port`` (as a
    resharding does): IMPORTING/MIGRATING, MIGRATE the keys, then give every node the news."""
    clients = nodes(url)
    source = clients[node_of(url, namespace)]
    target = clients[to_port]
    slot = int(source.cluster("keyslot", f"tbc:{{{namespace}}}:"))
    source_id = _text(_run(source, "CLUSTER MYID"))
    target_id = _text(_run(target, "CLUSTER MYID"))
    _run(target, "CLUSTER SETSLOT", slot, "IMPORTING", source_id)
    _run(source, "CLUSTER SETSLOT", slot, "MIGRATING", target_id)
    keys = _run(source, "CLUSTER GETKEYSINSLOT", slot, 10_000)
    assert keys
    _run(source, "MIGRATE", "127.0.0.1", to_port, "", 0, 5_000, "KEYS", *keys)
    for client in clients.values():
        _run(client, "CLUSTER SETSLOT", slot, "NODE", target_id)
    for client in clients.values():
        client.close()


@pytest.mark.parametrize("functions", [True, False], ids=["fcall", "evalsha"])
def test_a_namespace_whose_slot_moves_to_another_node_keeps_working(
    tmp_path: Path, functions: bool
) -> None:
    from tbc_integrations.stores._redis import RedisStore

    url = store_url("redis-cluster", tmp_path)
    store = RedisStore(url, namespace="moving", functions=functions)
    m = BudgetManager(store=store, limits=[Limit("user", max_tokens=1_000, window="1h")])
    m.register_agent("planner", priority=1, max_tokens=500)
    m.register_agent("writer", priority=2, max_tokens=100)
    with m.scope(user="u-1"):
        held = m.reserve("writer", 150, 0)  # open while the slot moves
        before = node_of(url, "moving")
        after = next(port for port in nodes(url) if port != before)
        _move_slot(url, "moving", after)
        assert node_of(url, "moving") == after
        m.commit(held, Usage(120, 0))  # the old node answers MOVED: the store follows

        async def more() -> None:
            async with m.aspend("writer", 30, 0) as call:
                call.set_usage(Usage(30, 0))

        asyncio.run(more())
    status = m.status()
    assert status["writer"].consumed == 150 and status["writer"].reserved == 0
    assert status["planner"].lent == 50 and m.limit_status("user", "u-1").consumed == 150
    store.close()


def test_each_verb_is_one_script_call_on_the_namespaces_node(tmp_path: Path) -> None:
    url = store_url("redis-cluster", tmp_path)
    m = BudgetManager(store=url, namespace="direct")
    m.register_agent("a", max_tokens=1_000)
    m.commit(m.reserve("a", 10, 10), Usage(10, 5))  # (the first also reads the contracts)
    clients = nodes(url)
    for client in clients.values():
        client.config_resetstat()
    for _ in range(10):
        m.commit(m.reserve("a", 10, 10), Usage(10, 5))  # 20 verbs
    home = node_of(url, "direct")
    for port, client in clients.items():
        stats = client.info("commandstats")
        calls = stats.get("cmdstat_fcall", {}).get("calls", 0)
        assert calls == (20 if port == home else 0)
        # no round trip to ask a node where the keys of a call are
        assert "cmdstat_command|getkeys" not in stats
        client.close()
    m.store.close()
