"""Checkpoint tokenizer folders for real chat-template families: the published template and special
tokens (tests/router/data/chat_templates) over a small BPE trained here, with the family's added tokens."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

DATA = Path(__file__).parent / "data" / "chat_templates"
FAMILIES = sorted(p.name for p in DATA.iterdir() if p.is_dir())
# sentencepiece-style (spaces as "▁", no byte-level pre-tokenizer); the others are byte-level BPE
SENTENCEPIECE = {"gemma-2-2b-it"}

CORPUS = [
    "You are a helpful assistant. Use the tools when they help.",
    "What is the weather in Paris today? It is sunny, 21 degrees.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024",
    "def add(a, b):\n    return a + b\n# Tools function type parameters properties required",
    "<think>\nLet me think about this step by step.\n</think>\n\nThe answer is 42.",
] * 8


def build_tokenizer(family: str) -> Tokenizer:
    spec = json.loads((DATA / family / "special_tokens.json").read_text())
    if family in SENTENCEPIECE:
        tok = Tokenizer(models.BPE(unk_token=spec.get("unk_token")))
        tok.normalizer = normalizers.Replace(" ", "▁")
        alphabet = sorted({c for line in CORPUS for c in line.replace(" ", "▁")})
        trainer = trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=alphabet, special_tokens=[spec["unk_token"]]
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    for added in spec["added_tokens"]:
        token = AddedToken(added["content"], normalized=False, special=added["special"])
        if added["special"]:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tok


def write_tokenizer_folder(family: str, folder: Path) -> Path:
    """tokenizer.json, tokenizer_config.json (special tokens) and chat_template.jinja in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = json.loads((DATA / family / "special_tokens.json").read_text())
    build_tokenizer(family).save(str(folder / "tokenizer.json"))
    config = {k: v for k, v in spec.items() if k.endswith("_token")}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    (folder / "chat_template.jinja").write_bytes((DATA / family / "chat_template.jinja").read_bytes())
    return folder
