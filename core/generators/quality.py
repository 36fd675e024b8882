"""What every generator checks of a decoded structure, and the loop that samples again what fails those checks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from wyckoff_lab.core.defaults import BOND_MIN_DISTANCE_A, SYMPREC

# How many times a shortfall is sampled again (the first draw included) before the last round keeps what it gets.
RESAMPLE_ROUNDS = 5
# A sampled cell below this volume per atom (or with angles no cell can have, volume NaN) is a decoding failure:
# real crystals start near 5 Å^3/atom (diamond 5.7), and such cells break pymatgen's lattice reduction downstream.
MIN_VOLUME_PER_ATOM_A3 = 1.0
# The shortest contact relative to the covalent radii (metrics.min_contact_ratio). PyXtal's baseline never goes
# below 0.4; in `bench sun` (n = 200, before this check) the transformer's samples below it converged in 43 % of
# their relaxations and 6 % ended within 0.1 eV/atom of the hull (those above: 92 % and 21 %).
MIN_CONTACT_RATIO = 0.4


def cell_is_sound(structure) -> bool:
    """False for a cell whose lattice parameters or volume are not finite or whose volume per atom is below
    MIN_VOLUME_PER_ATOM_A3 (sampled angles can violate the inequalities a real cell's angles obey)."""
    lattice = structure.lattice
    with np.errstate(invalid="ignore"):
        volume = lattice.volume
    return (bool(np.all(np.isfinite(lattice.parameters))) and np.isfinite(volume)
            and volume >= MIN_VOLUME_PER_ATOM_A3 * len(structure))


@dataclass(frozen=True)
class QualityGate:
    """The checks a structure that decoded must still pass: no two sites closer than `min_distance_A` (Matra-Genoa's
    bond consistency) or than `min_contact_ratio` of their covalent radii's sum, and spglib finding at `symprec`
    the space group that was sampled.

    Why the latter two fail for a valid sequence: coordinates drawn one orbit at a time can put a later orbit's
    images on an earlier one, and the sampled positions together can be invariant under a supergroup (R-3 with every
    atom on the 3-fold axes is R-3m), or a free parameter can land within `symprec` of a special value.
    """

    symprec: float = SYMPREC
    min_distance_A: float = BOND_MIN_DISTANCE_A
    min_contact_ratio: float = MIN_CONTACT_RATIO

    def check(self, structure, sampled_spacegroup: int) -> tuple[str | None, dict, int | None]:
        """(why the structure fails or None, what a structure kept anyway should carry in `extra`, the space group
        spglib found at `symprec` or None where a distance check failed first)."""
        from wyckoff_lab.core.metrics import closest_contacts
        from wyckoff_lab.core.symmetry import detected_spacegroup

        closest, contact = closest_contacts(structure)
        if closest < self.min_distance_A:
            return "sites_too_close", {"min_distance_A": round(closest, 3)}, None
        if contact < self.min_contact_ratio:
            return "sites_too_close", {"min_contact_ratio": round(contact, 3)}, None
        found = detected_spacegroup(structure, self.symprec)
        if found != sampled_spacegroup:
            return "spacegroup_mismatch", {"detected_spacegroup": found}, found
        return None, {}, found


@dataclass
class Sampled:
    """What `sample_until` kept, and how the draws that did not become samples were spent."""

    kept: list
    attempts: int
    failures: dict[str, int]
    rejected: dict[str, int]


# draw(wanted, round, have): `wanted` outcomes, each a sample or a failure reason (str); `have` is how many were
# kept before this round (for progress reports).
Draw = Callable[[int, int, int], Iterable[Any]]
# gate(sample): (why it is rejected or None, the sample as it is to be kept).
Gate = Callable[[Any], tuple[str | None, Any]]


def sample_until(n: int, draw: Draw, gate: Gate | None = None, rounds: int | None = RESAMPLE_ROUNDS,
                 max_attempts: int | None = None) -> Sampled:
    """Draw `n` samples, then draw the shortfall again (failures and what `gate` rejects), `rounds` times at most
    (None: until `max_attempts` draws are spent). The last of `rounds` keeps what the gate rejects: a request only a
    supergroup can satisfy then still gives samples, each saying what the gate found."""
    if rounds is None and max_attempts is None:
        raise ValueError("sample_until needs rounds or max_attempts, or it may never end")
    kept: list = []
    failures, rejected = Counter(), Counter()
    attempts = 0
    round_ = 0
    while rounds is None or round_ < rounds:
        wanted = n - len(kept)
        if max_attempts is not None:
            wanted = min(wanted, max_attempts - attempts)
        if wanted <= 0:
            break
        last = rounds is not None and round_ == rounds - 1
        outcomes = draw(wanted, round_, len(kept))
        attempts += wanted
        for outcome in outcomes:
            if isinstance(outcome, str):
                failures[outcome] += 1
                continue
            if gate is not None:
                problem, outcome = gate(outcome)
                if problem and not last:
                    rejected[problem] += 1
                    continue
            kept.append(outcome)
        round_ += 1
    return Sampled(kept, attempts, dict(failures), dict(rejected))


def round_seed(seed: int | None, round_: int) -> int | None:
    """The seed of a resampling round: the request's own for the first, one derived from it for later rounds (so
    a seeded request stays reproducible), None when the request is unseeded."""
    if round_ == 0 or seed is None:
        return seed
    return int(np.random.SeedSequence([seed, round_]).generate_state(1)[0])


NOT_CHARGE_BALANCED = "not_charge_balanced"  # the rejection reason `generate_charge_balanced` counts
# A later round asks for the shortfall divided by the share found balanced so far, that share taken as at least
# this: the transformer's Na-Cl samples in Fm-3m are 1 in 10 balanced, so plain shortfall rounds ended at 14 of 30.
MIN_BALANCED_SHARE = 0.05


def generate_charge_balanced(generator, n: int, conditions, temperature: float = 1.0, seed: int | None = None,
                             progress: Callable[[int, int], None] | None = None):
    """`generator.generate(n, conditions, ...)` with `conditions.charge_balanced` honoured for any generator.

    A generator that declares `charge_balanced` in `supported_conditions` makes only balanced compositions and is
    called as it is. Any other is asked for the same conditions without it, and the shortfall of what is not
    charge balanced (`compositions.is_charge_balanced`; alloys count as balanced) is sampled again,
    RESAMPLE_ROUNDS times at most, each round with its own seed (`round_seed`) and asking for the shortfall
    over the share found balanced so far (balanced ones beyond `n` count as `ranked_out`); unlike the structure
    gate's last round, an unbalanced sample is never kept, since the user asked for balance outright. Rejections are counted
    in `rejected` under NOT_CHARGE_BALANCED and in `attempts`.
    """
    import dataclasses
    import math

    from wyckoff_lab.core.compositions import is_charge_balanced

    if not conditions.charge_balanced or "charge_balanced" in generator.supported_conditions:
        return generator.generate(n, conditions, temperature, seed, progress)

    plain = dataclasses.replace(conditions, charge_balanced=False)
    merged = None
    made = 0  # structures the generator returned, balanced or not
    for round_ in range(RESAMPLE_ROUNDS):
        have = 0 if merged is None else len(merged.candidates)
        if have >= n and merged is not None:
            break
        share = max(MIN_BALANCED_SHARE, have / made) if made else 1.0
        wanted = math.ceil((n - have) / share)
        report = None if progress is None else (lambda done, total, have=have: progress(min(n, have + done), n))
        result = generator.generate(wanted, plain, temperature, round_seed(seed, round_), report)
        made += len(result.candidates)
        balanced = [c for c in result.candidates if is_charge_balanced(c.structure.composition)][:n - have]
        for candidate in balanced:
            candidate.conditions = conditions
        unbalanced = sum(not is_charge_balanced(c.structure.composition) for c in result.candidates)
        surplus = len(result.candidates) - unbalanced - len(balanced)  # balanced beyond n: made, then left out
        result.candidates = balanced
        result.ranked_out += surplus
        if unbalanced:
            result.rejected = {**result.rejected, NOT_CHARGE_BALANCED: result.rejected.get(NOT_CHARGE_BALANCED, 0)
                               + unbalanced}
        if merged is None:
            merged = result
            continue
        merged.candidates += result.candidates
        merged.attempts += result.attempts
        merged.ranked_out += result.ranked_out
        merged.seconds += result.seconds
        for mine, theirs in ((merged.failures, result.failures), (merged.rejected, result.rejected)):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
    return merged
