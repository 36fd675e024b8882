"""The pieces of `wyckoff-lab bench sun` and `bench recover`: sampling to a fixed count, relaxing, ML hulls shared
across generators, S.U.N. counting, held-out chemical systems of MP-20 and the recovery of their known structures."""

from __future__ import annotations

import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pymatgen.core import Structure
from tqdm import tqdm

from wyckoff_lab.core.generators import Candidate, Conditions, Generator
from wyckoff_lab.core.hull import USABLE_STATUSES, HullReference
from wyckoff_lab.core.metrics import (
    ReferenceIndex,
    compositional_validity,
    novel_flags,
    stability_flags,
    structural_validity,
    sun_metrics,
    unique_flags,
)
from wyckoff_lab.core.paths import DataUnavailableError
from wyckoff_lab.core.relax import LoadedPotential, PotentialError, RelaxResult, relax
from wyckoff_lab.core.structures import primitive_cell

# Candidates and hull references must be relaxed alike; these are the defaults of relax() and HullReference.build.
FMAX_EV_PER_A = 0.05
MAX_STEPS = 500
# relax() batches everything it is given; chunks this size (two model batches) let a progress bar move, at the
# cost of a little batching where a chunk's last structures still relax alone.
RELAX_CHUNK = 64
# Failed attempts are asked for again, but at most this many attempts per structure wanted (PyXtal's own cap).
ATTEMPTS_PER_STRUCTURE = 5
MAX_AUTO_SYSTEMS = 5
# `bench recover --relax`: a short relaxation, enough to move a nearly right guess into StructureMatcher's
# tolerances, far too short to turn a wrong one into a known structure.
RECOVER_RELAX_STEPS = 100


def _bar(total: int, desc: str, unit: str, progress: bool):
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress, leave=False)


def chemical_system(structure: Structure) -> tuple[str, ...]:
    """Sorted element symbols: the key of a hull."""
    return tuple(sorted(el.symbol for el in structure.composition.elements))


# -- sampling -------------------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """`n` structures wanted from a generator: what came, what it took, and every failed attempt by reason."""

    candidates: list[Candidate]
    requested: int
    attempts: int
    failures: dict[str, int]
    seconds: float


def sample_structures(generator: Generator, n: int, conditions: Conditions, temperature: float, seed: int,
                      progress: bool = False, desc: str = "sampling") -> Sample:
    """Generate until `n` structures exist, asking again for those lost to failed attempts.

    Budgets and rates then count structures for every generator alike: PyXtal retries inside `generate`, the
    transformer returns fewer structures than sequences. Each new round gets its own seed derived from `seed`;
    after ATTEMPTS_PER_STRUCTURE * n attempts (or a round without a single structure) the sample stays short.
    """
    candidates: list[Candidate] = []
    failures: Counter = Counter()
    attempts, seconds, round_ = 0, 0.0, 0
    bar = _bar(n, desc, "crystal", progress)
    spent = 0  # attempts against the budget: what likelihood ranking leaves out was made on purpose
    while len(candidates) < n and spent < ATTEMPTS_PER_STRUCTURE * n:
        def report(done: int, total: int, have: int = len(candidates)) -> None:
            bar.n = min(n, have + done)
            bar.refresh()

        round_seed = seed if round_ == 0 else int(np.random.SeedSequence([seed, round_]).generate_state(1)[0])
        result = generator.generate(n - len(candidates), conditions, temperature, round_seed, report)
        candidates += result.candidates
        failures.update(result.failures)
        attempts += result.attempts
        spent += result.attempts - result.ranked_out
        seconds += result.seconds
        round_ += 1
        if not result.candidates:
            break
    bar.close()
    return Sample(candidates[:n], n, attempts, dict(failures), seconds)


def merge_samples(samples: Sequence[Sample]) -> Sample:
    """One Sample out of several (e.g. one per chemical system): candidates, counts and failures added up."""
    failures: Counter = Counter()
    for sample in samples:
        failures.update(sample.failures)
    return Sample([c for sample in samples for c in sample.candidates], sum(s.requested for s in samples),
                  sum(s.attempts for s in samples), dict(failures), sum(s.seconds for s in samples))


# -- relaxation and hulls -------------------------------------------------------------------------------------------


def relax_all(structures: Sequence[Structure], potential: LoadedPotential, max_steps: int = MAX_STEPS,
              progress: bool = False, desc: str = "relaxing") -> tuple[list[RelaxResult], float]:
    """relax() in chunks of RELAX_CHUNK (so a progress bar moves); the results and the wall time in seconds.

    Each structure is relaxed in its primitive cell: generators write conventional cells (PyXtal's reach 80 atoms
    for 20 in the primitive cell), the potential's cost grows with the atoms, and energy per atom, hull distance,
    uniqueness and novelty do not depend on the cell chosen.
    """
    results: list[RelaxResult] = []
    start = time.perf_counter()
    bar = _bar(len(structures), desc, "crystal", progress)
    for first in range(0, len(structures), RELAX_CHUNK):
        chunk = [primitive_cell(s) for s in structures[first:first + RELAX_CHUNK]]
        results += relax(chunk, potential, FMAX_EV_PER_A, max_steps)
        bar.update(len(chunk))
    bar.close()
    return results, time.perf_counter() - start


class HullBook:
    """The ML hulls of one run, one per chemical system, built on first need and shared by all generators.

    Every hull uses the run's potential and the candidates' relaxation settings (MP-20 references, all splits),
    so candidates and references share one energy scale. A system whose hull cannot be built keeps its error.
    """

    def __init__(self, potential: LoadedPotential, max_references: int | None):
        self.potential = potential
        self.max_references = max_references
        self.seconds: dict[tuple[str, ...], float] = {}  # wall time of each build (or hull-cache load)
        self.from_cache: dict[tuple[str, ...], bool] = {}
        self._hulls: dict[tuple[str, ...], HullReference | Exception] = {}

    def get(self, elements: tuple[str, ...]) -> HullReference:
        """The hull of `elements`; raises the build's error (ValueError, DataUnavailableError, PotentialError)."""
        if elements not in self._hulls:
            start = time.perf_counter()
            try:
                hull = HullReference.build(elements, self.potential, dataset="mp_20", split="all",
                                           max_references=self.max_references, fmax=FMAX_EV_PER_A,
                                           max_steps=MAX_STEPS)
                self.from_cache[elements] = hull.from_cache
            except (ValueError, DataUnavailableError, PotentialError) as exc:
                hull = exc
            self._hulls[elements] = hull
            self.seconds[elements] = time.perf_counter() - start
        hull = self._hulls[elements]
        if isinstance(hull, Exception):
            raise hull
        return hull


@dataclass
class HullPlacement:
    """E_hull (eV/atom) per relaxation result, NaN where the relaxation or its system's hull failed."""

    e_above_hull: list[float]
    systems: list[tuple[str, ...]]  # chemical systems of the usable results
    failures: dict[str, str]  # "A-B-C" -> why its hull could not be built
    n_hull_failed: int  # usable results left without E_hull by those failures

    def seconds(self, book: HullBook) -> float:
        """Time the hulls of these systems took (shared hulls count for every generator that needs them)."""
        return sum(book.seconds.get(system, 0.0) for system in self.systems)


def place_on_hulls(results: Sequence[RelaxResult], book: HullBook, progress: bool = False) -> HullPlacement:
    """Group usable results (converged, or an unconverged upper bound, as the hull module takes them) by chemical
    system and place each group on its system's hull."""
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
        except (ValueError, DataUnavailableError, PotentialError) as exc:
            failures["-".join(system)] = str(exc)
            n_failed += len(members)
            continue
        for i, point in zip(members, points):
            e_above_hull[i] = math.nan if point.e_above_hull is None else float(point.e_above_hull)
    return HullPlacement(e_above_hull, list(by_system), failures, n_failed)


SUN_WITHIN_EV = (0.001, 0.05, 0.1)


def sun_summary(structures: Sequence[Structure], e_above_hull: Sequence[float],
                reference: ReferenceIndex | Sequence[Structure], matcher=None) -> dict:
    """S.U.N. and M.S.U.N. of one generator's (relaxed) structures, as `metrics.evaluate` counts them.

    Structural validity on all; uniqueness among the structurally valid; novelty of the unique ones against
    `reference`; then `metrics.sun_metrics` (stable: E_hull <= 0, metastable: < 0.1 eV/atom, both with at least
    two elements), whose rates are fractions of all structures. NaN energies (failed relaxations or hulls) count
    as unstable. Also the mean, median and quantiles of E_hull (eV/atom) over the structures that have one (the
    paper's Fig. 4 compares these distributions) and S.U.N. counts below each of SUN_WITHIN_EV.
    """
    n = len(structures)
    e = np.asarray(e_above_hull, dtype=float)
    if len(e) != n:
        raise ValueError(f"{len(e)} energies above hull for {n} structures")
    struct_valid = structural_validity(structures) if n else np.zeros(0, dtype=bool)
    valid_idx = np.flatnonzero(struct_valid)
    unique = np.zeros(n, dtype=bool)
    unique[valid_idx] = unique_flags([structures[i] for i in valid_idx], matcher)
    unique_idx = np.flatnonzero(unique)
    novel = np.zeros(n, dtype=bool)
    novel[unique_idx] = novel_flags([structures[i] for i in unique_idx], reference, matcher)
    stability = sun_metrics(e, struct_valid=struct_valid, comp_valid=compositional_validity(structures),
                            unique=unique, novel=novel, n_elements=[len(s.composition.elements) for s in structures])
    known = e[np.isfinite(e)]
    # Matra-Genoa's Table I thresholds: S.U.N. counted below 0.001, 0.05 and 0.1 eV/atom above the hull
    un = struct_valid & unique & novel
    n_elements = [len(s.composition.elements) for s in structures]
    within = {str(t): int((un & stability_flags(e, n_elements, t, inclusive=False)).sum())
              for t in SUN_WITHIN_EV}
    return {"n": n, "n_struct_valid": int(struct_valid.sum()), "n_unique": int(unique.sum()),
            "n_novel": int(novel.sum()), "n_e_above_hull": len(known),
            "sun_rate": stability["sun_rate"], "n_sun": stability["n_sun"],
            "msun_rate": stability["msun_rate"], "n_msun": stability["n_msun"],
            "stable_rate": stability["stable_rate"], "metastable_rate": stability["metastable_rate"],
            "e_above_hull_mean": float(known.mean()) if len(known) else math.nan,
            "e_above_hull_median": float(np.median(known)) if len(known) else math.nan,
            "n_sun_within_ev": within,
            "e_above_hull_quantiles": ({str(q): float(np.quantile(known, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
                                       if len(known) else {})}


# -- held-out chemical systems and their recovery -------------------------------------------------------------------


AUTO_SELECTION_RULE = (
    "ternary chemical systems of MP-20 val+test with no MP-20 train row of that exact system (the structure-less "
    "train ids included) and every element seen in train; ranked by distinct (reduced formula, space group) "
    "pairs, then held-out rows, then name; the first {limit}")


def select_held_out_systems(held_out: pd.DataFrame, train_systems: Iterable[str], n_elements: int = 3,
                            limit: int = MAX_AUTO_SYSTEMS) -> list[str]:
    """Chemical systems for the recovery benchmark, chosen from the data alone (no model is consulted).

    `held_out` has a row per held-out structure (MP-20 val and test) with `chemsys`, `formula`, `spacegroup`.
    1. Systems of exactly `n_elements` elements among the held-out rows;
    2. with no training row of that exact system (its subsystems may be there: a model may know the chemistry,
       not the answer);
    3. whose elements all occur in training, so a model trained on it can place them;
    4. ranked by distinct (reduced formula, space group) pairs, a cheap count of distinct structures, then by
       held-out rows, then alphabetically; the first `limit` are taken.
    """
    train_systems = set(train_systems)
    train_elements = {el for system in train_systems for el in system.split("-")}
    rows = held_out[held_out["chemsys"].str.count("-") == n_elements - 1]
    rows = rows[~rows["chemsys"].isin(train_systems)]
    rows = rows[rows["chemsys"].map(lambda system: set(system.split("-")) <= train_elements).astype(bool)]
    distinct = rows.drop_duplicates(["chemsys", "formula", "spacegroup"])["chemsys"].value_counts()
    count = rows["chemsys"].value_counts()
    return sorted(count.index, key=lambda system: (-distinct[system], -count[system], system))[:limit]


@dataclass
class KnownStructure:
    """A held-out structure that a generator may recover."""

    material_id: str
    split: str
    formula: str  # reduced
    spacegroup: int | None
    structure: Structure

    def describe(self) -> dict:
        return {"material_id": self.material_id, "split": self.split, "formula": self.formula,
                "spacegroup": self.spacegroup}


def known_structures(system: str, held_out: Sequence, matcher=None) -> tuple[list[KnownStructure], int]:
    """The distinct structures of `system` ("A-B-C") in the held-out datasets, and the rows they came from.

    Rows that StructureMatcher (default tolerances) finds equal to an earlier one are kept once: recovering one
    recovers both.
    """
    rows: list[KnownStructure] = []
    for dataset in held_out:
        frame = dataset.frame
        for i in np.flatnonzero(frame["chemsys"].to_numpy() == system):
            row = frame.iloc[i]
            spacegroup = None if pd.isna(row["spacegroup"]) else int(row["spacegroup"])
            rows.append(KnownStructure(str(row["material_id"]), str(row["split"]), str(row["formula"]), spacegroup,
                                       dataset.structure(int(i))))
    distinct = unique_flags([k.structure for k in rows], matcher)
    return [k for k, keep in zip(rows, distinct) if keep], len(rows)


def first_matches(samples: Sequence[Sequence[Structure]], known: Sequence[KnownStructure],
                  matcher=None) -> list[int | None]:
    """For each known structure, the index of the first sample that matches it (None: no sample does).

    A sample is one or more forms of a generated structure (e.g. as generated and after a short relaxation); any
    form may match. StructureMatcher with default tolerances, tried only where the reduced formulas agree.
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    matcher = matcher or StructureMatcher()
    first: list[int | None] = [None] * len(known)
    by_formula: dict[str, list[int]] = defaultdict(list)
    for j, k in enumerate(known):
        by_formula[k.formula].append(j)
    for i, forms in enumerate(samples):
        for j in by_formula.get(forms[0].composition.reduced_formula, ()):
            if first[j] is None and any(_fits(matcher, form, known[j].structure) for form in forms):
                first[j] = i
        if all(f is not None for f in first):
            break
    return first


def _fits(matcher, a: Structure, b: Structure) -> bool:
    try:
        return bool(matcher.fit(a, b))
    except Exception:  # a degenerate generated cell is simply no match
        return False


def count_within(indices: Sequence[int | None], budgets: Sequence[int]) -> dict[str, int]:
    """Per budget b, how many of `indices` (sample indices; None: never) lie within the first b samples, e.g. the
    known structures recovered by then, given their `first_matches`."""
    return {str(b): sum(i is not None and i < b for i in indices) for b in budgets}


def recovery_table(systems: dict, generators: Sequence[str], budgets: Sequence[int], totals: dict) -> str:
    """Markdown: one row per system (known structures, then recovered per generator and budget) and a total."""
    header = ["system", "known"] + [f"{name} ≤{b}" for name in generators for b in budgets]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(entries: dict) -> list[str]:
        out = []
        for name in generators:
            entry = entries.get(name, {})
            out += ["error" if "error" in entry else str(entry["recovered"][str(b)]) for b in budgets]
        return out

    for system, data in systems.items():
        lines.append("| " + " | ".join([system, str(data["known"]), *cells(data["generators"])]) + " |")
    known_total = sum(data["known"] for data in systems.values())
    lines.append("| " + " | ".join(["**total**", str(known_total), *cells(totals)]) + " |")
    return "\n".join(lines)
