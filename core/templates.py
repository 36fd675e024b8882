"""Wyckoff templates: can a space group's positions hold a composition, given some user-pinned orbits — and why not."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

from pymatgen.core import Composition, Element

from wyckoff_lab.core.symmetry import SpaceGroupInfo, WyckoffPosition, spacegroup


@dataclass
class TemplateCheck:
    """Outcome of a template check: feasible or not, the reasons, and one completion when feasible."""

    feasible: bool
    reasons: list[str] = field(default_factory=list)
    formula_units: int | None = None  # multiple of the given composition that fits
    assignment: dict[str, list[str]] | None = None  # element -> Wyckoff labels, template included

    def __bool__(self) -> bool:
        return self.feasible

    def as_dict(self) -> dict:
        return {"feasible": self.feasible, "reasons": self.reasons, "formula_units": self.formula_units,
                "assignment": self.assignment}


def check_template(composition, spacegroup_number: int, template=(), max_atoms: int | None = None) -> TemplateCheck:
    """Say whether Wyckoff multiplicities of a space group can add up to a composition.

    composition: formula string, dict or Composition. With `max_atoms=None` it is the exact cell content;
        otherwise every multiple z * composition with at most `max_atoms` atoms (conventional cell) is tried.
    template: (element, Wyckoff label) pairs the user pinned, e.g. [("Ca", "4a")].
    Positions without free parameters hold one orbit at most; positions with free parameters may repeat.
    """
    reasons: list[str] = []
    try:
        group = spacegroup(spacegroup_number)
    except ValueError as exc:
        return TemplateCheck(False, [str(exc)])
    comp = _parse_composition(composition, reasons)
    pinned = _parse_template(template, group, comp, reasons)
    if reasons:
        return TemplateCheck(False, reasons)

    fixed_used = Counter(wp.letter for _, wp in pinned if wp.dof == 0)
    reasons += _reused_fixed_positions(pinned)
    if reasons:
        return TemplateCheck(False, reasons)

    pinned_counts = Counter()
    for element, wp in pinned:
        pinned_counts[element] += wp.multiplicity
    natoms = int(comp.num_atoms)
    z_values = [1] if max_atoms is None else range(1, max_atoms // natoms + 1)
    if not z_values:
        return TemplateCheck(False, [f"{comp.formula} has {natoms} atoms, more than max_atoms={max_atoms}"])

    fixed_free = [wp for wp in group.wyckoff_positions if wp.dof == 0 and wp.letter not in fixed_used]
    repeatable = _repeatable_positions(group)
    failures = []
    for z in z_values:
        remaining = {el.symbol: int(round(z * amt)) - pinned_counts[el.symbol] for el, amt in comp.items()}
        too_many = [f"{el} ({pinned_counts[el]} pinned > {z * int(comp[el])} wanted)" for el, r in remaining.items()
                    if r < 0]
        if too_many:
            failures.append(f"z={z}: the template places too many atoms of " + ", ".join(too_many))
            continue
        solution = _assign(tuple(sorted(remaining.items())), tuple(fixed_free), tuple(repeatable))
        if solution is not None:
            assignment = {el: [] for el in remaining}
            for element, wp in pinned:
                assignment[element].append(wp.label)
            for element, labels in solution:
                assignment[element] += list(labels)
            return TemplateCheck(True, [], z, assignment)
        failures.append(f"z={z}: " + _explain(remaining, fixed_free, repeatable, group))
    return TemplateCheck(False, failures)


def parse_template(text: str | None, spacegroup_number: int | None = None) -> tuple[tuple[str, str], ...]:
    """'Ca:2a,Cu:4d' -> (('Ca', '2a'), ('Cu', '4d')); with a space group every label is checked against it
    (`wyckoff_position`). ValueError, with what is wrong, for anything else."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        element, sep, label = item.strip().partition(":")
        if not sep or not element.strip() or not label.strip():
            raise ValueError(f"template entries look like Element:label (e.g. Ca:2a), got {item!r}")
        pairs.append((element.strip(), label.strip()))
    if spacegroup_number is not None:
        group = spacegroup(spacegroup_number)
        for _, label in pairs:
            wyckoff_position(group, label)
    return tuple(pairs)


def wyckoff_position(group: SpaceGroupInfo | int, label: str) -> WyckoffPosition:
    """The Wyckoff position `label` ('4a' or 'a') of a space group, or a ValueError naming the letters and
    positions it has (a ValueError, not the KeyError of `SpaceGroupInfo.wyckoff`, so callers report it as a bad
    input)."""
    group = spacegroup(group) if isinstance(group, int) else group
    try:
        return group.wyckoff(str(label))
    except KeyError:
        positions = list(reversed(group.wyckoff_positions))
        same_letter = group.by_letter.get(str(label).lstrip("0123456789"))
        hint = f" (its {same_letter.letter} is {same_letter.label})" if same_letter else ""
        raise ValueError(f"space group {group.number} ({group.symbol}) has no Wyckoff position {label!r}{hint}; "
                         f"its Wyckoff letters are {positions[0].letter} to {positions[-1].letter}: "
                         + ", ".join(wp.label for wp in positions)) from None


def template_problems(spacegroup_number: int, template) -> list[str]:
    """Why pinned (element, label) orbits cannot be in one crystal of the space group, whatever the composition:
    labels the group lacks, and a position without free parameters pinned twice (it holds one orbit). [] if none."""
    group = spacegroup(spacegroup_number)
    reasons, pinned = [], []
    for element, label in template:
        try:
            pinned.append((element, wyckoff_position(group, label)))
        except ValueError as exc:
            reasons.append(str(exc))
    return reasons + _reused_fixed_positions(pinned)


def _reused_fixed_positions(pinned) -> list[str]:
    used = Counter(wp.label for _, wp in pinned if wp.dof == 0)
    return [f"{label} has no free parameters, so it holds one orbit, but the template uses it {count} times"
            for label, count in used.items() if count > 1]


def _parse_composition(composition, reasons: list[str]) -> Composition:
    if isinstance(composition, Composition):
        comp = composition
    else:
        try:
            comp = Composition(composition)
        except (ValueError, KeyError) as exc:
            reasons.append(f"cannot read composition {composition!r}: {exc}")
            return Composition()
    for el, amount in comp.items():
        if not isinstance(el, Element):
            reasons.append(f"unknown element {getattr(el, 'symbol', str(el))!r}")
        elif abs(amount - round(amount)) > 1e-8 or amount <= 0:
            reasons.append(f"{el} amount {amount} is not a positive integer")
    if not comp and not reasons:
        reasons.append("the composition is empty")
    return comp


def _parse_template(template, group: SpaceGroupInfo, comp: Composition, reasons: list[str]):
    pinned = []
    elements = {el.symbol for el in comp}
    for element, label in template:
        if not Element.is_valid_symbol(element):
            reasons.append(f"unknown element {element!r} in the template")
            continue
        try:
            wp = wyckoff_position(group, label)
        except ValueError as exc:
            reasons.append(str(exc))
            continue
        if comp and element not in elements:
            reasons.append(f"the template puts {element} on {wp.label} but {element} is not in {comp.formula}")
            continue
        pinned.append((element, wp))
    return pinned


@functools.lru_cache(maxsize=4096)
def _assign(remaining: tuple[tuple[str, int], ...], fixed: tuple[WyckoffPosition, ...],
            repeatable: tuple[WyckoffPosition, ...]):
    """One way to give every element its atom count: a subset of unused 0-DOF positions plus repeatable ones.

    The labelled twin of `counts_feasible`, on the same subset and coin-change searches: depth-first over elements;
    the 0-DOF positions are shared, so those taken by one element are removed for the next. 0-DOF positions of
    equal multiplicity are interchangeable here, so a subset of multiplicities takes the first such positions.
    Returns ((element, labels), ...) or None.
    """
    if not remaining:
        return ()
    (element, count), rest = remaining[0], remaining[1:]
    repeatable_by_multiplicity = {wp.multiplicity: wp for wp in repeatable}
    options = []
    for subset in _multiplicity_subsets(tuple(sorted(wp.multiplicity for wp in fixed)), count):
        coins = _fewest_coins(count - sum(subset), tuple(repeatable_by_multiplicity))
        if coins is not None:
            options.append((subset, coins))
    for subset, coins in sorted(options, key=lambda option: len(option[0]) + len(option[1])):  # fewest orbits first
        taken, unused = [], list(fixed)
        for m in subset:
            wp = next(wp for wp in unused if wp.multiplicity == m)
            taken.append(wp)
            unused.remove(wp)
        tail = _assign(rest, tuple(unused), repeatable)
        if tail is not None:
            labels = tuple(wp.label for wp in taken) + tuple(repeatable_by_multiplicity[m].label for m in coins)
            return ((element, labels),) + tail
    return None


def _repeatable_positions(group: SpaceGroupInfo) -> tuple[WyckoffPosition, ...]:
    """One position with free parameters per multiplicity (the fewest degrees of freedom): these may repeat."""
    chosen: dict[int, WyckoffPosition] = {}
    for wp in group.wyckoff_positions:
        if wp.dof > 0 and (wp.multiplicity not in chosen or wp.dof < chosen[wp.multiplicity].dof):
            chosen[wp.multiplicity] = wp
    return tuple(sorted(chosen.values(), key=lambda wp: wp.multiplicity))


def _explain(remaining: dict[str, int], fixed, repeatable, group: SpaceGroupInfo) -> str:
    """Name the element(s) whose count cannot be reached even alone, or say the 0-DOF positions are contended."""
    fixed_labels = ", ".join(wp.label for wp in fixed) or "none left"
    alone = [f"{el}: {n} atoms" for el, n in remaining.items()
             if n > 0 and _assign(((el, n),), tuple(fixed), tuple(repeatable)) is None]
    if alone:
        return (f"in space group {group.number} ({group.symbol}) no sum of multiplicities gives " + "; ".join(alone)
                + f" (0-DOF positions usable once: {fixed_labels}; repeatable multiplicities: "
                + ", ".join(str(wp.multiplicity) for wp in repeatable) + ")")
    return (f"each element fits alone, but together they need the same 0-DOF positions ({fixed_labels}) "
            f"in space group {group.number} ({group.symbol})")


@functools.lru_cache(maxsize=200_000)
def counts_feasible(counts: tuple[int, ...], fixed: tuple[int, ...], repeatable: tuple[int, ...]) -> bool:
    """Can every count be written as a sum of distinct `fixed` multiplicities (shared, each used once) plus any
    number of `repeatable` ones? Counts and fixed multiplicities as sorted tuples, so the cache is shared.

    The count-only core of `check_template`, fast enough for masking logits at every decoding step.
    """
    if not counts:
        return True
    first, rest = counts[0], counts[1:]
    for subset in _multiplicity_subsets(fixed, first):
        left_fixed = list(fixed)
        for m in subset:
            left_fixed.remove(m)
        if (_fewest_coins(first - sum(subset), repeatable) is not None
                and counts_feasible(rest, tuple(left_fixed), repeatable)):
            return True
    return False


@functools.lru_cache(maxsize=50_000)
def _multiplicity_subsets(fixed: tuple[int, ...], budget: int) -> tuple[tuple[int, ...], ...]:
    """Distinct sub-multisets of `fixed` (sorted) with sum <= budget."""
    found = {()}
    for m in fixed:
        found |= {tuple(sorted(s + (m,))) for s in found if sum(s) + m <= budget}
    return tuple(sorted(found, key=len))


@functools.lru_cache(maxsize=50_000)
def _fewest_coins(count: int, multiplicities: tuple[int, ...]) -> tuple[int, ...] | None:
    """`count` as a sum of `multiplicities` (each usable any number of times) with the fewest terms, or None."""
    best: list[tuple[int, ...] | None] = [()] + [None] * count
    for total in range(1, count + 1):
        for m in multiplicities:
            if m <= total and best[total - m] is not None:
                candidate = best[total - m] + (m,)
                if best[total] is None or len(candidate) < len(best[total]):
                    best[total] = candidate
    return best[count]
