"""Batched, seeded sampling from the Wyckoff transformer with a key/value cache and constrained decoding."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from wyckoff_lab.core.generators.wyckoff_transformer.decoding import DecodingPlan, DecodingState
from wyckoff_lab.core.generators.wyckoff_transformer.model import (
    ModelOutputError,
    WyckoffTransformer,
    sample_continuous,
)
from wyckoff_lab.core.generators.wyckoff_transformer.tokenizer import VOCAB


TEMPERATURE_RANGE = (1e-3, 1e3)  # beyond these, logits / T overflow or every draw is the same token


def check_sampling_settings(temperature: float, top_p: float = 1.0) -> None:
    """ValueError unless temperature is within TEMPERATURE_RANGE and top_p in (0, 1] (a NaN temperature crashed
    torch.multinomial)."""
    low, high = TEMPERATURE_RANGE
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or not low <= temperature <= high:
        raise ValueError(f"temperature must be a finite number from {low:g} to {high:g}, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ModelOutputError(f"the Wyckoff transformer computed non-finite {what}: its weights are broken "
                               "(retrain, or restore the shipped ones)")


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of each row outside the smallest set of tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return filtered / filtered.sum(dim=-1, keepdim=True)


@torch.no_grad()
def sample_sequences(model: WyckoffTransformer, plan: DecodingPlan, n: int, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int | None = None, batch_size: int = 256,
                     progress: Callable[[int, int], None] | None = None) -> list[DecodingState]:
    """Sample `n` sequences; each returned state is complete (`phase == 'done'`) or carries a failure reason.

    Raises ValueError for a temperature or top_p out of range, ModelOutputError when the model computes NaN or
    infinite numbers (broken weights) instead of sampling garbage from them.
    """
    check_sampling_settings(temperature, top_p)
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(np.random.SeedSequence().entropy % (2**63)))
    states: list[DecodingState] = []
    for start in range(0, n, batch_size):
        batch = [DecodingState(plan) for _ in range(min(batch_size, n - start))]
        _sample_batch(model, batch, temperature, top_p, generator, device)
        states += batch
        if progress:
            progress(len(states), n)
    return states


def _sample_batch(model, states, temperature, top_p, generator, device) -> None:
    B = len(states)
    tokens = torch.full((B, 1), VOCAB.bos, dtype=torch.long, device=device)
    values = torch.zeros((B, 1), device=device)
    kinds = torch.zeros((B, 1), dtype=torch.long, device=device)
    cache = model.new_cache(B, device)
    for step in range(model.config.max_len - 1):
        active = [i for i, s in enumerate(states) if not s.done]
        if not active:
            return
        hidden = model(tokens, values, kinds, cache=cache, start=step)
        hidden = hidden[:, -1]
        _check_finite(hidden[active], "hidden states")
        next_tokens = torch.full((B,), VOCAB.pad, dtype=torch.long)
        next_values = torch.zeros(B)
        next_kinds = torch.zeros(B, dtype=torch.long)

        # Split before pushing: a pushed token changes what the state expects next.
        discrete = [i for i in active if states[i].next_kind() == 0]
        continuous = [i for i in active if states[i].next_kind() > 0]
        if discrete:
            masks = torch.from_numpy(np.stack([states[i].mask() for i in discrete])).to(device)
            dead = ~masks.any(dim=1)
            logits = model.discrete_logits(hidden[discrete]).float()
            _check_finite(logits, "logits")
            logits = logits / temperature
            logits = logits.masked_fill(~masks, float("-inf"))
            logits[dead] = 0.0  # placeholder row; the state is failed below
            probs = _top_p_filter(torch.softmax(logits, dim=-1), top_p)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1).cpu()
            for row, i in enumerate(discrete):
                if dead[row]:
                    states[i].fail("dead_end")
                    continue
                states[i].push(int(chosen[row]))
                next_tokens[i] = chosen[row]

        if continuous:
            wanted = torch.tensor([states[i].next_kind() for i in continuous], device=device)
            params = model.continuous_params(hidden[continuous], wanted).float()
            _check_finite(params, "distribution parameters")
            drawn = _draw_separated(states, continuous, params, wanted, model.config, temperature, generator)
            for row, i in enumerate(continuous):
                kind = int(wanted[row])
                states[i].push(VOCAB.num, float(drawn[row]))
                next_tokens[i], next_values[i], next_kinds[i] = VOCAB.num, drawn[row], kind

        tokens = next_tokens[:, None].to(device)
        values = torch.nan_to_num(next_values, nan=0.0, posinf=0.0, neginf=0.0)[:, None].to(device)
        kinds = next_kinds[:, None].to(device)
    for state in states:
        if not state.done:
            state.fail("max_len")


def _draw_separated(states, rows, params, kinds, config, temperature, generator, tries: int = 8) -> torch.Tensor:
    """Draw one value per row; where a value completes an orbit, draw `tries` candidates from the same
    distribution and keep the first whose sites stay clear of the atoms already placed (else the best one)."""
    drawn = sample_continuous(params, kinds, config, temperature, generator).cpu()
    closing = [r for r, i in enumerate(rows) if states[i].closes_orbit()]
    if not closing:
        return drawn
    index = torch.tensor(closing)
    extra = sample_continuous(params[index].repeat(tries - 1, 1), kinds[index].repeat(tries - 1), config,
                              temperature, generator).cpu().view(tries - 1, len(closing))
    for k, r in enumerate(closing):
        state = states[rows[r]]
        threshold = state.separation_threshold()
        options = [float(drawn[r])] + [float(v) for v in extra[:, k]]
        separations = [state.min_separation(v) for v in options]
        accepted = next((v for v, d in zip(options, separations) if d >= threshold), None)
        drawn[r] = accepted if accepted is not None else options[int(np.argmax(separations))]
    return drawn


@torch.no_grad()
def sequence_nlls(model: WyckoffTransformer, sequences, batch_size: int = 256) -> np.ndarray:
    """-log p (nats, T = 1, no decoding masks) of each complete sequence under the model: see
    `WyckoffTransformer.sequence_nll`. Sequences of similar length share a batch, so padding stays small."""
    from wyckoff_lab.core.generators.wyckoff_transformer.train import collate

    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([len(s) for s in sequences], kind="stable")
    nll = np.empty(len(sequences))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        nll[rows] = model.sequence_nll(*collate([sequences[i] for i in rows], device)).cpu().numpy()
    return nll
