"""The PyXtal charge-compensation baseline and the `bench generate` command."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from wyckoff_lab.core.generators import Conditions, UnsupportedConditionError, get_generator
from wyckoff_lab.core.generators import pyxtal_baseline
from wyckoff_lab.core.compositions import candidate_compositions, needs_charge_balance, oxidation_states
from wyckoff_lab.core.generators.pyxtal_baseline import PyXtalGenerator
from wyckoff_lab.core.symmetry import spacegroup
from wyckoff_lab.core.wyckoff import WyckoffCrystal

# Small explicit distributions: the MP-20 train ones would need the dataset parsed into the test's empty cache.
SYSTEMS = {"Na-Cl": 1, "Li-Fe-P-O": 1, "Mg-O": 1, "Ca-Ti-O": 1, "Al-Cu": 1}
SPACEGROUPS = {225: 3, 62: 2, 12: 2, 2: 1, 166: 1, 221: 1, 139: 1}


@pytest.fixture(scope="module")
def generator() -> PyXtalGenerator:
    return PyXtalGenerator(chemical_systems=SYSTEMS, spacegroups=SPACEGROUPS)


def charge_neutral(composition) -> bool:
    """Some choice of one oxidation state per element sums to zero (checked by brute force)."""
    counts = composition.get_el_amt_dict()
    return any(sum(counts[el] * state for el, state in zip(counts, states)) == 0
               for states in itertools.product(*(oxidation_states(el) for el in counts)))


def primitive_atoms(candidate) -> float:
    return len(candidate.structure) / spacegroup(candidate.intended_spacegroup).centering_factor


def test_unconditioned_structures_are_charge_balanced_and_within_limits(generator):
    result = generator.generate(6, Conditions(max_atoms=10), seed=0)
    assert len(result.candidates) + sum(result.failures.values()) == result.attempts
    assert len(result.candidates) == 6
    for candidate in result.candidates:
        elements = tuple(sorted(el.symbol for el in candidate.structure.composition))
        assert elements in {tuple(sorted(system.split("-"))) for system in SYSTEMS}
        assert candidate.intended_spacegroup in SPACEGROUPS
        assert primitive_atoms(candidate) <= 10
        if needs_charge_balance(elements):
            assert charge_neutral(candidate.structure.composition), candidate.structure.composition
        rebuilt = WyckoffCrystal.from_dict(candidate.wyckoff)
        assert rebuilt.spacegroup == candidate.intended_spacegroup
        assert rebuilt.composition == candidate.structure.composition
        assert candidate.generator == "pyxtal" and candidate.tokens is None and candidate.sampling_time_s > 0


def test_default_distribution_is_used_when_none_given(monkeypatch):
    monkeypatch.setattr(pyxtal_baseline, "mp20_train_distribution", lambda: ({("Mg", "O"): 1}, {225: 1}))
    result = get_generator("pyxtal").generate(2, seed=3)
    assert [c.structure.composition.reduced_formula for c in result.candidates] == ["MgO", "MgO"]
    assert {c.intended_spacegroup for c in result.candidates} == {225}


def test_chemical_system_al_ca_cu(generator):
    result = generator.generate(3, Conditions(elements=("Al", "Ca", "Cu"), max_atoms=12), seed=1)
    assert len(result.candidates) == 3
    for candidate in result.candidates:
        assert {el.symbol for el in candidate.structure.composition} == {"Al", "Ca", "Cu"}
        assert primitive_atoms(candidate) <= 12


def test_formula_and_spacegroup(generator):
    conditions = Conditions(formula="LiFePO4", spacegroup=62, max_atoms=28)  # Pnma orbits hold 4 or 8 atoms
    result = generator.generate(2, conditions, seed=2)
    assert len(result.candidates) == 2
    for candidate in result.candidates:
        assert candidate.structure.composition.reduced_formula == "LiFePO4"
        assert candidate.intended_spacegroup == 62
        assert candidate.conditions == conditions


def test_rock_salt_chemistry_in_fm3m(generator):
    result = generator.generate(3, Conditions(elements=("Na", "Cl"), spacegroup=225, max_atoms=8), seed=4)
    assert len(result.candidates) == 3
    for candidate in result.candidates:
        assert candidate.structure.composition.reduced_formula == "NaCl"  # the only neutral Na-Cl ratio
        assert candidate.intended_spacegroup == 225
        assert primitive_atoms(candidate) <= 8


def test_template_orbits_are_placed(generator):
    conditions = Conditions(formula="NaCl", spacegroup=225, template=(("Na", "4a"), ("Cl", "4b")), max_atoms=6)
    result = generator.generate(2, conditions, seed=5)
    assert len(result.candidates) == 2
    for candidate in result.candidates:
        orbits = {(o["element"], o["wyckoff"]) for o in candidate.wyckoff["orbits"]}
        assert {("Na", "4a"), ("Cl", "4b")} <= orbits


def test_reproducible_by_seed(generator):
    first = generator.generate(3, Conditions(max_atoms=8), seed=11)
    again = generator.generate(3, Conditions(max_atoms=8), seed=11)
    other = generator.generate(3, Conditions(max_atoms=8), seed=12)
    assert [c.structure for c in first.candidates] == [c.structure for c in again.candidates]
    assert [c.structure for c in first.candidates] != [c.structure for c in other.candidates]
    assert {c.seed for c in first.candidates} == {11}


@pytest.mark.parametrize("conditions", [Conditions(stability="low"), Conditions(properties={"band_gap": 1.5})])
def test_refuses_unsupported_conditions(generator, conditions):
    with pytest.raises(UnsupportedConditionError):
        generator.generate(1, conditions)


def test_impossible_requests_are_refused_with_the_reason(generator):
    # Fd-3m multiplicities start at 8, so NaCl needs 4 formula units in the F-centred cell: 8 atoms > max_atoms 3.
    with pytest.raises(ValueError, match=r"227 \(Fd-3m\) cannot hold NaCl .*Na4 Cl4"):
        generator.generate(2, Conditions(formula="NaCl", spacegroup=227, max_atoms=3))
    with pytest.raises(ValueError, match="no charge-balanced composition of O-Ne"):
        generator.generate(2, Conditions(elements=("Ne", "O")))
    assert candidate_compositions(("O", "Ne"), 20) == ()


def test_failed_attempts_are_counted_and_capped():
    result = PyXtalGenerator(chemical_systems={"Ar-O": 1}, spacegroups={225: 1}).generate(3, seed=0)
    assert result.candidates == []
    assert result.attempts == 3 * pyxtal_baseline.ATTEMPTS_PER_STRUCTURE
    assert result.failures == {"no_charge_balanced_composition": result.attempts}


def test_charge_balanced_compositions_match_smact():
    import smact

    elements = ("Li", "Fe", "P", "O")
    expected = {ratio for states in itertools.product(*(oxidation_states(el) for el in elements))
                for ratio in smact.neutral_ratios(list(states), threshold=12) if sum(ratio) <= 12}
    assert set(candidate_compositions(elements, 12)) == expected
    assert (1, 1, 1, 4) in expected  # LiFePO4


def test_bench_generate_json(monkeypatch, capsys, mp20_test_rows):
    from wyckoff_lab.app.cli import main
    from wyckoff_lab.app.commands import bench
    from wyckoff_lab.core.metrics import ReferenceIndex, ReferenceStats

    structures = [structure for _, structure, _ in mp20_test_rows]
    systems = Counter(tuple(sorted(el.symbol for el in s.composition)) for s in structures)
    groups = Counter(number for _, _, number in mp20_test_rows)
    monkeypatch.setattr(pyxtal_baseline, "mp20_train_distribution", lambda: (dict(systems), dict(groups)))
    references = ReferenceIndex(structures[:100]), ReferenceStats.from_structures(structures[100:160])
    monkeypatch.setattr(bench, "load_references", lambda symprec, progress, generators: references)

    code = main(["bench", "generate", "--n", "8", "--generators", "no-such-generator,pyxtal", "--json"])
    assert code == 1  # the report is printed for what ran, but a generator that could not run fails the benchmark
    report = json.loads(capsys.readouterr().out)
    assert set(report["machine"]) >= {"cpu", "cores", "torch", "device", "python", "platform"}
    assert "error" in report["generators"]["no-such-generator"]
    runs = report["generators"]["pyxtal"]
    assert list(runs) == ["1.0"]  # PyXtal has no temperature
    row = runs["1.0"]
    assert row["valid_per_min"] > 0
    for key in bench.RATE_KEYS:
        assert 0.0 <= row[key] <= 1.0, key
    assert row["structures"] + sum(row["failures"].values()) == row["attempts"]


def test_train_distribution_follows_the_data_folder(tmp_path, monkeypatch):
    """The counts are cached per data folder: a process that points WYCKOFF_LAB_DATA elsewhere (the test suite
    does, fixture by fixture) must not keep drawing from the first folder's MP-20 train."""
    import os
    from pathlib import Path

    import pandas as pd

    from wyckoff_lab.core import paths

    root = Path(os.environ.get(paths.DATA_ENV) or "/nonexistent")
    if not (root / "mp_20" / "train_meta_nocoords.csv.gz").is_file():
        pytest.skip(f"{paths.DATA_ENV} is not set or has no MP-20 train (the README says how to get it)")
    counts = []
    for name, rows in (("first", slice(0, 12)), ("second", slice(12, 30))):
        folder = tmp_path / name / "mp_20"
        folder.mkdir(parents=True)
        for split in ("train", "train_meta_nocoords"):
            pd.read_csv(root / "mp_20" / f"{split}.csv.gz", nrows=30).iloc[rows].to_csv(
                folder / f"{split}.csv.gz", index=False)
        for split in ("val", "test"):  # the stability labels need a hull over every split
            pd.read_csv(root / "mp_20" / f"{split}.csv.gz", nrows=5).to_csv(folder / f"{split}.csv.gz", index=False)
        monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / name))
        systems, groups = pyxtal_baseline.mp20_train_distribution()
        counts.append((sum(systems.values()), sum(groups.values())))
    assert counts == [(12, 12), (18, 18)]
