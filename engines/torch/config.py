"""The shape of a Llama-style decoder: the default tiny model's, or a Hugging Face config.json's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

# Architectures whose weights load by name into `CausalLM` (Qwen2 differs only by q/k/v biases).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


class ConfigError(ValueError):
    """A config.json this engine cannot run."""


class RopeScaling(msgspec.Struct, frozen=True):
    """Llama 3's frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


class ModelConfig(msgspec.Struct, frozen=True):
    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 688
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    qkv_bias: bool = False

    @property
    def dims_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.dims_per_head % 2:
            raise ConfigError("head_dim must be even for RoPE")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")


def tiny_config(vocab_size: int) -> ModelConfig:
    """The default random model: small enough that CPU tests and benches are quick. Untied: a random
    model with tied embeddings predicts its input token again and again."""
    return ModelConfig(vocab_size=vocab_size, tie_word_embeddings=False)


def load_hf_config(path: Path) -> ModelConfig:
    """Read a Llama/Qwen2/Mistral config.json into a `ModelConfig`."""
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported (one of {SUPPORTED_MODEL_TYPES})")
    try:
        heads = int(raw["num_attention_heads"])
        config = ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            intermediate_size=int(raw["intermediate_size"]),
            head_dim=int(raw["head_dim"]) if raw.get("head_dim") else None,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(raw.get("rope_scaling")),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama has them when attention_bias is set.
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: missing or malformed field: {exc}") from exc
    config.validate()
    return config


def _rope_scaling(raw: Any) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (only llama3)")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )
