"""Relaxation with symmetry kept (FixSymmetry), the relaxed space group beside the generated one, and what
"converged" means (the atomic force criterion the user set, with the cell filter's): real CHGNet, few steps."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from wyckoff_lab.core import relax as relax_mod
from wyckoff_lab.core.relax import Evaluation, load_potential, relax

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chgnet():
    return load_potential("chgnet", "cpu")


def layered_r3m() -> Structure:
    """An R-3m Al2Cu arrangement (the kind of candidate that lost its group on relaxation), slightly rattled."""
    structure = Structure.from_spacegroup("R-3m", Lattice.hexagonal(3.0, 14.0), ["Cu", "Al"],
                                          [[0, 0, 0], [0, 0, 0.25]]).get_primitive_structure()
    structure.perturb(0.05, seed=1)
    return structure


def group(structure: Structure, symprec: float = 0.1) -> int:
    return SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number()


def test_converged_needs_the_atomic_force_below_fmax_not_only_the_filter_criterion():
    """A compressed cell scales the atomic rows of the Fréchet filter's forces (deformation gradient 0.7): ASE's
    criterion alone calls 0.06 eV/Å converged at fmax 0.05, which the UI then showed as "converged"."""
    structure = Structure(Lattice.cubic(4.0), ["Cu", "Cu"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    run = relax_mod._start(structure, relax_cell=True, cutoff=6.0, fmax=0.05)
    run.atoms.set_cell(run.atoms.cell.array * 0.7, scale_atoms=True)
    forces = np.array([[0.06, 0.0, 0.0], [-0.06, 0.0, 0.0]])
    relax_mod._judge(run, Evaluation(-8.0, forces, np.zeros(6)), step=1, fmax=0.05, max_steps=10)
    assert run.optimizer.gradient_converged(run.optimizer.optimizable.get_gradient())  # ASE's own says yes
    assert run.max_force == pytest.approx(0.06)
    assert run.status is None  # ... but the atomic force is above fmax: not converged, it keeps going


def test_real_chgnet_converged_results_have_max_atomic_force_below_fmax(chgnet, mp20_test_rows):
    structures = []
    for _, structure, _ in mp20_test_rows[:40]:
        if len(structure) <= 6:
            copy = structure.copy()
            copy.perturb(0.08, seed=3)
            structures.append(copy)
        if len(structures) == 4:
            break
    results = relax(structures, chgnet, fmax=0.1, max_steps=80, cache=False)
    converged = [r for r in results if r.status == "converged"]
    assert converged, [r.status for r in results]
    for result in converged:
        assert result.max_force < 0.1 and result.fmax == 0.1
        assert "max atomic force < 0.1 eV/Å" in result.summary()["criterion"]
        assert "cell" in result.summary()["criterion"]


def test_a_cached_converged_entry_above_fmax_is_relaxed_again(chgnet):
    """Entries written under the old criterion ("converged" at 0.054 eV/Å, fmax 0.05) are not served again."""
    structure = layered_r3m()
    (first,) = relax(structure, chgnet, fmax=0.05, max_steps=3)
    path = relax_mod._cache_path(structure, chgnet, 0.05, 3, True)
    first.status, first.max_force = "converged", 0.054
    relax_mod._store_cached(path, first)
    (again,) = relax(structure, chgnet, fmax=0.05, max_steps=3)
    assert not again.cached and again.status == "not_converged"
    (third,) = relax(structure, chgnet, fmax=0.05, max_steps=3)
    assert third.cached and third.status == "not_converged"


def test_fix_symmetry_keeps_the_space_group_and_has_its_own_cache_entry(chgnet):
    structure = layered_r3m()
    assert group(structure) == 166
    (kept,) = relax(structure, chgnet, fmax=0.05, max_steps=25, fix_symmetry=True)
    assert kept.fix_symmetry and not kept.cached and group(kept.final) == 166
    # FixSymmetry symmetrises the stress the cell filter sees: R-3m has no shear stress at all
    assert np.abs(kept.stress[3:]).max() < 1e-6
    assert kept.forces.shape == (len(structure), 3)
    (free,) = relax(structure, chgnet, fmax=0.05, max_steps=25)
    assert not free.cached and not free.fix_symmetry  # not served the FixSymmetry entry
    assert np.abs(free.stress[3:]).max() > np.abs(kept.stress[3:]).max()
    (again,) = relax(structure, chgnet, fmax=0.05, max_steps=25, fix_symmetry=True)
    assert again.cached and again.fix_symmetry and again.forces is not None and again.stress is not None
    assert "FixSymmetry" in again.summary()["criterion"]


def test_relaxed_space_group_and_symmetry_choice_reach_the_record_and_the_table(chgnet, tmp_path, mp20_al_ca_cu,
                                                                                monkeypatch):
    from wyckoff_lab.core.generators import Candidate, Conditions
    from wyckoff_lab.widgets.context import LabContext, LabSettings
    from wyckoff_lab.widgets.jobs import FIX_SYMMETRY_KEY, relax_message, relax_one
    from wyckoff_lab.widgets.records import TABLE_COLUMNS, build_records, table_rows
    from wyckoff_lab.widgets.state import new_session_id

    monkeypatch.setenv("WYCKOFF_LAB_DATA", str(mp20_al_ca_cu))
    context = LabContext(LabSettings(warm_up=False, work_dir=tmp_path / "work", relax_max_steps=6,
                                     potential="chgnet", hull_max_references=1))
    try:
        sid = new_session_id()
        candidate = Candidate(layered_r3m(), "test", Conditions(), intended_spacegroup=166)
        context.sessions.set_candidates(sid, build_records([candidate]))
        context.sessions.set(sid, FIX_SYMMETRY_KEY, True)
        summary = relax_one(context, sid, "c001", lambda frame, history: None)
        record = context.sessions.candidate(sid, "c001")
        assert record["relax_fix_symmetry"] is True and record["relaxed_spacegroup"] == 166
        assert "symmetry kept (FixSymmetry)" in relax_message(summary)
        assert "fmax 0.05 eV/Å on atoms" in relax_message(summary)
        row = table_rows([record])[0]
        assert row["relaxed_sg_label"] == "R-3m (166)" and row["relax_status"] == "converged · sym kept" or \
            row["relax_status"] == "not converged · sym kept"
        headers = {key: header for key, header, _ in TABLE_COLUMNS}
        assert headers["sg_label"] == "space group (generated)" and headers["relaxed_sg_label"]
        assert headers["natoms"] == "atoms (conv. cell)"
        # a relaxed group that differs from the generated one is marked
        changed = dict(record, relaxed_spacegroup=1)
        assert table_rows([changed])[0]["relaxed_sg_label"] == "P1 (1) changed"
    finally:
        context.sessions.close()
