"""Continuous batching: which sequences compute which tokens in the next step.

Running sequences go first (decode and the rest of chunked prefills), then waiting ones are admitted
while the step's token budget, `max_num_seqs` and free blocks allow. As in vLLM v1 (and Dynamo's
mocker, which models it): a waiting sequence is admitted when its whole prompt fits in the blocks not
in use, less its cached prefix (looked up at admission), but it gets blocks only for the tokens it
computes in this step; each later chunk allocates its own. A chunk's full blocks join the prefix
cache when it is scheduled (vLLM's allocate_slots caches them then), so a sequence admitted later in
the same step hits them instead of computing them again. When a running sequence needs a block and
none is free, the most recently admitted sequence is preempted: its blocks are freed (they stay in
the prefix cache) and it is recomputed when readmitted. There is no watermark (vLLM v1 has none).

With `preempt_for_prompts` (off by default), a prompt at the head of the queue that has not started
and does not fit preempts running sequences that are decoding (their first token is out), the most
recently admitted first, when that makes it fit: a prompt waiting for its first token outranks a
decode. The preempted ones queue behind every prompt not started (those that arrive later included)
and resume from the prefix cache (or the host tier, where their evicted blocks go) when they are the
head and fit, so a turn's first token waits neither for other turns' decodes nor behind them.

With `priority_threshold` set (priority scheduling, off by default), as SGLang's
`--enable-priority-scheduling` (its preemption on by default, `--priority-scheduling-preemption-threshold`
the threshold, 10 by default; larger values first, its default order): the queue is ordered by each
request's `priority`, first come first served within one, and a head of the queue that does not fit
preempts running requests whose first token is out (SGLang's running batch) and whose priority is
lower than the head's by more than the threshold, the lowest priority first and, within one, the most
recently admitted first, as many as make it fit, or none when all of them would not. A preempted
request goes back to the queue at the front of its priority. With every priority equal (a client that
sends none) nothing is reordered or preempted: the scheduler is exactly the first-come-first-served one.

With `onboard_async` (the engine's default, `EngineConfig.onboarding`; off in a bare scheduler, which
has no engine to time the copies), a waiting sequence whose prefix continues on the host tier is
admitted with its blocks (the onboarded ones filled by copies the engine times) but computes nothing
until the copies have landed (`Sequence.ready_at`, set by the engine), while the others go on, as
vLLM's CPU offloading connector loads a request's blocks asynchronously (WAITING_FOR_REMOTE_KVS).
"""

from __future__ import annotations

import math
from collections import deque
from operator import attrgetter

from engines.block_manager import BlockManager
from engines.sequence import Sequence, SequenceStatus

_priority = attrgetter("priority")


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        preempt_for_prompts: bool = False,
        priority_threshold: int | None = None,
        onboard_async: bool = False,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if preempt_for_prompts and priority_threshold is not None:
            raise ValueError("preempt_for_prompts and priority scheduling are two engines: choose one")
        if priority_threshold is not None and priority_threshold < 0:
            raise ValueError("the priority preemption threshold cannot be negative")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preempt_for_prompts = preempt_for_prompts
        self.priority_threshold = priority_threshold
        # a sequence admitted with host blocks to onboard waits for their copies without computing
        # (vLLM's offloading connector loads asynchronously, between steps); the engine times them
        self.onboard_async = onboard_async
        self.loading: list[Sequence] = []  # admitted this step to wait for their copies
        self.waiting: deque[Sequence] = deque()
        self._resumed: set[str] = set()  # preempted for a prompt: the tail of `waiting`, behind prompts
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if self.priority_threshold is not None:
            self._enqueue(seq, behind_equals=True)
        elif self._resumed:
            self.waiting.insert(len(self.waiting) - len(self._resumed), seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, now: float = 0.0) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """The step's work as (sequence, tokens to compute) pairs, and the sequences that cannot
        ever fit (finished here with reason "length"). `now`: running sequences whose onboarded blocks
        land later (`Sequence.ready_at`) sit this step out."""
        if self.waiting and (self.preempt_for_prompts or self.priority_threshold is not None):
            self._make_room_for_head()
        scheduled: list[tuple[Sequence, int]] = []
        too_long: list[Sequence] = []
        budget, preempted = self._schedule_running(now, scheduled, too_long)
        if not preempted:  # admitting while others are being preempted would only thrash
            self._admit_waiting(budget, scheduled, too_long)
        return scheduled, too_long

    def _schedule_running(
        self, now: float, scheduled: list[tuple[Sequence, int]], too_long: list[Sequence]
    ) -> tuple[int, bool]:
        """The running sequences' next tokens, first admitted first, while the step's token budget
        lasts, into `scheduled`: the budget left, and whether a sequence was preempted for a block."""
        bm = self.block_manager
        block_size = bm.block_size
        budget = self.max_num_batched_tokens
        preempted = False
        running = self.running
        i = 0
        while i < len(running) and budget:
            seq = running[i]
            if seq.ready_at > now:  # its blocks are still on their way from the host
                i += 1
                continue
            # the pending tokens, inline: every running sequence, every step
            computed = seq.num_computed_tokens
            n = len(seq.token_ids) - computed
            if n > budget:
                n = budget
            if computed + n > len(seq.block_table) * block_size:
                appended, preempted_now = self._append_or_preempt(seq, n, too_long)
                preempted = preempted or preempted_now
                if not appended:
                    break
                bm.commit(seq, computed + n)
            elif (computed + n) // block_size > seq.num_committed_blocks:
                # the common decode step: its slot is in a block it already holds
                bm.commit(seq, computed + n)
            scheduled.append((seq, n))
            budget -= n
            i += 1
        return budget, preempted

    def _append_or_preempt(self, seq: Sequence, n: int, too_long: list[Sequence]) -> tuple[bool, bool]:
        """Blocks for `seq`'s next `n` tokens, preempting the most recently admitted running sequences
        (`seq` last) until they fit: whether `seq` got them, and whether a sequence was preempted.
        Alone and still out of blocks, `seq` outgrew the whole cache: it ends in `too_long`."""
        bm = self.block_manager
        running = self.running
        preempted = False
        while not bm.can_append(seq, n):
            if len(running) == 1:
                running.pop()
                bm.free(seq)
                self._end_too_long(seq, too_long)
                return False, preempted
            victim = running.pop()
            self._preempt(victim)
            preempted = True
            if victim is seq:
                return False, preempted
        bm.append_slots(seq, n)
        return True, preempted

    def _admit_waiting(
        self, budget: int, scheduled: list[tuple[Sequence, int]], too_long: list[Sequence]
    ) -> None:
        """Waiting sequences from the head of the queue, while the budget, `max_num_seqs` and the free
        blocks allow; one that can never fit ends in `too_long`."""
        bm = self.block_manager
        waiting = self.waiting
        while waiting and budget and len(self.running) < self.max_num_seqs:
            seq = waiting[0]
            if bm.blocks_needed(len(seq)) > bm.num_blocks:
                waiting.popleft()
                self._resumed.discard(seq.seq_id)
                self._end_too_long(seq, too_long)
                continue
            hits = bm.match_prefix(seq)
            if not bm.can_allocate(seq, hits):
                break
            waiting.popleft()
            if self._resumed:
                self._resumed.discard(seq.seq_id)
            onboard = bm.match_host(seq, hits)
            if onboard and self.onboard_async:
                self._admit_loading(seq, hits, onboard)
            else:
                budget -= self._admit_computing(seq, hits, onboard, budget, scheduled)

    def _admit_loading(self, seq: Sequence, hits: int, onboard: int) -> None:
        """`seq` with its blocks now and its first chunk once their copies have landed (the engine
        times them and sets `ready_at`)."""
        self.block_manager.allocate(seq, hits, onboard, 0)
        seq.status = SequenceStatus.RUNNING
        seq.ready_at = math.inf
        self.running.append(seq)
        self.loading.append(seq)

    def _admit_computing(
        self, seq: Sequence, hits: int, onboard: int, budget: int, scheduled: list[tuple[Sequence, int]]
    ) -> int:
        """`seq` running, its first chunk in `scheduled`: the tokens that chunk computes."""
        bm = self.block_manager
        n = min(len(seq.token_ids) - (hits + onboard) * bm.block_size, budget)
        # blocks for this step's chunk only: the rest come chunk by chunk (as vLLM's allocate_slots)
        bm.allocate(seq, hits, onboard, n)
        bm.commit(seq, seq.num_computed_tokens + n)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        scheduled.append((seq, n))
        return n

    @staticmethod
    def _end_too_long(seq: Sequence, too_long: list[Sequence]) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "length"
        too_long.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a running or waiting sequence and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            self._resumed.discard(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def decodes_to_preempt(self) -> list[Sequence]:
        """With `preempt_for_prompts`: the decoding sequences, most recently admitted first, whose
        preemption lets the head of the queue (a prompt not started, that does not fit) in; none when
        all of them would not. With priority scheduling: the running sequences past their first token
        that the head outranks by more than the threshold, the lowest priority first, as many as let
        it in; none when all of them would not."""
        if self.priority_threshold is not None:
            return self._outranked_to_preempt(self.priority_threshold)
        head = self.waiting[0] if self.waiting else None
        if head is None or head.num_output_tokens:
            return []
        wanted = self._blocks_wanted(head)
        if not wanted:
            return []
        # decoding: the first token is out and only the sampled one is left to compute
        victims = [
            s for s in reversed(self.running) if s.num_output_tokens and len(s) - s.num_computed_tokens == 1
        ]
        freed = sum(map(self._blocks_freed, victims))
        return victims if self.block_manager.num_free + freed >= wanted else []

    def _outranked_to_preempt(self, threshold: int) -> list[Sequence]:
        head = self.waiting[0] if self.waiting else None
        wanted = self._blocks_wanted(head) if head is not None else 0
        if head is None or not wanted:
            return []
        floor = head.priority - threshold
        # past the first token (SGLang's running batch), outranked; the sort is stable, so within a
        # priority the most recently admitted stays first
        outranked = [s for s in reversed(self.running) if s.num_output_tokens and s.priority < floor]
        outranked.sort(key=_priority)
        free = self.block_manager.num_free
        victims = []
        for victim in outranked:
            victims.append(victim)
            free += self._blocks_freed(victim)
            if free >= wanted:
                return victims
        return []

    def _blocks_wanted(self, head: Sequence) -> int:
        """The fresh blocks `head` needs beyond its cached prefix when it does not fit now but could
        run once running sequences make room (a slot free, not larger than the whole cache); else 0."""
        bm = self.block_manager
        if len(self.running) >= self.max_num_seqs:
            return 0
        need = bm.blocks_needed(len(head))
        if need > bm.num_blocks:
            return 0
        hits = bm.match_prefix(head)
        return 0 if bm.can_allocate(head, hits) else need - hits

    def _blocks_freed(self, seq: Sequence) -> int:
        """Blocks that preempting `seq` would free: those no other sequence holds."""
        refs = self.block_manager.ref_counts
        return sum(1 for block_id in seq.block_table if refs[block_id] == 1)

    def _make_room_for_head(self) -> None:
        head = self.waiting[0]
        bm = self.block_manager
        by_priority = self.priority_threshold is not None
        for victim in self.decodes_to_preempt():
            self.running.remove(victim)
            if by_priority:
                self._preempt(victim)
            else:
                self._preempt(victim, len(self.waiting))
                self._resumed.add(victim.seq_id)
            if bm.can_allocate(head, bm.match_prefix(head)):
                return

    def _preempt(self, seq: Sequence, position: int = 0) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.ready_at = 0.0
        seq.status = SequenceStatus.WAITING
        if self.priority_threshold is not None:
            self._enqueue(seq, behind_equals=False)
        else:
            self.waiting.insert(position, seq)
        self.num_preemptions += 1

    def _enqueue(self, seq: Sequence, behind_equals: bool) -> None:
        """Priority scheduling: `seq` into the queue behind the higher priorities, and behind its own
        priority (an arrival) or in front of it (a preempted sequence, admitted before them)."""
        waiting = self.waiting
        priority = seq.priority
        last = waiting[-1].priority if waiting else None
        if last is None or last > priority or (behind_equals and last == priority):
            waiting.append(seq)  # the common case: every request of one priority
            return
        for i, other in enumerate(waiting):
            if other.priority < priority or (not behind_equals and other.priority == priority):
                waiting.insert(i, seq)
                return
        waiting.append(seq)
