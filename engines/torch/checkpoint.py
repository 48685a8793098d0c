"""Loading a local Hugging Face checkpoint (Llama/Qwen2/Mistral): config.json, *.safetensors and,
when present, tokenizer.json. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from engines.torch.config import ConfigError, load_hf_config
from engines.torch.model import CausalLM, RotaryEmbedding

# Buffers some exporters save that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_checkpoint(path: str | Path, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """The model of the checkpoint directory `path`, on `device` in `dtype`."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model path {folder} is not a directory")
    config = load_hf_config(folder / "config.json")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file), device="cpu").items():
            if not name.endswith(_IGNORED_SUFFIXES):
                state[name] = tensor.to(dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        if "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    # Built on the meta device: weights come from the files, so random init would be wasted time.
    with torch.device("meta"):
        model = CausalLM(config)
    expected = set(model.state_dict())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {folder} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name, tensor in state.items():
        wanted = model.get_parameter(name).shape
        if tensor.shape != wanted:
            raise ConfigError(f"{name}: shape {tuple(tensor.shape)} in checkpoint, {tuple(wanted)} by config")
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = RotaryEmbedding(config)  # its frequencies were built on meta
    return model.to(device).eval()


def tokenizer_path(path: str | Path) -> Path | None:
    """The checkpoint's tokenizer.json, if it has one."""
    candidate = Path(path) / "tokenizer.json"
    return candidate if candidate.is_file() else None
