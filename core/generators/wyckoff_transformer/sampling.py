"""Sampling Wyckoff sequences from the transformer: the shared decoding loop under the Wyckoff grammar, coordinates
drawn clear of the atoms already placed, and sequence likelihoods."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from wyckoff_lab.core.generators.nn.decoding import sample_states
from wyckoff_lab.core.generators.wyckoff_grammar.masks import DecodingPlan, DecodingState
from wyckoff_lab.core.generators.wyckoff_grammar.tokenizer import VOCAB
from wyckoff_lab.core.generators.wyckoff_transformer.model import WyckoffTransformer, sample_continuous


def sample_sequences(model: WyckoffTransformer, plan: DecodingPlan, n: int, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int | None = None, batch_size: int = 256,
                     progress: Callable[[int, int], None] | None = None) -> list[DecodingState]:
    """Sample `n` sequences; each returned state is complete (`phase == 'done'`) or carries a failure reason
    (see `nn.decoding.sample_states` for what it raises)."""

    def draw(states, rows, params, kinds, temperature, generator):
        return _draw_separated(states, rows, params, kinds, model.config, temperature, generator)

    return sample_states(model, lambda: DecodingState(plan), n, temperature, top_p, seed, batch_size,
                         model.config.max_len, VOCAB.bos, VOCAB.pad, VOCAB.num, draw, progress)


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
