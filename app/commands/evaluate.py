"""`wyckoff-lab evaluate`: every generation metric of the seed papers for a folder or file of structures."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from wyckoff_lab.app.cli import CommandError, emit, positive_float

# Intended space group in a file name: 'sg225', 'spg_12', 'spacegroup-62' as a token (between _, -, . or ends).
SG_IN_NAME = re.compile(r"(?:^|[_\-.])(?:sg|spg|spacegroup)[_\-]?(\d{1,3})(?=$|[_\-.#])", re.IGNORECASE)
JSON_SUFFIXES = (".json", ".jsonl")
MAX_LISTED_FAILURES = 20  # unreadable files are all counted, but only this many are named in the output


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="validity, symmetry, uniqueness, novelty, distributions, S.U.N.")
    p.add_argument("--input", required=True, type=Path,
                   help="folder of structure files (CIF, POSCAR, extxyz, JSON) or one file; .jsonl holds one "
                        "structure per line ({'structure': ..., 'spacegroup': ..., 'e_above_hull': ...} or a bare "
                        "pymatgen Structure dict)")
    p.add_argument("--reference", default=None,
                   help="dataset for novelty and distribution metrics, e.g. mp_20 (default: none)")
    p.add_argument("--reference-split", default="train", help="split of the reference dataset (default train)")
    p.add_argument("--relax", default=None, metavar="POTENTIAL",
                   help="relax with this potential (chgnet, sevennet or mattersim) first, then compute energies "
                        "above hull")
    intent = p.add_mutually_exclusive_group()
    intent.add_argument("--spacegroups-from-filename", action="store_true",
                        help="read each structure's intended space group from its file name (sg225, spg_12, ...)")
    intent.add_argument("--intended-sg-json", type=Path, default=None,
                        help="JSON: {file name or stem: space group} or a list in input order")
    p.add_argument("--e-above-hull-json", type=Path, default=None,
                   help="JSON: {file name or stem: E_hull in eV/atom} or a list in input order (enables S.U.N.)")
    p.add_argument("--hull-dataset", default="mp_20",
                   help="dataset whose phases (all splits) make the hull for --relax (default mp_20)")
    p.add_argument("--device", default=None, help="torch device for --relax (default: cuda if available, else cpu)")
    p.add_argument("--symprec", type=positive_float, default=0.1, help="spglib tolerance in Å (default 0.1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


# -- reading -------------------------------------------------------------------------------------------------------


def _read_json_records(path: Path) -> list[tuple[str, object, dict]]:
    """(name, Structure, extras) from a JSON / JSON-lines file; extras may hold 'spacegroup' and 'e_above_hull'."""
    from pymatgen.core import Structure

    from wyckoff_lab.core.structures import StructureInputError, check_structure

    text = path.read_text()
    if path.suffix.lower() == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    out = []
    for i, record in enumerate(records):
        name = f"{path.name}#{i}" if len(records) > 1 or path.suffix.lower() == ".jsonl" else path.name
        if not isinstance(record, dict):
            raise StructureInputError(f"{name}: expected a JSON object, got {type(record).__name__}")
        payload = record.get("structure", record)
        try:
            structure = Structure.from_dict(payload)
        except Exception as exc:
            raise StructureInputError(f"{name}: not a pymatgen Structure dict ({exc})") from None
        extras = {k: record[k] for k in ("spacegroup", "intended_spacegroup", "e_above_hull") if k in record}
        out.append((str(record.get("name", name)), check_structure(structure, name), extras))
    return out


def _read_file(path: Path) -> list[tuple[str, object, dict]]:
    from wyckoff_lab.core.structures import StructureInputError, read_structures

    if path.suffix.lower() in JSON_SUFFIXES:
        try:
            return _read_json_records(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StructureInputError(f"{path.name}: not valid JSON ({exc})") from None
    return [(name, structure, {}) for name, structure in read_structures(path)]


def read_inputs(path: Path) -> tuple[list[str], list, list[dict], list[dict]]:
    """Names, structures, per-structure extras and per-file failures ({'file', 'reason'}) of an input path.

    A bad file (unreadable, disordered, empty) is counted, named in a warning and skipped (the reader `hull
    --candidates` shares); only an input with no usable structure at all is an error. A folder holding the same
    structures in several formats (a `sample --out` folder: CIFs, candidates.extxyz, candidates.json) is read in
    one, candidates.json first; the files set aside come among the failures with a 'copy_of' key.
    """
    from wyckoff_lab.core.structures import STRUCTURE_SUFFIXES, StructureInputError, read_input_files

    if not path.exists():
        raise CommandError(f"{path}: no such file or folder")
    try:
        records, failures = read_input_files(path, tuple(STRUCTURE_SUFFIXES) + JSON_SUFFIXES, _read_file)
    except StructureInputError as exc:
        raise CommandError(str(exc)) from None
    names = [name for name, _, _ in records]
    structures = [structure for _, structure, _ in records]
    extras = [extra for _, _, extra in records]
    return names, structures, extras, failures


def _per_name(path: Path, names: list[str], what: str) -> list:
    """Values from a JSON mapping (file name or stem -> value) or list (input order), None where missing."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CommandError(f"{path}: cannot read {what} JSON ({exc})") from None
    if isinstance(data, list):
        if len(data) != len(names):
            raise CommandError(f"{path}: {len(data)} {what} values for {len(names)} structures")
        return data
    if not isinstance(data, dict):
        raise CommandError(f"{path}: expected a JSON object or list of {what}")
    return [data.get(n, data.get(Path(n).stem) if "#" not in n else None) for n in names]


def intended_spacegroups(args, names: list[str], extras: list[dict]) -> list | None:
    """Intended space group per structure (None where unknown), or None when no source was given."""
    if args.spacegroups_from_filename:
        found = [SG_IN_NAME.search(Path(n).stem if "#" not in n else n) for n in names]
        values = [int(m.group(1)) if m else None for m in found]
    elif args.intended_sg_json is not None:
        values = _per_name(args.intended_sg_json, names, "space group")
    else:
        values = [e.get("intended_spacegroup", e.get("spacegroup")) for e in extras]
        if all(v is None for v in values):
            return None
    checked = []
    for name, value in zip(names, values):
        if value is not None and not (isinstance(value, int | float) and 1 <= int(value) <= 230):
            raise CommandError(f"{name}: intended space group {value!r} is not a number from 1 to 230")
        checked.append(None if value is None else int(value))
    return checked


# -- reference -----------------------------------------------------------------------------------------------------


def load_reference(name: str, split: str, symprec: float, progress: bool):
    """Reference structures and their (cached) symmetry / size statistics."""
    from wyckoff_lab.core.datasets import load_dataset, reference_stats

    dataset = load_dataset(name, split, progress=progress)
    return dataset.structures, reference_stats(dataset, symprec, progress=progress)


# -- relaxation and hull -------------------------------------------------------------------------------------------


def relax_and_hull(structures: list, potential, hull_dataset: str = "mp_20", device: str | None = None,
                   progress: bool = False) -> tuple[list, list[float], dict]:
    """Relax every structure and place it on the ML hull of its chemical system (`core.pipeline`: primitive cells,
    the hull references' settings, one hull per system from `hull_dataset` phases, cached by the hull module).

    Returns the relaxed structures (the input one where relaxation failed), E_hull per structure in eV/atom (NaN
    where relaxation or the hull failed) and a JSON-able summary.
    """
    from wyckoff_lab.core.pipeline import HullBook, relax_and_place
    from wyckoff_lab.core.relax import PotentialError, resolve_potential

    try:
        book = HullBook(resolve_potential(potential, device), dataset=hull_dataset)
        placed = relax_and_place(structures, book, progress)
    except PotentialError as exc:
        raise CommandError(str(exc)) from None
    summary = {"relax_potential": book.potential.name, "relax_status": placed.relaxation.as_dict()["relax_status"],
               "hull_dataset": hull_dataset, "n_hull_systems": len(placed.placement.systems),
               "n_e_above_hull": sum(math.isfinite(e) for e in placed.e_above_hull),
               "hull_failures": dict(list(placed.placement.failures.items())[:MAX_LISTED_FAILURES])}
    return placed.structures, placed.e_above_hull, summary


# -- command -------------------------------------------------------------------------------------------------------


def _energies(names: list[str], values: list) -> list[float]:
    """E_hull values as floats (eV/atom), NaN where missing; a non-number is a clear error."""
    out = []
    for name, value in zip(names, values):
        if value is None:
            out.append(math.nan)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append(float(value))
        else:
            raise CommandError(f"{name}: energy above hull {value!r} is not a number")
    return out


def labelled_sun_protocols(structures, e_above_hull, reference) -> dict[str, dict]:
    """Each paper's S.U.N.-type count beside ours (`metrics.SUN_PROTOCOLS`), as `bench sun` reports them."""
    from wyckoff_lab.core.metrics import SunFlags, sun_protocols

    return sun_protocols(SunFlags(structures, reference), e_above_hull)


def run(args: argparse.Namespace) -> int:
    from wyckoff_lab.core.datasets import DataUnavailableError
    from wyckoff_lab.core.metrics import evaluate

    progress = not args.json and sys.stderr.isatty()
    names, structures, extras, skipped = read_inputs(args.input)
    failures = [f for f in skipped if "copy_of" not in f]
    set_aside = [f for f in skipped if "copy_of" in f]
    intended = intended_spacegroups(args, names, extras)
    e_above_hull = None
    if args.e_above_hull_json is not None:
        e_above_hull = _energies(names, _per_name(args.e_above_hull_json, names, "energy above hull"))
    elif any("e_above_hull" in e for e in extras):
        e_above_hull = _energies(names, [e.get("e_above_hull") for e in extras])
    if args.relax:
        from wyckoff_lab.core.relax import POTENTIALS

        if args.relax not in POTENTIALS:
            raise CommandError(f"unknown potential {args.relax!r}; choose one of {', '.join(POTENTIALS)}")

    # The reference loads before any relaxation, so a missing dataset fails fast, not after an hour of relaxing.
    reference = stats = None
    if args.reference and args.reference.lower() != "none":
        try:
            reference, stats = load_reference(args.reference, args.reference_split, args.symprec, progress)
        except DataUnavailableError as exc:
            raise CommandError(str(exc)) from None

    extra_fields: dict = {}
    if args.relax:
        structures, e_above_hull, extra_fields = relax_and_hull(structures, args.relax, args.hull_dataset,
                                                                args.device, progress)

    metrics = evaluate(structures, reference, intended_spacegroups=intended, e_above_hull=e_above_hull,
                       symprec=args.symprec, reference_stats=stats)
    result = {"input": str(args.input), "reference": args.reference, "reference_split": args.reference_split,
              "n_files_failed": len(failures), "n_files_set_aside": len(set_aside),
              "format_read": set_aside[0]["copy_of"] if set_aside else None} | metrics | extra_fields
    if e_above_hull is not None and reference is not None:
        result["sun_protocols"] = labelled_sun_protocols(structures, e_above_hull, reference)
    result["failed_files"] = failures[:MAX_LISTED_FAILURES]
    emit(result, args.json, _text(result))
    return 0


def _text(r: dict) -> str:
    def pct(key):
        return "n/a" if r.get(key) is None else f"{100 * r[key]:.2f} %"

    def num(key, unit=""):
        return "n/a" if r.get(key) is None else f"{r[key]:.4f}{unit}"

    lines = [f"{r['n']} structures from {r['input']}" + (f" ({r['n_files_failed']} file(s) unreadable)"
                                                          if r["n_files_failed"] else "")
             + (f"; read the {r['format_read']} file(s) only, {r['n_files_set_aside']} file(s) of the same "
                "structures set aside" if r.get("n_files_set_aside") else ""),
             f"structural validity  {pct('struct_validity')}   (min distance >= 0.5 Å, volume >= 0.1 Å^3)",
             f"bond consistency     {pct('bond_consistency')}   (min distance >= 0.7 Å)",
             f"compositional (SMACT){pct('comp_validity'):>10}",
             f"valid (both)         {pct('validity')}",
             f"P1 rate              {pct('p1_rate')}   (symprec {r['symprec']} Å)",
             f"P1 rate (pymatgen)   {pct('p1_rate_pymatgen')}   (SpacegroupAnalyzer, symprec "
             f"{r['pymatgen_symprec']} Å: SymADiT's)",
             f"SG consistency       {pct('sg_consistency')}   ({r['n_sg_checked']} with an intended group)",
             f"uniqueness           {pct('uniqueness_pymatgen_tol')} / {pct('uniqueness_adit_tol')}   (of "
             "structurally valid; StructureMatcher defaults / stol 0.5, angle_tol 10, ltol 0.3)",
             f"novelty              {pct('novelty_pymatgen_tol')} / {pct('novelty_adit_tol')}   (of unique, vs "
             f"{r['reference'] or 'no reference'}; same two matchers)",
             f"U.N. rate            {pct('un_rate_pymatgen_tol')} / {pct('un_rate_adit_tol')}",
             f"JS distance SG       {num('sg_js_distance')}   (base 2; a perfect sampler of the reference: "
             f"{num('sg_js_floor')} at this n)",
             f"JS distance Wyckoff  {num('wyckoff_js_distance')}   (perfect sampler: {num('wyckoff_js_floor')})",
             f"W1 atoms per cell    {num('num_atoms_wasserstein')}   (primitive cells)",
             f"W1 density           {num('density_wasserstein', ' g/cm^3')}",
             f"S.U.N. / M.S.U.N.    {pct('sun_rate')} / {pct('msun_rate')}",
             f"V.S.U.N.             {pct('vsun_rate')}"]
    if r.get("sun_protocols"):
        lines.append("S.U.N. by protocol (counts over all n):")
        width = max(len(p["label"]) for p in r["sun_protocols"].values()) + 2
        for protocol in r["sun_protocols"].values():
            lines.append(f"  {protocol['label']:<{width}}{100 * protocol['rate']:6.2f} %   ({protocol['n']} of "
                         f"{r['n']}; {protocol['definition']})")
    if r.get("relax_status"):
        lines.append(f"relaxed with {r['relax_potential']}: {r['relax_status']}; E_hull known for "
                     f"{r['n_e_above_hull']} of {r['n']} ({r['n_hull_systems']} hulls from {r['hull_dataset']})")
    for system, reason in (r.get("hull_failures") or {}).items():
        lines.append(f"no hull for {system}: {reason}")
    for failure in r["failed_files"]:
        lines.append(f"skipped {failure['file']}: {failure['reason']}")
    return "\n".join(lines)
