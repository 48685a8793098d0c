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

With `backfill` (EASY backfilling, as batch schedulers such as Slurm's backfill plugin run it), the
oldest held request of a worker (its head) reserves that worker: the router predicts when enough of
the sent requests will have completed for it to fit (each sent request's expected duration, given by
the caller, from its send; one already past it counts as completing now), and a request that fits
now is sent past the head only if it is expected to complete before then, or fits beside the head
even then. Otherwise it waits behind the head, so that a stream of smaller requests no longer delays
a giant prompt until the bound, while those that cost the giant nothing still pass it. A request with
no expected duration passes only by fitting beside the head.

Pure logic, times passed in; the gateway and the simulator drive it through `Router.room_offer`,
`Router.release_rooms`, `Router.rooms_deadline`, `Router.send_room_now` and `Router.cancel_room`;
`Router.on_complete` frees a request's room.
"""

from __future__ import annotations

from router.hold_stats import HoldStats


class _Request:
    __slots__ = ("at", "blocks", "expected_s", "worker_id")

    def __init__(self, worker_id: str, blocks: int, at: float, expected_s: float | None) -> None:
        self.worker_id = worker_id
        self.blocks = blocks
        self.at = at  # when it was held, or sent
        self.expected_s = expected_s  # how long it is expected to run once sent (None: unknown)


class _Reservation:
    """A worker's head: the time its held request is expected to fit, and the blocks spare beside it
    then (each request sent past it before that time, or into those spare blocks, delays it not)."""

    __slots__ = ("spare", "start")

    def __init__(self, start: float, spare: int) -> None:
        self.start = start
        self.spare = spare


class RoomQueue:
    def __init__(
        self, max_hold_s: float, max_held: int, max_sent: int = 1 << 17, backfill: bool = False
    ) -> None:
        if max_hold_s < 0 or max_held < 0 or max_sent < 1:
            raise ValueError("need room_max_hold_s >= 0, room_max_held >= 0 and max_sent >= 1")
        self.max_hold_s = max_hold_s
        self.max_held = max_held
        self.max_sent = max_sent
        self.backfill = backfill
        self._capacity: dict[str, int] = {}  # worker -> device blocks
        self._held: dict[str, _Request] = {}  # request id -> held request, in arrival order
        self._sent: dict[str, _Request] = {}  # request id -> sent and not completed, in sending order
        self._sent_blocks: dict[str, int] = {}  # worker -> prompt blocks sent and not completed
        self._orphans: list[str] = []  # held for a worker that left: released at the next call
        # overdue: sent by the bound rather than by room; a worker's leaving releases its held requests
        # unrecorded (they are counted held, never released)
        self.stats = HoldStats()

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

    def offer(
        self, request_id: str, worker_id: str, blocks: int, now: float, expected_s: float | None = None
    ) -> bool:
        """True: send the request now. False: it waits until `release` returns its id. `expected_s`:
        how long it is expected to run once sent (read with `backfill` only)."""
        request = _Request(worker_id, blocks, now, expected_s)
        fits = self._fits(worker_id, blocks)
        if fits and self.backfill:
            head = next((h for h in self._held.values() if h.worker_id == worker_id), None)
            fits = head is None or self._backfills(request, self._reserve(head, now), now)
        if fits or len(self._held) >= self.max_held:
            self._send(request_id, request, now)
            return True
        self._held[request_id] = request
        self.stats.record_hold()
        return False

    def release(self, now: float) -> list[str]:
        """The held requests to send now, oldest first: each that fits in its worker's room beside what
        is sent (those released before it included), and each past the bound. With `backfill`, one
        held behind its worker's head only if it delays the head not."""
        released, self._orphans = self._orphans, []
        heads: dict[str, _Reservation] = {}  # with backfill: worker -> its head's reservation
        for request_id, held in list(self._held.items()):
            overdue = False
            if held.at + self.max_hold_s <= now:
                overdue = not self._fits(held.worker_id, held.blocks)  # past the bound and no room yet
            elif not self._fits(held.worker_id, held.blocks):
                if self.backfill and held.worker_id not in heads:
                    heads[held.worker_id] = self._reserve(held, now)
                continue
            elif held.worker_id in heads and not self._backfills(held, heads[held.worker_id], now):
                continue
            self.stats.record_release(now - held.at, overdue)
            del self._held[request_id]
            self._send(request_id, held, now)
            released.append(request_id)
        return released

    def force(self, request_id: str, now: float) -> None:
        """Send a held request now, whatever the room (as the bound would)."""
        held = self._held.pop(request_id, None)
        if held is not None:
            self.stats.record_release(now - held.at, overdue=True)
            self._send(request_id, held, now)

    def sent_at(self, request_id: str) -> float | None:
        """When a request not completed yet was sent (None: it was not, or is forgotten)."""
        sent = self._sent.get(request_id)
        return None if sent is None else sent.at

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

    def _reserve(self, head: _Request, now: float) -> _Reservation:
        """When `head` is expected to fit on its worker, taking the sent requests' expected completions
        in order (those of unknown duration last), and the blocks spare beside it then."""
        worker_id = head.worker_id
        capacity = self._capacity.get(worker_id, 0)
        running = self._sent_blocks.get(worker_id, 0)
        ends = sorted(
            (float("inf") if s.expected_s is None else max(now, s.at + s.expected_s), s.blocks)
            for s in self._sent.values()
            if s.worker_id == worker_id
        )
        start = now
        for end, blocks in ends:
            if running <= 0 or running + head.blocks <= capacity:
                break
            start = end
            running -= blocks
        return _Reservation(start, max(0, capacity - running - head.blocks))

    @staticmethod
    def _backfills(request: _Request, head: _Reservation, now: float) -> bool:
        """Whether a request that fits now delays its worker's head not (and if so, take its room)."""
        if request.expected_s is not None and now + request.expected_s <= head.start < float("inf"):
            return True
        if request.blocks <= head.spare:
            head.spare -= request.blocks
            return True
        return False

    def _send(self, request_id: str, request: _Request, now: float) -> None:
        if request_id in self._sent:
            self.done(request_id)  # a reused id: the old one is over
        elif len(self._sent) >= self.max_sent:
            self.done(next(iter(self._sent)))  # bounded: the oldest goes first
        request.at = now
        self._sent[request_id] = request
        self._sent_blocks[request.worker_id] = self._sent_blocks.get(request.worker_id, 0) + request.blocks
