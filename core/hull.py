"""Convex hulls of ML energies: dataset reference phases relaxed with the same potential and settings as candidates."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.data import covalent_radii
from monty.json import MontyEncoder
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Element, Lattice, Structure

from wyckoff_lab.core.paths import cache_dir, entry_field, file_digest, read_cache_entry, write_cache_entry
from wyckoff_lab.core.relax import (
    STATUSES,
    LoadedPotential,
    RelaxResult,
    cached_flags,
    check_relax_settings,
    relax,
    resolve_potential,
)

log = logging.getLogger(__name__)

# 2: entries carry this version, and only hulls whose every reference relaxation succeeded are cached.
# 3: the phase diagram is stored as pymatgen's own PhaseDiagram.as_dict() beside the references, so a cached hull
#    is read back with PhaseDiagram.from_dict (no new convex hull computed).
HULL_CACHE_VERSION = 3
DEFAULT_MAX_REFERENCES = 3
USABLE_STATUSES = ("converged", "not_converged")  # an unconverged relaxation still gives an upper-bound energy
# Elements that form diatomic molecules; an fcc crystal of single atoms would be a far too high reference for them.
DIATOMIC = ("H", "N", "O", "F", "Cl", "Br", "I")
MOLECULE_BOX_A = 7.0  # cubic box edge for an isolated dimer: longer than CHGNet's and MatterSim's 5 Å cutoffs allow
# Wall time per reference relaxation not yet cached, for the estimate before a build: `bench sun` relaxed ~4,500
# MP-20 references (≤ 500 FIRE steps, CHGNet) in 92 min on the 2-core CPU. A GPU is faster; not measured here.
SECONDS_PER_REFERENCE_CPU = 1.2


class InconsistentEnergiesError(ValueError):
    """Energies from different potentials (or checkpoints) were about to be put on one hull."""


@dataclass(frozen=True)
class HullSettings:
    """Everything that fixes the reference energies besides the structures: the potential and relaxation settings."""

    potential_identity: str
    fmax: float  # eV/Å
    max_steps: int
    relax_cell: bool


@dataclass
class ReferencePhase:
    """One reference structure after relaxation with the hull's potential."""

    formula: str  # reduced
    source: str  # dataset material_id, or how an elemental stand-in was built
    dft_formation_energy_per_atom: float  # eV/atom from the dataset (NaN for built elemental stand-ins)
    status: str  # relaxation status; only USABLE_STATUSES enter the hull
    energy: float  # eV, total ML energy of `structure`
    structure: Structure  # relaxed
    e_above_hull: float = math.nan  # eV/atom on the ML hull
    on_hull: bool = False

    @property
    def energy_per_atom(self) -> float:
        return self.energy / len(self.structure)


@dataclass(frozen=True)
class HullPlan:
    """What a hull build is about to do, told before it starts relaxing (see `HullReference.build(before_relax=)`)."""

    elements: tuple[str, ...]
    n_references: int  # reference structures to relax (dataset phases and elemental stand-ins)
    n_uncached: int  # of those, how many have no relaxation in the cache yet
    device: str

    @property
    def estimated_s(self) -> float:
        """Rough wall time of the uncached relaxations (SECONDS_PER_REFERENCE_CPU each; a GPU is faster)."""
        return self.n_uncached * SECONDS_PER_REFERENCE_CPU

    def describe(self) -> str:
        """One line for the user: how many relaxations, how many new, and about how long."""
        minutes = self.estimated_s / 60
        when = f"about {minutes:.0f} min" if minutes >= 1 else f"about {self.estimated_s:.0f} s"
        where = "on CPU" if self.device == "cpu" else f"at CPU speed (faster on {self.device})"
        return (f"hull {'-'.join(self.elements)}: {self.n_references} reference relaxations, {self.n_uncached} not "
                f"cached yet ({when} {where})")


@dataclass(frozen=True)
class DiagramPlacement:
    """Where one composition and total energy lie on a phase diagram (see `place_entry`)."""

    e_above_hull: float  # eV/atom, negative below the hull
    formation_energy_per_atom: float  # eV/atom against the diagram's elemental references
    decomposition: dict[str, float]  # reduced formula -> fraction of atoms in the competing phase mixture


def place_entry(diagram: PhaseDiagram, composition: Composition, energy: float) -> DiagramPlacement:
    """E_hull, formation energy and decomposition of `composition` at total energy `energy` (eV) on `diagram`."""
    entry = PDEntry(composition, energy)
    decomposition, e_above_hull = diagram.get_decomp_and_e_above_hull(entry, allow_negative=True)
    return DiagramPlacement(float(e_above_hull), float(diagram.get_form_energy_per_atom(entry)),
                            {e.composition.reduced_formula: float(f) for e, f in decomposition.items()})


def diagram_dict(diagram: PhaseDiagram) -> dict:
    """pymatgen's `PhaseDiagram.as_dict()` as plain JSON types (it holds numpy integers); `PhaseDiagram.from_dict`
    reads it back without computing the hull again."""
    return json.loads(json.dumps(diagram.as_dict(), cls=MontyEncoder))


def tie_lines(diagram: PhaseDiagram) -> list[tuple[dict[str, float], dict[str, float]]]:
    """Pairs of stable phases joined by a facet of the hull, as composition dicts (the lines a diagram draws)."""
    edges = {(min(i, j), max(i, j)) for facet in diagram.facets for i, j in itertools.combinations(facet, 2)}
    entries = diagram.qhull_entries
    return [(entries[i].composition.as_dict(), entries[j].composition.as_dict()) for i, j in sorted(edges)]


@dataclass
class HullPoint:
    """A candidate placed on the hull. e_above_hull is negative when it lies below every reference combination."""

    formula: str
    energy_per_atom: float  # eV/atom (ML, relaxed)
    e_above_hull: float | None  # eV/atom; None when the relaxation failed (see status)
    decomposition: dict[str, float]  # reference formula -> fraction of atoms in the competing phase mixture
    status: str
    result: RelaxResult


def elemental_structure(symbol: str) -> tuple[Structure, str]:
    """A starting structure for an element the dataset lacks, and a note saying how it was made.

    ASE's `bulk(symbol)` reference crystal where ASE has one; a dimer (bond = 2 covalent radii) in a 7 Å box for
    H, N, O, F, Cl, Br, I; otherwise an fcc guess with touching spheres, a = 2√2 r from pymatgen's atomic radius.
    Relaxation then moves each to the potential's own minimum near that start.
    """
    if symbol in DIATOMIC:
        bond = 2 * covalent_radii[Element(symbol).Z]
        box = Lattice.cubic(MOLECULE_BOX_A)
        return Structure(box, [symbol, symbol], [[0, 0, 0], [bond, 0, 0]], coords_are_cartesian=True), (
            f"{symbol}2 dimer in a {MOLECULE_BOX_A:g} Å box"
        )
    try:
        atoms = bulk(symbol)
        return Structure(atoms.cell.array, atoms.get_chemical_symbols(), atoms.positions, coords_are_cartesian=True), (
            f"ase.build.bulk('{symbol}')"
        )
    except (ValueError, RuntimeError):  # ASE has no simple reference crystal for this element
        radius = Element(symbol).atomic_radius or 1.5
        a = 2 * math.sqrt(2) * float(radius)
        primitive_fcc = Lattice([[0, a / 2, a / 2], [a / 2, 0, a / 2], [a / 2, a / 2, 0]])
        return Structure(primitive_fcc, [symbol], [[0, 0, 0]]), f"fcc guess a={a:.2f} Å from atomic radius"


def _parse_elements(elements: Iterable[str]) -> tuple[str, ...]:
    symbols = sorted({e.strip() for e in elements if e.strip()})
    if not symbols:
        raise ValueError("no elements given")
    unknown = [s for s in symbols if not Element.is_valid_symbol(s)]
    if unknown:
        raise ValueError(f"unknown element(s): {', '.join(unknown)}")
    return tuple(symbols)


def _select_references(
    elements: Sequence[str], dataset: str, split: str, max_references: int | None
) -> list[tuple[Structure, str, str, float]]:
    """(structure, formula, material_id, DFT formation energy) of dataset rows inside the chemical system.

    With max_references, only the N polymorphs per reduced formula with the lowest DFT formation energy are kept:
    the ML potential may order close polymorphs differently, so a few are relaxed, but not dozens.
    """
    from wyckoff_lab.core.datasets import load_dataset

    ds = load_dataset(dataset, split)
    rows = ds.frame.iloc[ds.indices_in_chemsys(elements)]
    rows = rows.sort_values("formation_energy_per_atom", na_position="last", kind="stable")
    if max_references is not None:
        rows = rows.groupby("formula", sort=False).head(max_references)
    return [
        (ds.structure(int(i)), row.formula, str(row.material_id), float(row.formation_energy_per_atom))
        for i, row in rows.iterrows()
    ]


def _hull_cache_path(elements, dataset, split, max_references, settings: HullSettings) -> Path:
    from wyckoff_lab.core.datasets import DATASETS

    spec = DATASETS[dataset]
    splits = spec.available_splits() if split == "all" else (split,)
    key = {
        "version": HULL_CACHE_VERSION,
        "elements": list(elements),
        "dataset": dataset,
        "split": split,
        "sources": [file_digest(spec.source_file(s)) for s in splits],  # new data files invalidate the entry
        "max_references": max_references,
        "settings": asdict(settings),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "hull" / f"{'-'.join(elements)}_{digest[:16]}.json"


@dataclass
class HullReference:
    """The convex hull of one chemical system from ML-relaxed reference phases (build it with `HullReference.build`).

    All references are relaxed once with one potential and one set of relaxation settings; candidates are then
    relaxed with the same ones, so every energy on the hull comes from the same model (see `e_above_hull`).
    """

    elements: tuple[str, ...]
    potential: LoadedPotential
    settings: HullSettings
    references: list[ReferencePhase]
    diagram: PhaseDiagram
    relax_time_s: float  # wall time spent relaxing references (0 when loaded from the hull cache)
    total_time_s: float  # including dataset loading and building the phase diagram
    from_cache: bool

    @classmethod
    def build(
        cls,
        elements: Iterable[str],
        potential: str | None | LoadedPotential = None,
        dataset: str = "mp_20",
        split: str = "all",
        max_references: int | None = DEFAULT_MAX_REFERENCES,
        fmax: float = 0.05,
        max_steps: int = 500,
        relax_cell: bool = True,
        device: str | None = None,
        cache: bool = True,
        before_relax: Callable[[HullPlan], None] | None = None,
    ) -> HullReference:
        """Relax the dataset's phases within `elements` (all subsystems, elements included) and build the hull.

        Elements without a dataset phase get a built stand-in (see `elemental_structure`). `max_references` keeps
        the N lowest-DFT-formation-energy polymorphs per formula (None = all). Reference energies are cached per
        (chemical system, dataset files, max_references, potential identity, relaxation settings), but only when
        every reference relaxation succeeded: a failure may be transient, and a later build must retry it.
        `before_relax(plan)` is called before any reference is relaxed (not for a cached hull); it may raise to stop.
        """
        from wyckoff_lab.core.datasets import dataset_spec

        t0 = time.perf_counter()
        elements = _parse_elements(elements)
        dataset_spec(dataset).check_split(split)  # before anything can try to download a split that does not exist
        fmax, max_steps = check_relax_settings(fmax, max_steps)
        pot = resolve_potential(potential, device)
        settings = HullSettings(pot.identity, fmax, max_steps, relax_cell)
        path = _hull_cache_path(elements, dataset, split, max_references, settings) if cache and pot.cacheable else None
        cached = _read_hull(path)
        from_cache = cached is not None
        relax_time_s = 0.0
        if from_cache:
            references, diagram = cached
        else:
            candidates = _select_references(elements, dataset, split, max_references)
            present = {str(el) for s, *_ in candidates for el in s.composition.elements if len(s.composition) == 1}
            for symbol in elements:
                if symbol not in present:
                    structure, note = elemental_structure(symbol)
                    log.info("no %s phase in %s/%s: using %s", symbol, dataset, split, note)
                    candidates.append((structure, symbol, note, math.nan))
            if before_relax is not None:
                cached = cached_flags([c[0] for c in candidates], pot, fmax, max_steps, relax_cell) if cache \
                    else [False] * len(candidates)
                before_relax(HullPlan(elements, len(candidates), len(candidates) - sum(cached), pot.device))
            t_relax = time.perf_counter()
            results = relax([c[0] for c in candidates], pot, fmax, max_steps, relax_cell, cache=cache)
            relax_time_s = time.perf_counter() - t_relax
            references = [
                ReferencePhase(formula, source, ef, r.status, r.energy, r.final)
                for (_, formula, source, ef), r in zip(candidates, results)
            ]
            diagram = _phase_diagram(elements, references)
            failed = [r for r in references if r.status not in USABLE_STATUSES]
            if failed:
                # Left out of this hull, but not pinned: the next build retries them. The relax cache keeps the
                # deterministic failures (exploded, ...), so that costs only the "error"s, which may have been
                # passing (out of memory): those are worth a warning, the others are the same every time.
                level = logging.WARNING if any(r.status == "error" for r in failed) else logging.INFO
                log.log(level, "%d of %d reference relaxations failed (%s); this %s hull is not cached", len(failed),
                        len(references), ", ".join(f"{r.formula} {r.source}: {r.status}" for r in failed[:5]),
                        "-".join(elements))
            else:
                _write_hull(path, references, diagram)
        return cls(elements, pot, settings, references, diagram, relax_time_s, time.perf_counter() - t0, from_cache)

    def e_above_hull(self, candidates: Iterable[Structure | RelaxResult]) -> list[HullPoint]:
        """Place candidates on the hull. Structures are relaxed here with the hull's potential and settings;
        RelaxResults are taken as they are (e.g. unrelaxed single points) but must come from the same potential
        identity: anything else raises InconsistentEnergiesError. Candidates with other elements raise ValueError.
        """
        candidates = list(candidates)
        for c in candidates:
            if isinstance(c, RelaxResult) and c.potential_identity != self.settings.potential_identity:
                raise InconsistentEnergiesError(
                    f"candidate energy from {c.potential_identity!r} cannot go on a hull built with "
                    f"{self.settings.potential_identity!r}; relax it with the hull's potential"
                )
            structure = c.final if isinstance(c, RelaxResult) else c
            outside = {str(el) for el in structure.composition.elements} - set(self.elements)
            if outside:
                raise ValueError(
                    f"{structure.composition.reduced_formula} has {', '.join(sorted(outside))}, outside the "
                    f"{'-'.join(self.elements)} hull"
                )
        to_relax = [c for c in candidates if not isinstance(c, RelaxResult)]
        s = self.settings
        relaxed = iter(relax(to_relax, self.potential, s.fmax, s.max_steps, s.relax_cell)) if to_relax else iter(())
        results = [c if isinstance(c, RelaxResult) else next(relaxed) for c in candidates]
        return [self._place(r) for r in results]

    def _place(self, result: RelaxResult) -> HullPoint:
        formula = result.final.composition.reduced_formula
        if result.status not in USABLE_STATUSES:
            return HullPoint(formula, result.energy_per_atom, None, {}, result.status, result)
        placed = place_entry(self.diagram, result.final.composition, result.energy)
        return HullPoint(formula, result.energy_per_atom, placed.e_above_hull, placed.decomposition, result.status,
                         result)

    def summary(self) -> dict:
        """JSON-ready description of the hull: settings, timings and the reference list."""
        return {
            "elements": list(self.elements),
            "potential": self.potential.name,
            "potential_identity": self.settings.potential_identity,
            "fmax_eV_per_A": self.settings.fmax,
            "max_steps": self.settings.max_steps,
            "relax_cell": self.settings.relax_cell,
            "n_references": len(self.references),
            "n_on_hull": sum(r.on_hull for r in self.references),
            "relax_time_s": self.relax_time_s,
            "total_time_s": self.total_time_s,
            "from_cache": self.from_cache,
            "references": [
                {
                    "formula": r.formula,
                    "source": r.source,
                    "status": r.status,
                    "energy_per_atom_eV": r.energy_per_atom if math.isfinite(r.energy) else None,
                    "e_above_hull_eV": r.e_above_hull if math.isfinite(r.e_above_hull) else None,
                    "on_hull": r.on_hull,
                    "dft_formation_energy_per_atom_eV": (
                        r.dft_formation_energy_per_atom if math.isfinite(r.dft_formation_energy_per_atom) else None
                    ),
                }
                for r in self.references
            ],
        }


def _phase_diagram(elements: Sequence[str], references: list[ReferencePhase]) -> PhaseDiagram:
    """PhaseDiagram of the usable references (total ML energies); fills each reference's on_hull and e_above_hull."""
    usable = [r for r in references if r.status in USABLE_STATUSES]
    covered = {str(el) for r in usable if len(r.structure.composition) == 1 for el in r.structure.composition}
    missing = [e for e in elements if e not in covered]
    if missing:
        raise ValueError(f"no usable elemental reference for {', '.join(missing)} (their relaxations failed)")
    entries = [PDEntry(r.structure.composition, r.energy, name=r.source) for r in usable]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about elements without electronegativity data
        diagram = PhaseDiagram(entries, elements=[Element(e) for e in elements])
    _mark_on_hull(usable, entries, diagram)
    return diagram


def _mark_on_hull(usable: list[ReferencePhase], entries: list[PDEntry], diagram: PhaseDiagram) -> None:
    """Fill e_above_hull and on_hull of the usable references from their entries (same order) on `diagram`."""
    for reference, entry in zip(usable, entries, strict=True):
        reference.e_above_hull = float(diagram.get_e_above_hull(entry))
        reference.on_hull = bool(np.isclose(reference.e_above_hull, 0.0, atol=1e-6))


def _read_hull(path: Path | None) -> tuple[list[ReferencePhase], PhaseDiagram] | None:
    def parse(data: dict) -> tuple[list[ReferencePhase], PhaseDiagram]:
        rows = entry_field(data, "references", list)
        if not rows:
            raise ValueError("no references")
        references = []
        for row in rows:
            if not isinstance(row, dict):
                raise ValueError(f"a reference is a {type(row).__name__}, not an object")
            status = entry_field(row, "status", str)
            if status not in USABLE_STATUSES:  # such hulls are never written: this one is not ours
                raise ValueError(f"reference status {status!r}" + ("" if status in STATUSES else " is unknown"))
            references.append(ReferencePhase(
                entry_field(row, "formula", str), entry_field(row, "source", str),
                entry_field(row, "dft_formation_energy_per_atom", float), status, entry_field(row, "energy", float),
                Structure.from_dict(entry_field(row, "structure", dict)),
            ))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            diagram = PhaseDiagram.from_dict(entry_field(data, "diagram", dict))
        # PhaseDiagram keeps its own order of entries: each reference finds its own by name and energy.
        by_key = {(e.name, e.energy): e for e in diagram.all_entries}
        missing = [r.source for r in references if (r.source, r.energy) not in by_key]
        if missing or len(by_key) != len(references):
            raise ValueError(f"references and diagram entries differ ({', '.join(missing[:3]) or 'in number'})")
        _mark_on_hull(references, [by_key[r.source, r.energy] for r in references], diagram)
        return references, diagram

    return read_cache_entry(path, HULL_CACHE_VERSION, parse, "hull cache entry")


def _write_hull(path: Path | None, references: list[ReferencePhase], diagram: PhaseDiagram) -> None:
    rows = [
        {
            "formula": r.formula,
            "source": r.source,
            "dft_formation_energy_per_atom": r.dft_formation_energy_per_atom,
            "status": r.status,
            "energy": r.energy,
            "structure": r.structure.as_dict(),
        }
        for r in references
    ]
    write_cache_entry(path, HULL_CACHE_VERSION, {"references": rows, "diagram": diagram_dict(diagram)})
