"""Relax → hull → S.U.N.: candidates relaxed as the hull references are, one ML hull per chemical system built once
and shared, every candidate placed on its hull, and S.U.N. counted under each paper's protocol."""

from __future__ import annotations

import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Structure
from tqdm import tqdm

from wyckoff_lab.core.hull import DEFAULT_MAX_REFERENCES, USABLE_STATUSES, HullReference
from wyckoff_lab.core.metrics import (
    SUN_PROTOCOLS,
    ReferenceIndex,
    SunFlags,
    SunProtocol,
    stability_flags,
    sun_metrics,
    sun_protocols,
)
from wyckoff_lab.core.paths import DataUnavailableError
from wyckoff_lab.core.relax import LoadedPotential, PotentialError, RelaxResult, relax
from wyckoff_lab.core.structures import primitive_cell

# Candidates and hull references must be relaxed alike; these are the defaults of relax() and HullReference.build.
FMAX_EV_PER_A = 0.05
MAX_STEPS = 500
HULL_DATASET = "mp_20"
# relax() batches everything it is given; chunks this size (two model batches) let a progress bar move, at the
# cost of a little batching where a chunk's last structures still relax alone.
RELAX_CHUNK = 64
# Matra-Genoa's Table I thresholds (eV/atom): S.U.N. counted below each.
SUN_WITHIN_EV = (0.001, 0.05, 0.1)
HULL_ERRORS = (ValueError, DataUnavailableError, PotentialError)  # a system's hull failing spares the others


def progress_bar(total: int, desc: str, unit: str, progress: bool):
    """A tqdm bar on stderr, shown only when `progress`."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress, leave=False)


class RelaxBar:
    """A tqdm bar on stderr fed by relax()'s `progress(done, total, step)` (directly, or for relaxations made in
    other modules through `relax.relax_progress(bar)`): structures finished of those in the current relax() call,
    and its FIRE step. A call with another total (the next relax()) starts the bar again."""

    def __init__(self, desc: str, enabled: bool, unit: str = "crystal"):
        self.desc, self.enabled, self.unit = desc, enabled, unit
        self.bar = None

    def __call__(self, done: int, total: int, step: int) -> None:
        if not self.enabled:
            return
        if self.bar is None or self.bar.total != total:
            self.close()
            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.set_postfix_str(f"FIRE step {step}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def chemical_system(structure: Structure) -> tuple[str, ...]:
    """Sorted element symbols: the key of a hull."""
    return tuple(sorted(el.symbol for el in structure.composition.elements))


# -- relaxation -----------------------------------------------------------------------------------------------------


@dataclass
class Relaxation:
    """One RelaxResult per structure given (failures included, with their status) and the wall time."""

    results: list[RelaxResult]
    seconds: float

    @property
    def usable(self) -> list[bool]:
        """Converged, or an unconverged upper bound: what the hull takes."""
        return [r.status in USABLE_STATUSES for r in self.results]

    @property
    def structures(self) -> list[Structure]:
        """The relaxed structure of each usable result, the input one where the relaxation failed."""
        return [r.final if ok else r.initial for r, ok in zip(self.results, self.usable)]

    def as_dict(self) -> dict:
        statuses = Counter(r.status for r in self.results)
        return {"relaxed": sum(self.usable), "converged": statuses["converged"], "relax_status": dict(statuses),
                "relax_s": round(self.seconds, 2)}


def relax_candidates(structures: Sequence[Structure], potential: LoadedPotential, fmax: float = FMAX_EV_PER_A,
                     max_steps: int = MAX_STEPS, primitive: bool = True, chunk: int = RELAX_CHUNK,
                     progress: bool = False, desc: str = "relaxing", fix_symmetry: bool = False,
                     on_result=None) -> Relaxation:
    """relax() in chunks of `chunk` (a progress bar moves between them), with the hull references' settings.

    `fix_symmetry`: under ASE's FixSymmetry (space group kept). `on_result(i, result)` as each structure i
    (index into `structures`) has its result, for callers that store and show results one by one.

    With `primitive` each structure is relaxed in its primitive cell: generators write conventional cells (PyXtal's
    reach 80 atoms for 20 in the primitive cell), the potential's cost grows with the atoms, and energy per atom,
    hull distance, uniqueness and novelty do not depend on the cell chosen.
    """
    results: list[RelaxResult] = []
    start = time.perf_counter()
    bar = progress_bar(len(structures), desc, "crystal", progress)
    for first in range(0, len(structures), chunk):
        part = [primitive_cell(s) if primitive else s for s in structures[first:first + chunk]]
        report = None if on_result is None else (lambda i, result, first=first: on_result(first + i, result))
        results += relax(part, potential, fmax, max_steps, fix_symmetry=fix_symmetry, on_result=report)
        bar.update(len(part))
    bar.close()
    return Relaxation(results, time.perf_counter() - start)


# -- hulls ----------------------------------------------------------------------------------------------------------


class HullBook:
    """The ML hulls of one potential and one set of relaxation settings, one per chemical system, each built (or
    read from the hull cache) on first need and then shared by every caller.

    References are the dataset's phases of all splits relaxed like the candidates, so candidates and references
    share one energy scale. A system whose hull cannot be built keeps its error, raised again on every `get`.
    """

    def __init__(self, potential: LoadedPotential, max_references: int | None = DEFAULT_MAX_REFERENCES,
                 dataset: str = HULL_DATASET, fmax: float = FMAX_EV_PER_A, max_steps: int = MAX_STEPS):
        self.potential = potential
        self.max_references = max_references
        self.dataset = dataset
        self.fmax = fmax
        self.max_steps = max_steps
        self.seconds: dict[tuple[str, ...], float] = {}  # wall time of each build (or hull-cache load)
        self._hulls: dict[tuple[str, ...], HullReference | Exception] = {}

    def get(self, elements: Sequence[str], before_relax=None) -> HullReference:
        """The hull of `elements` (any order); raises the build's error (ValueError, DataUnavailableError,
        PotentialError). `before_relax` goes to `HullReference.build` the first time."""
        elements = tuple(sorted(elements))
        if elements not in self._hulls:
            start = time.perf_counter()
            try:
                hull = HullReference.build(elements, self.potential, dataset=self.dataset, split="all",
                                           max_references=self.max_references, fmax=self.fmax,
                                           max_steps=self.max_steps, before_relax=before_relax)
            except HULL_ERRORS as exc:
                hull = exc
            self._hulls[elements] = hull
            self.seconds[elements] = time.perf_counter() - start
        hull = self._hulls[elements]
        if isinstance(hull, Exception):
            raise hull
        return hull

    def relax(self, structures: Sequence[Structure], primitive: bool = True, progress: bool = False,
              desc: str = "relaxing", max_steps: int | None = None) -> Relaxation:
        """`relax_candidates` with this book's potential and settings (`max_steps` may shorten it, e.g. for
        `bench recover`, whose results then go on no hull)."""
        return relax_candidates(structures, self.potential, self.fmax, self.max_steps if max_steps is None
                                else max_steps, primitive, progress=progress, desc=desc)

    def as_dict(self) -> dict:
        from_cache = sum(h.from_cache for h in self._hulls.values() if isinstance(h, HullReference))
        return {"hull_systems": len(self.seconds), "hull_systems_from_cache": from_cache,
                "hull_total_s": round(sum(self.seconds.values()), 2)}


@dataclass
class HullPlacement:
    """E_hull (eV/atom) per relaxation result, NaN where the relaxation or its system's hull failed."""

    e_above_hull: list[float]
    systems: list[tuple[str, ...]]  # chemical systems of the usable results
    failures: dict[str, str]  # "A-B-C" -> why its hull could not be built
    n_hull_failed: int  # usable results left without E_hull by those failures
    hull_s: float = 0.0  # time the hulls of these systems took (a shared hull counts for every placement using it)

    def as_dict(self) -> dict:
        return {"hull_systems": len(self.systems), "hull_s": round(self.hull_s, 2),
                "hull_failed": self.n_hull_failed, "hull_failures": self.failures}


def place_on_hulls(results: Sequence[RelaxResult], book: HullBook, progress: bool = False) -> HullPlacement:
    """Group the usable results by chemical system and place each group on its system's hull from `book`."""
    by_system: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, result in enumerate(results):
        if result.status in USABLE_STATUSES:
            by_system[chemical_system(result.final)].append(i)
    e_above_hull = [math.nan] * len(results)
    failures: dict[str, str] = {}
    n_failed = 0
    for system, members in tqdm(by_system.items(), desc="hulls", unit="chemsys", file=sys.stderr,
                                disable=not progress, leave=False):
        try:
            points = book.get(system).e_above_hull([results[i] for i in members])
        except HULL_ERRORS as exc:
            failures["-".join(system)] = str(exc)
            n_failed += len(members)
            continue
        for i, point in zip(members, points):
            e_above_hull[i] = math.nan if point.e_above_hull is None else float(point.e_above_hull)
    return HullPlacement(e_above_hull, list(by_system), failures, n_failed,
                         sum(book.seconds.get(system, 0.0) for system in by_system))


@dataclass
class Placed:
    """Candidates relaxed and placed on their hulls: `structures` (relaxed, or as given where the relaxation
    failed) and `e_above_hull` line up with the input, one entry per structure given."""

    relaxation: Relaxation
    placement: HullPlacement

    @property
    def structures(self) -> list[Structure]:
        return self.relaxation.structures

    @property
    def e_above_hull(self) -> list[float]:
        return self.placement.e_above_hull

    def as_dict(self) -> dict:
        return self.relaxation.as_dict() | self.placement.as_dict()


def relax_and_place(structures: Sequence[Structure], book: HullBook, progress: bool = False,
                    desc: str = "relaxing") -> Placed:
    """Relax every structure (primitive cell, the book's settings) and place it on its chemical system's hull."""
    relaxation = book.relax(structures, progress=progress, desc=desc)
    return Placed(relaxation, place_on_hulls(relaxation.results, book, progress))


# -- S.U.N. ---------------------------------------------------------------------------------------------------------


@dataclass
class SunSummary:
    """S.U.N.-type counts of one set of (relaxed) structures: ours at the top level (`metrics.sun_metrics`), each
    protocol of `metrics.SUN_PROTOCOLS` labelled under `protocols`, and the E_hull distribution."""

    n: int
    n_struct_valid: int
    n_unique: int  # among the structurally valid
    n_novel: int  # of those unique
    e_above_hull: np.ndarray
    ours: dict  # metrics.sun_metrics
    n_sun_within_ev: dict[str, int]
    protocols: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        known = self.e_above_hull[np.isfinite(self.e_above_hull)]
        return {"n": self.n, "n_struct_valid": self.n_struct_valid, "n_unique": self.n_unique,
                "n_novel": self.n_novel, "n_e_above_hull": len(known),
                **{k: self.ours[k] for k in ("sun_rate", "n_sun", "msun_rate", "n_msun", "stable_rate",
                                             "metastable_rate", "vsun_rate", "n_vsun")},
                "e_above_hull_mean": float(known.mean()) if len(known) else math.nan,
                "e_above_hull_median": float(np.median(known)) if len(known) else math.nan,
                "n_sun_within_ev": self.n_sun_within_ev,
                "e_above_hull_quantiles": ({str(q): float(np.quantile(known, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
                                           if len(known) else {}),
                "sun_protocols": self.protocols}


def sun_summary(structures: Sequence[Structure], e_above_hull: Sequence[float],
                reference: ReferenceIndex | Sequence[Structure], matcher=None,
                protocols: Sequence[SunProtocol] = SUN_PROTOCOLS) -> SunSummary:
    """S.U.N., M.S.U.N. and V.S.U.N. of (relaxed) structures, ours as `metrics.evaluate` counts them, and each
    named protocol beside it.

    Ours: structural validity on all; uniqueness among the structurally valid; novelty against `reference`; then
    `metrics.sun_metrics` (stable: E_hull <= 0, metastable: < 0.1 eV/atom, both with at least two elements), whose
    rates are fractions of all structures. NaN energies (failed relaxations or hulls) count as unstable. Also the
    E_hull distribution over the structures that have one and S.U.N. counts below each of SUN_WITHIN_EV.
    """
    n = len(structures)
    e = np.asarray(e_above_hull, dtype=float)
    if len(e) != n:
        raise ValueError(f"{len(e)} energies above hull for {n} structures")
    flags = SunFlags(structures, reference, matcher)
    unique = flags.unique_among(flags.struct_valid)
    novel = unique & flags.novel
    ours = sun_metrics(e, struct_valid=flags.struct_valid, comp_valid=flags.comp_valid, unique=unique, novel=novel,
                       n_elements=flags.n_elements)
    un = flags.struct_valid & novel
    within = {str(t): int((un & stability_flags(e, flags.n_elements, t, inclusive=False)).sum())
              for t in SUN_WITHIN_EV}
    return SunSummary(n, int(flags.struct_valid.sum()), int(unique.sum()), int(novel.sum()), e, ours, within,
                      sun_protocols(flags, e, protocols))

