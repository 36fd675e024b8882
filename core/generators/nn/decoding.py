"""Seeded, batched autoregressive sampling with a key/value cache, under a grammar that masks the logits at each step.

The loop knows no chemistry. A grammar state (one per sequence, `GrammarState`) says whether the next position is
a discrete token (`next_kind() == 0`, drawn from the logits outside `mask()`) or a continuous value of some kind
(drawn by the model's own `draw_values`), and takes what was drawn (`push`); a sequence ends when it is `done`, or
fails with a reason. The model (`StepModel`) embeds one position at a time against its cache.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

TEMPERATURE_RANGE = (1e-3, 1e3)  # beyond these, logits / T overflow or every draw is the same token


class ModelOutputError(ValueError):
    """The model produced non-finite numbers (NaN or infinite logits or distribution parameters): its weights are
    broken, and nothing it samples can be trusted."""


class GrammarState(Protocol):
    failure: str | None

    @property
    def done(self) -> bool: ...

    def next_kind(self) -> int: ...

    def mask(self) -> np.ndarray: ...

    def push(self, token: int, value: float = 0.0) -> None: ...

    def fail(self, reason: str) -> None: ...


class StepModel(Protocol):
    def new_cache(self, batch_size: int, device=None): ...

    def __call__(self, tokens, values, kinds, cache=None, start: int = 0) -> torch.Tensor: ...

    def discrete_logits(self, hidden) -> torch.Tensor: ...

    def continuous_params(self, hidden, next_kinds) -> torch.Tensor: ...


# draw_values(states, rows, params, kinds, temperature, generator): one value per row of `rows` (indices into
# `states`), from the head's parameters for those rows.
DrawValues = Callable[[Sequence[GrammarState], list[int], torch.Tensor, torch.Tensor, float, torch.Generator],
                      torch.Tensor]


def check_sampling_settings(temperature: float, top_p: float = 1.0) -> None:
    """ValueError unless temperature is within TEMPERATURE_RANGE and top_p in (0, 1] (a NaN temperature crashed
    torch.multinomial)."""
    low, high = TEMPERATURE_RANGE
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or not low <= temperature <= high:
        raise ValueError(f"temperature must be a finite number from {low:g} to {high:g}, got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def seeded_generator(seed: int | None, device) -> torch.Generator:
    """A torch generator on `device` seeded with `seed`, or with fresh entropy when seed is None."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(np.random.SeedSequence().entropy % (2**63)))
    return generator


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """ModelOutputError unless every entry of `tensor` is finite."""
    if not bool(torch.isfinite(tensor).all()):
        raise ModelOutputError(f"the model computed non-finite {what}: its weights are broken "
                               "(retrain, or restore the shipped ones)")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of each row outside the smallest set of tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return filtered / filtered.sum(dim=-1, keepdim=True)


@torch.no_grad()
def sample_states(model, new_state: Callable[[], GrammarState], n: int, temperature: float, top_p: float,
                  seed: int | None, batch_size: int, max_len: int, bos: int, pad: int, num: int | None = None,
                  draw_values: DrawValues | None = None,
                  progress: Callable[[int, int], None] | None = None) -> list[GrammarState]:
    """Sample `n` sequences, `batch_size` at a time, from one seeded generator; each returned state is done or
    carries a failure reason ('dead_end': no token allowed, 'max_len': not done within `max_len` positions).

    Raises ValueError for a temperature or top_p out of range, ModelOutputError when the model computes NaN or
    infinite numbers (broken weights) instead of sampling garbage from them.
    """
    check_sampling_settings(temperature, top_p)
    model.eval()
    device = next(model.parameters()).device
    generator = seeded_generator(seed, device)
    states: list[GrammarState] = []
    for start in range(0, n, batch_size):
        batch = [new_state() for _ in range(min(batch_size, n - start))]
        decode_batch(model, batch, temperature, top_p, generator, device, max_len, bos, pad, num, draw_values)
        states += batch
        if progress:
            progress(len(states), n)
    return states


def decode_batch(model, states: Sequence[GrammarState], temperature: float, top_p: float,
                 generator: torch.Generator, device, max_len: int, bos: int, pad: int, num: int | None = None,
                 draw_values: DrawValues | None = None) -> None:
    """Advance every state from <bos> until it is done or fails, one position per step for the whole batch.
    Continuous positions push the token `num` with the value `draw_values` drew."""
    B = len(states)
    tokens = torch.full((B, 1), bos, dtype=torch.long, device=device)
    values = torch.zeros((B, 1), device=device)
    kinds = torch.zeros((B, 1), dtype=torch.long, device=device)
    cache = model.new_cache(B, device)
    for step in range(max_len - 1):
        active = [i for i, s in enumerate(states) if not s.done]
        if not active:
            return
        hidden = model(tokens, values, kinds, cache=cache, start=step)
        hidden = hidden[:, -1]
        check_finite(hidden[active], "hidden states")
        next_tokens = torch.full((B,), pad, dtype=torch.long)
        next_values = torch.zeros(B)
        next_kinds = torch.zeros(B, dtype=torch.long)

        # Split before pushing: a pushed token changes what the state expects next.
        discrete = [i for i in active if states[i].next_kind() == 0]
        continuous = [i for i in active if states[i].next_kind() > 0]
        if discrete:
            masks = torch.from_numpy(np.stack([states[i].mask() for i in discrete])).to(device)
            dead = ~masks.any(dim=1)
            logits = model.discrete_logits(hidden[discrete]).float()
            check_finite(logits, "logits")
            logits = logits / temperature
            logits = logits.masked_fill(~masks, float("-inf"))
            logits[dead] = 0.0  # placeholder row; the state is failed below
            probs = top_p_filter(torch.softmax(logits, dim=-1), top_p)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1).cpu()
            for row, i in enumerate(discrete):
                if dead[row]:
                    states[i].fail("dead_end")
                    continue
                states[i].push(int(chosen[row]))
                next_tokens[i] = chosen[row]

        if continuous:
            if draw_values is None:
                raise ValueError("the grammar asks for a continuous value, but the model draws none")
            wanted = torch.tensor([states[i].next_kind() for i in continuous], device=device)
            params = model.continuous_params(hidden[continuous], wanted).float()
            check_finite(params, "distribution parameters")
            drawn = draw_values(states, continuous, params, wanted, temperature, generator)
            for row, i in enumerate(continuous):
                kind = int(wanted[row])
                states[i].push(num, float(drawn[row]))
                next_tokens[i], next_values[i], next_kinds[i] = num, drawn[row], kind

        tokens = next_tokens[:, None].to(device)
        values = torch.nan_to_num(next_values, nan=0.0, posinf=0.0, neginf=0.0)[:, None].to(device)
        kinds = next_kinds[:, None].to(device)
    for state in states:
        if not state.done:
            state.fail("max_len")
