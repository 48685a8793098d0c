"""The `Router` facade: the one object the gateway (live) and the simulator (virtual time) both drive.

It owns the block index (event-fed, plus the approximate one for workers without events), the load view,
the session table and one policy. Pure logic: every method takes the current time `now` (seconds,
monotonic) instead of reading a clock, and nothing here does I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Container, Sequence

import xxhash

from router.admission import SessionAdmission
from router.approx_index import ApproxIndex
from router.config import RouterConfig
from router.dynamo_queue import DynamoQueue
from router.hashing import DEFAULT_BLOCK_SIZE
from router.hold_stats import HoldStats
from router.index import BlockIndex
from router.load import InFlight, LoadView
from router.memory_hold import MemoryHold
from router.overload_queue import OverloadQueue
from router.policies import POLICIES, Policy, RouterView
from router.policies.kv_overlap import KvOverlap
from router.protocol import KvEventBatch, KvStateDump, LoadReport, PinHint, WorkerRegistration
from router.request import INFERRED_SESSION_PREFIXES, Decision, RouteRequest, is_one_shot
from router.room import RoomQueue
from router.running_slices import RunningSlices
from router.sessions import Session, SessionTable

__all__ = ["NoWorkerError", "Router", "RouterConfig"]

# the policies whose sessions get pin hints (the baselines are other systems' routing rules: none of
# them pins; RouterConfig.pin_baselines gives them the same pinning engine, the "same engine" ablation)
PINNING_POLICIES = frozenset({"session_kv"})
# the policies that hold sessions at their tool boundary under memory pressure (the baselines are other
# systems' routing rules: they admit everything)
ADMITTING_POLICIES = frozenset({"session_kv"})
# the policies whose picks wait at the router while their worker has no KV room (router/room.py; the
# baselines send at once, as the systems they are named after do by default)
ROOM_POLICIES = frozenset({"session_kv"})
# the policies that send a turn's decode apart from its prompt, at a priority every prompt outranks, to an
# engine that schedules by priority (RouterConfig.yield_decodes; the baselines send one request)
YIELDING_POLICIES = frozenset({"session_kv"})


class _Queued:
    """A request in Dynamo's router queue: what its pick needs once released."""

    __slots__ = ("at", "overlap", "request")

    def __init__(self, request: RouteRequest, overlap: dict[str, int], at: float) -> None:
        self.request = request
        self.overlap = overlap  # as read at enqueue: Dynamo scores a released request with it
        self.at = at


def _ewma(mean: float | None, sample: float, alpha: float) -> float:
    """An exponentially weighted mean moved by `sample` (weight `alpha`); the first sample starts it."""
    return sample if mean is None else alpha * sample + (1 - alpha) * mean


class _HeldWith:
    """The held picks and one more (a pick being offered: recorded in the load, not at its worker)."""

    __slots__ = ("held", "request_id")

    def __init__(self, held: Container[str], request_id: str) -> None:
        self.held = held
        self.request_id = request_id

    def __contains__(self, request_id: object) -> bool:
        return request_id == self.request_id or request_id in self.held


class NoWorkerError(LookupError):
    """No routable worker is left for a request (none registered, or all excluded)."""


# Batches kept per worker while its state dump is awaited (a round trip: far fewer in practice).
_PENDING_BATCHES_MAX = 4096


class _Stream:
    """Where a worker's KV event stream stands: its process epoch and the last batch applied.

    While a state dump is awaited, the batches applied meanwhile are kept (`pending`): the dump may
    describe an older point of the stream than they do, and must not undo them.
    """

    __slots__ = ("epoch", "overflowed", "pending", "seq")

    def __init__(self, epoch: int, seq: int) -> None:
        self.epoch = epoch
        self.seq = seq
        self.pending: list[KvEventBatch] | None = None
        self.overflowed = False

    def keep(self, batch: KvEventBatch, limit: int) -> None:
        if self.pending is None:
            return
        if len(self.pending) >= limit:
            self.overflowed = True
            self.pending.clear()
        else:
            self.pending.append(batch)


class Router:
    def __init__(
        self,
        policy: str = "session_kv",
        config: RouterConfig | None = None,
        seed: int = 0,
        splits_turns: bool = False,
    ) -> None:
        """`splits_turns`: the caller can send a turn's decode apart from its prompt
        (`decode_priority`), on workers that return token ids (joining the two answers needs the first
        token's id, which a plain OpenAI stream does not carry): the simulator, and the gateway unless
        told not to (gateway/split_turn.py)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.config = config = config or RouterConfig()
        self.policy_name = policy
        self.policy: Policy = POLICIES[policy](config, random.Random(seed))
        self.index = BlockIndex()
        self.approx = ApproxIndex(config.approx_ttl_s, config.approx_blocks_per_worker)
        self.load = LoadView(config)
        self.sessions = SessionTable(config.max_sessions, config.session_ttl_s, config.max_session_bytes)
        self.block_size = DEFAULT_BLOCK_SIZE
        self._registrations: dict[str, WorkerRegistration] = {}
        self._by_model: dict[str, list[str]] = {}
        self._streams: dict[str, _Stream] = {}
        self._anon = 0
        self._pins = config.pin_baselines or policy in PINNING_POLICIES
        self._yields = splits_turns and config.yield_decodes and policy in YIELDING_POLICIES
        self._splitting: frozenset[str] = frozenset()  # workers where this router sends decodes apart
        # the decode slices in flight, where a prompt that does not fit may have them cut
        self.slices = (
            RunningSlices(config.max_running_slices, config.cut_queued_slices) if config.cut_slices else None
        )
        self._yielding: frozenset[str] = frozenset()  # of which those whose decodes yield to prompts
        # as the policy sees them: also those whose decode slices the gateway cuts for prompts
        self._yield_view: frozenset[str] = frozenset()
        self.admission: SessionAdmission | None = None
        if config.session_admission and policy in ADMITTING_POLICIES:
            self.admission = SessionAdmission(
                config.admission_fill,
                config.admission_max_hold_s,
                config.admission_max_held,
                config.admission_yield,
            )
        self.overload: OverloadQueue | None = None
        if config.overload_queue and self.admission is None and policy in ADMITTING_POLICIES:
            self.overload = OverloadQueue(
                config.overload_max_hold_s,
                config.overload_max_held,
                not config.overload_fcfs,
                config.overload_busy_memory,
                config.overload_busy_tokens,
            )
        self.kv_queue: DynamoQueue | None = None
        self._queued: dict[str, _Queued] = {}
        self._released: dict[str, Decision] = {}  # released by the queue, picked there, not yet asked
        if config.kv_queue and isinstance(self.policy, KvOverlap):
            self.kv_queue = DynamoQueue(
                config.kv_queue_threshold, config.kv_queue_wspt, config.kv_queue_recheck_s
            )
        self.rooms: RoomQueue | None = None
        if config.room_hold and policy in ROOM_POLICIES:
            self.rooms = RoomQueue(
                config.room_max_hold_s, config.room_max_held, config.max_inflight, config.room_backfill
            )
        self._turn_s: float | None = None  # EWMA of all turns' run times (room backfill, new sessions)
        self.memory_hold: MemoryHold | None = None
        # the room queue, an explicit opt-in, holds in its place
        if config.memory_hold and self.rooms is None and policy in ROOM_POLICIES:
            self.memory_hold = MemoryHold(
                config.memory_hold_max_s,
                config.memory_hold_max_held,
                config.memory_hold_recheck_s,
                config.memory_hold_min_wait_ms,
                config.memory_hold_crowded_max_s,
                config.memory_hold_shortest_first,
            )

    # --- workers

    def add_worker(self, registration: WorkerRegistration, now: float) -> None:
        """Register (or refresh) a worker; a new epoch means it restarted, so its old blocks are gone."""
        wid = registration.worker_id
        old = self._registrations.get(wid)
        changed = old is not None and (
            old.epoch != registration.epoch or old.publishes_events != registration.publishes_events
        )
        if changed:
            self.remove_worker(wid)
            old = None
        self._registrations[wid] = registration
        yields = registration.priority_threshold >= 0 and registration.returns_token_ids
        # first come first served: the decode part queues behind the prompts sent before it, and finds
        # its blocks again where a host tier took them when the prompts it let in evicted them
        fcfs_splits = self.config.split_fcfs and registration.host_blocks > 0
        splits = registration.returns_token_ids and (yields or fcfs_splits)
        if self._yields and (wid in self._yielding) != yields:
            self._yielding = self._yielding ^ {wid}
        if self._yields and (wid in self._splitting) != splits:
            self._splitting = self._splitting ^ {wid}
        self._yield_view = self._decodes_yield_to_prompts()
        if old is not None:
            return
        self.block_size = registration.block_size
        if registration.publishes_events:
            claimed = self.config.index_blocks_per_worker_factor * registration.num_blocks
            limit = min(
                max(self.config.index_blocks_per_worker_min, claimed),
                self.config.index_blocks_per_worker_max,
            )
            self.index.add_worker(wid, limit)
        else:
            self.approx.add_worker(wid)
        self.load.add_worker(wid)
        if self.rooms is not None:
            self.rooms.set_capacity(wid, registration.num_blocks)
        if self.memory_hold is not None:
            self.memory_hold.changed_all()  # the pool's decode pace, where a worker has none measured
        self._workers_changed()

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker and everything it held."""
        self._registrations.pop(worker_id, None)
        self._yielding = self._yielding - {worker_id}
        self._splitting = self._splitting - {worker_id}
        self._yield_view = self._decodes_yield_to_prompts()
        if self.slices is not None:
            self.slices.remove_worker(worker_id)
        self._streams.pop(worker_id, None)
        self.index.remove_worker(worker_id)
        self.approx.remove_worker(worker_id)
        self.load.remove_worker(worker_id)
        self.policy.remove_worker(worker_id)
        if self.rooms is not None:
            self.rooms.remove_worker(worker_id)
        if self.memory_hold is not None:
            self.memory_hold.changed_all()  # its held picks fail over; the pool's decode pace moved
        self._workers_changed()

    def workers(self) -> list[str]:
        """Ids routable now, in registration order."""
        return list(self._registrations)

    def _workers_changed(self) -> None:
        if self.admission is not None:
            self.admission.set_capacity(sum(r.num_blocks for r in self._registrations.values()))
        by_model: dict[str, list[str]] = {}
        for wid, reg in self._registrations.items():
            by_model.setdefault(reg.model, []).append(wid)
        self._by_model = by_model
        self.policy.on_workers_changed(self.workers())

    # --- bus input

    def apply_kv_batch(self, batch: KvEventBatch, now: float) -> bool:
        """Apply one batch of KV events; False when the router needs the worker's state dump.

        That is: a gap in the sequence (or a first batch that is not the stream's start), a new process
        epoch that did not start at 0, or a worker past its block bound (its blocks were dropped).
        Duplicates and batches of an older epoch are ignored.
        """
        wid = batch.worker_id
        if self.approx.has_worker(wid):
            return True  # registered as silent: its blocks are tracked approximately
        if not self.index.has_worker(wid):
            return True  # not registered (yet): its registration starts the stream afresh
        stream = self._streams.get(wid)
        in_order = True
        if stream is None or batch.epoch > stream.epoch:
            if stream is not None:
                self.index.clear_worker(wid)
            in_order = batch.seq == 0
            stream = self._streams[wid] = _Stream(batch.epoch, batch.seq)
        elif batch.epoch < stream.epoch or batch.seq <= stream.seq:
            return True
        else:
            in_order = batch.seq == stream.seq + 1
            stream.seq = batch.seq
        ok = self.index.apply(wid, batch.events) and in_order
        if not ok and stream.pending is None:
            stream.pending = []  # a dump will be asked for: keep what it may not include
        stream.keep(batch, _PENDING_BATCHES_MAX)
        return ok

    def expect_dump(self, worker_id: str) -> None:
        """A state dump of this worker was asked for: keep the batches applied until it arrives."""
        stream = self._streams.get(worker_id)
        if stream is not None and stream.pending is None:
            stream.pending = []

    def apply_state_dump(self, dump: KvStateDump, now: float) -> bool:
        """Replace a worker's blocks with its full list (the answer to a gap), then re-apply the batches
        that arrived while it was awaited and are newer than it. False when those were too many to keep
        (ask for another dump)."""
        wid = dump.worker_id
        if self.approx.has_worker(wid) or not self.index.has_worker(wid):
            return True
        stream = self._streams.get(wid)
        if stream is not None and dump.epoch < stream.epoch:
            return True
        same = stream if stream is not None and stream.epoch == dump.epoch else None
        later = [b for b in (same.pending or ()) if b.seq > dump.seq] if same is not None else []
        ok = self.index.load_dump(wid, dump.blocks) and not (same is not None and same.overflowed)
        for batch in later:
            ok = self.index.apply(wid, batch.events) and ok
        seq = max(dump.seq, same.seq) if same is not None else dump.seq
        self._streams[wid] = _Stream(dump.epoch, seq)
        return ok

    def apply_load(self, report: LoadReport, now: float) -> None:
        hold = self.memory_hold
        if hold is None:
            self.load.apply(report, now)
            return
        wid = report.worker_id
        self.load.apply(report, now, hold.on(wid))  # the held picks: still to come, after this report
        hold.changed(wid)

    def stream_positions(self) -> dict[str, tuple[int, int]]:
        """(epoch, seq) of the last KV batch or state dump applied, per event-fed worker (snapshots)."""
        return {wid: (s.epoch, s.seq) for wid, s in self._streams.items()}

    # --- sessions

    def resolve_session(self, explicit_id: str | None, block_hashes: Sequence[int]) -> str:
        """The request's session: the explicit id, else the known session whose prompt this one extends,
        else a new id derived from the prompt."""
        if explicit_id:
            if len(explicit_id) > self.config.max_session_id_len:  # bounded keys, same session every time
                return "h-" + xxhash.xxh3_128_hexdigest(explicit_id.encode())
            return explicit_id
        found = self.sessions.find_by_chain(block_hashes)
        if found is not None:
            return found
        if block_hashes:
            return f"{INFERRED_SESSION_PREFIXES[0]}{block_hashes[-1]:016x}"
        self._anon += 1  # shorter than one block: nothing to recognise it by next time
        return f"{INFERRED_SESSION_PREFIXES[1]}{self._anon}"

    # --- admission (session_kv: router/admission.py)

    def admit(self, request: RouteRequest, now: float) -> bool:
        """True: pick the request now. False: its session is held (the pool's KV is full of resident
        sessions, and its context is not cached already); pick it once `release_held` returns its id.
        Requests without a session, and every request under a policy without admission, pass at once."""
        adm = self.admission
        sid = request.session_id
        if self.kv_queue is not None:
            return self._kv_queue_offer(self.kv_queue, request, now)
        if adm is None and self.overload is not None:
            return self._overload_offer(self.overload, request, now)
        if adm is None or not sid:
            return True
        s = self.sessions.get(sid)
        blocks = -(-(request.num_tokens + request.expected_output_tokens) // self.block_size)
        tool_loop = request.tool_call_pending or (s is not None and s.tool_pending)
        attained = s.attained_tokens if s is not None else 0
        cached = False
        chain = request.block_hashes
        if chain and adm.pressed(sid, blocks, now):
            found = self.index.overlap(chain)
            if len(self.approx):
                found.update(self.approx.overlap(chain))
            best = max(found.values(), default=0)
            cached = best >= self.config.admission_cached_fraction * len(chain)
        return adm.offer(request.request_id, sid, blocks, tool_loop, attained, now, cached)

    def release_held(self, now: float) -> list[str]:
        """Ids of held requests to pick now (call after first tokens, completions and by
        `held_deadline`)."""
        if self.kv_queue is not None:
            return self._kv_queue_release(self.kv_queue, now)
        if self.overload is not None:
            return self.overload.release(self._free_workers(self.overload), now)
        return self.admission.release(now) if self.admission is not None else []

    def held_deadline(self) -> float | None:
        """When `release_held` should next be called if nothing completes before; None: nothing held."""
        if self.kv_queue is not None:
            return self.kv_queue.next_deadline()
        if self.overload is not None:
            return self.overload.next_deadline()
        return self.admission.next_deadline() if self.admission is not None else None

    def _overload_offer(self, queue: OverloadQueue, request: RouteRequest, now: float) -> bool:
        """The overload queue's test (router/overload_queue.py): a turn waits unpicked while every
        worker is busy, keyed by the prefill it would do where its prefix is cached deepest."""
        free = self._free_workers(queue)
        prefill = request.num_tokens
        if not free and request.block_hashes:
            found = self._overlap(request.block_hashes)
            prefill = max(0, prefill - max(found.values(), default=0) * self.block_size)
        return queue.offer(request.request_id, prefill, free, now)

    def _overlap(self, chain: Sequence[int]) -> dict[str, int]:
        """Device-tier matched prefix in blocks per worker, before a pick (the index's, and the
        approximate index's for silent workers; `RouterView.overlap` reads it so at the pick)."""
        found = self.index.overlap(chain)
        if len(self.approx):
            found.update(self.approx.overlap(chain))
        return found

    def _kv_queue_offer(self, queue: DynamoQueue, request: RouteRequest, now: float) -> bool:
        """Dynamo's router queue (router/dynamo_queue.py): the request's session binding is taken
        first (it pins the request, as in Dynamo), then it waits while its workers are all busy or any
        request waits; wspt keys it by the prefill it would do on its pinned worker, else the best."""
        kv = self._kv_policy()
        pinned = kv.affinity_target(request, now, self._registrations.__contains__)
        overlap = self._overlap(request.block_hashes) if request.block_hashes else {}
        pool = self._pool(request)
        workers = pool if pinned is None else (pinned,)
        matched = max((overlap.get(w, 0) for w in workers), default=0)
        cost = request.num_tokens - matched * self.block_size
        if queue.offer(request.request_id, pinned, cost, now, self._kv_busy_test(queue, pool)):
            return True
        self._queued[request.request_id] = _Queued(request, overlap, now)
        return False

    def _kv_queue_release(self, queue: DynamoQueue, now: float) -> list[str]:
        """Pick the queued requests Dynamo would release now, one at a time on the state each leaves
        (its prefill is booked before the next is tested); their picks are kept for `pick`."""
        released: list[str] = []
        busy = self._kv_busy_test(queue, None)
        refresh_s = self.config.kv_queue_refresh_after_s
        while (rid := queue.pop(now, busy)) is not None:
            entry = self._queued.pop(rid)
            overlap = entry.overlap if not refresh_s or now - entry.at < refresh_s else None
            self._released[rid] = self._pick(entry.request, now, frozenset(), overlap)
            released.append(rid)
        return released

    def _kv_busy_test(self, queue: DynamoQueue, pool: Sequence[str] | None) -> Callable[[str | None], bool]:
        """Dynamo's busy test: `worker` busy (a request pinned there), or None: every worker of `pool`
        (all registered when None) busy; a worker gone is not busy (its request is re-selected)."""
        kv = self._kv_policy()
        regs = self._registrations

        def busy(worker: str | None) -> bool:
            if worker is not None:
                reg = regs.get(worker)
                return reg is not None and queue.busy(kv.prefill_tokens(worker), reg.max_num_batched_tokens)
            workers = regs if pool is None else pool
            return bool(workers) and all(busy(w) for w in workers)

        return busy

    def _kv_policy(self) -> KvOverlap:
        assert isinstance(self.policy, KvOverlap)
        return self.policy

    def _free_workers(self, queue: OverloadQueue) -> int:
        """Workers that are not busy by the queue's measure: prefill in flight from this router over
        its threshold, or a pick held there for device memory."""
        if queue.memory_busy:
            held = self.memory_hold.workers() if self.memory_hold is not None else frozenset()
            return sum(1 for wid in self._registrations if wid not in held)
        workers = self.load.workers
        limit = queue.threshold_tokens
        return sum(1 for wid in self._registrations if workers[wid].inflight_prefill <= limit)

    def cancel_held(self, request_id: str, session_id: str | None, now: float) -> None:
        """The caller gives up on an admitted or held request before picking it (client gone, timeout):
        forget it, or hand back the residency its release gave it."""
        if self.overload is not None:
            self.overload.cancel(request_id)
        if self.kv_queue is not None:
            self._kv_queue_cancel(self.kv_queue, request_id, now)
        adm = self.admission
        if adm is not None and session_id and not adm.cancel(request_id):
            adm.done(session_id, float("-inf"), now)

    def _kv_queue_cancel(self, queue: DynamoQueue, request_id: str, now: float) -> None:
        """A request leaves Dynamo's queue unpicked, or gives back the pick its release made."""
        if queue.cancel(request_id):
            self._queued.pop(request_id, None)
            self.policy.on_end(request_id, now)  # the session binding's lease it took
        elif request_id in self._released:
            self._unpick(request_id, now)

    def _unpick(self, request_id: str, now: float) -> None:
        """Undo a pick made at a release that its caller did not take (it excluded that worker, or
        gave up): its predicted load and the policy's tracking go."""
        del self._released[request_id]
        self.load.finish(request_id)
        self.policy.on_complete(request_id)
        self.policy.on_end(request_id, now)

    # --- room (session_kv: router/room.py)

    def room_offer(self, request: RouteRequest, decision: Decision, now: float) -> bool:
        """After `pick`: True, send the request to its worker now. False: the worker has no KV room for
        its prompt; send it once `release_rooms` returns its id (every request passes under other
        policies). Either way `on_complete` ends it."""
        hold = self.memory_hold
        # where this router splits turns, prompts get memory first already (the decode parts queue
        # behind them): a hold there only delayed them (cc trace, host tier 4x: 894 -> 1,104 ms)
        if hold is not None and decision.worker_id not in self._splitting:
            rid, worker, chain = request.request_id, decision.worker_id, request.block_hashes
            wait_ms = self._memory_wait(chain, worker, now, _HeldWith(hold, rid))
            if not hold.offer(rid, worker, chain, wait_ms, now):
                return False
            hold.changed(worker)  # a request sent there: its prefix may be one a held pick shares
            return True
        rooms = self.rooms
        if rooms is None:
            return True
        blocks = -(-request.num_tokens // self.block_size)
        session = self.sessions.get(request.session_id) if request.session_id else None
        expected = session.turn_s if session is not None and session.turn_s is not None else self._turn_s
        return rooms.offer(request.request_id, decision.worker_id, blocks, now, expected)

    def hold_stats(self) -> dict[str, HoldStats]:
        """The counts of each hold this router runs, by name (none where the config runs none)."""
        holds = {
            "session_admission": self.admission,
            "overload_queue": self.overload,
            "kv_queue": self.kv_queue,
            "room": self.rooms,
            "memory": self.memory_hold,
        }
        return {name: hold.stats for name, hold in holds.items() if hold is not None}

    def release_rooms(self, now: float) -> list[str]:
        """Ids of requests held for room to send now (call after completions, at `rooms_deadline`, and
        where `rechecks_rooms_on_change`, after load reports and first tokens too)."""
        if self.memory_hold is not None:
            return self._release_memory_hold(self.memory_hold, now)
        return self.rooms.release(now) if self.rooms is not None else []

    @property
    def rechecks_rooms_on_change(self) -> bool:
        """Whether held picks wait for their worker's load reports and first tokens to be re-checked
        (the memory hold without a period): the caller calls `release_rooms` after those as well."""
        hold = self.memory_hold
        return hold is not None and not hold.recheck_s

    def rooms_pending(self) -> bool:
        """Whether a `release_rooms` call now would re-check a held pick (something changed on its
        worker): a caller that batches its calls can skip one that would find nothing to do."""
        hold = self.memory_hold
        return hold is not None and (hold.pending or bool(hold.recheck_s and hold.held))

    def rooms_deadline(self) -> float | None:
        """When `release_rooms` should next be called if nothing completes before; None: none held."""
        hold = self.memory_hold
        if hold is not None:
            deadline = hold.next_deadline()
            if deadline is None or hold.recheck_s:
                return deadline
            # a held pick's worker whose report goes stale: its wait is no longer predicted (0)
            loads = self.load.workers
            for wid in hold.workers():
                wl = loads.get(wid)
                if wl is not None and wl.fresh_until < deadline:
                    deadline = math.nextafter(wl.fresh_until, math.inf)
            return deadline
        return self.rooms.next_deadline() if self.rooms is not None else None

    def send_room_now(self, request_id: str, now: float) -> None:
        """A request held for room is sent before its release (its caller's own bound passed)."""
        if self.memory_hold is not None and self.memory_hold.send(request_id, now, overdue=True):
            self.load.resend(request_id, now)
        if self.rooms is not None:
            self.rooms.force(request_id, now)

    def cancel_room(self, request_id: str) -> None:
        """A request held for room will not be sent (its client went away): forget it. Its pick is
        still to be closed by `on_complete`, as any pick is."""
        if self.memory_hold is not None:
            self.memory_hold.done(request_id)
        if self.rooms is not None:
            self.rooms.done(request_id)

    def _release_memory_hold(self, hold: MemoryHold, now: float) -> list[str]:
        """The held picks to send now, oldest first, of those due a re-check (their worker's state
        changed, or their bound passed): each whose worker left (it fails over), whose predicted wait
        there is short enough now (those sent before it in this pass counted ahead of it), or whose
        bound passed (with `memory_hold_shortest_first`, after the shorter ones held for its worker)."""
        if not hold.recheck_s:
            loads = self.load.workers
            for wid in list(hold.workers()):  # a report gone stale: no wait predicted there now
                wl = loads.get(wid)
                if wl is None or now > wl.fresh_until:
                    hold.changed(wid)
        released: list[str] = []
        # one prediction per worker, its requests walked once for all the picks held for it, until one
        # of them goes (then it is in flight there, ahead of the rest)
        waits: dict[str, Callable[[Sequence[int]], float]] = {}
        for rid, worker, chain in hold.due(now):
            if rid not in hold:
                continue  # sent in this pass already, ahead of a longer pick whose bound passed
            overdue = hold.overdue(rid, now)
            reg = self._registrations.get(worker)
            if reg is not None and not overdue:
                wait = waits.get(worker)
                if wait is None:
                    view = self._hold_view(reg.block_size, now, hold)
                    wait = waits[worker] = self.policy.memory_waits(worker, view)
                if wait(chain) > hold.min_wait_ms:
                    continue
            for sent in hold.with_shorter(rid) if overdue else [rid]:
                hold.send(sent, now, overdue)
                self.load.resend(sent, now)
                released.append(sent)
            waits.pop(worker, None)
        hold.checked(now)
        return released

    def _hold_view(self, block_size: int, now: float, held: Container[str]) -> RouterView:
        workers = list(self._registrations)
        return RouterView(
            workers, self.index, self.approx, self.load, None, block_size, now, None, self._yield_view, held
        )

    def _memory_wait(self, chain: Sequence[int], worker_id: str, now: float, held: Container[str]) -> float:
        """The policy's predicted wait for device memory of a prompt of `chain` on `worker_id` (ms), the
        picks in `held` not counted at the worker."""
        reg = self._registrations.get(worker_id)
        if reg is None:
            return 0.0
        return self.policy.memory_wait_ms(chain, worker_id, self._hold_view(reg.block_size, now, held))

    # --- routing

    def pick(self, request: RouteRequest, now: float, exclude: frozenset[str] = frozenset()) -> Decision:
        """Choose a worker and record the prediction (in-flight load, session, approximate blocks).

        Workers serving `request.model` are the candidates (every worker when none names that model).
        Raises `NoWorkerError` when no candidate is left.
        """
        released = self._released.get(request.request_id)
        if released is not None:  # picked when Dynamo's queue released it
            if released.worker_id not in exclude and released.worker_id in self._registrations:
                del self._released[request.request_id]
                return released
            self._unpick(request.request_id, now)
        return self._pick(request, now, exclude)

    def _pool(self, request: RouteRequest) -> list[str]:
        """The workers serving the request's model (every worker when none names it)."""
        return self._by_model.get(request.model) or list(self._registrations)

    def _pick(
        self,
        request: RouteRequest,
        now: float,
        exclude: frozenset[str],
        overlap: dict[str, int] | None = None,
    ) -> Decision:
        """`pick`, with the overlap read earlier where given (a request Dynamo's queue held)."""
        pool = self._pool(request)
        candidates = [w for w in pool if w not in exclude] if exclude else pool
        if not candidates:
            raise NoWorkerError(f"no routable worker for model {request.model!r}")
        sid = request.session_id
        session = self.sessions.get(sid) if sid else None
        parent = self._parent(request) if session is None or session.turns == 0 else None
        bs = self._registrations[candidates[0]].block_size  # the gateway hashed with a candidate's size
        hold = self.memory_hold
        held: Container[str] = hold if hold is not None else frozenset()
        held_for: Collection[str] = hold.workers() if hold is not None else frozenset()
        view = RouterView(
            candidates,
            self.index,
            self.approx,
            self.load,
            session,
            bs,
            now,
            parent,
            self._yield_view,
            held,
            held_for,
        )
        if overlap is not None:
            view.preset_overlap(overlap)
        decision = self.policy.pick(request, view)
        self._record(request, decision, now)
        if self.overload is not None:
            self.overload.picked(request.request_id)
        return decision

    def _parent(self, request: RouteRequest) -> Session | None:
        """A new session's parent: the one named, else the session whose latest prompt its first prompt
        extends (a sub-agent forked with its parent's context)."""
        pid = request.parent_session_id
        if pid is None and request.session_id and request.block_hashes:
            pid = self.sessions.find_by_chain(request.block_hashes)
        if pid is None or pid == request.session_id:
            return None
        return self.sessions.get(pid)

    def record(self, request: RouteRequest, decision: Decision, now: float) -> bool:
        """Record a pick another gateway replica made (its in-flight load, its session's worker and
        chain), as `pick` records its own; False when the worker is not registered here."""
        if decision.worker_id not in self._registrations:
            return False
        self._record(request, decision, now)
        return True

    def _record(self, request: RouteRequest, decision: Decision, now: float) -> None:
        reg = self._registrations.get(decision.worker_id)
        bs = reg.block_size if reg is not None else self.block_size
        worker = decision.worker_id
        prefill = max(0, request.num_tokens - decision.overlap_blocks * bs)
        blocks = -(-(request.num_tokens + request.expected_output_tokens) // bs)
        self.load.start(request.request_id, worker, prefill, blocks, now, request.expected_output_tokens)
        sid = request.session_id
        one_shot = is_one_shot(sid, self.sessions.get(sid) if sid else None)
        self.policy.on_pick(request, decision, bs, now, one_shot)
        flight = self.load.get(request.request_id)
        if flight is not None:
            flight.session_id = request.session_id
            flight.tool_pending = request.tool_call_pending
        if self.approx.has_worker(worker):
            self.approx.insert(worker, request.block_hashes, now)
        if request.session_id:
            s = self.sessions.touch(request.session_id, now)
            if s.turns == 0 and s.parent_id is None:
                parent = self._parent(request)
                s.parent_id = parent.id if parent is not None else None
            if s.tool_pending and s.last_done_at is not None:  # the tool gap just ended: learn it
                gap = max(0.0, now - s.last_done_at)
                s.think_s = _ewma(s.think_s, gap, self.config.think_alpha)
            s.worker_id = worker
            self.sessions.set_chain(s, request.block_hashes)
            s.last_pick_at = now
            s.turns += 1
            s.attained_tokens += prefill
            s.tool_pending = False
            s.pinned_until = float("-inf")  # it came back: the pin did its job

    def _decodes_yield_to_prompts(self) -> frozenset[str]:
        """The workers where a prompt that does not fit does not wait for the running decodes, as the
        policies are told (`RouterView.yielding`): those whose engine preempts decodes for prompts and,
        where the gateway cuts decode slices for prompts (`cut_slices`, `cut_slices_yield`), those that
        get slices. There a turn keeps its session's worker even if it does not fit beside the running
        requests, and no wait for their memory is predicted (docs/TIERS.md, "Fourteenth pass")."""
        cfg = self.config
        if self.slices is None or not cfg.cut_slices_yield or cfg.decode_slice_tokens <= 0:
            return self._yielding
        return self._yielding | self._splitting

    @property
    def yielding_workers(self) -> frozenset[str]:
        """The workers the policies see as ones whose decodes yield to prompts (`RouterView.yielding`)."""
        return self._yield_view

    @property
    def yields_decodes(self) -> bool:
        """Whether this router sends turns' decodes apart anywhere (`decode_priority`) at all."""
        return self._yields

    def decode_priority(self, worker_id: str) -> int | None:
        """The priority of a turn's decode when it goes apart from its prompt, or None (one request).

        On a worker whose engine schedules by priority (its registration's `priority_threshold`), a
        `yield_decodes` policy sends a turn as its prompt with `max_tokens` 1 at the default priority
        (0), then, once the first token is out, the rest as a second request (the prompt and that
        token: a prefix hit) at this priority, which every prompt outranks by more than the threshold:
        a prompt that does not fit preempts decodes instead of waiting for them (docs/TIERS.md). With
        `split_fcfs`, on a first-come-first-served worker with a host tier, at the default priority
        (0): the decode part queues behind every prompt sent before it, so they get memory first."""
        if worker_id not in self._splitting:
            return None
        if worker_id not in self._yielding:
            return 0
        return -(self._registrations[worker_id].priority_threshold + 1)

    def decode_slice_tokens(self, worker_id: str) -> int:
        """The most output tokens one decode part of a split turn asks for on this worker (0: the whole
        rest in one part): `decode_slice_tokens` on a first-come-first-served worker that gets turns
        split (`split_fcfs`), where each slice queues behind the prompts sent before it, a preemption
        the gateway makes; 0 on a worker whose engine preempts decodes for prompts itself."""
        if worker_id not in self._splitting or worker_id in self._yielding:
            return 0
        return self.config.decode_slice_tokens

    def prefill_pieces(self, worker_id: str, chain: Sequence[int], num_tokens: int) -> list[int]:
        """The prompt lengths (tokens) of the pieces a prompt of `num_tokens` tokens (`chain` its full
        blocks) goes to `worker_id` in before its own part (`prefill_piece_tokens`): where decodes go
        there in slices and the tokens not held there (on the device or the host, by the index) exceed a
        piece, the held prefix plus one piece, plus two, ... while at least half a piece is left for the
        prompt part; else none. None either for a prompt the worker holds no room for at all: it is
        refused whole, and no piece of it is worth computing first."""
        piece = self.config.prefill_piece_tokens
        if piece <= 0 or not self.decode_slice_tokens(worker_id) or num_tokens <= piece:
            return []
        registration = self._registrations[worker_id]
        if num_tokens >= (registration.max_model_len or registration.num_blocks * registration.block_size):
            return []
        held = self._overlap(chain).get(worker_id, 0)
        held = max(held, self.index.reach(chain, "host").get(worker_id, 0))
        block_size = registration.block_size
        lengths: list[int] = []
        length = held * block_size + piece
        while length < num_tokens - piece // 2:
            lengths.append(length)
            length += piece
        return lengths

    def slice_sent(self, slice_id: str, worker_id: str, blocks: int) -> None:
        """A decode slice of a prompt of `blocks` blocks went to `worker_id` (`decode_slice_tokens`)."""
        if self.slices is not None:
            self.slices.sent(slice_id, worker_id, blocks)

    def slice_started(self, slice_id: str) -> None:
        """The slice's first token came: it runs there, holding its blocks, no longer queued."""
        if self.slices is not None:
            self.slices.started(slice_id)

    def slice_ended(self, slice_id: str) -> None:
        """The slice finished or failed: it holds no device room any more."""
        if self.slices is not None:
            self.slices.ended(slice_id)

    def slices_to_cut(self, worker_id: str, chain: Sequence[int], now: float) -> list[str]:
        """The slices to cut on `worker_id` for a prompt of `chain` just sent there (`cut_slices`; none
        where the worker gets no slices or its load report is stale): where the report says the prompt's
        blocks not on the device do not fit beside those in use, or that requests wait there, the slices
        still queued there (`cut_queued_slices`) and the newest running ones whose blocks cover the
        shortfall (at least one). The caller cuts them (each goes on as the next slice, queued behind
        the prompt) and they are forgotten here."""
        slices = self.slices
        if slices is None or not self.decode_slice_tokens(worker_id):
            return []
        wl = self.load.workers.get(worker_id)
        if wl is None or wl.report is None or now > wl.fresh_until:
            return []
        report = wl.report
        missing = len(chain) - self._overlap(chain).get(worker_id, 0)
        short = report.used_blocks + missing - report.total_blocks
        if short <= 0 and not report.waiting:
            return []
        return slices.to_cut(worker_id, max(short, 1))

    def on_first_token(self, request_id: str, now: float) -> None:
        self.load.first_token(request_id, now)
        self.policy.on_first_token(request_id)
        hold = self.memory_hold
        if hold is not None and (flight := self.load.get(request_id)) is not None:
            hold.changed(flight.worker_id)  # a prefill ended there: its queue and decodes moved

    def on_complete(
        self, request_id: str, now: float, finish_reason: str | None, output_tokens: int, ok: bool = True
    ) -> tuple[str, PinHint] | None:
        """Release the request's predicted load and update its session.

        Returns `(worker_id, PinHint)` when the session is expected back soon: the turn ended in a tool
        call (`finish_reason == "tool_calls"`, or the request said a tool call is pending). The pin lasts
        the session's expected tool time, bounded to [pin_min_s, pin_max_s].
        """
        flight = self.load.finish(request_id)
        if flight is not None:
            self.load.step_ended(flight.worker_id, now)
        self.policy.on_complete(request_id)
        self.policy.on_end(request_id, now)
        if self.rooms is not None:
            self._learn_turn_time(request_id, flight, now, ok)
            self.rooms.done(request_id)
        hold = self.memory_hold
        if hold is not None:
            hold.done(request_id)
            if flight is not None:
                hold.changed(flight.worker_id)  # its blocks are free there
        if flight is None or not flight.session_id:
            return None
        hint = self._session_done(flight, now, finish_reason, output_tokens, ok)
        if self.admission is not None:
            pinned_until = hint[1].ttl_s + now if hint is not None else float("-inf")
            self.admission.done(flight.session_id, pinned_until, now)
        return hint

    def _learn_turn_time(self, request_id: str, flight: InFlight | None, now: float, ok: bool) -> None:
        """A completed turn's run time (from its send) feeds its session's and the pool's estimates,
        which the room queue's backfill reads."""
        assert self.rooms is not None
        sent_at = self.rooms.sent_at(request_id)
        if sent_at is None or not ok:
            return
        run_s = max(0.0, now - sent_at)
        alpha = self.config.think_alpha
        self._turn_s = _ewma(self._turn_s, run_s, alpha)
        s = self.sessions.get(flight.session_id) if flight is not None and flight.session_id else None
        if s is not None:
            s.turn_s = _ewma(s.turn_s, run_s, alpha)

    def _session_done(
        self, flight: InFlight, now: float, finish_reason: str | None, output_tokens: int, ok: bool
    ) -> tuple[str, PinHint] | None:
        assert flight.session_id is not None
        s = self.sessions.get(flight.session_id)
        if s is None:
            return None
        if not ok and s.turns <= 1:  # its only turn failed (refused, say): keep nothing for it
            self.sessions.discard(s.id)
            return None
        s.attained_tokens += max(0, output_tokens)
        s.last_finish_reason = finish_reason
        s.last_done_at = now
        said_pending = flight.tool_pending and self.config.pin_on_tool_result
        s.tool_pending = ok and (finish_reason == "tool_calls" or said_pending)
        if not s.tool_pending or flight.worker_id not in self._registrations or not s.chain or not self._pins:
            return None
        cfg = self.config
        think = s.think_s if s.think_s is not None else cfg.think_default_s
        ttl = min(cfg.pin_max_s, max(cfg.pin_min_s, cfg.pin_factor * think))
        s.pinned_until = now + ttl
        prefetch_after = max(0.0, think - cfg.prefetch_lead_s) if cfg.host_prefetch else 0.0
        return flight.worker_id, PinHint(s.id, list(s.chain), ttl, cfg.host_keep_factor * ttl, prefetch_after)

    def expire(self, now: float) -> None:
        """Drop stale in-flight predictions, idle sessions, TTL'd approximate blocks, and sweep a slice of
        the blocks of dropped workers off the index."""
        self.load.expire(now)
        self.sessions.expire(now)
        self.approx.expire(now)
        self.policy.expire(now)
        if self.admission is not None:
            self.admission.expire(now, self.config.inflight_ttl_s)
        if self.rooms is not None:
            self.rooms.expire(now, self.config.inflight_ttl_s)
        self.index.sweep(self.config.sweep_entries_per_expire)
