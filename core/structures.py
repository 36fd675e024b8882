"""Reading, writing and fingerprinting structures: CIF/POSCAR/extxyz/JSON in, clear errors for bad files out."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

log = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar", ".extxyz", ".xyz", ".json")
MAX_NAMED_SKIPS = 20  # skipped files are all returned, but only this many get a warning line of their own


class StructureInputError(ValueError):
    """A structure file that cannot be used: unreadable, empty, disordered or non-finite."""


def check_structure(structure: Structure, source: str = "structure") -> Structure:
    """Reject what the rest of Wyckoff Lab cannot handle, with a message that says what is wrong."""
    if len(structure) == 0:
        raise StructureInputError(f"{source} has no atoms")
    if not structure.is_ordered:
        n = sum(1 for site in structure if not site.is_ordered)
        raise StructureInputError(f"{source} is disordered ({n} site(s) with partial occupancy); Wyckoff Lab "
                                  "works with ordered structures — order it first (e.g. pymatgen "
                                  "OrderDisorderedStructureTransformation)")
    if not np.all(np.isfinite(structure.lattice.matrix)) or not np.all(np.isfinite(structure.frac_coords)):
        raise StructureInputError(f"{source} has non-finite lattice or coordinates")
    if not math.isfinite(structure.volume) or structure.volume <= 0:
        raise StructureInputError(f"{source} has a degenerate cell (volume {structure.volume})")
    return structure


def read_structure(path) -> Structure:
    """One ordered structure from a file (format from the suffix; pymatgen's readers)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CIF readers warn about rounding and missing tags
            if path.suffix.lower() in (".extxyz", ".xyz"):
                from ase.io import read
                from pymatgen.io.ase import AseAtomsAdaptor

                structure = AseAtomsAdaptor.get_structure(read(path))
            elif path.suffix.lower() == ".json":
                structure = Structure.from_dict(json.loads(path.read_text()))
            else:
                structure = Structure.from_file(path)
    except Exception as exc:  # pymatgen raises many types for malformed files
        raise StructureInputError(f"cannot read a structure from {path.name}: {exc}") from None
    return check_structure(structure, path.name)


def read_structures(path) -> list[tuple[str, Structure]]:
    """(name, structure) pairs from a file or every structure file in a folder (sorted by name).

    An extxyz file may hold several frames; each becomes '<file>#<i>'.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in STRUCTURE_SUFFIXES)
        if not files:
            raise StructureInputError(f"{path} holds no structure files ({', '.join(STRUCTURE_SUFFIXES)})")
        return [pair for f in files for pair in read_structures(f)]
    if path.suffix.lower() in (".extxyz", ".xyz") and path.is_file():
        from ase.io import read
        from pymatgen.io.ase import AseAtomsAdaptor

        try:
            frames = read(path, index=":")
        except Exception as exc:
            raise StructureInputError(f"cannot read {path.name}: {exc}") from None
        return [(f"{path.name}#{i}", check_structure(AseAtomsAdaptor.get_structure(a), f"{path.name}#{i}"))
                for i, a in enumerate(frames)]
    return [(path.name, read_structure(path))]


def read_input_files(
    path, suffixes: Sequence[str] = STRUCTURE_SUFFIXES, reader: Callable[[Path], list] | None = None
) -> tuple[list, list[dict]]:
    """What `reader` makes of every file with one of `suffixes` in a folder (sorted by name), or of one file,
    and the files it could not read as {'file', 'reason'}: skipped, each named in a warning.

    The one reader of candidate folders for `hull --candidates` and `evaluate --input`: a single corrupt file costs
    that file, never the run. `reader(file)` returns a list of items (default `read_structures`: (name, Structure)
    pairs) and raises StructureInputError or OSError for a file it cannot use. Raises StructureInputError when the
    folder holds no such file, or when no file is usable.
    """
    path = Path(path)
    reader = reader or read_structures
    suffixes = tuple(s.lower() for s in suffixes)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if not files:
            raise StructureInputError(f"{path} holds no structure files ({', '.join(sorted(set(suffixes)))})")
    else:
        files = [path]
    items, skipped = [], []
    for file in files:
        try:
            items.extend(reader(file))
        except (StructureInputError, OSError) as exc:
            skipped.append({"file": file.name, "reason": str(exc)})
    for failure in skipped[:MAX_NAMED_SKIPS]:
        log.warning("skipped %s: %s", failure["file"], failure["reason"])
    if len(skipped) > MAX_NAMED_SKIPS:
        log.warning("skipped %d more unreadable file(s) in %s", len(skipped) - MAX_NAMED_SKIPS, path)
    if not items:
        detail = "; ".join(f["reason"] for f in skipped[:3])
        raise StructureInputError(f"no usable structure in {path} ({len(skipped)} file(s) failed: {detail})")
    return items, skipped


def primitive_cell(structure: Structure, tolerance: float = 0.01) -> Structure:
    """The same crystal in its primitive cell (a centred conventional cell has 2, 3 or 4 times the atoms), or
    `structure` itself when pymatgen finds no smaller cell. `tolerance` in Å: generated centred cells are exact,
    so a tight one only merges true translations."""
    try:
        primitive = structure.get_primitive_structure(tolerance=tolerance)
    except Exception:  # a degenerate cell: relax the structure as given and let the relaxation report it
        return structure
    if len(primitive) >= len(structure) or primitive.composition.reduced_composition != \
            structure.composition.reduced_composition:
        return structure
    return primitive


def structure_hash(structure: Structure, decimals: int = 6) -> str:
    """A content hash of a structure (lattice, species, wrapped fractional coordinates, rounded): a cache key."""
    lattice = np.round(structure.lattice.matrix, decimals)
    coords = np.round(np.mod(structure.frac_coords, 1.0), decimals) % 1.0
    payload = json.dumps({"lattice": lattice.tolist(), "species": [str(s.specie) for s in structure],
                          "coords": coords.tolist()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def write_candidates(candidates, folder: Path) -> str:
    """Write generated candidates: one CIF each, all frames in one extxyz, and their metadata as JSON."""
    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames, records = [], []
    for i, candidate in enumerate(candidates):
        structure = candidate.structure
        name = f"{i:05d}_{structure.composition.reduced_formula}"
        if candidate.intended_spacegroup:
            name += f"_sg{candidate.intended_spacegroup}"
        structure.to(filename=str(folder / f"{name}.cif"))
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.info.update({"name": name, "generator": candidate.generator,
                           "intended_spacegroup": candidate.intended_spacegroup or 0})
        frames.append(atoms)
        records.append({"name": name, **candidate.as_dict()})
    if frames:
        write(folder / "candidates.extxyz", frames, format="extxyz")
    (folder / "candidates.json").write_text(json.dumps(records, default=str))
    return str(folder)
