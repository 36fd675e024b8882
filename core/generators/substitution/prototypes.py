"""Known crystals as prototypes for ion exchange: their compositions, oxidation states and space groups, per size."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Element, Species

from wyckoff_lab.core.compositions import needs_charge_balance, oxidation_states

# Datasets whose structures may serve as prototypes (the 36k MP set without MP-20's held-out systems).
PROTOTYPE_SETS = ("mp_20", "mp_36k")


@dataclass(frozen=True)
class Prototype:
    """One known crystal as a prototype: its row, its elements in cell order, each element's count in the stored
    cell and the species (element with oxidation state, or a metal's nominal cation in an alloy) that the
    substitution probabilities are looked up for."""

    source: str  # dataset name
    row: int
    material_id: str
    elements: tuple[str, ...]
    counts: tuple[int, ...]
    species: tuple[str, ...]  # "Li+", "O2-" ...; for an alloy the nominal cations ("Al3+", "Cu2+")
    alloy: bool
    spacegroup: int
    n_sites: int

    @property
    def chemical_system(self) -> tuple[str, ...]:
        return tuple(sorted(self.elements))


def species_string(element: str, oxidation: int) -> str:
    return str(Species(element, oxidation))


def neutral_assignments(elements: tuple[str, ...], counts: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every choice of one oxidation state per element (`compositions.oxidation_states`) whose charges sum to zero
    over these counts, those using more of pymatgen's *common* states first."""
    states = [oxidation_states(el) for el in elements]
    if not all(states):
        return []
    found = [combo for combo in itertools.product(*states) if sum(c * s for c, s in zip(counts, combo)) == 0]
    common = [set(Element(el).common_oxidation_states) for el in elements]
    return sorted(found, key=lambda combo: -sum(s in c for s, c in zip(combo, common)))


def nominal_cation(element: str, table_species: frozenset[str]) -> str | None:
    """The species a metal stands for in an alloy: its highest common positive oxidation state the substitution
    table knows (else any positive state it knows). The table is of ionic crystals; a metal's nominal cation is
    the nearest it has to that metal's chemistry (Al3+ for Al, Cu2+ for Cu)."""
    el = Element(element)
    for states in (el.common_oxidation_states, el.icsd_oxidation_states, el.oxidation_states):
        for state in sorted((s for s in states if s > 0), reverse=True):
            if species_string(element, state) in table_species:
                return species_string(element, state)
    return None


@functools.cache
def table_species() -> frozenset[str]:
    """The species pymatgen's data-mined substitution table (Hautier et al. 2011, ICSD) has probabilities for."""
    return frozenset(str(s) for s in substitution_table().species)


@functools.cache
def substitution_table():
    from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionProbability

    return SubstitutionProbability()


def prototype_of(source: str, row: int, material_id: str, formula: str, spacegroup: int, n_sites: int
                 ) -> Prototype | None:
    """The prototype of one dataset row, or None where no species can be assigned (no neutral oxidation states in
    an ionic crystal, or an element the substitution table lacks)."""
    composition = Composition(formula)
    elements = tuple(el.symbol for el in composition.elements)
    counts = tuple(int(round(composition[el])) for el in elements)
    known = table_species()
    if not needs_charge_balance(elements):
        species = tuple(nominal_cation(el, known) for el in elements)
        alloy = True
    else:
        species = None
        for combo in neutral_assignments(elements, counts):
            candidate = tuple(species_string(el, s) for el, s in zip(elements, combo))
            if all(s in known for s in candidate):
                species = candidate
                break
        alloy = False
    if species is None or None in species:
        return None
    return Prototype(source, row, material_id, elements, counts, species, alloy, int(spacegroup), int(n_sites))


@functools.cache
def _prototypes(source: str, data_folder: Path) -> tuple[Prototype, ...]:
    dataset = _dataset(source)
    sites = np.diff(dataset.offsets)
    found = []
    for row, (material_id, spacegroup) in enumerate(zip(dataset.frame["material_id"], dataset.frame["spacegroup"])):
        prototype = prototype_of(source, row, str(material_id), _cell_formula(dataset, row), int(spacegroup),
                                 int(sites[row]))
        if prototype is not None:
            found.append(prototype)
    return tuple(found)


def _cell_formula(dataset, row: int) -> str:
    """The formula of the stored cell (not reduced: counts must be those of the cell that is substituted)."""
    numbers = dataset.atomic_numbers[dataset.offsets[row]:dataset.offsets[row + 1]]
    values, counts = np.unique(numbers, return_counts=True)
    return " ".join(f"{Element.from_Z(int(z)).symbol}{int(c)}" for z, c in zip(values, counts))


def prototypes(source: str) -> tuple[Prototype, ...]:
    """Every usable prototype of `source` ("mp_20": MP-20 train; "mp_36k": the 36k MP rows MP-20 training may
    add), cached per data folder."""
    from wyckoff_lab.core.paths import data_dir

    if source not in PROTOTYPE_SETS:
        raise ValueError(f"unknown prototype set {source!r}; choose from {', '.join(PROTOTYPE_SETS)}")
    return _prototypes(source, data_dir())


def structure_of(prototype: Prototype):
    """The prototype's stored structure (as in its dataset)."""
    return _dataset(prototype.source).structure(prototype.row)


def _dataset(source: str):
    from wyckoff_lab.core.paths import data_dir

    return _loaded(source, data_dir())


@functools.cache
def _loaded(source: str, data_folder: Path):
    """The prototype set's dataset, kept in this process (reading it back from the cache costs seconds)."""
    from wyckoff_lab.core.datasets import load_dataset, mp36k_training_rows

    return load_dataset("mp_20", "train") if source == "mp_20" else mp36k_training_rows()
