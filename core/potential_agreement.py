"""Potential vs DFT on MP-20: each potential's own hull against MP-20's energies, and its cost per FIRE step."""

from __future__ import annotations

import functools
import itertools
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Element, Structure

from wyckoff_lab.core.hull import USABLE_STATUSES, elemental_structure, place_entry
from wyckoff_lab.core.pipeline import FMAX_EV_PER_A, MAX_STEPS, RelaxBar
from wyckoff_lab.core.relax import LoadedPotential, relax

# A phase is DFT-stable at or below this E_hull (eV/atom): formation energies are rounded, ties sit within ~1e-4.
DFT_STABLE_EV = 0.001
# E_hull bounds (eV/atom) under which a DFT-stable phase counts as kept by the potential; 0 means on its hull
# (within ON_HULL_EV, pymatgen's hull arithmetic).
WITHIN_EV = (0.0, 0.025, 0.05)
ON_HULL_EV = 1e-6
# Timing: structures relaxed for exactly this many FIRE steps (an unreachable fmax), cache off, after a short
# warm-up, batched as relax() batches them and then one at a time.
TIMING_STEPS = 10
TIMING_FMAX = 1e-4
TIMING_RATTLE_A = 0.05
# Potentials whose energies are on MPtrj's raw PBE(+U) scale (SevenNet-0: its oxide, sulfide and nitride formation
# energies miss MP-20's by about MP2020's anion and U corrections, README "Potentials"): reported twice, as they
# are and with pymatgen's MaterialsProject2020Compatibility corrections added to each energy (as a "+mp2020" row).
MP2020_CORRECTED = ("sevennet",)


@dataclass
class Row:
    """One MP-20 phase of a chemical system, or a built elemental stand-in (no DFT energy)."""

    material_id: str
    formula: str  # reduced
    structure: Structure
    dft_formation_energy_per_atom: float  # eV/atom, NaN for stand-ins


def system_rows(dataset, elements: Sequence[str], max_rows: int | None = None, seed: int = 0) -> list[Row]:
    """The rows of `dataset` (a CrystalDataset, all splits) inside `elements`, subsystems included, plus a built
    stand-in for an element without a row. With `max_rows`, the lowest-DFT-energy row of each element and a seeded
    random choice of the others, `max_rows` in all (the elements kept even beyond it: a hull needs them)."""
    indices = [int(i) for i in dataset.indices_in_chemsys(elements)]
    frame = dataset.frame
    if max_rows is not None and len(indices) > max_rows:
        elemental = {}
        for i in sorted(indices, key=lambda i: frame.iloc[i]["formation_energy_per_atom"]):
            formula = frame.iloc[i]["formula"]
            if Composition(formula).is_element:
                elemental.setdefault(formula, i)
        rest = [i for i in indices if i not in elemental.values()]
        rng = np.random.default_rng(seed)
        n_rest = max(max_rows - len(elemental), 0)
        chosen = rng.choice(len(rest), size=min(n_rest, len(rest)), replace=False) if n_rest else []
        indices = sorted(list(elemental.values()) + [rest[k] for k in chosen])
    rows = [Row(str(frame.iloc[i]["material_id"]), str(frame.iloc[i]["formula"]), dataset.structure(i),
                float(frame.iloc[i]["formation_energy_per_atom"])) for i in indices]
    present = {r.formula for r in rows if Composition(r.formula).is_element}
    for symbol in elements:
        if Composition(symbol).reduced_formula not in present:
            structure, note = elemental_structure(symbol)
            rows.append(Row(note, symbol, structure, math.nan))
    return rows


def dft_e_above_hull(rows: Sequence[Row], elements: Sequence[str]) -> list[float]:
    """E_hull (eV/atom) of each row on the DFT hull of these same rows (MP-20 formation energies; elements at 0),
    so that DFT and potential judge the same set of phases. NaN for stand-ins."""
    entries = [PDEntry(r.structure.composition, r.dft_formation_energy_per_atom * len(r.structure))
               for r in rows if math.isfinite(r.dft_formation_energy_per_atom)]
    entries += [PDEntry(Composition(e), 0.0) for e in elements]  # formation energy's zero: stand-ins included
    diagram = _diagram(entries, elements)
    out, entry_of = [], iter(entries)
    for r in rows:
        out.append(float(diagram.get_e_above_hull(next(entry_of))) if math.isfinite(r.dft_formation_energy_per_atom)
                   else math.nan)
    return out


def _diagram(entries: list[PDEntry], elements: Sequence[str]) -> PhaseDiagram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns about elements without electronegativity data
        return PhaseDiagram(entries, elements=[Element(e) for e in elements])


@dataclass
class SystemAgreement:
    """One potential on one chemical system: its relaxations of the rows, its own hull, and the DFT comparison."""

    system: str
    rows: list[Row]
    statuses: list[str]
    ml_e_above_hull: list[float]  # eV/atom on the potential's hull, NaN where the relaxation failed
    ml_formation_energy: list[float]  # eV/atom against the potential's own elemental ground states
    dft_e_above_hull: list[float]
    relax_s: float
    n_relaxed_now: int  # relaxations computed in this run (the others came from the relax cache)

    def stable_kept(self) -> dict[str, int]:
        """How many DFT-stable compounds (two elements or more) lie within each WITHIN_EV of the potential's hull,
        and how many DFT-stable compounds there are ('n')."""
        stable = [i for i, (r, e) in enumerate(zip(self.rows, self.dft_e_above_hull))
                  if e <= DFT_STABLE_EV and len(r.structure.composition) > 1]
        kept = {}
        for bound in WITHIN_EV:
            limit = ON_HULL_EV if bound == 0 else bound + ON_HULL_EV
            kept[_bound_key(bound)] = sum(self.ml_e_above_hull[i] <= limit for i in stable)
        return {"n": len(stable), **kept}

    def formation_pairs(self) -> np.ndarray:
        """|(E_f^ML(i) - E_f^ML(j)) - (E_f^DFT(i) - E_f^DFT(j))| (eV/atom) over every unordered pair of this
        system's MP-20 rows that the potential relaxed (converged or not), elements included."""
        ok = [i for i, r in enumerate(self.rows)
              if math.isfinite(r.dft_formation_energy_per_atom) and math.isfinite(self.ml_formation_energy[i])]
        ml, dft = self.ml_formation_energy, [r.dft_formation_energy_per_atom for r in self.rows]
        return np.array([abs((ml[i] - ml[j]) - (dft[i] - dft[j])) for i, j in itertools.combinations(ok, 2)])

    def formation_errors(self) -> np.ndarray:
        """|E_f^ML - E_f^DFT| (eV/atom) per relaxed MP-20 row."""
        pairs = zip(self.ml_formation_energy, (r.dft_formation_energy_per_atom for r in self.rows))
        return np.array([abs(ml - dft) for ml, dft in pairs if math.isfinite(ml) and math.isfinite(dft)])

    def as_dict(self) -> dict:
        pairs, errors = self.formation_pairs(), self.formation_errors()
        statuses = {s: self.statuses.count(s) for s in sorted(set(self.statuses))}
        return {"rows": sum(math.isfinite(r.dft_formation_energy_per_atom) for r in self.rows),
                "stand_ins": [r.material_id for r in self.rows if not math.isfinite(r.dft_formation_energy_per_atom)],
                "relax_status": statuses, "relax_s": round(self.relax_s, 2), "relaxed_now": self.n_relaxed_now,
                "dft_stable_kept": self.stable_kept(),
                "pair_mae_eV": _mean(pairs), "n_pairs": len(pairs),
                "formation_mae_eV": _mean(errors), "n_formation": len(errors),
                "phases": [{"material_id": r.material_id, "formula": r.formula, "status": s,
                            "dft_formation_energy_per_atom": _finite(r.dft_formation_energy_per_atom),
                            "ml_formation_energy_per_atom": _finite(ef), "dft_e_above_hull": _finite(ed),
                            "ml_e_above_hull": _finite(em)}
                           for r, s, ef, ed, em in zip(self.rows, self.statuses, self.ml_formation_energy,
                                                       self.dft_e_above_hull, self.ml_e_above_hull)]}


def _bound_key(bound: float) -> str:
    return "on_hull" if bound == 0 else f"within_{bound:g}"


def _mean(values: np.ndarray) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def mp2020_energy(structure: Structure, energy: float) -> float:
    """`energy` (eV) of `structure` with MP2020's corrections added, as if it were an MP GGA(+U) calculation with
    MP's U values (GGA+U exactly where MP uses it); NaN if the scheme rejects the entry."""
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    compat = _mp2020_scheme()
    most_electronegative = max(structure.composition.elements, key=lambda el: el.X).symbol
    u_values = compat.u_settings.get(most_electronegative, {})
    hubbards = {el.symbol: float(u_values[el.symbol]) for el in structure.composition.elements
                if float(u_values.get(el.symbol, 0)) > 0}
    entry = ComputedStructureEntry(structure, energy, parameters={"run_type": "GGA+U" if hubbards else "GGA",
                                                                   "hubbards": hubbards})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no oxidation states": it then classifies oxides by bond lengths
        corrected = compat.process_entry(entry)
    return math.nan if corrected is None else float(corrected.energy)


@functools.cache
def _mp2020_scheme():
    from pymatgen.analysis.compatibility import MaterialsProject2020Compatibility

    return MaterialsProject2020Compatibility(check_potcar=False)


def system_agreement(potential: LoadedPotential, elements: Sequence[str], rows: Sequence[Row],
                     progress: bool = False, mp2020: bool = False) -> SystemAgreement:
    """Relax `rows` with `potential` as hull references are relaxed (FMAX_EV_PER_A, MAX_STEPS, cell too; cached),
    build the potential's own hull from them (with MP2020 corrections added to every energy if `mp2020`) and
    place each on it."""
    bar = RelaxBar(f"{potential.name} {'-'.join(elements)}", progress)
    start = time.perf_counter()
    try:
        results = relax([r.structure for r in rows], potential, FMAX_EV_PER_A, MAX_STEPS, progress=bar)
    finally:
        bar.close()
    relax_s = time.perf_counter() - start
    energies = [mp2020_energy(r.final, r.energy) if mp2020 else r.energy for r in results]
    usable = [i for i, res in enumerate(results) if res.status in USABLE_STATUSES and math.isfinite(energies[i])]
    entries = {i: PDEntry(results[i].final.composition, energies[i], name=rows[i].material_id) for i in usable}
    ml_e_hull, ml_ef = [math.nan] * len(rows), [math.nan] * len(rows)
    covered = {str(el) for i in usable if results[i].final.composition.is_element
               for el in results[i].final.composition}
    if set(elements) <= covered:  # else no hull: every phase stays NaN, which counts as not kept
        diagram = _diagram(list(entries.values()), elements)
        for i, entry in entries.items():
            placed = place_entry(diagram, entry.composition, entry.energy)
            ml_e_hull[i], ml_ef[i] = placed.e_above_hull, placed.formation_energy_per_atom
    return SystemAgreement("-".join(elements), list(rows), [r.status for r in results], ml_e_hull, ml_ef,
                           dft_e_above_hull(rows, elements), relax_s, sum(not r.cached for r in results))


def totals(systems: Sequence[SystemAgreement]) -> dict:
    """The pooled figures over systems: DFT-stable compounds kept (a compound shared by two systems counts in
    each), and the pair MAE over every within-system pair of all systems."""
    kept = [s.stable_kept() for s in systems]
    pairs = np.concatenate([s.formation_pairs() for s in systems] or [np.zeros(0)])
    errors = np.concatenate([s.formation_errors() for s in systems] or [np.zeros(0)])
    n_stable = sum(k["n"] for k in kept)
    out = {"dft_stable": n_stable}
    for bound in WITHIN_EV:
        key = _bound_key(bound)
        count = sum(k[key] for k in kept)
        out[key] = count
        out[f"{key}_fraction"] = round(count / n_stable, 4) if n_stable else None
    statuses = [s for system in systems for s in system.statuses]
    return out | {"pair_mae_eV": _mean(pairs), "n_pairs": len(pairs), "formation_mae_eV": _mean(errors),
                  "rows": sum(len(s.rows) for s in systems), "converged": statuses.count("converged"),
                  "failed": sum(s not in USABLE_STATUSES for s in statuses),
                  "relax_s": round(sum(s.relax_s for s in systems), 2),
                  "relaxed_now": sum(s.n_relaxed_now for s in systems)}


def timing_structures(rows_by_system: dict[str, Sequence[Row]], seed: int = 0) -> list[Structure]:
    """One seeded MP-20 row per system (stand-ins excluded), rattled by TIMING_RATTLE_A Å: the same for every
    potential."""
    rng = np.random.default_rng(seed)
    out = []
    for rows in rows_by_system.values():
        real = [r for r in rows if math.isfinite(r.dft_formation_energy_per_atom)]
        if real:
            structure = real[int(rng.integers(len(real)))].structure.copy()
            structure.perturb(TIMING_RATTLE_A, seed=int(rng.integers(1 << 31)))
            out.append(structure)
    return out


def step_timing(potential: LoadedPotential, structures: Sequence[Structure], steps: int = TIMING_STEPS) -> dict:
    """Wall time of FIRE steps with cell relaxation (each step: one energy/forces/stress evaluation and the
    optimizer's move), per structure-step and per atom-step, batched (one relax() of all) and one at a time."""
    relax(structures[:2], potential, TIMING_FMAX, 2, cache=False)  # warm-up: lazy initialisation is not charged
    n_atoms = [len(s) for s in structures]

    def measure(groups: list[list[Structure]]) -> dict:
        start = time.perf_counter()
        results = [r for group in groups for r in relax(group, potential, TIMING_FMAX, steps, cache=False)]
        seconds = time.perf_counter() - start
        evaluations = sum(r.steps + 1 for r in results)  # step 0 is an evaluation too
        atom_evaluations = sum((r.steps + 1) * n for r, n in zip(results, n_atoms))
        return {"ms_per_step": round(1000 * seconds / evaluations, 2),
                "ms_per_atom_step": round(1000 * seconds / atom_evaluations, 3), "seconds": round(seconds, 2)}

    return {"structures": len(structures), "atoms": sum(n_atoms), "steps": steps,
            "batched": measure([list(structures)]), "single": measure([[s] for s in structures])}


BENCH_SYSTEMS = ("Li-Mn-O", "Li-Fe-O", "Al-Ca-Cu", "Gd-Ge-Pt", "Ba-O-Ti", "Cu-S-Sn", "Mg-N-Si", "Mn-Ni-Sb")


def benchmark(potentials: Sequence[str], systems: Sequence[str] = BENCH_SYSTEMS, max_per_system: int | None = None,
              seed: int = 0, device: str | None = None, progress: bool = False) -> dict:
    """Per potential: `step_timing` on one seeded row per system, then `system_agreement` on each system's MP-20
    rows (all splits; a seeded subset of `max_per_system` with it) and the pooled `totals`. A potential that cannot
    be loaded gets {"error": ...} and the others still run. Raises DataUnavailableError without MP-20."""
    from wyckoff_lab.core.datasets import load_dataset
    from wyckoff_lab.core.relax import PotentialError, resolve_potential

    dataset = load_dataset("mp_20", "all", progress=progress)
    rows = {system: system_rows(dataset, system.split("-"), max_per_system, seed) for system in systems}
    timing_set = timing_structures(rows, seed)
    report: dict = {"systems": list(systems), "max_per_system": max_per_system, "seed": seed,
                    "fmax_eV_per_A": FMAX_EV_PER_A, "max_steps": MAX_STEPS, "dft_stable_eV": DFT_STABLE_EV,
                    "potentials": {}}
    for name in potentials:
        try:
            potential = resolve_potential(name, device)
        except PotentialError as exc:
            report["potentials"][name] = {"error": str(exc)}
            continue
        timing = None
        for mp2020 in (False, True) if name in MP2020_CORRECTED else (False,):
            per_system = [system_agreement(potential, system.split("-"), rows[system], progress, mp2020)
                          for system in systems]
            timing = timing or step_timing(potential, timing_set)  # the same relaxations: timed once
            report["potentials"][name + ("+mp2020" if mp2020 else "")] = {
                "identity": potential.identity, "device": potential.device, "mp2020_corrections": mp2020,
                "timing": timing, "total": totals(per_system), "systems": {s.system: s.as_dict() for s in per_system}}
    return report


def format_table(report: dict) -> str:
    """The report as a Markdown table: one line per potential (pooled), then one per potential and system."""
    head = ("| potential | DFT-stable | on hull | ≤ 0.025 | ≤ 0.05 | pair MAE (eV/atom) | E_f MAE (eV/atom) | "
            "ms/step batched | ms/step single | ms/atom-step single | failed |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    errors = []
    for name, entry in report["potentials"].items():
        if "error" in entry:
            errors.append(f"{name}: {entry['error']}")
            continue
        t, timing = entry["total"], entry["timing"]
        n = t["dft_stable"]
        lines.append(f"| {name} | {n} | {_count(t['on_hull'], n)} | {_count(t['within_0.025'], n)} | "
                     f"{_count(t['within_0.05'], n)} | {_num(t['pair_mae_eV'])} | {_num(t['formation_mae_eV'])} | "
                     f"{timing['batched']['ms_per_step']:.0f} | {timing['single']['ms_per_step']:.0f} | "
                     f"{timing['single']['ms_per_atom_step']:.1f} | {t['failed']} of {t['rows']} |")
    lines += ["", "| potential | system | rows | DFT-stable | on hull | ≤ 0.025 | ≤ 0.05 | pair MAE | E_f MAE | "
              "relax s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in report["potentials"].items():
        for system, s in entry.get("systems", {}).items():
            k = s["dft_stable_kept"]
            lines.append(f"| {name} | {system} | {s['rows']} | {k['n']} | {k['on_hull']} | {k['within_0.025']} | "
                         f"{k['within_0.05']} | {_num(s['pair_mae_eV'])} | {_num(s['formation_mae_eV'])} | "
                         f"{s['relax_s']:.0f} |")
    return "\n".join(lines + [f"error: {e}" for e in errors])


def _count(count: int, n: int) -> str:
    return f"{count} ({count / n:.0%})" if n else "–"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
