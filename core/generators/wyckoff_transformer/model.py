"""The Wyckoff transformer: a causal pre-LN transformer with a discrete head and distributional continuous heads.

Read top to bottom: config, embeddings (learned for tokens, linear+log Gaussian expansion for values, sinusoidal
positions — Matra-Genoa Sec. IV.B), attention with a key/value cache, blocks, heads and losses. The continuous head
is a distribution, not a point: a von Mises mixture for fractional coordinates, a log-normal mixture for lattice
lengths and a Gaussian mixture for angles, so sampling at temperature T gives diverse coordinates. `head="mse"`
gives the paper's point regression for comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from wyckoff_lab.core.generators.nn.blocks import KVCache, TransformerBlock, new_kv_cache, sinusoidal_positions
from wyckoff_lab.core.generators.nn.heads import mixture_log_prob, sample_mixture
from wyckoff_lab.core.generators.wyckoff_grammar.tokenizer import (
    ANGLE_KINDS,
    CONTINUOUS_KINDS,
    COORD_KINDS,
    LENGTH_KINDS,
    VOCAB,
)

N_KINDS = len(CONTINUOUS_KINDS) + 1  # 0 = discrete
LENGTH_SCALE = 10.0  # Å: lattice lengths enter the Gaussian expansion as a / 10 Å
ANGLE_CENTER, ANGLE_SCALE = 90.0, 30.0  # degrees: angles are modelled as (angle - 90) / 30


@dataclass
class WyckoffTransformerConfig:
    vocab_size: int = len(VOCAB)
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    dropout: float = 0.1
    max_len: int = 160
    n_gaussians: int = 32  # per half (linear, log) of the value expansion
    gaussian_sigma: float = 0.05
    n_mixture: int = 8
    head: str = "mixture"  # or "mse"

    def as_dict(self) -> dict:
        return asdict(self)

    def problems(self) -> list[str]:
        """What makes this configuration unusable (an empty list when it is sound)."""
        found = []
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len", "n_gaussians", "n_mixture"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                found.append(f"{name} must be a whole number >= 1 (got {value!r})")
        if not found and self.d_model % self.n_heads:
            found.append(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            found.append(f"dropout must be in [0, 1) (got {self.dropout!r})")
        if not isinstance(self.gaussian_sigma, (int, float)) or not self.gaussian_sigma > 0:
            found.append(f"gaussian_sigma must be > 0 (got {self.gaussian_sigma!r})")
        if self.head not in ("mixture", "mse"):
            found.append(f"head must be 'mixture' or 'mse' (got {self.head!r})")
        if self.vocab_size != len(VOCAB):
            found.append(f"vocab_size {self.vocab_size} does not match this version's vocabulary ({len(VOCAB)})")
        return found


# ---------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------


def normalise_values(values: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Bring each kind of continuous value to an O(1) range: coordinates as is, lengths / 10 Å, angles / 180°."""
    is_length = (kinds >= LENGTH_KINDS[0]) & (kinds <= LENGTH_KINDS[-1])
    is_angle = kinds >= ANGLE_KINDS[0]
    return torch.where(is_length, values / LENGTH_SCALE, torch.where(is_angle, values / 180.0, values))


class GaussianValueEmbedding(nn.Module):
    """x = Concat(exp(-(r_lin - v)^2 / 2s^2), exp(-(r_log - |log(|v| + 1e-20)|)^2 / 2s^2)), then a linear map."""

    def __init__(self, config: WyckoffTransformerConfig):
        super().__init__()
        self.register_buffer("r_lin", torch.linspace(0.0, 1.5, config.n_gaussians), persistent=False)
        self.register_buffer("r_log", torch.linspace(0.0, 5.0, config.n_gaussians), persistent=False)
        self.sigma = config.gaussian_sigma
        self.proj = nn.Linear(2 * config.n_gaussians, config.d_model)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        v = v.unsqueeze(-1)
        x_lin = torch.exp(-((self.r_lin - v) ** 2) / (2 * self.sigma**2))
        log_v = torch.abs(torch.log(torch.abs(v) + 1e-20))
        x_log = torch.exp(-((self.r_log - log_v) ** 2) / (2 * (self.sigma * 5.0) ** 2))
        return self.proj(torch.cat([x_lin, x_log], dim=-1))


# ---------------------------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------------------------


class WyckoffTransformer(nn.Module):
    def __init__(self, config: WyckoffTransformerConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.token_emb = nn.Embedding(config.vocab_size, d)
        self.kind_emb = nn.Embedding(N_KINDS, d)
        self.value_emb = GaussianValueEmbedding(config)
        self.register_buffer("pos_table", sinusoidal_positions(config.max_len, d), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(d, config.n_heads, config.dropout)
                                    for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.discrete_head = nn.Linear(d, config.vocab_size)
        # The continuous head is told which kind of value comes next (x, y, z, a, ..., gamma).
        self.next_kind_emb = nn.Embedding(N_KINDS, d)
        out = 3 * config.n_mixture if config.head == "mixture" else 2
        self.continuous_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, out))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, tokens, values, kinds, start: int = 0) -> torch.Tensor:
        x = self.token_emb(tokens)
        is_value = (kinds > 0).unsqueeze(-1)
        value_part = self.kind_emb(kinds) + self.value_emb(normalise_values(values, kinds))
        x = x + torch.where(is_value, value_part, torch.zeros_like(value_part))
        T = tokens.shape[1]
        if start + T > self.config.max_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_len={self.config.max_len}")
        return x + self.pos_table[start:start + T]

    def new_cache(self, batch_size: int, device=None) -> KVCache:
        """Per-layer (keys, values) buffers for `max_len` positions, filled in place while sampling."""
        c = self.config
        return new_kv_cache(batch_size, c.n_layers, c.n_heads, c.max_len, c.d_model // c.n_heads, device)

    def forward(self, tokens, values, kinds, cache=None, start: int = 0):
        """Hidden states (B, T, d). With `cache` (from `new_cache`), tokens are the single position `start`."""
        x = self.drop(self.embed(tokens, values, kinds, start))
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i], start)
        return self.ln_f(x)

    def discrete_logits(self, hidden):
        return self.discrete_head(hidden)

    def continuous_params(self, hidden, next_kinds):
        return self.continuous_head(hidden + self.next_kind_emb(next_kinds))

    # -- losses ----------------------------------------------------------------------------------------------

    def loss(self, tokens, values, kinds, pad_mask):
        """Mean cross-entropy over next discrete tokens + mean NLL (or MSE) over next continuous values."""
        hidden = self(tokens[:, :-1], values[:, :-1], kinds[:, :-1])
        target_tokens, target_values, target_kinds = tokens[:, 1:], values[:, 1:], kinds[:, 1:]
        valid = pad_mask[:, 1:]
        discrete = valid & (target_kinds == 0)
        logits = self.discrete_logits(hidden[discrete])
        ce = F.cross_entropy(logits, target_tokens[discrete])
        continuous = valid & (target_kinds > 0)
        params = self.continuous_params(hidden[continuous], target_kinds[continuous])
        nll = continuous_nll(params, target_values[continuous], target_kinds[continuous], self.config)
        return ce, nll

    def sequence_nll(self, tokens, values, kinds, pad_mask) -> torch.Tensor:
        """Per sequence (B,): -log p of its discrete tokens and continuous values under the model at T = 1, in
        nats, without the constrained-decoding masks: the likelihood of the whole crystal, so a longer one costs
        more (divided by the predicted positions, it is the per-token mean that likelihood ranking uses). Mixture
        head only (the MSE head has no density)."""
        if self.config.head != "mixture":
            raise ValueError("sequence likelihoods need the mixture head; the MSE head predicts points")
        hidden = self(tokens[:, :-1], values[:, :-1], kinds[:, :-1])
        target_tokens, target_values, target_kinds = tokens[:, 1:], values[:, 1:], kinds[:, 1:]
        valid = pad_mask[:, 1:]
        nll = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
        discrete = valid & (target_kinds == 0)
        log_probs = F.log_softmax(self.discrete_logits(hidden[discrete]).float(), dim=-1)
        nll[discrete] = -log_probs.gather(1, target_tokens[discrete][:, None])[:, 0].to(nll.dtype)
        continuous = valid & (target_kinds > 0)
        params = self.continuous_params(hidden[continuous], target_kinds[continuous]).float()
        nll[continuous] = -continuous_log_prob(params, target_values[continuous], target_kinds[continuous],
                                               self.config).to(nll.dtype)
        return nll.sum(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Continuous distributions
# ---------------------------------------------------------------------------------------------------------------


def _target(values, kinds):
    """The variable each kind is modelled in: angle 2*pi*x, log length (Å), scaled angle."""
    is_coord = kinds <= COORD_KINDS[-1]
    is_length = (kinds >= LENGTH_KINDS[0]) & (kinds <= LENGTH_KINDS[-1])
    return torch.where(is_coord, 2 * math.pi * values,
                       torch.where(is_length, torch.log(values.clamp_min(1e-3)), (values - ANGLE_CENTER) / ANGLE_SCALE))


def continuous_nll(params, values, kinds, config) -> torch.Tensor:
    """The continuous head's training loss: mean negative log density (mixture head) or point error (MSE head)."""
    if config.head == "mse":
        # Point regression; coordinates compared on the circle (periodic), others directly.
        y = _target(values, kinds)
        is_coord = kinds <= COORD_KINDS[-1]
        pred = params[:, 0]
        coord_err = 1 - torch.cos(y - 2 * math.pi * torch.sigmoid(pred))
        return torch.where(is_coord, coord_err, (y - pred) ** 2).mean()
    return -continuous_log_prob(params, values, kinds, config).mean()


def continuous_log_prob(params, values, kinds, config) -> torch.Tensor:
    """Per value: log density of the mixture head (coordinates von Mises, the rest Gaussian), in the variable
    `_target` models each kind in."""
    return mixture_log_prob(params, _target(values, kinds), kinds <= COORD_KINDS[-1])


def sample_continuous(params, kinds, config, temperature: float, generator=None) -> torch.Tensor:
    """Draw values (fractional coordinates in [0, 1), lengths in Å, angles in degrees) at a temperature."""
    is_coord = kinds <= COORD_KINDS[-1]
    is_length = (kinds >= LENGTH_KINDS[0]) & (kinds <= LENGTH_KINDS[-1])
    if config.head == "mse":
        pred = params[:, 0]
        y = torch.where(is_coord, 2 * math.pi * torch.sigmoid(pred), pred)
    else:
        y = sample_mixture(params, is_coord, temperature, generator)
    return torch.where(is_coord, torch.remainder(y / (2 * math.pi), 1.0),
                       torch.where(is_length, torch.exp(y), y * ANGLE_SCALE + ANGLE_CENTER))
