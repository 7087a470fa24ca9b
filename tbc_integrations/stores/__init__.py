"""Stores behind the ledger, chosen by object or URL.

Example:
    >>> from tbc_integrations.stores import store_from_url
    >>> type(store_from_url("memory://")).__name__
    'MemoryStore'
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tbc_integrations._errors import ContractError

from ._base import Store
from ._memory import MemoryStore
from ._sqlite import SQLiteStore, options_from_url

__all__ = ["MemoryStore", "RedisStore", "SQLiteStore", "Store", "check_namespace", "store_from_url"]


def __getattr__(name: str) -> object:
    # RedisStore needs redis-py: import it only when asked for
    if name == "RedisStore":
        from tbc_integrations.stores._redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_NAMESPACE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is 1 to 128 letters, digits, ``-``, ``_``, ``.`` and ``:``.

    Example:
        >>> check_namespace("run-42")
        'run-42'
    """
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ContractError(
            f"namespace must be 1 to 128 letters, digits, '-', '_', '.' or ':', got {namespace!r}"
        )
    return namespace


def _functions_option(url: str) -> tuple[str, bool]:
    """Take our ``functions=yes|no`` option out of a Redis URL's query (redis-py keeps the rest)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    mine = [v for k, v in query if k == "functions"]
    if not mine:
        return url, True
    value = mine[-1].lower()
    if value not in ("yes", "no", "true", "false", "1", "0"):
        raise ContractError(f"functions= in a Redis URL takes yes or no, got {mine[-1]!r}")
    rest = urlencode([(k, v) for k, v in query if k != "functions"])
    return urlunsplit(parts._replace(query=rest)), value in ("yes", "true", "1")


def store_from_url(url: str, namespace: str = "default") -> Store:
    """Open the store a URL names: ``memory://``, ``sqlite:///path.db``, ``redis://...``
    or ``redis+cluster://host:port`` (a Redis Cluster, from one node's address).

    Raises:
        ContractError: for an unknown or malformed URL.
    """
    check_namespace(namespace)
    if not isinstance(url, str):
        raise ContractError(f"store must be a Store or a URL string, got {url!r}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        return MemoryStore(namespace=namespace)
    if scheme == "sqlite":
        path, options = options_from_url(url)
        return SQLiteStore(path, namespace=namespace, **options)
    if scheme in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
        from tbc_integrations.stores._redis import RedisStore

        url, functions = _functions_option(url)
        return RedisStore(url, namespace=namespace, functions=functions)
    raise ContractError(
        f"unknown store URL {url!r}; supported: memory://, sqlite:///path.db, "
        "redis://host:port/db, redis+cluster://host:port"
    )
