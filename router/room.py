"""A router-side queue per worker: a picked request waits here, not in its engine's queue, while its
worker has no KV room for it.

An engine admits first come first served (vLLM v1: its waiting loop stops at the first request that
cannot get its blocks), so a prompt that needs most of a worker's device (an agent session of 500k
tokens) waits there until the running requests leave, and every request routed behind it waits too,
even those that would fit beside the running ones. Held here instead, it blocks nobody: a request that
fits is sent at once, past the held ones (as an arrival passes NVIDIA Dynamo's router queue whenever
a worker is not busy), and the held ones are sent, oldest first, each as soon as it fits. After
`max_hold_s` a held request is sent whatever the room: its blocks then count as the worker's, so the
requests picked after it wait here until it has run, and a stream of smaller ones cannot starve it.

Room is the router's own count, as Dynamo's router keeps its active sequences: the prompt blocks of
the requests sent to the worker and not completed, against the worker's device blocks (an engine
admits a prompt when its blocks fit beside those the running requests hold). It changes only when a
request is sent or completes, so `release` is called after completions and at `next_deadline`. What
it does not see errs both ways, and the bound caps what that costs: a prefix several running requests
share counts once per request, the blocks of their outputs not at all, nor the requests other
gateway replicas sent.

Pure logic, times passed in; the gateway and the simulator drive it through `Router.room_offer`,
`Router.release_rooms`, `Router.rooms_deadline`, `Router.send_room_now` and `Router.cancel_room`;
`Router.on_complete` frees a request's room.
"""

from __future__ import annotations


class _Request:
    __slots__ = ("at", "blocks", "worker_id")

    def __init__(self, worker_id: str, blocks: int, at: float) -> None:
        self.worker_id = worker_id
        self.blocks = blocks
        self.at = at  # when it was held, or sent


class RoomQueue:
    def __init__(self, max_hold_s: float, max_held: int, max_sent: int = 1 << 17) -> None:
        if max_hold_s < 0 or max_held < 0 or max_sent < 1:
            raise ValueError("need room_max_hold_s >= 0, room_max_held >= 0 and max_sent >= 1")
        self.max_hold_s = max_hold_s
        self.max_held = max_held
        self.max_sent = max_sent
        self._capacity: dict[str, int] = {}  # worker -> device blocks
        self._held: dict[str, _Request] = {}  # request id -> held request, in arrival order
        self._sent: dict[str, _Request] = {}  # request id -> sent and not completed, in sending order
        self._sent_blocks: dict[str, int] = {}  # worker -> prompt blocks sent and not completed
        self._orphans: list[str] = []  # held for a worker that left: released at the next call
        self.held_total = 0  # requests ever held (for reports)
        self.overdue_total = 0  # of which sent by the bound rather than by room
        self.hold_s = 0.0  # seconds they waited here, in all

    @property
    def held(self) -> int:
        return len(self._held) + len(self._orphans)

    def sent_blocks(self, worker_id: str) -> int:
        return self._sent_blocks.get(worker_id, 0)

    # --- workers

    def set_capacity(self, worker_id: str, blocks: int) -> None:
        self._capacity[worker_id] = max(0, blocks)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker; its held requests are released by the next `release` (their sends then
        fail over, as to any worker that left)."""
        self._capacity.pop(worker_id, None)
        self._sent_blocks.pop(worker_id, None)
        for request_id in [r for r, held in self._held.items() if held.worker_id == worker_id]:
            del self._held[request_id]
            self._orphans.append(request_id)
        for request_id in [r for r, sent in self._sent.items() if sent.worker_id == worker_id]:
            del self._sent[request_id]

    # --- requests

    def offer(self, request_id: str, worker_id: str, blocks: int, now: float) -> bool:
        """True: send the request now. False: it waits until `release` returns its id."""
        if self._fits(worker_id, blocks) or len(self._held) >= self.max_held:
            self._send(request_id, worker_id, blocks, now)
            return True
        self._held[request_id] = _Request(worker_id, blocks, now)
        self.held_total += 1
        return False

    def release(self, now: float) -> list[str]:
        """The held requests to send now, oldest first: each that fits in its worker's room beside what
        is sent (those released before it included), and each past the bound."""
        released, self._orphans = self._orphans, []
        for request_id, held in list(self._held.items()):
            if not self._fits(held.worker_id, held.blocks):
                if held.at + self.max_hold_s > now:
                    continue
                self.overdue_total += 1
            self.hold_s += now - held.at
            del self._held[request_id]
            self._send(request_id, held.worker_id, held.blocks, now)
            released.append(request_id)
        return released

    def force(self, request_id: str, now: float) -> None:
        """Send a held request now, whatever the room (as the bound would)."""
        held = self._held.pop(request_id, None)
        if held is not None:
            self.overdue_total += 1
            self.hold_s += now - held.at
            self._send(request_id, held.worker_id, held.blocks, now)

    def done(self, request_id: str) -> None:
        """The request completed (or failed, or will not be sent): its room is free."""
        sent = self._sent.pop(request_id, None)
        if sent is not None:
            self._sent_blocks[sent.worker_id] = self._sent_blocks.get(sent.worker_id, 0) - sent.blocks
        elif self._held.pop(request_id, None) is None and request_id in self._orphans:
            self._orphans.remove(request_id)

    def next_deadline(self) -> float | None:
        """When `release` sends something by the bound if nothing completes before; None: none held."""
        if self._orphans:
            return float("-inf")
        first = next(iter(self._held.values()), None)  # the oldest: dicts keep insertion order
        return None if first is None else first.at + self.max_hold_s

    def expire(self, now: float, ttl_s: float) -> None:
        """Forget sent requests whose completion never came (a caller that lost it) after the TTL."""
        sent = self._sent
        while sent:
            request_id, oldest = next(iter(sent.items()))
            if oldest.at + ttl_s > now:
                return
            self.done(request_id)

    def _fits(self, worker_id: str, blocks: int) -> bool:
        sent = self._sent_blocks.get(worker_id, 0)
        capacity = self._capacity.get(worker_id, 0)
        return sent <= 0 or capacity <= 0 or sent + blocks <= capacity

    def _send(self, request_id: str, worker_id: str, blocks: int, now: float) -> None:
        if request_id in self._sent:
            self.done(request_id)  # a reused id: the old one is over
        elif len(self._sent) >= self.max_sent:
            self.done(next(iter(self._sent)))  # bounded: the oldest goes first
        self._sent[request_id] = _Request(worker_id, blocks, now)
        self._sent_blocks[worker_id] = self._sent_blocks.get(worker_id, 0) + blocks
