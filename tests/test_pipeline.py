"""The relax → hull → S.U.N. pipeline: the S.U.N. protocols on hand-made E_hull vectors where they disagree, and
real CHGNet relaxations placed on a real Al–Rh hull (MP-20 rows), every attempt counted."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from wyckoff_lab.core import datasets
from wyckoff_lab.core.metrics import (
    COMPOSABLE_VSUN,
    FLOWMM_SUN,
    MATTERGEN_SUN,
    OURS_MSUN,
    OURS_SUN,
    SunFlags,
    sun_protocols,
)
from wyckoff_lab.core.pipeline import HullBook, relax_and_place, sun_summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rocksalt(a: float = 5.64, cation: str = "Na") -> Structure:
    return Structure.from_spacegroup(225, Lattice.cubic(a), [cation, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cscl_type(cation: str = "Na", a: float = 3.3) -> Structure:
    return Structure(Lattice.cubic(a), [cation, "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def zincblende_type() -> Structure:
    return Structure.from_spacegroup(216, Lattice.cubic(6.0), ["Na", "Cl"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def fcc(symbol: str, a: float) -> Structure:
    return Structure.from_spacegroup(225, Lattice.cubic(a), [symbol], [[0, 0, 0]])


def colliding(cation: str) -> Structure:
    return Structure(Lattice.cubic(4.0), [cation, "Cl"], [[0, 0, 0], [0.05, 0, 0]])  # 0.2 Å apart: invalid


# Index: what it is | E_hull (eV/atom) | why the protocols part ways on it
CASES = [
    (rocksalt(), -0.01),  # 0 known (the reference): novel nowhere
    (cscl_type(), 0.0),  # 1 stable, unique, novel compound: counted by every protocol
    (cscl_type(), 0.0),  # 2 a copy of 1: never unique
    (zincblende_type(), 0.05),  # 3 metastable only: M.S.U.N., MatterGen, V.S.U.N.; not S.U.N. at 0
    (fcc("Cu", 3.6), -0.1),  # 4 one element: below the hull, but ours needs two elements
    (colliding("Na"), math.nan),  # 5 invalid and never relaxed: no energy, nowhere
    (colliding("K"), 0.05),  # 6 structurally invalid: only MatterGen's (no validity rule) counts it
    (cscl_type("K", 3.7), 0.3),  # 7 unique among all and among the valid, but unstable
    (cscl_type("K", 3.7), -0.01),  # 8 a copy of 7 that is stable: unique only among the stable (FlowMM)
    (Structure(Lattice.cubic(4.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]]), 0.05),
    # 9 structurally valid, SMACT-invalid NaCl2: ours M.S.U.N. and MatterGen count it, V.S.U.N. does not
    (fcc("Al", 4.05), 0.02),  # 10 one element, metastable: MatterGen and V.S.U.N. only
]
STRUCTURES = [s for s, _ in CASES]
E_HULL = [e for _, e in CASES]
EXPECTED = {  # by hand from the definitions, per index above
    OURS_SUN.name: {1},
    OURS_MSUN.name: {1, 3, 9},
    MATTERGEN_SUN.name: {1, 3, 4, 6, 9, 10},
    FLOWMM_SUN.name: {1, 4, 8},
    COMPOSABLE_VSUN.name: {1, 3, 4, 10},
}


@pytest.fixture(scope="module")
def flags() -> SunFlags:
    return SunFlags(STRUCTURES, [rocksalt()])


def test_each_protocol_counts_what_its_paper_defines(flags):
    for protocol in (OURS_SUN, OURS_MSUN, MATTERGEN_SUN, FLOWMM_SUN, COMPOSABLE_VSUN):
        counted = set(np.flatnonzero(flags.counted(protocol, E_HULL)))
        assert counted == EXPECTED[protocol.name], protocol.name
    table = sun_protocols(flags, E_HULL)
    assert {name: row["n"] for name, row in table.items()} == {k: len(v) for k, v in EXPECTED.items()}
    assert table[MATTERGEN_SUN.name]["rate"] == pytest.approx(6 / len(CASES))  # over every structure
    assert table[COMPOSABLE_VSUN.name]["label"] == "V.S.U.N. (Composable Crystals)"
    assert "Composable Crystals" in table[COMPOSABLE_VSUN.name]["source"]
    assert "unique among the stable ones" in table[FLOWMM_SUN.name]["definition"]


def test_thresholds_are_inclusive_where_the_papers_say_so(flags):
    at_limit = [0.1 if i == 3 else e for i, e in enumerate(E_HULL)]  # the zincblende type exactly at 0.1 eV/atom
    assert 3 in np.flatnonzero(flags.counted(MATTERGEN_SUN, at_limit))  # MatterGen: <= 0.1
    assert 3 not in np.flatnonzero(flags.counted(COMPOSABLE_VSUN, at_limit))  # Composable Crystals: below 0.1
    assert 3 not in np.flatnonzero(flags.counted(OURS_MSUN, at_limit))


def test_summary_keeps_ours_at_the_top_and_every_protocol_beside_it():
    summary = sun_summary(STRUCTURES, E_HULL, [rocksalt()]).as_dict()
    protocols = summary["sun_protocols"]
    assert summary["n"] == len(CASES) and summary["n_struct_valid"] == 9
    assert summary["n_sun"] == protocols[OURS_SUN.name]["n"] == 1
    assert summary["n_msun"] == protocols[OURS_MSUN.name]["n"] == 3
    assert summary["n_vsun"] == protocols[COMPOSABLE_VSUN.name]["n"] == 4
    assert summary["n_e_above_hull"] == len(CASES) - 1  # the NaN is counted in n, not in the E_hull statistics
    with pytest.raises(ValueError, match="energies above hull"):
        sun_summary(STRUCTURES, E_HULL[:-1], [rocksalt()])


# -- real relaxations on a real hull ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def al_rh_mp20(al_rh_rows, tmp_path_factory):
    """MP-20's Al–Rh rows (AlRh mp-364, Rh mp-74) served as "mp_20", with a hull cache of this module's own."""
    structures, ids, energies = al_rh_rows
    frame = pd.DataFrame({"material_id": ids, "split": "test",
                          "formula": [s.composition.reduced_formula for s in structures],
                          "chemsys": [s.composition.chemical_system for s in structures],
                          "num_atoms": [len(s) for s in structures], "formation_energy_per_atom": energies})
    dataset = datasets.CrystalDataset(
        "mp_20", "test", frame, lattices=np.array([s.lattice.matrix for s in structures]),
        frac_coords=np.concatenate([s.frac_coords for s in structures]),
        atomic_numbers=np.concatenate([s.atomic_numbers for s in structures]).astype(np.uint8),
        offsets=np.concatenate([[0], np.cumsum([len(s) for s in structures])]), failures={})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets, "load_dataset", lambda name, split="all", **kwargs: dataset)
        mp.setenv("WYCKOFF_LAB_CACHE", str(tmp_path_factory.mktemp("pipeline-cache")))
        yield structures


def test_relaxed_candidates_are_placed_and_every_failure_is_counted(al_rh_mp20):
    from wyckoff_lab.core.relax import load_potential

    alrh = next(s for s in al_rh_mp20 if s.composition.reduced_formula == "AlRh")
    doubled = alrh.copy()
    doubled.make_supercell([2, 1, 1])  # a conventional-like cell: relaxed in its primitive cell
    strained = alrh.copy()
    strained.apply_strain(0.03)
    too_close = Structure(Lattice.cubic(3.0), ["Al", "Rh"], [[0, 0, 0], [0.05, 0, 0]])  # relax() refuses it
    book = HullBook(load_potential("chgnet", "cpu"), max_references=1, max_steps=200)
    placed = relax_and_place([doubled, strained, too_close], book)
    statuses = [r.status for r in placed.relaxation.results]
    assert statuses[:2] == ["converged", "converged"] and statuses[2] == "atoms_too_close"
    assert len(placed.structures) == len(placed.e_above_hull) == 3  # one entry per structure given
    assert len(placed.structures[0]) == len(alrh)  # the primitive cell was relaxed
    assert placed.structures[2] is too_close  # a failed relaxation keeps the input structure
    assert placed.e_above_hull[0] == pytest.approx(0.0, abs=5e-3)  # the known phase lands on its own hull
    assert placed.e_above_hull[1] == pytest.approx(0.0, abs=5e-3) and math.isnan(placed.e_above_hull[2])
    row = placed.as_dict()
    assert row["relaxed"] == 2 and row["relax_status"] == {"converged": 2, "atoms_too_close": 1}
    assert row["hull_systems"] == 1 and row["hull_failed"] == 0
    # The hull was built once; a second batch of the same system reuses it.
    hull = book.get(("Rh", "Al"))
    relax_and_place([strained], book)
    assert book.get(("Al", "Rh")) is hull and list(book.seconds) == [("Al", "Rh")]
    assert book.as_dict()["hull_systems"] == 1
