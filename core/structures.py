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


CIF_SYMPREC = 0.1  # Å: the tolerance the app detects candidates' space groups with (core.defaults.SYMPREC)


def symmetrized_cif(structure: Structure, symprec: float = CIF_SYMPREC) -> tuple[str, str]:
    """(CIF text, note): the structure written with its symmetry (pymatgen's CifWriter at `symprec`: the space
    group, its operations and the asymmetric unit of the refined conventional cell) plus an
    `_atom_site_Wyckoff_symbol` column (the letter, e.g. a; multiplicity is in its own column). The note says
    which group was written, or why it fell back to P 1 (symmetry detection failed): the P 1 file then holds every
    atom as it was.
    """
    from pymatgen.io.cif import CifWriter
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            writer = CifWriter(structure, symprec=symprec)
            number = SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number()
            _add_wyckoff_column(writer, symprec)
            return str(writer), f"space group {number} (spglib, symprec {symprec:g} Å)"
        except Exception as exc:  # spglib finds no dataset for degenerate cells
            return str(CifWriter(structure)), f"P 1: symmetry detection failed ({type(exc).__name__}: {exc})"


def _add_wyckoff_column(writer, symprec: float) -> None:
    """Add `_atom_site_Wyckoff_symbol` to a symmetrised CifWriter's atom-site loop, each row's symbol found by
    locating its coordinates among the refined structure's symmetry-equivalent sites."""
    from pymatgen.core import Lattice
    from pymatgen.core.operations import SymmOp
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    block = next(iter(writer.cif_file.data.values()))
    data = block.data
    lattice = Lattice.from_parameters(*(float(data[f"_cell_{k}"]) for k in (
        "length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma")))
    coords = np.array([[float(data[f"_atom_site_fract_{axis}"][i]) for axis in "xyz"]
                       for i in range(len(data["_atom_site_label"]))])
    species = list(data["_atom_site_type_symbol"])
    ops = [SymmOp.from_xyz_str(op) for op in data["_symmetry_equiv_pos_as_xyz"]]
    full_species, full_coords, row_of = [], [], []
    for row, (specie, xyz) in enumerate(zip(species, coords)):  # the asymmetric unit expanded, row by row
        seen: list[np.ndarray] = []
        for op in ops:
            image = np.mod(op.operate(xyz), 1.0)
            if not any(np.allclose(np.mod(image - other + 0.5, 1.0) - 0.5, 0, atol=1e-3) for other in seen):
                seen.append(image)
        full_species += [specie] * len(seen)
        full_coords += seen
        row_of += [row] * len(seen)
    expanded = Structure(lattice, full_species, full_coords)
    symmetrized = SpacegroupAnalyzer(expanded, symprec=symprec).get_symmetrized_structure()
    symbols = [""] * len(species)
    for indices, symbol in zip(symmetrized.equivalent_indices, symmetrized.wyckoff_symbols):
        for index in indices:
            symbols[row_of[index]] = symbol.lstrip("0123456789")  # the letter; multiplicity has its column
    data["_atom_site_Wyckoff_symbol"] = symbols
    for loop in block.loops:
        if "_atom_site_label" in loop:
            loop.insert(loop.index("_atom_site_symmetry_multiplicity") + 1
                        if "_atom_site_symmetry_multiplicity" in loop else len(loop), "_atom_site_Wyckoff_symbol")


def safe_extxyz_info(info: dict) -> dict:
    """`info` as ASE's extxyz writer can write it so that it reads back: None and empty strings are left out (an
    empty value is written bare, `key= next=1`, and read as `key='next=1'`, swallowing the next field), and a
    string that would not read back as itself (backslashes and escaped quotes are mangled; "T" or "1.5" come back
    as a bool or a number) is written hex-encoded, `hex:<UTF-8 bytes in hex>`, under `<key>_hex` instead
    (base64's `=` padding is itself misread, and bare hex digits are read as a number)."""
    out = {}
    for key, value in info.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, str) and not _extxyz_reads_back(value):
            out[f"{key}_hex"] = "hex:" + value.encode().hex()
            continue
        out[key] = value
    return out


def _extxyz_reads_back(value: str) -> bool:
    """Whether ASE writes and reads the string `value` as one info field unchanged (tried on a one-atom frame)."""
    import io

    from ase import Atoms
    from ase.io import read, write

    probe = Atoms("H", cell=[1, 1, 1], pbc=True, info={"probe": value})
    buffer = io.StringIO()
    write(buffer, [probe], format="extxyz")
    buffer.seek(0)
    return read(buffer, format="extxyz").info.get("probe") == value


def write_extxyz(target, frames) -> None:
    """Write ASE frames as extxyz (a path or a text buffer) with `safe_extxyz_info` applied to every frame, so
    that `ase.io.read(target, index=":")` gives back every info field written, and energy/forces/stress where a
    frame carries them as calculator results."""
    from ase.io import write

    for atoms in frames:
        cleaned = safe_extxyz_info(atoms.info)
        atoms.info.clear()
        atoms.info.update(cleaned)
    write(target, frames, format="extxyz")


def write_candidates(candidates, folder: Path) -> str:
    """Write generated candidates: one CIF each, all frames in one extxyz, and their metadata as JSON."""
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
        write_extxyz(folder / "candidates.extxyz", frames)
    (folder / "candidates.json").write_text(json.dumps(records, default=str))
    return str(folder)
