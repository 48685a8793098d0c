"""The event translator on its own: orphans skipped, hash signs mapped, what it tracks bounded."""

from __future__ import annotations

from engines.bridge import EventTranslator, decode_batch
from router.hashing import block_hashes
from router.protocol import AllBlocksCleared, BlockStored
from tests.engines.bridge.engine_wire import TOKENS, B, map_batch, stored


def test_translator_skips_orphans_and_maps_hash_signs() -> None:
    translator = EventTranslator(B)
    batch = decode_batch(map_batch(stored([99], 12345, TOKENS[:B])))  # parent never seen
    assert translator.translate(batch.events) == []
    assert translator.skipped_blocks == 1
    translator.translate(decode_batch(map_batch(stored([-1], None, TOKENS[:B]))).events)
    assert translator.our_hash((1 << 64) - 1) == block_hashes(TOKENS[:B], B)[0]


def test_translator_bounds_what_it_tracks() -> None:
    translator = EventTranslator(B, max_blocks=2)
    ours = block_hashes(TOKENS, B)
    first = translator.translate(decode_batch(map_batch(stored([1, 2], None, TOKENS[: 2 * B]))).events)
    assert first == [BlockStored(ours[:2], None, "device")]
    # A third block means removals went missing: start over rather than grow without bound.
    third = translator.translate(decode_batch(map_batch(stored([3], 2, TOKENS[2 * B : 3 * B]))).events)
    assert third == [AllBlocksCleared()]
    assert len(translator) == 0
