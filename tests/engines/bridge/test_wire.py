"""The wire decoder refuses what is not an event batch."""

from __future__ import annotations

import msgspec
import pytest

from engines.bridge import WireError, decode_batch


def test_decode_rejects_garbage() -> None:
    for bad in (b"\xc1", msgspec.msgpack.encode(42), msgspec.msgpack.encode({"ts": "x", "events": []})):
        with pytest.raises(WireError):
            decode_batch(bad)
