"""kvutil/http_probe.py: a readiness poll reads anything short of an HTTP answer as "not up yet"."""

from __future__ import annotations

import json
import socket
import socketserver
from http.server import BaseHTTPRequestHandler, HTTPServer

from kvutil.http_probe import get_json
from kvutil.thread_server import served_in_thread


class _Answers(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = (200, {"ready": True}) if self.path == "/ready" else (503, {"error": "not yet"})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return None


class _EchoesTheRequestLine(socketserver.BaseRequestHandler):
    """What a probe connected to its own port reads: its request, not a status line."""

    def handle(self) -> None:
        self.request.sendall(self.request.recv(4096).split(b"\r\n")[0] + b"\r\n\r\n")


def test_an_http_answer_gives_its_status_and_json_body() -> None:
    with served_in_thread(HTTPServer(("127.0.0.1", 0), _Answers)) as url:
        assert get_json(url + "/ready", 2.0) == (200, {"ready": True})
        assert get_json(url + "/other", 2.0) == (503, None)


def test_a_reply_that_is_not_http_reads_as_not_up_yet() -> None:
    with served_in_thread(socketserver.TCPServer(("127.0.0.1", 0), _EchoesTheRequestLine)) as url:
        assert get_json(url + "/ready", 2.0) == (0, None)


def test_a_port_nobody_listens_on_reads_as_not_up_yet() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        assert get_json(f"http://127.0.0.1:{port}/ready", 2.0) == (0, None)
