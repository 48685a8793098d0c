"""Tenants: with API keys configured, each key is a tenant, kept apart from the others.

A tenant's block hashes are salted with its id (and the request's own `cache_salt`), and the same
salt goes to the worker as the request's `cache_salt`, so the engine does not share its blocks across
tenants either: key B sending key A's prompt neither hits A's cache nor is told A cached it. Its
explicit session ids are namespaced, so a shared `x-session-id` does not join two tenants' sessions.
Several keys of one tenant share it when named together (`--tenant NAME=KEY`).

A tenant id is a digest of the tenant's name (or of its key when it has no name): it goes on the bus
and to the workers, the key never does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

TENANT_SEPARATOR = "/"


def tenant_id(name: str) -> str:
    return "t" + hashlib.sha256(b"kvgate-tenant\x00" + name.encode()).hexdigest()[:16]


class Tenants:
    def __init__(self, api_keys: Iterable[str] = (), named: Iterable[tuple[str, str]] = ()) -> None:
        """`api_keys`: a tenant each; `named`: (tenant name, key) pairs, one tenant per name."""
        self._by_key: dict[str, str] = {key: tenant_id("key\x00" + key) for key in api_keys}
        self._by_key.update({key: tenant_id("name\x00" + name) for name, key in named})

    @property
    def enabled(self) -> bool:
        return bool(self._by_key)

    def of(self, headers: Mapping[str, str]) -> str | None:
        """The tenant of an authorised request (None when no keys are configured)."""
        if not self._by_key:
            return None
        given = headers.get("x-api-key", "")
        if not given:
            header = headers.get("authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return self._by_key.get(given)


def salt(tenant: str, cache_salt: str | None) -> str:
    """The cache salt of a tenant's request: its own salt, if any, within the tenant's (a long one as
    its digest: workers take salts of up to 256 characters)."""
    if not cache_salt:
        return tenant
    if len(cache_salt) > 128:
        cache_salt = hashlib.sha256(cache_salt.encode()).hexdigest()
    return f"{tenant}{TENANT_SEPARATOR}{cache_salt}"


def namespaced(tenant: str, session_id: str | None) -> str | None:
    return None if session_id is None else f"{tenant}{TENANT_SEPARATOR}{session_id}"


def public(session_id: str) -> str:
    """A session id as its client knows it (without the tenant)."""
    head, sep, rest = session_id.partition(TENANT_SEPARATOR)
    return rest if sep and head.startswith("t") and len(head) == 17 else session_id
