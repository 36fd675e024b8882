"""Dataset loading on real data: CIF parsing, the split cache, failure accounting, offline errors, MP-20's hull."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Composition, Structure
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


def test_take_keeps_rows_and_their_atoms(env: Path) -> None:
    ds = load_dataset("mp_20", "val")
    rows = [5, 0, 42]
    part = ds.take(rows, split="picked")
    assert part.split == "picked" and len(part) == 3
    assert part.frame["material_id"].tolist() == ds.frame["material_id"].iloc[rows].tolist()
    for i, row in enumerate(rows):
        assert part.structure(i) == ds.structure(row)
    assert len(ds.take([])) == 0


def test_align_formation_energies_recovers_element_offsets() -> None:
    """A table on another scale (one offset per element, one outlier) is put back onto the reference's scale."""
    rng = np.random.default_rng(0)
    elements = ["Li", "O", "Se", "Fe", "Te", "Mg"]
    offsets = dict(zip(elements, [0.0, -0.03, 0.46, 0.02, 0.41, -0.01]))
    formulas = ["".join(f"{el}{n}" for el, n in zip(elements, counts) if n)
                for counts in rng.integers(0, 4, size=(200, len(elements)))]
    formulas = [f for f in formulas if f]
    shift = np.array([sum(x * offsets[el.symbol] for el, x in Composition(f).fractional_composition.items())
                      for f in formulas])
    truth = rng.uniform(-2, 0, len(formulas))
    reference = pd.DataFrame({"material_id": [f"mp-{i}" for i in range(len(formulas))], "formula": formulas,
                              "formation_energy_per_atom": truth})
    table = reference.copy()
    table["formation_energy_per_atom"] = truth + shift
    table.loc[0, "formation_energy_per_atom"] += 1.0  # e.g. a new magnetic ground state: left out of the fit
    table.loc[len(table)] = ["extra-1", "Li2Se", -1.0]  # not in the reference: moved by the fitted offsets
    table.loc[len(table)] = ["extra-2", "KrF2", -0.5]  # elements the fit never saw: not moved

    aligned = datasets.align_formation_energies(table, reference)
    np.testing.assert_allclose(aligned[1:len(formulas)], truth[1:], atol=1e-9)
    assert aligned[0] == pytest.approx(truth[0] + 1.0)
    assert aligned[-2] == pytest.approx(-1.0 - 2 / 3 * offsets["Li"] - 1 / 3 * offsets["Se"])
    assert aligned[-1] == pytest.approx(-0.5)


@pytest.fixture
def env_with_36k(env: Path, small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """`env`, plus a 36k set made of MP-20 rows: train rows under their own ids, and copies of val and train rows
    under new ids with formation energies 0.3 eV/atom higher."""
    root = tmp_path / "data36k"
    (root / "mp_crysxpp_36k").mkdir(parents=True)
    (root / "mp_20").symlink_to(small_data / "mp_20")
    train = pd.read_csv(small_data / "mp_20" / "train.csv.gz")
    val = pd.read_csv(small_data / "mp_20" / "val.csv.gz")
    same_id = train.iloc[:10]
    # Val rows of systems that train has (the small data has one) and of systems it has only in val.
    train_systems = {Composition(f).chemical_system for f in train["pretty_formula"]}
    shared = val["pretty_formula"].map(lambda f: Composition(f).chemical_system in train_systems)
    val = pd.concat([val[shared], val[~shared].iloc[:10]])
    copies = pd.concat([val.assign(material_id=[f"extra-val-{i}" for i in range(len(val))]),
                        train.iloc[10:20].assign(material_id=[f"extra-train-{i}" for i in range(10)])])
    copies["formation_energy_per_atom"] += 0.3
    table = pd.concat([same_id, copies], ignore_index=True)
    table["crysxpp_id"] = range(len(table))
    table[["crysxpp_id", "material_id", "formation_energy_per_atom", "cif"]].to_csv(
        root / "mp_crysxpp_36k" / "structures.csv.gz", index=False)
    monkeypatch.setenv(paths.DATA_ENV, str(root))
    source = dict(zip(copies["material_id"], pd.concat([val, train.iloc[10:20]])["material_id"]))
    return {"source_id": source, "train_systems": set(load_dataset("mp_20", "train").frame["chemsys"])}


def test_mp36k_training_rows_keep_mp20_held_out_out(env_with_36k: dict) -> None:
    rows = datasets.mp36k_training_rows()
    ids = set(rows.frame["material_id"])
    assert not ids & set(load_dataset("mp_20", "all").frame["material_id"])  # no MP-20 id, train, val or test
    assert {f"extra-train-{i}" for i in range(10)} <= ids
    val_copies = load_dataset("mp_36k").frame.query("material_id.str.startswith('extra-val')")
    in_train_system = val_copies["chemsys"].isin(env_with_36k["train_systems"])
    assert 0 < in_train_system.sum() < len(val_copies)  # the small data has both kinds
    assert ids & set(val_copies["material_id"]) == set(val_copies["material_id"][in_train_system])
    assert rows.split == "train_extra"

    # Same scale (the shared ids agree, so no offsets): each copy sits 0.3 eV/atom above its original.
    hull = datasets.mp20_and_36k_e_above_hull()
    expected = rows.frame["material_id"].map(env_with_36k["source_id"]).map(hull) + 0.3
    np.testing.assert_allclose(rows.frame["e_above_hull"], expected, atol=1e-6)
    assert (hull[load_dataset("mp_20", "train").frame["material_id"]] >= -1e-6).all()


def test_training_set_with_36k_labels_unstable_rows(env_with_36k: dict) -> None:
    from wyckoff_lab.core.generators.wyckoff_transformer.train import load_training_set

    plain, plain_report = load_training_set("mp_20", "train", 20, 160)
    mixed, report = load_training_set("mp_20", "train", 20, 160, extra_data="mp_36k", add_extra_rows=True)
    assert report["kept_mp_20_train"] == plain_report["kept"]
    assert report["kept_mp_36k_train_extra"] > 0
    assert report["kept"] == plain_report["kept"] + report["kept_mp_36k_train_extra"]
    assert mixed.stability[plain_report["kept"]:].count("high") == report["kept_mp_36k_train_extra"]
    val, val_report = load_training_set("mp_20", "val", 20, 160, extra_data="mp_36k")  # relabelled, no rows added
    assert "kept_mp_36k_train_extra" not in val_report and val_report["kept"] == len(val.crystals)
    with pytest.raises(ValueError, match="not available for 'perov_5'"):
        load_training_set("perov_5", "val", 20, 160, extra_data="mp_36k")


def test_novelty_reference_holds_what_the_transformer_trained_on(env_with_36k: dict) -> None:
    from types import SimpleNamespace

    from wyckoff_lab.app.commands.bench import novelty_reference

    train = load_dataset("mp_20", "train")
    plain = SimpleNamespace(metadata={"train_config": {"dataset": "mp_20"}})
    extended = SimpleNamespace(metadata={"train_config": {"dataset": "mp_20", "extra_data": "mp_36k"}})
    assert len(novelty_reference({"wyckoff-transformer": plain, "pyxtal": SimpleNamespace()}, False)) == len(train)
    reference = novelty_reference({"wyckoff-transformer": extended, "other": ValueError("not loaded")}, False)
    extra = datasets.mp36k_training_rows()
    assert len(reference) == len(train) + len(extra)
    assert reference.contains(extra.structure(0)) and reference.contains(train.structure(0))
