"""Loading a local Hugging Face checkpoint the test writes itself (random weights in HF names,
config.json, tokenizer.json), checked against a plain dense re-implementation of the HF forward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")  # the whole module needs it: skipped without

from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engines.torch.config import ConfigError
from router.chat import IM_END, IM_START, HFTokenizer, encode_chat
from tests.engines.test_torch_runner import BlockPool, chunk, greedy_generate, make_runner

BLOCK = 8

QWEN2 = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 320,  # padded past the tokenizer's vocabulary, as real checkpoints are
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
}


def hf_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face's parameter names."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])

    w = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], hidden, generator=gen) * 0.3}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rand(q_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = rand(kv_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = rand(kv_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = rand(hidden, q_dim)
        if bias:
            for name, dim in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                w[p + f"self_attn.{name}_proj.bias"] = torch.randn(dim, generator=gen) * 0.1
        w[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        w[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        w[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        w[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=gen)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=gen)
        w[p + "self_attn.rotary_emb.inv_freq"] = torch.ones(head_dim // 2)  # old exporters save it
    w["model.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=gen)
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = rand(config["vocab_size"], hidden)
    return w


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE over a tiny corpus, with the chat template's special tokens added."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=[IM_START, IM_END, "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["system user assistant tool", "You are a helpful assistant.", "hello world"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))


def write_checkpoint(folder: Path, config: dict, seed: int = 0, shards: int = 1) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    weights = hf_weights(config, seed)
    names = sorted(weights)
    for s in range(shards):
        part = {n: weights[n].contiguous() for n in names[s::shards]}
        save_file(part, str(folder / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"))
    write_tokenizer(folder / "tokenizer.json")
    return weights


def reference_logits(w: dict[str, torch.Tensor], config: dict, tokens: list[int]) -> torch.Tensor:
    """Hugging Face's Llama/Qwen2 forward written out densely: no cache, no batching."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    eps = config["rms_norm_eps"]
    n = len(tokens)

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    def rotate(x: torch.Tensor) -> torch.Tensor:  # x [heads, n, hd]
        half = head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(n).float(), inv_freq)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = w["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = linear(h, p + "self_attn.q_proj").view(n, heads, head_dim).transpose(0, 1)
        k = linear(h, p + "self_attn.k_proj").view(n, kv_heads, head_dim).transpose(0, 1)
        v = linear(h, p + "self_attn.v_proj").view(n, kv_heads, head_dim).transpose(0, 1)
        q, k = rotate(q), rotate(k)
        k = k.repeat_interleave(heads // kv_heads, 0)
        v = v.repeat_interleave(heads // kv_heads, 0)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim) + causal, -1) @ v
        x = x + linear(attn.transpose(0, 1).reshape(n, heads * head_dim), p + "self_attn.o_proj")
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = linear(h, p + "mlp.gate_proj")
        x = x + linear(torch.nn.functional.silu(gate) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return norm(x, w["model.norm.weight"]) @ head.T


@pytest.mark.parametrize(("config", "shards"), [(QWEN2, 1), (LLAMA, 3)], ids=["qwen2", "llama-sharded"])
def test_checkpoint_logits_match_the_reference_forward(tmp_path: Path, config: dict, shards: int) -> None:
    weights = write_checkpoint(tmp_path / "ckpt", config, seed=3, shards=shards)
    runner = make_runner(64, BLOCK, str(tmp_path / "ckpt"))
    assert runner.model_name == "ckpt"
    assert runner.config.qkv_bias == (config["model_type"] == "qwen2")
    tokens = encode_chat([{"role": "user", "content": "hello world, you are a tool"}], runner.tokenizer)
    table = BlockPool(64).take(-(-len(tokens) // BLOCK))
    got = runner.logits([chunk("ref", tokens, 0, table)])[0].cpu()  # the reference runs on the CPU
    torch.testing.assert_close(got, reference_logits(weights, config, tokens), rtol=1e-4, atol=1e-4)


def test_checkpoint_tokenizer_and_cached_generation(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "qwen", QWEN2, seed=5)
    runner = make_runner(128, BLOCK, str(tmp_path / "qwen"), seed=1)
    tok = runner.tokenizer
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_token_id == 1  # <|im_end|>, the second special token
    tokens = encode_chat([{"role": "user", "content": "hello world " * 6}], tok)
    assert tokens[0] == 0  # <|im_start|> is one token, not its characters
    assert tok.decode(tokens).startswith(f"{IM_START}user\nhello world")

    cold = greedy_generate(runner, [tokens], 20, BlockPool(128, 1))
    warm = greedy_generate(runner, [tokens], 20, BlockPool(128, 2), cached_blocks=[len(tokens) // BLOCK])
    assert cold == warm
    # The vocabulary padding past the tokenizer is never sampled.
    assert all(t < tok.vocab_size for t in cold[0])


def test_llama3_rope_scaling_slows_only_long_wavelengths(tmp_path: Path) -> None:
    scaled = dict(LLAMA, max_position_embeddings=4096)
    scaled["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    write_checkpoint(tmp_path / "plain", LLAMA)
    write_checkpoint(tmp_path / "scaled", scaled)
    plain = make_runner(8, BLOCK, str(tmp_path / "plain"))
    long = make_runner(8, BLOCK, str(tmp_path / "scaled"))
    base, freq = plain.model.model.rotary.inv_freq, long.model.model.rotary.inv_freq
    assert freq[0] == base[0]  # the fastest rotation is kept
    torch.testing.assert_close(freq[-1], base[-1] / 8)  # the slowest is slowed by `factor`
    assert long.max_model_len == 4096


def test_bad_checkpoints_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        make_runner(8, BLOCK, str(tmp_path / "nowhere"))
    write_checkpoint(tmp_path / "gpt", dict(QWEN2, model_type="gpt2"))
    with pytest.raises(ConfigError, match="model_type"):
        make_runner(8, BLOCK, str(tmp_path / "gpt"))
    write_checkpoint(tmp_path / "mismatch", dict(QWEN2, hidden_size=32))
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(QWEN2))
    write_checkpoint(tmp_path / "short", QWEN2)
    weights = hf_weights(QWEN2, 0)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "short" / "model-00001-of-00001.safetensors"))
    with pytest.raises(ConfigError, match="missing"):
        make_runner(8, BLOCK, str(tmp_path / "short"))
    with pytest.raises(ConfigError, match="shape"):
        make_runner(8, BLOCK, str(tmp_path / "mismatch"))
    (tmp_path / "short" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        make_runner(8, BLOCK, str(tmp_path / "short"))
