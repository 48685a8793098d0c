"""Write an offline tokenizer folder that Dynamo's mocker can load: byte-level, ids 0-255 are the
byte values (the same ids as kvgate's byte tokenizer), three ChatML specials, a ChatML chat template,
and a Llama-shaped config.json (the mocker reads shapes from it; no weights are needed)."""

import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers


def byte_chars() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
chars = byte_chars()
tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
tok.decoder = decoders.ByteLevel()
tok.add_special_tokens(
    [AddedToken(s, special=True, normalized=False) for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
)
tok.save(str(out / "tokenizer.json"))
template = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for p in message['content'] %}{{ p['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
(out / "tokenizer_config.json").write_text(
    json.dumps(
        {
            "model_max_length": 1000000,
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": template,
        },
        indent=1,
    )
)
(out / "config.json").write_text(
    json.dumps(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 259,
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "max_position_embeddings": 1048576,
            "torch_dtype": "bfloat16",
            "eos_token_id": 257,
            "bos_token_id": 258,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
        },
        indent=1,
    )
)
(out / "generation_config.json").write_text(json.dumps({"eos_token_id": 257, "bos_token_id": 258}))
print(f"tokenizer folder written to {out}")
