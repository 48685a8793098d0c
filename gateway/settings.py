"""The settings `kvgate gateway` and `kvgate up` share, checked before anything starts: the router's
tunables (a JSON file of RouterConfig fields and KEY=VALUE overrides), the workers' heartbeat
staleness, and the numeric flags. Every error is a `SettingError` whose message is one line naming the
flag or file."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from difflib import get_close_matches
from typing import Any

import msgspec

from router.config import RouterConfig

MAX_ROUTER_CONFIG_BYTES = 1 << 20  # a JSON object of a few dozen tunables; anything near this is a wrong file
DEFAULT_WORKER_STALE_AFTER_S = 3.0  # three missed heartbeats (workers send one a second)


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's tunables (router/config.py `RouterConfig`) and its workers' staleness; `kvgate up`
    takes them too."""
    parser.add_argument(
        "--worker-stale-after-s",
        type=float,
        default=DEFAULT_WORKER_STALE_AFTER_S,
        help="seconds without a worker's heartbeat (one a second) before it leaves the pick with its "
        "blocks; raise it where a loaded host can stall a live worker's heartbeat",
    )
    parser.add_argument(
        "--no-split-turns",
        action="store_true",
        help="send every turn as one request; by default session_kv sends a turn's decode apart from its "
        "prompt to workers that return token ids and schedule by priority (kvgate worker "
        "--priority-scheduling; at a priority every prompt outranks) or have a host tier (kvgate worker "
        "--host-blocks N; first come first served, behind the prompts sent before it)",
    )
    parser.add_argument(
        "--router-config",
        metavar="FILE",
        help='JSON object of RouterConfig fields (router/config.py), e.g. {"session_admission": true}',
    )
    parser.add_argument(
        "--router-set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="one RouterConfig field over --router-config, VALUE as JSON (repeatable), e.g. stall_factor=1.5",
    )


class SettingError(Exception):
    """A command-line setting the gateway cannot use; the message is one line naming it."""


class RouterConfigError(SettingError):
    """A router config file or override (or a tenant) the gateway cannot use."""


def load_router_config(path: str | None, overrides: Sequence[str] = ()) -> RouterConfig:
    """The file's fields, then each KEY=VALUE over them; every step checked as RouterConfig checks it,
    so an error names the file or the override that made it."""
    config, fields = RouterConfig(), {}
    if path is not None:
        fields = _read_object(path)
        config = _to_config(fields, f"--router-config {path}")
    for item in overrides:
        key, value = _parse_override(item)
        fields = {**fields, key: value}
        config = _to_config(fields, f"--router-set {item}")
    return config


def router_config_from(args: argparse.Namespace) -> RouterConfig:
    return load_router_config(args.router_config, args.router_set)


def worker_stale_after_s(args: argparse.Namespace) -> float:
    """--worker-stale-after-s, checked: a positive, finite number of seconds."""
    check_numbers(args, positive=["worker_stale_after_s"])
    value: float = args.worker_stale_after_s
    return value


def check_numbers(
    args: argparse.Namespace, positive: Sequence[str] = (), not_negative: Sequence[str] = ()
) -> None:
    """SettingError naming the first of these flags (by their `args` names) whose number is not finite,
    or not above 0 (`positive`), or below 0 (`not_negative`)."""
    for name in [*positive, *not_negative]:
        value = getattr(args, name)
        strict = name in positive
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            what = "a positive number" if strict else "at least 0"
            raise SettingError(f"--{name.replace('_', '-')} must be {what}, not {value}")


def _read_object(path: str) -> dict[str, Any]:
    where = f"--router-config {path}"
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_ROUTER_CONFIG_BYTES + 1)
    except OSError as exc:
        raise RouterConfigError(f"{where}: {exc.strerror or exc}") from None
    if len(data) > MAX_ROUTER_CONFIG_BYTES:
        raise RouterConfigError(f"{where}: larger than {MAX_ROUTER_CONFIG_BYTES} bytes")
    try:
        fields = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise RouterConfigError(f"{where}: not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise RouterConfigError(f"{where}: expected a JSON object of RouterConfig fields")
    return fields


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RouterConfigError(f"--router-set {item}: expected KEY=VALUE, e.g. session_admission=true")
    try:
        return key.strip(), msgspec.json.decode(text)
    except msgspec.DecodeError:
        raise RouterConfigError(f"--router-set {item}: VALUE must be JSON (true, 1.5, 64)") from None


def _to_config(fields: dict[str, Any], where: str) -> RouterConfig:
    # RouterConfig ignores unknown fields when decoding; a typo must not silently keep the default.
    for key in fields:
        if key not in RouterConfig.__struct_fields__:
            close = get_close_matches(key, RouterConfig.__struct_fields__, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RouterConfigError(f"{where}: unknown field {key!r}{hint}")
    try:
        return msgspec.convert(fields, RouterConfig)  # types as JSON decoding checks them, then __post_init__
    except msgspec.ValidationError as exc:
        raise RouterConfigError(f"{where}: {exc}") from None


def describe_router_config(config: RouterConfig) -> str:
    """The fields that differ from the defaults, as KEY=JSON, for the start-up log."""
    default = RouterConfig()
    changed = [
        f"{name}={msgspec.json.encode(getattr(config, name)).decode()}"
        for name in RouterConfig.__struct_fields__
        if getattr(config, name) != getattr(default, name)
    ]
    return " ".join(changed) if changed else "all defaults"
