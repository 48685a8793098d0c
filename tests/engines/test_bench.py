"""`kvgate bench engine`: the JSON it prints has every figure, with sane values (no timing goals here:
those are the bench's to report)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engines import bench
from engines.mock import prefill_ms
from gateway.cli import main
from tests.engines.test_torch_checkpoint import QWEN2, write_checkpoint

KEYS = ("ttft_uncached_ms", "ttft_cached_ms", "prefill_tok_s", "decode_tok_s_b1", "decode_tok_s_b8")


def bench_json(capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    assert main(["bench", "engine", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_mock_bench_reports_the_modelled_figures(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "--engine", "mock")
    assert all(isinstance(result[k], float) and result[k] > 0 for k in KEYS)
    assert result["cached_tokens"] == 1920
    # Modelled time is deterministic: the mocker's prefill polynomial at 2,048 and at 128 new tokens
    # (the one-token answer ends there: no decode pass follows it, engines/mock.py)
    assert result["ttft_uncached_ms"] == pytest.approx(prefill_ms(2048))
    assert result["ttft_cached_ms"] == pytest.approx(prefill_ms(128))
    assert result["decode_tok_s_b8"] > result["decode_tok_s_b1"]


def test_torch_bench_reports_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    # A smaller prompt than the default keeps the test quick on two shared cores.
    result = bench_json(
        capsys,
        "--engine", "torch", "--device", "cpu", "--prompt-tokens", "512", "--cached-tokens", "448",
        "--decode-steps", "4", "--decode-context", "32", "--repeats", "1",
    )  # fmt: skip
    assert all(isinstance(result[k], float) and result[k] > 0 for k in KEYS)
    assert result["model"] == "kvgate-tiny" and result["device"] == "cpu"
    assert result["cached_tokens"] == 448  # the block manager really served the prefix
    assert result["prefill_tok_s"] == pytest.approx(512 / (result["ttft_uncached_ms"] / 1000))
    assert result["ttft_ratio"] == pytest.approx(result["ttft_uncached_ms"] / result["ttft_cached_ms"])


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "engine", "--engine", "mock", "--cached-tokens", "100"]) == 2
    assert "whole blocks" in capsys.readouterr().out
    assert main(["bench", "engine", "--engine", "mock", "--cached-tokens", "4096"]) == 2


@pytest.mark.slow
def test_human_readable_output_from_the_installed_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "bench", "engine", "--engine", "mock"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "TTFT 2048 tokens" in out and "decode" in out


def test_torch_bench_runs_a_local_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "tiny-qwen", QWEN2)
    result = bench_json(
        capsys,
        "--engine", "torch", "--device", "cpu", "--model-path", str(tmp_path / "tiny-qwen"),
        "--prompt-tokens", "256", "--cached-tokens", "192", "--decode-steps", "2",
        "--decode-context", "16", "--repeats", "1",
    )  # fmt: skip
    assert result["model"] == "tiny-qwen" and result["cached_tokens"] == 192
    assert all(result[k] > 0 for k in KEYS)


@pytest.mark.parametrize(
    ("argv", "prompt", "cached"),
    [
        (["--engine", "mock"], 2048, 1920),
        (["--engine", "torch", "--device", "cpu"], 2048, 1920),
        # a 2k-token prefill is launch-bound on a GPU whether cached or not: a longer prompt there
        (["--engine", "torch", "--device", "cuda:0"], 16384, 16256),
        (["--engine", "torch", "--device", "cuda", "--prompt-tokens", "1000"], 1000, 864),
        (["--engine", "mock", "--prompt-tokens", "4096", "--cached-tokens", "1024"], 4096, 1024),
    ],
)
def test_default_prompt_follows_the_device_and_caches_all_but_128_tokens(
    argv: list[str], prompt: int, cached: int
) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    bench.resolve_sizes(args)
    assert (args.prompt_tokens, args.cached_tokens) == (prompt, cached)
