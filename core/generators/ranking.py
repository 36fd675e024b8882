"""Likelihood ranking: draw k times the structures asked for and keep the n the generator's own model finds likeliest."""

from __future__ import annotations

import abc
import copy
from typing import Hashable, Sequence

import numpy as np

from wyckoff_lab.core.generators.base import Generator


def wyckoff_template_key(crystal) -> tuple:
    """Space group and element-labelled orbits: crystals sharing it differ only in free parameters and lattice."""
    return crystal.spacegroup, tuple(sorted((orbit.element, orbit.label) for orbit in crystal.orbits))


def most_likely_distinct(order, keys: Sequence[Hashable], n: int) -> list[int]:
    """The first n indices of `order` (most likely first), taking one sample per key (e.g. `wyckoff_template_key`)
    before any second one: within a chemical system the model's favourite template can otherwise fill the whole
    sample (23 of 25 Gd-Ge-Pt samples were GdGePt in Pnma)."""
    seen, first, repeats = set(), [], []
    for i in order:
        key = keys[i]
        (repeats if key in seen else first).append(int(i))
        seen.add(key)
    return (first + repeats)[:n]


class LikelihoodRanked(Generator, abc.ABC):
    """A generator whose model gives each of its samples a likelihood, so that `ranked(k)` can draw k * n and keep
    the n likeliest. A subclass implements `log_likelihood` (and `has_likelihood` where some of its models define
    none); `_keep_most_likely` does the ranking and the counting of what it left out."""

    ranks_by_likelihood = True
    oversample: int = 1

    @property
    def has_likelihood(self) -> bool:
        return True

    @abc.abstractmethod
    def log_likelihood(self, samples: list) -> tuple[np.ndarray, np.ndarray]:
        """Per sample (the generator's own records of what it drew): log p in nats, and the number of predictions
        it is the sum of (tokens, atoms ...). Samples are ranked by the mean, log p per prediction."""

    def ranked(self, oversample: int) -> LikelihoodRanked:
        oversample = self._checked_oversample(oversample)
        if oversample == self.oversample:
            return self
        other = copy.copy(self)  # shares the loaded model
        other.oversample = oversample
        return other

    def _checked_oversample(self, oversample) -> int:
        if int(oversample) != oversample or oversample < 1:
            raise ValueError(f"oversample must be a whole number >= 1, got {oversample}")
        if oversample > 1 and not self.has_likelihood:
            raise ValueError(f"oversample ranks samples by likelihood, which this {self.name} model does not define")
        return int(oversample)

    def _keep_most_likely(self, samples: list, n: int, keys: Sequence[Hashable] | None = None
                          ) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(indices of the samples to keep, in sampling order; each sample's -log p; its -log p per prediction).

        All are kept when there are at most n; otherwise the n with the lowest -log p per prediction, one per key
        first (`most_likely_distinct`). A NaN ranks last rather than poisoning the order."""
        total, predictions = self.log_likelihood(samples)
        nll = -np.asarray(total, dtype=float)
        per_prediction = nll / np.asarray(predictions)
        if len(samples) <= n:
            return list(range(len(samples))), nll, per_prediction
        order = np.argsort(np.nan_to_num(per_prediction, nan=np.inf), kind="stable")
        if keys is None:
            chosen = [int(i) for i in order[:n]]
        else:
            chosen = most_likely_distinct(order, keys, n)
        return sorted(chosen), nll, per_prediction
