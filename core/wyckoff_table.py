"""Wyckoff representations of a whole dataset split, computed once in parallel and cached on disk."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging

import numpy as np
from pymatgen.core import Lattice, Structure

from wyckoff_lab.core.parallel import parallel_map
from wyckoff_lab.core.paths import cache_dir
from wyckoff_lab.core.symmetry import check_tolerance
from wyckoff_lab.core.wyckoff import DEFAULT_SYMPREC, WyckoffCrystal, WyckoffError

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: tolerance fallback in WyckoffCrystal.from_structure


def dataset_digest(dataset) -> str:
    """Content key of a CrystalDataset's structures (lattices, coordinates, species), independent of file paths."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for array in (dataset.lattices, dataset.frac_coords, dataset.atomic_numbers, dataset.offsets):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


def _represent(job) -> dict:
    lattice, coords, numbers, symprec = job
    try:
        crystal = WyckoffCrystal.from_structure(Structure(Lattice(lattice), numbers.tolist(), coords), symprec=symprec)
    except WyckoffError as exc:
        return {"failure": exc.reason}
    return crystal.as_dict()


def wyckoff_table(dataset, symprec: float = DEFAULT_SYMPREC, progress: bool = False,
                  workers: int | None = None) -> list[WyckoffCrystal | str]:
    """One entry per dataset row: its WyckoffCrystal, or the failure reason (a string) — nothing dropped."""
    symprec = check_tolerance(symprec)
    path = cache_dir() / "wyckoff" / f"{dataset.name}_{dataset.split}_{dataset_digest(dataset)}_{symprec:g}.jsonl.gz"
    rows = _read(path, len(dataset))
    if rows is None:
        rows = _compute(dataset, symprec, progress, workers)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with gzip.open(tmp, "wt") as f:
            for row in rows:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
        tmp.replace(path)
    return [row["failure"] if "failure" in row else WyckoffCrystal.from_dict(row) for row in rows]


def _read(path, n_rows: int) -> list[dict] | None:
    if not path.exists():
        return None
    try:
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f]
    except (OSError, EOFError, json.JSONDecodeError):
        log.warning("Wyckoff cache %s is unreadable; recomputing", path)
        return None
    return rows if len(rows) == n_rows else None


def _compute(dataset, symprec, progress, workers) -> list[dict]:
    jobs = [(dataset.lattices[i], dataset.frac_coords[dataset.offsets[i]:dataset.offsets[i + 1]],
             dataset.atomic_numbers[dataset.offsets[i]:dataset.offsets[i + 1]], symprec) for i in range(len(dataset))]
    return parallel_map(_represent, jobs, workers=workers, progress=progress,
                        desc=f"Wyckoff {dataset.name}/{dataset.split}", unit="crystal", chunksize=64)
