"""Hardening of relax and hull: devices, settings, corrupt caches, transient failures, splits, big hulls, bad CIFs,
isolated atoms. Real CHGNet, real pymatgen and real MP-20 rows (skipped without WYCKOFF_LAB_DATA)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Lattice, Structure

from wyckoff_lab.app.cli import main
from wyckoff_lab.core import datasets, paths
from wyckoff_lab.core import relax as relax_mod
from wyckoff_lab.core.hull import HULL_CACHE_VERSION, USABLE_STATUSES, HullReference
from wyckoff_lab.core.relax import STATUSES, PotentialError, load_potential, relax

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ELEMENTS = ("Al", "Rh")
STEPS = 20  # enough to move the near-relaxed MP-20 references, few enough for seconds


def crystal_dataset(structures: list[Structure], ids: list[str], energies: list[float]) -> datasets.CrystalDataset:
    frame = pd.DataFrame({
        "material_id": ids,
        "split": "test",
        "formula": [s.composition.reduced_formula for s in structures],
        "chemsys": [s.composition.chemical_system for s in structures],
        "num_atoms": [len(s) for s in structures],
        "formation_energy_per_atom": energies,
    })
    return datasets.CrystalDataset(
        "mp_20", "test", frame,
        lattices=np.array([s.lattice.matrix for s in structures]),
        frac_coords=np.concatenate([s.frac_coords for s in structures]),
        atomic_numbers=np.concatenate([s.atomic_numbers for s in structures]).astype(np.uint8),
        offsets=np.concatenate([[0], np.cumsum([len(s) for s in structures])]).astype(np.int64),
        failures={},
    )


@pytest.fixture
def al_rh(al_rh_rows, tmp_path, monkeypatch):
    """Serve the Al–Rh rows as "mp_20", with an empty cache folder of this test's own."""
    dataset = crystal_dataset(*al_rh_rows)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split="all", **kwargs: dataset)
    monkeypatch.setenv("WYCKOFF_LAB_CACHE", str(tmp_path / "cache"))
    return dataset


@pytest.fixture(scope="module")
def ba_sn2(mp20_test_table):
    """BaSn2 (mp-567510, 3 atoms) from MP-20 test."""
    (cif,) = mp20_test_table.loc[mp20_test_table["material_id"] == "mp-567510", "cif"]
    return Structure.from_str(cif, fmt="cif")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("WYCKOFF_LAB_CACHE", str(folder))
    return folder


def relax_entries(cache: Path) -> list[Path]:
    return sorted((cache / "relax").glob("*.json"))


def hull_entries(cache: Path) -> list[Path]:
    return sorted((cache / "hull").glob("*.json"))


def warned(caplog, text: str) -> bool:
    return any(r.levelno >= logging.WARNING and text in r.getMessage() for r in caplog.records)


# --- 1. devices ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: asking for it is no error here")
def test_cuda_on_a_cpu_machine_is_a_clear_error(ba_sn2, cache, tmp_path, capsys):
    with pytest.raises(PotentialError, match="CUDA requested .*but not available") as info:
        load_potential("chgnet", "cuda")
    assert isinstance(info.value, ValueError)  # a bad setting, for callers that catch ValueError
    with pytest.raises(PotentialError, match="CUDA requested"):
        relax(ba_sn2, potential="chgnet", device="cuda:0", max_steps=1)
    with pytest.raises(ValueError, match="unknown torch device 'gpu0'"):
        load_potential("chgnet", "gpu0")
    cif = tmp_path / "basn2.cif"
    ba_sn2.to(filename=str(cif))
    assert main(["relax", str(cif), "--potential", "chgnet", "--device", "cuda", "--json"]) == 2
    assert "CUDA requested" in json.loads(capsys.readouterr().out)["message"]
    assert main(["hull", "--elements", "Ba,Sn", "--potential", "chgnet", "--device", "cuda", "--json"]) == 2
    assert "CUDA requested" in json.loads(capsys.readouterr().out)["message"]


# --- 2. settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"max_steps": -5}, {"max_steps": 2.5}, {"fmax": 0.0}, {"fmax": -0.05},
                                      {"fmax": float("nan")}, {"fmax": float("inf")}])
def test_out_of_range_settings_are_refused_and_nothing_is_cached(ba_sn2, cache, settings):
    with pytest.raises(ValueError, match="max_steps must be|fmax must be"):
        relax(ba_sn2, potential="chgnet", **settings)
    with pytest.raises(ValueError, match="max_steps must be|fmax must be"):
        next(relax_mod.relax_frames(ba_sn2, potential="chgnet", **settings))
    assert relax_entries(cache) == []


def test_cli_refuses_negative_steps_and_bad_fmax(ba_sn2, cache, tmp_path, capsys):
    cif = tmp_path / "basn2.cif"
    ba_sn2.to(filename=str(cif))
    assert main(["relax", str(cif), "--potential", "chgnet", "--max-steps", "-5", "--json"]) == 2
    assert "--max-steps must be >= 0" in json.loads(capsys.readouterr().out)["message"]
    assert main(["relax", str(cif), "--potential", "chgnet", "--fmax", "nan", "--json"]) == 2
    assert "--fmax must be a finite number > 0" in json.loads(capsys.readouterr().out)["message"]
    assert main(["hull", "--elements", "Ba,Sn", "--potential", "chgnet", "--max-steps", "-1", "--json"]) == 2
    assert "--max-steps" in json.loads(capsys.readouterr().out)["message"]
    assert relax_entries(cache) == []


def test_a_result_without_a_valid_status_is_never_cached(ba_sn2, cache):
    (result,) = relax(ba_sn2, potential="chgnet", max_steps=1, cache=False)
    path = cache / "relax" / "x.json"
    for status in (None, "error", "bogus"):
        relax_mod._store_cached(path, dataclasses.replace(result, status=status))
        assert not path.exists()
    relax_mod._store_cached(path, result)
    assert json.loads(path.read_text())["format_version"] == relax_mod.RELAX_CACHE_VERSION


# --- 3. corrupt cache entries --------------------------------------------------------------------------------------


def _entry_with(path: Path, **changes) -> str:
    return json.dumps(json.loads(path.read_text()) | changes)


def test_corrupt_relax_cache_entries_are_recomputed_with_a_warning(ba_sn2, cache, caplog):
    (first,) = relax(ba_sn2, potential="chgnet", max_steps=3)
    (path,) = relax_entries(cache)
    good = path.read_text()
    corruptions = ["[]", "null", '"text"', "{not json", _entry_with(path, energy="-3.1"),
                   _entry_with(path, status=None), _entry_with(path, final=[]), _entry_with(path, steps="3"),
                   _entry_with(path, format_version="2")]
    for corrupt in corruptions:
        path.write_text(corrupt)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wyckoff_lab"):
            (again,) = relax(ba_sn2, potential="chgnet", max_steps=3)
        assert not again.cached and again.energy == pytest.approx(first.energy), corrupt
        assert warned(caplog, str(path)), corrupt
        assert relax(ba_sn2, potential="chgnet", max_steps=3)[0].cached  # rewritten as a valid entry
    # Another format version (here: the unversioned entries of before) is recomputed too, without alarm.
    legacy = json.loads(good)
    del legacy["format_version"]
    for entry in (legacy, legacy | {"format_version": 1}):
        path.write_text(json.dumps(entry))
        assert not relax(ba_sn2, potential="chgnet", max_steps=3)[0].cached
        assert json.loads(path.read_text())["format_version"] == relax_mod.RELAX_CACHE_VERSION


def test_corrupt_hull_cache_entries_are_rebuilt_with_a_warning(al_rh, caplog):
    cache = Path(os.environ["WYCKOFF_LAB_CACHE"])
    first = HullReference.build(ELEMENTS, potential="chgnet", max_steps=STEPS)
    (path,) = hull_entries(cache)
    good = json.loads(path.read_text())
    assert good["format_version"] == HULL_CACHE_VERSION and len(good["references"]) == 3
    bad_row = good["references"][0] | {"energy": "-7.0"}
    other_energy = good["references"][0] | {"energy": good["references"][0]["energy"] - 1.0}  # not the diagram's
    corruptions = ["[]", "null", "{", json.dumps(good | {"references": [bad_row] + good["references"][1:]}),
                   json.dumps(good | {"references": []}), json.dumps(good | {"references": [None]}),
                   json.dumps(good | {"references": [good["references"][0] | {"status": "error"}]}),
                   json.dumps(good | {"references": [other_energy] + good["references"][1:]}),
                   json.dumps(good | {"references": good["references"][1:]}),
                   json.dumps({k: v for k, v in good.items() if k != "diagram"}),
                   json.dumps(good | {"diagram": "a phase diagram"}), json.dumps(good | {"diagram": {}})]
    for corrupt in corruptions:
        path.write_text(corrupt)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wyckoff_lab"):
            again = HullReference.build(ELEMENTS, potential="chgnet", max_steps=STEPS)
        assert not again.from_cache and warned(caplog, str(path)), corrupt
        assert [r.energy for r in again.references] == pytest.approx([r.energy for r in first.references])
        assert HullReference.build(ELEMENTS, potential="chgnet", max_steps=STEPS).from_cache  # rewritten
    for older in (1, 2):  # version 2 had no diagram: read as a miss, rebuilt from the relaxation cache
        path.write_text(json.dumps(good | {"format_version": older}))
        assert not HullReference.build(ELEMENTS, potential="chgnet", max_steps=STEPS).from_cache


def test_corrupt_reference_stats_cache_entries_are_recomputed_with_a_warning(al_rh, caplog):
    from wyckoff_lab.app.commands.evaluate import load_reference  # `evaluate --reference` and `bench` read it so

    cache = Path(os.environ["WYCKOFF_LAB_CACHE"])
    _, stats = load_reference("mp_20", "test", 0.1, False)
    (path,) = (cache / "metrics").glob("reference_*.json.gz")
    good = json.loads(gzip.decompress(path.read_bytes()))
    assert good["format_version"] == datasets.REFERENCE_STATS_VERSION
    corruptions = [b"[]", b"null", b"not gzip at all", json.dumps(good | {"densities": ["x"] * len(al_rh)}),
                   json.dumps(good | {"num_atoms": None}), json.dumps(good | {"symmetry": [[225]] * len(al_rh)}),
                   json.dumps(good | {"densities": good["densities"][:1]})]
    for corrupt in corruptions:
        raw = corrupt if isinstance(corrupt, bytes) else corrupt.encode()
        path.write_bytes(raw if raw.startswith(b"not") else gzip.compress(raw))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="wyckoff_lab"):
            _, again = load_reference("mp_20", "test", 0.1, False)
        assert again.spacegroups == stats.spacegroups and again.densities == pytest.approx(stats.densities)
        assert warned(caplog, str(path)), corrupt
        assert json.loads(gzip.decompress(path.read_bytes()))["format_version"] == datasets.REFERENCE_STATS_VERSION


def test_corrupt_dataset_caches_are_rebuilt(al_rh, al_rh_rows, tmp_path, caplog):
    # The MP-20 hull cache (parquet): a file of the right name whose column is not a float E_hull.
    source = tmp_path / "source.csv"
    source.write_text("x\n1\n")
    computed = pd.Series([0.0, 0.1], index=pd.Index(["mp-1", "mp-2"], name="material_id"), name="e_above_hull")
    assert datasets._cached_hull("probe", [source], lambda: computed).equals(computed)
    (path,) = (Path(os.environ["WYCKOFF_LAB_CACHE"]) / "datasets").glob("probe_e_above_hull_*.parquet")
    pd.DataFrame({"e_above_hull": ["a", "b"]}).to_parquet(path)
    with caplog.at_level(logging.WARNING, logger="wyckoff_lab"):
        assert datasets._cached_hull("probe", [source], lambda: computed).equals(computed)
    assert warned(caplog, str(path))
    path.write_bytes(b"PAR1 garbage")
    assert datasets._cached_hull("probe", [source], lambda: computed).equals(computed)
    # A parsed split (.npz) whose failures or frame do not match the layout reads back as "rebuild it".
    npz = tmp_path / "split.npz"
    full = crystal_dataset(*al_rh_rows)
    for column in datasets.FRAME_COLUMNS:  # the layout a parsed split has
        if column not in full.frame:
            full.frame[column] = np.nan
    datasets._write_cache(npz, full)
    assert datasets._read_cache(npz, "mp_20", "test") is not None
    with np.load(npz) as data:
        arrays = dict(data)
    np.savez(npz, **(arrays | {"failures": np.array("[]")}))
    assert datasets._read_cache(npz, "mp_20", "test") is None
    np.savez(npz, **(arrays | {"version": np.array([1, 2])}))
    assert datasets._read_cache(npz, "mp_20", "test") is None


# --- 4. transient failures -----------------------------------------------------------------------------------------


def flaky(potential, fails):
    """The real potential, failing (like an out-of-memory error) while fails(atoms_list) says so."""

    def evaluate(atoms_list, with_stress):
        if fails(atoms_list):
            raise RuntimeError("CUDA out of memory (transient)")
        return potential.evaluate(atoms_list, with_stress)

    return dataclasses.replace(potential, evaluate=evaluate)


def test_a_transient_reference_failure_is_not_cached_as_the_hull(al_rh):
    cache = Path(os.environ["WYCKOFF_LAB_CACHE"])
    chgnet = load_potential("chgnet")
    broken = {"now": True}
    # Every call fails while broken: no elemental reference, so this build fails outright...
    with pytest.raises(ValueError, match="no usable elemental reference"):
        HullReference.build(ELEMENTS, flaky(chgnet, lambda atoms: broken["now"]), max_steps=STEPS)
    assert hull_entries(cache) == [] and relax_entries(cache) == []
    # ... and a build whose only failure is a compound succeeds without it, but is not cached either.
    compound = flaky(chgnet, lambda atoms: broken["now"] and any(len(set(a.numbers)) > 1 for a in atoms))
    partial = HullReference.build(ELEMENTS, compound, max_steps=STEPS)
    assert {r.formula: r.status for r in partial.references}["AlRh"] == "error"
    assert hull_entries(cache) == []
    broken["now"] = False  # the hiccup is over
    healed = HullReference.build(ELEMENTS, compound, max_steps=STEPS)
    assert not healed.from_cache and all(r.status in USABLE_STATUSES for r in healed.references)
    (entry,) = hull_entries(cache)
    assert all(r["status"] in USABLE_STATUSES for r in json.loads(entry.read_text())["references"])
    assert HullReference.build(ELEMENTS, chgnet, max_steps=STEPS).from_cache


# --- 5. splits -----------------------------------------------------------------------------------------------------


def test_an_unknown_split_says_which_exist_and_downloads_nothing(cache, monkeypatch, capsys):
    def no_download(url, target):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(paths, "download", no_download)
    with pytest.raises(ValueError, match=r"mp_20 has no split 'foo'; choose from train, val, test, all"):
        HullReference.build(ELEMENTS, potential="chgnet", split="foo")
    with pytest.raises(ValueError, match="no split 'foo'"):
        datasets.DATASETS["mp_20"].source_file("foo")
    with pytest.raises(ValueError, match="choose from train, val, test, all"):
        datasets.load_dataset("mp_20", "foo")
    assert main(["hull", "--elements", "Al,Rh", "--split", "foo", "--json"]) == 2
    error = json.loads(capsys.readouterr().out)
    assert "no split 'foo'" in error["message"] and "train, val, test, all" in error["message"]


# --- 6. big hulls --------------------------------------------------------------------------------------------------


def _with_strained_alrh(al_rh_rows, n: int):
    """The real rows plus `n` distinct AlRh cells (real mp-364, strained 0.2 % more each): n more relaxations."""
    structures, ids, energies = al_rh_rows
    alrh = structures[ids.index("mp-364")]
    strained = [alrh.copy() for _ in range(n)]
    for i, s in enumerate(strained):
        s.apply_strain(0.002 * (i + 1))
    return crystal_dataset(structures + strained, ids + [f"strained-{i}" for i in range(n)], energies + [-1.0] * n)


def test_hull_says_how_many_relaxations_and_wants_yes_for_many(al_rh_rows, cache, monkeypatch, capsys):
    # 60 distinct AlRh cells (strained real mp-364) besides the real rows: 63 relaxations with --max-references 0.
    big = _with_strained_alrh(al_rh_rows, 60)
    small = crystal_dataset(*al_rh_rows)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split="all", **kwargs: big)
    args = ["hull", "--elements", "Al,Rh", "--potential", "chgnet", "--max-references", "0", "--json"]
    assert main(args) == 2
    message = json.loads(capsys.readouterr().out)["message"]
    assert "63 reference relaxations, 63 not cached yet" in message and "pass --yes" in message
    assert "about 1 min" in message and relax_entries(cache) == []  # refused before relaxing anything
    # Few enough: it says so on stderr (stdout stays one JSON object) and starts.
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split="all", **kwargs: small)
    code = main(["hull", "--elements", "Al,Rh", "--potential", "chgnet", "--max-steps", str(STEPS), "--json"])
    out = capsys.readouterr()
    assert code == 0 and json.loads(out.out)["n_references"] == 3
    assert "Al-Rh: 3 reference relaxations, 3 not cached yet" in out.err
    # The count of uncached ones sees the relax cache (another --max-references is another hull, same relaxations).
    assert main(["hull", "--elements", "Al,Rh", "--potential", "chgnet", "--max-steps", str(STEPS),
                 "--max-references", "0", "--json"]) == 0
    assert "3 reference relaxations, 0 not cached yet" in capsys.readouterr().err


def test_yes_starts_a_big_hull(al_rh_rows, cache, monkeypatch, capsys):
    big = _with_strained_alrh(al_rh_rows, 51)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split="all", **kwargs: big)
    # 54 single points (no FIRE steps) are quick with real CHGNet.
    args = ["hull", "--elements", "Al,Rh", "--potential", "chgnet", "--max-references", "0", "--max-steps", "0",
            "--json"]
    assert main(args) == 2
    capsys.readouterr()
    assert main(args + ["--yes"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["n_references"] == 54 and "54 not cached yet" in out.err


# --- 7. corrupt CIFs -----------------------------------------------------------------------------------------------


def test_hull_and_evaluate_skip_an_unreadable_cif_alike(al_rh, al_rh_rows, tmp_path, caplog, capsys):
    folder = tmp_path / "candidates"
    folder.mkdir()
    structures, ids, _ = al_rh_rows
    structures[ids.index("mp-364")].to(filename=str(folder / "alrh.cif"))
    (folder / "broken.cif").write_text("data_broken\n_cell_length_a what\n")
    with caplog.at_level(logging.WARNING, logger="wyckoff_lab"):
        code = main(["hull", "--elements", "Al,Rh", "--candidates", str(folder), "--potential", "chgnet",
                     "--max-steps", str(STEPS), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and [Path(c["file"]).name for c in report["candidates"]] == ["alrh.cif"]
    assert [s["file"] for s in report["skipped"]] == ["broken.cif"]
    assert warned(caplog, "skipped broken.cif")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wyckoff_lab"):
        assert main(["evaluate", "--input", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 1 and [f["file"] for f in result["failed_files"]] == ["broken.cif"]
    assert warned(caplog, "skipped broken.cif")
    # Nothing readable at all is still an error, for both.
    (folder / "alrh.cif").unlink()
    assert main(["hull", "--elements", "Al,Rh", "--candidates", str(folder), "--json"]) == 2
    assert "no usable structure" in json.loads(capsys.readouterr().out)["message"]
    assert main(["evaluate", "--input", str(folder), "--json"]) == 2
    assert "no usable structure" in json.loads(capsys.readouterr().out)["message"]


# --- 8. isolated atoms ---------------------------------------------------------------------------------------------


def lone_atom(box_a: float = 200.0) -> Structure:
    return Structure(Lattice.cubic(box_a), ["Rh"], [[0, 0, 0]])


def test_an_isolated_atom_is_flagged_not_converged(cache, tmp_path, capsys):
    assert "isolated_atoms" in STATUSES and "isolated_atoms" not in USABLE_STATUSES
    chgnet = load_potential("chgnet")
    assert chgnet.cutoff == 6.0  # CHGNet's atom-graph cutoff
    (result,) = relax(lone_atom(), chgnet, max_steps=STEPS)
    assert result.status == "isolated_atoms" and "no neighbour within" in result.message and result.steps == 0
    assert relax_entries(cache) == []
    frames = list(relax_mod.relax_frames(lone_atom(), chgnet, max_steps=STEPS))
    assert len(frames) == 1 and frames[0].result.status == "isolated_atoms"
    # A lone atom that sees its own periodic images (a 2.7 Å cell) is a crystal, relaxed as usual.
    assert relax(lone_atom(2.7), chgnet, max_steps=2)[0].status in USABLE_STATUSES
    # An entry an older version wrote ("converged") is not taken for it.
    key = relax_mod._cache_path(lone_atom(), chgnet, 0.05, STEPS, True)
    dense = relax(lone_atom(2.7), chgnet, max_steps=STEPS, cache=False)[0]
    relax_mod._store_cached(key, dataclasses.replace(dense, final=lone_atom(), status="converged"))
    assert relax(lone_atom(), chgnet, max_steps=STEPS)[0].status == "isolated_atoms"
    cif = tmp_path / "lone.cif"
    lone_atom().to(filename=str(cif))
    assert main(["relax", str(cif), "--potential", "chgnet", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "isolated_atoms"


def test_an_isolated_candidate_gets_no_hull_energy(al_rh):
    hull = HullReference.build(ELEMENTS, potential="chgnet", max_steps=STEPS)
    (point,) = hull.e_above_hull([lone_atom()])
    assert point.status == "isolated_atoms" and point.e_above_hull is None
