"""The Wyckoff representation of a crystal: space group, free lattice parameters and occupied orbits, invertibly.

`WyckoffCrystal.from_structure` finds the symmetry with spglib in the ITA standard setting, groups the standardised
cell's atoms into crystallographic orbits and stores for each orbit only its element, Wyckoff letter and free
parameters. `as_structure` rebuilds the conventional cell by applying the Wyckoff position's coordinate triplets.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import spglib
from pymatgen.core import Composition, Element, Lattice, Structure

from wyckoff_lab.core.defaults import SYMPREC
from wyckoff_lab.core.symmetry import SpaceGroupInfo, WyckoffPosition, check_tolerance, quiet_spglib, spacegroup

DEFAULT_SYMPREC = SYMPREC  # Å (core.defaults); kept under this name for importers
DEFAULT_ANGLE_TOLERANCE = 5.0  # degrees


class WyckoffError(ValueError):
    """A structure cannot be put into (or rebuilt from) the Wyckoff representation; `reason` says why."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class WyckoffOrbit:
    """One occupied orbit: an element on a Wyckoff position, with the free parameters of its representative site."""

    element: str
    position: WyckoffPosition
    free_params: tuple[float, ...] = ()

    @property
    def letter(self) -> str:
        return self.position.letter

    @property
    def label(self) -> str:
        return self.position.label

    @property
    def multiplicity(self) -> int:
        return self.position.multiplicity

    @property
    def dof(self) -> int:
        return self.position.dof

    def sites(self) -> np.ndarray:
        """Fractional coordinates of all sites of the orbit in the conventional cell, (multiplicity, 3)."""
        return self.position.orbit(self.free_params)

    def as_dict(self) -> dict:
        return {"element": self.element, "wyckoff": self.label, "free_params": [float(p) for p in self.free_params]}


@dataclass(frozen=True)
class WyckoffCrystal:
    """A symmetric crystal: space group (ITA standard setting), lattice parameters (Å, degrees) and orbits."""

    spacegroup: int
    lattice: tuple[float, float, float, float, float, float]
    orbits: tuple[WyckoffOrbit, ...]
    symprec: float = field(default=DEFAULT_SYMPREC, compare=False)

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_structure(cls, structure: Structure, symprec: float = DEFAULT_SYMPREC,
                       angle_tolerance: float = DEFAULT_ANGLE_TOLERANCE) -> "WyckoffCrystal":
        """Detect the symmetry of an ordered structure and express it in Wyckoff positions.

        When spglib finds a group at `symprec` whose sites it cannot idealise onto that group's Wyckoff positions
        (borderline distortions), the tolerance is halved, at most three times: the highest symmetry that the
        structure really has wins. `symprec` of the result records the tolerance used.
        Raises WyckoffError with reason 'disorder', 'symmetry_detection' or 'setting'.
        """
        symprec = check_tolerance(symprec)
        angle_tolerance = check_tolerance(angle_tolerance, "angle_tolerance")
        if not structure.is_ordered:
            raise WyckoffError("structure has partial occupancies; the Wyckoff representation needs an ordered "
                               "structure", "disorder")
        cell = (structure.lattice.matrix, structure.frac_coords, [site.specie.Z for site in structure])
        for attempt in range(4):
            try:
                return cls._from_cell(cell, symprec / 2**attempt, angle_tolerance)
            except WyckoffError as exc:
                if exc.reason != "setting" or attempt == 3:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _from_cell(cls, cell, symprec: float, angle_tolerance: float) -> "WyckoffCrystal":
        with quiet_spglib():
            dataset = spglib.get_symmetry_dataset(cell, symprec=symprec, angle_tolerance=angle_tolerance)
        if dataset is None:
            raise WyckoffError(f"spglib found no symmetry at symprec={symprec}", "symmetry_detection")
        group = spacegroup(dataset.number)
        if dataset.hall_number != group.hall_number:
            # spglib's default is the first Hall setting; ask again in the ITA standard one our tables use.
            with quiet_spglib():
                dataset = spglib.get_symmetry_dataset(cell, symprec=symprec, angle_tolerance=angle_tolerance,
                                                      hall_number=group.hall_number)
            if dataset is None or dataset.number != group.number:
                raise WyckoffError(f"could not standardise to the ITA setting of space group {group.number}",
                                   "setting")
        return cls._from_dataset(dataset, group, symprec)

    @classmethod
    def _from_dataset(cls, dataset, group: SpaceGroupInfo, symprec: float) -> "WyckoffCrystal":
        # Standardised-cell atoms inherit Wyckoff letter and orbit from the input atoms through the primitive cell.
        input_of_primitive = {}
        for input_index, prim_index in enumerate(dataset.mapping_to_primitive):
            input_of_primitive.setdefault(int(prim_index), input_index)
        std_input = np.array([input_of_primitive[int(p)] for p in dataset.std_mapping_to_primitive])
        std_orbit = np.asarray(dataset.crystallographic_orbits)[std_input]
        std_letters = np.asarray(dataset.wyckoffs)[std_input]

        orbits = []
        for orbit_id in np.unique(std_orbit):
            members = np.flatnonzero(std_orbit == orbit_id)
            letter = str(std_letters[members[0]])
            position = group.wyckoff(letter)
            if len(members) != position.multiplicity:
                raise WyckoffError(f"orbit of {len(members)} sites on {position.label} of space group "
                                   f"{group.number}", "setting")
            try:
                free = position.free_params_from_orbit(dataset.std_positions[members], tol=1e-4)
            except ValueError as exc:
                raise WyckoffError(str(exc), "setting") from None
            element = Element.from_Z(int(dataset.std_types[members[0]])).symbol
            orbits.append(WyckoffOrbit(element, position, tuple(float(p) for p in free)))

        params = Lattice(dataset.std_lattice).parameters
        lattice = group.lattice_family.project(params)
        return cls(group.number, lattice, cls._canonical_order(orbits), symprec)

    @staticmethod
    def _canonical_order(orbits) -> tuple[WyckoffOrbit, ...]:
        """Orbits sorted by Wyckoff letter order in the tables, then element, then parameters: one canonical form."""
        def key(orbit: WyckoffOrbit):
            letter_rank = orbit.position.multiplicity, orbit.letter.lower() + ("~" if orbit.letter.isupper() else "")
            return letter_rank, Element(orbit.element).Z, orbit.free_params
        return tuple(sorted(orbits, key=key))

    @classmethod
    def from_orbits(cls, spacegroup_number: int, lattice_params, orbits) -> "WyckoffCrystal":
        """Build from plain data: orbits as (element, wyckoff label or letter, free params) triples.

        Lattice parameters are snapped onto the space group's lattice family; free parameters must match the
        position's degrees of freedom. Unknown elements and labels raise ValueError / KeyError with clear messages.
        """
        group = spacegroup(spacegroup_number)
        built = []
        for element, wyckoff, free in orbits:
            if not Element.is_valid_symbol(element):
                raise ValueError(f"unknown element {element!r}")
            position = group.wyckoff(wyckoff)
            free = tuple(float(p) for p in free)
            if len(free) != position.dof:
                raise ValueError(f"{position.label} of space group {group.number} has {position.dof} free "
                                 f"parameter(s) {position.free_parameter_names}, got {len(free)}")
            if not all(math.isfinite(p) for p in free):
                raise ValueError(f"non-finite free parameters {free} for {element} on {position.label}")
            built.append(WyckoffOrbit(element, position, tuple(p % 1.0 for p in free)))
        lattice = group.lattice_family.project(lattice_params)
        if not all(math.isfinite(p) and p > 0 for p in lattice):
            raise ValueError(f"invalid lattice parameters {lattice}")
        return cls(group.number, lattice, tuple(built))

    @classmethod
    def from_dict(cls, data: dict) -> "WyckoffCrystal":
        orbits = [(o["element"], o["wyckoff"], o["free_params"]) for o in data["orbits"]]
        return cls.from_orbits(data["spacegroup"], data["lattice"], orbits)

    # -- views ---------------------------------------------------------------------------------------------------

    @property
    def group(self) -> SpaceGroupInfo:
        return spacegroup(self.spacegroup)

    @property
    def num_sites(self) -> int:
        """Atoms in the conventional cell."""
        return sum(o.multiplicity for o in self.orbits)

    @property
    def composition(self) -> Composition:
        counts = Counter()
        for orbit in self.orbits:
            counts[orbit.element] += orbit.multiplicity
        return Composition(counts)

    @property
    def lattice_free_params(self) -> tuple[float, ...]:
        """The lattice parameters the crystal family leaves free (e.g. (a, c) for tetragonal)."""
        return self.group.lattice_family.free_values(self.lattice)

    @property
    def wyckoff_labels(self) -> tuple[str, ...]:
        return tuple(o.label for o in self.orbits)

    def as_dict(self) -> dict:
        """JSON-able form; lattice as [a, b, c, alpha, beta, gamma] in Å and degrees."""
        return {"spacegroup": self.spacegroup, "lattice": [float(p) for p in self.lattice],
                "orbits": [o.as_dict() for o in self.orbits]}

    def as_structure(self, primitive: bool = False) -> Structure:
        """The conventional cell (every orbit expanded by its Wyckoff position's coordinate triplets).

        With `primitive=True`, the primitive cell of the same crystal (spglib, tight tolerance: the rebuilt cell is
        exactly symmetric), which is what StructureMatcher compares most reliably.
        """
        conventional = self._conventional_structure()
        if not primitive or self.group.symbol[0] == "P":
            return conventional
        cell = (conventional.lattice.matrix, conventional.frac_coords, conventional.atomic_numbers)
        found = spglib.find_primitive(cell, symprec=1e-4)
        if found is None:
            return conventional
        lattice, positions, numbers = found
        return Structure(Lattice(lattice), [int(z) for z in numbers], positions)

    def _conventional_structure(self) -> Structure:
        if not self.orbits:
            raise WyckoffError("a crystal needs at least one occupied orbit", "empty")
        species, coords = [], []
        for orbit in self.orbits:
            sites = orbit.sites()
            species += [orbit.element] * len(sites)
            coords.append(sites)
        lattice = Lattice.from_parameters(*self.lattice)
        return Structure(lattice, species, np.concatenate(coords))

    def __str__(self) -> str:
        orbits = ", ".join(f"{o.element}@{o.label}" + (f"({', '.join(f'{p:.3f}' for p in o.free_params)})"
                                                        if o.free_params else "") for o in self.orbits)
        return f"{self.composition.formula} SG {self.spacegroup} ({self.group.symbol}) {orbits}"


# ---------------------------------------------------------------------------------------------------------------
# Invertibility check
# ---------------------------------------------------------------------------------------------------------------


def roundtrip_failure(structure: Structure, symprec: float = DEFAULT_SYMPREC, matcher=None) -> str | None:
    """None when Structure -> WyckoffCrystal -> Structure matches the original, else the failure reason.

    Reasons: 'disorder', 'symmetry_detection', 'setting' (from `from_structure`) or 'symmetrization_mismatch'
    (the crystal symmetrised at `symprec` no longer matches the input under StructureMatcher's default tolerances).
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    try:
        rebuilt = WyckoffCrystal.from_structure(structure, symprec=symprec).as_structure(primitive=True)
    except WyckoffError as exc:
        return exc.reason
    return None if (matcher or StructureMatcher()).fit(structure, rebuilt) else "symmetrization_mismatch"


def _roundtrip_worker(args) -> str | None:
    structure, symprec = args
    return roundtrip_failure(structure, symprec)


def roundtrip_failures(structures, symprec: float = DEFAULT_SYMPREC, processes: int | None = None,
                       progress: bool = False) -> list[str | None]:
    """`roundtrip_failure` for many structures, in parallel worker processes, with an optional progress bar."""
    from wyckoff_lab.core.parallel import parallel_map

    symprec = check_tolerance(symprec)
    return parallel_map(_roundtrip_worker, [(s, symprec) for s in structures], workers=processes,
                        progress=progress, desc="round trip", unit="structure")
