"""How a process authenticates to the NATS bus: user/password, token, NKEY seed, credentials file, TLS.

It lives in kvutil/ because both sides of the bus import it (the gateway, the workers and the bridge).
Every option also comes from the environment variables the `nats` CLI reads (`NATS_USER`, `NATS_PASSWORD`,
`NATS_TOKEN`, `NATS_CREDS`, `NATS_NKEY`, `NATS_CA`, `NATS_CERT`, `NATS_KEY`; `NATS_URL` for the
server), which is also how `kvgate up` hands its generated credentials to its workers: a password on
a command line shows in every process listing.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
from collections.abc import Mapping
from typing import Any

import msgspec

# option name -> environment variable (those of the nats CLI)
ENV: dict[str, str] = {
    "user": "NATS_USER",
    "password": "NATS_PASSWORD",
    "token": "NATS_TOKEN",
    "creds_file": "NATS_CREDS",
    "nkey_seed_file": "NATS_NKEY",
    "tls_ca": "NATS_CA",
    "tls_cert": "NATS_CERT",
    "tls_key": "NATS_KEY",
}
URL_ENV = "NATS_URL"

_FILES = ("creds_file", "nkey_seed_file", "tls_ca", "tls_cert", "tls_key")


class BusAuthError(ValueError):
    """Options that cannot work together, or a file that cannot be read; one line naming it."""


class BusAuth(msgspec.Struct, frozen=True):
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None  # a NATS .creds file (JWT + NKEY seed)
    nkey_seed_file: str | None = None  # a file holding an NKEY user seed (SU...)
    tls_ca: str | None = None  # CA bundle to verify the server
    tls_cert: str | None = None  # client certificate (mutual TLS), with tls_key
    tls_key: str | None = None

    def __repr__(self) -> str:  # never a secret in a log line or a traceback
        shown = {name: _shown(name, getattr(self, name)) for name in self.__struct_fields__}
        return "BusAuth(" + ", ".join(f"{k}={v}" for k, v in shown.items() if v is not None) + ")"

    __str__ = __repr__

    def check(self) -> BusAuth:
        """Raises BusAuthError on options that cannot work; returns self."""
        if self.password is not None and self.user is None:
            raise BusAuthError("a NATS password needs a user (--nats-user or NATS_USER)")
        if self.tls_cert is not None and self.tls_key is None:
            raise BusAuthError("a TLS client certificate needs its key (--nats-key or NATS_KEY)")
        if (self.creds_file or self.nkey_seed_file) and not _have_nkeys():
            raise BusAuthError("NKEY and credentials files need the nkeys package: pip install nkeys")
        for name in _FILES:
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise BusAuthError(f"cannot read the {name.replace('_', ' ')} {path!r}")
        return self

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`."""
        options: dict[str, Any] = {}
        if self.user is not None:
            options["user"] = self.user
            options["password"] = self.password or ""
        if self.token is not None:
            options["token"] = self.token
        if self.creds_file is not None:
            options["user_credentials"] = self.creds_file
        if self.nkey_seed_file is not None:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.tls_ca is not None or self.tls_cert is not None:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert is not None:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            options["tls"] = context
        return options

    def environ(self) -> dict[str, str]:
        """The environment variables that carry these options to a child process."""
        return {ENV[name]: value for name in ENV if (value := getattr(self, name)) is not None}


def _shown(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    return "***" if name in ("password", "token") else repr(value)


def _have_nkeys() -> bool:
    try:
        import nkeys  # noqa: F401
    except ImportError:
        return False
    return True


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    """--nats-user and the rest; each defaults to its environment variable (read at parse time)."""
    group = parser.add_argument_group(
        "NATS authentication", "each also read from its environment variable, as the nats CLI does"
    )
    helps = {
        "user": "user name",
        "password": "password (prefer NATS_PASSWORD: a command line is visible to every local user)",
        "token": "authentication token (prefer NATS_TOKEN)",
        "creds_file": "credentials file (JWT and NKEY seed)",
        "nkey_seed_file": "file holding an NKEY user seed",
        "tls_ca": "CA certificate file to verify the server",
        "tls_cert": "client certificate file (mutual TLS)",
        "tls_key": "client key file (mutual TLS)",
    }
    flags = {
        "user": "--nats-user",
        "password": "--nats-password",
        "token": "--nats-token",
        "creds_file": "--nats-creds",
        "nkey_seed_file": "--nats-nkey",
        "tls_ca": "--nats-ca",
        "tls_cert": "--nats-cert",
        "tls_key": "--nats-key",
    }
    for name, flag in flags.items():
        group.add_argument(flag, dest=f"nats_{name}", metavar="VALUE", help=f"{helps[name]} [{ENV[name]}]")


def bus_auth_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> BusAuth:
    """The options given on the command line, else in the environment; checked."""
    env = os.environ if environ is None else environ
    values = {name: getattr(args, f"nats_{name}", None) or env.get(ENV[name]) or None for name in ENV}
    return BusAuth(**values).check()


def nats_url_from(value: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    return value or env.get(URL_ENV) or None


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@/\s]*)@")


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) with any user:password@ or token@ replaced by ***@."""
    return _USERINFO.sub(lambda m: m.group("scheme") + "***@", url)
