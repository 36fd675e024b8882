"""Load MP-20, MPTS-52, Perov-5 and the 36k MP set as parsed, cached crystals with one common property frame."""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from wyckoff_lab.core.paths import (
    DataUnavailableError,
    cache_dir,
    entry_field,
    fetch_split,
    file_digest,
    find_split_file,
    read_cache_entry,
    write_cache_entry,
)
from wyckoff_lab.core.parallel import parallel_map
from wyckoff_lab.core.symmetry import quiet_spglib

log = logging.getLogger(__name__)

# Bump when the parsed content or the cache layout changes: older cache files are then rebuilt.
CACHE_VERSION = 1
# Likewise for the symmetry / size statistics of a reference set (1: entries carry this version; 2: `num_atoms`
# counts each primitive cell's atoms, as the papers' Wasserstein distance compares them).
REFERENCE_STATS_VERSION = 2
# Tolerance (Å) for space groups the CSV lacks; MP-20's own rebuilt rows were labelled with the same value.
SPACEGROUP_SYMPREC = 0.1
# A worker process is only worth starting for at least this many CIFs or hull patches.

# The frame columns every dataset has, in this order; dataset-specific extras follow them.
FRAME_COLUMNS = (
    "material_id",
    "split",
    "formula",
    "chemsys",
    "num_atoms",
    "formation_energy_per_atom",
    "band_gap",
    "e_above_hull",
    "e_above_hull_source",
    "spacegroup",
)
# Source-provided columns (eV/atom, eV, eV/atom, space-group number) that are NaN where a dataset lacks them.
_SOURCE_PROPERTIES = ("formation_energy_per_atom", "band_gap", "e_above_hull_source", "spacegroup")


@dataclass(frozen=True)
class DatasetSpec:
    """Where one dataset's CSV files live and how their columns map onto the common frame.

    `columns` maps a frame column to the CSV columns that may hold it (the first one present wins), because the
    splits of one dataset do not always name a column alike (MP-20: `structure_source` vs `cif_source`).
    """

    name: str
    folder: str
    splits: tuple[str, ...]
    # Splits used only when present locally: their public copies are too large for the snapshots we have.
    optional_splits: tuple[str, ...] = ()
    columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Split name -> CSV file stem, where they differ.
    file_stems: Mapping[str, str] = field(default_factory=dict)
    # Replace the source e_above_hull by one computed from the dataset's own formation energies.
    recompute_hull: bool = False

    def available_splits(self) -> tuple[str, ...]:
        """The required splits plus the optional ones present in the data folder."""
        present = tuple(s for s in self.optional_splits if find_split_file(self.folder, self._stem(s)) is not None)
        return self.splits + present

    def split_names(self) -> tuple[str, ...]:
        """Every split name load_dataset takes: the required and optional splits, and "all"."""
        return tuple(dict.fromkeys(self.splits + self.optional_splits + ("all",)))

    def check_split(self, split: str) -> None:
        """ValueError naming the splits that exist unless `split` is one (before anything tries to download it)."""
        if split not in self.split_names():
            raise ValueError(f"{self.name} has no split {split!r}; choose from {', '.join(self.split_names())}")

    def source_file(self, split: str) -> Path:
        """The local CSV of a split, downloaded on first use where a public copy exists."""
        if split not in self.splits + self.optional_splits:
            # Without this an unknown name became a download URL ("<host>/mp_20/foo.csv") and a network error.
            choices = ", ".join(self.splits + self.optional_splits)
            raise ValueError(f"{self.name} has no split {split!r} with a file of its own; choose from {choices}")
        return fetch_split(self.folder, self._stem(split))

    def _stem(self, split: str) -> str:
        return self.file_stems.get(split, split)


DATASETS: dict[str, DatasetSpec] = {
    "mp_20": DatasetSpec(
        name="mp_20",
        folder="mp_20",
        splits=("train", "val", "test"),
        columns={
            "material_id": ("material_id",),
            "formation_energy_per_atom": ("formation_energy_per_atom",),
            "band_gap": ("band_gap",),
            "e_above_hull_source": ("e_above_hull",),
            "spacegroup": ("spacegroup.number",),
            "structure_source": ("structure_source", "cif_source"),
        },
        recompute_hull=True,
    ),
    "mpts_52": DatasetSpec(
        name="mpts_52",
        folder="mpts_52",
        splits=("val", "test"),
        optional_splits=("train",),
        columns={
            "material_id": ("material_id",),
            "formation_energy_per_atom": ("formation_energy_per_atom",),
            "e_above_hull_source": ("energy_above_hull",),
            "theoretical": ("theoretical",),
            "year": ("year",),
        },
    ),
    # Perov-5's heats of formation and GLLB-SC gaps are not on MP's scale: kept under their own names only.
    "perov_5": DatasetSpec(
        name="perov_5",
        folder="perov_5",
        splits=("val", "test"),
        optional_splits=("train",),
        columns={
            "material_id": ("material_id",),
            "heat_all": ("heat_all",),
            "heat_ref": ("heat_ref",),
            "dir_gap": ("dir_gap",),
            "ind_gap": ("ind_gap",),
        },
    ),
    "mp_36k": DatasetSpec(
        name="mp_36k",
        folder="mp_crysxpp_36k",
        splits=("all",),
        file_stems={"all": "structures"},
        columns={
            "material_id": ("material_id",),
            "formation_energy_per_atom": ("formation_energy_per_atom",),
            "crysxpp_id": ("crysxpp_id",),
        },
    ),
}


class CrystalDataset:
    """Parsed crystals of one dataset split: a property frame plus packed structure arrays.

    Structures are stored as arrays (lattice matrices in Å, fractional coordinates, atomic numbers, and per-row
    offsets into the atom arrays) because that is what caches and loads in seconds; pymatgen Structures are
    built only on demand. Row i of `frame` is structure i.
    """

    def __init__(
        self,
        name: str,
        split: str,
        frame: pd.DataFrame,
        lattices: np.ndarray,
        frac_coords: np.ndarray,
        atomic_numbers: np.ndarray,
        offsets: np.ndarray,
        failures: Mapping[str, int],
    ) -> None:
        n_rows, n_atoms = len(frame), len(atomic_numbers)
        if (
            lattices.shape != (n_rows, 3, 3)
            or frac_coords.shape != (n_atoms, 3)
            or offsets.shape != (n_rows + 1,)
            or offsets[0] != 0
            or offsets[-1] != n_atoms
            or np.any(np.diff(offsets) <= 0)
        ):
            raise ValueError(f"inconsistent structure arrays for {name}/{split}")
        self.name = name
        self.split = split
        self.frame = frame.reset_index(drop=True)
        self.lattices = lattices
        self.frac_coords = frac_coords
        self.atomic_numbers = atomic_numbers
        self.offsets = offsets
        self.failures = dict(failures)
        self._structures: list[Structure] | None = None

    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        return f"CrystalDataset({self.name!r}, {self.split!r}, {len(self)} structures, failures={self.failures})"

    @property
    def structures(self) -> list[Structure]:
        """Every structure as a pymatgen Structure (built on first access, then kept)."""
        if self._structures is None:
            self._structures = [self._build(i) for i in range(len(self))]
        return self._structures

    def structure(self, i: int) -> Structure:
        """Structure of row i, without building the others."""
        i = range(len(self))[i]
        return self._structures[i] if self._structures is not None else self._build(i)

    def indices_in_chemsys(self, elements: Iterable[str]) -> np.ndarray:
        """Rows whose elements all lie in `elements` (its subsystems included), e.g. to build a local hull."""
        allowed = set(elements)
        chemsys = self.frame["chemsys"]
        inside = {system: set(system.split("-")) <= allowed for system in chemsys.unique()}
        return np.flatnonzero(chemsys.map(inside).to_numpy(bool))

    def take(self, rows: Sequence[int] | np.ndarray, split: str | None = None) -> CrystalDataset:
        """A dataset of the given rows, in that order (e.g. the rows of another set that training may add)."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = np.diff(self.offsets)[rows]
        atoms = (np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in rows]) if len(rows)
                 else np.zeros(0, dtype=np.int64))
        return CrystalDataset(
            self.name,
            split or self.split,
            self.frame.iloc[rows],
            self.lattices[rows],
            self.frac_coords[atoms].reshape(-1, 3),
            self.atomic_numbers[atoms],
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            {},
        )

    @classmethod
    def concatenate(cls, name: str, split: str, parts: Sequence[CrystalDataset]) -> CrystalDataset:
        """One dataset holding the rows of `parts` in order, their failures summed."""
        atom_starts = np.cumsum([0] + [len(p.atomic_numbers) for p in parts[:-1]])
        return cls(
            name,
            split,
            pd.concat([p.frame for p in parts], ignore_index=True),
            np.concatenate([p.lattices for p in parts]),
            np.concatenate([p.frac_coords for p in parts]),
            np.concatenate([p.atomic_numbers for p in parts]),
            np.concatenate([[0]] + [p.offsets[1:] + start for p, start in zip(parts, atom_starts)]),
            sum((Counter(p.failures) for p in parts), Counter()),
        )

    def _build(self, i: int) -> Structure:
        start, stop = self.offsets[i], self.offsets[i + 1]
        return Structure(
            Lattice(self.lattices[i]), self.atomic_numbers[start:stop].tolist(), self.frac_coords[start:stop]
        )


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a dataset by name; ValueError naming the datasets that exist otherwise."""
    spec = DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return spec


def load_dataset(
    name: str, split: str = "all", *, progress: bool = False, workers: int | None = None
) -> CrystalDataset:
    """One split of a dataset (or "all" splits present, concatenated), parsed once and then read from the cache.

    Missing required splits are downloaded where a public copy exists (DataUnavailableError otherwise).
    For MP-20, `e_above_hull` is replaced by `mp20_e_above_hull()`, a hull of MP-20's own formation energies.
    """
    spec = dataset_spec(name)
    spec.check_split(split)
    if split in spec.splits + spec.optional_splits:
        dataset = _load_split(spec, split, progress=progress, workers=workers)
    elif split == "all":
        parts = [_load_split(spec, s, progress=progress, workers=workers) for s in spec.available_splits()]
        dataset = CrystalDataset.concatenate(name, split, parts)
    if spec.recompute_hull:
        hull = mp20_e_above_hull(progress=progress, workers=workers)
        dataset.frame["e_above_hull"] = dataset.frame["material_id"].map(hull)
    return dataset


def system_and_spacegroup_counts(name: str = "mp_20", split: str = "train"
                                 ) -> tuple[dict[tuple[str, ...], int], dict[int, int]]:
    """Row counts of chemical systems (elements by atomic number) and of space groups in one split: what the
    generators' unconditioned draws follow. Cached per data folder (a process that switches `WYCKOFF_LAB_DATA`, as
    the tests do, gets that folder's counts); DataUnavailableError when the split can be neither read nor had."""
    from wyckoff_lab.core.paths import data_dir

    return _system_and_spacegroup_counts(name, split, data_dir())


@functools.cache
def _system_and_spacegroup_counts(name: str, split: str, _data_folder: Path):
    from pymatgen.core import Element

    frame = load_dataset(name, split).frame
    by_z = lambda system: tuple(sorted(system.split("-"), key=lambda el: Element(el).Z))
    systems = Counter(by_z(system) for system in frame["chemsys"])
    groups = Counter(int(number) for number in frame["spacegroup"].dropna())
    return dict(systems), dict(groups)


def _load_split(spec: DatasetSpec, split: str, *, progress: bool, workers: int | None) -> CrystalDataset:
    source = spec.source_file(split)
    path = cache_dir() / "datasets" / f"{spec.name}_{split}_{file_digest(source)}.npz"
    if path.exists():
        cached = _read_cache(path, spec.name, split)
        if cached is not None:
            return cached
        log.warning("cache file %s is unreadable or stale; rebuilding it", path)
    dataset = _parse_split(spec, split, source, progress=progress, workers=workers)
    _write_cache(path, dataset)
    return dataset


def _parse_split(
    spec: DatasetSpec, split: str, source: Path, *, progress: bool, workers: int | None
) -> CrystalDataset:
    table = pd.read_csv(source)
    frame = _source_properties(spec, table)
    jobs = list(zip(table["cif"], frame["spacegroup"].isna()))
    results = parallel_map(
        _parse_cif, jobs, workers=workers, progress=progress, desc=f"{spec.name}/{split}", unit="cif", chunksize=64
    )
    failures = Counter(reason for reason, _ in results if reason is not None)
    kept = [i for i, (reason, _) in enumerate(results) if reason is None]
    parsed: list[_ParsedCif] = [results[i][1] for i in kept]

    frame = frame.iloc[kept].reset_index(drop=True)
    frame["split"] = split
    frame["formula"] = [p.formula for p in parsed]
    frame["chemsys"] = [p.chemsys for p in parsed]
    frame["num_atoms"] = np.array([len(p.atomic_numbers) for p in parsed], dtype=np.int64)
    frame["spacegroup"] = frame["spacegroup"].fillna(pd.Series([p.spacegroup for p in parsed])).astype("Int64")
    frame["e_above_hull"] = frame["e_above_hull_source"]
    extras = [c for c in frame.columns if c not in FRAME_COLUMNS]
    frame = frame[list(FRAME_COLUMNS) + extras]

    n_atoms = frame["num_atoms"].to_numpy()
    return CrystalDataset(
        spec.name,
        split,
        frame,
        lattices=np.array([p.lattice for p in parsed], dtype=np.float64).reshape(-1, 3, 3),
        frac_coords=np.concatenate([p.frac_coords for p in parsed]) if parsed else np.zeros((0, 3)),
        atomic_numbers=np.concatenate([p.atomic_numbers for p in parsed]) if parsed else np.zeros(0, np.uint8),
        offsets=np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64),
        failures=failures,
    )


def _source_properties(spec: DatasetSpec, table: pd.DataFrame) -> pd.DataFrame:
    """The CSV's columns under their frame names; properties the dataset lacks are NaN."""
    frame = pd.DataFrame(index=table.index)
    for column in dict.fromkeys(("material_id", *_SOURCE_PROPERTIES, *spec.columns)):
        present = [c for c in spec.columns.get(column, ()) if c in table.columns]
        frame[column] = table[present[0]] if present else np.nan
    frame["material_id"] = frame["material_id"].astype(str)
    return frame


class _ParsedCif(NamedTuple):
    lattice: np.ndarray  # (3, 3) Å, rows are lattice vectors
    frac_coords: np.ndarray  # (n, 3)
    atomic_numbers: np.ndarray  # (n,) uint8
    formula: str  # reduced
    chemsys: str  # sorted element symbols joined by "-"
    spacegroup: float  # NaN unless asked for (and found)


def _parse_cif(job: tuple[Any, bool]) -> tuple[str | None, _ParsedCif | None]:
    """(failure reason, None) or (None, parsed crystal) for one CSV row; runs in worker processes."""
    cif, want_spacegroup = job
    if not isinstance(cif, str) or not cif.strip():
        return "missing_cif", None
    with warnings.catch_warnings():
        # pymatgen warns about every rounding fix in a CIF and about elements without an electronegativity.
        warnings.simplefilter("ignore")
        try:
            structure = Structure.from_str(cif, fmt="cif")
        except Exception:  # noqa: BLE001 - pymatgen raises many types on malformed CIFs; all mean "unparsable"
            return "cif_parse", None
        if len(structure) == 0:
            return "cif_parse", None
        if not structure.is_ordered:
            return "disordered", None
        composition = structure.composition
        return None, _ParsedCif(
            lattice=structure.lattice.matrix,
            frac_coords=structure.frac_coords,
            atomic_numbers=np.array(structure.atomic_numbers, dtype=np.uint8),
            formula=composition.reduced_formula,
            chemsys=composition.chemical_system,
            spacegroup=_spacegroup_number(structure) if want_spacegroup else np.nan,
        )


def _spacegroup_number(structure: Structure) -> float:
    with quiet_spglib():
        try:
            return float(SpacegroupAnalyzer(structure, symprec=SPACEGROUP_SYMPREC).get_space_group_number())
        except Exception:  # noqa: BLE001 - spglib failing on a cell means "unknown", not a broken dataset
            return np.nan


def _write_cache(path: Path, dataset: CrystalDataset) -> None:
    """One .npz per split (arrays + the frame as parquet bytes), written atomically so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame_bytes = io.BytesIO()
    dataset.frame.to_parquet(frame_bytes, index=False)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    with open(partial, "wb") as out:
        np.savez(
            out,
            version=np.array(CACHE_VERSION),
            lattices=dataset.lattices,
            frac_coords=dataset.frac_coords,
            atomic_numbers=dataset.atomic_numbers,
            offsets=dataset.offsets,
            frame=np.frombuffer(frame_bytes.getvalue(), dtype=np.uint8),
            failures=np.array(json.dumps(dataset.failures)),
        )
    os.replace(partial, path)


def _read_cache(path: Path, name: str, split: str) -> CrystalDataset | None:
    """The cached split, or None when the file is truncated, corrupt, inconsistent or from another version."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != CACHE_VERSION:
                return None
            failures = json.loads(str(data["failures"]))
            frame = pd.read_parquet(io.BytesIO(data["frame"].tobytes()))
            if not isinstance(failures, dict) or not set(FRAME_COLUMNS) <= set(frame.columns):
                raise ValueError("failures or frame columns do not match the cache layout")
            return CrystalDataset(
                name,
                split,
                frame,
                lattices=data["lattices"],
                frac_coords=data["frac_coords"],
                atomic_numbers=data["atomic_numbers"],
                offsets=data["offsets"],
                failures=failures,
            )
    except Exception:  # noqa: BLE001 - a damaged file can make numpy, zipfile or pyarrow raise nearly anything
        return None


def reference_stats(dataset: CrystalDataset, symprec: float, progress: bool = False):
    """The metrics' ReferenceStats (symmetry, primitive-cell sizes, densities) of a dataset, cached per content
    and symprec.

    Symmetry of ~27k reference crystals takes minutes, so it is kept, keyed by the structures' exact content; an
    entry that does not read back as ReferenceStats of this dataset is recomputed with a warning.
    """
    from wyckoff_lab.core.metrics import ReferenceStats, SymmetryInfo, analyze_symmetry, primitive_num_atoms
    from wyckoff_lab.core.symmetry import check_tolerance

    symprec = check_tolerance(symprec)
    digest = hashlib.sha256()
    for array in (dataset.lattices, dataset.frac_coords, dataset.atomic_numbers, dataset.offsets):
        digest.update(np.ascontiguousarray(array).tobytes())
    name = f"reference_{dataset.name}_{dataset.split}_sym{symprec:g}_{digest.hexdigest()[:16]}.json.gz"
    path = cache_dir() / "metrics" / name

    def parse(data: dict) -> ReferenceStats:
        symmetry, num_atoms, densities = (entry_field(data, k, list) for k in ("symmetry", "num_atoms", "densities"))
        if not len(symmetry) == len(num_atoms) == len(densities) == len(dataset):
            raise ValueError(f"{len(symmetry)}/{len(num_atoms)}/{len(densities)} values for {len(dataset)} crystals")
        if entry_field(data, "symprec", float) != symprec:
            raise ValueError(f"symprec {data['symprec']} is not {symprec}")
        for sg, letters in symmetry:  # unpacking also rejects rows that are not pairs
            if not (sg is None or isinstance(sg, int) and not isinstance(sg, bool)) or not isinstance(letters, list) \
                    or not all(isinstance(letter, str) for letter in letters):
                raise ValueError(f"symmetry row {[sg, letters]!r:.60} is not [space group, [Wyckoff letters]]")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in num_atoms) or \
                not all(isinstance(d, int | float) and not isinstance(d, bool) for d in densities):
            raise ValueError("num_atoms or densities hold non-numbers")
        return ReferenceStats([SymmetryInfo.from_list(x) for x in symmetry], num_atoms,
                              [float(d) for d in densities], symprec)

    stats = read_cache_entry(path, REFERENCE_STATS_VERSION, parse, "reference statistics cache entry")
    if stats is None:
        structures = dataset.structures
        infos = analyze_symmetry(structures, symprec, progress=progress)
        stats = ReferenceStats(infos, primitive_num_atoms(structures), [float(s.density) for s in structures],
                               symprec)
        write_cache_entry(path, REFERENCE_STATS_VERSION, stats.as_dict())
    return stats


def mp20_e_above_hull(
    table: pd.DataFrame | None = None, *, progress: bool = False, workers: int | None = None
) -> pd.Series:
    """Energy above hull (eV/atom) of every MP-20 row from MP-20's own formation energies, indexed by material_id.

    The source `e_above_hull` came from full Materials Project hulls and is missing for most rebuilt rows; this
    value is known for every row and consistent with the formation energies used elsewhere in the project.
    All train rows count, also those without a structure (train_meta_nocoords.csv.gz). The result is cached,
    keyed by the input files. `table` (material_id, formula, formation_energy_per_atom) replaces MP-20, e.g. a
    subset for tests; it is not cached.
    """
    if table is not None:
        return e_above_hull_from_formation_energies(table, progress=progress, workers=workers)
    sources = _mp20_hull_sources()

    def compute() -> pd.Series:
        table = _mp20_formation_energies(sources)
        return e_above_hull_from_formation_energies(table, progress=progress, workers=workers)

    return _cached_hull("mp_20", sources, compute)


def _cached_hull(name: str, sources: Sequence[Path], compute) -> pd.Series:
    """`compute()` (E above hull by material_id), cached under `name` and the digests of `sources`."""
    key = hashlib.sha256(f"v{CACHE_VERSION}:{':'.join(file_digest(p) for p in sources)}".encode()).hexdigest()[:16]
    path = cache_dir() / "datasets" / f"{name}_e_above_hull_{key}.parquet"
    if path.exists():
        try:
            hull = pd.read_parquet(path)["e_above_hull"]
            if not pd.api.types.is_float_dtype(hull) or not hull.index.is_unique:
                raise ValueError(f"e_above_hull is {hull.dtype} with {'unique' if hull.index.is_unique else 'repeated'}"
                                 " ids, not float by unique material_id")
            return hull
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a damaged file are of many types
            log.warning("hull cache %s is unreadable (%s); recomputing it", path, exc)
    hull = compute().groupby(level=0).min()  # CDVAE's MP-20 repeats 2 ids across splits; map() needs unique ids
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    hull.to_frame().to_parquet(partial)
    os.replace(partial, path)
    return hull


def _mp20_formation_energies(sources: Sequence[Path]) -> pd.DataFrame:
    """material_id (str), formula and formation_energy_per_atom of every row of MP-20's CSV files."""
    columns = ["material_id", "pretty_formula", "formation_energy_per_atom"]
    table = pd.concat([pd.read_csv(p, usecols=columns) for p in sources], ignore_index=True)
    return table.rename(columns={"pretty_formula": "formula"}).astype({"material_id": str})


def _mp20_hull_sources() -> list[Path]:
    """train_meta_nocoords (every train row, with or without a structure) if present, else train; val; test."""
    try:
        train = find_split_file("mp_20", "train_meta_nocoords") or fetch_split("mp_20", "train")
        return [train, fetch_split("mp_20", "val"), fetch_split("mp_20", "test")]
    except DataUnavailableError as exc:
        raise DataUnavailableError(f"the MP-20 hull needs the formation energies of every split: {exc}") from None


def mp20_and_36k_e_above_hull(*, progress: bool = False, workers: int | None = None) -> pd.Series:
    """Energy above hull (eV/atom) of every MP-20 row and every 36k-set row, from one hull of both sets' formation
    energies, indexed by material_id.

    MP-20 keeps only phases within 0.08 eV/atom of the Materials Project hull, so on its own it cannot teach what
    "unstable" looks like; the 36k set adds ~20k MP phases beyond that (and larger cells). An id in both sets
    uses MP-20's formation energy. The 36k set comes from an older MP snapshot whose elemental references differ
    (Br, Se, Te, I by 0.4-0.5 eV/atom of that element): its energies are first put on MP-20's scale by
    `align_formation_energies`. Cached like `mp20_e_above_hull`.
    """
    mp20_sources = _mp20_hull_sources()
    extra_source = DATASETS["mp_36k"].source_file("all")

    def compute() -> pd.Series:
        mp20 = _mp20_formation_energies(mp20_sources)
        extra = load_dataset("mp_36k", "all", progress=progress, workers=workers).frame
        extra = extra[["material_id", "formula", "formation_energy_per_atom"]].copy()
        extra["formation_energy_per_atom"] = align_formation_energies(extra, mp20)
        extra = extra[~extra["material_id"].isin(set(mp20["material_id"]))]
        return e_above_hull_from_formation_energies(pd.concat([mp20, extra], ignore_index=True), progress=progress,
                                                    workers=workers)

    return _cached_hull("mp_20_mp_36k", [*mp20_sources, extra_source], compute)


def mp20_train_systems() -> set[str]:
    """Chemical systems ("A-B-C", alphabetical) of every MP-20 train row.

    The ids of `train_meta_nocoords` that have no structure in our train file count too: they are in the real
    split, so their systems are not held out.
    """
    systems = set(load_dataset("mp_20", "train").frame["chemsys"])
    meta = find_split_file("mp_20", "train_meta_nocoords")
    if meta is not None:
        elements = pd.read_csv(meta, usecols=["elements"])["elements"]
        systems |= {"-".join(sorted(ast.literal_eval(row))) for row in elements}
    return systems


def mp36k_training_rows(*, progress: bool = False, workers: int | None = None) -> CrystalDataset:
    """The 36k-set rows that may join MP-20 train, with `e_above_hull` from `mp20_and_36k_e_above_hull`.

    Left out, so that MP-20's held-out splits stay held out: every MP-20 id (train ones are already in train, val
    and test ones would leak), and every row whose chemical system MP-20 has only in val/test (the recovery
    benchmark's systems are chosen among those).
    """
    extra = load_dataset("mp_36k", "all", progress=progress, workers=workers)
    mp20_ids, held_out_systems = set(), set()
    for split in DATASETS["mp_20"].splits:
        frame = load_dataset("mp_20", split, progress=progress, workers=workers).frame
        mp20_ids |= set(frame["material_id"])
        if split != "train":
            held_out_systems |= set(frame["chemsys"])
    train_meta = find_split_file("mp_20", "train_meta_nocoords")
    if train_meta is not None:  # train ids without a structure count as train too
        mp20_ids |= set(pd.read_csv(train_meta, usecols=["material_id"])["material_id"].astype(str))
    frame = extra.frame
    keep = ~frame["material_id"].isin(mp20_ids) & ~frame["chemsys"].isin(held_out_systems - mp20_train_systems())
    rows = extra.take(np.flatnonzero(keep.to_numpy()), split="train_extra")
    hull = mp20_and_36k_e_above_hull(progress=progress, workers=workers)
    rows.frame["e_above_hull"] = rows.frame["material_id"].map(hull)
    return rows


def align_formation_energies(table: pd.DataFrame, reference: pd.DataFrame, outlier_ev: float = 0.1) -> np.ndarray:
    """`table`'s formation energies (eV/atom) moved onto `reference`'s scale by one offset per element.

    Materials Project snapshots differ mostly in their elemental reference energies and per-species corrections,
    i.e. by sum_el x_el * c_el for atom fractions x_el; the c_el are a least-squares fit over the ids both tables
    share, refit without rows off by more than `outlier_ev` (e.g. a new magnetic ground state). Between the 36k
    set and MP-20 (16,786 shared ids) that takes |difference| from 0.010 / 0.139 / 0.33 to 0.005 / 0.032 / 0.17
    eV/atom at the 50th / 90th / 99th percentile. Elements absent from the shared ids get no offset.
    """
    shared = table.merge(reference[["material_id", "formation_energy_per_atom"]].drop_duplicates("material_id"),
                         on="material_id", suffixes=("", "_reference"))
    fractions = _atom_fractions(pd.concat([table["formula"], shared["formula"]], ignore_index=True))
    x_table, x_shared = fractions[:len(table)], fractions[len(table):]
    difference = (shared["formation_energy_per_atom"] - shared["formation_energy_per_atom_reference"]).to_numpy()
    fit = np.isfinite(difference)
    offsets = np.zeros(fractions.shape[1])
    for _ in range(2):
        if not fit.any():
            break
        offsets = np.linalg.lstsq(x_shared[fit], difference[fit], rcond=None)[0]
        fit = np.isfinite(difference) & (np.abs(difference - x_shared @ offsets) < outlier_ev)
    return table["formation_energy_per_atom"].to_numpy(dtype=float) - x_table @ offsets


def _atom_fractions(formulas: pd.Series) -> np.ndarray:
    """(rows, elements) atom fractions of reduced formulas, one column per element that occurs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compositions = [Composition(f).fractional_composition.as_dict() for f in formulas]
    columns = {el: i for i, el in enumerate(sorted({el for c in compositions for el in c}))}
    fractions = np.zeros((len(compositions), len(columns)))
    for row, composition in enumerate(compositions):
        for el, x in composition.items():
            fractions[row, columns[el]] = x
    return fractions


def e_above_hull_from_formation_energies(
    table: pd.DataFrame, *, progress: bool = False, workers: int | None = None
) -> pd.Series:
    """Energy above the convex hull (eV/atom) of each row, from the rows' own formation energies alone.

    `table` has material_id, formula and formation_energy_per_atom (eV/atom; NaN rows get NaN). Every element
    gets a zero-energy reference, so the hull is a formation-energy hull and no value is below 0 (beyond
    rounding). One phase diagram over ~90 elements is infeasible, and pymatgen's PatchedPhaseDiagram builds one
    serially per chemical system anyway; here each maximal chemical system gets its own PhaseDiagram from the
    rows in its subsystems, and those are spread over worker processes.
    """
    formulas = table["formula"].tolist()
    energies = table["formation_energy_per_atom"].to_numpy(dtype=float)
    compositions = [Composition(formula) for formula in formulas]
    rows_by_chemsys: dict[frozenset[str], list[int]] = defaultdict(list)
    # Only the lowest energy per reduced formula, and only below the elemental references, can be on the hull.
    hull_points: dict[frozenset[str], dict[str, float]] = defaultdict(dict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reduced_formula warns about noble gases without an electronegativity
        for i, (composition, energy) in enumerate(zip(compositions, energies)):
            if not np.isfinite(energy):
                continue
            chemsys = frozenset(el.symbol for el in composition.elements)
            rows_by_chemsys[chemsys].append(i)
            if energy < 0:
                points = hull_points[chemsys]
                formula = composition.reduced_formula
                points[formula] = min(energy, points.get(formula, 0.0))

    owners = _maximal_chemsys(rows_by_chemsys)
    rows_by_patch: dict[frozenset[str], list[int]] = defaultdict(list)
    for chemsys, rows in rows_by_chemsys.items():
        rows_by_patch[owners[chemsys]].extend(rows)
    jobs = [
        (
            sorted(patch),
            [point for sub in _subsystems(patch) for point in hull_points.get(sub, {}).items()],
            [(formulas[i], energies[i]) for i in rows],
        )
        for patch, rows in rows_by_patch.items()
    ]
    results = parallel_map(
        _patch_e_above_hull, jobs, workers=workers, progress=progress, desc="hull", unit="chemsys", chunksize=16
    )
    values = np.full(len(table), np.nan)
    for rows, e_above_hull in zip(rows_by_patch.values(), results):
        values[rows] = e_above_hull
    index = pd.Index(table["material_id"].astype(str), name="material_id")
    return pd.Series(values, index=index, name="e_above_hull")


def _maximal_chemsys(systems: Iterable[frozenset[str]]) -> dict[frozenset[str], frozenset[str]]:
    """Map each chemical system to a maximal one (in no other) that contains it: one phase diagram per maximum."""
    owners: dict[frozenset[str], frozenset[str]] = {}
    maxima_with: dict[str, set[frozenset[str]]] = defaultdict(set)
    for system in sorted(systems, key=lambda s: (-len(s), sorted(s))):
        containing = set.intersection(*(maxima_with[el] for el in system))
        if containing:
            owners[system] = min(containing, key=sorted)
        else:
            owners[system] = system
            for el in system:
                maxima_with[el].add(system)
    return owners


def _subsystems(system: frozenset[str]) -> Iterable[frozenset[str]]:
    elements = sorted(system)
    for k in range(1, len(elements) + 1):
        for subset in itertools.combinations(elements, k):
            yield frozenset(subset)


def _patch_e_above_hull(job: tuple[list[str], list[tuple[str, float]], list[tuple[str, float]]]) -> np.ndarray:
    """E above hull (eV/atom) of `targets` in one chemical system; runs in worker processes."""
    elements, hull_entries, targets = job
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entries = [PDEntry(Composition({el: 1}), 0.0) for el in elements]
        entries += [_formation_entry(f, e) for f, e in hull_entries]
        diagram = PhaseDiagram(entries)
        hull_energy = {f: diagram.get_hull_energy_per_atom(Composition(f)) for f in {f for f, _ in targets}}
    return np.array([e - hull_energy[f] for f, e in targets])


def _formation_entry(formula: str, energy_per_atom: float) -> PDEntry:
    composition = Composition(formula)
    return PDEntry(composition, energy_per_atom * composition.num_atoms)
