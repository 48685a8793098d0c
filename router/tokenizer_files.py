"""A model's tokenizer files as one content-addressed object, so that every gateway replica can fetch
from the bus exactly what the worker tokenizes with (no shared file system).

`tokenizer.json` (the `tokenizers` library's format), `tokenizer_config.json` (special tokens, and
the chat template of older checkpoints) and `chat_template.jinja` (newer checkpoints), as found in a
Hugging Face checkpoint folder. A registration names the bundle by `sha256:<hex>` of its msgpack
encoding; whoever fetches it checks the hash before using it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec

HASH_PREFIX = "sha256:"
MAX_BUNDLE_BYTES = 64 * 1024 * 1024  # the largest published tokenizer.json files are ~30 MB


class TokenizerFiles(msgspec.Struct, frozen=True):
    tokenizer_json: bytes
    tokenizer_config: bytes = b""
    chat_template: str | None = None

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    def config(self) -> dict[str, Any]:
        if not self.tokenizer_config:
            return {}
        try:
            value = json.loads(self.tokenizer_config)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"tokenizer_config.json is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ValueError("tokenizer_config.json is not an object")
        return value


def digest(data: bytes) -> str:
    """The name a registration gives the encoded bundle `data`."""
    return HASH_PREFIX + hashlib.sha256(data).hexdigest()


def is_digest(spec: str) -> bool:
    hexpart = spec[len(HASH_PREFIX) :]
    return spec.startswith(HASH_PREFIX) and len(hexpart) == 64 and set(hexpart) <= set("0123456789abcdef")


def decode_bundle(data: bytes, expected: str) -> TokenizerFiles:
    """Bytes fetched for the name `expected`: ValueError unless they are that bundle, and bounded."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError(f"tokenizer bundle of {len(data)} bytes exceeds {MAX_BUNDLE_BYTES}")
    if digest(data) != expected:
        raise ValueError(f"tokenizer bundle does not match its name {expected}")
    try:
        return msgspec.msgpack.decode(data, type=TokenizerFiles)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"invalid tokenizer bundle: {exc}") from exc


def read_folder(path: str | Path) -> TokenizerFiles | None:
    """The tokenizer files of a checkpoint folder (or of a tokenizer.json named directly); None when
    there is no tokenizer.json."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    tokenizer = path if path.is_file() else folder / "tokenizer.json"
    if not tokenizer.is_file():
        return None
    config = folder / "tokenizer_config.json"
    template = folder / "chat_template.jinja"
    return TokenizerFiles(
        tokenizer_json=_read_bounded(tokenizer),
        tokenizer_config=_read_bounded(config) if config.is_file() else b"",
        chat_template=_read_bounded(template).decode() if template.is_file() else None,
    )


def _read_bounded(path: Path) -> bytes:
    """A file of at most MAX_BUNDLE_BYTES, else ValueError: a worker's registration may name a path for
    the gateway to read, and the bus is untrusted (a large file there is no tokenizer)."""
    with path.open("rb") as handle:
        data = handle.read(MAX_BUNDLE_BYTES + 1)
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError(f"{path} is over {MAX_BUNDLE_BYTES} bytes: not a tokenizer file")
    return data
