"""torch is optional: the gateway and the mock engine run without the `torch` extra (torch, safetensors,
tokenizers), and the test modules that need torch skip without it.

"Without" is made here by putting packages that fail to import, as a missing one does, ahead of the
installed ones on PYTHONPATH, for this process's children only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.kvgate_up import running_kvgate_up

ROOT = Path(__file__).resolve().parents[1]
TORCH_EXTRA = ("torch", "safetensors", "tokenizers")
TORCH_TESTS = [
    "tests/engines/test_torch_checkpoint.py",
    "tests/engines/test_torch_engine.py",
    "tests/engines/test_torch_runner.py",
    "tests/engines/test_torch_sampler.py",
    "tests/gateway/test_e2e_torch.py",
    "tests/engines/test_bench.py",  # torch checkpoints, through test_torch_checkpoint
    "tests/gateway/test_e2e_templates.py",
]


def without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment whose Python finds none of `modules`."""
    for name in modules:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n"
        )
    return {**os.environ, "PYTHONPATH": str(tmp_path)}


def test_the_torch_test_modules_skip_without_torch(tmp_path: Path) -> None:
    env = without(tmp_path, "torch", "safetensors")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *TORCH_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, run.stdout[-3000:]  # every module skipped
    assert re.search(rf"\b{len(TORCH_TESTS)} skipped\b", run.stdout), run.stdout[-3000:]
    assert "error" not in run.stdout.lower()


@pytest.mark.slow
def test_kvgate_up_with_the_mock_engine_needs_no_torch(tmp_path: Path) -> None:
    (tmp_path / "blocked").mkdir()
    env = without(tmp_path / "blocked", *TORCH_EXTRA)
    with running_kvgate_up(["--engine", "mock", "--workers", "1"], tmp_path / "up.log", env=env) as base:
        url = base + "/v1"
        with urllib.request.urlopen(url + "/models", timeout=10) as response:
            (model,) = json.load(response)["data"]
        reply = openai.OpenAI(base_url=url, api_key="none", max_retries=0).chat.completions.create(
            model=model["id"], messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
        assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
