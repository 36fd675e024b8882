"""Mixture distributions for continuous outputs: von Mises components for periodic variables, Gaussian ones otherwise.

A head predicts, per value, 3K numbers: K mixture logits, K locations and K raw scales (a softplus makes them
positive: the concentration of a von Mises component, the standard deviation of a Gaussian one). Periodic
variables are angles in radians (a fractional coordinate x is 2 pi x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_SCALE = 1e-3  # added to every softplus scale, so that no component collapses to a point


def split_mixture(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, locations, raw scales), each (N, K), of (N, 3K) head outputs."""
    k = params.shape[-1] // 3
    return params[:, :k], params[:, k:2 * k], params[:, 2 * k:3 * k]


def mixture_log_prob(params: torch.Tensor, y: torch.Tensor, periodic: torch.Tensor) -> torch.Tensor:
    """Per value (N,): log density of y under its mixture, von Mises where `periodic` (N, bool), else Gaussian."""
    logit_w, mu, scale = split_mixture(params)
    log_w = F.log_softmax(logit_w, dim=-1)
    yk = y.unsqueeze(-1)
    # von Mises: log p = kappa cos(y - mu) - log(2 pi I0(kappa)), I0 via the scaled i0e for stability.
    kappa = F.softplus(scale) + MIN_SCALE
    log_vm = kappa * torch.cos(yk - mu) - (torch.log(torch.special.i0e(kappa)) + kappa) - math.log(2 * math.pi)
    sigma = F.softplus(scale) + MIN_SCALE
    log_gauss = -0.5 * ((yk - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    log_p = torch.where(periodic.unsqueeze(-1), log_vm, log_gauss)
    return torch.logsumexp(log_w + log_p, dim=-1)


def sample_mixture(params: torch.Tensor, periodic: torch.Tensor, temperature: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one y per row at a temperature: the component from logits / T, then a Gaussian of variance scaled by
    T or a von Mises of concentration divided by T. Periodic draws are not wrapped (mu + an angle in [-pi, pi])."""
    logit_w, mu, scale = split_mixture(params)
    probs = F.softmax(logit_w / temperature, dim=-1)
    k = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    mu_k = mu.gather(1, k[:, None]).squeeze(1)
    s_k = F.softplus(scale.gather(1, k[:, None]).squeeze(1)) + MIN_SCALE
    normal = torch.randn(mu_k.shape, generator=generator, device=mu_k.device)
    gauss = mu_k + s_k * math.sqrt(temperature) * normal
    vm = sample_von_mises(mu_k, s_k / temperature, generator)
    return torch.where(periodic, vm, gauss)


def sample_von_mises(mu: torch.Tensor, kappa: torch.Tensor, generator: torch.Generator | None = None,
                     max_rounds: int = 64) -> torch.Tensor:
    """Best–Fisher rejection sampling, vectorised and seeded (torch.distributions.VonMises takes no generator);
    rows still unaccepted after `max_rounds` get a uniform angle."""
    tau = 1 + torch.sqrt(1 + 4 * kappa**2)
    rho = (tau - torch.sqrt(2 * tau)) / (2 * kappa)
    r = (1 + rho**2) / (2 * rho)
    out = torch.zeros_like(mu)
    todo = torch.ones_like(mu, dtype=torch.bool)
    for _ in range(max_rounds):
        u1, u2, u3 = (torch.rand(mu.shape, generator=generator, device=mu.device) for _ in range(3))
        z = torch.cos(math.pi * u1)
        f = (1 + r * z) / (r + z)
        c = kappa * (r - f)
        accept = todo & ((c * (2 - c) - u2 > 0) | (torch.log(c / u2) + 1 - c >= 0))
        theta = torch.sign(u3 - 0.5) * torch.acos(f.clamp(-1, 1))
        out = torch.where(accept, theta, out)
        todo = todo & ~accept
        if not todo.any():
            break
    out = torch.where(todo, torch.rand(mu.shape, generator=generator, device=mu.device) * 2 * math.pi, out)
    return mu + out
