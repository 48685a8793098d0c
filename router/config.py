"""The router's tunables, in one Struct so the simulator can sweep them and the gateway can load them."""

from __future__ import annotations

import math

import msgspec

from router.protocol import MAX_SESSION_ID_CHARS
from router.session_affinity import MAX_TTL_S


class RouterConfig(msgspec.Struct, frozen=True, kw_only=True):
    # --- block index
    index_blocks_per_worker_factor: int = 16  # cap per worker = factor x its device blocks (all tiers)
    index_blocks_per_worker_min: int = 1 << 16
    # and at most this many, whatever a registration claims: 16M blocks is ~16x the KV of the largest
    # nodes (device plus host), and the claim is the worker's word (validated only against 2^40)
    index_blocks_per_worker_max: int = 1 << 24
    approx_ttl_s: float = 120.0  # Dynamo's approximate mode: routed blocks count as held this long
    approx_blocks_per_worker: int = 1 << 18
    sweep_entries_per_expire: int = 200_000  # dropped workers' bits come off this many entries per expire

    # --- load view
    report_stale_s: float = 2.0  # an older report's load is ignored; in-flight predictions stand alone
    prefill_ttl_s: float = 120.0  # in-flight prefill with no first token after this is dropped
    inflight_ttl_s: float = 900.0  # in-flight blocks with no completion after this are dropped
    max_inflight: int = 1 << 17

    # --- sessions
    max_sessions: int = 100_000
    max_session_bytes: int = 256 << 20  # the session table's memory (chains mostly), estimated from above
    session_ttl_s: float = 3600.0
    max_session_id_len: int = 256

    # --- baselines
    # give the baselines the gateway's pin hints too (the "same engine" ablation); off: no baseline
    # pins, as none of the systems they are named after does
    pin_baselines: bool = False

    # --- kv_overlap (Dynamo 1.6.1 defaults)
    overlap_score_weight: float = 1.0
    kv_temperature: float = 0.0
    # Dynamo's session affinity, off by default as in Dynamo (`--router-session-affinity-ttl-secs`;
    # router/session_affinity.py): a named session's requests go to the worker its first one was
    # dispatched to, until it has been idle (no request in flight) this long. 0: off
    kv_affinity_ttl_s: float = 0.0
    # Dynamo's router queue, off by default as in Dynamo (`--router-queue-threshold F`,
    # `--router-queue-policy`; router/dynamo_queue.py): a request waits before its pick while every
    # worker it may go to has more than `kv_queue_threshold` x its max_num_batched_tokens of prefill in
    # flight from this router (0: any); `kv_queue_wspt`: shortest uncached prefill first (`wspt`), else
    # in arrival order (`fcfs`, Dynamo's default)
    kv_queue: bool = False
    kv_queue_threshold: float = 0.0
    kv_queue_wspt: bool = False
    # the queue's periodic re-check (Dynamo: 60 s without a prefill load model), besides first tokens
    # and completions; and the wait after which a released request's overlap is read again (Dynamo's
    # DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS, 10 s; 0: never)
    kv_queue_recheck_s: float = 60.0
    kv_queue_refresh_after_s: float = 10.0

    # --- cache_aware (SGLang; Python CLI defaults)
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    cache_max_tree_tokens: int = 1 << 26  # per worker (SGLang's max_tree_size, which counts characters)

    # --- session_sticky
    ring_vnodes: int = 64

    # --- session_kv (ours)
    default_prefill_tok_s: float = 20_000.0  # until a worker reports its measured speed
    # a decode step (ms) until a worker reports its measured decode speed, where the memory wait needs
    # one (router/policies/session_kv.py): a fresh worker's first prompt runs before its first decode
    # step is measured, and a step of 0 predicted no wait at all. 0: that old reading
    default_decode_step_ms: float = 20.0
    # a host-tier block saves this fraction of its prefill, a disk-tier one `disk_credit`: the fallback
    # for a worker that announces no link time; with `price_onboarding` a worker that does (its load
    # report's `host_block_ms`, `disk_block_ms`) has its hits priced at that onboarding cost instead
    host_credit: float = 0.75
    disk_credit: float = 0.25
    price_onboarding: bool = True
    prior_ttl_s: float = 10.0  # a session's just-routed blocks count as held until events confirm them
    affinity_tolerance_ms: float = 2.0  # within this of the best, the session's worker wins
    affinity_tolerance_rel: float = 0.05
    think_default_s: float = 15.0  # think/tool time assumed before a session showed its own
    think_alpha: float = 0.3  # EWMA weight of the latest tool gap
    pin_factor: float = 1.5  # pin for this multiple of the expected tool time
    pin_min_s: float = 5.0
    pin_max_s: float = 120.0
    # a pinned session's blocks are also kept on its worker's host tier for this multiple of the pin (a
    # host holds several times the device's blocks; a tool call that outlasts its pin finds them there)
    host_keep_factor: float = 4.0
    # and, with host_prefetch, brought back this long before the session's expected return (its
    # estimated tool time), by an idle worker, in chunks (docs/TIERS.md)
    host_prefetch: bool = True
    prefetch_lead_s: float = 1.0
    # Also pin when the request said a tool call is pending (the turn carried a tool result), whatever the
    # finish reason: engines that never report "tool_calls" (the mock) still get pins. Turn off when the
    # engines report real finish reasons and a tool loop's final answer should not pin.
    pin_on_tool_result: bool = True
    # memory (docs/EXPERIMENTS.md ideas 2-4): sessions routed to a worker within `live_session_s` are its live
    # contexts; beyond `memory_free_fraction` of its blocks their excess costs `memory_pressure_factor` x
    # its prefill time, every live block `memory_balance_factor` x, and in-flight blocks beyond the
    # worker's capacity `inflight_pressure_factor` x
    live_session_s: float = 120.0
    # a session's context counts as live on its worker once it has come back (this many turns routed
    # before): one-shot requests, inferred sessions of one turn, are not contexts anyone keeps
    live_after_turns: int = 1
    # a session's worker keeps its turn unless it costs more than the best by this many times the
    # prefill time of the context it holds that the cheapest worker lacks (0: the affinity tolerance
    # alone); measured on the live agentic setting, docs/EXPERIMENTS.md ("Live p50")
    session_hold: float = 10.0
    # and that context counts what its worker holds on a lower tier (host, disk) too: a move computes
    # again what staying would onboard. Full cc trace, host tier 4x: session_kv's TTFT mean -2 to -11 %
    # (docs/TIERS.md, "Fifteenth pass"); False: the device's part alone, as before
    session_hold_lower_tiers: bool = True
    prefix_home: bool = True
    # a one-shot request (it continues no session: `router.request.is_one_shot`) over a prefix a worker
    # holds (at least half its prompt) stays with that worker unless it costs more than the best by this
    # many times the held prefix's prefill time (the queue counts each queued token at the pool's average
    # cost, several times its marginal cost in a batched step; a copy splits the prefix's traffic and
    # doubles its blocks in use)
    prefix_home_hold: float = 0.0  # off: 10 won on the earlier mock engine, lost on the calibrated one
    # that hold, at least, while the copies of the prefixes one-shot traffic keeps coming back to fill
    # `memory_free_fraction` of the pool's blocks: a further copy then evicts another hot prefix
    # (router/policies/hot_prefixes.py; docs/EXPERIMENTS.md, idea 16). 0: off
    crowded_prefix_hold: float = 10.0
    # a copy of a hot prefix valued over the run: a worker lacking it is credited the waits the copy would
    # spare the requests after it, and a prefix home that the cheapest worker matches gets no preference,
    # so the copies are used (docs/SESSION_KV.md, "One-shot traffic"). On: it wins runs of steady document
    # traffic past ~100 s, where a copy pays back, and gives back part of the first minute's win
    # (EXPERIMENTS.md, idea 18)
    copy_value: bool = True
    used_from_report: bool = True
    # a one-shot request is placed by its estimated TTFT: prefill at the pool's marginal
    # cost per token (router/prefill_fit.py), a busy worker's steps to wait out (docs/SESSION_KV.md)
    one_shot_ttft: bool = True
    # until that marginal cost is first fitted, a one-shot request is placed by NVIDIA
    # Dynamo's block cost (prefill blocks + distinct blocks in flight), which needs no calibration: the
    # average cost per token prices a miss several times too dear, and the copies of a hot document
    # made while the pool warms up serve every later request (docs/EXPERIMENTS.md, idea 15)
    one_shot_warmup: bool = True
    stall_fullness_floor: float = 0.0
    memory_free_fraction: float = 0.8
    memory_pressure_factor: float = 0.4
    memory_balance_factor: float = 0.01
    inflight_pressure_factor: float = 1.0
    # a named session's turn that would wait on its chosen worker for running requests to free device
    # memory (router/policies/memory_wait.py) goes to a nearly idle worker with room for it now, or back
    # to its session's worker when the wait there is shorter, where that worker's estimate is below the
    # chosen one's plus this many times the predicted wait (0: off; docs/SESSION_KV.md, "The choice")
    memory_wait_move: float = 1.0
    # a prompt in chunked prefill on a worker counts at its whole size where a turn's fit there is judged
    # (the session hold's and the memory wait's): the worker's report counts only the blocks the prefill
    # has taken so far, so a turn sent beside a long prompt's first chunk looked as if it fit, then waited
    # for that prompt's decode (docs/EXPERIMENTS.md, idea 19). False: the report's count alone
    count_prefill_in_progress: bool = True
    # a sub-agent's first turn on its parent's worker: the prefix of its prompt that a request in flight
    # there holds (its parent's turn) takes no new blocks, so it adds nothing to the in-flight pressure;
    # counted whole, the child was priced as if it did not fit beside its parent and prefilled the shared
    # context on another worker (idea 19). False: counted whole
    parent_prefix_in_use: bool = True
    # on a worker with picks held at the router for device memory (a jam), a named session's cached
    # prefix is credited only as far as it survives the prompts queued there before its turn (the
    # blocks they compute come out of those no running request holds, evicting cached ones): on the
    # full cc trace giant turns went to the worker whose index still showed their context, which the
    # giants queued there then evicted (docs/EXPERIMENTS.md, "A cached prefix credited only as far as
    # it survives the queue"). False: the index's prefix, whole
    credit_survives_queue: bool = True
    # a worker running only one-shot requests is a way out of that wait too, where the turn
    # fits now: their blocks free within their short decodes, and the steps they run anyway carry the
    # turn's prefill at the pool's marginal cost per token, the price their own estimate puts on a token
    # (docs/EXPERIMENTS.md, idea 20)
    memory_wait_one_shot: bool = True
    # a worker whose report runs fewer requests than the router saw decoding there preempted the rest
    # (the last admitted first): the memory wait counts them as queued at the head of its queue, holding
    # no blocks, and a decode the worker took back resumes from the tokens it had, not from its first
    # token (docs/EXPERIMENTS.md, idea 21). False: every request past its first token decodes on
    memory_wait_preempted: bool = False
    # the pool's marginal prefill cost (router/prefill_fit.py) is fitted on the first tokens of requests
    # that named no session, the ones it prices: a named turn's latency may carry seconds of waiting for
    # device memory, and a few of those over long prompts set the slope (docs/EXPERIMENTS.md, idea 20)
    fit_one_shot_only: bool = True
    # a one-shot request is charged the live sessions' memory excess (beyond
    # `memory_free_fraction` of the worker's blocks) for at most its own blocks: the rest is theirs, and
    # charged whole it crowded the questions onto the workers no session lived on (idea 20)
    one_shot_own_excess: bool = True
    # with a host tier (the worker's load report gives its size), live blocks beyond the device that fit
    # on the host cost only the onboarding (1 - host_credit) of the memory pressure. Off: it gathers
    # sessions whose running turns then wait for device room (docs/TIERS.md)
    memory_counts_host: bool = False
    # a prefill on a worker stalls the requests running there (a step that carries a chunk of it is that
    # much longer for all of them), and while memory is full that stall holds their blocks and delays
    # every admission: missing tokens cost `stall_factor` x running requests x the worker's memory
    # fullness (in-flight blocks plus this prompt over its capacity, at most 1) times more (idea 10)
    stall_factor: float = 2.0
    # a running one-shot request counts in that stall at the pool's marginal cost per token
    # over its average (the price its own TTFT estimate puts on a token), a session's turn whole (idea 17).
    # True: every running request counts whole, the pricing that segregated mixed traffic
    stall_counts_one_shot: bool = False
    # admission by session (router/admission.py; session_kv only): while the resident sessions' contexts
    # (turns in flight or pinned) fill `admission_fill` of the pool's blocks, other sessions' turns wait,
    # at most `admission_max_hold_s`; at most `admission_max_held` turns wait at once; a turn whose
    # prefix of at least `admission_cached_fraction` of its blocks is cached on a worker never waits
    # `admission_yield`: at its tool boundary a resident session with more attained service than the
    # blocked head of the queue leaves the resident set (its next turn queues) so the head gets in
    session_admission: bool = False  # off: on the capacity-bound trace its holds cost more than they save
    admission_cached_fraction: float = 0.5
    admission_yield: bool = True
    admission_fill: float = 1.1
    admission_max_hold_s: float = 10.0
    admission_max_held: int = 4096
    # room (router/room.py; session_kv only): a picked request whose worker has no KV room for its prompt
    # waits at the router, not in the engine's first-come-first-served queue where it would hold up the
    # requests behind it; at most `room_max_hold_s`, at most `room_max_held` at once. Off: on the cc
    # trace it cuts TTFT p90 by 13-15 %, and the mean by -15 % to +5 % over four runs, as the giant
    # sessions it parks pay much of what the others save (docs/EXPERIMENTS.md)
    room_hold: bool = False
    room_max_hold_s: float = 60.0
    room_max_held: int = 4096
    # EASY backfilling in the room queue: a worker's oldest held request reserves it, and a request that
    # fits passes it only if expected (its session's past turns' run times) to complete before the held
    # one could start, or if it fits beside it then (router/room.py). Off: on the cc trace with the host
    # tier it lost to the room queue alone on both seeds (docs/EXPERIMENTS.md, "Host tier, fourth pass")
    room_backfill: bool = False
    # memory hold (router/memory_hold.py; session_kv only): a pick predicted to wait more than
    # `memory_hold_min_wait_ms` on its worker for device memory (router/policies/memory_wait.py) waits at
    # the router, not at the head of the engine's first-come-first-served queue, where every request
    # routed behind it would wait too; every held pick re-checked every `memory_hold_recheck_s` and
    # after completions, sent after `memory_hold_max_s` whatever the wait (`memory_hold_crowded_max_s`
    # while other picks are held for the same worker: they would all wait behind it), at most
    # `memory_hold_max_held` at once. `memory_hold_recheck_s` 0: a held pick is re-checked only when its
    # worker's state changes (a load report, a first token, a completion, a pick sent there, the worker
    # leaving, its report going stale); docs/EXPERIMENTS.md, "Memory hold, second pass"
    memory_hold: bool = True
    memory_hold_min_wait_ms: float = 2000.0
    memory_hold_max_s: float = 20.0
    memory_hold_recheck_s: float = 0.1
    memory_hold_max_held: int = 4096
    memory_hold_crowded_max_s: float = 60.0
    # a pick sent by its bound takes the shorter picks held for its worker with it, shortest first and
    # ahead of it (router/memory_hold.py): full cc trace mean -1.4 % over three policy draws, the live
    # window unchanged (docs/EXPERIMENTS.md, "The full cc trace turn by turn"). False: it goes alone
    memory_hold_shortest_first: bool = True
    # overload queue (router/overload_queue.py; session_kv only, not with `session_admission`): while
    # every worker is busy a turn waits before its pick, shortest predicted prefill first (as NVIDIA
    # Dynamo's router queue with `wspt`; `overload_fcfs`: in arrival order); one is picked per worker
    # that frees up, on the state of then, and any after `overload_max_hold_s`. Busy: the router has more
    # than `overload_busy_tokens` of prefill in flight there (sent or held, before its first token:
    # Dynamo's test at threshold 0), or, with `overload_busy_memory`, a pick there is held for device
    # memory (`memory_hold`)
    overload_queue: bool = False
    overload_busy_tokens: int = 0
    overload_busy_memory: bool = False
    overload_fcfs: bool = False
    overload_max_hold_s: float = 30.0
    overload_max_held: int = 4096
    # on a worker whose engine schedules by priority (SGLang's --enable-priority-scheduling, announced in
    # its registration), send a turn's decode as a second request that every prompt outranks, so that a
    # prompt that does not fit preempts decodes rather than waits for them (Router.decode_priority;
    # session_kv only, and only for a caller that can split a turn: Router(splits_turns=True), the
    # simulator). No effect on engines that do not schedule by priority
    yield_decodes: bool = True
    # the same on a first-come-first-served worker with a host tier (its registration's `host_blocks`),
    # the decode part at the default priority: it queues behind every prompt sent before it, so prompts
    # get device memory first, and finds its blocks on the host where the prompts it let in evicted
    # them. On the cc trace with the host tier at 4x it cuts session_kv's TTFT mean 9-21 % for 4-5 %
    # more e2e; without a host tier the decode parts recompute what was evicted, and it does not pay
    # (docs/EXPERIMENTS.md, "Host tier, seventh pass")
    split_fcfs: bool = True
    # on a worker that gets turns split by `split_fcfs`, the decode part in slices of at most this many
    # tokens (0: whole), each a request of its own (the prompt and the output so far) queued behind the
    # prompts sent before it: a preemption the gateway makes every slice on a first-come-first-served
    # engine (Router.decode_slice_tokens; the gateway joins the parts into one answer, as the
    # simulator sends them). On the cc trace with the host tier at 4x, 256 cuts session_kv's TTFT mean
    # 35-43 % below one decode part for 5-10 % more e2e (docs/EXPERIMENTS.md, "Host tier, eighth pass");
    # re-measured with a slice's earlier output found, 128 and 64 cost 13 % and 38 % more e2e on the full
    # trace for a mean 5 % and 1 % lower (seed 0; "ninth pass")
    decode_slice_tokens: int = 256
    # where decodes go in slices, a prompt part sent to a worker whose last fresh load report says it does
    # not fit beside the blocks in use (or that requests wait there) has the newest running slices there
    # cut (the gateway closes their streams; each goes on as the next slice, queued behind the prompt)
    # until their blocks cover the shortfall: the room an engine that lets prompts preempt decodes would
    # give (router/running_slices.py; only a streamed answer's slices: a whole answer's part has relayed
    # nothing it could go on from). Full cc trace, host tier 4x: session_kv's TTFT mean -13 to -16 %,
    # p90 -10 to -18 %, e2e +2 to +4 % (docs/TIERS.md, "Eleventh pass")
    cut_slices: bool = True
    # and every slice still queued there (no first token yet, so no room to give) is cut too, whatever
    # the shortfall: it goes on behind the prompt instead of heading the queue in front of it. Full cc
    # trace, host tier 4x: session_kv's TTFT mean -9 to -15 %, p90 -16 to -25 %, e2e -2 to +2 %
    # (docs/TIERS.md, "Twelfth pass")
    cut_queued_slices: bool = True
    # and session_kv sees such workers as ones whose decodes yield to prompts, as on an engine that
    # preempts them: a turn there keeps its session's worker though it does not fit beside the running
    # requests, and no wait for their memory is charged or predicted. Full cc trace, host tier 4x:
    # session_kv's TTFT mean -4 to -12 %, hit rate 0.92 -> 0.93 (docs/TIERS.md, "Fourteenth pass")
    cut_slices_yield: bool = True
    # where decodes go in slices, a prompt whose tokens not held on its worker (on the device or the
    # host, by the index) exceed this goes there in pieces first: requests for its first held + k x this
    # many tokens with max_tokens 1, each sent when the one before ends, so that the prompts sent
    # meanwhile queue in front of the next piece instead of waiting for the whole prefill, which holds
    # the step's token budget on a first-come-first-served engine (Router.prefill_pieces; the gateway
    # sends them, as the simulator does). Full cc trace, host tier 4x: session_kv's TTFT mean -4 to
    # -11 % (docs/TIERS.md, "Thirteenth pass"); 0: every prompt in one part
    prefill_piece_tokens: int = 65536
    max_running_slices: int = 65536  # slices in flight the router keeps for that (the oldest go first)

    def __post_init__(self) -> None:
        bounded = ["max_sessions", "max_session_bytes", "max_inflight", "approx_blocks_per_worker"]
        bounded.append("cache_max_tree_tokens")
        for name in bounded:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 1 <= self.index_blocks_per_worker_min <= self.index_blocks_per_worker_max:
            raise ValueError("need 1 <= index_blocks_per_worker_min <= index_blocks_per_worker_max")
        if not 0 <= self.pin_min_s <= self.pin_max_s:
            raise ValueError("need 0 <= pin_min_s <= pin_max_s")
        if not 0 <= self.max_session_id_len <= MAX_SESSION_ID_CHARS:  # pin hints carry the ids
            raise ValueError(f"max_session_id_len must be between 0 and {MAX_SESSION_ID_CHARS}")
        if self.decode_slice_tokens < 0:
            raise ValueError("decode_slice_tokens must not be negative")
        if self.prefill_piece_tokens < 0:
            raise ValueError("prefill_piece_tokens must not be negative")
        if self.max_running_slices < 0:
            raise ValueError("max_running_slices must not be negative")
        if self.host_keep_factor < 0:
            raise ValueError("host_keep_factor must not be negative")
        if not 0 <= self.think_alpha <= 1:
            raise ValueError("think_alpha must be within [0, 1]")
        memory = (
            self.stall_factor,
            self.live_session_s,
            self.memory_free_fraction,
            self.memory_pressure_factor,
            self.memory_balance_factor,
            self.inflight_pressure_factor,
        )
        if min(memory) < 0:
            raise ValueError("the session_kv memory settings cannot be negative")
        if not self.admission_fill > 0 or self.admission_max_hold_s < 0 or self.admission_max_held < 0:
            raise ValueError("need admission_fill > 0 and non-negative admission hold bounds")
        if min(self.overload_busy_tokens, self.overload_max_hold_s, self.overload_max_held) < 0:
            raise ValueError("the overload queue's bounds cannot be negative")
        if self.room_max_hold_s < 0 or self.room_max_held < 0:
            raise ValueError("need non-negative room_max_hold_s and room_max_held")
        if self.default_prefill_tok_s <= 0:
            raise ValueError("default_prefill_tok_s must be positive")
        if self.default_decode_step_ms < 0:
            raise ValueError("default_decode_step_ms cannot be negative")
        if self.kv_temperature < 0 or self.cache_threshold < 0:
            raise ValueError("kv_temperature and cache_threshold cannot be negative")
        if self.kv_affinity_ttl_s and not 1 <= self.kv_affinity_ttl_s <= MAX_TTL_S:
            raise ValueError(f"kv_affinity_ttl_s must be 0 (off) or between 1 and {MAX_TTL_S} (Dynamo's)")
        if not (math.isfinite(self.kv_queue_threshold) and self.kv_queue_threshold >= 0):
            raise ValueError("kv_queue_threshold must be a finite value >= 0")
        if not self.kv_queue_recheck_s > 0 or self.kv_queue_refresh_after_s < 0:
            raise ValueError("need kv_queue_recheck_s > 0 and kv_queue_refresh_after_s >= 0")
