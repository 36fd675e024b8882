"""Step 10, export: candidates as a zip of CIFs or one extxyz file, each with the metadata the app knows."""

from __future__ import annotations

import io
import json
import warnings
import zipfile

from pymatgen.core import Structure

METADATA_KEYS = ("id", "formula", "natoms", "spacegroup", "intended_spacegroup", "symmetry", "extra", "generator",
                 "seed", "struct_valid", "comp_valid", "novel", "min_distance", "density", "relax_status",
                 "relax_message", "relax_steps", "energy_per_atom", "max_force", "potential", "e_above_hull",
                 "formation_energy_per_atom", "decomposition", "conditions", "wyckoff")


def metadata(record: dict) -> dict:
    """The JSON-able metadata of one record (structures excluded: they are the files themselves)."""
    return {key: record.get(key) for key in METADATA_KEYS if key in record}


def file_stem(record: dict) -> str:
    """`<id>_<formula>_sg<N>`, as `write_candidates` names files."""
    stem = f"{record['id']}_{record['formula']}"
    number = record.get("spacegroup") or record.get("intended_spacegroup")
    return stem + (f"_sg{number}" if number else "")


def cif_zip(records: list[dict]) -> bytes:
    """A zip with each candidate as generated (`<stem>.cif`), relaxed when it was (`<stem>_relaxed.cif`), and
    `candidates.json` with every record's metadata."""
    from pymatgen.io.cif import CifWriter

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for record in records:
            stem = file_stem(record)
            archive.writestr(f"{stem}.cif", str(CifWriter(Structure.from_dict(record["structure"]))))
            if record.get("relaxed_structure"):
                archive.writestr(f"{stem}_relaxed.cif",
                                 str(CifWriter(Structure.from_dict(record["relaxed_structure"]))))
        archive.writestr("candidates.json", json.dumps([metadata(r) for r in records], indent=1, default=str))
    return buffer.getvalue()


def extxyz(records: list[dict]) -> str:
    """One extxyz frame per candidate (relaxed structure when there is one), scalar metadata in each frame's info
    line and the full metadata as a JSON string under `wyckoff_lab`."""
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    frames = []
    for record in records:
        relaxed = bool(record.get("relaxed_structure"))
        structure = Structure.from_dict(record["relaxed_structure"] if relaxed else record["structure"])
        atoms = AseAtomsAdaptor.get_atoms(structure)
        info = {"name": file_stem(record), "relaxed": relaxed}
        for key, value in metadata(record).items():
            if isinstance(value, (int, float, str, bool)) and value is not None:
                info[key] = value
        info["wyckoff_lab"] = json.dumps(metadata(record), default=str)
        atoms.info.update(info)
        frames.append(atoms)
    buffer = io.StringIO()
    write(buffer, frames, format="extxyz")
    return buffer.getvalue()
