"""The discovery funnel on real MP-20 rows with real generators and CHGNet: candidates relaxed in pre-screen order
until the budget, placed on the Al-Ca-Cu hull, a rerun served from the cache, the CLI's files and JSON, and bad
input refused with its reason (unknown element, no budget, a system no generator serves, missing weights, a
candidate that cannot be relaxed)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from wyckoff_lab.app.cli import main
from wyckoff_lab.core import relax as relax_mod
from wyckoff_lab.core.discover import DUPLICATE, KNOWN, DiscoveryError, DiscoveryPlan, discover
from wyckoff_lab.core.generators.base import Candidate, GenerationResult, Generator
from wyckoff_lab.core.hull import USABLE_STATUSES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = ("Al", "Ca", "Cu")
SAMPLES = 6  # per generator
MAX_STEPS = 30  # candidates and hull references alike: a small, self-consistent hull
TINY_BUDGET_MIN = 0.01  # 0.6 s: shorter than relaxing the pool takes on any machine, so the budget stops it
ENOUGH_BUDGET_MIN = 10.0  # more than the whole pool needs
CHUNK = 2


@pytest.fixture(scope="module")
def funnel_env(mp20_with_prototypes, tmp_path_factory):
    """Real MP-20 rows of Al-Ca-Cu and of the substitution prototypes as the data folder, and the session's test
    cache (module-scoped fixtures run before the autouse one that sets it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WYCKOFF_LAB_DATA", str(mp20_with_prototypes))
        patch.setenv("WYCKOFF_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "wyckoff-lab-cache"))
        yield


@pytest.fixture(scope="module")
def generators(funnel_env, shipped_generator):
    from wyckoff_lab.core.generators import get_generator

    return {"wyckoff-transformer": shipped_generator, "pyxtal": get_generator("pyxtal"),
            "substitution": get_generator("substitution")}


def plan(budget_min: float, **kwargs) -> DiscoveryPlan:
    return DiscoveryPlan(SYSTEM, budget_min, samples=SAMPLES, potential="chgnet", max_steps=MAX_STEPS, chunk=CHUNK,
                         **kwargs)


@pytest.fixture(scope="module")
def runs(generators):
    """The same plan three times: a budget too small for the pool, one big enough, and that one again."""
    events, placed, ranked = [], [], []
    tiny = discover(plan(TINY_BUDGET_MIN), generators, on_event=lambda *event: events.append(event),
                    on_ranked=lambda pool, order: ranked.append(([c.index for c in order], [c.result for c in pool])))
    full = discover(plan(ENOUGH_BUDGET_MIN), generators, on_candidate=placed.append)
    again = discover(plan(ENOUGH_BUDGET_MIN), generators)
    return {"tiny": tiny, "full": full, "again": again, "events": events, "placed": placed, "ranked": ranked}


def relaxed(result):
    return [c for c in result.candidates if c.result is not None]


def test_the_pool_holds_every_generator_and_drops_duplicates_and_known_structures(runs):
    result = runs["tiny"]
    assert set(result.made) == {"wyckoff-transformer", "pyxtal", "substitution"}, result.skipped
    assert all(count > 0 for count in result.made.values())
    assert len(result.candidates) == sum(result.made.values())
    for c in result.candidates:
        assert {el.symbol for el in c.structure.composition.elements} == set(SYSTEM)
        if c.status == DUPLICATE:
            twin = result.candidates[c.duplicate_of]
            assert twin.status != DUPLICATE and twin.index < c.index and twin.formula == c.formula
            assert set(c.generators) <= set(twin.generators)
        if c.status in (DUPLICATE, KNOWN):
            assert c.prescreen_status is None and c.rank is None and c.result is None
    stages = {event[0] for event in runs["events"]}
    assert {"pool", "dedup", "hull", "prescreen", "relax", "done"} <= stages
    assert set(result.minutes) == {"pool", "dedup", "hull", "prescreen", "relax"}
    assert "references" in result.hull_plan


def test_candidates_are_relaxed_best_prescreen_first_and_the_budget_stops_them(runs):
    result = runs["tiny"]
    screened = sorted((c for c in result.candidates if c.rank is not None), key=lambda c: c.rank)
    scores = [c.prescreen for c in screened]
    assert len(screened) > CHUNK and all(a <= b for a, b in zip(scores, scores[1:])), scores
    assert all(c.prescreen_status is not None for c in screened)
    (order, results_then), = runs["ranked"]  # told once, before any full relaxation
    assert order == [c.index for c in screened] and all(r is None for r in results_then)
    done = relaxed(result)
    assert result.stopped == "budget"
    assert 1 <= len(done) < len(screened)
    assert sorted(c.rank for c in done) == list(range(len(done)))  # a prefix of the pre-screen order
    # Over the budget by at most the chunk that was running when it ran out (and the hull placements after it).
    last_chunk_s = max(c.result.wall_time_s for c in done if c.rank >= (len(done) - 1) // CHUNK * CHUNK)
    assert result.minutes["relax"] * 60 <= TINY_BUDGET_MIN * 60 + last_chunk_s + 5
    for c in done:
        assert c.result.steps <= MAX_STEPS
        if c.result.status in USABLE_STATUSES:
            assert math.isfinite(c.e_above_hull) and c.relaxed is not None and c.spacegroup_relaxed


def test_a_large_budget_relaxes_the_pool_and_judges_sun_after_relaxation(runs):
    result = runs["full"]
    screened = [c for c in result.candidates if c.rank is not None]
    assert result.stopped == "pool exhausted" and len(relaxed(result)) == len(screened)
    assert {c.index for c in runs["placed"]} == {c.index for c in screened}  # each reported as it was placed
    for c in screened:
        if c.relaxed is None:
            assert c.sun is None and c.msun is None
            continue
        assert c.unique is not None and c.novel is not None
        stable = c.e_above_hull < 0.1 and c.unique and c.novel
        assert c.msun == stable  # ternary, structurally valid after relaxation
        assert not c.sun or (c.msun and c.e_above_hull <= 0)
    assert result.counts()["msun"] == sum(bool(c.msun) for c in result.candidates)
    ranked = result.ranked()
    placed = [c.e_above_hull for c in ranked if math.isfinite(c.e_above_hull)]
    assert placed == sorted(placed) and ranked[:len(placed)] == [c for c in ranked if math.isfinite(c.e_above_hull)]


def test_the_budget_run_s_relaxations_are_reused_and_a_rerun_is_served_from_the_cache(runs):
    tiny, full, again = runs["tiny"], runs["full"], runs["again"]
    for c in relaxed(tiny):
        twin = full.candidates[c.index]
        assert twin.result.cached and twin.result.status == c.result.status
        assert twin.e_above_hull == c.e_above_hull or (math.isnan(c.e_above_hull) and math.isnan(twin.e_above_hull))
    assert all(c.result.cached for c in relaxed(again))
    assert again.minutes["relax"] < full.minutes["relax"]
    assert [c.row() | {"relax_s": None, "cached": None} for c in again.candidates] == \
        [c.row() | {"relax_s": None, "cached": None} for c in full.candidates]


def test_cli_writes_cifs_tables_and_hull_and_prints_the_json(runs, funnel_env, tmp_path, capsys):
    out = tmp_path / "found"
    code = main(["discover", "--elements", "Al-Ca-Cu", "--budget-min", str(ENOUGH_BUDGET_MIN), "--samples",
                 str(SAMPLES), "--potential", "chgnet", "--max-steps", str(MAX_STEPS), "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["system"] == "Al-Ca-Cu" and report["minutes"] > 0
    rows = report["candidates"]
    assert len(rows) == len(runs["full"].candidates)
    for row in rows:
        assert set(row) == {"formula", "spacegroup", "generator", "prescreen", "e_above_hull", "status", "file"}
    files = [row["file"] for row in rows if row["file"]]
    assert len(files) == sum(c.relaxed is not None for c in runs["full"].candidates)
    for name in files:
        structure = Structure.from_file(out / name)
        assert {el.symbol for el in structure.composition.elements} == set(SYSTEM)
    placed = [row["e_above_hull"] for row in rows if row["e_above_hull"] is not None]
    assert placed == sorted(placed) and len(placed) > 0
    assert (out / "hull.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "candidates.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["formula"] for r in table] == [r["formula"] for r in rows]
    assert json.loads((out / "candidates.json").read_text())[0]["formula"] == rows[0]["formula"]
    # Every relaxation came from the cache this time.
    assert all(r["cached"] == "True" for r in table if r["file"])
    # The folder is refused without --overwrite, replaced with it.
    code = main(["discover", "--elements", "Al-Ca-Cu", "--budget-min", "1", "--out", str(out), "--json"])
    assert code == 2 and "--overwrite" in json.loads(capsys.readouterr().out)["message"]


# -- bad input and faults ---------------------------------------------------------------------------------------------


def test_unknown_elements_and_a_zero_budget_are_refused(capsys, tmp_path):
    assert DiscoveryPlan("Cu-Al,Ca", 1.0).elements == SYSTEM  # written as on the command line, in Z order
    with pytest.raises(ValueError, match="unknown element Xx"):
        DiscoveryPlan(("Xx", "Cu"), 1.0)
    for budget in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="budget"):
            DiscoveryPlan(SYSTEM, budget)
    with pytest.raises(ValueError, match="1 to 5 elements"):
        DiscoveryPlan(("H", "Li", "B", "C", "N", "O"), 1.0)
    code = main(["discover", "--elements", "Al,Xx", "--budget-min", "1", "--out", str(tmp_path / "a"), "--json"])
    assert code == 2 and "unknown element Xx" in json.loads(capsys.readouterr().out)["message"]
    code = main(["discover", "--elements", "Al,Cu", "--budget-min", "0", "--out", str(tmp_path / "b"), "--json"])
    assert code == 2 and "--budget-min must be" in json.loads(capsys.readouterr().out)["message"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_system_no_generator_serves_is_refused_naming_each_generator(generators):
    with pytest.raises(DiscoveryError) as caught:
        discover(DiscoveryPlan(("He", "Ne"), 1.0, potential="chgnet"), generators)
    message = str(caught.value)
    assert "no generator can serve He-Ne" in message
    for name in generators:
        assert f"{name}:" in message
    assert "never saw Ne" in message and "He: " in message and "Ne: " in message


def test_missing_potential_weights_are_a_clear_error_before_any_sampling(generators, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(relax_mod, "_LOADED", {k: v for k, v in relax_mod._LOADED.items() if k[0] == "chgnet"})
    missing = tmp_path / "no-such-checkpoint.pth"
    monkeypatch.setenv(relax_mod.MATTERSIM_CHECKPOINT_ENV, str(missing))
    sampled = []

    class Watching(Generator):
        name = "watching"
        supported_conditions = frozenset({"elements"})

        def _generate(self, n, conditions, temperature, seed, progress):
            sampled.append(n)
            return GenerationResult([], attempts=0)

    with pytest.raises(relax_mod.PotentialError, match="is not a file"):
        discover(DiscoveryPlan(SYSTEM, 1.0, potential="mattersim", generators=("watching",)),
                 {"watching": Watching()})
    assert sampled == []
    code = main(["discover", "--elements", "Al,Ca,Cu", "--budget-min", "1", "--potential", "mattersim",
                 "--out", str(tmp_path / "out"), "--json"])
    assert code == 2 and "is not a file" in json.loads(capsys.readouterr().out)["message"]


class Fixed(Generator):
    """A generator of given structures (the user's own candidates, or broken ones), in order."""

    name = "fixed"
    supported_conditions = frozenset({"elements"})
    uses_temperature = False

    def __init__(self, structures, name="fixed"):
        self.structures, self.name = list(structures), name

    def _generate(self, n, conditions, temperature, seed, progress):
        made = [Candidate(s, self.name, conditions) for s in self.structures[:n]]
        return GenerationResult(made, attempts=len(made))


def test_broken_candidates_get_a_status_and_the_worst_score_never_a_crash(funnel_env):
    from wyckoff_lab.core.datasets import load_dataset

    sane = Structure(Lattice.cubic(4.2), ["Al", "Ca", "Cu"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])
    # Another arrangement (Cu on an edge, not a face), squeezed: CHGNet's cell filter blows it up 5.2x by step 18.
    squeezed = Structure(Lattice.cubic(2.4), ["Al", "Ca", "Cu"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]])
    too_close = Structure(Lattice.cubic(4.2), ["Al", "Ca", "Cu"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.07, 0, 0]])
    # Another formula, so no matcher takes it for the sane one scaled: 12 Å between atoms, beyond any cutoff.
    isolated = Structure(Lattice.cubic(24.0), ["Al", "Al", "Ca", "Cu"], [[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0],
                                                                          [0, 0, 0.5]])
    dataset = load_dataset("mp_20", "all")
    ternary = next(int(i) for i in dataset.indices_in_chemsys(SYSTEM)
                   if len(dataset.structure(int(i)).composition.elements) == 3)
    known = dataset.structure(ternary)
    moved = sane.copy()
    moved.translate_sites(range(len(moved)), [0.1, 0.2, 0.3])  # the same crystal, shifted
    pools = {"fixed": Fixed([too_close, sane, isolated, known, squeezed]), "again": Fixed([moved], "again")}
    result = discover(DiscoveryPlan(SYSTEM, ENOUGH_BUDGET_MIN, generators=("fixed", "again"), samples=5,
                                    potential="chgnet", max_steps=MAX_STEPS), pools)
    by_index = result.candidates
    assert by_index[0].prescreen_status == "atoms_too_close" and by_index[0].prescreen == math.inf
    assert by_index[2].prescreen_status == "isolated_atoms" and by_index[2].prescreen == math.inf
    assert by_index[0].status == "atoms_too_close" and by_index[2].status == "isolated_atoms"
    assert by_index[0].relaxed is None and math.isnan(by_index[0].e_above_hull) and by_index[0].sun is None
    assert by_index[1].rank == 0 and np.isfinite(by_index[1].prescreen)  # the sane one first
    assert by_index[3].status == KNOWN
    assert by_index[4].prescreen_status in USABLE_STATUSES and by_index[4].status == "exploded"
    assert "volume changed" in by_index[4].result.message and by_index[4].relaxed is None
    assert math.isnan(by_index[4].e_above_hull) and by_index[4].msun is None
    assert by_index[5].status == DUPLICATE and by_index[5].duplicate_of == 1
    assert by_index[1].generators == ["fixed", "again"] and by_index[1].generator == "fixed+again"
    assert result.stopped == "pool exhausted"


def test_a_ctrl_c_during_the_relaxations_keeps_what_finished_and_a_rerun_resumes(runs, generators):
    def interrupt_after_the_first(candidate):
        raise KeyboardInterrupt  # as a Ctrl-C arriving while the next structures relax

    cut = discover(plan(ENOUGH_BUDGET_MIN), generators, on_candidate=interrupt_after_the_first)
    assert cut.stopped == "interrupted"
    kept = relaxed(cut)
    assert [c.rank for c in kept] == [0] and kept[0].result.status in USABLE_STATUSES
    assert math.isfinite(kept[0].e_above_hull) and kept[0].msun is not None  # judged like any finished run
    resumed = discover(plan(ENOUGH_BUDGET_MIN), generators)
    assert resumed.stopped == "pool exhausted" and all(c.result.cached for c in relaxed(resumed))
    assert resumed.candidates[kept[0].index].e_above_hull == kept[0].e_above_hull
