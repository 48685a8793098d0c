"""`kvgate bridge`'s argument checks: one clear line and exit status 2."""

from __future__ import annotations

import pytest

from gateway.cli import main as kvgate_main


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["bridge", "--zmq", "tcp://127.0.0.1:1", "--url", "http://x:8000", "--model", "m"]
    base += ["--nats", "nats://127.0.0.1:1"]
    assert kvgate_main([*base, "--worker-id", "has.dot"]) == 2
    assert "worker id" in capsys.readouterr().out
    assert kvgate_main([*base, "--block-size", "0"]) == 2
    for flag, bad in (("--zmq", "127.0.0.1:5557"), ("--url", "vllm:8000"), ("--nats", "http://n:4222")):
        args = [*base, "--worker-id", "w"]
        args[args.index(flag) + 1] = bad
        assert kvgate_main(args) == 2
        assert flag in capsys.readouterr().out
