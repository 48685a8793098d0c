"""A tied child (kvutil/child_process.py) gets SIGTERM when its parent dies without stopping it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.polling import until
from tests.processes import alive

PARENT = """
import sys, time
from kvutil.child_process import spawn_tied
child = spawn_tied([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal")
async def test_a_tied_child_dies_with_a_parent_killed_before_it_could_stop_it() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert alive(child)
        parent.send_signal(signal.SIGKILL)  # no clean-up of its own runs
        parent.wait(timeout=30)
        await until(lambda: not alive(child), 30.0, "the child stopped")
    finally:
        parent.kill()
        if alive(child):
            os.kill(child, signal.SIGKILL)
