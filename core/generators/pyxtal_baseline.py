"""PyXtal random symmetric crystals with charge compensation: the baseline Matra-Genoa is measured against."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Element, Structure

from wyckoff_lab.core.compositions import candidate_compositions, compositions_by_size, oxidation_states
from wyckoff_lab.core.defaults import MAX_ATOMS
from wyckoff_lab.core.generators import (
    Candidate,
    Conditions,
    GenerationResult,
    Generator,
    GeneratorOption,
    ProgressCallback,
    register_generator,
)
from wyckoff_lab.core.generators.quality import cell_is_sound, sample_until
from wyckoff_lab.core.symmetry import check_tolerance, spacegroup
from wyckoff_lab.core.templates import check_template, counts_feasible
from wyckoff_lab.core.wyckoff import WyckoffCrystal

log = logging.getLogger(__name__)

DEFAULT_MAX_ATOMS = MAX_ATOMS
VOLUME_FACTOR = 1.1  # pyxtal's volume factor over its estimate from atomic radii
ATTEMPTS_PER_STRUCTURE = 5  # cap on attempts, so an unlucky request ends instead of looping
PYXTAL_TRIES = 3  # pyxtal's own restarts per attempt (each restart already tries many lattices and coordinates)

# Used only when MP-20 is not available: the most frequent chemical systems and space groups of MP-20 train
# (row counts), so that unconditioned sampling still resembles the benchmark's distribution.
FALLBACK_CHEMICAL_SYSTEMS = {
    "F-O-V": 104, "F-Mn-O": 102, "Co-Li-Mn-O": 79, "Mo-S-Se-W": 54, "F-Li-Mn": 43, "Li-Mg": 42, "F-Li-V": 42,
    "Li-Mn-O": 38, "Ga-Mg": 35, "F-Li-O-V": 35, "Cd-Mg": 34, "F-Fe-Li": 33, "Mg-Zn": 28, "F-Li-Mn-O": 27,
    "Cu-F-Li": 26, "F-Fe-O": 26,
}
FALLBACK_SPACEGROUPS = {
    225: 3613, 12: 1228, 139: 1219, 62: 1171, 194: 1115, 166: 1050, 63: 862, 221: 819, 2: 643, 123: 619, 14: 551,
    164: 545, 216: 534, 15: 497, 129: 470, 189: 468, 1: 442, 71: 411, 38: 372, 191: 353,
}


def mp20_train_distribution() -> tuple[dict[tuple[str, ...], int], dict[int, int]]:
    """Row counts of chemical systems and of space groups in MP-20 train: what unconditioned attempts draw from.

    Falls back to the built-in top entries (with a warning) when the dataset is neither local nor downloadable.
    Cached per data folder: a process that switches `WYCKOFF_LAB_DATA` (the tests do) gets that folder's counts.
    """
    from wyckoff_lab.core.paths import data_dir

    return _mp20_train_distribution(data_dir())


@functools.cache  # per data folder: the fallback warns once
def _mp20_train_distribution(data_folder: Path) -> tuple[dict[tuple[str, ...], int], dict[int, int]]:
    from wyckoff_lab.core.datasets import system_and_spacegroup_counts
    from wyckoff_lab.core.paths import DataUnavailableError

    try:
        return system_and_spacegroup_counts("mp_20", "train")
    except DataUnavailableError as exc:
        log.warning("MP-20 is unavailable (%s); sampling from a small built-in list of chemical systems", exc)
        return ({_by_z(system.split("-")): count for system, count in FALLBACK_CHEMICAL_SYSTEMS.items()},
                dict(FALLBACK_SPACEGROUPS))


def _wrapped_into_cell(structure: Structure) -> Structure:
    """The same crystal with every fractional coordinate in [0, 1): pyxtal keeps its orbits' unwrapped coordinates
    (NaCl in Fm-3m came out with x from -0.88 to 0.93), which CIF readers and viewers treat as other atoms."""
    frac = structure.frac_coords - np.floor(structure.frac_coords)
    frac[frac >= 1.0 - 1e-12] = 0.0  # -1e-17 wraps to 1.0 in floating point
    return Structure(structure.lattice, [site.species for site in structure], frac,
                     site_properties=structure.site_properties)


def _by_z(elements) -> tuple[str, ...]:
    return tuple(sorted(elements, key=lambda el: Element(el).Z))


# -- space groups ---------------------------------------------------------------------------------------------------


@functools.cache
def _multiplicities(number: int) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """(centring factor, 0-DOF multiplicities, repeatable multiplicities) of a space group, for counts_feasible."""
    group = spacegroup(number)
    return group.centering_factor, group.fixed_multiplicities, group.repeatable_multiplicities


@functools.lru_cache(maxsize=200_000)
def feasible_formula_units(ratio: tuple[int, ...], number: int, max_atoms: int) -> tuple[int, ...]:
    """Multiples z of a reduced ratio (primitive cell: z * sum(ratio) <= max_atoms) whose conventional-cell counts
    (z times the centring factor) some Wyckoff positions of the group can hold. Pass the ratio sorted: only the
    counts matter, not which element has which, so sorted ratios share the cache."""
    factor, fixed, repeatable = _multiplicities(number)
    return tuple(z for z in range(1, max_atoms // sum(ratio) + 1)
                 if counts_feasible(tuple(factor * z * c for c in ratio), fixed, repeatable))


@functools.lru_cache(maxsize=20_000)
def _template_formula_units(elements: tuple[str, ...], ratio: tuple[int, ...], number: int, max_atoms: int,
                            template: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
    """Like `feasible_formula_units`, with the user's pinned orbits placed first (`check_template`, exact counts)."""
    factor = _multiplicities(number)[0]
    return tuple(z for z in range(1, max_atoms // sum(ratio) + 1)
                 if check_template(dict(zip(elements, (factor * z * c for c in ratio))), number, template))


@contextlib.contextmanager
def _pyxtal_tolerances():
    """Yield one pyxtal tolerance matrix (atomic radii) for every placement check of a batch.

    pyxtal 1.1.5's Wyckoff `merge` calls `check_images` with an explicit tolerance but no matrix, and
    `check_images` then builds a 118 x 118 `Tol_matrix` it never reads (about 5 ms, each of thousands of times):
    over half of all generation time. Handing it a prebuilt matrix gives identical structures about 2.5x faster;
    the original function is restored afterwards.
    """
    import pyxtal.symmetry
    from pyxtal.operations import check_images
    from pyxtal.tolerance import Tol_matrix

    matrix = Tol_matrix(prototype="atomic")
    original = pyxtal.symmetry.check_images
    pyxtal.symmetry.check_images = functools.partial(check_images, tm=matrix)
    try:
        yield matrix
    finally:
        pyxtal.symmetry.check_images = original


@functools.cache
def _pyxtal_group(number: int):
    """pyxtal's Group objects are slow to build (~0.1 s for cubic groups) and only read while generating."""
    from pyxtal.symmetry import Group

    return Group(number)


# -- the generator --------------------------------------------------------------------------------------------------


@register_generator("pyxtal")
class PyXtalGenerator(Generator):
    """Random crystals in a chosen space group with pyxtal, on charge-balanced compositions.

    Each attempt: a chemical system (given, or drawn from MP-20 train), a charge-balanced reduced composition,
    a space group (given, or drawn from MP-20 train among those whose Wyckoff multiplicities can hold some multiple
    of the composition), a feasible multiple, then `pyxtal.from_random`. Attempts that fail are counted by reason.
    """

    name = "pyxtal"
    description = "PyXtal random symmetric crystals with charge compensation (the Matra-Genoa baseline)"
    # Every composition it tries is charge balanced (alloys count as balanced), so charge_balanced holds.
    supported_conditions = frozenset({"elements", "formula", "spacegroup", "max_atoms", "template", "charge_balanced"})
    uses_temperature = False
    parallel_safe = True  # one random symmetric structure at a time, in Python
    default_max_atoms = DEFAULT_MAX_ATOMS
    preference = 50  # listed after the trained models
    is_baseline = True  # Matra-Genoa's baseline: benchmark ratios are against it
    options = (
        GeneratorOption("volume_factor", "float", VOLUME_FACTOR, "PyXtal's volume factor (cell volume over the sum "
                        "of atomic volumes)", minimum=0.1, maximum=10.0),
        GeneratorOption("attempts_per_structure", "int", ATTEMPTS_PER_STRUCTURE, "random compositions / space "
                        "groups tried per structure before it counts as failed", minimum=1, maximum=1000),
    )

    def __init__(self, chemical_systems: Mapping | None = None, spacegroups: Mapping[int, float] | None = None,
                 volume_factor: float = VOLUME_FACTOR, attempts_per_structure: int = ATTEMPTS_PER_STRUCTURE,
                 pyxtal_tries: int = PYXTAL_TRIES):
        """`chemical_systems` ({"Na-Cl" or ("Na", "Cl"): weight}) and `spacegroups` ({number: weight}) replace the
        MP-20 train distributions that unconditioned attempts draw from (loaded on first need)."""
        self._systems = None if chemical_systems is None else {
            _by_z(k.split("-") if isinstance(k, str) else k): float(w) for k, w in chemical_systems.items()}
        self._groups = None if spacegroups is None else {int(k): float(w) for k, w in spacegroups.items()}
        self.volume_factor = volume_factor
        self.attempts_per_structure = attempts_per_structure
        self.pyxtal_tries = pyxtal_tries

    def _distributions(self) -> tuple[dict, dict]:
        if self._systems is None or self._groups is None:
            systems, groups = mp20_train_distribution()
            self._systems = self._systems if self._systems is not None else systems
            self._groups = self._groups if self._groups is not None else groups
        return self._systems, self._groups

    def _generate(self, n: int, conditions: Conditions, temperature: float, seed: int | None,
                  progress: ProgressCallback | None) -> GenerationResult:
        # Unused here, but a NaN or infinite temperature is the caller's bug: refused as by the transformer.
        check_tolerance(temperature, "temperature")
        max_atoms = conditions.max_atoms or DEFAULT_MAX_ATOMS
        self._check_feasible(conditions, max_atoms)
        systems = groups = None  # (choices, weights) for what the conditions leave open
        if conditions.chemical_system is None or conditions.spacegroup is None:
            all_systems, all_groups = self._distributions()
            if conditions.chemical_system is None:
                systems = list(all_systems), _normalised(all_systems.values())
            if conditions.spacegroup is None:
                groups = np.array(list(all_groups)), np.array(list(all_groups.values()), dtype=float)
        base_seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63)

        attempts = 0
        last = time.perf_counter()

        def draw(wanted: int, round_: int, have: int) -> list:
            """`wanted` attempts, numbered on from the last round's: attempt k draws from rng([seed, k])."""
            nonlocal attempts, last
            outcomes = []
            for _ in range(wanted):
                rng = np.random.default_rng([base_seed, attempts])
                outcome = self._attempt(rng, conditions, max_atoms, systems, groups, tolerances)
                if not isinstance(outcome, str):
                    structure, sg, wyckoff, z = outcome
                    if not cell_is_sound(structure):
                        outcome = "degenerate_cell"
                    else:
                        now = time.perf_counter()
                        outcome = Candidate(structure, self.name, conditions, intended_spacegroup=sg,
                                            wyckoff=wyckoff, sampling_time_s=now - last, seed=base_seed,
                                            extra={"attempt": attempts, "formula_units": z})
                        last = now
                outcomes.append(outcome)
                attempts += 1
                if progress:
                    progress(have + sum(not isinstance(o, str) for o in outcomes), n)
            return outcomes

        with warnings.catch_warnings(), _pyxtal_tolerances() as tolerances:
            warnings.simplefilter("ignore")  # pyxtal warns on every volume increase it makes
            # Rounds until n are made or the attempt budget is spent: the same attempts, in the same order, as
            # trying one at a time until then (a round of `wanted` attempts never makes more than wanted).
            sampled = sample_until(n, draw, rounds=None, max_attempts=self.attempts_per_structure * n)
        return GenerationResult(sampled.kept, attempts=sampled.attempts, failures=sampled.failures)

    def _attempt(self, rng: np.random.Generator, conditions: Conditions, max_atoms: int, systems, groups,
                 tolerances):
        """One try: (structure, space group, Wyckoff dict, formula units), or the failure reason."""
        if conditions.formula:
            elements, ratio = conditions.chemical_system, _formula_ratio(conditions)
        else:
            elements = conditions.chemical_system or systems[0][rng.choice(len(systems[0]), p=systems[1])]
            by_size = compositions_by_size(elements, max_atoms)
            if not by_size:
                return "no_charge_balanced_composition"
            same_size = by_size[rng.integers(len(by_size))]
            ratio = same_size[rng.integers(len(same_size))]

        if conditions.spacegroup:
            order = [conditions.spacegroup]
        else:  # a weighted draw without replacement (exponential keys), tried in order until one fits
            numbers, weights = groups
            order = numbers[np.argsort(rng.exponential(size=len(numbers)) / weights)]
        for number in map(int, order):
            units = _formula_units(elements, ratio, number, max_atoms, conditions.template)
            if units:
                break
        else:
            return "no_feasible_spacegroup"

        z = int(units[rng.integers(len(units))])
        counts = [_multiplicities(number)[0] * z * c for c in ratio]
        sites = None
        if conditions.template:
            sites = [[label for el, label in conditions.template if el == element] or None for element in elements]
        from pyxtal import pyxtal

        crystal = pyxtal()
        try:
            crystal.from_random(3, _pyxtal_group(number), list(elements), counts, factor=self.volume_factor,
                                sites=sites, max_count=self.pyxtal_tries, tm=tolerances, random_state=rng)
        except Exception:  # pyxtal signals "no arrangement found" with assorted exception types
            return "pyxtal_failed"
        return _wrapped_into_cell(crystal.to_pymatgen()), number, _wyckoff_dict(crystal, number), z

    def _check_feasible(self, conditions: Conditions, max_atoms: int) -> None:
        """Refuse up front, with the reason, a fixed chemistry that no attempt could ever satisfy."""
        elements = conditions.chemical_system
        if elements is None:
            return
        system = "-".join(elements)
        if conditions.formula:
            compositions = (_formula_ratio(conditions),)
            if sum(compositions[0]) > max_atoms:
                raise ValueError(f"{conditions.formula} has {sum(compositions[0])} atoms, more than "
                                 f"max_atoms={max_atoms}")
        else:
            compositions = candidate_compositions(elements, max_atoms)
            if not compositions:
                states = "; ".join(f"{el}: {', '.join(f'{s:+d}' for s in oxidation_states(el)) or 'none'}"
                                   for el in elements)
                raise ValueError(f"no charge-balanced composition of {system} with at most {max_atoms} atoms "
                                 f"(oxidation states {states})")
        number = conditions.spacegroup
        if number is None or any(_formula_units(elements, ratio, number, max_atoms, conditions.template)
                                 for ratio in compositions):
            return
        factor, fixed, repeatable = _multiplicities(number)
        if conditions.formula:
            ratio = compositions[0]
            tried = "; ".join(" ".join(f"{el}{factor * z * c}" for el, c in zip(elements, ratio))
                              for z in range(1, max_atoms // sum(ratio) + 1))
            detail = (f"no conventional-cell content ({tried}) is a sum of its multiplicities "
                      f"(without free parameters, each usable once: {', '.join(map(str, fixed)) or 'none'}; "
                      f"with free parameters: {', '.join(map(str, repeatable))})")
        else:
            detail = f"none of the {len(compositions)} candidate compositions of {system} fits"
        if conditions.template:
            detail += " once the template " + ", ".join(f"{el}:{label}" for el, label in conditions.template) + \
                " is placed"
        raise ValueError(f"space group {number} ({spacegroup(number).symbol}) cannot hold "
                         f"{conditions.formula or system} within max_atoms={max_atoms} (primitive cell): {detail}")


def _formula_ratio(conditions: Conditions) -> tuple[int, ...]:
    """The requested reduced formula as counts in `conditions.chemical_system` order."""
    amounts = Composition(conditions.formula).get_el_amt_dict()
    return tuple(int(round(amounts[el])) for el in conditions.chemical_system)


def _formula_units(elements: tuple[str, ...], ratio: tuple[int, ...], number: int, max_atoms: int,
                   template: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
    """Feasible multiples of a composition in a space group, honouring the template when there is one."""
    if template:
        return _template_formula_units(elements, ratio, number, max_atoms, template)
    return feasible_formula_units(tuple(sorted(ratio)), number, max_atoms)


def _normalised(weights) -> np.ndarray:
    weights = np.asarray(list(weights), dtype=float)
    return weights / weights.sum()


def _wyckoff_dict(crystal, number: int) -> dict:
    """The generated crystal in the project's Wyckoff representation (pyxtal's tables are the ones ours derive from,
    so letters and the representative site's coordinate triplet agree)."""
    group = spacegroup(number)
    orbits = []
    for site in crystal.atom_sites:
        position = group.wyckoff(site.wp.letter)
        orbits.append((site.specie, position.letter, position.free_params_from_orbit(site.position)))
    return WyckoffCrystal.from_orbits(number, crystal.lattice.get_para(degree=True), orbits).as_dict()
