"""Where the torch engine tests run: on the CPU unless KVGATE_TEST_DEVICE names another device
(`KVGATE_TEST_DEVICE=cuda` on a GPU machine). Kept free of torch so that the engine tests that do not
need it collect without it."""

from __future__ import annotations

import os

DEVICE_ENV = "KVGATE_TEST_DEVICE"


def torch_device() -> str:
    """The torch device the tests build their runners on (named so that pytest does not collect it)."""
    return os.environ.get(DEVICE_ENV) or "cpu"
