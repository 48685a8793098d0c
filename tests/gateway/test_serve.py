"""`kvgate gateway` and `kvgate up` take the router's tunables: `--router-config FILE` and `--router-set
KEY=VALUE`, parsed by the real CLI, checked as RouterConfig checks them, and used by the real processes."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.cli import build_parser
from gateway.cli import main as kvgate_main
from gateway.config import GatewayConfig
from gateway.natsd import free_port
from gateway.serve import config_from, serve
from gateway.settings import (
    MAX_ROUTER_CONFIG_BYTES,
    RouterConfigError,
    describe_router_config,
    load_router_config,
    router_config_from,
    worker_stale_after_s,
)
from router.config import RouterConfig
from tests.gateway.conftest import Cluster, http_get


def write(tmp_path: Path, text: str, name: str = "router.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- parsing


def test_file_and_overrides_reach_the_gateways_router(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps({"session_admission": True, "stall_factor": 3, "pin_max_s": 60.0}))
    args = build_parser().parse_args(
        ["gateway", "--nats", "nats://127.0.0.1:4222", "--router-config", path,
         "--router-set", "stall_factor=1.5", "--router-set", "admission_max_held=8"]
    )  # fmt: skip
    config = router_config_from(args)
    assert config == RouterConfig(
        session_admission=True, stall_factor=1.5, pin_max_s=60.0, admission_max_held=8
    )
    gateway = Gateway(config_from(args, config))
    assert gateway.router.config is config
    assert gateway.router.admission is not None  # session_kv's admission by session, off by default


def test_no_options_give_the_defaults() -> None:
    args = build_parser().parse_args(["gateway", "--nats", "nats://127.0.0.1:4222"])
    assert router_config_from(args) == RouterConfig()
    assert Gateway(config_from(args, RouterConfig())).router.admission is None


def test_overrides_alone_and_the_last_one_wins() -> None:
    config = load_router_config(None, ["pin_on_tool_result=false", "think_alpha=0.5", "think_alpha=1"])
    assert config.pin_on_tool_result is False
    assert config.think_alpha == 1.0


def test_up_takes_the_same_options(tmp_path: Path) -> None:
    path = write(tmp_path, '{"session_admission": true}')
    args = build_parser().parse_args(["up", "--router-config", path, "--router-set", "pin_min_s=1"])
    assert router_config_from(args) == RouterConfig(session_admission=True, pin_min_s=1.0)


def test_worker_staleness_reaches_the_bus_and_the_index_recovery() -> None:
    args = build_parser().parse_args(["gateway", "--nats", "nats://127.0.0.1:4222"])
    assert config_from(args, RouterConfig()).stale_after_s == 3.0  # three missed heartbeats
    args = build_parser().parse_args(["gateway", "--nats", "nats://n:4222", "--worker-stale-after-s", "12.5"])
    gateway = Gateway(config_from(args, RouterConfig()))
    assert (gateway.bus.stale_after_s, gateway.replication.stale_after_s) == (12.5, 12.5)
    assert worker_stale_after_s(build_parser().parse_args(["up", "--worker-stale-after-s", "20"])) == 20.0


@pytest.mark.parametrize("command", ["gateway", "up"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_worker_staleness_is_one_line_and_status_2(
    command: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--nats", "nats://127.0.0.1:1", f"--worker-stale-after-s={value}"]
    assert kvgate_main(argv) == 2  # before anything starts (`up`: no NATS, no workers)
    problem = f"--worker-stale-after-s must be a positive number, not {float(value)}"
    assert capsys.readouterr().err == f"kvgate {command}: {problem}\n"


@pytest.mark.parametrize(
    ("command", "flag", "value", "what"),
    [
        ("gateway", "--max-body-bytes", "0", "a positive number"),
        ("gateway", "--max-prompt-tokens", "-5", "a positive number"),
        ("gateway", "--first-byte-timeout-s", "nan", "a positive number"),
        ("gateway", "--header-timeout-s", "0", "a positive number"),
        ("gateway", "--snapshot-interval-s", "-inf", "a positive number"),
        ("gateway", "--responses-ttl", "0", "a positive number"),
        ("gateway", "--body-budget-mb", "0", "a positive number"),
        ("gateway", "--body-timeout-s", "nan", "a positive number"),
        ("gateway", "--max-inflight-per-worker", "-1", "at least 0"),
        ("gateway", "--queue-bound", "-1", "at least 0"),
        ("gateway", "--prompt-cache-mb", "-0.5", "at least 0"),
        ("gateway", "--failure-backoff-s", "inf", "at least 0"),
        ("up", "--workers", "0", "a positive number"),
        ("up", "--ready-timeout", "-1", "a positive number"),
        ("up", "--max-inflight-per-worker", "-2", "at least 0"),
    ],
)
def test_a_number_out_of_range_is_one_line_and_status_2(
    command: str, flag: str, value: str, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--nats", "nats://127.0.0.1:1", f"{flag}={value}"]
    assert kvgate_main(argv) == 2  # before anything starts
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"kvgate {command}: {flag} must be {what}, not "), line


def test_a_body_budget_below_one_body_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["gateway", "--nats", "nats://127.0.0.1:1", "--body-budget-mb", "4", "--max-body-bytes", "8388608"]
    assert kvgate_main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == "kvgate gateway: --body-budget-mb (4 MiB) must hold one body of --max-body-bytes (8388608)"


@pytest.mark.parametrize(
    ("text", "overrides", "where", "problem"),
    [
        ("{", [], "--router-config", "not JSON"),
        ("[1, 2]", [], "--router-config", "expected a JSON object"),
        (
            '{"stal_factor": 1}',
            [],
            "--router-config",
            "unknown field 'stal_factor' (did you mean 'stall_factor'?)",
        ),
        (
            '{"stall_factor": "high"}',
            [],
            "--router-config",
            "Expected `float`, got `str` - at `$.stall_factor`",
        ),
        ('{"max_sessions": true}', [], "--router-config", "Expected `int`, got `bool`"),
        ('{"max_sessions": 1.5}', [], "--router-config", "Expected `int`, got `float`"),
        ('{"pin_min_s": 10, "pin_max_s": 5}', [], "--router-config", "need 0 <= pin_min_s <= pin_max_s"),
        ('{"think_alpha": 2}', [], "--router-config", "think_alpha must be within [0, 1]"),
        ('{"pin_max_s": 5}', ["pin_min_s=10"], "--router-set pin_min_s=10", "need 0 <= pin_min_s"),
        ("{}", ["session_admission"], "--router-set session_admission", "expected KEY=VALUE"),
        ("{}", ["=1"], "--router-set =1", "expected KEY=VALUE"),
        ("{}", ["stall_factor=high"], "--router-set stall_factor=high", "VALUE must be JSON"),
        ("{}", ["no_such_knob=1"], "--router-set no_such_knob=1", "unknown field 'no_such_knob'"),
        ("{}", ["session_admission=1"], "--router-set session_admission=1", "Expected `bool`, got `int`"),
    ],
)
def test_bad_input_is_one_line_naming_where_and_what(
    tmp_path: Path, text: str, overrides: list[str], where: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RouterConfigError) as info:
        load_router_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    if where == "--router-config":
        where = f"--router-config {path}"
    assert message.startswith(f"{where}: "), message
    assert problem in message, message


def test_a_missing_file_a_folder_and_an_oversized_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.json")
    with pytest.raises(RouterConfigError, match=f"^--router-config {missing}: No such file or directory$"):
        load_router_config(missing)
    with pytest.raises(RouterConfigError, match="Is a directory"):
        load_router_config(str(tmp_path))
    big = write(tmp_path, '{"stall_factor": 1.0' + " " * MAX_ROUTER_CONFIG_BYTES + "}")
    with pytest.raises(RouterConfigError, match="larger than"):
        load_router_config(big)


def test_start_up_line_names_only_what_differs() -> None:
    assert describe_router_config(RouterConfig()) == "all defaults"
    changed = RouterConfig(stall_factor=1.5, session_admission=True, pin_max_s=120.0)  # 120 is the default
    assert describe_router_config(changed) == "stall_factor=1.5 session_admission=true"


# --- real processes


def test_gateway_with_a_bad_file_exits_2_with_one_line(nats_url: str, tmp_path: Path) -> None:
    path = write(tmp_path, '{"session_admision": true}', "bad.json")
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "gateway", "--nats", nats_url, "--port", str(free_port()),
         "--router-config", path],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"kvgate gateway: --router-config {path}: unknown field 'session_admision'"
        " (did you mean 'session_admission'?)\n"
    )


def test_gateway_with_a_good_file_serves_and_logs_its_settings(cluster: Cluster, tmp_path: Path) -> None:
    path = write(tmp_path, '{"session_admission": true, "pin_max_s": 60}')
    gateway = cluster.start_gateway("--router-config", path, "--router-set", "stall_factor=1.5")
    gateway.wait_http("/health", timeout_s=60)
    assert http_get(gateway.url + "/health") == (200, {"status": "ok"})
    log = gateway.log.read_text()
    (line,) = [line for line in log.splitlines() if "router settings:" in line]
    assert "INFO" in line
    assert line.endswith("router settings: pin_max_s=60.0 stall_factor=1.5 session_admission=true")


async def test_session_admission_on_a_policy_without_it_is_called_out(
    nats_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    stop = asyncio.Event()
    stop.set()  # start, log, stop
    for policy in ("round_robin", "session_kv"):
        config = GatewayConfig(
            nats_url=nats_url,
            namespace=namespace,
            policy=policy,
            router_config=RouterConfig(session_admission=True),
        )
        with caplog.at_level(logging.INFO, logger="kvgate.gateway"):
            await asyncio.wait_for(serve(config, "127.0.0.1", free_port(), stop), 30)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "session_admission" in r.getMessage()
    ]
    assert warnings == ["session_admission is ignored: only session_kv admits by session, not round_robin"]


def test_up_with_a_bad_override_starts_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "up", "--engine", "mock", "--port", str(free_port()),
         "--router-set", "think_alpha=7"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "kvgate up: --router-set think_alpha=7: think_alpha must be within [0, 1]\n"


@pytest.mark.slow
def test_up_forwards_the_settings_to_its_gateway(tmp_path: Path) -> None:
    path = write(tmp_path, '{"admission_fill": 0.9}')
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "up", "--engine", "mock", "--workers", "1",
             "--port", str(free_port()), "--router-config", path, "--router-set", "session_admission=true"],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while "router settings:" not in log_path.read_text() and time.monotonic() < deadline:
                assert up.poll() is None, log_path.read_text()[-2000:]
                time.sleep(0.1)
        finally:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
    text = log_path.read_text()
    assert "router settings: session_admission=true admission_fill=0.9" in text, text[-2000:]
