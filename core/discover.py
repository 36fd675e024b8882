"""Discover: pool every generator's candidates for one chemical system, pre-screen them, fully relax the best."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pymatgen.core import Element, Structure

from wyckoff_lab.core.defaults import SYMPREC
from wyckoff_lab.core.generators.base import (
    Conditions,
    Generator,
    available_generators,
    generator_class,
    get_generator,
)
from wyckoff_lab.core.hull import DEFAULT_MAX_REFERENCES, USABLE_STATUSES, HullPlan, HullReference
from wyckoff_lab.core.metrics import OURS_MSUN, OURS_SUN, ReferenceIndex, SunFlags, novel_flags, unique_flags
from wyckoff_lab.core.pipeline import (
    FMAX_EV_PER_A,
    HULL_DATASET,
    HULL_ERRORS,
    MAX_STEPS,
    HullBook,
    place_on_hulls,
    relax_candidates,
)
from wyckoff_lab.core.relax import (
    LoadedPotential,
    RelaxResult,
    batch_size,
    check_relax_settings,
    relax_progress,
    resolve_potential,
)
from wyckoff_lab.core.symmetry import detected_spacegroup

PRESCREENS = ("single_point", "short_relax", "none")
MAX_ELEMENTS = 5
DEFAULT_SAMPLES = 50  # per generator
SHORT_RELAX_STEPS = 10  # FIRE steps of the "short_relax" pre-screen
STAGES = ("pool", "dedup", "hull", "prescreen", "relax")
# Candidate statuses besides relax()'s: what kept a candidate from the full relaxation.
DUPLICATE, KNOWN, NOT_RELAXED = "duplicate", "known", "not_relaxed"

# on_event(stage, done, total, message): stage is one of STAGES (or "done"), done/total count that stage's work.
EventCallback = Callable[[str, int, int, str], None]


class DiscoveryError(ValueError):
    """A discovery that cannot run as asked (no generator serves the system, its hull cannot be built)."""


# -- the plan -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscoveryPlan:
    """What to discover and how.

    elements: the chemical system (1-5 elements; "Al,Ca,Cu" or "Al-Ca-Cu" also do). budget_min: wall minutes
    for the full relaxations (> 0; the pool, the hull and the pre-screen come on top). generators: registered
    names, None for every one that honours `elements`. samples: candidates asked of each generator. prescreen:
    "single_point" (one energy of the generated cell), "short_relax" (`prescreen_steps` FIRE steps) or "none"
    (relax in pool order, generators taking turns).
    fmax / max_steps / max_references: as the pipeline's and the hull's, so candidates and references relax alike.
    chunk: structures per full-relaxation call (default: the potential's batch size on its device); the budget
    is checked between chunks, so a run overshoots it by at most one chunk.
    """

    elements: tuple[str, ...]
    budget_min: float
    generators: tuple[str, ...] | None = None
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    potential: str | None = None
    prescreen: str = "single_point"
    prescreen_steps: int = SHORT_RELAX_STEPS
    fmax: float = FMAX_EV_PER_A
    max_steps: int = MAX_STEPS
    max_references: int | None = DEFAULT_MAX_REFERENCES
    device: str | None = None
    chunk: int | None = None

    def __post_init__(self) -> None:
        given = re.split(r"[,\-\s]+", self.elements) if isinstance(self.elements, str) else self.elements
        symbols = [str(e).strip() for e in given if str(e).strip()]
        unknown = [s for s in symbols if not Element.is_valid_symbol(s)]
        if unknown:
            raise ValueError(f"unknown element{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        elements = tuple(sorted(set(symbols), key=lambda s: Element(s).Z))
        if not 1 <= len(elements) <= MAX_ELEMENTS:
            raise ValueError(f"a chemical system of 1 to {MAX_ELEMENTS} elements, not {len(elements)}")
        object.__setattr__(self, "elements", elements)
        budget = self.budget_min
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) \
                or budget <= 0:
            raise ValueError(f"the relaxation budget must be a finite number of minutes > 0, not {budget!r} "
                             "(without one nothing would be relaxed)")
        if self.generators is not None:
            names = tuple(dict.fromkeys(self.generators))
            if not names:
                raise ValueError("no generator named (give None for every one that honours the system)")
            object.__setattr__(self, "generators", names)
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples per generator must be an integer >= 1, not {self.samples!r}")
        if self.prescreen not in PRESCREENS:
            raise ValueError(f"prescreen must be one of {', '.join(PRESCREENS)}, not {self.prescreen!r}")
        if isinstance(self.prescreen_steps, bool) or not isinstance(self.prescreen_steps, int) \
                or self.prescreen_steps < 1:
            raise ValueError(f"the short relaxation needs at least 1 FIRE step, not {self.prescreen_steps!r}")
        fmax, max_steps = check_relax_settings(self.fmax, self.max_steps)
        object.__setattr__(self, "fmax", fmax)
        object.__setattr__(self, "max_steps", max_steps)
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"chunk must be an integer >= 1, not {self.chunk!r}")

    @property
    def system(self) -> str:
        return "-".join(self.elements)

    @property
    def conditions(self) -> Conditions:
        return Conditions(elements=self.elements)

    def generator_names(self) -> list[str]:
        """The generators to pool: those named, or every registered one declaring the `elements` condition."""
        if self.generators is not None:
            return list(self.generators)
        return [name for name in available_generators() if "elements" in generator_class(name).supported_conditions]


# -- what comes out -------------------------------------------------------------------------------------------------


@dataclass
class DiscoveryCandidate:
    """One pooled candidate and how far it went.

    `status`: DUPLICATE (of pool candidate `duplicate_of`), KNOWN (matches an MP-20 structure as generated),
    NOT_RELAXED (the budget ran out first) or its full relaxation's status (relax.STATUSES). `prescreen`: the
    estimated E_hull (eV/atom) on the potential's hull, inf where the pre-screen failed (`prescreen_status` says
    how) and NaN with prescreen "none". `rank`: its place in the relaxation order (0 first).
    """

    index: int  # in the pool
    structure: Structure  # as generated
    generators: list[str]  # every generator that made it (duplicates merged), the kept structure's first
    spacegroup_generated: int | None
    status: str = NOT_RELAXED
    duplicate_of: int | None = None
    prescreen: float = math.nan
    prescreen_status: str | None = None
    rank: int | None = None
    result: RelaxResult | None = None  # the full relaxation (primitive cell)
    e_above_hull: float = math.nan  # eV/atom on the potential's hull after the full relaxation
    spacegroup_relaxed: int | None = None
    unique: bool | None = None  # judged after relaxation, among the relaxed
    novel: bool | None = None  # the relaxed structure against MP-20
    sun: bool | None = None  # metrics.OURS_SUN: unique, novel, structurally valid, E_hull <= 0, >= 2 elements
    msun: bool | None = None  # metrics.OURS_MSUN: the same with E_hull < 0.1 eV/atom

    @property
    def generator(self) -> str:
        return "+".join(self.generators)

    @property
    def relaxed(self) -> Structure | None:
        """The relaxed structure where the relaxation gave one the hull takes."""
        ok = self.result is not None and self.result.status in USABLE_STATUSES
        return self.result.final if ok else None

    @property
    def formula(self) -> str:
        return (self.relaxed or self.structure).composition.reduced_formula

    @property
    def spacegroup(self) -> int | None:
        """The relaxed structure's space group where it has one, else the generated one's."""
        return self.spacegroup_relaxed if self.relaxed is not None else self.spacegroup_generated

    def row(self) -> dict:
        """JSON-ready fields (no structures)."""
        def number(x):
            return float(x) if x is not None and math.isfinite(x) else None

        return {"index": self.index, "rank": self.rank, "formula": self.formula, "spacegroup": self.spacegroup,
                "spacegroup_generated": self.spacegroup_generated, "spacegroup_relaxed": self.spacegroup_relaxed,
                "generator": self.generator, "prescreen": number(self.prescreen),
                "prescreen_status": self.prescreen_status, "e_above_hull": number(self.e_above_hull),
                "status": self.status, "duplicate_of": self.duplicate_of, "unique": self.unique,
                "novel": self.novel, "sun": self.sun, "msun": self.msun,
                "steps": None if self.result is None else self.result.steps,
                "relax_s": None if self.result is None else round(self.result.wall_time_s, 3),
                "cached": None if self.result is None else self.result.cached}


@dataclass
class DiscoveryResult:
    """Every pooled candidate (pool order) and what each stage cost. `stopped`: why the full relaxations ended
    ("pool exhausted", "budget", "cancelled", "interrupted")."""

    plan: DiscoveryPlan
    candidates: list[DiscoveryCandidate]
    minutes: dict[str, float]  # wall minutes per stage
    cpu_minutes: dict[str, float]  # this process's CPU minutes per stage
    skipped: dict[str, str]  # generator -> why it contributed nothing
    made: dict[str, int]  # generator -> candidates it made
    hull: HullReference
    hull_plan: str  # what building the hull took (relaxations, cached or not)
    stopped: str
    potential: str  # identity

    @property
    def system(self) -> str:
        return self.plan.system

    def ranked(self) -> list[DiscoveryCandidate]:
        """Relaxed candidates by E_hull, then the others by pre-screen order, then those never pre-screened."""
        def key(c: DiscoveryCandidate):
            placed = math.isfinite(c.e_above_hull)
            return (not placed, c.e_above_hull if placed else 0.0, c.rank if c.rank is not None else math.inf,
                    c.index)

        return sorted(self.candidates, key=key)

    def counts(self) -> dict:
        relaxed = [c for c in self.candidates if c.result is not None]
        return {"pooled": len(self.candidates), "duplicates": sum(c.status == DUPLICATE for c in self.candidates),
                "known": sum(c.status == KNOWN for c in self.candidates),
                "prescreened": sum(c.prescreen_status is not None for c in self.candidates),
                "relaxed": len(relaxed), "relaxed_cached": sum(bool(c.result.cached) for c in relaxed),
                "converged": sum(c.result.status == "converged" for c in relaxed),
                "sun": sum(bool(c.sun) for c in self.candidates), "msun": sum(bool(c.msun) for c in self.candidates)}


# -- the funnel -----------------------------------------------------------------------------------------------------


class _Clock:
    """Wall and CPU minutes per stage."""

    def __init__(self):
        self.minutes: dict[str, float] = {}
        self.cpu_minutes: dict[str, float] = {}

    def start(self, stage: str) -> None:
        self.stage, self.t0, self.c0 = stage, time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.minutes[self.stage] = round((time.perf_counter() - self.t0) / 60, 4)
        self.cpu_minutes[self.stage] = round((time.process_time() - self.c0) / 60, 4)


def discover(plan: DiscoveryPlan, generators: Mapping[str, Generator] | None = None,
             potential: LoadedPotential | None = None, on_event: EventCallback | None = None,
             on_candidate: Callable[[DiscoveryCandidate], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             on_ranked: Callable[[list[DiscoveryCandidate], list[DiscoveryCandidate]], None] | None = None
             ) -> DiscoveryResult:
    """Run the funnel of `plan`: pool, deduplicate, hull, pre-screen, relax the best first until the budget.

    `generators`: already loaded generators by name (the app's); the others are loaded here. `potential`: an
    already loaded one (else `plan.potential` is loaded). `on_ranked(pool, order)` once the pre-screen has ranked
    the candidates to relax (`order`, best first; `pool`: every candidate), before any full relaxation, and
    `on_candidate(c)` as each candidate is placed on the hull after its full relaxation (the app shows both).
    `should_stop()` is asked between relaxation chunks (the app's cancel); a Ctrl-C during the relaxations also
    ends them and returns what was done. Every finished relaxation is in the
    relaxation cache, so running the same plan again resumes: the seeded pool is the same and its relaxations
    come from the cache (at no cost against the budget, which then goes to the next candidates).
    Raises ValueError (DiscoveryError) for a system no generator serves or whose hull cannot be built, and
    relax.PotentialError for a potential that cannot be loaded: before any sampling.
    """
    report = on_event or (lambda stage, done, total, message: None)
    clock = _Clock()
    loaded = resolve_potential(potential if potential is not None else plan.potential, plan.device)
    chunk = plan.chunk or batch_size(loaded.device)

    clock.start("pool")
    serving, skipped = _serving_generators(plan, generators or {}, report)
    pool, made = _sample_pool(plan, serving, skipped, report)
    clock.stop()

    clock.start("dedup")
    reference = _known_structures(plan.elements)
    _deduplicate(pool, reference, report)
    clock.stop()

    clock.start("hull")
    book = HullBook(loaded, plan.max_references, HULL_DATASET, plan.fmax, plan.max_steps)
    hull, hull_plan = _build_hull(book, plan, report)
    clock.stop()

    clock.start("prescreen")
    remaining = [c for c in pool if c.status == NOT_RELAXED]
    order = _prescreen(remaining, plan, loaded, hull, chunk, report)
    for rank, candidate in enumerate(order):
        candidate.rank = rank
    clock.stop()
    if on_ranked is not None:
        on_ranked(pool, order)

    clock.start("relax")
    stopped = _relax_in_order(order, plan, loaded, book, chunk, report, on_candidate, should_stop)
    _judge_after_relaxation(pool, reference)
    clock.stop()
    report("done", len(pool), len(pool), f"{sum(c.result is not None for c in pool)} relaxed ({stopped})")
    return DiscoveryResult(plan, pool, clock.minutes, clock.cpu_minutes, skipped, made, hull, hull_plan, stopped,
                           loaded.identity)


# -- 1. pool --------------------------------------------------------------------------------------------------------


def _load(name: str, given: Mapping[str, Generator]) -> Generator:
    return given[name] if name in given else get_generator(name)


def _serving_generators(plan: DiscoveryPlan, given: Mapping[str, Generator], report: EventCallback
                        ) -> tuple[dict[str, Generator], dict[str, str]]:
    """The generators that can serve the system (each asked for nothing, which runs its feasibility checks), and
    why the others cannot. None serving is refused here, naming which generators can place which element."""
    names = plan.generator_names()
    serving: dict[str, Generator] = {}
    skipped: dict[str, str] = {}
    report("pool", 0, plan.samples * len(names), f"checking {', '.join(names)} for {plan.system}")
    for name in names:
        try:
            generator = _load(name, given)
        except Exception as exc:  # unknown name, missing weights: that generator is out, the others go on
            skipped[name] = f"cannot be loaded: {exc}"
            continue
        reason = _cannot_serve(generator, plan.conditions)
        if reason is None:
            serving[name] = generator
        else:
            skipped[name] = reason
    if not serving:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise DiscoveryError(f"no generator can serve {plan.system} ({reasons}). "
                             f"{_coverage(plan, given)}")
    return serving, skipped


def _cannot_serve(generator: Generator, conditions: Conditions) -> str | None:
    """Why `generator` cannot make crystals under `conditions` (its own refusal of a request for none), or None."""
    try:
        generator.generate(0, conditions)
    except Exception as exc:  # generators refuse with ValueError / UnsupportedConditionError, some with others
        return str(exc) or type(exc).__name__
    return None


def _coverage(plan: DiscoveryPlan, given: Mapping[str, Generator]) -> str:
    """Per element, the generators that can place it alone (the system as a whole is another matter)."""
    parts = []
    for element in plan.elements:
        able = []
        for name in plan.generator_names():
            try:
                generator = _load(name, given)
            except Exception:
                continue
            if _cannot_serve(generator, Conditions(elements=(element,))) is None:
                able.append(name)
        parts.append(f"{element}: {', '.join(able) or 'none'}")
    return "Generators that can place each element alone: " + "; ".join(parts)


def _sample_pool(plan: DiscoveryPlan, serving: dict[str, Generator], skipped: dict[str, str],
                 report: EventCallback) -> tuple[list[DiscoveryCandidate], dict[str, int]]:
    """`plan.samples` candidates from each serving generator, seeded with `plan.seed` (so a rerun gets the same)."""
    pool: list[DiscoveryCandidate] = []
    made: dict[str, int] = {}
    total = plan.samples * len(serving)
    for k, (name, generator) in enumerate(serving.items()):
        base = k * plan.samples

        def progress(done, _total, base=base, name=name):
            report("pool", base + done, total, f"sampling {name}")

        try:
            result = generator.generate(plan.samples, plan.conditions, seed=plan.seed, progress=progress)
        except Exception as exc:  # a generator failing mid-way spares the others
            skipped[name] = f"sampling failed: {type(exc).__name__}: {exc}"
            continue
        made[name] = len(result.candidates)
        if not result.candidates:
            skipped[name] = f"made nothing in {result.attempts} attempts ({dict(result.failures)})"
        for c in result.candidates:
            pool.append(DiscoveryCandidate(len(pool), c.structure, [name],
                                           c.spacegroup_at(SYMPREC) or c.intended_spacegroup))
        report("pool", base + plan.samples, total, f"{name}: {len(result.candidates)} candidates")
    if not pool:
        raise DiscoveryError(f"no generator made a candidate for {plan.system}: "
                             + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    return pool, made


# -- 2. deduplicate -------------------------------------------------------------------------------------------------


def _known_structures(elements: Sequence[str]) -> ReferenceIndex:
    """MP-20's structures (all splits) inside the system, the only ones a candidate of it can match."""
    from wyckoff_lab.core.datasets import load_dataset

    dataset = load_dataset(HULL_DATASET, "all")
    return ReferenceIndex([dataset.structure(int(i)) for i in dataset.indices_in_chemsys(elements)])


def _deduplicate(pool: list[DiscoveryCandidate], reference: ReferenceIndex, report: EventCallback) -> None:
    """Mark duplicates within the pool (StructureMatcher, the first of each class kept, its generators merged)
    and candidates that are known MP-20 structures."""
    from wyckoff_lab.core.metrics import structure_matcher

    report("dedup", 0, len(pool), "matching candidates against each other")
    structures = [c.structure for c in pool]
    first = unique_flags(structures)
    matcher = structure_matcher("pymatgen_tol")  # unique_flags' default tolerances, to name each duplicate's twin
    kept = [c for c, ok in zip(pool, first) if ok]
    for candidate, ok in zip(pool, first):
        if ok:
            continue
        twin = next((k for k in kept if k.index < candidate.index and k.formula == candidate.formula
                     and matcher.fit(candidate.structure, k.structure)), None)
        candidate.status = DUPLICATE
        candidate.duplicate_of = None if twin is None else twin.index
        if twin is not None:
            twin.generators += [g for g in candidate.generators if g not in twin.generators]
    report("dedup", len(pool) - len(kept), len(pool), f"matching {len(kept)} against MP-20")
    for candidate, novel in zip(kept, novel_flags([c.structure for c in kept], reference)):
        if not novel:
            candidate.status = KNOWN
    report("dedup", len(pool), len(pool), f"{sum(c.status == NOT_RELAXED for c in pool)} new of {len(pool)}")


# -- 3. hull --------------------------------------------------------------------------------------------------------


def _build_hull(book: HullBook, plan: DiscoveryPlan, report: EventCallback) -> tuple[HullReference, str]:
    """The system's hull from MP-20 references relaxed with the plan's potential and settings (cached after the
    first build), and a line saying what it took."""
    said = {"plan": "hull from the hull cache"}

    def before_relax(hull_plan: HullPlan) -> None:
        said["plan"] = hull_plan.describe()
        report("hull", 0, hull_plan.n_references, said["plan"])

    with relax_progress(lambda done, total, step: report("hull", done, total, f"references, FIRE step {step}")):
        try:
            hull = book.get(plan.elements, before_relax=before_relax)
        except HULL_ERRORS as exc:
            raise DiscoveryError(f"the {plan.system} hull cannot be built: {exc}") from exc
    references = len(hull.references)
    line = f"{said['plan']}; {references} references, built in {hull.total_time_s:.0f} s"
    report("hull", references, references, line)
    return hull, line


# -- 4. pre-screen --------------------------------------------------------------------------------------------------


def _prescreen(remaining: list[DiscoveryCandidate], plan: DiscoveryPlan, potential: LoadedPotential,
               hull: HullReference, chunk: int, report: EventCallback) -> list[DiscoveryCandidate]:
    """Score each candidate by its estimated E_hull after a single point or a few FIRE steps (primitive cell, as
    the full relaxation; cached like any relaxation) and return them best first. A failed pre-screen (exploded,
    NaN, atoms too close) scores inf and goes last, its status kept; ties keep pool order."""
    if plan.prescreen == "none":
        return _taking_turns(remaining)
    steps = 0 if plan.prescreen == "single_point" else plan.prescreen_steps
    label = "single points" if steps == 0 else f"{steps} FIRE steps each"
    done = [0]

    def scored(i: int, result: RelaxResult) -> None:
        candidate = remaining[i]
        candidate.prescreen_status = result.status
        candidate.prescreen = _estimated_e_above_hull(result, hull)
        done[0] += 1
        report("prescreen", done[0], len(remaining), label)

    report("prescreen", 0, len(remaining), label)
    relax_candidates([c.structure for c in remaining], potential, plan.fmax, steps, chunk=max(chunk, 1),
                     on_result=scored)
    return sorted(remaining, key=lambda c: c.prescreen if math.isfinite(c.prescreen) else math.inf)


def _estimated_e_above_hull(result: RelaxResult, hull: HullReference) -> float:
    if result.status not in USABLE_STATUSES:
        return math.inf
    value = hull.e_above_hull([result])[0].e_above_hull
    return math.inf if value is None or not math.isfinite(value) else float(value)


def _taking_turns(candidates: list[DiscoveryCandidate]) -> list[DiscoveryCandidate]:
    """Pool order with the generators taking turns, so a budget is not spent on the first generator alone."""
    by_generator: dict[str, list[DiscoveryCandidate]] = {}
    for c in candidates:
        by_generator.setdefault(c.generators[0], []).append(c)
    queues = list(by_generator.values())
    order = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


# -- 5. full relaxation ---------------------------------------------------------------------------------------------


def _relax_in_order(order: list[DiscoveryCandidate], plan: DiscoveryPlan, potential: LoadedPotential,
                    book: HullBook, chunk: int, report: EventCallback, on_candidate, should_stop) -> str:
    """Relax `order` chunk by chunk with the pipeline's settings, each candidate placed on the hull as it
    finishes, until the budget is spent (checked between chunks), `should_stop()` or a Ctrl-C."""
    budget_s = plan.budget_min * 60
    start = time.perf_counter()
    done = [0]

    def report_budget(message: str) -> None:
        spent = time.perf_counter() - start
        report("relax", done[0], len(order), f"{message}; {spent / 60:.1f} of {plan.budget_min:g} min")

    report_budget("relaxing best first")
    try:
        for first in range(0, len(order), chunk):
            if time.perf_counter() - start >= budget_s:
                return "budget"
            if should_stop is not None and should_stop():
                return "cancelled"
            part = order[first:first + chunk]

            def finished(i: int, result: RelaxResult, part=part) -> None:
                candidate = part[i]
                candidate.result = result
                candidate.status = result.status
                candidate.e_above_hull = place_on_hulls([result], book).e_above_hull[0]
                if candidate.relaxed is not None:
                    candidate.spacegroup_relaxed = detected_spacegroup(candidate.relaxed, SYMPREC)
                done[0] += 1
                report_budget(f"{candidate.formula}: {result.status}")
                if on_candidate is not None:
                    on_candidate(candidate)

            relax_candidates([c.structure for c in part], potential, plan.fmax, plan.max_steps, chunk=chunk,
                             on_result=finished)
    except KeyboardInterrupt:  # what finished is kept (and cached): the caller writes it, a rerun resumes
        return "interrupted"
    return "pool exhausted"


# -- 6. judged after relaxation ---------------------------------------------------------------------------------------


def _judge_after_relaxation(pool: list[DiscoveryCandidate], reference: ReferenceIndex) -> None:
    """Uniqueness among the relaxed (the first relaxed of each class is the unique one), novelty of each relaxed
    structure against MP-20 and the S.U.N. / M.S.U.N. flags, as `pipeline.sun_summary` counts them."""
    relaxed = sorted((c for c in pool if c.relaxed is not None), key=lambda c: c.rank)
    if not relaxed:
        return
    flags = SunFlags([c.relaxed for c in relaxed], reference)
    e_above_hull = np.array([c.e_above_hull for c in relaxed], dtype=float)
    unique = flags.unique_among(flags.struct_valid)
    sun, msun = flags.counted(OURS_SUN, e_above_hull), flags.counted(OURS_MSUN, e_above_hull)
    for i, candidate in enumerate(relaxed):
        candidate.unique, candidate.novel = bool(unique[i]), bool(flags.novel[i])
        candidate.sun, candidate.msun = bool(sun[i]), bool(msun[i])

