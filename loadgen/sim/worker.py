"""A simulated worker: the real engine (scheduler, block manager, mock runner) stepped in virtual time.

A step is scheduled at virtual time t: the engine decides the batch at t and the runner says how long
it takes; its outputs (tokens, completions) and KV events leave the worker at t + duration less its
decode pass (`output_lead_s`: as the live mock and Dynamo's mocker send them, engines/mock.py), and
the next step starts at t + duration. New requests that arrive meanwhile wait in the engine's queue
for the next step, as on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

from engines.engine import (
    PREFETCH_CHUNK_BLOCKS,
    Engine,
    EngineConfig,
    EngineLoad,
    EngineRequest,
    RequestOutput,
)
from engines.mock import PLACEHOLDER_TEXT, MockRunner, TransferModel
from engines.runner import SamplingParams
from loadgen.sim.events import EventLoop
from loadgen.sim.fastforward import DecodeRun, FastForward
from router.protocol import KvEvent, LoadReport, WorkerRegistration

OutputSink = Callable[[str, list[RequestOutput]], None]
EventSink = Callable[[str, list[KvEvent]], None]


class SimWorker:
    """One engine and its step loop. `on_outputs(worker_id, outputs)` and `on_kv_events(worker_id,
    events)` are called at the end of the step that produced them."""

    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        loop: EventLoop,
        on_outputs: OutputSink,
        on_kv_events: EventSink,
        fast_forward: bool = True,
        transfer: TransferModel | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.config = config
        self.loop = loop
        self.on_outputs = on_outputs
        self.on_kv_events = on_kv_events
        self._pending_events: list[KvEvent] = []
        runner = MockRunner(config.num_blocks, config.block_size, transfer=transfer)
        self._placeholder = runner.tokenizer.encode(PLACEHOLDER_TEXT)  # the tokens its answers cycle
        self.engine = Engine(
            config,
            runner,
            clock=loop.clock,
            on_kv_events=self._pending_events.extend,
        )
        self.fast_forward = FastForward(self.engine) if fast_forward else None
        self._run: DecodeRun | None = None  # the pure-decode run in progress, if any
        self._run_generation = 0  # bumped when a run is cut short, so its end event is ignored
        self.busy = False
        self._idle_steps = 0  # consecutive steps that scheduled nothing
        self.busy_s = 0.0
        self.steps = 0
        # the engine's load as of its last change: the engine changes only through this class, and
        # load reports (10 Hz) far outnumber its changes during long decode runs
        self._load: EngineLoad | None = None

    def registration(self) -> WorkerRegistration:
        return WorkerRegistration(
            worker_id=self.worker_id,
            url=f"sim://{self.worker_id}",
            model="sim",
            block_size=self.config.block_size,
            num_blocks=self.config.num_blocks,
            engine="mock",
            epoch=1,
            heartbeat_ts=self.loop.now,
            max_num_seqs=self.config.max_num_seqs,
            priority_threshold=self.config.priority_threshold if self.config.priority_scheduling else -1,
            returns_token_ids=True,  # the simulator hands the gateway's part the tokens itself
            host_blocks=self.config.host_blocks,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
        )

    def submit(
        self,
        request_id: str,
        num_tokens: int,
        block_hashes: list[int],
        max_tokens: int,
        session_id: str | None,
        priority: int = 0,
        answer: tuple[int, int] | None = None,
    ) -> None:
        """Queue a request whose prompt is `num_tokens` long with these full-block hashes.

        The engine hashes prompt tokens lazily (`Sequence.block_hash`); handing it the trace's
        precomputed chain instead keeps its block manager and scheduler exactly as they are while
        skipping ~100k tokens of hashing per turn. The token values are then never read (the mock
        runner ignores them), so they are zeros, in a list the engine adopts rather than copies.

        `answer` = (start, produced): a part of an answer sent in parts (a decode slice), whose prompt
        ends with the `produced` output tokens so far, as the gateway sends them. Those are the tokens
        the mock sampled for the parts before (`answer_tokens`), so their blocks hash as the engine
        cached them and are found again, as vLLM's prefix cache finds the real tokens; the answer goes
        on from token `start + produced` of the placeholder text (`start`: per request, so two answers'
        tokens differ).
        """
        self._cut_run()
        self._load = None
        if answer is None:
            sampling = SamplingParams(max_tokens=max(1, max_tokens), ignore_eos=True)
            tokens = [0] * num_tokens
        else:
            start, produced = answer
            sampling = SamplingParams(
                max_tokens=max(1, max_tokens), ignore_eos=True, output_offset=start + produced
            )
            tokens = [0] * (num_tokens - produced)
            tokens += self.answer_tokens(start, produced)
        request = EngineRequest(
            request_id, tokens, sampling, session_id, prompt_block_hashes=block_hashes, priority=priority
        )
        self.engine.add_request(request, adopt_prompt=True)
        self._idle_steps = 0
        self.kick()

    def answer_tokens(self, start: int, count: int) -> list[int]:
        """The first `count` tokens the mock runner samples for an answer that starts at token `start`
        of its placeholder text (`SamplingParams.output_offset`)."""
        placeholder = self._placeholder
        size = len(placeholder)
        return [placeholder[(start + i) % size] for i in range(count)]

    def pin(
        self,
        session_id: str,
        block_hashes: list[int],
        ttl_s: float,
        host_ttl_s: float = 0.0,
        prefetch_after_s: float = 0.0,
    ) -> None:
        self._load = None
        self.engine.pin(session_id, block_hashes, ttl_s, host_ttl_s)
        if prefetch_after_s > 0 and self.engine.block_manager.host is not None:
            self.loop.after(prefetch_after_s, self.prefetch, block_hashes)
        self._idle_steps = 0

    def prefetch(self, block_hashes: list[int]) -> None:
        """Bring a session's blocks back from the host before its turn, as steps that only copy
        (events out when each ends), `PREFETCH_CHUNK_BLOCKS` at a time: a request that arrives
        meanwhile waits for one chunk's copy, not for a whole context's. A busy worker skips the rest:
        the turn onboards them at admission, and events of a step in flight must not be overtaken."""
        if self.busy or self.engine.has_work():
            return
        self._load = None
        copy_s = self.engine.prefetch(block_hashes, PREFETCH_CHUNK_BLOCKS)
        events = self._pending_events[:]
        self._pending_events.clear()
        if events:
            self.busy = True
            self.busy_s += copy_s
            self.loop.after(copy_s, self._prefetch_done, events, block_hashes)

    def _prefetch_done(self, events: list[KvEvent], block_hashes: list[int]) -> None:
        self._step_done([], events)
        self.prefetch(block_hashes)  # the next chunk, while the worker is still idle

    def idle(self) -> bool:
        return not self.busy and not self.engine.has_work()

    def abort(self, request_id: str) -> None:
        self._cut_run()
        self._load = None
        self.engine.abort(request_id)

    def kick(self) -> None:
        if not self.busy and self.engine.has_work():
            self.busy = True
            self.loop.at(self.loop.now, self._step)

    def _step(self) -> None:
        if self.fast_forward is not None:
            run = self.fast_forward.plan(self.loop.now)
            if run is not None:
                self._run = run
                self.loop.at(run.end(), self._run_done, self._run_generation)
                return
        self._load = None
        result = self.engine.step()
        duration = result.duration_s
        self.busy_s += duration
        self.steps += 1
        events = self._pending_events[:]
        self._pending_events.clear()
        # a step that scheduled nothing (all preempted) is retried once; twice means the engine waits
        # for something outside it (a new request), which kick() will bring
        self._idle_steps = 0 if duration > 0 or result.outputs else self._idle_steps + 1
        if duration > 0:
            # the outputs leave before the step's decode pass (engines/mock.py), the next step starts
            # after it
            lead = result.output_lead_s
            if lead > 0:
                self.loop.after(duration - lead, self._send, result.outputs, events)
                self.loop.after(duration, self._step_done, [], [])
            else:
                self.loop.after(duration, self._step_done, result.outputs, events)
        else:
            self._step_done(result.outputs, events)

    def _run_done(self, generation: int) -> None:
        run = self._run
        if generation != self._run_generation or run is None:
            return  # cut short by a new request: its remainder was already accounted for
        self._finish_run(run, run.steps)
        self._step_done([], [])

    def _cut_run(self) -> None:
        """A request arrives during a decode run: apply the steps started so far; the next real step
        starts when the one in progress ends, and sees the new request, as without fast-forward."""
        run = self._run
        if run is None:
            return
        steps = run.started_by(self.loop.now)
        self._finish_run(run, steps)
        self._run_generation += 1
        self.loop.at(run.start + steps * run.duration, self._step_done, [], [])

    def _finish_run(self, run: DecodeRun, steps: int) -> None:
        assert self.fast_forward is not None
        self.fast_forward.apply(run, steps)
        self._load = None
        self._run = None
        self.busy_s += steps * run.duration
        self.steps += steps
        self._idle_steps = 0

    def _send(self, outputs: list[RequestOutput], events: list[KvEvent]) -> None:
        if events:
            self.on_kv_events(self.worker_id, events)
        if outputs:
            self.on_outputs(self.worker_id, outputs)

    def _step_done(self, outputs: list[RequestOutput], events: list[KvEvent]) -> None:
        self._send(outputs, events)
        self.busy = False
        if self._idle_steps < 2 and self.engine.has_work():
            self.busy = True
            self.loop.next_now(self._step)  # the step ends in nothing else: the next starts now
        elif self.engine.scheduler.onboard_async and self.engine.has_work():
            ready = self.engine.next_ready_at()  # nothing to compute until a load lands
            if ready is not None:
                self.loop.at(ready, self._loaded)

    def _loaded(self) -> None:
        self._idle_steps = 0
        self.kick()

    def load_report(self) -> LoadReport:
        load = self._load
        if load is None:
            load = self._load = self.engine.load()
        decode_tok_s = load.decode_tok_s
        if self._run is not None and self.fast_forward is not None:
            started = self._run.started_by(self.loop.now)
            decode_tok_s = self.fast_forward.decode_speed_after(self._run, started)
        return load.report(self.worker_id, self.loop.now, decode_tok_s)
