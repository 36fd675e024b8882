"""Transformer building blocks the generators share: attention (causal or not, with a key/value cache), feed-forward
layers, norms, position and timestep embeddings, and adaLN modulation for diffusion transformers."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------
# Embeddings of positions and times
# ---------------------------------------------------------------------------------------------------------------


def sinusoidal_positions(max_len: int, d: int) -> torch.Tensor:
    """(max_len, d): sin at even, cos at odd channels, wavelengths from 2 pi to 10000 * 2 pi (Vaswani et al.)."""
    position = torch.arange(max_len).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
    table = torch.zeros(max_len, d)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N, dim) sinusoidal features of continuous times t (N,): cos then sin at frequencies from 1 to 1/max_period
    (as DiT embeds diffusion times; t may be fractional)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
    return features


class TimestepEmbedding(nn.Module):
    """Diffusion / flow time t (N,) to a d-vector: sinusoidal features, then a two-layer SiLU MLP."""

    def __init__(self, d_model: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.frequency_dim))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE, Su et al.): rotates channel pairs (i, i + D/2) of queries and keys by
    position * base^(-2i/D), so that a query-key product depends on positions only through their difference."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim),
                             persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x: (B, H, T, D) at positions start..start+T-1."""
        positions = torch.arange(start, start + x.shape[-2], device=x.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq[None]
        cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Norms and feed-forward layers
# ---------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) times a learned gain (Zhang & Sennrich): LayerNorm without centring or bias."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def norm(kind: str, d: int) -> nn.Module:
    """'layer' (LayerNorm) or 'rms' (RMSNorm) over the last dimension."""
    if kind == "layer":
        return nn.LayerNorm(d)
    if kind == "rms":
        return RMSNorm(d)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


class MLP(nn.Sequential):
    """Linear, GELU, Linear, dropout (a Sequential, so its parameters are named 0.* and 2.*)."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0):
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model), nn.Dropout(dropout))


class SwiGLU(nn.Module):
    """W_out (SiLU(x W_gate) * x W_up), then dropout (Shazeer's gated feed-forward)."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden)
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))


# ---------------------------------------------------------------------------------------------------------------
# Attention and blocks
# ---------------------------------------------------------------------------------------------------------------

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def new_kv_cache(batch_size: int, n_layers: int, n_heads: int, max_len: int, head_dim: int, device=None) -> KVCache:
    """Per-layer (keys, values) buffers for `max_len` positions, filled in place one position at a time."""
    shape = (batch_size, n_heads, max_len, head_dim)
    return [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in range(n_layers)]


class Attention(nn.Module):
    """Multi-head self-attention, causal or not, optionally with rotary positions; a causal one can decode with a
    preallocated key/value cache (`new_kv_cache`)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = True,
                 rotary: RotaryEmbedding | None = None):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        self.n_heads = n_heads
        self.causal = causal
        self.rotary = rotary
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0):
        """x: (B, T, d). With a (keys, values) cache, x holds the one position `start`: its key and value are
        written in place (no growing concatenation) and it attends to everything before it."""
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            if not self.causal:
                raise ValueError("a key/value cache needs causal attention")
            if T != 1:
                raise ValueError("with a key/value cache, feed one position at a time")
            keys, values = cache
            keys[:, :, start] = k[:, :, 0]
            values[:, :, start] = v[:, :, 0]
            # One query against the cached prefix: two small matmuls beat SDPA on strided cache views.
            scores = (q @ keys[:, :, :start + 1].transpose(-1, -2)) / math.sqrt(q.shape[-1])
            y = torch.softmax(scores, dim=-1) @ values[:, :, :start + 1]
        y = y.transpose(1, 2).contiguous().view(B, T, d)
        return self.out(y)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)), with a GELU MLP or SwiGLU of `mlp_ratio` * d."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = True, mlp_ratio: int = 4,
                 norm_kind: str = "layer", feed_forward: str = "gelu", rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.ln1 = norm(norm_kind, d_model)
        self.attn = Attention(d_model, n_heads, dropout, causal, rotary)
        self.ln2 = norm(norm_kind, d_model)
        if feed_forward == "gelu":
            self.mlp = MLP(d_model, mlp_ratio * d_model, dropout)
        elif feed_forward == "swiglu":
            self.mlp = SwiGLU(d_model, mlp_ratio * d_model, dropout)
        else:
            raise ValueError(f"feed_forward must be 'gelu' or 'swiglu', got {feed_forward!r}")

    def forward(self, x, cache=None, start: int = 0):
        x = x + self.attn(self.ln1(x), cache, start)
        return x + self.mlp(self.ln2(x))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, T, d) shifted and scaled per sample by (B, d) vectors: x * (1 + scale) + shift."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNModulation(nn.Module):
    """A conditioning vector c (B, d) to `n` (B, d) modulation vectors through SiLU and a zero-initialised linear
    map, so a modulated block starts as the identity (DiT's adaLN-Zero)."""

    def __init__(self, d_model: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(d_model, n * d_model)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.n, dim=-1)


class AdaLNBlock(nn.Module):
    """A diffusion-transformer block: non-causal attention and MLP, each after a norm without affine parameters that
    the conditioning shifts and scales, and each gated by it (adaLN-Zero: the identity at initialisation)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, mlp_ratio: int = 4,
                 rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d_model, n_heads, dropout, causal=False, rotary=rotary)
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(d_model, mlp_ratio * d_model, dropout)
        self.modulation = AdaLNModulation(d_model, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
