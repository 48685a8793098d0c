"""A `socketserver` server run by a daemon thread for the length of a `with` block (a local HTTP sink
for a benchmark, a stand-in server in a test)."""

from __future__ import annotations

import contextlib
import socketserver
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def served_in_thread(server: socketserver.TCPServer) -> Iterator[str]:
    """`http://127.0.0.1:PORT` of `server` (bound to 127.0.0.1) while a daemon thread serves it; shut
    down and closed after."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
