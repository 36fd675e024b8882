"""Dataset loading on real data: CIF parsing, the split cache, failure accounting, offline errors, MP-20's hull."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter

from wyckoff_lab.app.cli import main
from wyckoff_lab.core import datasets, paths
from wyckoff_lab.core.datasets import CrystalDataset, load_dataset, mp20_e_above_hull
from wyckoff_lab.core.paths import DataUnavailableError

# The tests parse a few CIFs themselves, to compare; pymatgen's notes on rounded coordinates are expected.
pytestmark = pytest.mark.filterwarnings("ignore:Issues encountered while parsing CIF:UserWarning")

# Small copies of the real files keep the cold-cache run short; the full sets are exercised by `data prepare`.
SMALL_ROWS = {"train": 150, "val": 100, "test": 200}
PEROV_ROWS = 120


@pytest.fixture(scope="module")
def real_data() -> Path:
    root = os.environ.get(paths.DATA_ENV)
    if not root:
        pytest.skip(f"{paths.DATA_ENV} is not set; these tests read the real MP-20 and Perov-5 CSV files")
    if not (Path(root) / "mp_20" / "test.csv.gz").is_file():
        pytest.skip(f"{paths.DATA_ENV}={root} holds no mp_20/test.csv.gz")
    return Path(root)


@pytest.fixture(scope="module")
def small_data(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first rows of MP-20 train/val/test (test plus one disordered and one broken CIF) and Perov-5 val."""
    root = tmp_path_factory.mktemp("data")
    (root / "mp_20").mkdir()
    for split, n in SMALL_ROWS.items():
        table = pd.read_csv(real_data / "mp_20" / f"{split}.csv.gz", nrows=n)
        if split == "test":
            table = pd.concat([table, _bad_rows(table)], ignore_index=True)
        table.to_csv(root / "mp_20" / f"{split}.csv.gz", index=False)
    (root / "perov_5").mkdir()
    perov = pd.read_csv(real_data / "perov_5" / "val.csv.gz", nrows=PEROV_ROWS)
    perov.to_csv(root / "perov_5" / "val.csv.gz", index=False)
    return root


def _bad_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Copies of the first row: one with a half-occupied site, one whose CIF is cut off."""
    disordered, broken = table.iloc[[0]].copy(), table.iloc[[0]].copy()
    structure = Structure.from_str(table["cif"].iloc[0], fmt="cif")
    structure.replace(0, {structure[0].specie: 0.5})
    disordered["material_id"], disordered["cif"] = "test-disordered", str(CifWriter(structure))
    broken["material_id"], broken["cif"] = "test-broken", "data_broken\n_cell_length_a 4.0\nloop_\n_atom_site_label\n"
    return pd.concat([disordered, broken])


@pytest.fixture
def env(small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Data from `small_data`, a fresh cache, and downloads that fail at once (a closed local port = offline)."""
    monkeypatch.setenv(paths.DATA_ENV, str(small_data))
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    for name in paths.PUBLIC_DATASET_URLS:
        monkeypatch.setitem(paths.PUBLIC_DATASET_URLS, name, "http://127.0.0.1:9/{split}.csv")
    return tmp_path / "cache"


def test_parse_then_cache_hit(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mp20_e_above_hull()  # so that both timed loads below differ only by parsing
    start = time.perf_counter()
    first = load_dataset("mp_20", "test")
    parse_s = time.perf_counter() - start

    assert isinstance(first, CrystalDataset) and (first.name, first.split) == ("mp_20", "test")
    assert len(first) == SMALL_ROWS["test"]
    assert list(env.glob("datasets/mp_20_test_*.npz"))

    monkeypatch.setattr(datasets, "_parse_split", _fail_if_called)
    start = time.perf_counter()
    second = load_dataset("mp_20", "test")
    cached_s = time.perf_counter() - start
    assert cached_s < parse_s / 3, (parse_s, cached_s)
    pd.testing.assert_frame_equal(first.frame, second.frame)
    np.testing.assert_array_equal(first.frac_coords, second.frac_coords)


def _fail_if_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("the split was parsed again instead of read from the cache")


def test_frame_columns_and_structures(env: Path, small_data: Path) -> None:
    ds = load_dataset("mp_20", "test")
    source = pd.read_csv(small_data / "mp_20" / "test.csv.gz", nrows=SMALL_ROWS["test"])
    frame = ds.frame
    for column in datasets.FRAME_COLUMNS:
        assert column in frame.columns
    assert (frame["split"] == "test").all()
    assert frame["material_id"].tolist() == source["material_id"].tolist()
    assert frame["spacegroup"].tolist() == source["spacegroup.number"].tolist()
    np.testing.assert_allclose(frame["e_above_hull_source"], source["e_above_hull"])
    assert frame["chemsys"].map(lambda s: s.split("-") == sorted(s.split("-"))).all()
    assert frame["e_above_hull"].notna().all() and (frame["e_above_hull"] >= -1e-6).all()

    assert len(ds.structures) == len(ds)
    assert ds.structure(-1) is ds.structures[-1]
    for i in (0, 57, len(ds) - 1):
        structure = ds.structure(i)
        expected = Structure.from_str(source["cif"][i], fmt="cif")
        np.testing.assert_allclose(structure.lattice.matrix, expected.lattice.matrix)
        np.testing.assert_allclose(structure.frac_coords, expected.frac_coords)
        assert structure.composition.reduced_formula == frame["formula"][i] == source["pretty_formula"][i]
        assert len(structure) == frame["num_atoms"][i]


def test_bad_rows_are_counted_not_dropped_silently(env: Path) -> None:
    ds = load_dataset("mp_20", "test")
    assert ds.failures == {"disordered": 1, "cif_parse": 1}
    assert not ds.frame["material_id"].isin(["test-disordered", "test-broken"]).any()


def test_corrupt_cache_is_rebuilt(env: Path) -> None:
    expected = load_dataset("mp_20", "val")
    (cache_file,) = env.glob("datasets/mp_20_val_*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[: cache_file.stat().st_size // 2])
    (hull_file,) = env.glob("datasets/mp_20_e_above_hull_*.parquet")
    hull_file.write_bytes(b"not a parquet file")

    rebuilt = load_dataset("mp_20", "val")
    pd.testing.assert_frame_equal(expected.frame, rebuilt.frame)
    assert datasets._read_cache(cache_file, "mp_20", "val") is not None
    pd.testing.assert_series_equal(pd.read_parquet(hull_file)["e_above_hull"], mp20_e_above_hull())


def test_all_splits_concatenated(env: Path) -> None:
    ds = load_dataset("mp_20", "all")
    assert ds.split == "all"
    assert ds.frame["split"].value_counts().to_dict() == SMALL_ROWS
    assert ds.failures == {"disordered": 1, "cif_parse": 1}
    assert ds.offsets[-1] == len(ds.atomic_numbers) == ds.frame["num_atoms"].sum()
    last = ds.structure(len(ds) - 1)
    assert last.composition.reduced_formula == ds.frame["formula"].iloc[-1]


def test_indices_in_chemsys(env: Path) -> None:
    ds = load_dataset("mp_20", "train")
    elements = ds.frame["chemsys"][0].split("-")
    inside = ds.indices_in_chemsys(elements)
    assert 0 in inside
    within = ds.frame["chemsys"].map(lambda s: set(s.split("-")) <= set(elements)).to_numpy()
    np.testing.assert_array_equal(inside, np.flatnonzero(within))
    assert len(ds.indices_in_chemsys(["Xe"])) == 0


def test_other_dataset_keeps_its_own_columns(env: Path) -> None:
    ds = load_dataset("perov_5", "val")
    frame = ds.frame
    assert len(ds) == PEROV_ROWS and ds.failures == {}
    assert (frame["num_atoms"] == 5).all()
    assert frame["formation_energy_per_atom"].isna().all() and frame["e_above_hull"].isna().all()
    assert frame["heat_ref"].notna().all() and frame["ind_gap"].notna().all()
    assert frame["spacegroup"].notna().all()  # not in the CSV: found with spglib while parsing
    assert frame["spacegroup"].between(1, 230).all()


def test_missing_data_fails_fast_and_clearly(env: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(DataUnavailableError, match=r"perov_5/test.*offline"):
        load_dataset("perov_5", "test")
    assert time.perf_counter() - start < 10
    with pytest.raises(DataUnavailableError, match="no public download"):
        load_dataset("mp_36k")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mp_21")


def test_hull_of_a_toy_system() -> None:
    table = pd.DataFrame(
        [
            ("li", "Li", 0.0),
            ("lio", "LiO", -1.0),
            ("li2o", "Li2O", -0.5),  # hull at x_O = 1/3 is -2/3 (Li to LiO)
            ("lio3", "LiO3", 0.1),  # hull at x_O = 3/4 is -1/2 (LiO to O)
            ("lifeo2", "LiFeO2", -2.0),  # Fe has no row: its zero reference is still there
            ("nan", "Li3O", np.nan),
        ],
        columns=["material_id", "formula", "formation_energy_per_atom"],
    )
    hull = mp20_e_above_hull(table)
    assert hull.to_dict() == pytest.approx(
        {"li": 0.0, "lio": 0.0, "li2o": 1 / 6, "lio3": 0.6, "lifeo2": 0.0, "nan": np.nan}, nan_ok=True
    )


def test_mp20_hull_on_a_real_subsystem(real_data: Path) -> None:
    """Ca-Ti-O and its subsystems from MP-20: physical checks, and agreement with MP's own hull where it is known."""
    columns = ["material_id", "pretty_formula", "formation_energy_per_atom", "e_above_hull"]
    files = ["train.csv.gz", "val.csv.gz", "test.csv.gz"]
    table = pd.concat([pd.read_csv(real_data / "mp_20" / f, usecols=columns) for f in files], ignore_index=True)
    elements = table["pretty_formula"].str.findall(r"[A-Z][a-z]?").map(set)
    table = table[elements.map(lambda e: e <= {"Ca", "Ti", "O"})].rename(columns={"pretty_formula": "formula"})
    assert len(table) > 50

    ours = mp20_e_above_hull(table).to_numpy()
    assert np.isfinite(ours).all() and (ours >= -1e-6).all()
    by_formula = pd.Series(ours, index=table["formula"]).groupby(level=0).min()
    assert by_formula[["Ca", "Ti", "O2"]].tolist() == pytest.approx([0, 0, 0], abs=1e-6)
    assert by_formula[["CaO", "TiO2", "CaTiO3"]].tolist() == pytest.approx([0, 0, 0], abs=1e-6)  # known stable
    mp_stable = table["e_above_hull"].to_numpy() == 0  # on the Materials Project's full hull
    assert mp_stable.sum() >= 5 and np.allclose(ours[mp_stable], 0.0, atol=1e-3)


def test_cli_stats_and_prepare(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stats", "--dataset", "mp_20", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {split: info["rows"] for split, info in stats["splits"].items()} == SMALL_ROWS
    assert stats["splits"]["test"]["failures"] == {"disordered": 1, "cif_parse": 1}
    assert sum(stats["spacegroups"].values()) == stats["rows"]
    assert sum(stats["atoms_per_cell"]["histogram"].values()) == stats["rows"]
    assert stats["elements"]["distinct"] == len(stats["elements"]["rows_per_element"]) > 10

    assert main(["data", "stats", "--dataset", "mp_20"]) == 0
    text = capsys.readouterr().out
    assert "space groups" in text and "atoms per cell" in text

    assert main(["data", "prepare", "--dataset", "perov_5"]) == 2  # its test split is missing and offline
    assert "perov_5/test" in capsys.readouterr().err
