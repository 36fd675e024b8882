"""Exports a crystallographer trusts: CIFs with their symmetry (space group, Wyckoff-labelled asymmetric unit) and
extxyz frames whose every field, energy, forces and stress read back through ASE and pymatgen."""

from __future__ import annotations

import io
import json
import warnings
import zipfile

import numpy as np
import pytest
from ase.io import read
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.cif import CifParser
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from wyckoff_lab.core.structures import symmetrized_cif

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def parse_cif(text: str) -> Structure:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CifParser.from_str(text).parse_structures(primitive=False)[0]


def group(structure: Structure) -> int:
    return SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_number()


@pytest.fixture(scope="module")
def relaxed_records():
    """Two candidates (an R-3m and a rock salt) as the app keeps them, relaxed for a few real CHGNet steps; the
    second converges at once, so its relax_message is empty (the extxyz field that swallowed the next one)."""
    from wyckoff_lab.core.generators import Candidate, Conditions
    from wyckoff_lab.core.relax import load_potential, relax
    from wyckoff_lab.widgets.jobs import _relax_fields
    from wyckoff_lab.widgets.records import build_records

    r3m = Structure.from_spacegroup("R-3m", Lattice.hexagonal(3.0, 14.0), ["Cu", "Al"],
                                    [[0, 0, 0], [0, 0, 0.25]]).get_primitive_structure()
    rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    candidates = [Candidate(r3m, "test", Conditions(), intended_spacegroup=166),
                  Candidate(rocksalt, "test", Conditions(), intended_spacegroup=225)]
    records = build_records(candidates)
    results = relax([c.structure for c in candidates], load_potential("chgnet", "cpu"), fmax=0.5, max_steps=5)
    for record, result in zip(records, results):
        record.update(_relax_fields(result))
    return records


def test_cif_is_written_with_its_space_group_and_wyckoff_labels_and_reads_back_the_same(relaxed_records):
    from wyckoff_lab.widgets.export import cif_zip

    archive = zipfile.ZipFile(io.BytesIO(cif_zip(relaxed_records)))
    names = archive.namelist()
    assert "c001_Al2Cu_sg166.cif" in names and "c002_NaCl_sg225.cif" in names
    relaxed_name = f"c001_Al2Cu_sg166_relaxed_sg{relaxed_records[0]['relaxed_spacegroup']}.cif"
    assert relaxed_name in names  # named by the relaxed group
    for record in relaxed_records:
        original = Structure.from_dict(record["structure"])
        text = archive.read(f"{record['id']}_{record['formula']}_sg{record['intended_spacegroup']}.cif").decode()
        assert "_atom_site_Wyckoff_symbol" in text and "_symmetry_space_group_name_H-M   P 1" not in text
        back = parse_cif(text)
        assert StructureMatcher().fit(original, back) and group(back) == record["intended_spacegroup"]
    text = archive.read("c002_NaCl_sg225.cif").decode()
    assert "Fm-3m" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("Na ", "Cl "))]
    assert sorted((row[0], row[2], row[3]) for row in rows) == [("Cl", "4", "b"), ("Na", "4", "a")]
    metadata = json.loads(archive.read("candidates.json"))
    assert metadata[0]["cif_symmetry"].startswith("space group 166")
    assert metadata[0]["relaxed_cif_symmetry"].startswith("space group")


def test_a_structure_without_detectable_symmetry_falls_back_to_p1_with_a_note():
    flat = Structure(Lattice([[4, 0, 0], [0, 4, 0], [0, 0, 1e-5]]), ["Cu", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    text, note = symmetrized_cif(flat)
    assert note.startswith("P 1: symmetry detection failed") and "P 1" in text


def test_extxyz_fields_energy_forces_and_stress_read_back_through_ase_and_pymatgen(relaxed_records):
    from wyckoff_lab.widgets.export import extxyz, metadata

    text = extxyz(relaxed_records)
    frames = read(io.StringIO(text), index=":", format="extxyz")
    assert len(frames) == 2
    for atoms, record in zip(frames, relaxed_records):
        assert atoms.info["relax_steps"] == record["relax_steps"]  # was swallowed by an empty relax_message=
        written = metadata(record)
        for key, value in written.items():
            if key in ("energy",):
                continue
            if isinstance(value, (int, float, str, bool)) and value is not None and value != "":
                assert atoms.info[key] == pytest.approx(value) if isinstance(value, float) else \
                    atoms.info[key] == value, key
        assert json.loads(atoms.info["wyckoff_lab"]) == json.loads(json.dumps(written, default=str))
        assert atoms.info["relaxed"] is True
        # the frame's results: energy, forces and stress of the relaxed structure
        assert atoms.get_potential_energy() == pytest.approx(record["energy"])
        assert np.allclose(atoms.get_forces(), record["forces"], atol=1e-6)
        assert np.allclose(atoms.get_stress(), record["stress"], atol=1e-8)
        structure = AseAtomsAdaptor.get_structure(atoms)
        assert StructureMatcher().fit(structure, Structure.from_dict(record["relaxed_structure"]))
        # pymatgen keeps the frame's calculator results (energy, forces, stress) on structure.calc
        assert np.allclose(structure.calc.results["forces"], record["forces"], atol=1e-6)
        assert structure.calc.results["energy"] == pytest.approx(record["energy"])
        assert np.allclose(structure.calc.results["stress"], record["stress"], atol=1e-8)
        assert structure.properties["relax_steps"] == record["relax_steps"]
    assert relaxed_records[1]["relax_message"] == ""  # the case of the report: an empty message
    assert "relax_message" not in frames[1].info and frames[1].info["relax_steps"] == relaxed_records[1]["relax_steps"]


def test_empty_and_none_values_are_left_out_of_the_info_line_not_written_bare(tmp_path):
    from ase import Atoms

    from wyckoff_lab.core.structures import write_extxyz

    atoms = Atoms("Cu", cell=[3, 3, 3], pbc=True)
    quoted = json.dumps({"message": 'said "no" \\ twice'})
    atoms.info.update({"relax_message": "", "relax_steps": 194, "note": None, "label": "a b=c", "flag": "T",
                       "blob": quoted})
    write_extxyz(tmp_path / "x.extxyz", [atoms])
    (back,) = read(tmp_path / "x.extxyz", index=":")
    assert back.info["relax_steps"] == 194 and back.info["label"] == "a b=c"
    assert "relax_message" not in back.info and "note" not in back.info
    # what ASE would mangle (a backslash, escaped quotes; "T" read as True) comes back exactly from hex
    assert bytes.fromhex(back.info["blob_hex"].removeprefix("hex:")).decode() == quoted
    assert bytes.fromhex(back.info["flag_hex"].removeprefix("hex:")).decode() == "T" and back.info["relax_steps"] == 194
