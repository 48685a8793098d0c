"""Who may publish and subscribe what on the bus: the per-role permissions of a nats-server.

- A worker (or a bridge) writes only its own KV events, load reports and registration entry (and
  tokenizer files, content-addressed), may create the KV stream, the registry and the tokenizer
  buckets if they are missing, reads only its own pin hints and
  dump requests, and may answer the requests it receives (state dumps).
- A gateway reads everything and writes its pin hints, dump requests and replica notes; it can neither
  register a worker nor publish a worker's events or load, nor delete or purge a stream.

`kvgate up` generates one user per role (one per worker, so a worker cannot write another's entry)
with random passwords; the server's configuration holds only their bcrypt hashes, the clients the
passwords. The Helm chart renders the same permissions (charts/kvgate/templates/_helpers.tpl) for its
gateway, its worker pods (one user: they share a pod template) and each bridge. `docs/SECURITY.md`
gives the same rules for a NATS you run yourself. The permissions are nats-server configuration (its
format is a superset of JSON).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import bcrypt
import msgspec

from router.protocol import Subjects, check_token

JS_API = "$JS.API"
# bcrypt's lowest cost: a generated password is 192 random bits, which no cost factor makes any harder
# to guess, and nats-server checks the hash on every connection a client opens
BCRYPT_ROUNDS = 4


class BusUser(msgspec.Struct, frozen=True):
    user: str
    password: str
    permissions: dict[str, Any]

    def __repr__(self) -> str:
        return f"BusUser({self.user!r}, password=***)"

    def server_entry(self) -> dict[str, Any]:
        """This user in a nats-server `authorization` block: the password as a bcrypt hash, which the
        server accepts in its place (and does not warn about, as it does about a plaintext one)."""
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()
        return {"user": self.user, "password": hashed, "permissions": self.permissions}


def _kv_stream(subjects: Subjects) -> str:
    return f"KV_{subjects.registry_bucket}"


def worker_permissions(subjects: Subjects, worker_ids: Sequence[str]) -> dict[str, Any]:
    """The permissions of a user that serves `worker_ids`: one worker's own (`kvgate up` and each of
    the Helm chart's bridges), or the Helm chart's worker pods', which share one pod template and so
    one user. Nothing of another worker's, nor of a gateway's."""
    ids = [check_token(wid, "worker id") for wid in worker_ids]
    registry, stream, prefix = _kv_stream(subjects), subjects.kv_stream, subjects.prefix
    tokenizers = f"OBJ_{subjects.tokenizer_bucket}"
    return {
        "publish": {
            "allow": [
                *(f"{prefix}.kv.{wid}" for wid in ids),
                *(f"{prefix}.load.{wid}" for wid in ids),
                *(f"$KV.{subjects.registry_bucket}.{wid}" for wid in ids),
                f"{JS_API}.INFO",
                f"{JS_API}.STREAM.INFO.{stream}",
                f"{JS_API}.STREAM.CREATE.{stream}",
                f"{JS_API}.STREAM.INFO.{registry}",
                f"{JS_API}.STREAM.CREATE.{registry}",
                # its tokenizer files, stored by content hash (every reader checks the hash)
                f"$O.{subjects.tokenizer_bucket}.>",
                f"{JS_API}.STREAM.INFO.{tokenizers}",
                f"{JS_API}.STREAM.CREATE.{tokenizers}",
                f"{JS_API}.STREAM.MSG.GET.{tokenizers}",
                f"{JS_API}.DIRECT.GET.{tokenizers}.>",
            ]
        },
        "subscribe": {
            "allow": [
                *(f"{prefix}.pin.{wid}" for wid in ids),
                *(f"{prefix}.dump.{wid}" for wid in ids),
                "_INBOX.>",
            ]
        },
        "allow_responses": {"max": 1},
    }


def gateway_permissions(subjects: Subjects) -> dict[str, Any]:
    workers_streams = (subjects.kv_stream, _kv_stream(subjects))  # the snapshot bucket is the gateways'
    stream_ops = ("CREATE", "UPDATE", "DELETE", "PURGE", "MSG.DELETE")
    return {
        "publish": {
            "allow": [">"],
            "deny": [
                f"{subjects.prefix}.kv.>",
                f"{subjects.prefix}.load.>",
                f"$KV.{subjects.registry_bucket}.>",
                *(f"{JS_API}.STREAM.{op}.{stream}" for op in stream_ops for stream in workers_streams),
            ],
        },
        "subscribe": {"allow": [">"]},
    }


def new_user(name: str, permissions: dict[str, Any]) -> BusUser:
    return BusUser(name, secrets.token_urlsafe(24), permissions)


def generated_users(subjects: Subjects, worker_ids: list[str]) -> tuple[BusUser, dict[str, BusUser]]:
    """A gateway user and one user per worker, each with a fresh random password."""
    gateway = new_user("gateway", gateway_permissions(subjects))
    workers = {wid: new_user(f"worker-{wid}", worker_permissions(subjects, [wid])) for wid in worker_ids}
    return gateway, workers


def authorization(users: list[BusUser]) -> dict[str, Any]:
    """The `authorization` block of a nats-server configuration."""
    return {"users": [user.server_entry() for user in users]}
