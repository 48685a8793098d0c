"""One policy's replay of a workload: N simulated workers, the real router, a delayed bus.

The router is driven exactly as the gateway drives it (router.router.Router: resolve_session, pick,
on_first_token, on_complete, apply_kv_batch, apply_load, expire), in virtual time. KV events and load
reports reach it `bus_delay_s` after the worker produced them; a pin hint returned by `on_complete`
reaches the worker's engine (`Engine.pin`, as the worker applies one from the bus) after the same delay.
Load reports and KV batches (together half of all events) wait outside the event heap
(`EventLoop.defer_at`): every handler that calls the router settles the loop first, which applies the
ones due before it, in heap order. (A batch the router cannot apply, which this lossless bus never
produces, is answered with a state dump scheduled from there.)
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import msgspec

from engines.engine import EngineConfig, RequestOutput
from engines.mock import DEFAULT_HOST_BANDWIDTH_GBPS, TransferModel
from engines.onboarding import DEFAULT_ONBOARDING, Onboarding
from loadgen.sim.events import DeadlineTimer, EventLoop
from loadgen.sim.metrics import LoadSample, RequestRecord
from loadgen.sim.worker import SimWorker
from loadgen.sim.workload import Turn, Workload, parent_of
from router.protocol import KvEvent, KvEventBatch, KvStateDump, LoadReport
from router.request import RouteRequest
from router.router import Router  # the simulator drives the gateway's router, unchanged


def _same_load(a: LoadReport, b: LoadReport) -> bool:
    return (
        a.running,
        a.waiting,
        a.active_prefill_tokens,
        a.used_blocks,
        a.prefill_tok_s,
        a.decode_tok_s,
    ) == (b.running, b.waiting, b.active_prefill_tokens, b.used_blocks, b.prefill_tok_s, b.decode_tok_s)


# the trace's `stop` as the OpenAI finish_reason a worker would have streamed back
FINISH_REASONS = {"tool_use": "tool_calls", "end_turn": "stop"}


def answer_start(request_id: str) -> int:
    """Where a turn's answer starts in the mock's placeholder text when it is sent in parts: fixed per
    request (a replay is deterministic), different between requests, so two answers' tokens differ as
    a model's would (`SimWorker.submit`'s `answer`)."""
    return zlib.crc32(request_id.encode())


class SimConfig(msgspec.Struct, frozen=True):
    workers: int = 8
    num_blocks: int = 16_384
    block_size: int = 64
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_pinned_blocks: int | None = None  # the engine's default when None
    bus_delay_s: float = 0.005
    load_interval_s: float = 0.1
    # an idle worker whose state did not change reports only this often (0: every interval); what the
    # router sees is the same (a report stays fresh for RouterConfig.report_stale_s), the events fewer
    idle_report_s: float = 1.0
    expire_interval_s: float = 1.0
    load_sample_every: int = 10  # keep every n-th load report for the load-over-time chart
    fast_forward: bool = True  # take runs of pure decode steps as one event (same results)
    lazy_bus: bool = True  # apply load reports and KV batches at the next router call, not as events (same)
    stall_timeout_s: float = 3600.0  # virtual seconds without any output before in-flight work fails
    seed: int = 0
    session_admission: bool | None = None  # RouterConfig.session_admission when no router config is given
    host_blocks: int = 0  # each worker's host tier (0: none)
    host_bandwidth_gbps: float = DEFAULT_HOST_BANDWIDTH_GBPS  # the host link (engines/mock.py)
    pin_baselines: bool = False  # RouterConfig.pin_baselines (the "same engine" ablation), likewise
    # the router sees the trace's session ids (and a turn's tool-result mark, and a sub-agent's parent);
    # False: as a client that sends none (`kvgate loadgen --no-session-header`), it infers the sessions
    session_ids: bool = True
    preempt_for_prompts: bool = False  # EngineConfig.preempt_for_prompts, every worker's (every policy's)
    priority_scheduling: bool = False  # EngineConfig.priority_scheduling, likewise
    onboarding: Onboarding = DEFAULT_ONBOARDING  # EngineConfig.onboarding, likewise
    # further RouterConfig fields (name -> value) when no router config is given: sweeps from the CLI
    router_settings: dict[str, Any] = msgspec.field(default_factory=dict)

    def router_config(self) -> Any:
        """The RouterConfig these settings name (None: the router's defaults)."""
        from router.config import RouterConfig

        settings = dict(self.router_settings)
        if self.session_admission is not None:
            settings["session_admission"] = self.session_admission
        if self.pin_baselines:
            settings["pin_baselines"] = True
        return msgspec.convert(settings, RouterConfig, strict=False) if settings else None

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_pinned_blocks=self.max_pinned_blocks,
            host_blocks=self.host_blocks,
            preempt_for_prompts=self.preempt_for_prompts,
            priority_scheduling=self.priority_scheduling,
            onboarding=self.onboarding,
        )

    def transfer(self) -> TransferModel:
        return TransferModel(bandwidth_gbps=self.host_bandwidth_gbps)


class SimRun:
    """What one replay produced."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.records: list[RequestRecord] = []
        self.busy_s: dict[str, float] = {}
        self.load: list[LoadSample] = []
        self.steps = 0
        self.events = 0
        self.pins = 0
        self.decisions: dict[str, int] = {}  # decision reason -> count
        self.held = 0  # turns the router's admission held before routing them
        self.held_overdue = 0  # of which released by the hold bound
        self.hold_s = 0.0  # virtual seconds they waited in all
        # picked turns the router held while their worker had no KV room (room_hold), or while their
        # predicted wait for device memory there lasted (memory_hold)
        self.room_held = 0
        self.room_overdue = 0  # of which sent by the hold bound
        self.room_hold_s = 0.0  # virtual seconds they waited in all


def _router(policy: str, config: SimConfig, router_config: Any) -> Router:
    """The gateway's router, unchanged, with the run's policy, seed and settings; it sends a turn's
    decode apart where the policy asks (Router.decode_priority), as a gateway that splits turns."""
    if router_config is None:
        router_config = config.router_config()
    kwargs: dict[str, Any] = {"policy": policy, "seed": config.seed, "splits_turns": True}
    if router_config is not None:
        kwargs["config"] = router_config
    return Router(**kwargs)


class Simulation:
    def __init__(
        self,
        workload: Workload,
        policy: str,
        config: SimConfig | None = None,
        router_config: Any = None,
    ) -> None:
        self.workload = workload
        self.config = config = config or SimConfig()
        if config.workers < 1:
            raise ValueError("at least one worker is needed")
        if config.block_size != workload.block_size:
            raise ValueError("the workload was hashed with another block size")
        self.loop = EventLoop()
        self.router = _router(policy, config, router_config)
        self.workers = self._make_workers(config)
        self._next_kv_seq = dict.fromkeys(self.workers, 0)  # numbered from 0, as a worker's publisher does
        self.run_result = SimRun(policy)
        self._turns: dict[str, tuple[Turn, RequestRecord]] = {}
        # turns sent as a prompt and then a decode (Router.decode_priority): the decode's engine request
        # id -> the turn's, and the turns whose prompt is in flight -> their decode's priority
        self._decodes: dict[str, str] = {}
        self._decode_priority: dict[str, tuple[int, str | None]] = {}
        # decodes sent in slices (Router.decode_slice_tokens): a slice's id -> the output tokens before
        # it, its priority and session
        self._slices: dict[str, tuple[int, int, str | None]] = {}
        # slices cut for a prompt (Router.slices_to_cut): their aborts end them, and the next one goes
        self._cut: set[str] = set()
        # turns sent in prefill pieces first: request -> (the pieces' prompt lengths left, session)
        self._pieces: dict[str, tuple[list[int], str | None]] = {}
        self._piece_of: dict[str, str] = {}  # a piece in flight -> its turn's request
        self._cached_before_pieces: dict[str, tuple[int, int]] = {}  # its cached tokens at the first
        self._open = len(workload)  # turns not finished yet (arrived or not)
        self._next_index = 0
        self._last_progress = 0.0
        self._load_ticks = dict.fromkeys(self.workers, 0)
        self._tick_phase = {
            wid: self.config.load_interval_s * i / len(self.workers) for i, wid in enumerate(self.workers)
        }
        self._tick_generation = dict.fromkeys(self.workers, 0)
        self._tick_sleeping = dict.fromkeys(self.workers, False)
        self._last_report: dict[str, LoadReport] = {}
        self._held: dict[str, tuple[Turn, RouteRequest]] = {}  # held by the router's admission
        self._held_timer = DeadlineTimer(self.loop, self.router.held_deadline, self._release)
        self._room_held: dict[str, tuple[Turn, RequestRecord, str | None]] = {}  # picked, held for room
        self._room_timer = DeadlineTimer(self.loop, self.router.rooms_deadline, self._release_rooms)

    def _make_workers(self, config: SimConfig) -> dict[str, SimWorker]:
        engine_config = config.engine_config()
        return {
            f"w{i}": SimWorker(
                f"w{i}",
                engine_config,
                self.loop,
                self._on_outputs,
                self._on_kv_events,
                config.fast_forward,
                config.transfer(),
            )
            for i in range(config.workers)
        }

    # --- driving

    def run(self) -> SimRun:
        loop = self.loop
        for worker in self.workers.values():
            self.router.add_worker(worker.registration(), loop.now)
        for arrival, key, _row in self.workload.first_turns():
            loop.at(arrival, self._arrive, key, 0, False)
        for wid in self.workers:
            # workers report on their own phase, as independent processes would
            loop.at(self._tick_phase[wid], self._load_tick, wid, 0)
        loop.at(self.config.expire_interval_s, self._expire_tick)
        loop.run()
        result = self.run_result
        result.busy_s = {wid: w.busy_s for wid, w in self.workers.items()}
        result.steps = sum(w.steps for w in self.workers.values())
        result.events = loop.events_run
        before_pick = self.router.admission or self.router.overload or self.router.kv_queue
        if before_pick is not None:
            result.held = before_pick.stats.held_total
            result.held_overdue = before_pick.stats.overdue_total
        rooms = self.router.memory_hold or self.router.rooms
        if rooms is not None:
            result.room_held = rooms.stats.held_total
            result.room_overdue = rooms.stats.overdue_total
            result.room_hold_s = rooms.stats.hold_s
        return result

    def _arrive(self, key: str, turn_index: int, tool_result: bool) -> None:
        self.loop.settle()
        now = self._last_progress = self.loop.now
        row = self.workload.sessions[key][turn_index]
        turn = Turn(self._next_index, row, key, turn_index, tool_result)
        self._next_index += 1
        turn.arrival = now
        hashes = self.workload.block_hashes(row)
        router = self.router
        named = row.session_id if self.config.session_ids else None
        session_id = router.resolve_session(named, hashes)
        request = RouteRequest(
            request_id=turn.request_id,
            model="sim",
            block_hashes=hashes,
            num_tokens=row.input_length,
            session_id=session_id,
            expected_output_tokens=row.output_length,  # the gateway passes a request's max_tokens
            tool_call_pending=tool_result and named is not None,
            parent_session_id=parent_of(named),
        )
        if router.admit(request, now):
            self._dispatch(turn, request)
        else:  # held at its tool boundary: its TTFT keeps counting from `turn.arrival`
            self._held[turn.request_id] = (turn, request)
            self._held_timer.arm()

    def _dispatch(self, turn: Turn, request: RouteRequest) -> None:
        now = self.loop.now
        row = turn.row
        router = self.router
        session_id = request.session_id
        decision = router.pick(request, now)
        reasons = self.run_result.decisions
        reasons[decision.reason] = reasons.get(decision.reason, 0) + 1
        record = RequestRecord(turn.session, turn.turn, turn.arrival, row.input_length, decision.worker_id)
        self.run_result.records.append(record)
        self._turns[turn.request_id] = (turn, record)
        if router.room_offer(request, decision, now):
            self._submit(turn, record, session_id)
        else:  # its worker has no room: it waits at the router (its TTFT counts from its arrival)
            self._room_held[turn.request_id] = (turn, record, session_id)
            self._room_timer.arm()

    def _submit(self, turn: Turn, record: RequestRecord, session_id: str | None) -> None:
        worker_id = record.worker
        record.sent = self.loop.now
        if self._tick_sleeping[worker_id]:
            self._wake_ticks(worker_id)
        row = turn.row
        if row.output_length > 1:  # a turn the gateway splits: a long prompt may go in pieces first
            hashes = self.workload.block_hashes(row)
            pieces = self.router.prefill_pieces(worker_id, hashes, row.input_length)
            if pieces:
                self._pieces[turn.request_id] = (pieces, session_id)
                self._next_piece(turn.request_id)
                return
        self._submit_prompt(turn, record, session_id)

    def _next_piece(self, request_id: str) -> None:
        """The turn's next prefill piece (`Router.prefill_pieces`), or its prompt part after the last."""
        entry = self._turns.get(request_id)
        if entry is None:  # given up meanwhile
            self._pieces.pop(request_id, None)
            return
        turn, record = entry
        lengths, session_id = self._pieces[request_id]
        if not lengths:
            del self._pieces[request_id]
            self._submit_prompt(turn, record, session_id)
            return
        length = lengths.pop(0)
        hashes = self.workload.block_hashes(turn.row)[: length // self.workload.block_size]
        piece_id = f"{request_id}/piece{len(lengths)}"
        worker_id = record.worker
        try:
            self.workers[worker_id].submit(piece_id, length, hashes, 1, session_id)
        except ValueError:  # the engine refuses it: the turn fails, as the gateway's attempt does
            del self._pieces[request_id]
            self._cached_before_pieces.pop(request_id, None)
            self._finish(request_id, 0, ok=False)
            return
        self._piece_of[piece_id] = request_id
        self._cut_slices(worker_id, hashes)

    def _cut_slices(self, worker_id: str, hashes: list[int]) -> None:
        """A prompt part or piece just went to `worker_id`: the slices the router names for it there are
        aborted, as the gateway closes their streams."""
        for slice_id in self.router.slices_to_cut(worker_id, hashes, self.loop.now):
            self._cut.add(slice_id)
            self.workers[worker_id].abort(slice_id)

    def _submit_prompt(self, turn: Turn, record: RequestRecord, session_id: str | None) -> None:
        worker_id = record.worker
        row = turn.row
        hashes = self.workload.block_hashes(row)
        max_tokens = row.output_length
        priority = self.router.decode_priority(worker_id) if max_tokens > 1 else None
        answer = None
        if priority is not None:  # the prompt alone now, its decode once the first token is out
            self._decode_priority[turn.request_id] = (priority, session_id)
            max_tokens = 1
            if self.router.decode_slice_tokens(worker_id):  # its answer goes on in the slices' prompts
                answer = (answer_start(turn.request_id), 0)
        try:
            self.workers[worker_id].submit(
                turn.request_id, row.input_length, hashes, max_tokens, session_id, answer=answer
            )
        except ValueError:  # the engine refuses it (longer than the worker's whole cache)
            self._decode_priority.pop(turn.request_id, None)
            self._finish(turn.request_id, 0, ok=False)
            return
        if answer is not None:  # a prompt part where decodes go in slices: it may take their room
            self._cut_slices(worker_id, hashes)

    def _submit_decode(
        self, request_id: str, priority: int, session_id: str | None, produced: int = 1
    ) -> None:
        """A turn's decode as the gateway sends it: the prompt and its first token, the rest of the
        output to generate, at `priority`, to the worker that computed the prompt. Where the router
        sends it in slices (`Router.decode_slice_tokens`, K), at most K tokens a request: each slice's
        end sends the next (the prompt and the `produced` output so far), queued behind the prompts
        sent before it."""
        turn, record = self._turns[request_id]
        row = turn.row
        size = max(1, row.output_length - produced)
        decode_id = request_id + "/decode"
        slice_tokens = self.router.decode_slice_tokens(record.worker)
        answer = None
        if slice_tokens:
            size = min(size, slice_tokens)
            if produced > 1:
                decode_id += str(produced)
            self._slices[decode_id] = (produced, priority, session_id)
            answer = (answer_start(request_id), produced)  # the output so far as its tokens
        self._decodes[decode_id] = request_id
        hashes = self.workload.block_hashes(row)
        try:
            self.workers[record.worker].submit(
                decode_id, row.input_length + produced, hashes, size, session_id, priority, answer
            )
        except ValueError:
            del self._decodes[decode_id]
            self._slices.pop(decode_id, None)
            self._finish(request_id, produced, ok=False)
            return
        if slice_tokens:
            self.router.slice_sent(decode_id, record.worker, len(hashes))

    def _slice_done(self, slice_id: str, request_id: str, completion_tokens: int, ok: bool) -> int | None:
        """A decode slice ended: the next one goes (None), or the turn ends with its output tokens."""
        before, priority, session_id = self._slices.pop(slice_id)
        produced = before + completion_tokens
        if ok and produced < self._turns[request_id][0].row.output_length:
            delay = self.config.bus_delay_s
            self.loop.after(delay, self._submit_decode, request_id, priority, session_id, produced)
            return None
        return produced

    def _on_outputs(self, worker_id: str, outputs: list[RequestOutput]) -> None:
        self.loop.settle()
        now = self.loop.now
        self._last_progress = now
        for out in outputs:
            request_id = out.request_id
            if self._piece_of and request_id in self._piece_of:
                self._piece_output(request_id, out)
                continue
            if self._decodes:
                decode_of = self._decodes.get(request_id)
                if decode_of is not None:  # a turn's decode: its end is the turn's
                    if out.completion_tokens == 1 and not out.finished and request_id in self._slices:
                        self.router.slice_started(request_id)  # it runs: its first token came
                    if out.finished:
                        del self._decodes[request_id]
                        ok = out.completion_tokens > 0 and out.finish_reason != "abort"
                        produced: int | None = out.completion_tokens + 1
                        if request_id in self._slices:
                            self.router.slice_ended(request_id)
                            if self._cut:  # cut for a prompt: the output so far stands, the next goes
                                ok = ok or request_id in self._cut
                                self._cut.discard(request_id)
                            produced = self._slice_done(request_id, decode_of, out.completion_tokens, ok)
                        if produced is not None:
                            self._finish(decode_of, produced, ok)
                    continue
            entry = self._turns.get(request_id)
            if entry is None:
                continue
            record = entry[1]
            if out.new_token_ids and record.first_token < 0:
                record.first_token = now
                # what was cached when the turn came: before its first piece, where it went in pieces
                cached = self._cached_before_pieces.pop(request_id, None)
                if cached is None:
                    cached = (out.num_cached_tokens, out.num_host_cached_tokens)
                record.cached_tokens, record.host_cached_tokens = cached
                self.router.on_first_token(request_id, now)
                if self._room_held and self.router.rechecks_rooms_on_change:
                    self._release_rooms()  # a prefill ended: what waits on that worker may fit now
                self._release()  # and the router's overload queue may let a turn go
            if out.finished:
                ok = out.completion_tokens > 0 and out.finish_reason != "abort"
                decode = self._decode_priority.pop(request_id, None)
                if ok and decode is not None:  # the gateway sends the decode on (a round trip)
                    self.loop.after(self.config.bus_delay_s, self._submit_decode, request_id, *decode)
                else:
                    self._finish(request_id, out.completion_tokens, ok)

    def _piece_output(self, piece_id: str, out: RequestOutput) -> None:
        """A prefill piece's output: its turn's cached tokens at the first piece; the next piece (or the
        prompt part) once it ended, as the gateway sends it on (a round trip)."""
        request_id = self._piece_of[piece_id]
        if out.new_token_ids or out.finished:
            self._cached_before_pieces.setdefault(
                request_id, (out.num_cached_tokens, out.num_host_cached_tokens)
            )
        if out.finished:
            del self._piece_of[piece_id]
            self.loop.after(self.config.bus_delay_s, self._next_piece, request_id)

    def _finish(self, request_id: str, output_tokens: int, ok: bool) -> None:
        now = self.loop.now
        turn, record = self._turns.pop(request_id)
        record.finish = now
        record.ok = ok
        record.output_tokens = output_tokens
        reason = FINISH_REASONS.get(turn.row.stop or "", "stop") if ok else "error"
        hint = self.router.on_complete(request_id, now, reason, output_tokens, ok=ok)
        if hint is not None:
            worker_id, pin = hint
            worker = self.workers.get(worker_id)
            if worker is not None:
                self.run_result.pins += 1
                self.loop.after(
                    self.config.bus_delay_s,
                    worker.pin,
                    pin.session_id,
                    pin.block_hashes,
                    pin.ttl_s,
                    pin.host_ttl_s,
                    pin.prefetch_after_s,
                )
        self._open -= 1
        self._release_rooms()
        self._release()
        turns = self.workload.sessions[turn.session]
        if turn.turn + 1 < len(turns):
            think = self.workload.think_time(turns[turn.turn + 1])
            self.loop.after(think, self._arrive, turn.session, turn.turn + 1, turn.row.stop == "tool_use")

    # --- admission

    def _release(self) -> None:
        if not self._held:
            return
        now = self.loop.now
        for request_id in self.router.release_held(now):
            turn, request = self._held.pop(request_id)
            self.run_result.hold_s += now - turn.arrival
            self._dispatch(turn, request)
        self._held_timer.arm()

    def _release_rooms(self) -> None:
        if not self._room_held:
            return
        for request_id in self.router.release_rooms(self.loop.now):
            entry = self._room_held.pop(request_id, None)
            if entry is not None:
                self._submit(*entry)
        self._room_timer.arm()

    # --- the bus

    def _on_kv_events(self, worker_id: str, events: list[KvEvent]) -> None:
        seq = self._next_kv_seq[worker_id]
        self._next_kv_seq[worker_id] = seq + 1
        loop = self.loop
        batch = KvEventBatch(worker_id, 1, seq, loop.now, events)
        if self.config.lazy_bus:
            # like a load report, a batch only changes what the next router call sees
            loop.defer_at(loop.now + self.config.bus_delay_s, self._apply_kv, batch)
        else:
            loop.after(self.config.bus_delay_s, self._deliver_kv, batch)

    def _deliver_kv(self, batch: KvEventBatch) -> None:
        self.loop.settle()
        self._apply_kv(batch)

    def _apply_kv(self, batch: KvEventBatch) -> None:
        if not self.router.apply_kv_batch(batch, self.loop.now):
            # a gap cannot happen on this lossless bus, but answer it as a worker would: a dump
            worker = self.workers[batch.worker_id]
            dump = KvStateDump(
                batch.worker_id, 1, self._next_kv_seq[batch.worker_id] - 1, worker.engine.cached_blocks()
            )
            self.loop.after(self.config.bus_delay_s, self._deliver_dump, dump)

    def _deliver_dump(self, dump: KvStateDump) -> None:
        self.loop.settle()
        self.router.apply_state_dump(dump, self.loop.now)

    def _load_tick(self, worker_id: str, generation: int) -> None:
        if self._open <= 0 or generation != self._tick_generation[worker_id]:
            return
        worker = self.workers[worker_id]
        report = worker.load_report()
        config = self.config
        loop = self.loop
        now = loop.now
        last = self._last_report.get(worker_id)
        if (
            last is not None
            and now - last.ts < config.idle_report_s - 1e-9
            and worker.idle()
            and _same_load(last, report)
        ):
            # nothing changed: sleep until the heartbeat is due (a request wakes it earlier)
            self._tick_sleeping[worker_id] = True
            wake = self._next_tick(worker_id, last.ts + config.idle_report_s)
            loop.at(wake, self._load_tick, worker_id, generation)
            return
        self._tick_sleeping[worker_id] = False
        self._last_report[worker_id] = report
        # the report reaches the router bus_delay_s later; only router calls can see it, and they
        # settle the loop first, so it waits outside the heap (its arrival time is its `now`)
        arrival = now + config.bus_delay_s
        if config.lazy_bus:
            due = now if now > arrival else arrival  # the time `at` would give it
            loop.defer_at(due, self.router.apply_load, report, due)
            hold = self.router.memory_hold
            if hold is not None and hold.on(worker_id) and self.router.rechecks_rooms_on_change:
                # picks held for this worker are re-checked when its report arrives: an event then
                loop.at(due, self._report_arrived)
        else:
            loop.at(arrival, self._deliver_load, report)
        ticks = self._load_ticks[worker_id] = self._load_ticks[worker_id] + 1
        if ticks % config.load_sample_every == 0:
            self.run_result.load.append(
                LoadSample(now, worker_id, report.running, report.waiting, report.used_blocks)
            )
        loop.after(config.load_interval_s, self._load_tick, worker_id, generation)

    def _deliver_load(self, report: LoadReport) -> None:
        self.loop.settle()
        self.router.apply_load(report, self.loop.now)
        if self.router.rechecks_rooms_on_change:
            self._release_rooms()

    def _report_arrived(self) -> None:
        self.loop.settle()  # applies the report (deferred, `lazy_bus`)
        self._release_rooms()

    def _next_tick(self, worker_id: str, not_before: float) -> float:
        """The first time on the worker's reporting grid at or after `not_before`."""
        phase = self._tick_phase[worker_id]
        interval = self.config.load_interval_s
        return phase + max(0, math.ceil((not_before - phase) / interval - 1e-9)) * interval

    def _wake_ticks(self, worker_id: str) -> None:
        self._tick_sleeping[worker_id] = False
        self._tick_generation[worker_id] += 1
        self.loop.at(
            self._next_tick(worker_id, self.loop.now),
            self._load_tick,
            worker_id,
            self._tick_generation[worker_id],
        )

    def _expire_tick(self) -> None:
        if self._open <= 0:
            return
        self.loop.settle()
        now = self.loop.now
        self.router.expire(now)
        if self._turns and now - self._last_progress > self.config.stall_timeout_s:
            # nothing moved for an hour of virtual time: fail what is in flight rather than spin
            decodes = {turn_id: decode_id for decode_id, turn_id in self._decodes.items()}
            for piece_id, request_id in self._piece_of.items():
                if (entry := self._turns.get(request_id)) is not None:
                    self.workers[entry[1].worker].abort(piece_id)
            for request_id, (_turn, record) in list(self._turns.items()):
                self.workers[record.worker].abort(request_id)
                self.workers[record.worker].abort(decodes.get(request_id, request_id + "/decode"))
                self._decode_priority.pop(request_id, None)
                self._finish(request_id, 0, ok=False)
            self._decodes.clear()
            self._slices.clear()
            self._cut.clear()
            self._pieces.clear()
            self._piece_of.clear()
            self._cached_before_pieces.clear()
        self.loop.after(self.config.expire_interval_s, self._expire_tick)
