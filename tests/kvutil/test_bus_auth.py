"""Bus credentials from flags and the nats CLI's environment variables, checked and never printed."""

from __future__ import annotations

import argparse
import ssl

import pytest

from kvutil.bus_auth import BusAuth, BusAuthError, add_bus_arguments, bus_auth_from, redact_url


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bus_arguments(parser)
    return parser.parse_args(argv)


def test_flags_win_over_the_environment_and_fill_the_connect_options() -> None:
    env = {"NATS_USER": "env-user", "NATS_PASSWORD": "env-secret", "NATS_TOKEN": "tok"}
    auth = bus_auth_from(parse("--nats-user", "flag-user"), env)
    assert auth == BusAuth(user="flag-user", password="env-secret", token="tok")
    assert auth.connect_options() == {"user": "flag-user", "password": "env-secret", "token": "tok"}
    assert auth.environ() == {"NATS_USER": "flag-user", "NATS_PASSWORD": "env-secret", "NATS_TOKEN": "tok"}


def test_secrets_never_show_in_repr_or_urls() -> None:
    auth = BusAuth(user="u", password="hunter2", token="t0ken")
    assert "hunter2" not in repr(auth) and "t0ken" not in str(auth)
    assert redact_url("nats://u:hunter2@h:4222") == "nats://***@h:4222"
    assert redact_url("tls://t0ken@a:1,nats://b:2") == "tls://***@a:1,nats://b:2"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NATS_PASSWORD": "p"}, "needs a user"),
        ({"NATS_CERT": "/etc/hostname"}, "needs its key"),
        ({"NATS_CA": "/nonexistent/ca.pem"}, "cannot read"),
    ],
)
def test_options_that_cannot_work_are_one_line_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(BusAuthError, match=message):
        bus_auth_from(parse(), env)


def test_a_ca_file_makes_a_verifying_tls_context(tmp_path) -> None:
    ca = ssl.get_default_verify_paths().cafile
    if ca is None:
        pytest.skip("no system CA bundle")
    options = BusAuth(tls_ca=ca).check().connect_options()
    assert options["tls"].verify_mode == ssl.CERT_REQUIRED
