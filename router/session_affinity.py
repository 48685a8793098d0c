"""NVIDIA Dynamo 1.6.1's session affinity (`--router-session-affinity-ttl-secs N`), for `kv_overlap`.

Dynamo keeps a table from session id to the worker that served the session
(`lib/kv-router/src/services/selection/affinity.rs`, `SessionAffinity`; the frontend's KV router takes
its hold in `lib/llm/src/kv_router/routing_host/kv.rs` and `kv_selection.rs`):

- A request that names a session (the agent-context headers: `x-dynamo-session-id`, `x-session-id`,
  `x-claude-code-session-id`, `session-id`, `thread-id`, ...) acquires it before its worker is selected.
  Unbound (or idle past the TTL): the request is selected as any other and the session is bound to the
  worker it is dispatched to (`commit`). Bound: the request goes to that worker, whatever its KV overlap
  or load (mode `hard`, the default: the binding becomes the request's pinned worker; Dynamo checks
  that worker only against its busy thresholds, off by default).
- Each request holds a lease on the binding from its acquire until its response stream ends; the end
  of a lease refreshes the idle deadline to then + TTL. A binding with a lease never expires; one
  without expires once its idle deadline passes (a reaper sweeps every min(TTL, 30 s); a lookup past
  the deadline re-selects at once).
- A bound worker that is no longer schedulable (gone) invalidates the binding: the request is selected
  afresh and binds the session again ("Session affinity target is not schedulable; re-initializing").
- At most 65,536 bindings: a new session past that routes without affinity ("Affinity table full").

Not modelled: the `soft` mode (the binding only a preference the default selector ignores, rebound to
wherever the request ran: with Dynamo's default selector, plain KV routing), replica synchronisation,
and a second request of a session waiting while the first is still being placed (a session's turns
here come one after another).
"""

from __future__ import annotations

from collections.abc import Callable

# Dynamo's bounds (affinity.rs): the table's entries, and the TTL the CLI accepts
MAX_ENTRIES = 65_536
MAX_TTL_S = 31_536_000


class _Binding:
    __slots__ = ("deadline", "leases", "worker_id")

    def __init__(self, worker_id: str, deadline: float) -> None:
        self.worker_id = worker_id
        self.leases = 0
        self.deadline = deadline  # idle deadline: then + TTL, from its last use

    def expired(self, now: float) -> bool:
        return self.leases == 0 and self.deadline <= now


class SessionAffinity:
    """The session table: `target` before a pick, `bind` after it, `release` when the request ends."""

    def __init__(self, ttl_s: float, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._bound: dict[str, _Binding] = {}
        # request id -> the binding it holds a lease on (its object: a binding made after that one was
        # dropped is not the one the request's end refreshes, as Dynamo's revisions ensure)
        self._leases: dict[str, _Binding] = {}

    def __len__(self) -> int:
        return len(self._bound)

    def target(self, request_id: str, session_id: str, now: float, live: Callable[[str], bool]) -> str | None:
        """The worker the request must go to, taking a lease on its session's binding; None: select it
        (new session, idle past the TTL, or its worker gone, which drops the binding)."""
        held = self._leases.get(request_id)
        if held is not None:  # acquired already (when it was queued): Dynamo holds the lease since
            if self._bound.get(session_id) is held and live(held.worker_id):
                return held.worker_id
            self.release(request_id, now)
        b = self._bound.get(session_id)
        if b is None:
            return None
        if b.expired(now) or not live(b.worker_id):
            del self._bound[session_id]  # re-initialized by this request's pick
            return None
        b.leases += 1
        self._leases[request_id] = b
        return b.worker_id

    def bind(self, request_id: str, session_id: str, worker_id: str, now: float) -> None:
        """The request was dispatched to `worker_id`: bind its session there (it holds a lease already
        when it was sent to the bound worker)."""
        if request_id in self._leases:
            return
        b = self._bound.get(session_id)
        if b is None or b.expired(now):
            if b is None and len(self._bound) >= self.max_entries:
                self._reap(now)
                if len(self._bound) >= self.max_entries:
                    return  # the table is full: routed without affinity
            b = self._bound[session_id] = _Binding(worker_id, now + self.ttl_s)
        b.leases += 1
        self._leases[request_id] = b

    def release(self, request_id: str, now: float) -> None:
        """The request's stream ended: its lease goes, and its binding idles from now."""
        b = self._leases.pop(request_id, None)
        if b is not None and b.leases > 0:
            b.leases -= 1
            b.deadline = now + self.ttl_s

    def bound_worker(self, session_id: str, now: float) -> str | None:
        """The worker a session is bound to now, without taking a lease (None: unbound or expired)."""
        b = self._bound.get(session_id)
        return None if b is None or b.expired(now) else b.worker_id

    def remove_worker(self, worker_id: str) -> None:
        """A worker left: its bindings go (their sessions are selected afresh)."""
        for sid in [sid for sid, b in self._bound.items() if b.worker_id == worker_id]:
            del self._bound[sid]

    def expire(self, now: float) -> None:
        self._reap(now)

    def _reap(self, now: float) -> None:
        for sid in [sid for sid, b in self._bound.items() if b.expired(now)]:
            del self._bound[sid]
