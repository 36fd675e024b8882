"""Unit tests of the app: the compatibility module, the pieces behind each step, and callbacks through Dash's own
HTTP endpoint (as the browser calls them), without a browser."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from wyckoff_lab.widgets import compat


@pytest.fixture(scope="module")
def ctc():
    return compat.crystal_toolkit_components()


class IssuedSessionIds(dict):
    """Session ids signed by this process, one per name: the app refuses any id it did not issue."""

    def __missing__(self, name):
        from wyckoff_lab.widgets.state import new_session_id

        self[name] = new_session_id()
        return self[name]


SID = IssuedSessionIds()


@pytest.fixture
def context(tmp_path, mp20_al_ca_cu, monkeypatch):
    from wyckoff_lab.widgets.context import LabContext, LabSettings

    monkeypatch.setenv("WYCKOFF_LAB_DATA", str(mp20_al_ca_cu))
    context = LabContext(LabSettings(warm_up=False, work_dir=tmp_path / "work", relax_max_steps=8,
                                     potential="chgnet", hull_max_references=1))
    yield context
    context.sessions.close()


def rocksalt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


# -- compatibility ----------------------------------------------------------------------------------------------------


def test_compat_restores_the_names_crystal_toolkit_calls(ctc):
    from flask import Flask
    from flask_caching import Cache
    from pymatgen.analysis.graphs import MoleculeGraph, StructureGraph
    from pymatgen.analysis.local_env import CrystalNN

    compat.apply()
    for cls in (StructureGraph, MoleculeGraph):
        assert hasattr(cls, "with_local_env_strategy") and hasattr(cls, "with_empty_graph")
    graph = StructureGraph.with_local_env_strategy(rocksalt(), CrystalNN())
    assert isinstance(graph, StructureGraph) and len(graph.graph.edges) > 0
    assert isinstance(StructureGraph.with_empty_graph(rocksalt()), StructureGraph)
    # Crystal Toolkit's own code path (it swallowed the AttributeError before and then failed in the fallback)
    graph = ctc.StructureMoleculeComponent._preprocess_input_to_graph(rocksalt(), "CrystalNN")
    assert len(graph.graph.edges) > 0
    # its plugin's default cache type, and ours
    app = Flask(__name__)
    Cache(config={"CACHE_TYPE": "simple"}).init_app(app)
    cache = compat.make_cache()
    cache.init_app(app)
    with app.app_context():
        cache.set("k", 1)
        assert cache.get("k") == 1
    assert compat.apply() == compat.apply()  # idempotent


def test_compat_legend_for_site_property_colours(ctc):
    from wyckoff_lab.widgets.structure_view import ORBIT_PROPERTY, annotate_orbits

    structure, group = annotate_orbits(rocksalt())
    assert group == "Fm-3m (225)"
    assert set(structure.site_properties[ORBIT_PROPERTY]) == {"Na 4a", "Cl 4b"}
    view = ctc.StructureMoleculeComponent(structure, id="test-legend", color_scheme=ORBIT_PROPERTY)
    legend = view._make_legend(view.initial_data["legend_data"])  # raised ValueError upstream
    labels = {chip.children.children for chip in legend.children}
    assert labels == {"Na 4a", "Cl 4b"}


def test_compat_imports_only_the_structure_component():
    """The app imports Crystal Toolkit's structure component without the 20 others (band structures, phonons, the
    Materials Project client...); asking the package for any other component still imports it as upstream does."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from wyckoff_lab.widgets import compat\n"
        "ctc = compat.crystal_toolkit_components()\n"
        "assert ctc.StructureMoleculeComponent.__name__ == 'StructureMoleculeComponent'\n"
        "heavy = [m for m in ('crystal_toolkit.components.phonon', 'crystal_toolkit.components.bandstructure',"
        " 'crystal_toolkit.components.search', 'mp_api') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from crystal_toolkit.components import PhaseDiagramComponent\n"
        "import crystal_toolkit.components as again\n"
        "assert again is ctc and 'crystal_toolkit.components.phonon' in sys.modules and ctc.register_app\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_scene_frames_the_structure_across_the_screen(context):
    """Crystal Toolkit frames the 3D diagonal of the scene (a cell long along the line of sight came out a tenth of
    the view); the views frame the extent across the screen (the browser test measures the drawn structure)."""
    from wyckoff_lab.widgets.structure_view import FRAME_FILL, SCENE_SETTINGS, StructureView

    view = StructureView(rocksalt(), context=context)
    assert view.ct.initial_scene_settings["zoomToFit2D"] is True
    assert view.ct.initial_scene_settings["defaultZoom"] == FRAME_FILL == SCENE_SETTINGS["defaultZoom"]


def test_relaxation_frames_keep_their_bonds_across_the_cell_face():
    """Frames come wrapped into the cell: an atom that crosses a face keeps its bonds (no bond across the cell)."""
    from wyckoff_lab.widgets.structure_view import BondCache

    structure = rocksalt()
    cache = BondCache()
    first = cache.graph(structure)  # the structure shown before Relax: CrystalNN
    frac = structure.frac_coords.copy()
    frac[0] = [-0.01, 0.0, 0.0]  # atom 0 moves out through the face and comes back wrapped at x = 0.99
    frame = Structure(structure.lattice, structure.species, np.mod(frac, 1))
    moved = cache.graph(frame, "relax-test")  # no CrystalNN: the bonds of the first frame

    def longest(graph):
        return max(graph.structure[u].distance(graph.structure[v], jimage=d["to_jimage"])
                   for u, v, d in graph.graph.edges(data=True))

    assert len(moved.graph.edges) == len(first.graph.edges) > 0
    assert abs(longest(first) - 2.82) < 0.01 and longest(moved) < 2.95  # 5.6 Å if the image were not followed
    assert cache.graph(frame, "relax-test").graph.edges == moved.graph.edges


# -- steps 1 and 2: chemistry and symmetry ----------------------------------------------------------------------------


def test_chemistry_state_reports_instead_of_raising():
    from wyckoff_lab.widgets.chemistry import chemistry_state, table_positions

    state, message = chemistry_state(["Cu", "Al", "Ca"], "", 20)
    assert state == {"elements": ["Al", "Ca", "Cu"], "formula": None, "max_atoms": 20} and message is None
    state, message = chemistry_state(["Al", "Ca", "Cu"], "CaAl2", 20)
    assert state["elements"] == ["Al", "Ca"] and "not in the chemical system" in message
    state, message = chemistry_state([], "Xx2O", 20)
    assert state["formula"] is None and "Cannot read formula" in message
    _, message = chemistry_state(["H", "He", "Li", "Be", "B", "C"], None, 20)
    assert "At most 5 elements" in message
    state, message = chemistry_state(["Na"], None, "many")
    assert state["max_atoms"] == 20 and "positive whole number" in message
    positions = table_positions()
    assert positions["H"] == (1, 1) and positions["La"] == (9, 3) and len(set(positions.values())) == len(positions)


def test_template_verdict_says_why():
    from wyckoff_lab.widgets.symmetry import spacegroup_options, template_verdict, wyckoff_rows

    ok = template_verdict(["Na", "Cl"], "NaCl", 225, [["Na", "4a"]], 20)
    assert ok.ok and "fits" in ok.headline
    clash = template_verdict(["Na", "Cl"], "NaCl", 225, [["Na", "4a"], ["Cl", "4a"]], 20)
    assert clash.ok is False and any("4a" in d for d in clash.details)
    outside = template_verdict(["Na", "Cl"], None, 225, [["K", "4a"]], 20)
    assert outside.ok is False and "K" in outside.headline
    system = template_verdict(["Al", "Ca", "Cu"], None, 139, [], 20)
    assert system.ok and "for example" in system.details[0]
    assert template_verdict([], None, None, [], 20).ok is None
    assert [r["label"] for r in wyckoff_rows(225)][:2] == ["192l", "96k"]
    labels = [o["label"] for o in spacegroup_options({225: 0.144}, "cubic")]
    assert len(labels) == 36 and "14.4% of MP-20" in next(label for label in labels if label.startswith("225 "))


# -- step 3: generation, isolation between tabs, bad input ------------------------------------------------------------


def test_generation_fills_only_its_own_session(context):
    from wyckoff_lab.widgets.jobs import GenerationRequest, run_generation

    seen = []
    summary = run_generation(context, SID["tab-a"], GenerationRequest("pyxtal", 6, elements=["Al", "Ca", "Cu"], seed=1),
                             lambda done, total, label: seen.append((done, total)))
    records = context.sessions.candidates(SID["tab-a"])
    assert summary["n"] == len(records) == 6 and seen[-1] == (6, 6)
    assert all(set(r["elements"]) == {"Al", "Ca", "Cu"} and r["structure"] for r in records)
    assert context.sessions.candidates(SID["tab-b"]) == []  # another tab sees nothing


@pytest.mark.parametrize("request_kwargs, expected", [
    ({"generator": "pyxtal", "n": 0}, "at least one sample"),
    ({"generator": "pyxtal", "n": 5, "elements": ["Na", "Cl"], "spacegroup": 225,
      "template": [["Na", "4a"], ["Cl", "4a"]]}, "4a"),
    ({"generator": "pyxtal", "n": 5, "elements": ["Ne", "Ar"]}, "charge-balanced"),
    ({"generator": "pyxtal", "n": 5, "template": [["Na", "4a"]]}, "needs a space group"),
    ({"generator": "no-such-generator", "n": 5}, "cannot be used"),
    ({"generator": "pyxtal", "n": 5, "options": {"oversample": 3}}, "has no option 'oversample'"),
    ({"generator": "wyckoff-transformer", "n": 5, "options": {"oversample": 0}}, r"--oversample must be in \[1, 100\]"),
    ({"generator": "wyckoff-transformer", "n": 5, "options": {"oversample": 2.5}}, "must be a whole number"),
    ({"generator": "wyckoff-transformer", "n": 5, "options": {"weights": "/tmp"}}, "no option 'weights' to set per"),
])
def test_generation_refuses_bad_input_and_keeps_candidates(context, request_kwargs, expected):
    from wyckoff_lab.widgets.jobs import GenerationRequest, JobError, run_generation

    run_generation(context, SID["tab"], GenerationRequest("pyxtal", 3, elements=["Na", "Cl"], seed=0))
    before = context.sessions.candidates(SID["tab"])
    with pytest.raises(JobError, match=expected):
        run_generation(context, SID["tab"], GenerationRequest(**request_kwargs))
    assert context.sessions.candidates(SID["tab"]) == before


def test_ranked_generation_leaves_the_shared_generator_alone(context):
    """'Keep most likely 1 in K' ranks this request's samples only: the app's loaded generator is shared."""
    from wyckoff_lab.widgets.jobs import GenerationRequest, run_generation

    from wyckoff_lab.widgets.jobs import generation_message

    shared = context.generator("wyckoff-transformer")
    summary = run_generation(context, SID["tab"], GenerationRequest("wyckoff-transformer", 4, elements=["Na", "Cl"],
                                                               seed=0, options={"oversample": 3.0}))
    assert summary["n"] == len(context.sessions.candidates(SID["tab"])) == 4 and summary["ranked_out"] == 8
    assert context.sessions.get(SID["tab"], "generation")["options"]["oversample"] == 3
    text = generation_message(summary, "wyckoff-transformer")
    assert "the most likely 4 of 12" in text and "attempts failed" not in text, text
    assert context.generator("wyckoff-transformer") is shared and shared.oversample == 1
    assert shared.ranked(3) is not shared and shared.ranked(3).model is shared.model and shared.ranked(1) is shared


def test_cancelled_generation_and_hull_store_nothing(context):
    """Generate or Build hull cancelled while the job waited for the warm-up, or while it was about to store its
    result: the session keeps its candidates and hull exactly as they were."""
    from wyckoff_lab.widgets.jobs import (
        GenerationRequest,
        JobCancelled,
        cancel_check,
        hull_for_session,
        request_cancel,
        run_generation,
    )

    run_generation(context, SID["tab"], GenerationRequest("wyckoff-transformer", 3, elements=["Na", "Cl"], seed=0))
    before = context.sessions.candidates(SID["tab"])
    request_cancel(context, SID["tab"], "generate", 1)
    with pytest.raises(JobCancelled, match="candidates from before stay"):  # cancelled before it started
        run_generation(context, SID["tab"], GenerationRequest("wyckoff-transformer", 3, elements=["Na", "Cl"], seed=1),
                       cancelled=cancel_check(context, SID["tab"], "generate", 0))
    checks = []

    def cancelled_once_sampled() -> bool:  # the user presses cancel while the samples are being checked
        checks.append(1)
        return len(checks) > 1

    with pytest.raises(JobCancelled):
        run_generation(context, SID["tab"], GenerationRequest("wyckoff-transformer", 3, elements=["Na", "Cl"], seed=2),
                       cancelled=cancelled_once_sampled)
    assert len(checks) == 2 and context.sessions.candidates(SID["tab"]) == before
    run_generation(context, SID["tab"], GenerationRequest("wyckoff-transformer", 3, elements=["Na", "Cl"], seed=3),
                   cancelled=cancel_check(context, SID["tab"], "generate", 1))  # the next click's job runs
    assert context.sessions.candidates(SID["tab"]) != before

    request_cancel(context, SID["tab"], "hull", 1)
    with pytest.raises(JobCancelled, match="Hull cancelled"):
        hull_for_session(context, SID["tab"], cancelled=cancel_check(context, SID["tab"], "hull", 0))
    assert context.sessions.get(SID["tab"], "hull") is None
    # the hull and the candidates' places on it are stored together or not at all
    first = context.sessions.candidates(SID["tab"])[0]["id"]
    assert not context.sessions.store_hull(SID["tab"], {"elements": ["Cl", "Na"]}, {first: {"e_above_hull": 0.1}},
                                           unless=lambda: True)
    assert context.sessions.get(SID["tab"], "hull") is None
    assert context.sessions.candidates(SID["tab"])[0]["e_above_hull"] is None
    assert context.sessions.store_hull(SID["tab"], {"elements": ["Cl", "Na"]}, {first: {"e_above_hull": 0.1}})
    assert context.sessions.get(SID["tab"], "hull")
    assert context.sessions.candidates(SID["tab"])[0]["e_above_hull"] == 0.1


def test_unseen_element_with_the_transformer(context, tmp_path, monkeypatch):
    """A model that never saw an element says so; without weights the generator says that instead."""
    import torch
    from wyckoff_lab.core.generators.wyckoff_transformer.model import WyckoffTransformer, WyckoffTransformerConfig
    from wyckoff_lab.core.generators.wyckoff_transformer.train import export
    from wyckoff_lab.widgets.jobs import GenerationRequest, JobError, run_generation

    monkeypatch.setenv("WYCKOFF_LAB_MODELS", str(tmp_path / "none"))
    with pytest.raises(JobError, match="no Wyckoff transformer weights"):
        run_generation(context, SID["tab"], GenerationRequest("wyckoff-transformer", 2, elements=["Na", "Cl"]))
    torch.manual_seed(0)
    export(WyckoffTransformer(WyckoffTransformerConfig(d_model=32, n_layers=1, n_heads=2, n_gaussians=4,
                                                       n_mixture=2)),
           tmp_path / "models" / "wyckoff_transformer",
           {"element_counts": {"Na": 3, "Cl": 3}, "spacegroup_counts": {"225": 3}})
    monkeypatch.setenv("WYCKOFF_LAB_MODELS", str(tmp_path / "models"))
    context._generators.clear()
    with pytest.raises(JobError, match="never saw F, Xe"):
        run_generation(context, SID["tab"], GenerationRequest("wyckoff-transformer", 2, elements=["Xe", "F"]))


def test_parallel_generation_splits_and_merges(context):
    """PyXtal's samples are independent: a request is shared by worker processes, deterministically per seed."""
    from wyckoff_lab.core.generators import Conditions
    from wyckoff_lab.widgets.jobs import generate_in_workers, generation_workers

    generator = context.generator("pyxtal")
    conditions = Conditions(elements=("Na", "Cl"), max_atoms=8)
    seen = []
    first = generate_in_workers(generator, 6, conditions, 1.0, 7, 2, lambda done, total: seen.append((done, total)))
    again = generate_in_workers(generator, 6, conditions, 1.0, 7, 2, lambda done, total: None)
    assert len(first.candidates) == 6 and first.attempts >= 6 and seen and seen[-1][1] == 6
    assert [c.structure.composition for c in first.candidates] == [c.structure.composition for c in again.candidates]
    assert all(c.structure.composition.reduced_formula == "NaCl" for c in first.candidates)
    assert generation_workers(context, generator, 5) == 1  # too few samples to pay for a worker
    assert generator.parallel_safe and generation_workers(context, generator, 500) >= 1
    transformer = context.generator("wyckoff-transformer")
    assert not transformer.parallel_safe and generation_workers(context, transformer, 500) == 1  # batched model


def test_records_flag_symmetry_as_sampled_and_messages_count_resamples():
    from wyckoff_lab.core.generators import Candidate, Conditions
    from wyckoff_lab.widgets.jobs import generation_message
    from wyckoff_lab.widgets.records import SYMPREC, build_records, symmetry_label, table_rows

    def candidate(intended, extra=None, detected=None, symprec=None):
        return Candidate(rocksalt(), "test", Conditions(), intended, extra=extra or {},
                         detected_spacegroup=detected, detected_symprec=symprec)

    records = build_records([candidate(225), candidate(221, {"detected_spacegroup": 225}), candidate(None),
                             candidate(221, detected=221, symprec=SYMPREC), candidate(221, detected=221, symprec=1e-5)])
    # spglib finds 225 for rocksalt; the generator's own verdict at the records' tolerance is taken as it is (so
    # the gate's spglib run is not repeated), one at another tolerance is not
    assert [r["symmetry"] for r in records] == ["as sampled", "found 225 (sampled 221)", "", "as sampled",
                                                "found 225 (sampled 221)"]
    assert records[1]["extra"] == {"detected_spacegroup": 225} and "symmetry" in table_rows(records)[1]
    assert symmetry_label(12, None) == "none found (sampled 12)"
    summary = {"n": 100, "attempts": 109, "failures": {}, "rejected": {"spacegroup_mismatch": 5,
                                                                        "sites_too_close": 4},
               "seconds": 2.0, "check_seconds": 0.5, "valid": 100, "novel": 99, "novelty_known": True}
    text = generation_message(summary, "wyckoff-transformer")
    assert "9 sampled again by the quality gate (spacegroup mismatch 5, sites too close 4)" in text
    assert "failed" not in text  # resampled by the gate is not a failure (it read "9 attempts failed ()")


# -- steps 5 and 6: structure view and relaxation ---------------------------------------------------------------------


def test_relax_one_streams_frames_and_stores_the_result(context):
    from wyckoff_lab.widgets.jobs import relax_message, relax_one
    from wyckoff_lab.widgets.records import build_records
    from wyckoff_lab.widgets.relaxation import frame_payload, relax_figure

    from wyckoff_lab.core.generators import Candidate, Conditions

    structure = rocksalt()
    structure.perturb(0.05, 0.0)
    candidate = Candidate(structure, "test", Conditions(), intended_spacegroup=225)
    context.sessions.set_candidates(SID["tab"], build_records([candidate]))
    frames = []
    summary = relax_one(context, SID["tab"], "c001", lambda frame, history: frames.append(
        frame_payload(frame, history, "#1")))
    assert len(frames) >= 2 and frames[0]["view"]["structure"] and frames[-1]["history"]
    assert summary["status"] in ("converged", "not_converged") and "Relaxed #1" in relax_message(summary)
    record = context.sessions.candidate(SID["tab"], "c001")
    assert record["relax_status"] == summary["status"] and record["relaxed_structure"]
    assert len(relax_figure(frames[-1]["history"]).data) == 2


def test_a_relaxation_that_cannot_run_keeps_the_structure(context):
    from wyckoff_lab.core.generators import Candidate, Conditions
    from wyckoff_lab.widgets.jobs import JobError, relax_message, relax_one
    from wyckoff_lab.widgets.records import build_records

    crushed = Structure(Lattice.cubic(3.0), ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]])
    candidate = Candidate(crushed, "test", Conditions())
    context.sessions.set_candidates(SID["tab"], build_records([candidate]))
    summary = relax_one(context, SID["tab"], "c001", lambda frame, history: None)
    assert summary["status"] == "atoms_too_close"
    assert "generated structure is kept" in relax_message(summary)
    assert context.sessions.candidate(SID["tab"], "c001")["structure"]
    with pytest.raises(JobError, match="Select a candidate"):
        relax_one(context, SID["tab"], None, lambda frame, history: None)


def _relaxable_records(n: int) -> list[dict]:
    from wyckoff_lab.core.generators import Candidate, Conditions
    from wyckoff_lab.widgets.records import build_records

    candidates = []
    for i in range(n):
        structure = rocksalt()
        structure.perturb(0.05 + 0.01 * i, 0.0)
        candidates.append(Candidate(structure, "test", Conditions(), intended_spacegroup=225))
    return build_records(candidates)


def test_cancelled_relaxation_stores_and_reports_nothing_more(context):
    """Relax pressed, then cancel: no frame is reported after the cancel and nothing of that run is stored; a cancel
    recorded before the job starts (it waited for the warm-up) stops it before its first step."""
    from wyckoff_lab.widgets.jobs import JobCancelled, cancel_check, relax_one, request_cancel

    context.sessions.set_candidates(SID["tab"], _relaxable_records(1))
    frames = []
    with pytest.raises(JobCancelled, match="cancelled at step"):
        relax_one(context, SID["tab"], "c001", lambda frame, history: frames.append(frame.step),
                  cancelled=lambda: len(frames) >= 2)
    assert len(frames) == 2
    assert context.sessions.candidate(SID["tab"], "c001")["relax_status"] == ""  # as generated, nothing half-stored

    request_cancel(context, SID["tab"], "relax", 3)  # the cancel button's 3rd click
    with pytest.raises(JobCancelled, match="step 0"):
        relax_one(context, SID["tab"], "c001", lambda frame, history: frames.append(frame.step),
                  cancelled=cancel_check(context, SID["tab"], "relax", 2))  # asked for at 2 clicks: cancelled since
    assert len(frames) == 2
    assert not cancel_check(context, SID["tab"], "relax", 3)()  # the next Relax (at 3 clicks) is not cancelled


def test_cancelled_relax_all_keeps_what_was_relaxed_before(context, monkeypatch):
    from wyckoff_lab.widgets import jobs

    monkeypatch.setattr(jobs, "RELAX_CHUNK", 1)
    context.sessions.set_candidates(SID["tab"], _relaxable_records(2))
    def first_done() -> bool:  # the user presses cancel once the first batch is stored
        return context.sessions.candidates(SID["tab"])[0]["relax_status"] != ""

    with pytest.raises(jobs.JobCancelled, match="1 of 2 candidates were relaxed before the cancel"):
        jobs.relax_all(context, SID["tab"], cancelled=first_done)
    first, second = context.sessions.candidates(SID["tab"])
    assert first["relax_status"] in jobs.USABLE and first["relaxed_structure"]
    assert second["relax_status"] == "" and not second.get("relaxed_structure")
    # a write that finds the cancel inside its transaction does not happen
    assert context.sessions.update_candidates(SID["tab"], {"c002": {"relax_status": "converged"}},
                                              unless=lambda: True) == 0


# -- step 7: hull ------------------------------------------------------------------------------------------------------


def _toy_hull(elements):
    refs = []
    for formula, energy_per_atom in {"Al": -3.7, "Cu": -4.1, "Ca": -1.9, "AlCu": -4.2, "CaCu": -3.3,
                                     "CaAl2": -3.4}.items():
        from pymatgen.core import Composition

        comp = Composition(formula)
        if {el.symbol for el in comp} <= set(elements):
            refs.append({"formula": formula, "energy": energy_per_atom * comp.num_atoms, "natoms": comp.num_atoms,
                         "composition": {el.symbol: a for el, a in comp.items()}, "source": "toy"})
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    from wyckoff_lab.core.hull import diagram_dict, tie_lines

    diagram = PhaseDiagram([PDEntry(Composition(r["composition"]), r["energy"]) for r in refs])
    hull = {"elements": list(elements), "potential_identity": "toy", "potential": "toy", "references": refs,
            "diagram": diagram_dict(diagram), "tie_lines": tie_lines(diagram)}  # as jobs.hull_data stores a hull
    for r in refs:
        entry = PDEntry(Composition(r["composition"]), r["energy"])
        r["formation_energy_per_atom"] = diagram.get_form_energy_per_atom(entry)
        r["e_above_hull"] = diagram.get_e_above_hull(entry)
        r["on_hull"] = r["e_above_hull"] < 1e-6
    return hull


@pytest.mark.parametrize("elements", [("Al", "Cu"), ("Al", "Ca", "Cu")])
def test_hull_placement_and_figures(elements):
    from pymatgen.core import Composition
    from wyckoff_lab.widgets.hull import hull_figure, hull_histogram
    from wyckoff_lab.widgets.jobs import place_on_hull

    hull = _toy_hull(elements)
    formula = "Al2Cu" if len(elements) == 2 else "CaAlCu"
    comp = Composition(formula)
    placed = place_on_hull(hull, comp, -2.5, "toy")
    assert placed["e_above_hull"] > 0 and placed["decomposition"]
    below = place_on_hull(hull, comp, -6.0, "toy")
    assert place_on_hull(hull, comp * 2, -2.5, "toy")["e_above_hull"] == placed["e_above_hull"]  # per atom
    assert below["e_above_hull"] < 0  # below every reference combination: a new ground state
    assert place_on_hull(hull, comp, -2.5, "another potential") == {}  # energies of two models never mix
    record = {"id": "c001", "label": 1, "formula": formula, "sg_label": "P1 (1)", **placed}
    figure = hull_figure(hull, [record])
    candidates = [t for t in figure.data if t.name == "candidates"]
    assert candidates and list(candidates[0].customdata) == ["c001"]
    assert hull_histogram([record]).data[0].x == (placed["e_above_hull"],)
    assert "No hull yet" in hull_figure(None, []).layout.annotations[0].text


def test_hull_points_select_candidates_and_show_reference_phases(context):
    """Reference phases and relaxed candidates are both on the diagram; clicking a candidate selects it, clicking a
    reference phase shows its relaxed structure in the 3D view."""
    from dash import no_update
    from pymatgen.core import Composition
    from wyckoff_lab.widgets.hull import REFERENCE_PREFIX, clicked_point, hull_figure
    from wyckoff_lab.widgets.jobs import place_on_hull

    hull = _toy_hull(("Al", "Ca", "Cu"))
    hull["references"][0]["structure"] = rocksalt().as_dict()  # stands in for the relaxed phase
    records = _relaxable_records(1)
    records[0].update(formula="CaAlCu", label=1, sg_label="P1 (1)",
                      **place_on_hull(hull, Composition("CaAlCu"), -2.5, "toy"))
    context.sessions.set_candidates(SID["tab"], records)
    context.sessions.set(SID["tab"], "hull", hull)
    figure = hull_figure(hull, records)
    keys = [k for trace in figure.data if trace.customdata is not None for k in trace.customdata]
    assert "c001" in keys and sum(k.startswith(REFERENCE_PREFIX) for k in keys) == len(hull["references"])

    selected, structure, status = clicked_point(context, SID["tab"], {"points": [{"customdata": "c001"}]})
    assert selected == "c001" and "#1 CaAlCu" in status.children
    reference_click = {"points": [{"customdata": f"{REFERENCE_PREFIX}0"}]}
    selected, structure, status = clicked_point(context, SID["tab"], reference_click)
    ref = hull["references"][0]
    assert structure["structure"] and ref["formula"] in structure["title"] and ref["formula"] in status.children
    assert clicked_point(context, SID["tab"], {"points": [{}]})[0] is no_update


# -- step 8: embeddings ------------------------------------------------------------------------------------------------


def test_candidate_map_and_tsne():
    from wyckoff_lab.widgets.embeddings import candidate_map, structure_features, tsne_2d

    assert tsne_2d(np.zeros((0, 4))).shape == (0, 2) and tsne_2d(np.random.rand(7, 4)).shape == (7, 2)
    structure = rocksalt()
    features = structure_features(structure, ["Na", "Cl"])
    assert features.shape == (2 + 2 + 25,) and np.isfinite(features).all()
    records = []
    for i, a in enumerate((5.4, 5.6, 5.8, 6.0, 6.2, 6.4)):
        s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
        records.append({"id": f"c{i:03d}", "label": i, "formula": "NaCl", "sg_label": "Fm-3m (225)",
                        "elements": ["Cl", "Na"], "spacegroup": 225, "structure": s.as_dict(),
                        "e_above_hull": 0.01 * i if i % 2 else None})
    figure = candidate_map(records, [("mp-22862", rocksalt(), {"formula": "NaCl", "spacegroup": 225})],
                           "e_above_hull")
    ids = [c for t in figure.data if t.customdata is not None for c in t.customdata]
    assert sorted(ids) == [r["id"] for r in records]


# -- step 9: teaching -----------------------------------------------------------------------------------------------


def test_teach_state_collapses_and_detects_higher_symmetry():
    from wyckoff_lab.widgets.teach import teach_state

    general = teach_state(221, "8g", (0.2, 0, 0))
    assert general.multiplicity == 8 and general.distinct == 8 and not general.messages
    collapsed = teach_state(221, "8g", (0.0, 0, 0))
    assert collapsed.distinct == 1 and "1a" in collapsed.messages[0]
    # Pm-3 (200) with its general position at x=y=z gains the mirror planes of Pm-3m
    higher = teach_state(200, "24l", (0.2, 0.2, 0.2))
    assert any("spglib finds" in m for m in higher.messages)
    both = teach_state(221, "1a", (), "Na", second=("1b", (), "Cl"))
    assert len(both.structure) == 2 and both.detected == (221, "Pm-3m")


# -- step 10: export ------------------------------------------------------------------------------------------------


def test_export_cif_zip_and_extxyz_with_metadata():
    from ase.io import read
    from wyckoff_lab.widgets.export import cif_zip, extxyz

    relaxed = rocksalt()
    relaxed.scale_lattice(relaxed.volume * 1.02)
    records = [{"id": "c001", "formula": "NaCl", "natoms": 8, "spacegroup": 225, "generator": "test",
                "structure": rocksalt().as_dict(), "relaxed_structure": relaxed.as_dict(), "e_above_hull": 0.0,
                "energy_per_atom": -3.4, "relax_status": "converged"}]
    archive = zipfile.ZipFile(io.BytesIO(cif_zip(records)))
    assert sorted(archive.namelist()) == ["c001_NaCl_sg225.cif", "c001_NaCl_sg225_relaxed.cif", "candidates.json"]
    assert json.loads(archive.read("candidates.json"))[0]["e_above_hull"] == 0.0
    text = extxyz(records)
    (atoms,) = read(io.StringIO(text), index=":", format="extxyz")
    assert len(atoms) == 8 and atoms.info["relaxed"] and atoms.info["e_above_hull"] == 0.0
    assert abs(atoms.get_volume() - relaxed.volume) < 1e-6


# -- callbacks through Dash --------------------------------------------------------------------------------------------


@pytest.fixture
def app(context):
    from wyckoff_lab.widgets.explorer import create_app

    return create_app(context, elements=["Al", "Ca", "Cu"])


def call(app, output: str, inputs: dict, state: dict | None = None, changed: str | None = None,
         query: str = ""):
    """POST one callback to /_dash-update-component as the browser would; returns the response for `output`.

    `output` may name an output several callbacks share (allow_duplicate): the one listening to `inputs` is called.
    """
    key = next(k for k, spec in app.callback_map.items()
               if output in [o.split("@")[0] for o in k.strip(".").split("...")]
               and set(inputs) <= {f"{i['id']}.{i['property']}" for i in spec["inputs"]})
    spec = app.callback_map[key]

    def items(specs, values):
        return [{"id": s["id"], "property": s["property"], "value": values.get(f"{s['id']}.{s['property']}")}
                for s in specs]

    outputs = [{"id": o.split(".")[0], "property": o.split(".")[1].split("@")[0]}
               for o in key.strip(".").split("...")]
    payload = {"output": key, "outputs": outputs if len(outputs) > 1 else outputs[0],
               "inputs": items(spec["inputs"], inputs), "state": items(spec["state"], state or {}),
               "changedPropIds": [changed or next(iter(inputs))]}
    response = app.server.test_client().post("/_dash-update-component" + query, json=payload)
    assert response.status_code in (200, 204), response.data[:500]
    return json.loads(response.data)["response"] if response.status_code == 200 else None


def test_page_serves_every_asset_locally(app):
    client = app.server.test_client()
    index = client.get("/").data.decode()
    assert "cdnjs" not in index and "unpkg" not in index and "cdn." not in index
    assert client.get("/wl-static/ct/fonts/fa-solid-900.woff2").status_code == 200
    css = [part.split('"')[0] for part in index.split('href="')[1:] if ".css" in part.split('"')[0]]
    assert css and all(client.get("/" + href.lstrip("/")).status_code == 200 for href in css)


def test_callbacks_chemistry_symmetry_and_table(app, context):
    from wyckoff_lab.widgets.jobs import GenerationRequest, run_generation

    chemistry = call(app, "wl-chemistry.data", {"wl-chem-picked.data": ["Al", "Ti"], "wl-chem-formula.value": "",
                                                 "wl-chem-max-atoms.value": 20})
    assert chemistry["wl-chemistry"]["data"]["elements"] == ["Al", "Ti"]  # ordered by atomic number
    assert "Ti-Al" in chemistry["wl-chem-summary"]["children"]  # printed in a chemist's order (electronegativity)
    too_many = call(app, "wl-chemistry.data", {"wl-chem-picked.data": ["H", "Li", "Na", "K", "Rb", "Cs"],
                                               "wl-chem-formula.value": "", "wl-chem-max-atoms.value": 20})
    assert len(too_many["wl-chemistry"]["data"]["elements"]) == 5
    assert "At most 5" in too_many["wl-chem-message"]["children"]

    verdict = call(app, "wl-sym-verdict.children",
                   {"wl-symmetry.data": {"spacegroup": 225, "template": [["Na", "4a"], ["Cl", "4a"]]},
                    "wl-chemistry.data": {"elements": ["Na", "Cl"], "formula": "NaCl", "max_atoms": 20}})
    assert "cannot fit" in json.dumps(verdict["wl-sym-verdict"]["children"])
    assert verdict["wl-sym-verdict"]["className"].endswith("is-bad")

    run_generation(context, SID["tab-1"], GenerationRequest("pyxtal", 4, elements=["Al", "Ca", "Cu"], seed=3))
    table = call(app, "wl-cand-table.data", {"wl-revision.data": "r1"}, {"wl-session.data": {"sid": SID["tab-1"]}})
    assert len(table["wl-cand-table"]["data"]) == 4 and "4 candidates" in table["wl-cand-summary"]["children"]
    empty = call(app, "wl-cand-table.data", {"wl-revision.data": "r1"}, {"wl-session.data": {"sid": SID["tab-2"]}})
    assert empty["wl-cand-table"]["data"] == []
    from wyckoff_lab.widgets.structure_view import structure_payload

    view = call(app, "wl-view-title.children", {"wl-structure.data": structure_payload(rocksalt(), "NaCl", "test")})
    assert "Fm-3m (225)" in view["wl-view-symmetry"]["children"] and view["wl-view-orbits"]["data"]


def test_generate_and_hull_cancel_buttons_record_the_cancel(app, context):
    from wyckoff_lab.widgets.jobs import cancel_check

    for prefix, kind in (("wl-gen", "generate"), ("wl-hull", "hull")):
        shown = call(app, f"{prefix}-status.children", {f"{prefix}-cancel.n_clicks": 2},
                     {"wl-session.data": {"sid": SID["tab-c"]}}, query="?cancelJob=999999999")  # a job already gone
        assert "cancelled" in json.dumps(shown[f"{prefix}-status"]["children"])
        assert cancel_check(context, SID["tab-c"], kind, 1)() and not cancel_check(context, SID["tab-c"], kind, 2)()
    assert not cancel_check(context, SID["tab-c"], "relax", 0)()  # each kind of job has its own record


def test_cancel_through_the_page_leaves_a_consistent_state(app, context):
    """Pressing cancel records it, refreshes what the page shows from the session (what was relaxed before the
    cancel), and a frame of the cancelled run still waiting to be polled is not shown."""
    from types import SimpleNamespace

    from wyckoff_lab.widgets.relaxation import frame_payload

    records = _relaxable_records(2)
    records[0]["relax_status"] = "converged"
    context.sessions.set_candidates(SID["tab"], records)
    session = {"wl-session.data": {"sid": SID["tab"]}}
    frame = SimpleNamespace(step=3, structure=rocksalt(), result=None)
    late = frame_payload(frame, [{"step": 3, "energy_per_atom": -3.0, "max_force": 0.5}], "#2", cancel_clicks=0)
    shown = call(app, "wl-structure.data", {"wl-relax-frame.data": late}, session)
    assert shown["wl-structure"]["data"]["title"] == "#2: step 3 (relaxing)"  # before the cancel: shown

    response = call(app, "wl-revision.data", {"wl-relax-cancel.n_clicks": 1}, session, query="?cancelJob=999999999")
    assert response["wl-revision"]["data"]  # the table and the 3D view refresh from the session
    assert "1 of 2 candidates are relaxed" in json.dumps(response["wl-relax-status"]["children"])
    assert context.sessions.get(SID["tab"], "cancel/relax") == 1
    assert not (call(app, "wl-structure.data", {"wl-relax-frame.data": late}, session) or {})  # after: not shown
    assert not (call(app, "wl-relax-curve.figure", {"wl-relax-frame.data": late}, session) or {})
    fresh = frame_payload(frame, [], "#2", cancel_clicks=1, run="r2")  # the next relaxation, after the cancel
    assert call(app, "wl-structure.data", {"wl-relax-frame.data": fresh}, session)["wl-structure"]["data"]
    # once that relaxation has ended, a frame that arrives with (or after) the final one is dropped; the final isn't
    context.sessions.set(SID["tab"], "relax/finished", "r2")
    assert not (call(app, "wl-structure.data", {"wl-relax-frame.data": fresh}, session) or {})
    assert call(app, "wl-structure.data", {"wl-relax-final.data": fresh}, session)["wl-structure"]["data"]


def test_cli_app_command(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    command = str(Path(sys.executable).with_name("wyckoff-lab"))  # the console script the README runs
    out = subprocess.run([command, "app", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--no-browser" in out.stdout and "127.0.0.1" in out.stdout
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([command, "app", "--no-browser", "--port", str(port)], capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 2 and "cannot listen" in out.stderr


def test_relax_all_places_candidates_on_a_real_hull(context):
    """Relax all + hull on real MP-20 references of Al–Cu (few FIRE steps): energies per atom, never per formula."""
    from wyckoff_lab.widgets.hull import hull_figure
    from wyckoff_lab.widgets.jobs import GenerationRequest, hull_message, relax_all, run_generation

    run_generation(context, SID["tab"], GenerationRequest("pyxtal", 3, elements=["Al", "Cu"], seed=2))
    labels = []
    summary = relax_all(context, SID["tab"], lambda done, total, label: labels.append(label))
    records = context.sessions.candidates(SID["tab"])
    assert summary["relaxed"] == 3 and summary["references"] >= 2 and "hull" in hull_message(summary)
    placed = [r for r in records if r["e_above_hull"] is not None]
    assert placed and all(-1.0 < r["e_above_hull"] < 5.0 for r in placed)
    assert any("reference phases" in label for label in labels)
    hull = context.sessions.get(SID["tab"], "hull")
    assert hull["elements"] == ["Al", "Cu"]
    candidates = [t for t in hull_figure(hull, records).data if t.name == "candidates"]
    assert len(candidates[0].x) == len(placed)


def test_cli_app_behind_a_path_prefix_serves_its_page_for_that_prefix(tmp_path):
    """`wyckoff-lab app --path-prefix /lab/` (a reverse proxy that strips /lab/): the server answers at / and the
    page asks for every script, stylesheet and callback under /lab/; a prefix that is not a URL path is refused."""
    import re
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from wyckoff_lab.widgets.jupyter import free_port

    command = str(Path(sys.executable).with_name("wyckoff-lab"))
    bad = subprocess.run([command, "app", "--no-browser", "--path-prefix", "lab"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--path-prefix" in bad.stderr and "starting with '/'" in bad.stderr
    port = free_port()
    output = tmp_path / "app.log"
    process = subprocess.Popen([command, "app", "--no-browser", "--port", str(port), "--path-prefix", "/lab/"],
                               stdout=output.open("w"), stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    page = response.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None, "the app never answered"
                time.sleep(0.2)
        sources = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert sources and all(s.startswith("/lab/") for s in sources if s.startswith("/")), sources
        config = json.loads(re.search(r'id="_dash-config" type="application/json">(.*?)</script>', page, re.S)[1])
        assert config["requests_pathname_prefix"] == "/lab/"  # where the page sends its callbacks
        script = next(s for s in sources if "dash_renderer" in s or "dash-renderer" in s)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{script[len('/lab/'):]}", timeout=10) as response:
            assert response.status == 200  # the proxy strips the prefix: the server serves it at the root
        while "Wyckoff Lab is running" not in output.read_text():  # said by a thread once the server answers
            assert time.monotonic() < deadline and process.poll() is None, output.read_text()
            time.sleep(0.2)
        assert "through the proxy at /lab/" in output.read_text()
    finally:
        process.terminate()
        process.wait(timeout=30)
