"""router/running_slices.py and `Router.slices_to_cut`: the decode slices a prompt that does not fit
may have cut."""

from __future__ import annotations

import pytest

from router.config import RouterConfig
from router.protocol import BlockStored, KvEventBatch, LoadReport, WorkerRegistration
from router.router import Router
from router.running_slices import RunningSlices

BS = 16


def test_the_newest_slices_are_cut_until_their_blocks_cover_the_shortfall() -> None:
    slices = RunningSlices(max_slices=100)
    for slice_id, blocks in (("a", 30), ("b", 20), ("c", 10)):
        slices.sent(slice_id, "w0", blocks)
        slices.started(slice_id)  # running: their first tokens came
    slices.sent("x", "w1", 50)
    slices.started("x")
    assert slices.to_cut("w0", 25) == ["c", "b"]  # 10 + 20 cover 25: a keeps running
    assert slices.on("w0") == ["a"] and slices.on("w1") == ["x"] and slices.cut_total == 2
    assert slices.to_cut("w0", 1000) == ["a"]  # all there are, short of the shortfall
    assert slices.to_cut("w0", 5) == [] and slices.to_cut("w9", 5) == []
    assert len(slices) == 1


def test_every_queued_slice_is_cut_then_the_newest_running_ones() -> None:
    """A slice whose first token has not come waits in the worker's queue in front of the prompt: it
    frees no room, and is cut whatever the shortfall, so that it goes on behind the prompt."""
    slices = RunningSlices(max_slices=100)
    for slice_id, blocks in (("run1", 30), ("q1", 40), ("run2", 20), ("q2", 50)):
        slices.sent(slice_id, "w0", blocks)
    slices.started("run1")
    slices.started("run2")
    slices.started("unknown")  # ignored
    assert slices.running_on("w0") == ["run1", "run2"] and slices.on("w0") == ["run1", "q1", "run2", "q2"]
    assert slices.to_cut("w0", 25) == ["q1", "q2", "run2", "run1"]  # the queued free nothing: 20 + 30
    slices.sent("q3", "w0", 10)
    slices.sent("run3", "w0", 10)
    slices.started("run3")
    slices.ended("run3")
    assert slices.to_cut("w0", 0) == ["q3"]  # fits, but requests wait: the queued one goes behind
    slices.sent("r", "w0", 10)
    slices.started("r")
    slices.ended("r")
    slices.sent("r", "w0", 10)  # the same id sent again is queued again
    assert slices.to_cut("w0", 0) == ["r"] and slices.cut_total == 6


def test_without_cut_queued_the_newest_are_cut_queued_or_not() -> None:
    slices = RunningSlices(max_slices=100, cut_queued=False)
    for slice_id, blocks in (("run", 30), ("q", 20)):
        slices.sent(slice_id, "w0", blocks)
    slices.started("run")
    assert slices.to_cut("w0", 10) == ["q"]  # the eleventh pass' rule: blocks counted, queued or not


def test_an_ended_slice_is_not_cut_and_the_bound_forgets_the_oldest() -> None:
    slices = RunningSlices(max_slices=2)
    slices.sent("a", "w0", 10)
    slices.sent("b", "w0", 10)
    slices.ended("b")
    slices.ended("never-sent")  # ignored
    assert slices.on("w0") == ["a"]
    slices.sent("c", "w1", 10)
    slices.sent("d", "w1", 10)  # the third in flight: a, the oldest, is forgotten
    assert slices.on("w0") == [] and slices.on("w1") == ["c", "d"]
    slices.remove_worker("w1")
    assert slices.on("w1") == [] and len(slices) == 0 and slices.to_cut("w1", 5) == []
    assert RunningSlices(max_slices=0).to_cut("w0", 1) == []
    with pytest.raises(ValueError):
        RunningSlices(max_slices=-1)


def _router(**config: object) -> Router:
    router = Router(config=RouterConfig(**{"decode_slice_tokens": 64, **config}), splits_turns=True)  # type: ignore[arg-type]
    for wid, host in (("t", 4000), ("n", 0)):  # t gets slices (a host tier); n gets turns whole
        registration = WorkerRegistration(
            wid, f"http://{wid}", "m", BS, 100, "mock", 1, 0.0, returns_token_ids=True, host_blocks=host
        )
        router.add_worker(registration, 0.0)
    return router


def _report(router: Router, wid: str, used: int, waiting: int, now: float) -> None:
    router.apply_load(LoadReport(wid, now, 1, waiting, 0, used, 100, 1000.0, 50.0, host_blocks=4000), now)


def test_a_prompt_that_does_not_fit_by_the_workers_report_has_the_newest_slices_cut() -> None:
    router = _router()
    for slice_id, blocks in (("old", 40), ("mid", 30), ("new", 20)):
        router.slice_sent(slice_id, "t", blocks)
        router.slice_started(slice_id)
    chain = list(range(1000, 1040))  # 40 blocks, 10 of them on the device there
    assert router.apply_kv_batch(KvEventBatch("t", 1, 0, 1.0, [BlockStored(chain[:10])]), 1.0)
    _report(router, "t", used=80, waiting=0, now=1.0)
    # 80 in use + 30 not on the device = 10 over the 100 blocks: the newest slice covers it
    assert router.slices_to_cut("t", chain, 1.0) == ["new"]
    _report(router, "t", used=60, waiting=0, now=1.1)
    assert router.slices_to_cut("t", chain, 1.1) == []  # it fits
    _report(router, "t", used=60, waiting=2, now=1.2)
    assert router.slices_to_cut("t", chain, 1.2) == ["mid"]  # requests wait there: at least one
    _report(router, "t", used=99, waiting=0, now=1.3)
    assert router.slices_to_cut("t", chain, 60.0) == []  # the report went stale: nothing is known


def test_no_cuts_where_no_slices_go_or_the_switch_is_off() -> None:
    router = _router()
    router.slice_sent("s", "n", 50)
    _report(router, "n", used=99, waiting=3, now=1.0)
    assert router.slices_to_cut("n", list(range(50)), 1.0) == []  # n gets no slices
    off = _router(cut_slices=False)
    assert off.slices is None
    off.slice_sent("s", "t", 50)
    _report(off, "t", used=99, waiting=3, now=1.0)
    assert off.slices_to_cut("t", list(range(50)), 1.0) == []
    router.remove_worker("n")
    assert router.slices is not None and router.slices.on("n") == []


def test_a_long_prompt_goes_in_prefill_pieces_from_what_its_worker_holds() -> None:
    """`Router.prefill_pieces`: where slices go, the prompt lengths of the pieces before the prompt part,
    a piece (`prefill_piece_tokens`) at a time from the prefix the worker holds on either tier, while
    at least half a piece is left for the prompt part."""
    router = _router(prefill_piece_tokens=160)  # 10 blocks of 16
    chain = list(range(2000, 2060))  # 60 full blocks: 960 tokens, 970 with the last partial block
    assert router.prefill_pieces("t", chain, 970) == [160, 320, 480, 640, 800]  # 170 left for the prompt
    assert router.prefill_pieces("t", chain, 880) == [160, 320, 480, 640]  # 800 would leave 80: half a piece
    assert router.prefill_pieces("n", chain, 970) == []  # n gets turns whole: no slices, no pieces
    assert router.prefill_pieces("t", chain[:10], 160) == []  # one piece's worth: the prompt part alone
    assert router.prefill_pieces("t", list(range(2000, 2100)), 1600) == []  # more than t's 100 blocks hold
    # the first 20 blocks on t's device and the next 20 on its host: pieces start after the 40 held
    events = [BlockStored(chain[:20]), BlockStored(chain[20:40], parent_hash=chain[19], tier="host")]
    assert router.apply_kv_batch(KvEventBatch("t", 1, 0, 1.0, events), 1.0)
    assert router.prefill_pieces("t", chain, 970) == [800]  # 640 held, then one piece; 170 left
    assert _router(prefill_piece_tokens=0).prefill_pieces("t", chain, 970) == []  # off
    with pytest.raises(ValueError):
        RouterConfig(prefill_piece_tokens=-1)


def test_workers_whose_slices_are_cut_are_seen_as_yielding_to_prompts() -> None:
    """Where the gateway cuts decode slices for prompts, a prompt does not wait for the running decodes:
    the policies see the worker as one whose decodes yield (`cut_slices_yield`), as a priority engine's."""
    assert _router().yielding_workers == {"t"}  # n gets turns whole: its decodes hold their room
    assert _router(cut_slices_yield=False).yielding_workers == frozenset()
    assert _router(cut_slices=False).yielding_workers == frozenset()
    assert _router(decode_slice_tokens=0).yielding_workers == frozenset()  # one decode part: nothing cut
    router = _router()
    router.remove_worker("t")
    assert router.yielding_workers == frozenset()
