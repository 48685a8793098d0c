"""A blocking JSON GET for readiness polls (`kvgate up`, `kvgate bench live`).

Anything short of an HTTP answer reads as "not up yet": a refused or reset connection, a timeout, a
body that is not JSON, and a reply that is not HTTP at all. The last happens on Linux when nothing
listens yet on a port in the ephemeral range: the kernel can give the probe that port as its source,
the connection is to itself, and it reads back its own request line (`BadStatusLine: GET /ready
HTTP/1.1`), which crashed `kvgate up` once.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any


def get_json(url: str, timeout_s: float, api_key: str | None = None) -> tuple[int, Any]:
    """(HTTP status, JSON body or None); (0, None) when no HTTP answer came."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError, http.client.HTTPException):
        return 0, None
