"""Ion exchange into known prototypes (data-mined substitution probabilities): the field's strong baseline.

Every prototype (a known crystal of another chemical system with as many elements as the request) is mapped onto
the requested elements by each one-to-one assignment of its species to the requested elements' species, scored
by pymatgen's data-mined substitution probabilities (Hautier et al., Inorg. Chem. 2011: P(target | prototype
species), the product over sites of the conditional pair probabilities), kept when charge balanced (alloys: when
every element is a metal, none needs balancing), then rescaled in volume and checked by the shared quality gate.
Draws are without replacement, weighted by probability^(1/T) (Gumbel top-k, so T -> 0 is the most probable
first); duplicates (StructureMatcher) count as rejected and are drawn again.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Composition, Element, Species, Structure

from wyckoff_lab.core.compositions import needs_charge_balance, oxidation_states
from wyckoff_lab.core.defaults import MAX_ATOMS
from wyckoff_lab.core.generators.base import (
    Candidate,
    Conditions,
    GenerationResult,
    Generator,
    GeneratorOption,
    ProgressCallback,
    register_generator,
)
from wyckoff_lab.core.generators.quality import QualityGate, cell_is_sound
from wyckoff_lab.core.generators.substitution.prototypes import (
    PROTOTYPE_SETS,
    Prototype,
    nominal_cation,
    prototype_of,
    prototypes,
    species_string,
    structure_of,
    substitution_table,
    table_species,
)
from wyckoff_lab.core.symmetry import check_tolerance

# Substitutor's default threshold: substitutions less probable than this are not made.
MIN_PROBABILITY = 1e-3
VOLUME_RULES = ("dls", "radius")
# Unconditioned requests draw their chemical systems among these sizes, weighted as MP-20 train's systems are.
DRAW_ATTEMPTS = 20


@dataclass(frozen=True)
class Substitution:
    """One prototype mapped onto target species (in the prototype's element order), with its probability."""

    prototype: Prototype
    targets: tuple[str, ...]  # species strings, one per prototype element
    probability: float

    @property
    def elements(self) -> tuple[str, ...]:
        return tuple(Species.from_str(s).symbol for s in self.targets)

    def composition(self) -> Composition:
        return Composition(dict(zip(self.elements, self.prototype.counts)))


def target_species(elements: tuple[str, ...], alloy: bool) -> dict[str, tuple[str, ...]]:
    """Per requested element, the species it may take: its oxidation states the table knows (for an all-metal
    request, its nominal cation only)."""
    known = table_species()
    if alloy:
        return {el: tuple(s for s in [nominal_cation(el, known)] if s) for el in elements}
    return {el: tuple(species_string(el, s) for s in oxidation_states(el) if species_string(el, s) in known)
            for el in elements}


@functools.cache
def _oxidation(species: str) -> int:
    return int(Species.from_str(species).oxi_state)


@functools.cache
def _cond_prob(target: str, source: str) -> float:
    """P(target species | prototype species) from the data-mined table."""
    return substitution_table().cond_prob(target, source)


@functools.cache
def _pools_by_kind(pool: tuple[Prototype, ...]) -> dict[tuple[int, bool], tuple[Prototype, ...]]:
    """The pool grouped by (number of elements, alloy or not): a request only ever looks at one group."""
    groups: dict[tuple[int, bool], list[Prototype]] = {}
    for prototype in pool:
        groups.setdefault((len(prototype.elements), prototype.alloy), []).append(prototype)
    return {key: tuple(value) for key, value in groups.items()}


def substitutions_into(elements: tuple[str, ...], pool: tuple[Prototype, ...], max_atoms: int,
                       spacegroup: int | None = None, formula: Composition | None = None,
                       min_probability: float = MIN_PROBABILITY) -> list[Substitution]:
    """Every substitution of a prototype of `pool` into exactly `elements`, most probable first (ties by row).

    An assignment of target elements to the prototype's sites is skipped when even each site's most probable
    species of its element cannot reach `min_probability` (the product only falls from there)."""
    wanted = set(elements)
    alloy = not needs_charge_balance(elements)
    choices = target_species(elements, alloy)
    reduced = formula.reduced_composition if formula is not None else None
    best: dict[tuple[str, str], float] = {}
    found = []
    for prototype in _pools_by_kind(pool).get((len(elements), alloy), ()):
        if (set(prototype.elements) == wanted or prototype.n_sites > max_atoms
                or (spacegroup is not None and prototype.spacegroup != spacegroup)):
            continue
        for order in itertools.permutations(elements):
            bound = 1.0
            for element, source in zip(order, prototype.species):
                if (element, source) not in best:
                    best[element, source] = max((_cond_prob(t, source) for t in choices[element]), default=0.0)
                bound *= best[element, source]
            if bound < min_probability:
                continue
            if reduced is not None and Composition(dict(zip(order, prototype.counts))).reduced_composition != reduced:
                continue
            for targets in itertools.product(*(choices[el] for el in order)):
                if not alloy and sum(c * _oxidation(t) for c, t in zip(prototype.counts, targets)) != 0:
                    continue
                probability = math.prod(_cond_prob(t, s) for t, s in zip(targets, prototype.species))
                if probability >= min_probability:
                    found.append(Substitution(prototype, targets, probability))
    found.sort(key=lambda s: (-s.probability, s.prototype.source, s.prototype.row, s.targets))
    return found


def radius(element: str, species: str) -> float:
    """Å: the species' ionic radius where pymatgen has one, else the element's atomic radius."""
    try:
        value = Species.from_str(species).ionic_radius
    except (ValueError, KeyError):
        value = None
    return float(value or Element(element).atomic_radius or 1.5)


def substituted_structure(substitution: Substitution, volume_rule: str = "dls") -> tuple[Structure, str]:
    """The prototype with its species replaced, its volume rescaled by `volume_rule` ("dls": pymatgen's
    data-mined bond-length predictor, falling back to "radius" where it has no data; "radius": the prototype's
    volume times the ratio of the summed cubed radii), and the rule actually used."""
    source = structure_of(substitution.prototype)
    mapping = dict(zip(substitution.prototype.elements, substitution.elements))
    structure = Structure(source.lattice, [mapping[site.specie.symbol] for site in source], source.frac_coords)
    if volume_rule == "dls":
        from pymatgen.analysis.structure_prediction.volume_predictor import DLSVolumePredictor

        try:
            predicted = DLSVolumePredictor().get_predicted_structure(structure)
            if cell_is_sound(predicted) and 0.2 < predicted.volume / source.volume < 5:
                return predicted, "dls"
        except (ValueError, KeyError, ZeroDivisionError):  # species outside its bond-length data
            pass
    counts = substitution.prototype.counts
    old = sum(c * radius(el, s) ** 3 for c, el, s in zip(counts, substitution.prototype.elements,
                                                        substitution.prototype.species))
    new = sum(c * radius(el, s) ** 3 for c, el, s in zip(counts, substitution.elements, substitution.targets))
    structure.scale_lattice(source.volume * new / old)
    return structure, "radius"


@register_generator("substitution")
class SubstitutionGenerator(Generator):
    """Ion exchange of known crystals (MP-20 train, optionally the 36k MP set) into the requested chemistry."""

    name = "substitution"
    description = "Ion exchange into known prototypes (pymatgen's data-mined substitution probabilities)"
    # Ionic exchanges are kept only when neutral (alloys count as balanced), so charge_balanced holds.
    supported_conditions = frozenset({"elements", "formula", "spacegroup", "max_atoms", "charge_balanced"})
    uses_temperature = True  # draws weighted by probability^(1/T)
    default_max_atoms = MAX_ATOMS
    preference = 40  # after the trained models, before the random baseline
    options = (
        GeneratorOption("prototype_sets", "choice", "mp_20", "known crystals used as prototypes",
                        choices=("mp_20", "mp_20+mp_36k")),
        GeneratorOption("volume_rule", "choice", "dls", "how the substituted cell's volume is set: pymatgen's "
                        "bond-length predictor (dls) or the ratio of cubed ionic radii (radius)",
                        choices=VOLUME_RULES),
    )

    def __init__(self, prototype_sets: str = "mp_20", volume_rule: str = "dls", chemical_systems=None):
        """`chemical_systems` ({"Li-Mn-O": weight}) replaces MP-20 train's systems for unconditioned requests."""
        if volume_rule not in VOLUME_RULES:
            raise ValueError(f"volume_rule must be one of {', '.join(VOLUME_RULES)}, got {volume_rule!r}")
        self.prototype_sets = prototype_sets
        self.volume_rule = volume_rule
        self._systems = chemical_systems
        self.gate = QualityGate()

    def pool(self) -> tuple[Prototype, ...]:
        sets = self.prototype_sets.split("+")
        for name in sets:
            if name not in PROTOTYPE_SETS:
                raise ValueError(f"unknown prototype set {name!r}; choose from {', '.join(PROTOTYPE_SETS)}")
        return tuple(itertools.chain.from_iterable(prototypes(name) for name in sets))

    def _systems_to_draw(self) -> tuple[list[tuple[str, ...]], np.ndarray]:
        if self._systems is None:
            from wyckoff_lab.core.datasets import system_and_spacegroup_counts

            self._systems = {"-".join(k): v for k, v in system_and_spacegroup_counts("mp_20", "train")[0].items()}
        systems = [tuple(k.split("-")) for k in self._systems]
        weights = np.array(list(self._systems.values()), dtype=float)
        return systems, weights / weights.sum()

    def _check_request(self, conditions: Conditions, max_atoms: int) -> None:
        elements = conditions.chemical_system
        if elements is None:
            return
        known = table_species()
        alloy = not needs_charge_balance(elements)
        lacking = [el for el, species in target_species(elements, alloy).items() if not species]
        if lacking:
            raise ValueError(f"no prototype can take {', '.join(lacking)}: the substitution table has no species "
                             f"of {'it' if len(lacking) == 1 else 'them'} (it covers {len(known)} ions of ICSD "
                             "crystals); the wyckoff-transformer and pyxtal generators can place any element")
        if len(elements) > max_atoms:
            raise ValueError(f"{len(elements)} elements need at least {len(elements)} atoms, more than "
                             f"max_atoms={max_atoms} (at most {max_atoms} atoms)")
        if conditions.formula:
            atoms = int(Composition(conditions.formula).reduced_composition.num_atoms)
            if atoms > max_atoms:
                raise ValueError(f"{conditions.formula} has {atoms} atoms, more than max_atoms={max_atoms}")

    def _generate(self, n: int, conditions: Conditions, temperature: float, seed: int | None,
                  progress: ProgressCallback | None) -> GenerationResult:
        check_tolerance(temperature, "temperature")
        max_atoms = conditions.max_atoms or MAX_ATOMS
        self._check_request(conditions, max_atoms)
        if n == 0:
            return GenerationResult([], attempts=0)
        rng = np.random.default_rng(seed)
        pool = self.pool()
        formula = Composition(conditions.formula) if conditions.formula else None
        failures: Counter = Counter()
        if conditions.chemical_system is not None:
            ranked = substitutions_into(conditions.chemical_system, pool, max_atoms, conditions.spacegroup, formula)
            if not ranked:
                raise ValueError(self._nothing_message(conditions, max_atoms))
            draws = [ranked[i] for i in _gumbel_order([s.probability for s in ranked], temperature, rng)]
        else:
            draws = self._unconditioned_draws(n, pool, max_atoms, conditions.spacegroup, temperature, rng, failures)
        return self._build(n, draws, conditions, seed, progress, failures)

    def _unconditioned_draws(self, n, pool, max_atoms, spacegroup, temperature, rng, failures) -> list:
        """Chemical systems drawn as MP-20 train's, each contributing its best substitution draw."""
        systems, weights = self._systems_to_draw()
        draws = []
        for _ in range(DRAW_ATTEMPTS * max(n, 1)):
            if len(draws) >= 2 * n:
                break
            system = systems[rng.choice(len(systems), p=weights)]
            if any(not species for species in target_species(system, not needs_charge_balance(system)).values()):
                failures["no_prototype"] += 1
                continue
            ranked = substitutions_into(system, pool, max_atoms, spacegroup)
            if not ranked:
                failures["no_prototype"] += 1
                continue
            draws.append(ranked[_gumbel_order([s.probability for s in ranked], temperature, rng)[0]])
        return draws

    def _build(self, n, draws, conditions, seed, progress, failures) -> GenerationResult:
        from pymatgen.analysis.structure_matcher import StructureMatcher

        matcher = StructureMatcher()
        kept: list[Candidate] = []
        by_formula: dict[str, list[Structure]] = {}
        rejected: Counter = Counter()
        attempts = 0
        last = time.perf_counter()
        for substitution in draws:
            if len(kept) >= n:
                break
            attempts += 1
            structure, rule = substituted_structure(substitution, self.volume_rule)
            problem, extra, found = self.gate.check(structure, substitution.prototype.spacegroup)
            if problem == "sites_too_close":
                rejected[problem] += 1
                continue
            formula = structure.composition.reduced_formula
            if any(matcher.fit(structure, other) for other in by_formula.get(formula, [])):
                rejected["duplicate"] += 1
                continue
            by_formula.setdefault(formula, []).append(structure)
            now = time.perf_counter()
            prototype = substitution.prototype
            kept.append(Candidate(
                structure, self.name, conditions, intended_spacegroup=prototype.spacegroup,
                sampling_time_s=now - last, seed=seed, detected_spacegroup=found, detected_symprec=self.gate.symprec,
                extra={"prototype": prototype.material_id, "prototype_source": prototype.source,
                       "prototype_formula": Composition(dict(zip(prototype.elements, prototype.counts))).formula,
                       "substitution": dict(zip(prototype.species, substitution.targets)),
                       "substitution_probability": substitution.probability, "volume_rule": rule, **extra}))
            last = now
            if progress:
                progress(len(kept), n)
        if len(kept) < n:
            failures["prototypes_exhausted"] += n - len(kept)
        return GenerationResult(kept, attempts=attempts + sum(failures.values()), failures=dict(failures),
                                rejected=dict(rejected))

    def _nothing_message(self, conditions: Conditions, max_atoms: int) -> str:
        what = conditions.formula or "-".join(conditions.elements or conditions.chemical_system)
        limits = [f"at most {max_atoms} atoms"]
        if conditions.spacegroup:
            limits.append(f"space group {conditions.spacegroup}")
        if needs_charge_balance(conditions.chemical_system):
            limits.append("charge balanced")
        return (f"no prototype in {self.prototype_sets} can be exchanged into {what} ({', '.join(limits)}, "
                f"substitution probability >= {MIN_PROBABILITY:g})")


def _gumbel_order(probabilities, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """An order of draws without replacement weighted by p^(1/T) (Gumbel top-k over log p / T)."""
    logits = np.log(np.asarray(probabilities, dtype=float)) / temperature
    return np.argsort(-(logits + rng.gumbel(size=len(logits))), kind="stable")


def volume_rule_errors(targets: list[Structure], pool: tuple[Prototype, ...], per_target: int = 1,
                       rules: tuple[str, ...] = VOLUME_RULES) -> dict:
    """How well each volume rule predicts real volumes: for each target crystal (e.g. MP-20 test), prototypes of
    other systems with the same structure type (same anonymous formula and space group, matched by
    StructureMatcher.fit_anonymous) are exchanged into its species, and the predicted volume is compared with the
    target's DFT volume. Returns {rule: {"n", "mean_abs_pct", "median_abs_pct", "mean_signed_pct"}}."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from wyckoff_lab.core.symmetry import detected_spacegroup

    matcher = StructureMatcher()
    by_type: dict[tuple, list[Prototype]] = {}
    for prototype in pool:
        key = (Composition(dict(zip(prototype.elements, prototype.counts))).anonymized_formula, prototype.spacegroup)
        by_type.setdefault(key, []).append(prototype)
    errors: dict[str, list[float]] = {rule: [] for rule in rules}
    for target in targets:
        key = (target.composition.anonymized_formula, detected_spacegroup(target, 0.1))
        used = 0
        for prototype in by_type.get(key, ()):
            source = structure_of(prototype)
            if set(prototype.elements) == {el.symbol for el in target.composition.elements} or len(source) != len(target):
                continue
            if not matcher.fit_anonymous(source, target):
                continue
            mapping = matcher.get_best_electronegativity_anonymous_mapping(source, target)
            described = prototype_of("target", 0, "", target.composition.formula, key[1], len(target))
            if not mapping or described is None or described.alloy != prototype.alloy:
                continue
            species_of = dict(zip(described.elements, described.species))
            targets_species = tuple(species_of[mapping[Element(el)].symbol] for el in prototype.elements)
            substitution = Substitution(prototype, targets_species, 1.0)
            for rule in rules:
                structure, _ = substituted_structure(substitution, rule)
                errors[rule].append(100 * (structure.volume / target.volume - 1))
            used += 1
            if used >= per_target:
                break
    return {rule: {"n": len(e), "mean_abs_pct": float(np.mean(np.abs(e))) if e else math.nan,
                   "median_abs_pct": float(np.median(np.abs(e))) if e else math.nan,
                   "mean_signed_pct": float(np.mean(e)) if e else math.nan} for rule, e in errors.items()}
