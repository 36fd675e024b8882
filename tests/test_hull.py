"""Convex hull with real CHGNet on Al–Rh from real MP-20 rows: stability, strain, caching, consistency, CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
from ase.calculators.calculator import Calculator, all_changes
from pymatgen.core import Structure

from wyckoff_lab.app.cli import main
from wyckoff_lab.core import datasets
from wyckoff_lab.core.hull import HULL_CACHE_VERSION, HullReference, InconsistentEnergiesError, elemental_structure
from wyckoff_lab.core.relax import relax

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ELEMENTS = ("Al", "Rh")


@pytest.fixture(scope="module")
def al_rh_dataset(al_rh_rows):
    """The MP-20 test rows of the Al–Rh system (AlRh mp-364, Rh mp-74; no Al), plus a second, synthetic AlRh row
    with a higher DFT formation energy that max_references=1 must drop. Parsing only these rows keeps it fast."""
    structures, ids, energies = al_rh_rows
    structures = list(structures)  # the decoy is appended to this module's copy, not to the shared rows
    frame = pd.DataFrame({
        "material_id": ids,
        "split": "test",
        "formula": [s.composition.reduced_formula for s in structures],
        "chemsys": [s.composition.chemical_system for s in structures],
        "num_atoms": [len(s) for s in structures],
        "formation_energy_per_atom": energies,
    })
    alrh = int(np.flatnonzero(frame["formula"] == "AlRh")[0])
    decoy = structures[alrh].copy()
    decoy.apply_strain(0.05)
    frame.loc[len(frame)] = ["synthetic-decoy", "test", "AlRh", "Al-Rh", 2, -0.5]
    structures.append(decoy)
    return datasets.CrystalDataset(
        "mp_20", "test", frame,
        lattices=np.array([s.lattice.matrix for s in structures]),
        frac_coords=np.concatenate([s.frac_coords for s in structures]),
        atomic_numbers=np.concatenate([s.atomic_numbers for s in structures]).astype(np.uint8),
        offsets=np.concatenate([[0], np.cumsum([len(s) for s in structures])]),
        failures={},
    )


@pytest.fixture(scope="module")
def hull_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hull-cache")


@pytest.fixture
def small_mp20(al_rh_dataset, hull_cache_dir, monkeypatch):
    """Serve the Al–Rh rows as "mp_20", with a cache folder of this module's own (its hull key names mp_20)."""
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split="all", **kwargs: al_rh_dataset)
    monkeypatch.setenv("WYCKOFF_LAB_CACHE", str(hull_cache_dir))


@pytest.fixture(scope="module")
def hull(al_rh_dataset, hull_cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets, "load_dataset", lambda name, split="all", **kwargs: al_rh_dataset)
        mp.setenv("WYCKOFF_LAB_CACHE", str(hull_cache_dir))
        return HullReference.build(ELEMENTS, potential="chgnet", max_references=1, max_steps=200)


def strained_and_rattled(structure: Structure, strain: float = 0.02, rattle_a: float = 0.05) -> Structure:
    copy = structure.copy()
    copy.apply_strain(strain)
    copy.perturb(rattle_a, seed=1)
    return copy


def test_references_and_known_stable_phase(hull):
    by_formula = {r.formula: r for r in hull.references}
    assert set(by_formula) == {"AlRh", "Rh", "Al"} and len(hull.references) == 3  # decoy AlRh dropped
    assert by_formula["AlRh"].source == "mp-364"
    assert by_formula["Al"].source == "ase.build.bulk('Al')"  # no Al row: ASE's fcc Al stands in
    assert all(r.status == "converged" and r.on_hull for r in hull.references)
    # CHGNet agrees with DFT (Ef = -1.09 eV/atom) that AlRh is strongly bound.
    e_al, e_rh = by_formula["Al"].energy_per_atom, by_formula["Rh"].energy_per_atom
    assert by_formula["AlRh"].energy_per_atom - (e_al + e_rh) / 2 < -0.5
    assert hull.summary()["n_on_hull"] == 3 and hull.relax_time_s > 0 and not hull.from_cache


def test_relaxed_copy_on_hull_and_strained_copy_above(hull):
    alrh = next(r.structure for r in hull.references if r.formula == "AlRh")
    start = strained_and_rattled(alrh)
    unrelaxed = relax(start, hull.potential, max_steps=0)[0]  # single point: same potential, so comparable
    on_hull, above = hull.e_above_hull([alrh, unrelaxed])
    assert on_hull.e_above_hull == pytest.approx(0.0, abs=2e-3) and on_hull.decomposition == {"AlRh": 1.0}
    assert above.e_above_hull > 0.01 and above.result.steps == 0
    (relaxed_back,) = hull.e_above_hull([start])  # relaxed here with the hull's settings
    assert relaxed_back.status == "converged" and relaxed_back.e_above_hull < above.e_above_hull
    assert relaxed_back.e_above_hull == pytest.approx(0.0, abs=5e-3)


def test_off_stoichiometry_candidate_decomposes_into_neighbours(hull):
    al_rich = next(r.structure for r in hull.references if r.formula == "AlRh").copy()
    al_rich.make_supercell([2, 1, 1])
    al_rich.replace(next(i for i, site in enumerate(al_rich) if site.specie.symbol == "Rh"), "Al")  # Al3Rh
    (point,) = hull.e_above_hull([relax(al_rich, hull.potential, max_steps=0)[0]])
    # CHGNet puts even this unrelaxed Al3Rh slightly below AlRh + Al (about -0.03 eV/atom): a negative value means
    # "below the reference hull", i.e. a would-be new stable phase, and is reported as such.
    assert point.formula == "Al3Rh" and np.isfinite(point.e_above_hull)
    assert set(point.decomposition) == {"AlRh", "Al"}
    assert sum(point.decomposition.values()) == pytest.approx(1.0)


def test_hull_references_are_cached(hull, small_mp20, hull_cache_dir):
    t0 = time.perf_counter()
    again = HullReference.build(ELEMENTS, potential="chgnet", max_references=1, max_steps=200)
    assert again.from_cache and again.relax_time_s == 0.0 and time.perf_counter() - t0 < 5
    assert len(again.references) == 3
    # The entry holds pymatgen's own PhaseDiagram.as_dict(), read back as the same hull.
    (entry,) = (hull_cache_dir / "hull").glob("Al-Rh_*.json")
    data = json.loads(entry.read_text())
    assert data["format_version"] == HULL_CACHE_VERSION and data["diagram"]["@class"] == "PhaseDiagram"
    fresh = {r.source: (r.e_above_hull, r.on_hull) for r in hull.references}
    assert {r.source: (r.e_above_hull, r.on_hull) for r in again.references} == fresh
    alrh = next(r for r in hull.references if r.formula == "AlRh")
    probe = relax(strained_and_rattled(alrh.structure), hull.potential, max_steps=0)[0]
    assert again.e_above_hull([probe])[0].e_above_hull == hull.e_above_hull([probe])[0].e_above_hull


def test_a_stored_hull_is_drawn_and_used_without_computing_it_again(hull, monkeypatch):
    """The app keeps the hull as data once (jobs.hull_data); redraws and placements never build a convex hull."""
    from pymatgen.analysis.phase_diagram import PhaseDiagram
    from pymatgen.core import Composition

    from wyckoff_lab.widgets.hull import hull_figure
    from wyckoff_lab.widgets.jobs import hull_data, place_on_hull

    data = hull_data(hull)

    def no_new_hull(self, *args, **kwargs):
        raise AssertionError("a convex hull was computed again")

    monkeypatch.setattr(PhaseDiagram, "_compute", no_new_hull)
    placed = place_on_hull(data, Composition("AlRh"), hull.references[0].energy_per_atom + 0.1,
                           hull.settings.potential_identity)
    assert placed["e_above_hull"] > 0 and placed["decomposition"]
    figure = hull_figure(data, [{"id": "c001", "label": 1, "formula": "AlRh", "sg_label": "Pm-3m (221)", **placed}])
    assert any(trace.name == "candidates" for trace in figure.data)
    assert len(data["tie_lines"]) == 2  # Al–AlRh and AlRh–Rh


class ConstantCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        n = len(atoms)
        self.results = {"energy": -5.0 * n, "free_energy": -5.0 * n, "forces": np.zeros((n, 3)), "stress": np.zeros(6)}


def test_mixing_potentials_raises(hull):
    alrh = next(r.structure for r in hull.references if r.formula == "AlRh")
    foreign = relax(alrh, potential=ConstantCalculator(), max_steps=0)[0]
    with pytest.raises(InconsistentEnergiesError, match="cannot go on a hull built with 'chgnet:"):
        hull.e_above_hull([foreign])


def test_candidate_outside_the_system(hull):
    with pytest.raises(ValueError, match="outside the Al-Rh hull"):
        hull.e_above_hull([elemental_structure("Cu")[0]])


def test_unknown_element():
    with pytest.raises(ValueError, match="unknown element"):
        HullReference.build(["Al", "Xx"], potential="chgnet")


def test_elemental_stand_ins():
    oxygen, note = elemental_structure("O")
    assert note.startswith("O2 dimer") and len(oxygen) == 2
    assert 1.0 < oxygen.get_distance(0, 1) < 1.6
    boron, note = elemental_structure("B")  # ASE's B needs a basis: fcc guess from the atomic radius
    assert note.startswith("fcc guess") and len(boron) == 1


def test_cli_hull_json(hull, small_mp20, tmp_path, capsys):
    alrh = next(r.structure for r in hull.references if r.formula == "AlRh")
    strained_and_rattled(alrh).to(filename=str(tmp_path / "alrh_strained.cif"))
    code = main(["hull", "--elements", "Al,Rh", "--candidates", str(tmp_path), "--potential", "chgnet",
                 "--max-references", "1", "--max-steps", "200", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["elements"] == ["Al", "Rh"] and report["from_cache"]
    assert {r["formula"] for r in report["references"]} == {"Al", "Rh", "AlRh"}
    (candidate,) = report["candidates"]
    assert candidate["formula"] == "AlRh" and candidate["e_above_hull_eV"] == pytest.approx(0.0, abs=5e-3)
    assert candidate["decomposition"] == {"AlRh": 1.0} and report["wall_time_s"] > 0


def test_cli_hull_errors(capsys):
    assert main(["hull", "--elements", "Al,Qq", "--json"]) == 2
    assert "unknown element" in json.loads(capsys.readouterr().out)["message"]
