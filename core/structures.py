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
# Suffixes of one file format each; a folder holding the same structures in two of them (`sample --out` writes
# CIFs, candidates.extxyz and candidates.json) is read in one, the first of FORMAT_PREFERENCE that holds them all.
FORMAT_FAMILIES = {"JSON": (".json", ".jsonl"), "extxyz": (".extxyz", ".xyz"), "CIF": (".cif",),
                   "POSCAR": (".vasp", ".poscar")}
FORMAT_PREFERENCE = ("JSON", "extxyz", "CIF", "POSCAR")  # JSON records also carry intents, e.g. space groups
COPY_TOLERANCE = 1e-3  # relative, for lattice parameters, and in fractional coordinates: CIF rounds to 1e-8


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


def same_structure_as_written(a: Structure, b: Structure, tolerance: float = COPY_TOLERANCE) -> bool:
    """True when `a` and `b` are one cell written twice (e.g. a CIF and an extxyz frame of the same sample): equal
    lattice parameters (relative `tolerance`) and, species by species, the same fractional positions modulo 1
    (within `tolerance`) in any site order. Not a symmetry-aware match: two cells of one crystal differ here."""
    if len(a) != len(b) or a.composition != b.composition:
        return False
    if not np.allclose(a.lattice.parameters, b.lattice.parameters, rtol=tolerance, atol=tolerance):
        return False
    species_a, species_b = [str(s.specie) for s in a], [str(s.specie) for s in b]
    for element in set(species_a):
        fa = a.frac_coords[[i for i, s in enumerate(species_a) if s == element]]
        fb = b.frac_coords[[i for i, s in enumerate(species_b) if s == element]]
        delta = fa[:, None, :] - fb[None, :, :]
        distance = np.abs(delta - np.round(delta)).max(axis=2)  # periodic, per pair of sites
        if not (distance.min(axis=1) <= tolerance).all() or not (distance.min(axis=0) <= tolerance).all():
            return False
    return True


def _format_family(file: Path) -> str:
    suffix = file.suffix.lower()
    return next((name for name, suffixes in FORMAT_FAMILIES.items() if suffix in suffixes), suffix)


def _copies(structures: Sequence[Structure], others: Sequence[Structure]) -> int:
    """How many of `others` are, as written, one of `structures` (`same_structure_as_written`)."""
    by_key: dict[tuple, list[Structure]] = {}
    for s in structures:
        by_key.setdefault((s.composition.formula, len(s)), []).append(s)
    return sum(any(same_structure_as_written(s, o) for s in by_key.get((o.composition.formula, len(o)), ()))
               for o in others)


def one_format(path: Path, read: dict[Path, list]) -> tuple[dict[Path, list], list[dict]]:
    """The files of `read` (file -> items whose second field is a Structure) to use, and the files set aside as
    {'file', 'reason', 'copy_of'}: when the folder holds the same structures in more than one format, only the
    first format of FORMAT_PREFERENCE that holds every structure of the others is kept, so no structure is counted
    twice. Formats holding different structures are all kept. Raises StructureInputError when formats share some
    structures but none holds them all (nothing can be read without counting some twice).
    """
    families: dict[str, list[Path]] = {}
    for file in read:
        families.setdefault(_format_family(file), []).append(file)
    if len(families) < 2:
        return read, []
    structures = {name: [item[1] for f in files for item in read[f]] for name, files in families.items()}
    shared = {(a, b): _copies(structures[a], structures[b]) for a in families for b in families if a != b}
    if not any(shared.values()):
        return read, []
    holders = [a for a in families if all(shared[(a, b)] == len(structures[b]) for b in families if b != a)]
    if not holders:
        detail = "; ".join(f"{shared[(a, b)]} of the {len(structures[b])} {b} structures are also in the {a} files"
                           for (a, b) in shared if shared[(a, b)] and a < b)
        raise StructureInputError(f"{path} holds the same structures in more than one format ({detail}), and no "
                                  "format holds them all: reading it would count some structures twice. Point "
                                  "--input at one file (e.g. candidates.json) or a folder of one format")
    keep = min(holders, key=lambda name: FORMAT_PREFERENCE.index(name) if name in FORMAT_PREFERENCE else 99)
    set_aside = [{"file": f.name, "reason": f"the same structures as the {keep} file(s) read", "copy_of": keep}
                 for name, files in families.items() if name != keep for f in files]
    log.warning("%s holds the same structures in %s and %s: read the %s file(s) only, %d file(s) set aside", path,
                keep, " and ".join(name for name in families if name != keep), keep, len(set_aside))
    return {f: items for f, items in read.items() if _format_family(f) == keep}, set_aside


def read_input_files(
    path, suffixes: Sequence[str] = STRUCTURE_SUFFIXES, reader: Callable[[Path], list] | None = None
) -> tuple[list, list[dict]]:
    """What `reader` makes of every file with one of `suffixes` in a folder (sorted by name), or of one file,
    and the files it could not read as {'file', 'reason'}: skipped, each named in a warning.

    The one reader of candidate folders for `hull --candidates` and `evaluate --input`: a single corrupt file costs
    that file, never the run. `reader(file)` returns a list of items (default `read_structures`: (name, Structure)
    pairs; the second field of an item is its Structure) and raises StructureInputError or OSError for a file it
    cannot use. A folder that holds the same structures in several formats is read in one (`one_format`); the
    files set aside are returned among the skipped ones with a 'copy_of' key (the format read instead). Raises
    StructureInputError when the folder holds no such file, when no file is usable, or when formats overlap
    without one holding every structure.
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
    read, skipped = {}, []
    for file in files:
        try:
            read[file] = reader(file)
        except (StructureInputError, OSError) as exc:
            skipped.append({"file": file.name, "reason": str(exc)})
    read, set_aside = one_format(path, read) if path.is_dir() else (read, [])
    items = [item for file_items in read.values() for item in file_items]
    for failure in skipped[:MAX_NAMED_SKIPS]:
        log.warning("skipped %s: %s", failure["file"], failure["reason"])
    if len(skipped) > MAX_NAMED_SKIPS:
        log.warning("skipped %d more unreadable file(s) in %s", len(skipped) - MAX_NAMED_SKIPS, path)
    if not items:
        detail = "; ".join(f["reason"] for f in skipped[:3])
        raise StructureInputError(f"no usable structure in {path} ({len(skipped)} file(s) failed: {detail})")
    return items, skipped + set_aside


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
