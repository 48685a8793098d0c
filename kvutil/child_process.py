"""Child processes that do not outlive their parent.

`kvgate up` and the benchmarks start workers and gateways in sessions of their own, so that a
terminal's Ctrl-C reaches only the parent, which stops them in order. Should the parent die without
that clean-up (SIGKILL, or a signal between a fork and its bookkeeping), the kernel sends each child
started here SIGTERM (Linux; elsewhere a child started so is a plain one). The embedded NATS server
(gateway/natsd.py) is not tied: it may be started from a worker thread, which would end it early.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn_tied(argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """`subprocess.Popen(argv, **popen)` in a session of its own, SIGTERMed when this process dies.
    Start it from the main thread: the kernel ties the child to the thread that forked it."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=preexec, **popen)
