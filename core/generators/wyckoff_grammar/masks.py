"""Constrained decoding: at every step, mask the logits to the tokens that can still complete a valid crystal.

`DecodingState` walks the grammar of a token sequence (stability, elements, counts, space group, orbits, lattice)
for one sample. It forces what the user fixed (prefix conditioning: chemical system, formula, space group, template,
stability) and otherwise allows only tokens that keep the multiplicities able to add up to the counts, with each
0-DOF position used at most once and the atom count within the limit — so sequences are valid by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Composition, Element

from wyckoff_lab.core.generators import Conditions
from wyckoff_lab.core.generators.wyckoff_grammar.tokenizer import (
    CONTINUOUS_KINDS,
    MAX_COUNT,
    VOCAB,
    TokenSequence,
)
from wyckoff_lab.core.symmetry import SpaceGroupInfo, WyckoffPosition, spacegroup
from wyckoff_lab.core.templates import counts_feasible

MAX_ELEMENTS = 6


@dataclass
class SpaceGroupMultiplicities:
    """What the masks need of a space group: its positions, 0-DOF multiplicities and repeatable multiplicities."""

    group: SpaceGroupInfo
    factor: int  # centering: conventional atoms per primitive atom
    fixed: tuple[int, ...]
    repeatable: tuple[int, ...]
    by_token: dict[int, WyckoffPosition]

    @classmethod
    def of(cls, number: int) -> "SpaceGroupMultiplicities":
        if number not in _SG_CACHE:
            group = spacegroup(number)
            by_token = {VOCAB.wyckoff(wp.token): wp for wp in group.wyckoff_positions}
            _SG_CACHE[number] = cls(group, group.centering_factor, group.fixed_multiplicities,
                                    group.repeatable_multiplicities, by_token)
        return _SG_CACHE[number]

    def feasible(self, counts, used_fixed: tuple[int, ...] = ()) -> bool:
        """Conventional-cell counts fit the positions (0-DOF ones in `used_fixed` already taken)."""
        fixed = list(self.fixed)
        for m in used_fixed:
            fixed.remove(m)
        return counts_feasible(tuple(sorted(c for c in counts if c > 0)), tuple(fixed), self.repeatable)


_SG_CACHE: dict[int, SpaceGroupMultiplicities] = {}


@dataclass
class DecodingPlan:
    """Per-request constants shared by every sample of a batch."""

    conditions: Conditions
    max_atoms: int  # primitive cell
    allowed_elements: np.ndarray  # bool over vocabulary: elements the model may propose unprompted
    allowed_spacegroups: np.ndarray  # bool over 1..230 (index sg-1)
    formula: dict[str, int] | None = None  # reduced formula as integer amounts
    template: tuple[tuple[str, WyckoffPosition], ...] = ()
    pinned: dict[str, int] = field(default_factory=dict)  # atoms per element placed by the template

    @property
    def min_count(self) -> int:
        """Primitive-cell atoms one element can always take: the forced group's smallest repeatable orbit
        (P1's general position, 1, when the group is free). Reserving it for every later element means the
        counts can always be completed."""
        if not self.conditions.spacegroup:
            return 1
        sg = SpaceGroupMultiplicities.of(self.conditions.spacegroup)
        return sg.repeatable[0] // sg.factor

    @classmethod
    def build(cls, conditions: Conditions, max_atoms: int, seen_elements, seen_spacegroups) -> "DecodingPlan":
        allowed_elements = np.zeros(len(VOCAB), dtype=bool)
        for symbol in seen_elements:
            allowed_elements[VOCAB.element(symbol)] = True
        allowed_sg = np.zeros(230, dtype=bool)
        allowed_sg[[n - 1 for n in seen_spacegroups]] = True
        formula = None
        if conditions.formula:
            formula = {el.symbol: int(round(n)) for el, n in Composition(conditions.formula).items()}
        template, pinned = (), {}
        if conditions.template:
            group = spacegroup(conditions.spacegroup)
            template = tuple((el, group.wyckoff(label)) for el, label in conditions.template)
            for el, wp in template:
                pinned[el] = pinned.get(el, 0) + wp.multiplicity
        plan = cls(conditions, max_atoms, allowed_elements, allowed_sg, formula, template, pinned)
        plan._check_possible()
        return plan

    def _check_possible(self) -> None:
        """Refuse requests no sequence can satisfy, so sampling never starts on an impossible prompt."""
        from wyckoff_lab.core.templates import check_template

        conditions = self.conditions
        system = conditions.chemical_system or ()
        if len(system) * self.min_count > self.max_atoms:
            raise ValueError(f"impossible conditions: {len(system)} elements need at least "
                             f"{len(system) * self.min_count} atoms, more than max_atoms={self.max_atoms}")
        if conditions.formula:
            from pymatgen.core import Composition

            per_unit = int(Composition(conditions.formula).num_atoms)
            if per_unit > self.max_atoms:
                raise ValueError(f"impossible conditions: formula {conditions.formula} has {per_unit} atoms per "
                                 f"formula unit, more than max_atoms={self.max_atoms}")
        if conditions.spacegroup and conditions.template:
            from wyckoff_lab.core.templates import template_problems

            problems = template_problems(conditions.spacegroup, conditions.template)
            if problems:
                raise ValueError("impossible template: " + "; ".join(problems))
        if conditions.spacegroup:
            factor = SpaceGroupMultiplicities.of(conditions.spacegroup).factor
            if conditions.formula:
                check = check_template(conditions.formula, conditions.spacegroup, conditions.template,
                                       max_atoms=self.max_atoms * factor)
                if not check:
                    raise ValueError("impossible conditions: " + "; ".join(check.reasons[:3]))
            needed = sum(self.pinned.values()) / factor + self.min_count * len(set(system) - set(self.pinned))
            if needed > self.max_atoms:
                raise ValueError(f"impossible conditions: the template and elements need at least {needed:g} atoms "
                                 f"in the primitive cell, more than max_atoms={self.max_atoms}")


class DecodingState:
    """The grammar position of one sequence being sampled, and the masks it allows next."""

    def __init__(self, plan: DecodingPlan):
        self.plan = plan
        self.tokens, self.values, self.kinds = [VOCAB.bos], [0.0], [0]
        self.phase = "stability"
        self.elements: list[str] = []
        self.counts: list[int] = []
        self.sg: SpaceGroupMultiplicities | None = None
        self.remaining: dict[str, int] = {}
        self.used_fixed: list[int] = []  # multiplicities of 0-DOF positions already taken
        self.used_letters: set[str] = set()
        self.orbit_position: WyckoffPosition | None = None
        self.pending_kinds: list[int] = []  # continuous kinds still to emit (free parameters, then lattice)
        self.template_left = list(plan.template)
        self.orbit_params: list[float] = []  # free parameters of the orbit being written
        self.placed_sites: list[np.ndarray] = []  # fractional sites of the finished orbits
        self.failure: str | None = None

    @property
    def done(self) -> bool:
        return self.phase == "done" or self.failure is not None

    # -- what may come next -------------------------------------------------------------------------------------

    def next_kind(self) -> int:
        """0 when the next token is discrete, else the kind of continuous value expected."""
        return self.pending_kinds[0] if self.pending_kinds else 0

    def mask(self) -> np.ndarray:
        """Boolean mask over the vocabulary of the discrete tokens allowed next."""
        allowed = np.zeros(len(VOCAB), dtype=bool)
        getattr(self, f"_allow_{self.phase}")(allowed)
        return allowed

    def _allow_stability(self, allowed):
        wanted = self.plan.conditions.stability
        for name, token in VOCAB.stab.items():
            allowed[token] = wanted is None or wanted == name

    def _allow_elements(self, allowed):
        system = self.plan.conditions.chemical_system
        if system is not None:
            i = len(self.elements)
            allowed[VOCAB.element(system[i]) if i < len(system) else VOCAB.sep] = True
            return
        # Elements come by increasing Z; the template's elements must all appear, and every element needs an atom.
        last_z = Element(self.elements[-1]).Z if self.elements else 0
        missing = sorted((Element(el).Z for el in self.plan.pinned if el not in self.elements))
        if not missing and self.elements:
            allowed[VOCAB.sep] = True
        room = min(MAX_ELEMENTS, self.plan.max_atoms // self.plan.min_count) - len(self.elements)
        if room <= len(missing):
            if missing:
                allowed[VOCAB.element_offset + missing[0] - 1] = True
            return
        candidates = self.plan.allowed_elements.copy()
        candidates[VOCAB.element_offset:VOCAB.element_offset + last_z] = False
        if missing:  # nothing past the next required element, which is itself always allowed
            candidates[VOCAB.element_offset + missing[0]:] = False
            candidates[VOCAB.element_offset + missing[0] - 1] = True
        allowed |= candidates

    def _allow_counts(self, allowed):
        i = len(self.counts)
        element = self.elements[i]
        formula, forced_sg = self.plan.formula, self.plan.conditions.spacegroup
        max_total = self.plan.max_atoms  # primitive cell
        already = sum(self.counts)
        later = len(self.elements) - i - 1  # every later element needs room for its smallest repeatable orbit
        if formula is not None and i > 0:
            z = self.counts[0] // formula[self.elements[0]]
            options = [z * formula[element]]
        elif formula is not None:
            per_unit = sum(formula.values())
            options = [z * formula[element] for z in range(1, max_total // per_unit + 1)]
        else:
            options = range(1, min(MAX_COUNT, max_total - already - later * self.plan.min_count) + 1)
        factor = spacegroup(forced_sg).centering_factor if forced_sg else 1
        for n in options:
            if n > MAX_COUNT or n * factor < self.plan.pinned.get(element, 0):
                continue
            if forced_sg:
                trial = self.counts + [n]
                if formula is not None and i == 0:
                    z = n // formula[element]
                    trial = [z * formula[el] for el in self.elements]
                if not self._fits_forced_group(trial):
                    continue
            allowed[VOCAB.count(n)] = True

    def _fits_forced_group(self, counts) -> bool:
        """Primitive counts (minus the template's atoms) fit the forced group's positions left after the template."""
        sg = SpaceGroupMultiplicities.of(self.plan.conditions.spacegroup)
        left = [n * sg.factor - self.plan.pinned.get(el, 0) for el, n in zip(self.elements, counts)]
        if min(left) < 0:
            return False
        used = [wp.multiplicity for _, wp in self.plan.template if wp.dof == 0]
        return sg.feasible(left, tuple(used))

    def _allow_spacegroup(self, allowed):
        forced = self.plan.conditions.spacegroup
        if forced:
            allowed[VOCAB.spacegroup(forced)] = True
            return
        for number in np.flatnonzero(self.plan.allowed_spacegroups) + 1:
            sg = SpaceGroupMultiplicities.of(int(number))
            if sg.feasible([n * sg.factor for n in self.counts]):
                allowed[VOCAB.spacegroup(int(number))] = True

    def _allow_wyckoff(self, allowed):
        if self.template_left:
            allowed[VOCAB.wyckoff(self.template_left[0][1].token)] = True
            return
        if not any(self.remaining.values()):
            allowed[VOCAB.end] = True
            return
        for token, wp in self.sg.by_token.items():
            if wp.dof == 0 and wp.letter in self.used_letters:
                continue
            used = tuple(self.used_fixed + ([wp.multiplicity] if wp.dof == 0 else []))
            if any(self._placeable(el, wp, used) for el in self.remaining):
                allowed[token] = True

    def _placeable(self, element: str, wp: WyckoffPosition, used: tuple[int, ...]) -> bool:
        if self.remaining[element] < wp.multiplicity:
            return False
        left = dict(self.remaining)
        left[element] -= wp.multiplicity
        return self.sg.feasible(left.values(), used)

    def _allow_orbit_element(self, allowed):
        wp = self.orbit_position
        if self.template_left:
            allowed[VOCAB.element(self.template_left[0][0])] = True
            return
        used = tuple(self.used_fixed)  # this orbit's position is already counted in used_fixed
        for el in self.remaining:
            if self._placeable(el, wp, used):
                allowed[VOCAB.element(el)] = True

    # -- continuous values: keep atoms apart -----------------------------------------------------------------

    def closes_orbit(self) -> bool:
        """True when the next value is the last free parameter of an orbit (its sites are then fully known)."""
        return self.phase == "wyckoff" and len(self.pending_kinds) == 1 and self.orbit_position is not None

    def min_separation(self, value: float) -> float:
        """Smallest fractional distance between the orbit that `value` completes and every site placed so far
        (its own images included), measured in units of a provisional cubic cell.

        The lattice is decoded last, so distances are judged on a cube of ~12 Å^3 per atom: anisotropic cells make
        this approximate, but it removes most collisions of whole orbits and of an orbit with its own images.
        """
        sites = self.orbit_position.orbit(self.orbit_params + [value])
        others = np.concatenate(self.placed_sites + [sites]) if self.placed_sites else sites
        delta = sites[:, None, :] - others[None, :, :]
        delta -= np.round(delta)
        distances = np.linalg.norm(delta, axis=-1)
        n_placed = len(others) - len(sites)
        distances[np.arange(len(sites)), n_placed + np.arange(len(sites))] = np.inf  # a site vs itself
        return float(distances.min())

    def separation_threshold(self, min_distance_A: float = 0.7) -> float:
        n_atoms = sum(n * self.sg.factor for n in self.counts)
        return min_distance_A / (12.0 * n_atoms) ** (1 / 3)

    # -- advance ------------------------------------------------------------------------------------------------

    def push(self, token: int, value: float = 0.0) -> None:
        """Append the sampled token (or, for a continuous position, VOCAB.num with its value)."""
        kind = self.next_kind()
        self.tokens.append(token)
        self.values.append(float(value))
        self.kinds.append(kind)
        if kind:
            self.pending_kinds.pop(0)
            if not np.isfinite(value):
                self.failure = "non_finite_value"
            elif self.phase == "wyckoff":
                self.orbit_params.append(float(value))
                if not self.pending_kinds:
                    self._finish_orbit()
            elif not self.pending_kinds and self.phase == "lattice":
                self.phase = "done"
            return
        if self.phase == "stability":
            self.phase = "elements"
        elif self.phase == "elements":
            if token == VOCAB.sep:
                self.phase = "counts"
            else:
                self.elements.append(VOCAB.element_symbol(token))
        elif self.phase == "counts":
            self.counts.append(token - VOCAB.count_offset + 1)
            if len(self.counts) == len(self.elements):
                self.phase = "spacegroup"
        elif self.phase == "spacegroup":
            self.sg = SpaceGroupMultiplicities.of(token - VOCAB.sg_offset + 1)
            self.remaining = {el: n * self.sg.factor for el, n in zip(self.elements, self.counts)}
            self.phase = "wyckoff"
        elif self.phase == "wyckoff":
            if token == VOCAB.end:
                family = self.sg.group.lattice_family
                self.pending_kinds = [1 + CONTINUOUS_KINDS.index(name) for name in family.free_parameters]
                self.phase = "lattice"
                return
            wp = self.sg.by_token[token]
            self.orbit_position = wp
            if wp.dof == 0:
                self.used_fixed.append(wp.multiplicity)
                self.used_letters.add(wp.letter)
            self.phase = "orbit_element"
        elif self.phase == "orbit_element":
            element = VOCAB.element_symbol(token)
            self.remaining[element] -= self.orbit_position.multiplicity
            if self.template_left:
                self.template_left.pop(0)
            self.pending_kinds = [1 + axis for axis in self.orbit_position.free_axes]
            self.phase = "wyckoff"
            if not self.pending_kinds:
                self._finish_orbit()

    def _finish_orbit(self) -> None:
        self.placed_sites.append(self.orbit_position.orbit(self.orbit_params))
        self.orbit_params = []
        self.orbit_position = None

    def fail(self, reason: str) -> None:
        self.failure = reason

    def as_sequence(self) -> TokenSequence:
        return TokenSequence(np.array(self.tokens), np.array(self.values, dtype=np.float32), np.array(self.kinds))
