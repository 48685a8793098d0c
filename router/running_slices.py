"""The decode slices in flight on each worker: the device room a prompt that does not fit may take.

On a first-come-first-served engine a waiting prompt never preempts a running request, so where the
gateway sends a turn's decode in slices (router.py `decode_slice_tokens`) a prompt that does not fit
waits at the head of the worker's queue until running slices end, each holding its whole context.
The gateway can end one sooner: closing a slice's stream aborts it (the worker frees its blocks, which
stay in its prefix cache), and the slice goes on as the next one, queued behind the prompt, as an
engine that lets prompts preempt decodes would do. This keeps the slices sent to each worker, newest
last, and names the newest ones whose blocks cover a shortfall (docs/TIERS.md, "Eleventh pass").
A slice whose first token has not come yet is queued there (or copying its blocks back from the
host): it holds no room to give, but it heads the queue in front of the prompt, and one that does
not fit keeps every prompt behind it waiting. Those are cut first, all of them, so that they go on
behind the prompt, as an engine that orders its queue by priority would place them ("Twelfth pass").

Pure bookkeeping; the router decides when a prompt falls short.
"""

from __future__ import annotations


class RunningSlices:
    def __init__(self, max_slices: int, cut_queued: bool = True) -> None:
        if max_slices < 0:
            raise ValueError("max_slices cannot be negative")
        self.max_slices = max_slices
        self.cut_queued = cut_queued
        self._by_worker: dict[str, dict[str, int]] = {}  # worker -> slice id -> its blocks, newest last
        self._worker_of: dict[str, str] = {}  # slice id -> its worker
        self._running: set[str] = set()  # of those, the ones whose first token came
        self.cut_total = 0

    def __len__(self) -> int:
        return len(self._worker_of)

    def sent(self, slice_id: str, worker_id: str, blocks: int) -> None:
        """A slice of `blocks` prompt blocks went to `worker_id` (past the bound, the oldest is forgotten:
        it is the last that would be cut)."""
        self.ended(slice_id)
        if len(self._worker_of) >= self.max_slices:
            if not self.max_slices:
                return
            self.ended(next(iter(self._worker_of)))
        self._by_worker.setdefault(worker_id, {})[slice_id] = blocks
        self._worker_of[slice_id] = worker_id

    def started(self, slice_id: str) -> None:
        """The slice's first token came: it runs, holding its blocks (unknown ids are ignored)."""
        if slice_id in self._worker_of:
            self._running.add(slice_id)

    def ended(self, slice_id: str) -> None:
        """The slice finished, failed or was cut: it holds nothing any more (unknown ids are ignored)."""
        self._running.discard(slice_id)
        worker_id = self._worker_of.pop(slice_id, None)
        if worker_id is None:
            return
        on_worker = self._by_worker[worker_id]
        del on_worker[slice_id]
        if not on_worker:
            del self._by_worker[worker_id]

    def remove_worker(self, worker_id: str) -> None:
        """Forget the slices in flight on a worker that left."""
        for slice_id in self._by_worker.pop(worker_id, {}):
            del self._worker_of[slice_id]
            self._running.discard(slice_id)

    def on(self, worker_id: str) -> list[str]:
        """The slices in flight on `worker_id`, oldest first."""
        return list(self._by_worker.get(worker_id, ()))

    def running_on(self, worker_id: str) -> list[str]:
        """Of those, the ones whose first token came, oldest first."""
        return [slice_id for slice_id in self._by_worker.get(worker_id, ()) if slice_id in self._running]

    def to_cut(self, worker_id: str, short_blocks: int) -> list[str]:
        """The slices on `worker_id` to cut for a prompt `short_blocks` short of room, forgotten here (the
        caller cuts them): with `cut_queued`, every queued one (no first token yet), then the newest
        running ones whose blocks together cover the shortfall (all of them where they do not)."""
        on_worker = self._by_worker.get(worker_id)
        if not on_worker:
            return []
        running = self._running
        cut = [slice_id for slice_id in on_worker if slice_id not in running] if self.cut_queued else []
        for slice_id in reversed(on_worker):
            if short_blocks <= 0:
                break
            if slice_id in running or not self.cut_queued:
                cut.append(slice_id)
                short_blocks -= on_worker[slice_id]
        for slice_id in cut:
            self.ended(slice_id)
        self.cut_total += len(cut)
        return cut
