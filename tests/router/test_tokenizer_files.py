"""A checkpoint folder's tokenizer files as one bundle: read back exactly, and bounded in size."""

from __future__ import annotations

from pathlib import Path

import pytest

from router import tokenizer_files
from router.tokenizer_files import decode_bundle, digest, read_folder
from tests.router.chat_families import write_tokenizer_folder


def test_a_folder_round_trips_through_its_bundle(tmp_path: Path) -> None:
    folder = write_tokenizer_folder("qwen3-0.6b", tmp_path / "qwen3")
    files = read_folder(folder)
    assert files is not None
    assert files.tokenizer_json == (folder / "tokenizer.json").read_bytes()
    assert files.chat_template == (folder / "chat_template.jinja").read_text()
    assert read_folder(folder / "tokenizer.json") == files  # the file named directly: its folder's files
    data = files.encode()
    assert decode_bundle(data, digest(data)) == files
    with pytest.raises(ValueError, match="does not match"):
        decode_bundle(data, digest(data + b"x"))


def test_no_tokenizer_json_is_none(tmp_path: Path) -> None:
    assert read_folder(tmp_path) is None


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_a_file_over_the_bound_is_refused_not_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # a registration may name a path for the gateway to read: whatever is there must not be read whole
    folder = write_tokenizer_folder("qwen3-0.6b", tmp_path / "qwen3")
    monkeypatch.setattr(tokenizer_files, "MAX_BUNDLE_BYTES", 1024)
    (folder / name).write_bytes(b"x" * 1025)
    if name != "tokenizer.json":
        (folder / "tokenizer.json").write_bytes(b"{}")
    with pytest.raises(ValueError, match="over 1024 bytes"):
        read_folder(folder)
