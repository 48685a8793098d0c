"""Runs a workload against a client: session arrivals, think time, limits, clean stop.

Open-loop (`concurrency` None): sessions start at their arrival offsets. Closed-loop (`concurrency`
N): N slots each run one session after another. Within a session turns are always closed-loop: a turn
becomes ready `delay` after the previous one completed.

Stopping (duration reached, request budget spent) sends nothing new and cancels sessions that are
only waiting; requests in flight get `drain_s` to finish, then are cancelled. An interrupt (Ctrl-C)
cancels everything at once. Either way, what was measured is kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import msgspec

from loadgen.client import Outcome, StreamClient
from loadgen.metrics import Recorder, RequestRecord, SessionRecord
from loadgen.workloads import Session, Turn, Workload


class RunConfig(msgspec.Struct):
    duration_s: float | None = 60.0
    requests: int | None = None
    warmup_s: float = 0.0
    concurrency: int | None = None  # closed-loop sessions; None: open-loop at arrival offsets
    max_concurrency: int = 512  # requests in flight at once
    max_think_s: float = 60.0  # cap on every think/tool delay
    drain_s: float = 30.0


class Driver:
    def __init__(
        self, client: StreamClient, workload: Workload, config: RunConfig, recorder: Recorder
    ) -> None:
        self.client = client
        self.workload = workload
        self.config = config
        self.recorder = recorder
        self.t0 = time.perf_counter()
        self.stopping = asyncio.Event()
        self._idle = asyncio.Event()  # set when no task is left: the workload ran out
        self.interrupted = False
        # what ended the run: "duration", "requests", "interrupt", or "workload" (it ran out)
        self.ended_by: str | None = None
        self._sessions: Iterator[tuple[float, Session]] = iter(())
        self._budget = config.requests
        self._slots = asyncio.Semaphore(max(1, config.max_concurrency))
        self._tasks: set[asyncio.Task[object]] = set()
        self._waiting: set[asyncio.Task[object]] = set()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stop(self, reason: str = "interrupt") -> None:
        """No new requests; cancel sessions that are only waiting."""
        if not self.stopping.is_set():
            self.ended_by = reason
            self.stopping.set()
            for task in list(self._waiting):
                task.cancel()

    def interrupt(self) -> None:
        self.interrupted = True
        self.stop()
        for task in list(self._tasks):
            task.cancel()

    async def run(self) -> float:
        """Runs until a limit or the workload's end; returns the wall time in seconds."""
        self.t0 = time.perf_counter()
        self._sessions = self.workload.sessions()
        timer = None
        if self.config.duration_s is not None:
            timer = asyncio.get_running_loop().call_later(self.config.duration_s, self.stop, "duration")
        try:
            if self.config.concurrency:
                for _ in range(self.config.concurrency):
                    self._spawn(self._slot())
            else:
                self._spawn(self._arrivals())
            await self._join()
        finally:
            if timer is not None:
                timer.cancel()
        if self.ended_by is None:
            self.ended_by = "workload"
        return self.elapsed()

    async def _join(self) -> None:
        await self.stopping_or_done()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.drain_s)
            for task in pending:
                task.cancel()
        while self._tasks:  # cancelled tasks still record their sessions
            await asyncio.wait(set(self._tasks))

    async def stopping_or_done(self) -> None:
        # two events, not a wait on every task: hundreds of sessions end each second
        waits = {asyncio.ensure_future(self.stopping.wait()), asyncio.ensure_future(self._idle.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> asyncio.Task[object]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def _wait(self, seconds: float) -> None:
        """Sleep, cancellable by stop()."""
        if seconds <= 0:
            return
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._waiting.discard(task)

    async def _wait_until(self, deadline: float) -> None:
        """Sleep until `elapsed()` reaches `deadline`, cancellable by stop(). A timer can fire a little
        early (uvloop keeps whole milliseconds against a loop clock read once per iteration), and a
        closed-loop turn must never start before its predecessor's end plus its delay: sleep again."""
        while (seconds := deadline - self.elapsed()) > 0 and not self.stopping.is_set():
            await self._wait(seconds)

    async def _arrivals(self) -> None:
        spawned = 0
        try:
            for offset, session in self._sessions:
                # sleep(0) at least: arrivals all at offset 0 must not starve the running sessions
                await self._wait(1e-9)
                await self._wait_until(offset)
                if self.stopping.is_set():
                    return
                self._spawn(self._session(session))
                spawned += 1
                if self.config.requests is not None and spawned >= self.config.requests:
                    return  # every session sends at least one request: more could send nothing
        except asyncio.CancelledError:
            return

    async def _slot(self) -> None:
        for _, session in self._sessions:
            if self.stopping.is_set():
                return
            if not await self._session(session):
                return

    async def _session(self, session: Session) -> bool:
        """Runs a session to its end; False when it was stopped."""
        reply: str | None = None
        previous_end: float | None = None
        turns = 0
        start = self.elapsed()
        completed = False
        sending: tuple[Turn, Outcome, float, float] | None = None  # the request in flight
        try:
            while not self.stopping.is_set():
                turn = session.next_turn(reply)
                if turn is None:
                    completed = True
                    break
                delay = min(turn.delay_s, self.config.max_think_s) if previous_end is not None else 0.0
                ready = (previous_end + delay) if previous_end is not None else self.elapsed()
                await self._wait_until(ready)
                if self.stopping.is_set() or not self._take_budget():
                    break
                if turns == 0:
                    start = self.elapsed()
                    self.recorder.sessions_started += 1
                sending = turn, Outcome(start=0.0), delay, ready
                outcome = await self._send(turn, session.session_id, sending[1])
                sending = None
                self._record(session, turns, turn, outcome, delay, ready)
                turns += 1
                if not outcome.ok:
                    break
                reply = outcome.text
                previous_end = outcome.end - self.t0
        except asyncio.CancelledError:
            # stopped while waiting or interrupted: keep what the session measured, and a request in
            # flight as unfinished (its first token, if it came, is a TTFT measured like any other)
            if sending is not None and sending[1].start:
                turn, outcome, delay, ready = sending
                outcome.end = time.perf_counter()
                outcome.error = "unfinished: in flight when the run ended"
                self._record(session, turns, turn, outcome, delay, ready, unfinished=True)
                turns += 1
        if turns:
            self.recorder.add_session(
                SessionRecord(session.session_id, session.label, start, self.elapsed(), turns, completed)
            )
        return completed

    def _take_budget(self) -> bool:
        if self._budget is None:
            return True
        if self._budget <= 0:
            self.stop("requests")
            return False
        self._budget -= 1
        if self._budget == 0:
            asyncio.get_running_loop().call_soon(self.stop, "requests")
        return True

    async def _send(self, turn: Turn, session_id: str, outcome: Outcome) -> Outcome:
        async with self._slots:
            self.recorder.in_flight += 1
            self.recorder.sent += 1
            try:
                return await self.client.send(turn, session_id, outcome)
            finally:
                self.recorder.in_flight -= 1

    def _record(
        self,
        session: Session,
        index: int,
        turn: Turn,
        outcome: Outcome,
        delay: float,
        ready: float,
        unfinished: bool = False,
    ) -> None:
        t0 = self.t0
        itl = outcome.itl
        record = RequestRecord(
            session_id=session.session_id,
            turn=index,
            label=session.label,
            start=outcome.start - t0,
            end=outcome.end - t0,
            ok=outcome.ok,
            status=outcome.status,
            ttft=(outcome.first_token - outcome.start) if outcome.first_token is not None else None,
            e2e=(outcome.end - outcome.start) if outcome.ok else None,
            itl_mean=(sum(itl) / len(itl)) if itl else None,
            output_tokens=outcome.output_tokens,
            prompt_tokens=outcome.prompt_tokens,
            cached_tokens=outcome.cached_tokens,
            host_cached_tokens=outcome.host_cached_tokens,
            finish_reason=outcome.finish_reason,
            worker=outcome.worker,
            delay=delay,
            ready=ready,
            tool_result=turn.tool_result,
            error=outcome.error,
            unfinished=unfinished,
        )
        self.recorder.add_request(record, itl)
