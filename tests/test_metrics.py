"""Tests of the evaluation metrics and the `evaluate` command, on hand-built crystals and real MP-20 rows."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from wyckoff_lab.core import metrics as M


@functools.lru_cache(maxsize=None)
def _from_spacegroup(number: int, a: float, species: tuple, coords: tuple) -> Structure:
    return Structure.from_spacegroup(number, Lattice.cubic(a), list(species), [list(c) for c in coords])


def rocksalt(a: float = 5.64) -> Structure:
    # from_spacegroup costs ~0.7 s (it builds the group's operations), so build once and hand out copies.
    return _from_spacegroup(225, a, ("Na", "Cl"), ((0, 0, 0), (0.5, 0.5, 0.5))).copy()


def silicon() -> Structure:
    return _from_spacegroup(227, 5.43, ("Si",), ((0, 0, 0),)).copy()  # diamond (origin choice 1: Si on 8a)


def cscl() -> Structure:
    return Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def perturbed(structure: Structure, distance: float, seed: int = 0) -> Structure:
    """A copy with every atom displaced by `distance` Å in a random direction."""
    rng = np.random.default_rng(seed)
    copy = structure.copy()
    for i in range(len(copy)):
        vector = rng.normal(size=3)
        copy.translate_sites([i], distance * vector / np.linalg.norm(vector), frac_coords=False)
    return copy


# -- validity ------------------------------------------------------------------------------------------------------


def test_known_crystals_are_valid():
    structures = [rocksalt(), silicon(), cscl()]
    assert M.structural_validity(structures).all()
    assert M.bond_consistency(structures).all()
    assert M.compositional_validity(structures).all()
    assert M.min_interatomic_distance(rocksalt()) == pytest.approx(5.64 / 2)


def test_real_mp20_rows_are_structurally_valid_and_keep_their_space_group(mp20_test_rows):
    rows = mp20_test_rows[:30]
    structures = [s for _, s, _ in rows]
    assert M.structural_validity(structures).all()
    infos = M.analyze_symmetry(structures)
    consistent = M.spacegroup_consistency([i.spacegroup for i in infos], [sg for _, _, sg in rows])
    assert consistent.mean() == 1.0
    # SymADiT: about 90 % of MP-20 passes SMACT; a handful of rows is enough to see it is not trivially 0 or 1.
    assert 0.5 < M.compositional_validity([s for _, s, _ in mp20_test_rows]).mean() < 1.0


def test_close_atoms_fail_structural_validity():
    close = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.06, 0, 0]])  # 0.3 Å apart
    assert not M.structural_validity([close])[0]
    assert not M.bond_consistency([close])[0]
    assert M.min_interatomic_distance(close) == pytest.approx(0.3)
    # Between the two thresholds: structurally valid, but not bond consistent.
    middle = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.12, 0, 0]])  # 0.6 Å
    assert M.structural_validity([middle])[0] and not M.bond_consistency([middle])[0]


def test_contact_ratio_scales_distances_by_covalent_radii():
    # Na (1.66 Å) and Cl (1.02 Å) in rocksalt: 2.82 Å apart, a typical ionic contact
    assert M.min_contact_ratio(rocksalt()) == pytest.approx(2.82 / (1.66 + 1.02), abs=0.01)
    # 0.77 Å clears the 0.7 Å bond-consistency limit, but for Li (1.28 Å) and Mn (1.50 Å) it is an overlap
    overlap = Structure(Lattice.cubic(6.0), ["Li", "Mn"], [[0, 0, 0], [0.77 / 6.0, 0, 0]])
    assert M.min_interatomic_distance(overlap) > 0.7 and M.min_contact_ratio(overlap) == pytest.approx(0.77 / 2.78)
    # a one-atom cell against its own images: Cs (2.44 Å) every 2.5 Å
    assert M.min_contact_ratio(Structure(Lattice.cubic(2.5), ["Cs"], [[0, 0, 0]])) == pytest.approx(2.5 / 4.88)


def test_single_atom_cell_sees_its_periodic_images():
    tiny = Structure(Lattice.cubic(0.4), ["Cu"], [[0, 0, 0]])  # the atom is 0.4 Å from its own image
    assert M.min_interatomic_distance(tiny) == pytest.approx(0.4)
    assert not M.structural_validity([tiny])[0]
    # A skewed cell: the shortest image distance is a combination of the cell vectors, not a cell edge.
    skewed = Structure(Lattice([[3, 0, 0], [2.9, 0.3, 0], [0, 0, 3]]), ["Cu"], [[0, 0, 0]])
    assert M.min_interatomic_distance(skewed) == pytest.approx(np.hypot(0.1, 0.3))
    assert M.structural_validity([Structure(Lattice.cubic(2.5), ["Po"], [[0, 0, 0]])])[0]


def test_tiny_volume_fails_structural_validity():
    flat = Structure(Lattice([[5, 0, 0], [0, 5, 0], [0, 0, 0.001]]), ["Cu"], [[0, 0, 0]])
    assert not M.structural_validity([flat])[0]


@pytest.mark.parametrize("formula, valid", [("NaCl", True), ("Fe2O3", True), ("LiFePO4", True), ("NaCl2", False),
                                            ("Na2Cl", False), ("CuZn", True), ("Si", True)])
def test_smact_charge_neutrality_and_alloys(formula, valid):
    assert M.smact_valid(formula) is valid


# -- symmetry ------------------------------------------------------------------------------------------------------


def test_spacegroup_consistency_on_perturbed_cubic_crystal():
    slightly = perturbed(rocksalt(), 0.01)
    strongly = perturbed(rocksalt(), 0.4, seed=1)
    infos = M.analyze_symmetry([rocksalt(), slightly, strongly], symprec=0.1)
    assert [i.spacegroup for i in infos[:2]] == [225, 225]
    assert infos[2].spacegroup != 225
    consistency = M.spacegroup_consistency([i.spacegroup for i in infos], [225, 225, 225])
    assert consistency.tolist() == [1.0, 1.0, 0.0]
    assert np.isnan(M.spacegroup_consistency([225], [None])[0])
    assert M.p1_rate([1, 225, 1, None]) == 0.5
    assert infos[0].wyckoff_letters == ("a", "b")


# -- uniqueness and novelty ----------------------------------------------------------------------------------------


def test_duplicates_are_not_unique():
    structure = rocksalt()
    copies = [structure, structure.copy(), rocksalt(5.70), perturbed(structure, 0.02)]  # all the same crystal
    assert M.uniqueness(copies) == pytest.approx(1 / 4)
    assert M.unique_flags(copies).tolist() == [True, False, False, False]
    assert M.uniqueness([rocksalt(), cscl(), silicon()]) == 1.0


def test_novelty_against_itself_and_a_disjoint_reference():
    sample = [rocksalt(), silicon(), cscl()]
    assert M.novelty(sample, sample) == 0.0
    assert M.novelty(sample, [Structure(Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]])]) == 1.0
    # Same formula, different crystal: CsCl structure vs rock salt NaCl... and NaCl in the CsCl structure.
    nacl_in_cscl_type = Structure(Lattice.cubic(3.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert M.novel_flags([nacl_in_cscl_type, rocksalt(5.5)], [rocksalt()]).tolist() == [True, False]


# -- distributions -------------------------------------------------------------------------------------------------


def test_js_distance_is_zero_against_itself_and_one_for_disjoint_supports():
    groups = [225, 225, 62, 14, 1]
    assert M.spacegroup_js_distance(groups, groups) == pytest.approx(0.0, abs=1e-12)
    assert M.spacegroup_js_distance([225, 62], [14, 1]) == pytest.approx(1.0)
    # Two equal halves, one group shared: divergence 1/2 (base 2), so the distance is its square root.
    assert M.spacegroup_js_distance([225, 62], [225, 14]) == pytest.approx(math.sqrt(0.5))


def test_wyckoff_js_distance_weights_space_groups_by_sample_counts():
    info = M.SymmetryInfo
    sample = [info(225, ("a", "b")), info(225, ("a", "b")), info(62, ("c",))]
    assert M.wyckoff_js_distance(sample, sample) == pytest.approx(0.0, abs=1e-12)
    # 225 matches the reference exactly, 62 has disjoint letters: (2 * 0 + 1 * 1) / 3.
    reference = [info(225, ("a", "b")), info(62, ("d",))]
    assert M.wyckoff_js_distance(sample, reference) == pytest.approx(1 / 3)
    # A space group the reference never uses counts as maximally distant.
    assert M.wyckoff_js_distance([info(12, ("i",))], reference) == 1.0


def test_wasserstein_of_atom_counts_compares_primitive_cells():
    sample = [rocksalt(), silicon()]  # F-centred conventional cells of 8 atoms, 2 in the primitive cell
    assert M.primitive_num_atoms(sample) == [2, 2]
    assert M.num_atoms_wasserstein(sample, sample) == 0.0
    assert M.num_atoms_wasserstein(sample, [cscl()]) == 0.0  # CsCl: 2 atoms, primitive as written
    assert M.num_atoms_wasserstein(sample, [8, 8]) == pytest.approx(6.0)  # counts are taken as primitive ones
    doubled = cscl().make_supercell([1, 1, 2], in_place=False)  # a P supercell is reduced too
    assert M.num_atoms_wasserstein([doubled], [cscl()]) == 0.0
    assert M.density_wasserstein(sample, sample) == 0.0


# -- stability compounds -------------------------------------------------------------------------------------------


def test_sun_arithmetic_on_a_hand_made_example():
    e_hull = [-0.01, 0.0, 0.05, 0.05, 0.2, math.nan]
    result = M.sun_metrics(
        e_hull,
        struct_valid=[True, True, True, True, True, False],
        comp_valid=[True, True, False, True, True, True],
        unique=[True, True, True, False, True, True],
        novel=[True, False, True, True, True, True],
        n_elements=[2, 2, 3, 2, 2, 2],
    )
    assert result["n_stable"] == 2  # -0.01 and 0.0: on or below the hull
    assert result["n_metastable"] == 4  # < 0.1 eV/atom
    assert result["n_sun"] == 1  # index 0 (index 1 is not novel)
    assert result["n_msun"] == 2  # indices 0 and 2 (3 is a duplicate)
    assert result["n_vsun"] == 1  # index 2 fails SMACT
    assert result["sun_rate"] == pytest.approx(1 / 6) and result["msun_rate"] == pytest.approx(2 / 6)
    # Elements are compounds only: a one-element crystal on the hull is not counted as stable.
    single = M.sun_metrics([0.0], struct_valid=[True], comp_valid=[True], unique=[True], novel=[True], n_elements=[1])
    assert single["n_sun"] == 0
    unknown = M.sun_metrics(None, struct_valid=[True], comp_valid=[True], unique=[True], novel=[True], n_elements=[2])
    assert math.isnan(unknown["sun_rate"]) and unknown["n_sun"] is None


# -- structure prediction ------------------------------------------------------------------------------------------


def test_match_rate_and_rmsd_of_perturbed_copies():
    targets = [rocksalt(), silicon()]
    candidates = [[cscl(), perturbed(rocksalt(), 0.05)],  # the match is the second candidate
                  [cscl()]]  # no match for silicon
    top2 = M.match_rate_and_rmsd(candidates, targets)
    assert top2["match_rate"] == 0.5 and top2["n_matched"] == 1
    assert 0 < top2["rmsd"] < 0.05
    assert top2["per_target_rmsd"][1] is None
    clash = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])
    assert M.match_rate_and_rmsd([[clash]], [rocksalt()], valid_only=True)["n_matched"] == 0
    top1 = M.match_rate_and_rmsd(candidates, targets, k=1)
    assert top1["match_rate"] == 0.0 and top1["rmsd"] is None


# -- evaluate ------------------------------------------------------------------------------------------------------


def test_evaluate_returns_strict_json_with_every_metric():
    sample = [rocksalt(), rocksalt(), silicon(), Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.06, 0, 0]])]
    reference = [silicon(), cscl()]
    result = M.evaluate(sample, reference, intended_spacegroups=[225, 221, None, None],
                        e_above_hull=[0.0, 0.0, 0.0, 0.0])
    json.dumps(result, allow_nan=False)
    assert result["n"] == 4 and result["n_struct_valid"] == 3
    assert result["uniqueness"] == pytest.approx(2 / 3)  # rocksalt twice + silicon
    assert result["novelty"] == pytest.approx(1 / 2)  # of the 2 unique: silicon is in the reference
    assert result["sg_consistency"] == pytest.approx(1 / 2) and result["n_sg_checked"] == 2
    assert result["n_sun"] == 1  # the first rock salt; silicon is an element and not novel
    for key in ("sg_js_distance", "wyckoff_js_distance", "sg_js_floor", "wyckoff_js_floor", "num_atoms_wasserstein",
                "density_wasserstein", "p1_rate", "p1_rate_pymatgen", "validity", "uniqueness_adit_tol",
                "novelty_adit_tol"):
        assert result[key] is not None, key
    assert result["n_attempts"] == 4  # no gate said otherwise
    no_ref = M.evaluate(sample)
    assert no_ref["novelty"] is None and no_ref["sg_js_distance"] is None and no_ref["sun_rate"] is None
    assert no_ref["novelty_adit_tol"] is None and no_ref["uniqueness_adit_tol"] == pytest.approx(2 / 3)


# -- command line --------------------------------------------------------------------------------------------------


def _write_inputs(folder):
    rocksalt().to(filename=str(folder / "nacl_sg225.cif"))
    silicon().to(filename=str(folder / "si_sg227.cif"))
    perturbed(rocksalt(), 0.4, seed=1).to(filename=str(folder / "broken_sg225.cif"))
    (folder / "garbage.cif").write_text("data_nothing\n_cell_length_a what\n")
    disordered = Structure(Lattice.cubic(4.0), [{"Cu": 0.5, "Au": 0.5}], [[0, 0, 0]])
    disordered.to(filename=str(folder / "cuau_disordered.cif"))


def test_cli_evaluate_json_on_a_folder(tmp_path, capsys, monkeypatch):
    from wyckoff_lab.app.cli import main
    from wyckoff_lab.app.commands import evaluate as command

    _write_inputs(tmp_path)
    reference = [silicon(), cscl()]
    monkeypatch.setattr(command, "load_reference",
                        lambda name, split, symprec, progress: (reference, M.ReferenceStats.from_structures(reference)))
    code = main(["evaluate", "--input", str(tmp_path), "--reference", "tiny", "--spacegroups-from-filename", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["n"] == 3 and result["n_files_failed"] == 2
    assert {f["file"] for f in result["failed_files"]} == {"garbage.cif", "cuau_disordered.cif"}
    assert "disordered" in next(f["reason"] for f in result["failed_files"] if f["file"] == "cuau_disordered.cif")
    assert result["n_sg_checked"] == 3 and result["n_sg_consistent"] == 2
    assert result["novelty"] == pytest.approx(2 / 3)  # silicon is in the reference
    assert result["n_reference"] == 2


def test_cli_evaluate_text_and_intended_sg_json(tmp_path, capsys):
    from wyckoff_lab.app.cli import main

    rocksalt().to(filename=str(tmp_path / "a.cif"))
    silicon().to(filename=str(tmp_path / "b.cif"))
    intents = tmp_path / "intended.json"
    intents.write_text(json.dumps({"a": 225, "b.cif": 1}))
    e_hull = tmp_path / "ehull.json"
    e_hull.write_text(json.dumps([0.0, 0.05]))
    assert main(["evaluate", "--input", str(tmp_path), "--intended-sg-json", str(intents),
                 "--e-above-hull-json", str(e_hull)]) == 0
    out = capsys.readouterr().out
    assert "structural validity  100.00 %" in out and "SG consistency       50.00 %" in out


def test_cli_evaluate_jsonl_records(tmp_path, capsys):
    from wyckoff_lab.app.cli import main

    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps({"structure": s.as_dict(), "spacegroup": sg})
                              for s, sg in [(rocksalt(), 225), (cscl(), 221)]))
    assert main(["evaluate", "--input", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2 and result["sg_consistency"] == 1.0


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "holds no structure files"),
    (lambda p: (p / "bad.cif").write_text("not a cif"), "no usable structure"),
])
def test_cli_evaluate_reports_bad_inputs_without_traceback(tmp_path, capsys, setup, message):
    from wyckoff_lab.app.cli import main

    setup(tmp_path)
    assert main(["evaluate", "--input", str(tmp_path), "--json"]) == 2
    error = json.loads(capsys.readouterr().out)
    assert error["error"] == "CommandError" and message in error["message"]


def test_top_k_sun_counts_targets_with_one_stable_unique_novel_candidate():
    reference = [rocksalt()]
    candidates = [[rocksalt(), cscl()],  # rock salt is known; CsCl is novel and stable -> solved
                  [silicon(), silicon()]]  # no candidate below 0.1 eV/atom -> not solved
    result = M.top_k_sun_rate(candidates, [[0.0, 0.05], [0.3, 0.2]], reference)
    assert result["top_k_sun_rate"] == 0.5 and result["n_solved"] == 1
    assert M.top_k_sun_rate(candidates, [[0.0, 0.05], [0.3, 0.2]], reference, k=1)["n_solved"] == 0


def test_relax_and_hull_groups_structures_by_chemical_system(monkeypatch):
    """The --relax wiring, with ASE's EMT as a stand-in potential and a stand-in hull (the real ones are slow)."""
    from types import SimpleNamespace

    from ase.calculators.emt import EMT

    from wyckoff_lab.app.commands.evaluate import relax_and_hull
    from wyckoff_lab.core import hull as hull_module

    systems = []

    def fake_build(elements, potential, dataset="mp_20", **kwargs):
        systems.append(tuple(elements))
        if elements == ("Au",):
            raise ValueError("no Au phases")  # one failing system must not sink the others
        value = {("Cu",): 0.0, ("Au", "Cu"): 0.05}[tuple(elements)]
        return SimpleNamespace(e_above_hull=lambda results: [SimpleNamespace(e_above_hull=value) for _ in results])

    monkeypatch.setattr(hull_module.HullReference, "build", staticmethod(fake_build))
    cu = Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cuau = Structure(Lattice.cubic(3.0), ["Cu", "Au"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    au = Structure(Lattice.cubic(4.1), ["Au"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    relaxed, e_hull, summary = relax_and_hull([cu, cuau, perturbed(cu, 0.05), au], EMT())
    assert sorted(systems) == [("Au",), ("Au", "Cu"), ("Cu",)]
    assert e_hull[:3] == [0.0, 0.05, 0.0] and math.isnan(e_hull[3])
    assert summary["n_e_above_hull"] == 3 and "Au" in summary["hull_failures"]
    assert len(relaxed) == 4 and all(isinstance(s, Structure) for s in relaxed)
