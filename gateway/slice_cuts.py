"""Decode slices of streamed answers in flight, which a prompt that does not fit on their worker may cut.

Where the router sends a turn's decode in slices (gateway/split_turn.py), a prompt sent to a
first-come-first-served worker that has no device room waits until running slices end. The router
names the newest slices whose blocks cover the shortfall (`Router.slices_to_cut`); their answers close
those slices' streams (the worker aborts them, their blocks stay in its prefix cache) and go on with the
next slice from the output relayed so far, queued behind the prompt; a slice whose first token has not
come is still queued there, in front of the prompt, and is cut too. Only a streamed answer's slices
are cut: a whole answer's part has relayed nothing, and would lose its output.
"""

from __future__ import annotations

from typing import Protocol

from router.router import Router


class CuttableAnswer(Protocol):
    def cut(self, slice_id: str) -> bool:
        """End the slice now and go on with the next one; False when it is no longer running."""
        ...


class SliceCuts:
    def __init__(self, router: Router) -> None:
        self.router = router
        self._answers: dict[str, CuttableAnswer] = {}  # slice id -> the answer it is a part of

    def __len__(self) -> int:
        return len(self._answers)

    def sent(self, slice_id: str, answer: CuttableAnswer, worker_id: str, blocks: int) -> None:
        """A slice of `blocks` prompt blocks went to `worker_id` for `answer`."""
        self._answers[slice_id] = answer
        self.router.slice_sent(slice_id, worker_id, blocks)

    def started(self, slice_id: str) -> None:
        """The slice's first token came: it runs, no longer queued at its worker."""
        if slice_id in self._answers:
            self.router.slice_started(slice_id)

    def ended(self, slice_id: str) -> None:
        """The slice ended (done, failed, given up): nothing to cut any more."""
        if self._answers.pop(slice_id, None) is not None:
            self.router.slice_ended(slice_id)

    def cut_for(self, worker_id: str, chain: list[int], now: float) -> int:
        """A prompt of `chain` was just sent to `worker_id`: cut the slices the router names for it there;
        how many were cut."""
        cut = 0
        for slice_id in self.router.slices_to_cut(worker_id, chain, now):
            answer = self._answers.pop(slice_id, None)
            if answer is not None and answer.cut(slice_id):
                cut += 1
        return cut
