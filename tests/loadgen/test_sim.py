"""`kvgate sim` on small generated traces: determinism, closed-loop timing, conservation, a case whose
answer is known by construction, fast-forward equivalence, and the CLI's JSON object."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable

import pytest

from engines.engine import RequestOutput
from gateway.cli import main
from loadgen.sim.compare import POLICIES, compare, default_jobs, parse_policies
from loadgen.sim.fastforward import DecodeRun
from loadgen.sim.metrics import RequestRecord, summarize
from loadgen.sim.oracle import oracle_figures
from loadgen.sim.simulation import SimConfig, Simulation
from loadgen.sim.worker import SimWorker
from loadgen.sim.workload import Workload
from loadgen.trace import TraceRow
from router.config import RouterConfig
from router.protocol import BlockStored, KvEvent, KvEventBatch, KvStateDump, LoadReport
from router.router import Router

TRACE_BLOCK = 128
BLOCK = 16


def agent_sessions(
    n_sessions: int, turns: int, seed: int, *, shared_blocks: int = 2, start_gap_ms: float = 300.0
) -> list[TraceRow]:
    """Sessions whose every turn extends the previous prompt by a few trace blocks (agent-like)."""
    rng = random.Random(seed)
    rows: list[TraceRow] = []
    next_id = 1000
    for s in range(n_sessions):
        ids = list(range(shared_blocks))  # a system prompt shared by every session
        for turn in range(turns):
            for _ in range(rng.randint(1, 3)):
                ids.append(next_id)
                next_id += 1
            rows.append(
                TraceRow(
                    timestamp=s * start_gap_ms + turn,
                    input_length=len(ids) * TRACE_BLOCK - rng.randrange(TRACE_BLOCK // 2),
                    output_length=rng.randint(5, 40),
                    hash_ids=list(ids),
                    session_id=f"s{s}",
                    turn=turn,
                    delay_ms=0.0 if turn == 0 else rng.choice([200.0, 1500.0, 90_000.0]),
                    stop=rng.choice(["tool_use", "tool_use", "end_turn"]),
                )
            )
    rows.sort(key=lambda r: r.timestamp)
    return rows


def workload(rows: list[TraceRow], **kwargs: float) -> Workload:
    return Workload(rows, block_size=BLOCK, trace_block_size=TRACE_BLOCK, **kwargs)  # type: ignore[arg-type]


def small_config(**kwargs: object) -> SimConfig:
    base: dict[str, object] = {
        "workers": 3,
        "num_blocks": 256,
        "block_size": BLOCK,
        "max_num_batched_tokens": 512,
    }
    base.update(kwargs)
    return SimConfig(**base)  # type: ignore[arg-type]


def test_same_seed_same_numbers_and_seed_matters() -> None:
    rows = agent_sessions(6, 6, seed=1)
    runs = [
        compare("gen", workload(rows), ["random", "session_kv"], small_config(seed=seed))[0]
        for seed in (3, 3, 4)
    ]
    assert runs[0] == runs[1]
    assert runs[0].policies["random"] != runs[2].policies["random"]


def test_parallel_policies_give_the_numbers_of_one_process() -> None:
    # forked children inherit the hashed workload; their results come back in the caller's order
    rows = agent_sessions(6, 5, seed=7)
    policies = ["session_kv", "random", "kv_overlap"]
    serial, serial_runs, _ = compare("gen", workload(rows), policies, small_config(), jobs=1)
    forked, forked_runs, runtime = compare("gen", workload(rows), policies, small_config(), jobs=2)
    assert forked == serial
    assert list(forked_runs) == list(runtime) == policies
    for policy in policies:
        a, b = serial_runs[policy], forked_runs[policy]
        assert (a.steps, a.events, a.pins, a.busy_s) == (b.steps, b.events, b.pins, b.busy_s)
        assert [(r.worker, r.first_token, r.finish) for r in a.records] == [
            (r.worker, r.first_token, r.finish) for r in b.records
        ]


def test_a_failing_policy_process_is_reported() -> None:
    rows = agent_sessions(2, 2, seed=8)
    with pytest.raises(RuntimeError, match=r"policy (random|session_kv) failed"):
        # workers=0 is refused inside the child's Simulation: the error crosses back, nothing hangs
        compare("gen", workload(rows), ["random", "session_kv"], small_config(workers=0), jobs=2)


def test_default_jobs_use_the_cores_there_are() -> None:
    assert default_jobs(1) == 1
    assert 1 <= default_jobs(7) <= 7
    assert default_jobs(1000) == len(os.sched_getaffinity(0))


def test_turns_wait_for_their_predecessor_plus_capped_think_time() -> None:
    rows = agent_sessions(5, 8, seed=2)
    wl = workload(rows, max_think_s=60.0, rate_scale=2.0)
    run = Simulation(wl, "least_loaded", small_config()).run()
    by_session: dict[str, list] = {}
    for record in run.records:
        by_session.setdefault(record.session, []).append(record)
    checked = 0
    for session, records in by_session.items():
        turns = wl.sessions[session]
        assert [r.turn for r in records] == list(range(len(turns)))
        assert records[0].arrival == pytest.approx((turns[0].timestamp - wl.t0) / 1000 / 2.0)
        for prev, cur, row in zip(records, records[1:], turns[1:], strict=False):
            think = min(row.delay_ms / 1000, 60.0) / 2.0
            assert cur.arrival == pytest.approx(prev.finish + think, abs=1e-9)
            assert cur.arrival >= prev.finish + think - 1e-9
            checked += 1
    assert checked == len(rows) - len(by_session)


def test_every_request_completes_or_counts_as_failed() -> None:
    rows = agent_sessions(8, 5, seed=3)
    # one prompt longer than a worker's whole cache: refused, counted, and its session goes on
    huge = TraceRow(
        timestamp=5.0, input_length=300 * BLOCK, output_length=4, hash_ids=list(range(50_000, 50_038))
    )
    rows = sorted([*rows, huge], key=lambda r: r.timestamp)
    config = small_config(num_blocks=128)  # pressure: preemption and eviction happen
    for policy in POLICIES:
        sim = Simulation(workload(rows), policy, config)
        run = sim.run()
        assert len(run.records) == len(rows)
        failed = [r for r in run.records if not r.ok]
        assert len(failed) == 1 and failed[0].prompt_tokens == huge.input_length
        for r in run.records:
            if r.ok:
                assert r.arrival <= r.first_token <= r.finish and r.output_tokens > 0
        assert not any(w.engine.has_work() for w in sim.workers.values())
        assert sum(run.busy_s.values()) > 0


@pytest.mark.parametrize("seed", range(4))
def test_session_kv_reaches_the_oracle_hit_rate_when_nothing_competes(seed: int) -> None:
    # two sessions with nothing in common, two workers, room for everything: the right answer is to
    # keep each session on its own worker, which hits every block an infinite cache would
    rows = agent_sessions(2, 10, seed=seed, shared_blocks=0, start_gap_ms=0.0)
    wl = workload(rows)
    config = small_config(workers=2, num_blocks=4096)
    oracle = oracle_figures(wl, config.max_num_batched_tokens)
    report, runs, _ = compare("gen", wl, ["session_kv", "round_robin"], config)
    assert report.oracle_hit_rate == oracle.oracle_hit_rate > 0.7
    assert report.policies["session_kv"].hit_rate == pytest.approx(oracle.oracle_hit_rate, abs=1e-9)
    assert report.policies["round_robin"].hit_rate < oracle.oracle_hit_rate
    workers = {s: {r.worker for r in runs["session_kv"].records if r.session == s} for s in ("s0", "s1")}
    assert all(len(w) == 1 for w in workers.values()) and workers["s0"] != workers["s1"]
    # and its mean TTFT approaches the no-queue limit
    assert report.policies["session_kv"].ttft_mean_ms < 1.5 * report.ideal_ttft_mean_ms


def test_shortcuts_change_no_number() -> None:
    """Decode fast-forward and idle-report thinning only save events."""
    rows = agent_sessions(10, 6, seed=5)
    cases = (
        ("session_kv", ""),
        ("kv_overlap", ""),
        ("session_kv", "preempt"),
        ("session_kv", "priority"),
        ("session_kv", "priority+async"),
        ("session_kv", "slices"),  # first come first served with a host tier: decodes in slices
    )
    for policy, engine in cases:
        preempt = bool(engine) and engine != "slices"
        onboard_async = engine.endswith("async")
        slices = RouterConfig(decode_slice_tokens=8) if engine == "slices" else None
        results = []
        for fast in (True, False):
            idle_report_s = 1.0 if fast else 0.0
            config = small_config(
                workers=1 if preempt else 3,  # one worker: its decodes are preempted for prompts
                num_blocks=100 if slices else 200,
                fast_forward=fast,
                idle_report_s=idle_report_s,
                preempt_for_prompts=engine == "preempt",
                priority_scheduling=engine.startswith("priority"),
                host_blocks=800 if onboard_async or slices else 0,
                onboarding="async" if onboard_async else "sync",
            )
            sim = Simulation(workload(rows), policy, config, slices)
            results.append(sim.run())
            preemptions = sum(w.engine.scheduler.num_preemptions for w in sim.workers.values())
            assert preemptions > 0 or not preempt  # the rule ran
            assert any(r.host_cached_tokens for r in results[-1].records) or not onboard_async
        a, b = results
        assert a.steps == b.steps and a.events < b.events
        for x, y in zip(a.records, b.records, strict=True):
            assert (x.worker, x.cached_tokens, x.output_tokens) == (
                y.worker,
                y.cached_tokens,
                y.output_tokens,
            )
            assert x.first_token == pytest.approx(y.first_token, abs=1e-9)
            assert x.finish == pytest.approx(y.finish, abs=1e-9)


def test_a_prompt_preempts_a_decode_session_kv_sent_apart_on_a_priority_engine() -> None:
    """Known by construction: one worker of 64 blocks; A's prompt (40 blocks) is computed, then its
    300-token decode runs when B's prompt (40 blocks, nothing shared) arrives, which does not fit
    beside it. On an engine that schedules by priority, session_kv sent A's decode as its own request
    at a priority B's prompt outranks: B preempts it and starts at once, and A's decode resumes after
    B's prefill, from its cached prefix. Without priority scheduling B waits for A's whole decode; a
    baseline sends one request with no priority, so the priority engine changes none of its numbers."""
    a = TraceRow(timestamp=0.0, input_length=640, output_length=300, hash_ids=[1, 2, 3, 4, 5], session_id="a")
    b = TraceRow(
        timestamp=1000.0, input_length=640, output_length=4, hash_ids=[6, 7, 8, 9, 10], session_id="b"
    )
    runs = {}
    for policy in ("session_kv", "cache_aware"):
        for priority in (False, True):
            config = small_config(workers=1, num_blocks=64, priority_scheduling=priority)
            sim = Simulation(workload([a, b]), policy, config)
            run = sim.run()
            assert all(r.ok for r in run.records)
            assert [r.output_tokens for r in run.records] == [300, 4]
            runs[policy, priority] = (run.records, sim.workers["w0"].engine.scheduler.num_preemptions)
    (a_fcfs, b_fcfs), _ = runs["session_kv", False]
    (a_prio, b_prio), preemptions = runs["session_kv", True]
    assert b_fcfs.first_token > a_fcfs.finish  # it waited for A's whole decode
    assert preemptions == 1 and b_prio.first_token < a_prio.finish
    assert b_prio.first_token - b_prio.arrival < (b_fcfs.first_token - b_fcfs.arrival) / 5
    assert a_prio.first_token == a_fcfs.first_token and a_prio.finish > a_fcfs.finish
    assert a_prio.cached_tokens == a_fcfs.cached_tokens == 0
    baseline = [(r.first_token, r.finish, r.cached_tokens) for r in runs["cache_aware", False][0]]
    assert [(r.first_token, r.finish, r.cached_tokens) for r in runs["cache_aware", True][0]] == baseline
    assert runs["cache_aware", True][1] == 0


def test_a_prompt_goes_before_a_decode_sent_apart_on_a_first_come_first_served_engine() -> None:
    """Known by construction: one first-come-first-served worker of 64 blocks with a host tier; B's
    prompt (40 blocks, nothing shared) arrives while A's prompt (40 blocks) is computed and does not
    fit beside it. With `split_fcfs`, session_kv sent A's prompt alone: once its first token is out
    its blocks are free, B's prompt, queued before A's decode was sent, goes first, and A's decode
    then finds its prefix on the device and the host (where B's prompt evicted part of it). Sent whole,
    B waits for A's whole decode; without a host tier, or for a baseline, nothing is split."""
    a = TraceRow(timestamp=0.0, input_length=640, output_length=300, hash_ids=[1, 2, 3, 4, 5], session_id="a")
    b = TraceRow(timestamp=1.0, input_length=640, output_length=4, hash_ids=[6, 7, 8, 9, 10], session_id="b")
    runs = {}
    for policy, split, host in (
        ("session_kv", False, 256),
        ("session_kv", True, 256),
        ("session_kv", True, 0),
        ("cache_aware", False, 256),
        ("cache_aware", True, 256),
    ):
        config = small_config(workers=1, num_blocks=64, host_blocks=host)
        router_config = RouterConfig(split_fcfs=split)
        sim = Simulation(workload([a, b]), policy, config, router_config)
        worker = sim.workers["w0"]
        deliver = worker.on_outputs
        decode_hits: dict[str, tuple[int, int]] = {}  # a decode part's (cached, of them host) tokens

        def spy(worker_id: str, outputs: list, deliver: Callable = deliver, hits: dict = decode_hits) -> None:
            for out in outputs:
                if out.request_id.endswith("/decode"):
                    hits.setdefault(out.request_id, (out.num_cached_tokens, out.num_host_cached_tokens))
            deliver(worker_id, outputs)

        worker.on_outputs = spy
        run = sim.run()
        assert all(r.ok for r in run.records)
        assert [r.output_tokens for r in run.records] == [300, 4]
        runs[policy, split, host] = run.records
        assert bool(decode_hits) == (policy == "session_kv" and split and host > 0)
        if decode_hits:  # A's decode: its whole prompt cached, the part B's prompt evicted on the host
            cached, from_host = decode_hits["r0/decode"]  # A is the first turn: r0
            assert cached == 640 and 0 < from_host < cached
    a_whole, b_whole = runs["session_kv", False, 256]
    a_split, b_split = runs["session_kv", True, 256]
    assert b_whole.first_token > a_whole.finish  # it waited for A's whole decode
    assert a_split.first_token == a_whole.first_token < b_split.first_token < a_split.finish
    assert b_split.first_token - b_split.arrival < (b_whole.first_token - b_whole.arrival) / 5
    assert a_split.finish > a_whole.finish  # A's decode waited for B's prompt
    unsplit = [(r.first_token, r.finish) for r in runs["session_kv", True, 0]]
    assert unsplit[1][0] > unsplit[0][1]  # no host tier: sent whole, B waits for A's decode
    baseline = [(r.first_token, r.finish, r.cached_tokens) for r in runs["cache_aware", False, 256]]
    assert [(r.first_token, r.finish, r.cached_tokens) for r in runs["cache_aware", True, 256]] == baseline


def test_a_decode_sent_in_slices_lets_a_later_prompt_in_between_them() -> None:
    """Known by construction: one first-come-first-served worker of 64 blocks with a host tier; A's
    300-token decode part runs when B's prompt (40 blocks, nothing shared) arrives, which does not fit
    beside it. Sent whole, B waits for A's whole decode; in slices of 64 tokens (`decode_slice_tokens`)
    B's prompt goes when the running slice ends, before A's next slice, and A still ends with all of its
    300 tokens."""
    a = TraceRow(timestamp=0.0, input_length=640, output_length=300, hash_ids=[1, 2, 3, 4, 5], session_id="a")
    b = TraceRow(
        timestamp=1000.0, input_length=640, output_length=4, hash_ids=[6, 7, 8, 9, 10], session_id="b"
    )
    runs = {}
    for slices in (0, 64):
        config = small_config(workers=1, num_blocks=64, host_blocks=256)
        router_config = RouterConfig(decode_slice_tokens=slices)
        run = Simulation(workload([a, b]), "session_kv", config, router_config).run()
        assert all(r.ok for r in run.records)
        assert [r.output_tokens for r in run.records] == [300, 4]
        runs[slices] = run.records
    (a_whole, b_whole), (a_sliced, b_sliced) = runs[0], runs[64]
    assert b_whole.first_token > a_whole.finish  # it waited for A's whole decode
    assert a_sliced.first_token == a_whole.first_token and b_sliced.first_token < a_sliced.finish
    assert b_sliced.first_token - b_sliced.arrival < (b_whole.first_token - b_whole.arrival) / 2
    with pytest.raises(ValueError, match="decode_slice_tokens"):
        RouterConfig(decode_slice_tokens=-1)


def _record_slice_starts(router: Router) -> list[str]:
    """The slice ids the simulator tells `router` have started, from now on."""
    started: list[str] = []
    original = router.slice_started

    def slice_started(slice_id: str) -> None:
        started.append(slice_id)
        original(slice_id)

    router.slice_started = slice_started  # type: ignore[method-assign]
    return started


def test_a_prompt_that_does_not_fit_cuts_the_running_slice() -> None:
    """The same two turns as above, slices of 64: with `cut_slices` (the default) B's prompt part has
    A's running slice cut (the router reads the worker's report: A's blocks in use, B's 40 blocks not
    there, 64 in all), so B's first token does not wait for that slice to end; A goes on from the
    output it had and still ends with all of its 300 tokens."""
    a = TraceRow(timestamp=0.0, input_length=640, output_length=300, hash_ids=[1, 2, 3, 4, 5], session_id="a")
    b = TraceRow(
        timestamp=1000.0, input_length=640, output_length=4, hash_ids=[6, 7, 8, 9, 10], session_id="b"
    )
    ttft, cuts = {}, {}
    for cut in (False, True):
        config = small_config(workers=1, num_blocks=64, host_blocks=256)
        sim = Simulation(
            workload([a, b]), "session_kv", config, RouterConfig(decode_slice_tokens=64, cut_slices=cut)
        )
        started = _record_slice_starts(sim.router)
        run = sim.run()
        # each slice told the router it runs, once, at its first token: a queued one is cut whatever
        # the shortfall, a running one only for room
        assert len(started) == len(set(started)) >= 5 and all("/decode" in s for s in started)
        assert all(r.ok for r in run.records)
        assert [r.output_tokens for r in run.records] == [300, 4]
        ttft[cut] = run.records[1].first_token - run.records[1].arrival
        cuts[cut] = sim.router.slices.cut_total if sim.router.slices is not None else 0
    assert cuts == {False: 0, True: 1}
    assert ttft[True] < ttft[False] / 2


def test_a_long_prompt_in_prefill_pieces_lets_a_short_one_in_between() -> None:
    """Known by construction: one first-come-first-served worker (a host tier: turns split, decodes in
    slices) with a step budget of 512 tokens. A's 5,120-token prompt takes ten steps to prefill; B's
    256 tokens arrive 50 ms in. Sent whole, A's prefill holds every step's budget until it ends and B
    waits for all of it; in pieces of 1,024 tokens (`prefill_piece_tokens`), B queues in front of A's
    second piece. A's answer is the same, and its cached tokens are those of before its first piece."""
    a = TraceRow(timestamp=0.0, input_length=5120, output_length=4, hash_ids=list(range(40)), session_id="a")
    b = TraceRow(timestamp=50.0, input_length=256, output_length=4, hash_ids=[100, 101], session_id="b")
    ttft: dict[int, tuple[float, float]] = {}
    for piece in (0, 1024):
        config = small_config(workers=1, num_blocks=512, host_blocks=1024)
        sim = Simulation(workload([a, b]), "session_kv", config, RouterConfig(prefill_piece_tokens=piece))
        run = sim.run()
        assert sim.router.prefill_pieces("w0", [1] * 320, 5120) == ([1024, 2048, 3072, 4096] if piece else [])
        assert all(r.ok for r in run.records) and [r.output_tokens for r in run.records] == [4, 4]
        assert [r.cached_tokens for r in run.records] == [0, 0]  # the pieces' work is not a cache hit
        ttft[piece] = tuple(r.first_token - r.arrival for r in run.records)  # type: ignore[assignment]
    assert ttft[1024][1] < ttft[0][1] / 3  # B: one piece's wait, not the whole prefill's
    # A pays for B's steps in between, a sampled token per piece and each piece's round trip
    assert ttft[0][0] < ttft[1024][0] < ttft[0][0] * 2


def test_a_prompt_longer_than_its_worker_holds_fails_alone_where_prompts_go_in_pieces() -> None:
    """A's 9,000 tokens exceed the worker's 8,192 (512 blocks of 16): no pieces are made for it (the
    engine refuses it whole), the turn fails and B's is answered. A piece the engine refused (the
    router asked for a longer one than the worker holds) fails its turn the same way, not the run."""
    a = TraceRow(timestamp=0.0, input_length=9000, output_length=4, hash_ids=list(range(71)), session_id="a")
    b = TraceRow(timestamp=50.0, input_length=256, output_length=4, hash_ids=[100, 101], session_id="b")
    for forced in (False, True):
        config = small_config(workers=1, num_blocks=512, host_blocks=1024)
        sim = Simulation(workload([a, b]), "session_kv", config, RouterConfig(prefill_piece_tokens=1024))
        assert sim.router.prefill_pieces("w0", list(range(562)), 9000) == []
        if forced:  # A's first piece as long as the worker's whole cache
            sim.router.prefill_pieces = lambda _w, _c, n: [8192] if n == 9000 else []  # type: ignore[assignment,method-assign]
        run = sim.run()
        assert [r.ok for r in run.records] == [False, True]
        assert run.records[1].output_tokens == 4


def test_a_decode_slice_finds_the_output_of_the_slices_before_it() -> None:
    """Known by construction: one worker with room for everything and a host tier; A's 300-token
    answer goes in slices of 64, and B, the same prompt in another session, comes after A is done. A
    slice's prompt ends with the output so far as the tokens the engine sampled (the gateway sends them
    as token ids), so each slice finds every full block before it cached, its earlier output included
    (as zeros it found the prompt's blocks only). B's answer is B's own: the blocks its slices store
    are none of A's."""
    prompt = [1, 2, 3, 4, 5]  # 640 tokens: 40 blocks of 16
    a = TraceRow(timestamp=0.0, input_length=640, output_length=300, hash_ids=prompt, session_id="a")
    b = TraceRow(timestamp=600_000.0, input_length=640, output_length=300, hash_ids=prompt, session_id="b")
    config = small_config(workers=1, num_blocks=256, host_blocks=256)
    sim = Simulation(workload([a, b]), "session_kv", config, RouterConfig(decode_slice_tokens=64))
    worker = sim.workers["w0"]
    cached: dict[str, int] = {}
    stored: list[tuple[float, list[int]]] = []
    on_outputs, on_kv_events = worker.on_outputs, worker.on_kv_events

    def outputs(worker_id: str, outs: list[RequestOutput]) -> None:
        for out in outs:
            cached.setdefault(out.request_id, out.num_cached_tokens)
        on_outputs(worker_id, outs)

    def kv_events(worker_id: str, events: list[KvEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored) and event.tier == "device":
                stored.append((sim.loop.now, event.block_hashes))
        on_kv_events(worker_id, events)

    worker.on_outputs, worker.on_kv_events = outputs, kv_events
    run = sim.run()
    assert [r.output_tokens for r in run.records] == [300, 300] and all(r.ok for r in run.records)
    slices = {rid: n for rid, n in cached.items() if "/decode" in rid}
    assert len(slices) == 2 * 5  # output so far 1, 65, 129, 193, 257: five slices a turn
    for rid, n in slices.items():
        produced = int(rid.rsplit("/decode", 1)[1] or 1)
        assert n == (640 + produced) // 16 * 16, rid  # every full block before it, output included
    a_turn, b_turn = run.records
    assert a_turn.finish < b_turn.arrival
    a_output = {h for at, hashes in stored if at < b_turn.arrival for h in hashes}
    b_output = {h for at, hashes in stored if at > b_turn.arrival for h in hashes}
    assert len(b_output) >= (940 - 1) // 16 - 40  # B's 18 full output blocks are stored anew
    assert not a_output & b_output


# every Router method the simulation calls that could read the load view
ROUTER_CALLS = (
    "resolve_session",
    "admit",
    "pick",
    "on_first_token",
    "on_complete",
    "release_held",
    "held_deadline",
    "apply_kv_batch",
    "apply_state_dump",
    "expire",
)


def test_bus_messages_applied_at_router_calls_change_nothing(monkeypatch) -> None:
    """Load reports and KV batches wait outside the event heap until a router call: at every call the
    router's load view and block counts are what delivering each as an event gives, and so is every
    number of the run."""
    calls: list[tuple[str, list[dict[str, object]]]] = []

    def spy(name: str, original: Callable[..., object]) -> Callable[..., object]:
        def call(router: Router, *args: object, **kwargs: object) -> object:
            view = [{k: getattr(w, k) for k in w.__slots__} for w in router.load.workers.values()]
            blocks = {w: router.index.blocks_of(w) for w in router.workers()}
            calls.append((name, [*view, blocks, router.stream_positions()]))
            return original(router, *args, **kwargs)

        return call

    for name in ROUTER_CALLS:
        monkeypatch.setattr(Router, name, spy(name, getattr(Router, name)))
    rows = agent_sessions(10, 6, seed=11)
    # session_kv also with an admission that holds turns and releases some by their deadline
    holding = RouterConfig(session_admission=True, admission_fill=0.3, admission_max_hold_s=0.5)
    cases = [("session_kv", None), ("session_kv", holding), ("kv_overlap", None), ("least_loaded", None)]
    for policy, router_config in cases:
        runs, seen = [], []
        for lazy in (True, False):
            calls.clear()
            config = small_config(num_blocks=200, lazy_bus=lazy)
            runs.append(Simulation(workload(rows), policy, config, router_config).run())
            seen.append(list(calls))
        assert len(seen[0]) > 500 and seen[0] == seen[1]
        a, b = runs
        assert [_record_tuple(r) for r in a.records] == [_record_tuple(r) for r in b.records]
        assert (a.decisions, a.load, a.events, a.steps, a.pins) == (
            b.decisions,
            b.load,
            b.events,
            b.steps,
            b.pins,
        )


def _record_tuple(record: RequestRecord) -> tuple[object, ...]:
    return tuple(getattr(record, name) for name in RequestRecord.__slots__)


def test_cached_loads_and_run_speeds_are_what_the_engine_would_report(monkeypatch) -> None:
    """A worker reuses its engine's load until the engine changes, and a decode run's smoothed speed
    goes on from the previous report: every report equals one computed from scratch."""
    reports = []
    original = SimWorker.load_report

    def load_report(worker: SimWorker) -> LoadReport:
        report = original(worker)
        fresh = worker.engine.load()
        assert (report.running, report.waiting, report.active_prefill_tokens, report.used_blocks) == (
            fresh.running,
            fresh.waiting,
            fresh.active_prefill_tokens,
            fresh.used_blocks,
        )
        assert report.prefill_tok_s == fresh.prefill_tok_s
        decode = fresh.decode_tok_s
        run = worker._run
        if run is not None and worker.fast_forward is not None:
            unmemoised = DecodeRun(run.start, run.duration, run.steps, run.seqs)
            decode = worker.fast_forward.decode_speed_after(unmemoised, run.started_by(worker.loop.now))
        assert report.decode_tok_s == decode
        reports.append(run is not None)
        return report

    monkeypatch.setattr(SimWorker, "load_report", load_report)
    Simulation(workload(agent_sessions(8, 6, seed=9)), "kv_overlap", small_config(num_blocks=200)).run()
    assert len(reports) > 100 and any(reports)  # reports during decode runs were checked too


def test_policy_names() -> None:
    assert parse_policies("all") == list(POLICIES)
    assert parse_policies("session_kv, random,session_kv") == ["session_kv", "random"]
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policies("fastest")


def test_cli_prints_the_object(tmp_path, capsys) -> None:
    trace = tmp_path / "t.jsonl"
    import msgspec

    trace.write_bytes(b"\n".join(msgspec.json.encode(r) for r in agent_sessions(3, 3, seed=6)))
    args = [
        "sim",
        "--trace",
        str(trace),
        "--workers",
        "2",
        "--num-blocks",
        "512",
        "--block-size",
        "16",
        "--trace-block-size",
        "128",
        "--policy",
        "session_kv,round_robin",
        "--json",
        "-",
    ]
    assert main([*args, "--charts", str(tmp_path / "charts")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"trace", "workers", "oracle_hit_rate", "ideal_ttft_mean_ms", "policies"}
    assert data["trace"] == "t.jsonl" and data["workers"] == 2
    assert set(data["policies"]) == {"session_kv", "round_robin"}
    keys = {
        "requests",
        "completed",
        "ttft_mean_ms",
        "ttft_p50_ms",
        "ttft_p90_ms",
        "ttft_p99_ms",
        "e2e_mean_ms",
        "session_time_mean_s",
        "hit_rate",
        "throughput_tok_s",
        "load_cv",
    }
    for result in data["policies"].values():
        assert set(result) == keys and result["requests"] == result["completed"] == 9
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == [
        "hit_rate.png",
        "ttft_cdf.png",
        "worker_load.png",
    ]
    assert main(["sim", "--trace", str(trace), "--policy", "nope"]) == 2
    assert main(["sim", "--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert "kvgate sim:" in capsys.readouterr().err


def two_big_sessions() -> list[TraceRow]:
    """Two tool-loop sessions whose contexts each fit one worker's KV (256 blocks) but not both
    together: 18 trace blocks (144 KV blocks) growing by one trace block a turn, 200 ms tool calls."""
    rows: list[TraceRow] = []
    for s in range(2):
        ids = [10_000 * (s + 1) + i for i in range(18)]
        for turn in range(6):
            rows.append(
                TraceRow(
                    timestamp=s * 300.0 + turn,
                    input_length=len(ids) * TRACE_BLOCK,
                    output_length=20,
                    hash_ids=list(ids),
                    session_id=f"big{s}",
                    turn=turn,
                    delay_ms=0.0 if turn == 0 else 200.0,
                    stop="tool_use" if turn < 5 else "end_turn",
                )
            )
            ids.append(10_000 * (s + 1) + 100 + turn)
    rows.sort(key=lambda r: r.timestamp)
    return rows


def test_admission_by_session_keeps_a_capacity_bound_pair_from_thrashing() -> None:
    """Known by construction: one worker, two sessions that cannot both stay cached. Admitted together
    they evict each other's context every turn; holding the second at its first turn until the first
    is done lets each miss only its first turn."""
    wl = workload(two_big_sessions())
    # a hold bound longer than the first session and no yielding (least attained service would swap two
    # equal sessions at every tool boundary), so the case does not depend on the default's tuning
    admitting = RouterConfig(
        session_admission=True, admission_fill=0.9, admission_max_hold_s=60.0, admission_yield=False
    )
    held = Simulation(wl, "session_kv", small_config(workers=1), admitting).run()
    free = Simulation(wl, "session_kv", small_config(workers=1, session_admission=False)).run()
    assert held.held == 1 and free.held == 0
    assert all(r.ok for r in held.records + free.records) and len(held.records) == 12
    hit_held = summarize(held.records, [1.0]).hit_rate
    hit_free = summarize(free.records, [1.0]).hit_rate
    oracle = oracle_figures(wl, 512).oracle_hit_rate
    assert hit_held >= oracle - 0.02 and hit_held > hit_free + 0.2
    # the held session's first turn waited for the first session's last turn to end
    first_end = max(r.finish for r in held.records if r.session == "big0")
    first_start = min(r.first_token for r in held.records if r.session == "big1")
    assert first_start >= first_end
    # the hold is honest: the held turn's TTFT counts from its arrival, not its release
    arrival = min(r.arrival for r in held.records if r.session == "big1")
    assert arrival == pytest.approx(0.3)


def test_workers_number_their_kv_batches_from_zero_so_the_router_never_asks_for_a_dump(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a worker's publisher does: a stream that starts at 0 is in order, so the router applies it
    as it comes (a first batch numbered 1 looked like a gap and cost every worker a state dump)."""
    first: dict[str, int] = {}
    dumps: list[str] = []
    apply_batch, apply_dump = Router.apply_kv_batch, Router.apply_state_dump

    def batch(router: Router, b: KvEventBatch, now: float) -> bool:
        first.setdefault(b.worker_id, b.seq)
        return apply_batch(router, b, now)

    def dump(router: Router, d: KvStateDump, now: float) -> bool:
        dumps.append(d.worker_id)
        return apply_dump(router, d, now)

    monkeypatch.setattr(Router, "apply_kv_batch", batch)
    monkeypatch.setattr(Router, "apply_state_dump", dump)
    Simulation(workload(agent_sessions(6, 4, seed=2)), "session_kv", small_config()).run()
    assert first and set(first.values()) == {0} and dumps == []


def test_a_replay_leaves_the_collector_as_it_found_it() -> None:
    import gc

    from loadgen.sim.compare import replay_gc

    before = gc.get_threshold(), gc.get_freeze_count()
    with replay_gc():
        assert gc.get_threshold() != before[0] and gc.get_freeze_count() > 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_a_prompt_waiting_for_room_waits_at_the_router_not_ahead_of_one_that_fits() -> None:
    """Known by construction: one worker of 256 blocks runs a long turn of 120 blocks; a turn of 160
    arrives (it cannot fit beside it) and then one of 32 (it can). In the engine's first-come-first-
    served queue the small one waits behind the big one until the long turn is over; held at the
    router instead, the big one lets it pass."""

    def row(session: str, base: int, at_ms: float, trace_blocks: int, output: int) -> TraceRow:
        ids = [base + i for i in range(trace_blocks)]
        return TraceRow(at_ms, trace_blocks * TRACE_BLOCK, output, ids, session, 0, 0.0, "end_turn")

    rows = [row("long", 1000, 0.0, 15, 400), row("big", 2000, 10.0, 20, 5), row("small", 3000, 20.0, 4, 5)]
    wl = workload(rows)

    def ttft(run_records: list[RequestRecord], session: str) -> float:
        record = next(r for r in run_records if r.session == session)
        return record.first_token - record.arrival

    config = small_config(workers=1)
    held = Simulation(wl, "session_kv", config, RouterConfig(room_hold=True)).run()
    fcfs = Simulation(wl, "session_kv", config, RouterConfig(room_hold=False)).run()
    assert all(r.ok for r in held.records + fcfs.records)
    assert held.room_held == 1 and held.room_overdue == 0 and fcfs.room_held == 0
    long_end = next(r.finish for r in fcfs.records if r.session == "long")
    assert ttft(fcfs.records, "small") >= long_end - 0.02  # behind the big one, which waited for room
    assert ttft(held.records, "small") < ttft(fcfs.records, "small") / 10
    # the big one still starts as soon as the long turn leaves: it lost nothing to the small one
    assert ttft(held.records, "big") <= ttft(fcfs.records, "big") + 0.05


def test_with_backfill_a_turn_that_would_delay_the_held_prompt_waits_behind_it() -> None:
    """Known by construction: one worker of 256 blocks runs a long turn of 120 blocks; a turn of 160
    arrives (it cannot fit beside it), then one of 104 with a long decode (it fits beside the long
    turn now, but not beside the 160 once those start, and nothing says it ends first). Passed, as the
    room queue alone lets it, it delays the 160-block turn until it is over; with backfill it waits
    behind it, and the 160-block turn starts as soon as the long turn leaves."""

    def row(session: str, base: int, at_ms: float, trace_blocks: int, output: int) -> TraceRow:
        ids = [base + i for i in range(trace_blocks)]
        return TraceRow(at_ms, trace_blocks * TRACE_BLOCK, output, ids, session, 0, 0.0, "end_turn")

    rows = [row("long", 1000, 0.0, 15, 400), row("big", 2000, 10.0, 20, 5), row("mid", 3000, 20.0, 13, 1000)]
    config = small_config(workers=1)

    def replay(rows: list[TraceRow], backfill: bool) -> list[RequestRecord]:
        router_config = RouterConfig(room_hold=True, room_backfill=backfill)
        run = Simulation(workload(rows), "session_kv", config, router_config).run()
        assert all(r.ok for r in run.records) and run.room_overdue == 0  # none waited out the bound
        return run.records

    def first_token(records: list[RequestRecord], session: str) -> float:
        return next(r.first_token for r in records if r.session == session)

    passed, backfilled, alone = replay(rows, False), replay(rows, True), replay(rows[:2], True)
    mid_end = next(r.finish for r in passed if r.session == "mid")
    assert first_token(passed, "big") >= mid_end - 0.02  # it waited for "mid" to finish
    assert first_token(backfilled, "big") == pytest.approx(first_token(alone, "big"), abs=0.02)
    big_end = next(r.finish for r in backfilled if r.session == "big")
    assert first_token(backfilled, "mid") >= big_end - 0.02  # "mid" went after it


def test_a_pick_predicted_to_wait_for_memory_waits_at_the_router_not_ahead_of_one_that_fits() -> None:
    """Known by construction (the room queue's case above, with the memory hold): one worker of 256
    blocks runs a long turn of 120 blocks; 1 s in, a turn of 160 arrives (it cannot fit beside it, and
    the predicted wait for memory says so) and then one of 32 (it can). In the engine's queue the small
    one waits behind the big one until the long turn is over; held at the router, the big one lets it
    pass, and still starts as soon as the long turn leaves."""

    def row(session: str, base: int, at_ms: float, trace_blocks: int, output: int) -> TraceRow:
        ids = [base + i for i in range(trace_blocks)]
        return TraceRow(at_ms, trace_blocks * TRACE_BLOCK, output, ids, session, 0, 0.0, "end_turn")

    rows = [
        row("long", 1000, 0.0, 15, 400),
        row("big", 2000, 1000.0, 20, 5),
        row("small", 3000, 1010.0, 4, 5),
    ]
    wl = workload(rows)

    def ttft(run_records: list[RequestRecord], session: str) -> float:
        record = next(r for r in run_records if r.session == session)
        return record.first_token - record.arrival

    config = small_config(workers=1)
    held = Simulation(wl, "session_kv", config, RouterConfig()).run()  # on by default
    fcfs = Simulation(wl, "session_kv", config, RouterConfig(memory_hold=False)).run()
    assert all(r.ok for r in held.records + fcfs.records)
    assert held.room_held == 1 and held.room_overdue == 0 and fcfs.room_held == 0
    long_end = next(r.finish for r in fcfs.records if r.session == "long")
    assert ttft(fcfs.records, "small") >= long_end - 1.01 - 0.02  # behind the big one, waiting for memory
    assert ttft(held.records, "small") < ttft(fcfs.records, "small") / 10
    assert ttft(held.records, "big") <= ttft(fcfs.records, "big") + 0.15  # re-checked every 0.1 s


def test_the_overload_queue_lets_the_shortest_prefill_go_first_when_the_worker_frees() -> None:
    """Known by construction: one worker (room for all, no memory hold) prefills a 2,048-token turn in
    chunks; a 2,048-token turn and then a 128-token one arrive meanwhile. First come first served, the
    short one waits for the long one's prefill; in the overload queue (the worker is busy while a
    prefill is in flight there) both wait unpicked, and the short one leaves first at the first
    token."""

    def row(session: str, base: int, at_ms: float, trace_blocks: int) -> TraceRow:
        ids = [base + i for i in range(trace_blocks)]
        return TraceRow(at_ms, trace_blocks * TRACE_BLOCK, 5, ids, session, 0, 0.0, "end_turn")

    wl = workload([row("first", 1000, 0.0, 16), row("long", 2000, 1.0, 16), row("short", 3000, 2.0, 1)])
    config = small_config(workers=1, num_blocks=1024)
    queued = Simulation(wl, "session_kv", config, RouterConfig(memory_hold=False, overload_queue=True)).run()
    fcfs = Simulation(wl, "session_kv", config, RouterConfig(memory_hold=False)).run()
    assert all(r.ok for r in queued.records + fcfs.records)
    assert queued.held == 2 and queued.held_overdue == 0 and fcfs.held == 0

    def record(run_records: list[RequestRecord], session: str) -> RequestRecord:
        return next(r for r in run_records if r.session == session)

    first_token = record(queued.records, "first").first_token
    short, long = record(queued.records, "short"), record(queued.records, "long")
    assert short.first_token < long.first_token  # it overtook the long one
    assert short.first_token - first_token < 0.5 * (record(fcfs.records, "short").first_token - first_token)
    # first come first served, the short one's first token came with the long one's
    assert record(fcfs.records, "short").first_token >= record(fcfs.records, "long").first_token - 0.001


def test_cli_onboards_asynchronously_by_default_and_names_one_form(capsys) -> None:
    """`kvgate sim`'s onboarding group: asynchronous unless told (vLLM's offloading connector), each
    flag its form on every worker's engine, and two forms at once exit 2 with one error line."""
    import argparse

    from loadgen.sim.cli import _sim_config, add_arguments

    parser = argparse.ArgumentParser(prog="kvgate sim")
    add_arguments(parser)
    trace = ["--trace", "t.jsonl", "--host-blocks", "64"]
    assert SimConfig().onboarding == "async"
    assert _sim_config(parser.parse_args(trace), {}).engine_config().onboarding == "async"
    for form in ("sync", "async", "layerwise"):
        config = _sim_config(parser.parse_args([*trace, f"--onboard-{form}"]), {})
        assert config.onboarding == config.engine_config().onboarding == form
    with pytest.raises(SystemExit) as exit_info:
        main(["sim", *trace, "--onboard-async", "--onboard-layerwise"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        "kvgate sim: error: argument --onboard-layerwise: not allowed with argument --onboard-async"
    ]
