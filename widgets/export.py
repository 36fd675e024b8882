"""Step 10, export: candidates as a zip of symmetrised CIFs or one extxyz file, each with the metadata the app
knows."""

from __future__ import annotations

import io
import json
import warnings
import zipfile

import numpy as np
from pymatgen.core import Structure

METADATA_KEYS = ("id", "formula", "natoms", "spacegroup", "intended_spacegroup", "relaxed_spacegroup", "symmetry",
                 "extra", "generator", "seed", "struct_valid", "comp_valid", "novel", "relaxed_novel",
                 "relaxed_unique", "sun", "min_distance", "density", "relax_status", "relax_message", "relax_steps",
                 "relax_fix_symmetry", "relax_fmax", "relax_criterion", "energy", "energy_per_atom", "max_force",
                 "potential", "e_above_hull", "formation_energy_per_atom", "decomposition", "conditions", "wyckoff")
# Written as per-frame results (ASE's energy/forces/stress), not as info fields.
RESULT_KEYS = ("energy", "forces", "stress")


def metadata(record: dict) -> dict:
    """The JSON-able metadata of one record (structures excluded: they are the files themselves)."""
    return {key: record.get(key) for key in METADATA_KEYS if key in record}


def file_stem(record: dict) -> str:
    """`<id>_<formula>_sg<N>` with the generated (detected, else intended) space group, as `write_candidates`
    names files."""
    stem = f"{record['id']}_{record['formula']}"
    number = record.get("spacegroup") or record.get("intended_spacegroup")
    return stem + (f"_sg{number}" if number else "")


def relaxed_stem(record: dict) -> str:
    """`<stem>_relaxed_sg<M>`: the relaxed file is named by the space group it has after relaxation."""
    number = record.get("relaxed_spacegroup")
    return f"{file_stem(record)}_relaxed" + (f"_sg{number}" if number else "")


def cif_zip(records: list[dict]) -> bytes:
    """A zip with each candidate as generated (`<stem>.cif`), relaxed when it was (`<stem>_relaxed_sg<M>.cif`),
    each written with its symmetry (see `structures.symmetrized_cif`), and `candidates.json` with every
    record's metadata (which also says where a CIF fell back to P1)."""
    from wyckoff_lab.core.structures import symmetrized_cif

    buffer = io.BytesIO()
    entries = []
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for record in records:
            entry = metadata(record)
            text, note = symmetrized_cif(Structure.from_dict(record["structure"]))
            archive.writestr(f"{file_stem(record)}.cif", text)
            entry["cif_symmetry"] = note
            if record.get("relaxed_structure"):
                text, note = symmetrized_cif(Structure.from_dict(record["relaxed_structure"]))
                archive.writestr(f"{relaxed_stem(record)}.cif", text)
                entry["relaxed_cif_symmetry"] = note
            entries.append(entry)
        archive.writestr("candidates.json", json.dumps(entries, indent=1, default=str))
    return buffer.getvalue()


def extxyz(records: list[dict]) -> str:
    """One extxyz frame per candidate (relaxed structure when there is one), with its energy, forces and stress
    as the frame's results, scalar metadata in its info line and the full metadata as a JSON string under
    `wyckoff_lab`. Every field written reads back through `ase.io.read` (and pymatgen's AseAtomsAdaptor); a
    string that ASE would not read back as written is stored hex-encoded under `<key>_hex`."""
    from ase.calculators.singlepoint import SinglePointCalculator
    from pymatgen.io.ase import AseAtomsAdaptor
    from wyckoff_lab.core.structures import write_extxyz

    frames = []
    for record in records:
        relaxed = bool(record.get("relaxed_structure"))
        structure = Structure.from_dict(record["relaxed_structure"] if relaxed else record["structure"])
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.info.clear()  # pymatgen puts its own (empty) properties dict there
        info = {"name": relaxed_stem(record) if relaxed else file_stem(record), "relaxed": relaxed}
        for key, value in metadata(record).items():
            if key in RESULT_KEYS:
                continue
            if isinstance(value, (int, float, str, bool)) and value is not None:
                info[key] = value
        # UTF-8, not \u escapes: ASE's extxyz reader drops backslashes (safe_extxyz_info hex-encodes what
        # would still not read back, e.g. a message with quotes)
        info["wyckoff_lab"] = json.dumps(metadata(record), default=str, ensure_ascii=False)
        atoms.info.update(info)
        if relaxed and record.get("energy") is not None:
            results = {"energy": float(record["energy"])}
            if record.get("forces") is not None and np.shape(record["forces"]) == (len(atoms), 3):
                results["forces"] = np.asarray(record["forces"], dtype=float)
            if record.get("stress") is not None and np.shape(record["stress"]) == (6,):
                results["stress"] = np.asarray(record["stress"], dtype=float)
            atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    buffer = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_extxyz(buffer, frames)
    return buffer.getvalue()
