"""A Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) over a paged KV cache.

Module and parameter names follow Hugging Face's Llama/Qwen2 (`model.layers.N.self_attn.q_proj`, ...)
so a checkpoint's state dict loads by name. Every forward takes packed tokens `[T]` of one engine
step; `StepLayout` says where their K/V go and what each attends to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engines.torch.attention import StepLayout, paged_attention
from engines.torch.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin of each position, in Hugging Face's rotate-half layout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.dims_per_head
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        if config.rope_scaling is not None:
            inv_freq = _llama3_scaled(inv_freq, config)
        # Not a buffer: `model.to(torch.bfloat16)` would round it, and positions times a bf16
        # frequency are off by whole radians at long contexts. Follows the positions' device instead.
        self.inv_freq = inv_freq.float()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin over the whole head ([T, 1, hd]): `[cos, cos]` and `[-sin, sin]`,
        built once per step so that each layer rotates with one cat, two muls and an add."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        return torch.cat((cos, cos), -1)[:, None, :], torch.cat((-sin, sin), -1)[:, None, :]


def _llama3_scaled(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Llama 3.1's rule: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    scaling = config.rope_scaling
    assert scaling is not None
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, blended, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, hd] rotated by its position (first half paired with second half, as in HF);
    cos/sin as `RotaryEmbedding` gives them. Bit for bit HF's `x1*cos - x2*sin, x2*cos + x1*sin`
    (adding -x2*sin is subtracting x2*sin), in 4 kernels instead of 7."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)  # [x2, x1]
    return x * cos + swapped * sin


def fuse_linears(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linears applied to the same input, so that one GEMM replaces
    several. The linears' parameters become views of it: no memory is duplicated, the state dict
    keeps its names, and in-place writes to a parameter (loading, init) reach the fused tensor."""
    with torch.no_grad():
        weight = torch.cat([linear.weight for linear in linears])
        has_bias = linears[0].bias is not None
        bias = torch.cat([linear.bias for linear in linears]) if has_bias else None
    row = 0
    for linear in linears:
        rows = slice(row, row + linear.out_features)
        linear.weight = nn.Parameter(weight[rows], requires_grad=linear.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[rows], requires_grad=linear.bias.requires_grad)
        row = rows.stop
    return weight, bias


class FusedLinears:
    """Several linears of one module applied to one input, their outputs concatenated: one GEMM
    once `fuse()` ran, else (or once `.to()` replaced the parameters) one linear at a time."""

    def __init__(self, *linears: str) -> None:
        self._names = linears
        self._fused: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._ptrs: tuple[int, ...] = ()

    def fuse(self, owner: nn.Module) -> None:
        self._fused = fuse_linears(self._linears(owner))
        self._ptrs = self._param_ptrs(owner)

    def __call__(self, owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            if self._param_ptrs(owner) == self._ptrs:
                return F.linear(x, *self._fused)
            self._fused = None  # the parameters moved: the fused copy is stale
        return torch.cat([linear(x) for linear in self._linears(owner)], dim=-1)

    def _linears(self, owner: nn.Module) -> list[nn.Linear]:
        return [getattr(owner, name) for name in self._names]

    def _param_ptrs(self, owner: nn.Module) -> tuple[int, ...]:
        return tuple(p.data_ptr() for linear in self._linears(owner) for p in linear.parameters())


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.dims_per_head
        hidden = config.hidden_size
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden, bias=False)
        self.qkv = FusedLinears("q_proj", "k_proj", "v_proj")

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_layer: torch.Tensor,
        layout: StepLayout,
    ) -> torch.Tensor:
        tokens, heads, kv_heads, head_dim = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(self, x)  # [T, (heads + 2 kv_heads) * hd]
        # q and k heads side by side are rotated together; v is the rest
        qk = apply_rope(qkv[:, : (heads + kv_heads) * head_dim].view(tokens, -1, head_dim), *rope)
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
        out = paged_attention(q, k, v, kv_layer, layout)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up = FusedLinears("gate_proj", "up_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(self, x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_layer: torch.Tensor,
        layout: StepLayout,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_layer, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(self, token_ids: torch.Tensor, kv_cache: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        x = self.embed_tokens(token_ids)
        rope = self.rotary(layout.positions, x.dtype)
        for layer, kv_layer in zip(self.layers, kv_cache, strict=True):
            x = layer(x, rope, kv_layer, layout)
        return x  # final norm is applied by CausalLM.logits, only on the rows that need logits


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, token_ids: torch.Tensor, kv_cache: torch.Tensor, layout: StepLayout) -> torch.Tensor:
        """Hidden states [T, hidden] of the packed tokens, their K/V written into `kv_cache`
        ([layers, 2, num_blocks, block_size, kv_heads, head_dim])."""
        return self.model(token_ids, kv_cache, layout)

    def fuse_projections(self) -> None:
        """q/k/v and gate/up of every layer as one GEMM each (call once weights and device are
        final): fewer kernel launches per layer, which is what a small model's step is bound by."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)  # what a ModuleList holds is typed Module
            layer.self_attn.qkv.fuse(layer.self_attn)
            layer.mlp.gate_up.fuse(layer.mlp)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden)).float()

    def init_random(self, seed: int) -> None:
        """Seeded random weights, scaled so activations stay O(1) through the layers. Embeddings are
        as large as the residual stream so the current token steers the next one: with small ones,
        attention averages the context into a fixed point and greedy output repeats one token."""
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith("bias"):
                    param.normal_(0.0, 0.02, generator=generator)
                elif param.dim() == 2 and "embed_tokens" not in name:
                    param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=generator)
                else:
                    param.normal_(0.0, 1.0, generator=generator)
