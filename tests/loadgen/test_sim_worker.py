"""A simulated worker's prefetch: copies in chunks while idle, so an arriving request waits for one."""

from __future__ import annotations

import pytest

from engines.engine import EngineConfig, RequestOutput
from engines.mock import TransferModel, prefill_ms
from loadgen.sim.events import EventLoop
from loadgen.sim.worker import PREFETCH_CHUNK_BLOCKS, SimWorker
from router.protocol import BlockStored, KvEvent

BLOCK = 16
CHAIN = 2 * PREFETCH_CHUNK_BLOCKS + 10  # three chunks


def make_worker(loop: EventLoop, events: list[tuple[float, KvEvent]], firsts: dict[str, float]) -> SimWorker:
    def on_outputs(_wid: str, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.new_token_ids:
                firsts.setdefault(out.request_id, loop.now)

    def on_events(_wid: str, batch: list[KvEvent]) -> None:
        events.extend((loop.now, e) for e in batch)

    config = EngineConfig(num_blocks=4 * CHAIN, block_size=BLOCK, host_blocks=4 * CHAIN)
    return SimWorker("w0", config, loop, on_outputs, on_events, transfer=TransferModel())


def offloaded_chain(worker: SimWorker, loop: EventLoop) -> list[int]:
    """A session's whole context computed once, then moved to the host; its chain of hashes."""
    hashes = list(range(1, CHAIN + 1))
    worker.submit("first", CHAIN * BLOCK, hashes, 1, "s")
    loop.run()
    assert worker.engine.offload(hashes) == CHAIN
    return hashes


@pytest.mark.parametrize("arrives", [False, True])
def test_a_prefetch_copies_in_chunks_and_yields_to_an_arrival(arrives: bool) -> None:
    loop = EventLoop()
    events: list[tuple[float, KvEvent]] = []
    firsts: dict[str, float] = {}
    worker = make_worker(loop, events, firsts)
    hashes = offloaded_chain(worker, loop)
    chunk_s = TransferModel().seconds(PREFETCH_CHUNK_BLOCKS, BLOCK)
    start = loop.now
    events.clear()
    worker.prefetch(hashes)
    if arrives:  # a request that needs none of it arrives during the first chunk's copy
        other = list(range(10**6, 10**6 + 4))
        loop.at(start + chunk_s / 2, worker.submit, "other", 4 * BLOCK, other, 1, "t")
    loop.run()
    onboarded = [(t, e) for t, e in events if isinstance(e, BlockStored) and e.tier == "device"]
    onboarded = [(t, e) for t, e in onboarded if e.block_hashes[0] in hashes]
    if not arrives:  # the whole chain, one chunk a copy step
        assert [len(e.block_hashes) for _, e in onboarded] == [PREFETCH_CHUNK_BLOCKS] * 2 + [10]
        assert [t - start for t, _ in onboarded] == pytest.approx(
            [chunk_s, 2 * chunk_s, 2 * chunk_s + TransferModel().seconds(10, BLOCK)]
        )
        assert all(worker.engine.block_manager.is_cached(h) for h in hashes)
    else:  # the arrival starts once the first chunk is copied; the rest is left to the host
        assert [len(e.block_hashes) for _, e in onboarded] == [PREFETCH_CHUNK_BLOCKS]
        # its first token: its prefill (the step's decode pass comes after it, engines/mock.py)
        assert firsts["other"] == pytest.approx(start + chunk_s + prefill_ms(4 * BLOCK) / 1000)
        assert hashes[-1] in worker.engine.block_manager.host
