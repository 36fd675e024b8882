"""The pieces of `wyckoff-lab bench sun` and `bench recover` besides relaxing and hulls (`core.pipeline`): sampling
to a fixed count, held-out chemical systems of MP-20 and the recovery of their known structures."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pymatgen.core import Structure

from wyckoff_lab.core.generators import Candidate, Conditions, Generator
from wyckoff_lab.core.metrics import unique_flags
from wyckoff_lab.core.pipeline import progress_bar

# Failed attempts are asked for again, but at most this many attempts per structure wanted (PyXtal's own cap).
ATTEMPTS_PER_STRUCTURE = 5
MAX_AUTO_SYSTEMS = 5
# `bench recover --relax`: a short relaxation, enough to move a nearly right guess into StructureMatcher's
# tolerances, far too short to turn a wrong one into a known structure.
RECOVER_RELAX_STEPS = 100


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
    bar = progress_bar(n, desc, "crystal", progress)
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
