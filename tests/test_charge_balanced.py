"""The charge-balanced condition: its validation, the composition check, the shared resampling that honours it
for any generator (the shipped Wyckoff transformer, real spglib), and `wyckoff-lab sample --charge-balanced`."""

from __future__ import annotations

import json

import pytest
from pymatgen.core import Structure

from wyckoff_lab.app.cli import main
from wyckoff_lab.core.compositions import is_charge_balanced
from wyckoff_lab.core.generators import Candidate, Conditions, UnsupportedConditionError
from wyckoff_lab.core.generators.quality import NOT_CHARGE_BALANCED, generate_charge_balanced

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Rock salt's cation pinned on 4a of Fm-3m: the request, where 27 of 30 samples were not NaCl-like.
ROCKSALT_NA = Conditions(elements=("Na", "Cl"), spacegroup=225, template=(("Na", "4a"),), max_atoms=20)


@pytest.mark.parametrize("formula, balanced", [("NaCl", True), ("Na2Cl", False), ("NaCl2", False),
                                               ("LiFePO4", True), ("NaMgCl3", True), ("CaCu5", True),
                                               ("Al", True), ("Fe3O4", False)])
def test_one_oxidation_state_per_element_sums_to_zero_alloys_count_as_balanced(formula, balanced):
    # Fe3O4 is mixed valence: SMACT's rule (one state per element) does not balance it, as SMACT's validity.
    assert is_charge_balanced(formula) is balanced


def test_the_condition_is_set_named_kept_and_read_back():
    conditions = Conditions(elements=("Cl", "Na"), charge_balanced=True)
    assert "charge_balanced" in conditions.set_names()
    assert "charge_balanced" not in Conditions(elements=("Na", "Cl")).set_names()
    candidate = Candidate(Structure.from_spacegroup(225, [[5.6, 0, 0], [0, 5.6, 0], [0, 0, 5.6]], ["Na", "Cl"],
                                                    [[0, 0, 0], [0.5, 0.5, 0.5]]), "test", conditions)
    assert Candidate.from_dict(candidate.as_dict()).conditions.charge_balanced is True


def test_requests_no_balanced_composition_can_satisfy_are_refused_saying_why():
    with pytest.raises(ValueError, match="Na2Cl is not charge balanced"):
        Conditions(formula="Na2Cl", charge_balanced=True)
    with pytest.raises(ValueError, match="no charge-balanced composition of Ne-Cl"):
        Conditions(elements=("Ne", "Cl"), charge_balanced=True)
    Conditions(formula="Na2Cl")  # without the option an unbalanced formula stays a legal request


def test_a_generator_that_does_not_declare_it_refuses_it_when_called_directly(shipped_generator):
    with pytest.raises(UnsupportedConditionError, match="charge_balanced"):
        shipped_generator.generate(2, Conditions(elements=("Na", "Cl"), charge_balanced=True), seed=0)


def test_the_shared_gate_resamples_until_every_sample_is_balanced(shipped_generator):
    plain = generate_charge_balanced(shipped_generator, 12, ROCKSALT_NA, seed=0)
    assert any(not is_charge_balanced(c.structure.composition) for c in plain.candidates)  # what the option fixes
    asked = Conditions(**{**ROCKSALT_NA.__dict__, "charge_balanced": True})
    result = generate_charge_balanced(shipped_generator, 12, asked, seed=0)
    assert len(result.candidates) == 12
    assert all(is_charge_balanced(c.structure.composition) for c in result.candidates)
    assert all(c.conditions.charge_balanced for c in result.candidates)
    assert result.rejected[NOT_CHARGE_BALANCED] > 0
    # every structure made is accounted for: kept, rejected by either gate, failed or made beyond n
    assert result.attempts >= len(result.candidates) + sum(result.rejected.values()) + sum(result.failures.values())
    again = generate_charge_balanced(shipped_generator, 12, asked, seed=0)
    assert [c.structure.composition for c in again.candidates] == [c.structure.composition for c in result.candidates]


def test_sample_command_takes_charge_balanced(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sample", "--generator", "wyckoff-transformer", "--elements", "Na,Cl", "--spacegroup", "225",
            "--template", "Na:4a", "--max-atoms", "20", "--n", "6", "--seed", "1", "--out", str(out), "--json"]
    assert main([*argv, "--charge-balanced"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["resampled"].get(NOT_CHARGE_BALANCED, 0) > 0, report
    assert report["conditions"]["charge_balanced"] is True
    records = json.loads((out / "candidates.json").read_text())
    formulas = [Structure.from_dict(r["structure"]).composition for r in records]
    assert len(formulas) == 6 and all(is_charge_balanced(c) for c in formulas)
    assert main(["sample", "--formula", "Na2Cl", "--charge-balanced", "--n", "1"]) == 2
    assert "not charge balanced" in capsys.readouterr().err
