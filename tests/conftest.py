"""Test session setup: a real tiktoken encoding file, offline, and shared fixtures."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# CrewAI writes under HOME and TMPDIR and phones home at exit: give the whole test
# session its own directories and turn telemetry off before anything imports it.
_SANDBOX = Path(tempfile.mkdtemp(prefix="tbc-tests-"))
for _name in ("home", "tmp", "data", "config"):
    (_SANDBOX / _name).mkdir()
os.environ.update(
    CREWAI_DISABLE_TELEMETRY="true",
    CREWAI_DISABLE_TRACKING="true",
    OTEL_SDK_DISABLED="true",
    HOME=str(_SANDBOX / "home"),
    XDG_DATA_HOME=str(_SANDBOX / "data"),
    XDG_CONFIG_HOME=str(_SANDBOX / "config"),
    TMPDIR=str(_SANDBOX / "tmp"),
)
tempfile.tempdir = None  # re-read TMPDIR
# Registered before anything imports CrewAI, so it runs after CrewAI's own exit handlers.
atexit.register(shutil.rmtree, _SANDBOX, ignore_errors=True)

_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
_CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def _install_offline_encoding() -> None:
    """Put the real cl100k_base file where tiktoken's cache looks, before any test loads it."""
    import tiktoken_ext

    source = Path(next(iter(tiktoken_ext.__path__))) / "data" / "cl100k_base.tiktoken"
    if hashlib.sha256(source.read_bytes()).hexdigest() != _CL100K_SHA256:
        raise RuntimeError(f"{source} is not the real cl100k_base encoding file")
    cache = Path(tempfile.mkdtemp(prefix="tbc-tiktoken-", dir=_SANDBOX))
    shutil.copy(source, cache / hashlib.sha1(_CL100K_URL.encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


_install_offline_encoding()

# CI runs the same examples every time (a failure there is reproducible); locally
# hypothesis keeps exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")


class RecordingEncoding:
    """The real tiktoken encoding, noting the texts it is asked to encode."""

    def __init__(self, encoding: Any) -> None:
        self.encoding = encoding
        self.texts: list[str] = []

    def encode_ordinary(self, text: str) -> list[int]:
        self.texts.append(text)
        return list(self.encoding.encode_ordinary(text))


class FakeClock:
    """A clock tests move by hand (seconds)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def sandbox() -> Path:
    """The session's private HOME/TMPDIR root."""
    return _SANDBOX


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fresh_token_cache() -> Iterator[None]:
    """Forget loaded encodings and given warnings, so a test sees first-use behaviour."""
    from tbc_integrations import tokens

    saved = (dict(tokens._cache), set(tokens._warned), dict(tokens._counters))
    tokens._cache.clear()
    tokens._warned.clear()
    tokens._counters.clear()
    yield
    tokens._cache.clear()
    tokens._cache.update(saved[0])
    tokens._warned.clear()
    tokens._warned.update(saved[1])
    tokens._counters.clear()
    tokens._counters.update(saved[2])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to reach the network fail at once, as offline CI would."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_redis: dict[str, str] = {}


def redis_url() -> str:
    """The test Redis: $TBC_REDIS_URL, or a redis-server this session starts on a free port."""
    if "url" in _redis:
        return _redis["url"]
    url = os.environ.get("TBC_REDIS_URL")
    if not url:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server: install it, or set TBC_REDIS_URL")
        import atexit
        import socket
        import subprocess
        import time

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        workdir = Path(tempfile.mkdtemp(prefix="tbc-redis-"))
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        atexit.register(proc.terminate)
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    _redis["url"] = url
    return url


def _redis_available() -> bool:
    return bool(os.environ.get("TBC_REDIS_URL") or shutil.which("redis-server"))


# Under CI a missing Redis fails the run (store_url raises) instead of dropping the store.
STORE_KINDS = ("memory", "sqlite", "redis") if IN_CI or _redis_available() else ("memory", "sqlite")


def store_url(kind: str, directory: Path) -> str:
    """A fresh, empty store of ``kind`` (SQLite files live in ``directory``)."""
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return "sqlite:///" + str(directory / "budgets.db")
    if kind == "redis-cluster":  # the cluster of the redis_cluster fixture, emptied
        import redis.cluster

        url = _redis.get("cluster")
        if url is None:
            raise RuntimeError("a redis-cluster store needs the redis_cluster fixture")
        with redis.cluster.RedisCluster.from_url(url.replace("+cluster", "")) as client:
            client.flushdb()  # on every primary
        return url
    if kind in ("redis", "redis-eval"):
        import redis

        url = redis_url()
        with redis.Redis.from_url(url) as client:
            client.flushdb()
        # redis-eval: the same script through EVALSHA, the path of servers without functions
        return url if kind == "redis" else url + "?functions=no"
    raise ValueError(kind)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[str]:
    """A three-node Redis Cluster on loopback ports, started for the session (or the one
    ``$TBC_REDIS_CLUSTER_URL`` names); its ``redis+cluster://`` URL.

    Without ``redis-server``/``redis-cli`` the tests that use it are skipped, except under
    CI, where a cluster that cannot start fails them.
    """
    url = os.environ.get("TBC_REDIS_CLUSTER_URL")
    cluster = None
    if not url:
        from tests.redis_cluster import start_cluster

        try:
            cluster = start_cluster(Path(tempfile.mkdtemp(prefix="tbc-cluster-")))
        except RuntimeError as exc:
            if IN_CI:
                raise
            pytest.skip(f"no Redis Cluster here: {exc}")
        url = cluster.url
    elif "+cluster://" not in url:  # a node's redis:// address: speak cluster to it
        scheme, rest = url.split("://", 1)
        url = f"{scheme}+cluster://{rest}"
    _redis["cluster"] = url
    try:
        yield url
    finally:
        _redis.pop("cluster", None)
        if cluster is not None:
            cluster.stop()
