"""Charge-balanced integer compositions of a chemical system: the formulas a generator may try for it."""

from __future__ import annotations

import functools
import math

from pymatgen.core import Element


def oxidation_states(element: str) -> tuple[int, ...]:
    """pymatgen's common oxidation states plus those observed in the ICSD (e.g. Cu(I), which is not 'common')."""
    el = Element(element)
    return tuple(sorted(set(el.common_oxidation_states) | set(el.icsd_oxidation_states)))


@functools.cache
def _smact_metals() -> frozenset[str]:
    import smact

    return frozenset(smact.metals)


def needs_charge_balance(elements: tuple[str, ...]) -> bool:
    """False for elements and all-metal systems: SMACT validity accepts those without oxidation states (alloys)."""
    return len(elements) > 1 and not set(elements) <= _smact_metals()


@functools.lru_cache(maxsize=4096)
def candidate_compositions(elements: tuple[str, ...], max_atoms: int) -> tuple[tuple[int, ...], ...]:
    """Reduced integer ratios (one count per element, in `elements` order) with at most `max_atoms` atoms.

    Where charge balance applies, only ratios for which one oxidation state per element (SMACT's rule, as in
    `smact.neutral_ratios`) sums to zero; enumerated by total atom count rather than by a per-element cap, so
    that large chemical systems stay cheap. Alloys and elements get every ratio.
    """
    states = [oxidation_states(el) for el in elements] if needs_charge_balance(elements) else None
    if states is not None and not all(states):
        return ()  # an element without oxidation states (a noble gas) cannot be charge balanced
    found: list[tuple[int, ...]] = []
    k = len(elements)

    def extend(i: int, prefix: tuple[int, ...], left: int, charges: frozenset[int] | None) -> None:
        if i == k:
            if (charges is None or 0 in charges) and math.gcd(*prefix) == 1:
                found.append(prefix)
            return
        rest = k - i - 1  # elements still to place, at least one atom each
        for count in range(1, left - rest + 1):
            if charges is None:
                extend(i + 1, prefix + (count,), left - count, None)
                continue
            reachable = _prune(frozenset(c + count * s for c in charges for s in states[i]), states[i + 1:],
                               left - count)
            if reachable:
                extend(i + 1, prefix + (count,), left - count, reachable)

    extend(0, (), max_atoms, None if states is None else frozenset({0}))
    return tuple(found)


def _prune(charges: frozenset[int], remaining_states: list[tuple[int, ...]], atoms_left: int) -> frozenset[int]:
    """Drop partial charges that the remaining elements (one atom each at least, spare atoms anywhere) cannot
    bring back to zero: the enumeration's pruning."""
    if not remaining_states:
        return charges
    spare = atoms_left - len(remaining_states)
    lowest = sum(min(s) for s in remaining_states) + spare * min(0, *(min(s) for s in remaining_states))
    highest = sum(max(s) for s in remaining_states) + spare * max(0, *(max(s) for s in remaining_states))
    return frozenset(c for c in charges if lowest <= -c <= highest)


@functools.lru_cache(maxsize=4096)
def compositions_by_size(elements: tuple[str, ...], max_atoms: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """`candidate_compositions` grouped by atoms per formula unit (smallest first, empty sizes left out).

    Attempts draw the size first: there are far more ways to write a 19-atom formula than a 2-atom one, and a
    uniform draw over formulas would give almost only large, unusual ones (e.g. Ca11Al5Cu4 for Al-Ca-Cu).
    """
    sizes: dict[int, list[tuple[int, ...]]] = {}
    for ratio in candidate_compositions(elements, max_atoms):
        sizes.setdefault(sum(ratio), []).append(ratio)
    return tuple(tuple(sizes[size]) for size in sorted(sizes))


def is_charge_balanced(composition) -> bool:
    """True when one oxidation state per element (`oxidation_states`, SMACT's rule) makes the composition neutral;
    elements and all-metal compositions (alloys) count as balanced, as in `candidate_compositions`."""
    from pymatgen.core import Composition

    comp = Composition(composition)
    counts = dict(comp.get_el_amt_dict())
    elements = tuple(sorted(counts, key=lambda e: Element(e).Z))
    if not needs_charge_balance(elements):
        return True
    if any(abs(counts[el] - round(counts[el])) > 1e-6 for el in elements):
        return False  # a fractional (disordered) composition has no integer oxidation-state sum to check
    return _balances(tuple((oxidation_states(el), int(round(counts[el]))) for el in elements))


@functools.lru_cache(maxsize=4096)
def _balances(states_and_counts: tuple[tuple[tuple[int, ...], int], ...]) -> bool:
    charges = {0}
    for states, count in states_and_counts:
        if not states:
            return False
        charges = {c + count * s for c in charges for s in states}
    return 0 in charges
