"""Tokenizer delivery over the bus: a worker's Publisher stores its files by content hash, a gateway
fetches them once, checks their hash and size, and refuses what does not match."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from gateway.tokenizers import Tokenizers, TokenizerUnavailable
from router.chat import HFTokenizer, encode_chat
from router.protocol import Subjects
from router.tokenizer_files import HASH_PREFIX, digest, read_folder
from tests.router.chat_families import write_tokenizer_folder


async def test_fetched_once_by_hash_and_checked(nats_url: str, namespace: str, tmp_path: Path) -> None:
    files = read_folder(write_tokenizer_folder("qwen3-0.6b", tmp_path / "qwen3"))
    assert files is not None
    bundle = files.encode()
    name = digest(bundle)
    subjects = Subjects(namespace)
    nc = await nats.connect(nats_url)
    try:
        store = await nc.jetstream().create_object_store(subjects.tokenizer_bucket)
        await store.put(name.removeprefix(HASH_PREFIX), bundle)
        forged = digest(b"something else")
        await store.put(forged.removeprefix(HASH_PREFIX), bundle)  # stored under another's name

        tokenizers = Tokenizers(subjects.tokenizer_bucket, lambda: nc)
        first, second = await asyncio.gather(tokenizers.load(name), tokenizers.load(name))
        assert first is second and tokenizers.fetches == 1
        messages = [{"role": "user", "content": "hi"}]
        assert encode_chat(messages, first) == encode_chat(messages, HFTokenizer(files))
        with pytest.raises(TokenizerUnavailable, match="does not match"):
            await tokenizers.load(forged)
        with pytest.raises(TokenizerUnavailable, match="not in the object store"):
            await tokenizers.load(digest(b"never stored"))
        small = Tokenizers(subjects.tokenizer_bucket, lambda: nc, max_bytes=1000)
        with pytest.raises(TokenizerUnavailable, match="over 1000"):
            await small.load(name)
        assert (await tokenizers.load("byte")).name == "byte"
        full = Tokenizers(subjects.tokenizer_bucket, lambda: nc, max_tokenizers=1)
        await full.load("byte")
        with pytest.raises(TokenizerUnavailable, match="already 1 tokenizers held"):
            await full.load(name)  # memory per gateway stays bounded whatever registrations say
    finally:
        await nc.close()
