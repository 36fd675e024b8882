"""`bench sun` and `bench recover`: held-out system selection on real MP-20, recovery with a tiny transformer through
the CLI, and the S.U.N. bookkeeping (sampling retries, hull failures, counting) on hand-made inputs."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from pymatgen.core import Element, Lattice, Structure

from wyckoff_lab.app.cli import main
from wyckoff_lab.core import paths
from wyckoff_lab.core.benchmarks import (
    KnownStructure,
    count_within,
    first_matches,
    sample_structures,
    select_held_out_systems,
)
from wyckoff_lab.core.generators import Candidate, Conditions, GenerationResult, Generator
from wyckoff_lab.core.generators.wyckoff_transformer.model import WyckoffTransformer, WyckoffTransformerConfig
from wyckoff_lab.core.generators.wyckoff_transformer.train import export
from wyckoff_lab.core.hull import HullPoint
from wyckoff_lab.core.pipeline import HullPlacement, place_on_hulls, sun_summary
from wyckoff_lab.core.relax import RelaxResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = WyckoffTransformerConfig(d_model=32, n_layers=1, n_heads=2, n_mixture=2, dropout=0.0)
SMALL_TRAIN_ROWS = 40  # enough for PyXtal's space-group distribution and MP-20's hull, parsed in a second


def _chemsys(elements: str) -> str:
    return "-".join(sorted(ast.literal_eval(elements)))


@pytest.fixture(scope="module")
def real_frames(real_data: Path) -> tuple[pd.DataFrame, set[str]]:
    """MP-20 val+test rows (chemsys, formula, spacegroup) and the train systems, read from the CSVs without
    parsing CIFs (a cold dataset cache would take minutes)."""
    held_out = pd.concat([pd.read_csv(real_data / "mp_20" / f"{split}.csv.gz",
                                      usecols=["material_id", "pretty_formula", "elements", "spacegroup.number"])
                          for split in ("val", "test")], ignore_index=True)
    held_out["chemsys"] = held_out["elements"].map(_chemsys)
    held_out = held_out.rename(columns={"pretty_formula": "formula", "spacegroup.number": "spacegroup"})
    train = set()
    for name in ("train", "train_meta_nocoords"):
        train |= set(pd.read_csv(real_data / "mp_20" / f"{name}.csv.gz", usecols=["elements"])["elements"]
                     .map(_chemsys))
    return held_out, train


def test_auto_selection_on_real_mp20(real_frames):
    held_out, train = real_frames
    systems = select_held_out_systems(held_out, train)
    assert len(systems) == 5
    train_elements = {el for system in train for el in system.split("-")}
    counts = []
    for system in systems:
        rows = held_out[held_out["chemsys"] == system]
        assert len(system.split("-")) == 3 and system not in train
        assert set(system.split("-")) <= train_elements
        counts.append(len(rows.drop_duplicates(["formula", "spacegroup"])))
    assert counts == sorted(counts, reverse=True) and min(counts) >= 4  # several known structures each
    # Matra-Genoa's Al-Ca-Cu is not held out in MP-20: two train rows (Ca3Al7Cu2, CaAl8Cu4).
    assert "Al-Ca-Cu" in train


def test_selection_rules_on_a_toy_frame():
    rows = [("A1", "Al-Ca-Cu", "CaAlCu", 139), ("A2", "Al-Ca-Cu", "CaAl2Cu", 12),  # in train: out
            ("B1", "Ga-La-O", "LaGaO3", 62), ("B2", "Ga-La-O", "LaGaO3", 62),  # 1 distinct pair, 2 rows
            ("C1", "Co-Gd-Si", "GdCoSi", 129), ("C2", "Co-Gd-Si", "GdCoSi3", 107),  # 2 distinct pairs
            ("D1", "Na-Cl", "NaCl", 225), ("D2", "Na-Cl", "NaCl", 221),  # binary: out
            ("E1", "Cu-O-Sm", "SmCuO2", 166), ("E2", "Cu-O-Sm", "SmCuO3", 62),  # 2 pairs, ties with Co-Gd-Si
            ("F1", "Ga-O-Xe", "XeGaO3", 62), ("F2", "Ga-O-Xe", "XeGaO4", 62)]  # Xe never in train: out
    frame = pd.DataFrame(rows, columns=["material_id", "chemsys", "formula", "spacegroup"])
    train = {"Al-Ca-Cu", "Ca-Cu", "Al", "Ga-O", "La-O", "Co-Gd", "Si", "Sm-O", "Cu-O", "Na-Cl"}
    assert select_held_out_systems(frame, train) == ["Co-Gd-Si", "Cu-O-Sm", "Ga-La-O"]
    assert select_held_out_systems(frame, train, limit=1) == ["Co-Gd-Si"]
    assert select_held_out_systems(frame, train, n_elements=2) == []


# -- recovery through the CLI, with a tiny random transformer ---------------------------------------------------------


@pytest.fixture(scope="module")
def recover_system(real_frames) -> str:
    """The first held-out system the automatic rule picks on the real data."""
    held_out, train = real_frames
    return select_held_out_systems(held_out, train)[0]


@pytest.fixture(scope="module")
def small_mp20(real_data: Path, recover_system: str, tmp_path_factory) -> Path:
    """A data folder with real MP-20 rows: val/test rows of `recover_system` plus a few others, and the first
    train rows, so that parsing everything into a fresh cache takes seconds."""
    root = tmp_path_factory.mktemp("data")
    (root / "mp_20").mkdir()
    for split in ("val", "test"):
        table = pd.read_csv(real_data / "mp_20" / f"{split}.csv.gz")
        inside = table["elements"].map(_chemsys) == recover_system
        table[inside | (table.index < 10)].to_csv(root / "mp_20" / f"{split}.csv.gz", index=False)
    for name in ("train", "train_meta_nocoords"):
        table = pd.read_csv(real_data / "mp_20" / f"{name}.csv.gz", nrows=SMALL_TRAIN_ROWS)
        table.to_csv(root / "mp_20" / f"{name}.csv.gz", index=False)
    return root


@pytest.fixture
def tiny_transformer(small_mp20: Path, tmp_path: Path, monkeypatch) -> None:
    """Randomly initialised tiny weights as the shipped model, and the small MP-20 as the data (fresh cache)."""
    torch.manual_seed(0)
    elements = {Element.from_Z(z).symbol: 1 for z in range(1, 84)}
    export(WyckoffTransformer(TINY), tmp_path / "models" / "wyckoff_transformer",
           {"element_counts": elements, "spacegroup_counts": {str(sg): 1 for sg in range(1, 231)}})
    monkeypatch.setenv("WYCKOFF_LAB_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv(paths.DATA_ENV, str(small_mp20))
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))


def test_cli_recover_json(tiny_transformer, recover_system, capsys):
    code = main(["bench", "recover", "--systems", recover_system, "--budgets", "4,2", "--generators",
                 "wyckoff-transformer,pyxtal", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["budgets"] == [2, 4] and report["relax"] is None
    system = report["systems"][recover_system]
    assert system["in_train"] is False and system["held_out_rows"] >= system["known"] >= 1
    assert len(system["known_structures"]) == system["known"]
    for name in ("wyckoff-transformer", "pyxtal"):
        entry = system["generators"][name]
        assert entry["known"] == system["known"] and set(entry["recovered"]) == {"2", "4"}
        assert 0 <= entry["recovered"]["2"] <= entry["recovered"]["4"] <= entry["known"]
        assert set(entry["first_match_sample"]) == {k["material_id"] for k in system["known_structures"]}
        assert entry["structures"] <= 4 and entry["attempts"] >= entry["structures"]
        assert report["totals"][name]["known"] == system["known"]
    lines = report["table"].splitlines()
    assert lines[0] == ("| system | known | wyckoff-transformer ≤2 | wyckoff-transformer ≤4 | pyxtal ≤2 | pyxtal ≤4 |")
    assert lines[2].startswith(f"| {recover_system} | {system['known']} |") and lines[-1].startswith("| **total** |")


def test_cli_recover_refuses_a_system_without_held_out_structures(tiny_transformer, capsys):
    assert main(["bench", "recover", "--systems", "Xe-Kr-Ar", "--generators", "pyxtal", "--json"]) == 2
    assert "nothing to recover" in json.loads(capsys.readouterr().out)["message"]


def test_cli_recover_with_other_weights(tiny_transformer, recover_system, tmp_path, capsys):
    # --weights points the transformer at another folder; one that holds no weights is reported, and since no
    # generator ran, the benchmark exits 1.
    code = main(["bench", "recover", "--systems", recover_system, "--budgets", "2", "--generators",
                 "wyckoff-transformer", "--weights", str(tmp_path / "nowhere"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    assert "no Wyckoff transformer weights in" in report["systems"][recover_system]["generators"][
        "wyckoff-transformer"]["error"]


@pytest.mark.parametrize("argv, message", [
    (["recover", "--budgets", "0,10"], "--budgets must be positive"),
    (["recover", "--systems", "Al-Qq"], "unknown element Qq in 'Al-Qq'"),
    (["sun", "--n", "0"], "--n must be at least 1"),
    (["sun", "--max-references", "-1"], "--max-references"),
    (["sun", "--n", "1", "--systems", "Li-O,Na-Cl"], "fewer than the 2 systems"),
    (["sun", "--systems", "Na-Qq"], "unknown element Qq in 'Na-Qq'"),
])
def test_cli_bad_arguments_fail_before_any_work(argv, message, capsys):
    assert main(["bench", *argv, "--json"]) == 2
    assert message in json.loads(capsys.readouterr().out)["message"]


@pytest.fixture
def na_cl_mp20(real_data: Path, tmp_path: Path, monkeypatch) -> None:
    """A data folder with the real MP-20 rows inside Na-Cl (every split) plus the first train rows, and a fresh
    cache: the hull and the novelty reference then parse in seconds."""
    root = tmp_path / "data"
    (root / "mp_20").mkdir(parents=True)
    for name in ("train", "train_meta_nocoords", "val", "test"):
        table = pd.read_csv(real_data / "mp_20" / f"{name}.csv.gz")
        inside = table["elements"].map(_chemsys).isin({"Na", "Cl", "Cl-Na"})
        table[inside | (table.index < (SMALL_TRAIN_ROWS if name.startswith("train") else 0))].to_csv(
            root / "mp_20" / f"{name}.csv.gz", index=False)
    monkeypatch.setenv(paths.DATA_ENV, str(root))
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))


def test_cli_sun_on_one_system_with_chgnet(na_cl_mp20, capsys):
    # The whole S.U.N. path on real data: PyXtal samples in Na-Cl, CHGNet relaxes them and the Na-Cl hull of MP-20
    # references relaxed alike, then S.U.N. is counted.
    assert main(["bench", "sun", "--n", "2", "--systems", "Na-Cl", "--generators", "pyxtal", "--relax", "chgnet",
                 "--max-references", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["generators"]["pyxtal"]
    assert report["systems"] == ["Cl-Na"] and report["potential"] == "chgnet"
    assert row["structures"] == 2 and row["relaxed"] + row["relax_status"].get("atoms_too_close", 0) >= 1
    assert row["hull_systems"] == 1 and not row["hull_failures"]
    assert row["n_e_above_hull"] >= 1 and row["e_above_hull_mean"] > -1.0
    assert 0.0 <= row["msun_rate"] <= 1.0
    assert set(row["n_sun_within_ev"]) == {"0.001", "0.05", "0.1"}
    # Only the baseline ran: no ratio to give, but the table has its place.
    assert report["ratios_over_baseline"] == {"sun_rate": {}, "msun_rate": {}}
    from wyckoff_lab.app.commands.bench import format_sun

    assert "S.U.N. by threshold: < 0.001 eV/atom" in format_sun(report)


def test_cli_discover_gives_each_strategy_its_own_relaxation_cache(na_cl_mp20, capsys):
    # Two strategies over the same seeded PyXtal samples on real Na-Cl rows: the second must relax them again (a
    # shared cache would hand it the first one's relaxations for free and inflate its M.S.U.N. per CPU-hour).
    import os

    before = os.environ[paths.CACHE_ENV]
    assert main(["bench", "discover", "--systems", "Na-Cl", "--strategies", "pyxtal-relax-all,pyxtal+prescreen",
                 "--budget-min", "0.05", "--samples", "3", "--max-steps", "20", "--potential", "chgnet",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert os.environ[paths.CACHE_ENV] == before  # the strategies' caches were temporary
    assert report["strategies"] == ["pyxtal-relax-all", "pyxtal+prescreen"] and list(report["systems"]) == ["Cl-Na"]
    for name, row in report["systems"]["Cl-Na"].items():
        assert "error" not in row, row
        assert row["counts"]["relaxed"] >= 1 and row["counts"]["relaxed_cached"] == 0, (name, row["counts"])
        assert row["minutes"] > 0 and set(row["stage_minutes"]) == {"pool", "dedup", "hull", "prescreen", "relax"}
        assert row["msun_per_cpu_hour"] == pytest.approx(row["msun"] / (row["minutes"] / 60))
    totals = report["totals"]
    base = totals["pyxtal-relax-all"]
    assert base["msun_per_cpu_hour_vs_pyxtal"] in (None, 1.0)
    if base["msun"]:
        other = totals["pyxtal+prescreen"]
        assert other["msun_per_cpu_hour_vs_pyxtal"] == pytest.approx(other["msun_per_cpu_hour"]
                                                                      / base["msun_per_cpu_hour"])


def test_structures_are_relaxed_in_their_primitive_cells():
    from wyckoff_lab.core.structures import primitive_cell

    conventional = rocksalt()  # 8 atoms, F-centred
    primitive = primitive_cell(conventional)
    assert len(primitive) == 2 and primitive.volume == pytest.approx(conventional.volume / 4)
    assert primitive.composition.reduced_formula == "NaCl"
    already = cesium_chloride_type()
    assert primitive_cell(already) is already
    # a cell that is only nearly centred keeps its atoms: the tolerance is tight
    shaken = rocksalt()
    shaken.translate_sites([0], [0.02, 0, 0])
    assert len(primitive_cell(shaken)) == 8


# -- hand-made inputs -------------------------------------------------------------------------------------------------


def rocksalt() -> Structure:
    return Structure.from_spacegroup(225, Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def cesium_chloride_type() -> Structure:
    return Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def zincblende_type() -> Structure:
    return Structure.from_spacegroup(216, Lattice.cubic(6.0), ["Na", "Cl"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def test_sun_summary_counts_like_the_definitions():
    colliding = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])
    copper = Structure.from_spacegroup(225, Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]])
    structures = [rocksalt(), cesium_chloride_type(), cesium_chloride_type(), zincblende_type(), copper, colliding]
    # known (not novel) | S.U.N. | duplicate | metastable only | one element | invalid, relaxation failed
    e_above_hull = [-0.01, 0.0, 0.0, 0.05, -0.1, math.nan]
    summary = sun_summary(structures, e_above_hull, [rocksalt()]).as_dict()
    assert summary["n"] == 6 and summary["n_struct_valid"] == 5
    assert summary["n_unique"] == 4 and summary["n_novel"] == 3
    assert summary["n_sun"] == 1 and summary["sun_rate"] == pytest.approx(1 / 6)
    assert summary["n_msun"] == 2 and summary["msun_rate"] == pytest.approx(2 / 6)
    assert summary["n_e_above_hull"] == 5
    assert summary["e_above_hull_mean"] == pytest.approx(-0.012) and summary["e_above_hull_median"] == 0.0
    # Matra-Genoa's thresholds: the CsCl type at 0.0 counts below 0.001, the zincblende type at 0.05 only below 0.1
    assert summary["n_sun_within_ev"] == {"0.001": 1, "0.05": 1, "0.1": 2}
    assert summary["e_above_hull_quantiles"]["0.5"] == 0.0
    empty = sun_summary([], [], [rocksalt()]).as_dict()
    assert empty["n"] == 0 and empty["n_sun"] is None and math.isnan(empty["e_above_hull_mean"])


def _result(structure: Structure, status: str) -> RelaxResult:
    return RelaxResult(structure, structure, -3.0 * len(structure), -3.0, 10, 0.01, status, "", "fake", "fake-1",
                       0.0, 0.1)


class FakeHull:
    def __init__(self, e_above_hull: float):
        self.value = e_above_hull

    def e_above_hull(self, results):
        return [HullPoint(r.final.composition.reduced_formula, r.energy_per_atom, self.value, {}, r.status, r)
                for r in results]


class FakeBook:
    """Na-Cl has a hull; Cu's build failed."""

    def __init__(self):
        self.seconds = {("Cl", "Na"): 2.0, ("Cu",): 0.5}

    def get(self, elements):
        if elements == ("Cu",):
            raise ValueError("no usable elemental reference for Cu")
        return FakeHull(0.02)


def test_hull_placement_counts_every_failure():
    copper = Structure.from_spacegroup(225, Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]])
    results = [_result(rocksalt(), "converged"), _result(zincblende_type(), "not_converged"),
               _result(cesium_chloride_type(), "exploded"), _result(copper, "converged")]
    placement = place_on_hulls(results, FakeBook())
    assert isinstance(placement, HullPlacement)
    assert placement.e_above_hull[:2] == [0.02, 0.02]  # an unconverged relaxation still gives an upper bound
    assert math.isnan(placement.e_above_hull[2]) and math.isnan(placement.e_above_hull[3])
    assert placement.n_hull_failed == 1 and placement.failures == {"Cu": "no usable elemental reference for Cu"}
    assert sorted(placement.systems) == [("Cl", "Na"), ("Cu",)] and placement.hull_s == 2.5


class FlakyGenerator(Generator):
    """Every other attempt fails; `dead` makes every attempt fail."""

    name = "flaky"
    supported_conditions = frozenset({"stability"})

    def __init__(self, dead: bool = False):
        self.dead = dead
        self.seeds = []

    def _generate(self, n, conditions, temperature, seed, progress):
        self.seeds.append(seed)
        made = 0 if self.dead else (n + 1) // 2
        candidates = [Candidate(cesium_chloride_type(), self.name, conditions) for _ in range(made)]
        return GenerationResult(candidates, attempts=n, failures={"decode": n - made} if n > made else {})


def test_sampling_asks_again_for_failed_attempts():
    generator = FlakyGenerator()
    sample = sample_structures(generator, 10, Conditions(stability="low"), 1.0, seed=3)
    assert len(sample.candidates) == 10 and sample.requested == 10
    assert sample.attempts == 10 + 5 + 2 + 1 and sample.failures == {"decode": 5 + 2 + 1}
    assert generator.seeds[0] == 3 and len(set(generator.seeds)) == len(generator.seeds)
    dead = sample_structures(FlakyGenerator(dead=True), 10, Conditions(), 1.0, seed=0)
    assert dead.candidates == [] and dead.attempts == 10 and dead.failures == {"decode": 10}


def test_first_matches_and_budgets():
    strained = rocksalt()
    strained.apply_strain(0.03)
    copper_chloride = Structure(Lattice.cubic(5.4), ["Cu", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    known = [KnownStructure("mp-22862", "test", "NaCl", 225, rocksalt()),
             KnownStructure("zb", "val", "NaCl", 216, zincblende_type())]
    samples = [[cesium_chloride_type()], [copper_chloride], [cesium_chloride_type(), strained]]
    first = first_matches(samples, known)
    assert first == [2, None]  # found as the second form (say, relaxed) of the third sample; zincblende never
    assert count_within(first, [1, 3, 10]) == {"1": 0, "3": 1, "10": 1}
    assert count_within([], [5]) == {"5": 0}
