"""A generator registered with no edit elsewhere appears in `sample`, `bench`, `train` and the app, with its own
declared options as flags and controls; the chemical-system syntax is one across commands."""

from __future__ import annotations

import argparse
import json

import pytest
from pymatgen.core import Lattice, Structure

from wyckoff_lab.app.cli import CommandError, main
from wyckoff_lab.core.generators import (
    Candidate,
    GenerationResult,
    Generator,
    GeneratorOption,
    available_generators,
    base,
    default_generator_name,
)


class ToyLattice(Generator):
    """Simple cubic crystals of one element at a declared spacing: the smallest generator there is."""

    name = "toy-lattice"
    description = "simple cubic crystals (a test generator)"
    supported_conditions = frozenset({"elements"})
    uses_temperature = False
    preference = 90
    options = (GeneratorOption("spacing", "float", 2.5, "lattice parameter in Å", minimum=1.0, maximum=5.0),
               GeneratorOption("model_file", "path", None, "not settable per request", per_request=False))

    def __init__(self, spacing: float = 2.5, model_file: str | None = None):
        self.spacing = spacing

    def _generate(self, n, conditions, temperature, seed, progress):
        element = (conditions.elements or ("Cu",))[0]
        structures = [Structure(Lattice.cubic(self.spacing), [element], [[0, 0, 0]]) for _ in range(n)]
        return GenerationResult([Candidate(s, self.name, conditions, 221) for s in structures], attempts=n)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(base._REGISTRY, ToyLattice.name, ToyLattice)
    return ToyLattice


def test_a_registered_generator_is_listed_in_preference_order(toy):
    names = available_generators()
    assert "toy-lattice" in names and names.index("wyckoff-transformer") < names.index("toy-lattice")
    assert names.index("toy-lattice") > names.index("pyxtal") or toy.preference > 50
    assert default_generator_name() == "wyckoff-transformer"


def test_sample_takes_its_declared_options_as_flags(toy, capsys):
    assert main(["sample", "--generator", "toy-lattice", "--elements", "Cu", "--spacing", "3.1", "--n", "2",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["structures"] == 2 and summary["options"] == {"spacing": 3.1}
    assert main(["sample", "--generator", "toy-lattice", "--elements", "Cu", "--spacing", "9", "--n", "1"]) == 2
    assert "--spacing must be in [1, 5], got 9.0" in capsys.readouterr().err
    # Another generator's flag is refused by name, before any model loads.
    assert main(["sample", "--generator", "toy-lattice", "--top-p", "0.9", "--n", "1"]) == 2
    assert "--top-p is an option of wyckoff-transformer, not toy-lattice" in capsys.readouterr().err
    assert main(["sample", "--generator", "wyckoff-transformer", "--spacing", "2", "--n", "1"]) == 2
    assert "--spacing is an option of toy-lattice, not wyckoff-transformer" in capsys.readouterr().err


def test_bench_runs_every_registered_generator_by_default_with_its_own_options(toy):
    from wyckoff_lab.app.commands.bench import load_generators
    from wyckoff_lab.app.generator_flags import generator_names

    assert generator_names("all") == available_generators()
    args = argparse.Namespace(generator_option_spacing="4.0", generator_option_top_p=None)
    loaded = load_generators(["toy-lattice", "pyxtal"], args)
    assert loaded["toy-lattice"].spacing == 4.0 and not isinstance(loaded["pyxtal"], Exception)
    args = argparse.Namespace(generator_option_top_p="0.9")
    with pytest.raises(CommandError, match="--top-p is an option of wyckoff-transformer, none of which runs"):
        load_generators(["toy-lattice", "pyxtal"], args)


def test_per_request_options_share_the_generator_and_refuse_load_time_ones(toy):
    generator = ToyLattice()
    wider = generator.with_options(spacing="4.5")
    assert wider is not generator and wider.spacing == 4.5 and generator.spacing == 2.5
    assert generator.with_options(spacing=None) is generator
    with pytest.raises(ValueError, match="has no option 'model_file' to set per request"):
        generator.with_options(model_file="x")
    with pytest.raises(ValueError, match=r"--spacing must be in \[1, 5\]"):
        generator.with_options(spacing=0.5)


def test_the_app_makes_its_option_controls_from_the_declaration(toy, tmp_path, mp20_al_ca_cu, monkeypatch):
    from wyckoff_lab.widgets.context import LabContext, LabSettings
    from wyckoff_lab.widgets.generate import GeneratePanel, option_settings
    from wyckoff_lab.widgets.jobs import GenerationRequest, run_generation
    from wyckoff_lab.widgets.state import new_session_id

    monkeypatch.setenv("WYCKOFF_LAB_DATA", str(mp20_al_ca_cu))
    context = LabContext(LabSettings(work_dir=str(tmp_path / "work")))
    assert "toy-lattice" in context.generator_names()
    inputs = GeneratePanel(context).option_inputs("toy-lattice")
    ids = [child.id for field in inputs for child in field.children if hasattr(child, "id")]
    assert [ident["name"] for ident in ids] == ["spacing"]  # model_file is a load-time option: no control
    assert option_settings("toy-lattice", ids + [{"name": "spacing", "generator": "pyxtal"}], [3.3, 9]) == \
        {"spacing": 3.3}
    sid = new_session_id()
    summary = run_generation(context, sid, GenerationRequest("toy-lattice", 2, elements=["Cu"],
                                                             options={"spacing": 3.3}))
    assert summary["n"] == 2
    assert context.sessions.get(sid, "generation")["options"] == {"spacing": 3.3}


@pytest.mark.parametrize("text, expected", [("Al,Ca,Cu", ("Al", "Ca", "Cu")), ("Cu-Al-Ca", ("Al", "Ca", "Cu")),
                                            (" O , Li ", ("Li", "O")), ("Fe", ("Fe",))])
def test_one_chemical_system_syntax(text, expected):
    from wyckoff_lab.app.generator_flags import chemical_system

    assert chemical_system(text) == expected


def test_lists_of_systems_and_bad_symbols():
    from wyckoff_lab.app.generator_flags import chemical_system, chemical_systems

    assert chemical_systems("Al-Ca-Cu,Ga-La-O") == [("Al", "Ca", "Cu"), ("O", "Ga", "La")]
    assert chemical_systems("Al,Ca,Cu; Ga,La,O") == [("Al", "Ca", "Cu"), ("O", "Ga", "La")]
    assert chemical_systems("Al,Ca,Cu") == [("Al", "Ca", "Cu")]
    with pytest.raises(CommandError, match="cannot tell where one system ends"):
        chemical_systems("Al-Ca,Cu")
    with pytest.raises(CommandError, match="unknown element Xx"):
        chemical_system("Al,Xx")


def test_sample_and_hull_accept_both_spellings(capsys):
    # An impossible formula for the system is refused the same whichever spelling names the system.
    for spelling in ("Na,Cl", "Na-Cl"):
        assert main(["sample", "--elements", spelling, "--formula", "KCl", "--n", "1"]) == 2
        assert "not in the chemical system Na-Cl" in capsys.readouterr().err
    assert main(["hull", "--elements", "Li-Xx", "--json"]) == 2
    assert "unknown element Xx" in json.loads(capsys.readouterr().out)["message"]
