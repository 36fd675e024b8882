"""Candidate records: what the app keeps about each generated crystal, as plain JSON-able dicts.

A record is built once from a `Candidate` (validity flags, detected symmetry, novelty against the reference
dataset) and later gains its relaxation and hull results. Plain dicts travel between processes and into the
browser's table without custom serialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pymatgen.core import Structure
from wyckoff_lab.core.defaults import SYMPREC
from wyckoff_lab.core.symmetry import spacegroup

# Columns of the candidate table, in order: (record key, header, type)
TABLE_COLUMNS = (
    ("label", "#", "text"),
    ("formula", "formula", "text"),
    ("sg_label", "space group (generated)", "text"),
    ("relaxed_sg_label", "space group (relaxed)", "text"),
    # The cell as generated (conventional, e.g. 4x the atoms of an F-centred primitive cell): what the 3D view,
    # the relaxation and the exports hold.
    ("natoms", "atoms (conv. cell)", "numeric"),
    ("valid", "valid", "text"),
    ("symmetry", "symmetry", "text"),
    ("novel_label", "novel (generated)", "text"),
    ("relaxed_novel_label", "novel (relaxed)", "text"),
    ("unique_label", "unique (relaxed)", "text"),
    ("sun_label", "S.U.N.", "text"),
    ("energy_per_atom", "E (eV/atom)", "numeric"),
    ("e_above_hull", "E hull (eV/atom)", "numeric"),
    ("relax_status", "relaxation", "text"),  # shown as relax_label: status · sym kept / free
    ("generator", "generator", "text"),
)
SUN_THRESHOLD_EV = 0.1  # eV/atom: "metastable" in the table's S.U.N. flag (sun_metrics' M.S.U.N. threshold)


def spacegroup_label(number: int | None) -> str:
    if not number:
        return "?"
    return f"{spacegroup(number).symbol} ({number})"


def build_records(candidates: Sequence, references=None) -> list[dict]:
    """One record per candidate: structure, symmetry, validity (structural and SMACT) and novelty.

    `references` is a `ReferenceSet` (or None when no reference dataset is available: novelty is then unknown).
    The detected space group is the generator's own where its quality gate ran spglib at SYMPREC (the Wyckoff
    transformer), so spglib runs here only for candidates nobody has checked.
    """
    from wyckoff_lab.core.metrics import compositional_validity, min_distances

    structures = [c.structure for c in candidates]
    distances = min_distances(structures)
    comp_valid = compositional_validity(structures) if structures else np.array([], dtype=bool)
    novel = references.novel_flags(structures) if references is not None else [None] * len(structures)
    records = []
    for i, (candidate, structure) in enumerate(zip(candidates, structures)):
        extra = dict(getattr(candidate, "extra", None) or {})
        detected = candidate.spacegroup_at(SYMPREC)
        struct_valid = bool(np.isfinite(distances[i]) and distances[i] >= 0.5 and structure.volume >= 0.1)
        records.append({
            "id": f"c{i + 1:03d}",
            "label": i + 1,
            "formula": structure.composition.reduced_formula,
            "elements": sorted(el.symbol for el in structure.composition),
            "natoms": len(structure),
            "spacegroup": detected,
            "intended_spacegroup": candidate.intended_spacegroup,
            "sg_label": spacegroup_label(detected or candidate.intended_spacegroup),
            "struct_valid": struct_valid,
            "comp_valid": bool(comp_valid[i]),
            "valid": _valid_label(struct_valid, bool(comp_valid[i])),
            "symmetry": symmetry_label(candidate.intended_spacegroup, detected),
            "extra": extra,
            "novel": novel[i],
            "novel_label": {True: "novel", False: "in reference", None: "?"}[novel[i]],
            "min_distance": None if not np.isfinite(distances[i]) else round(float(distances[i]), 3),
            "density": round(float(structure.density), 3),
            "generator": candidate.generator,
            "seed": candidate.seed,
            "conditions": candidate.conditions.as_dict(),
            "wyckoff": candidate.wyckoff,
            "structure": structure.as_dict(),
            # filled by relaxation and the hull
            "relax_status": "",
            "energy_per_atom": None,
            "e_above_hull": None,
        })
    return records


def relaxed_spacegroup(structure: Structure) -> int | None:
    """The space group spglib finds (at SYMPREC, as for generated candidates) in a relaxed structure."""
    try:
        return spacegroup_number(structure)
    except Exception:  # spglib finds no dataset for a degenerate cell
        return None


def spacegroup_number(structure: Structure, symprec: float = SYMPREC) -> int | None:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    return int(SpacegroupAnalyzer(structure, symprec=symprec).get_space_group_number())


def relax_label(record: dict) -> str:
    """The table's relaxation cell: status, and how symmetry was treated ('converged · sym kept')."""
    status = (record.get("relax_status") or "").replace("_", " ")
    if not status:
        return ""
    if record.get("relax_fix_symmetry") is None:
        return status
    return f"{status} · {'sym kept' if record['relax_fix_symmetry'] else 'sym free'}"


def relaxed_display(record: dict) -> dict:
    """The display fields derived from a record's relaxation fields (labels for the table)."""
    relaxed = record.get("relaxed_spacegroup")
    generated = record.get("spacegroup") or record.get("intended_spacegroup")
    label = ""
    if record.get("relaxed_structure"):
        label = spacegroup_label(relaxed)
        if relaxed and generated and relaxed != generated:
            label += " changed"
    return {"relaxed_sg_label": label, "relax_status": relax_label(record)}


def post_relaxation_flags(records: Sequence[dict], references=None) -> dict[str, dict]:
    """Uniqueness among the relaxed candidates, novelty of each relaxed structure against the reference set
    (MP-20) and the S.U.N. flag, judged after relaxation: {record id: fields}.

    Uses the project's matcher (`metrics.unique_flags`, `ReferenceSet` -> `metrics.ReferenceIndex`): two
    candidates that relax into one crystal are one, the second a duplicate; a candidate that relaxes into an
    MP-20 phase is not novel. S.U.N.: unique, novel, structurally valid, at least two elements, E_hull <
    SUN_THRESHOLD_EV; unknown ('') until it is relaxed and placed on the hull.
    """
    from wyckoff_lab.core.metrics import unique_flags

    relaxed = [r for r in records if r.get("relaxed_structure")]
    structures = [Structure.from_dict(r["relaxed_structure"]) for r in relaxed]
    unique = unique_flags(structures) if structures else []
    novel = references.novel_flags(structures) if references is not None else [None] * len(structures)
    out = {}
    for record, is_unique, is_novel in zip(relaxed, unique, novel):
        e_hull = record.get("e_above_hull")
        sun = None
        if e_hull is not None and is_novel is not None:
            sun = bool(is_unique and is_novel and record.get("struct_valid") and len(record.get("elements", ())) >= 2
                       and e_hull < SUN_THRESHOLD_EV)
        out[record["id"]] = {
            "relaxed_unique": bool(is_unique), "unique_label": "unique" if is_unique else "duplicate",
            "relaxed_novel": is_novel,
            "relaxed_novel_label": {True: "novel", False: "in reference", None: "?"}[is_novel],
            "sun": sun, "sun_label": {True: "S.U.N.", False: "no", None: ""}[sun],
        }
    return out


def symmetry_label(intended: int | None, detected: int | None) -> str:
    """Whether spglib finds the space group the generator sampled ('as sampled'), and which one if not: a sampled
    arrangement can come out with higher symmetry (atoms on special values), or none within the tolerance."""
    if not intended:
        return ""
    if detected == intended:
        return "as sampled"
    if detected is None:
        return f"none found (sampled {intended})"
    return f"found {detected} (sampled {intended})"


def _valid_label(struct_valid: bool, comp_valid: bool) -> str:
    """Short text for the table: both flags, readable and filterable ('ok', 'distance', 'charge', ...)."""
    problems = [name for name, ok in (("distances", struct_valid), ("charge", comp_valid)) if not ok]
    return "ok" if not problems else "bad " + "+".join(problems)


class ReferenceSet:
    """Novelty against a reference dataset (MP-20), indexed lazily by chemical system.

    Only reference rows of a candidate's own chemical system can match it, so each system's rows are turned into
    structures (and reduced) only when a candidate of that system is checked.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self._indexes: dict[tuple[str, ...], object] = {}

    def index(self, elements: Sequence[str]):
        from wyckoff_lab.core.metrics import ReferenceIndex

        key = tuple(sorted(elements))
        if key not in self._indexes:
            rows = self.dataset.indices_in_chemsys(key)
            structures = [self.dataset.structure(int(i)) for i in rows]
            self._indexes[key] = ReferenceIndex(structures)
        return self._indexes[key]

    def novel_flags(self, structures: Sequence[Structure]) -> list[bool]:
        flags = []
        for structure in structures:
            elements = [el.symbol for el in structure.composition]
            try:
                flags.append(not self.index(elements).contains(structure))
            except Exception:  # a structure StructureMatcher cannot reduce is not in the reference set either
                flags.append(True)
        return flags

    def structures_in(self, elements: Sequence[str], limit: int | None = None) -> list[tuple[str, Structure, dict]]:
        """(material_id, structure, row properties) of the reference rows inside a chemical system."""
        rows = self.dataset.indices_in_chemsys(elements)
        if limit is not None:
            rows = rows[:limit]
        frame = self.dataset.frame
        out = []
        for i in rows:
            row = frame.iloc[int(i)]
            props = {"formula": row["formula"], "spacegroup": _int_or_none(row["spacegroup"]),
                     "e_above_hull": _float_or_none(row["e_above_hull"])}
            out.append((str(row["material_id"]), self.dataset.structure(int(i)), props))
        return out


def _int_or_none(value) -> int | None:
    try:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def record_structure(record: dict, relaxed: bool = True) -> Structure:
    """The record's structure: the relaxed one when there is one and `relaxed`, else as generated."""
    data = record.get("relaxed_structure") if relaxed else None
    return Structure.from_dict(data or record["structure"])


def table_rows(records: Sequence[dict]) -> list[dict]:
    """Rows for the candidate DataTable: only the displayed columns (plus the row id), numbers rounded."""
    rows = []
    for record in records:
        row = {"id": record["id"]}
        derived = relaxed_display(record)
        for key, _, kind in TABLE_COLUMNS:
            value = derived[key] if key in derived else record.get(key)
            if kind == "numeric" and isinstance(value, float):
                value = round(value, 4)
            row[key] = value
        rows.append(row)
    return rows


def summarize(records: Sequence[dict]) -> dict:
    """Counts shown above the table: how many candidates, valid, novel, relaxed, on or near the hull."""
    n = len(records)
    hull = [r["e_above_hull"] for r in records if r.get("e_above_hull") is not None]
    return {
        "n": n,
        "valid": sum(r["struct_valid"] and r["comp_valid"] for r in records),
        "novel": sum(bool(r.get("novel")) for r in records),
        "relaxed": sum(r.get("relax_status") in ("converged", "not_converged") for r in records),
        "on_hull": sum(e <= 1e-6 for e in hull),
        "metastable": sum(e <= 0.1 for e in hull),
        "sym_changed": sum(bool(r.get("relaxed_spacegroup")) and bool(r.get("spacegroup") or
                                                                     r.get("intended_spacegroup"))
                           and r["relaxed_spacegroup"] != (r.get("spacegroup") or r.get("intended_spacegroup"))
                           for r in records if r.get("relaxed_structure")),
        "duplicates": sum(r.get("relaxed_unique") is False for r in records),
        "sun": sum(r.get("sun") is True for r in records),
    }

