"""The engine under asyncio: one task steps the synchronous engine while handlers add, read and
abort requests.

Every touch of the engine holds `lock`, so a torch step running in a thread never meets a handler's
`add_request` or a state dump halfway. A step's outputs (tokens, finishes, KV events) leave when the
step has ended: a torch step when its thread returns, a mock step when its modelled time up to its
decode pass has passed (its `output_lead_s`, engines/mock.py: a prompt's first token comes at the end
of its last prefill chunk, as on a GPU and from Dynamo's mocker); the next step starts when the whole
modelled time has. Handlers may add requests while a mock step's time runs; they join the next step.

While the engine steps, every request it holds gets `KEEPALIVE` on its queue every `keepalive_s`: a
request can go minutes without an output (queued behind a jam, or preempted and waiting to come back),
and a streaming handler answers it with an SSE comment, so a gateway reading the stream with a timeout
tells a busy worker from a hung one (a hung engine steps no more, and sends none).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import msgspec

from engines.engine import PREFETCH_CHUNK_BLOCKS, Engine, EngineRequest, RequestOutput, StepResult
from kvutil.tasks import cancel_and_wait
from router.protocol import KvEvent

log = logging.getLogger("kvgate.worker")

T = TypeVar("T")

STOP_TIMEOUT_S = 2.0  # for the engine loop's task; a threaded step in flight still finishes after it
STEP_LOG_LEN = 1024  # the newest steps kept in `EngineLoop.steps`
KEEPALIVE_S = 15.0  # well inside a gateway's read timeout (kvgate's: 120 s)

# on a request's queue: "still held, nothing new" (compared by identity, never a real output)
KEEPALIVE = RequestOutput("", [], False, None, 0, 0, 0)


class StepRecord(msgspec.Struct, frozen=True):
    """One engine step as the loop ran it (event-loop clock, seconds)."""

    started: float  # the step began (the engine lock taken)
    ended: float  # its modelled time ran out (mock; see `_run`) or its thread returned (torch)
    delivered: float  # its outputs left: never before `ended - output_lead_s`
    duration_s: float  # modelled by the runner (mock) or measured (torch)
    output_lead_s: float  # the outputs were due this long before `ended` (the mock's decode pass)
    prefill_tokens: int
    decode_tokens: int
    num_outputs: int


class EngineLoop:
    def __init__(self, engine: Engine, threaded: bool, keepalive_s: float = KEEPALIVE_S) -> None:
        """`threaded`: run steps in a thread (real compute), else inline, sleeping the modelled time."""
        self.engine = engine
        self.keepalive_s = keepalive_s
        self._next_keepalive = 0.0  # event-loop time of the next round of `KEEPALIVE`s (set by `_run`)
        self.lock = asyncio.Lock()
        self.on_events: Callable[[list[KvEvent]], None] | None = None
        self.on_finished: Callable[[], None] | None = None
        self._events: list[KvEvent] = []
        engine.on_kv_events = self._events.extend
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine") if threaded else None
        self.steps: deque[StepRecord] = deque(maxlen=STEP_LOG_LEN)
        self._last_submit = 0.0  # event-loop time of the newest request
        self._submitted = 0  # requests submitted, all time (a step that did nothing waits for the next)
        # traced requests: the start of the first step that took each in (None while it waits)
        self._first_steps: dict[str, float | None] = {}

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task], STOP_TIMEOUT_S)
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, request: EngineRequest) -> asyncio.Queue[RequestOutput]:
        """Queue a request; its outputs arrive on the returned queue. ValueError when refused."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        async with self.lock:
            self.engine.add_request(request)
            self._queues[request.request_id] = queue
            self._submitted += 1
        self._last_submit = asyncio.get_running_loop().time()
        self._wake.set()
        return queue

    def watch(self, request_id: str) -> None:
        """Note when the engine first takes `request_id` in (its queue wait, for its trace)."""
        self._first_steps[request_id] = None

    def first_step(self, request_id: str) -> float | None:
        """The start of the first step that took a watched request in; forgets it."""
        return self._first_steps.pop(request_id, None)

    def _note_first_steps(self, started: float) -> None:
        for request_id, first in self._first_steps.items():
            if first is None and self.engine.was_scheduled(request_id):
                self._first_steps[request_id] = started

    async def abort(self, request_id: str) -> None:
        async with self.lock:
            self._queues.pop(request_id, None)
            if self.engine.abort(request_id):
                self._wake.set()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` between steps (pins, state dumps, load figures)."""
        async with self.lock:
            return fn()

    async def prefetch(self, block_hashes: list[int]) -> None:
        """Bring a session's blocks back from the host tier before its turn, between steps and
        `PREFETCH_CHUNK_BLOCKS` at a time, each chunk holding the engine for its modelled copy time
        (mock; a real copy takes its own): a request that arrives meanwhile waits for one chunk, not a
        whole context, as in the simulator. Once the engine has work the rest is left to admission,
        which onboards what the turn needs."""
        engine = self.engine
        while True:
            async with self.lock:  # a request queued for the lock meanwhile is in the engine by now
                if engine.has_work():
                    return
                before = engine.prefetched_blocks
                copy_s = engine.prefetch(block_hashes, PREFETCH_CHUNK_BLOCKS)
                if copy_s > 0:
                    await asyncio.sleep(copy_s)
            if engine.prefetched_blocks == before:
                return

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        modelled_end = 0.0  # when the previous step's modelled time ran out (mock)
        self._next_keepalive = loop.time() + self.keepalive_s
        while True:
            idle = not engine.has_work()
            if idle:
                self._wake.clear()
                await self._wake.wait()
                self._next_keepalive = loop.time() + self.keepalive_s
            async with self.lock:
                started = loop.time()
                submitted = self._submitted
                try:
                    if self._executor is not None:
                        result = await loop.run_in_executor(self._executor, engine.step)
                    else:
                        result = engine.step()
                except Exception:
                    # a broken step must not leave clients hanging on their queues
                    log.exception("engine step failed; aborting the requests in flight")
                    self._fail_all()
                    await asyncio.sleep(0.1)
                    continue
            if self._executor is None and result.duration_s > 0:
                # A GPU starts its next step the moment the last one ends: a busy loop's step starts at
                # the previous modelled end even when this process woke late (lateness must not add up
                # over a long prefill), but never before a request it may hold arrived.
                start = started if idle else min(started, max(modelled_end, self._last_submit))
                modelled_end = start + result.duration_s
                # the outputs leave before the step's decode pass (engines/mock.py), the next step
                # starts after it
                await self._sleep_until(modelled_end - result.output_lead_s)
                ended = modelled_end
            else:
                ended = modelled_end = loop.time()
                await asyncio.sleep(0)
            delivered = loop.time()
            self._record(started, ended, delivered, result)
            self._deliver(result)
            if delivered >= self._next_keepalive:
                self._keep_alive(delivered)
            await self._sleep_until(modelled_end)
            if not (result.outputs or result.num_prefill_tokens or result.num_decode_tokens):
                await self._wait_for_loads(submitted)

    @staticmethod
    async def _sleep_until(deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(left)

    def _record(self, started: float, ended: float, delivered: float, result: StepResult) -> None:
        """The step's times in `steps` (and the debug log); the first step of each traced request."""
        record = StepRecord(
            started,
            ended,
            delivered,
            result.duration_s,
            result.output_lead_s,
            result.num_prefill_tokens,
            result.num_decode_tokens,
            len(result.outputs),
        )
        self.steps.append(record)
        if self._first_steps:
            self._note_first_steps(started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "step: prefill %d decode %d outputs %d duration_ms %.3f lead_ms %.3f late_ms %.3f",
                record.prefill_tokens,
                record.decode_tokens,
                record.num_outputs,
                record.duration_s * 1e3,
                record.output_lead_s * 1e3,
                (record.delivered - record.ended + record.output_lead_s) * 1e3,
            )

    async def _wait_for_loads(self, submitted: int) -> None:
        """After a step that ran nothing: when the engine's running sequences all wait for their host
        copies (asynchronous onboarding), sleep until the first lands or a request comes, not spin."""
        engine = self.engine
        async with self.lock:
            ready = engine.next_ready_at() if self._submitted == submitted else None
            if ready is None:
                return
            self._wake.clear()
        delay = ready - engine.clock()
        if delay > 0:
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass

    def _deliver(self, result: StepResult) -> None:
        finished = False
        for out in result.outputs:
            queue = self._queues.get(out.request_id)
            if out.finished:
                finished = True
                self._queues.pop(out.request_id, None)
            if queue is not None:
                queue.put_nowait(out)
        if self._events:
            events = self._events[:]
            self._events.clear()
            if self.on_events is not None:
                self.on_events(events)
        if finished and self.on_finished is not None:
            self.on_finished()

    def _keep_alive(self, now: float) -> None:
        """`KEEPALIVE` to every request held: the loop has stepped for `keepalive_s` since the last
        round, or since it woke from idle (a request's outputs usually come well within that)."""
        for queue in self._queues.values():
            queue.put_nowait(KEEPALIVE)
        self._next_keepalive = now + self.keepalive_s

    def _fail_all(self) -> None:
        for request_id, queue in list(self._queues.items()):
            self.engine.abort(request_id)
            queue.put_nowait(RequestOutput(request_id, [], True, "abort", 0, 0, 0))
        self._queues.clear()
