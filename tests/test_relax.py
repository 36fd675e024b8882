"""Relaxation: real CHGNet on real and perturbed structures, guard rails, batching, cache, MatterSim loading, CLI."""

from __future__ import annotations

import json
import logging
import socket
import time

import numpy as np
import pytest
import torch
from ase.calculators.calculator import Calculator, all_changes
from pymatgen.core import Lattice, Structure

from wyckoff_lab.app.cli import main
from wyckoff_lab.core import relax as relax_mod
from wyckoff_lab.core.relax import PotentialError, RelaxResult, load_potential, relax, relax_frames


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # OpenMP spin-waiting: 3.1 s vs 0.08 s per CHGNet call


@pytest.fixture
def fresh_potentials(monkeypatch):
    """An in-process model cache holding only CHGNet (so MatterSim/default resolution runs again), warning unsent."""
    monkeypatch.setattr(relax_mod, "_LOADED", {k: v for k, v in relax_mod._LOADED.items() if k[0] == "chgnet"})
    monkeypatch.setattr(relax_mod, "_FALLBACK_WARNED", False)


def rock_salt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.7), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def silicon() -> Structure:
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.47), ["Si"], [[0, 0, 0]]).get_primitive_structure()


def perturbed(structure: Structure, distance_a: float = 0.1, seed: int = 0) -> Structure:
    copy = structure.copy()
    copy.perturb(distance_a, seed=seed)
    return copy


def by_id(rows, material_id: str) -> Structure:
    return next(s for mid, s, _ in rows if mid == material_id)


class FakeCalculator(Calculator):
    """A stand-in potential: zero forces and the constant energy per atom and pressure chosen by the test."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, energy_per_atom=-1.0, stress=0.0, fail_on_atoms: int | None = None):
        super().__init__()
        self.energy_per_atom, self.stress, self.fail_on_atoms = energy_per_atom, stress, fail_on_atoms
        self.calls = 0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        if len(atoms) == self.fail_on_atoms:
            raise RuntimeError("model blew up on this one")
        self.results = {
            "energy": self.energy_per_atom * len(atoms),
            "free_energy": self.energy_per_atom * len(atoms),
            "forces": np.zeros((len(atoms), 3)),
            "stress": np.array([self.stress] * 3 + [0.0] * 3),
        }


# --- real CHGNet ----------------------------------------------------------------------------------------------------


def test_mp20_structure_converges_like_chgnets_own_relaxer(mp20_test_rows):
    import contextlib
    import io

    from chgnet.model import StructOptimizer

    ba_sn2 = by_id(mp20_test_rows, "mp-567510")  # BaSn2 (P-3m1), 3 atoms, on the MP hull
    (ours,) = relax(ba_sn2, potential="chgnet", max_steps=300)
    assert ours.status == "converged", ours.message
    assert ours.max_force < 0.05 and ours.potential == "chgnet" and ours.steps > 5
    # CHGNet's StructOptimizer (ASE FIRE + FrechetCellFilter, one structure) lands on the same minimum: c shrinks ~14%.
    with contextlib.redirect_stdout(io.StringIO()):
        reference = StructOptimizer(use_device="cpu").relax(ba_sn2, fmax=0.05, steps=300, verbose=False)
    assert ours.energy == pytest.approx(float(reference["trajectory"].energies[-1]), abs=3e-3)
    assert ours.final.lattice.abc == pytest.approx(reference["final_structure"].lattice.abc, abs=1e-3)
    assert ours.rmsd_to_start > 0.05  # the Sn layers move along c


def test_short_run_is_not_converged():
    (short,) = relax(perturbed(silicon(), 0.2), potential="chgnet", fmax=1e-4, max_steps=2, cache=False)
    assert short.status == "not_converged" and short.steps == 2 and "max_steps" in short.message


def test_perturbed_si_and_nacl_relax_batched_and_energy_decreases():
    starts = [perturbed(silicon()), perturbed(rock_salt())]
    initial = relax(starts, potential="chgnet", max_steps=0, cache=False)
    batched = relax(starts, potential="chgnet", max_steps=200, cache=False)
    for before, after in zip(initial, batched):
        assert before.steps == 0 and after.status == "converged", after.message
        assert after.energy < before.energy - 1e-3
        assert after.rmsd_to_start > 0.01  # the rattle was undone
        assert after.final.composition == after.initial.composition
    # One structure alone follows the same trajectory as inside the batch.
    alone = relax(starts[0], potential="chgnet", max_steps=200, cache=False)[0]
    assert alone.steps == batched[0].steps
    assert alone.energy == pytest.approx(batched[0].energy, abs=1e-4)


def test_relax_frames_stream_steps_and_end_with_result():
    frames = list(relax_frames(perturbed(silicon()), potential="chgnet", max_steps=5, cache=False))
    *steps, last = frames
    assert [f.step for f in steps] == list(range(len(steps))) and last.result is not None
    assert all(f.result is None for f in steps)
    assert last.result.steps == last.step and last.energy_per_atom <= steps[0].energy_per_atom
    assert isinstance(last.result, RelaxResult) and len(last.structure) == 2


def test_cache_hit_is_instant_and_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("WYCKOFF_LAB_CACHE", str(tmp_path))
    start = perturbed(rock_salt(), seed=3)
    first = relax(start, potential="chgnet", max_steps=50)[0]
    t0 = time.perf_counter()
    second = relax(start.copy(), potential="chgnet", max_steps=50)[0]
    assert time.perf_counter() - t0 < 0.5
    assert second.cached and not first.cached
    assert second.energy == first.energy and second.status == first.status and second.steps == first.steps
    assert second.final == first.final
    assert len(list((tmp_path / "relax").glob("*.json"))) == 1
    # Any setting change is a different key.
    assert not relax(start, potential="chgnet", max_steps=49)[0].cached


def test_an_interrupted_batch_keeps_what_it_finished(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("WYCKOFF_LAB_CACHE", str(tmp_path))
    chgnet = relax_mod.load_potential("chgnet")
    calls = {"n": 0}

    def evaluate_then_stop(atoms_list, with_stress):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user stops a long benchmark
        return chgnet.evaluate(atoms_list, with_stress)

    potential = dataclasses.replace(chgnet, evaluate=evaluate_then_stop)
    settled = rock_salt()  # forces vanish by symmetry: converged at step 0 with a fixed cell
    with pytest.raises(KeyboardInterrupt):
        relax([settled, perturbed(silicon(), 0.2)], potential, fmax=1e-4, max_steps=200, relax_cell=False)
    assert len(list((tmp_path / "relax").glob("*.json"))) == 1
    again = relax(settled, potential, fmax=1e-4, max_steps=200, relax_cell=False)[0]
    assert again.cached and again.status == "converged" and again.steps == 0 and calls["n"] == 3


# --- guard rails (fake calculators: no model needed) ---------------------------------------------------------------


def test_nan_energy_guard():
    (result,) = relax(rock_salt(), potential=FakeCalculator(energy_per_atom=float("nan")))
    assert result.status == "nan_energy" and result.steps == 0
    assert result.summary()["energy_eV"] is None  # strict JSON: NaN becomes null


def test_atoms_too_close_guard_never_calls_the_potential():
    crowded = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.05, 0, 0]])  # 0.2 Å apart
    calc = FakeCalculator()
    (result,) = relax(crowded, potential=calc)
    assert result.status == "atoms_too_close" and "0.200" in result.message
    assert calc.calls == 0


def test_exploding_guards():
    (deep,) = relax(rock_salt(), potential=FakeCalculator(energy_per_atom=-80.0))
    assert deep.status == "exploded" and "eV/atom" in deep.message
    # A constant negative (ASE: the cell wants to expand) stress inflates the cell until the volume guard fires.
    (inflated,) = relax(silicon(), potential=FakeCalculator(stress=-1.0), max_steps=200)
    assert inflated.status == "exploded" and "volume" in inflated.message
    assert inflated.final.volume > 5 * inflated.initial.volume


def test_one_failing_structure_does_not_sink_the_batch():
    good, bad = rock_salt(), silicon()  # 8 and 2 atoms; the calculator raises on 2-atom cells
    results = relax([good, bad], potential=FakeCalculator(fail_on_atoms=2))
    assert [r.status for r in results] == ["converged", "error"]
    assert "model blew up" in results[1].message


def test_disordered_structure_is_a_status_not_an_exception():
    alloy = Structure(Lattice.cubic(3.6), [{"Cu": 0.5, "Au": 0.5}], [[0, 0, 0]])
    (result,) = relax(alloy, potential=FakeCalculator())
    assert result.status == "error" and "disordered" in result.message


# --- MatterSim loading ---------------------------------------------------------------------------------------------


def tiny_mattersim_checkpoint(path):
    """A randomly initialised, very small M3GNet saved in MatterSim's checkpoint format."""
    from mattersim.forcefield.m3gnet.m3gnet import M3Gnet

    torch.manual_seed(0)
    model = M3Gnet(num_blocks=1, units=8, max_l=2, max_n=2, cutoff=4.0, threebody_cutoff=3.0, device="cpu")
    torch.save({"model_name": "m3gnet", "model": model.state_dict(), "model_args": model.get_model_args()}, path)
    return path


def test_mattersim_checkpoint_from_env(tmp_path, monkeypatch, fresh_potentials):
    monkeypatch.setenv("WYCKOFF_LAB_MATTERSIM_CHECKPOINT", str(tiny_mattersim_checkpoint(tmp_path / "tiny.pth")))
    # fmax tiny so the random model's small forces still take a few steps
    results = relax([perturbed(silicon()), perturbed(rock_salt())], potential="mattersim", fmax=1e-6, max_steps=3,
                    device="cpu", cache=False)
    for result in results:
        assert result.potential == "mattersim" and result.potential_identity.startswith("mattersim:tiny.pth:")
        assert np.isfinite(result.energy) and np.isfinite(result.max_force)
        assert result.status in ("converged", "not_converged")
    # The default resolves to MatterSim when its checkpoint is available.
    assert load_potential(None, "cpu").name == "mattersim"


def test_corrupt_mattersim_checkpoint_is_a_clear_error(tmp_path, monkeypatch, fresh_potentials):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"this is not a torch checkpoint")
    monkeypatch.setenv("WYCKOFF_LAB_MATTERSIM_CHECKPOINT", str(bad))
    with pytest.raises(PotentialError, match="broken.pth is not a usable MatterSim checkpoint"):
        load_potential("mattersim", "cpu")


def test_offline_without_checkpoint_falls_back_to_chgnet_with_one_warning(tmp_path, monkeypatch, caplog,
                                                                           fresh_potentials):
    monkeypatch.delenv("WYCKOFF_LAB_MATTERSIM_CHECKPOINT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no MatterSim cache folder

    def offline(*args, **kwargs):
        raise OSError("network is blocked in this test")

    monkeypatch.setattr(socket, "create_connection", offline)
    with caplog.at_level(logging.WARNING, logger="wyckoff_lab.core.relax"):
        first = relax(silicon(), potential=None, max_steps=0, device="cpu", cache=False)[0]
        second = relax(rock_salt(), potential=None, max_steps=0, device="cpu", cache=False)[0]
    assert first.potential == second.potential == "chgnet"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "MatterSim is not available" in warnings[0].getMessage()
    with pytest.raises(relax_mod.PotentialUnavailableError, match="unreachable"):
        load_potential("mattersim", "cpu")  # asked for by name: no silent fallback


# --- CLI -----------------------------------------------------------------------------------------------------------


def test_cli_relax_json(tmp_path, capsys):
    cif = tmp_path / "si.cif"
    perturbed(silicon()).to(filename=str(cif))
    out = tmp_path / "relaxed.cif"
    code = main(["relax", str(cif), "--potential", "chgnet", "--max-steps", "100", "--out", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["status"] == "converged" and report["formula"] == "Si"
    assert report["energy_per_atom_eV"] < -4 and report["steps"] > 0 and report["rmsd_to_start_A"] > 0
    assert {"max_force_eV_per_A", "wall_time_s", "potential"} <= set(report)
    assert len(Structure.from_file(out)) == 2


def test_cli_relax_errors(tmp_path, capsys):
    disordered = tmp_path / "alloy.cif"
    Structure(Lattice.cubic(3.6), [{"Cu": 0.5, "Au": 0.5}], [[0, 0, 0]]).to(filename=str(disordered))
    assert main(["relax", str(disordered), "--json"]) == 2
    assert "disordered" in json.loads(capsys.readouterr().out)["message"]
    assert main(["relax", str(disordered), "--potential", "gulp"]) == 2
    assert "unknown potential 'gulp'" in capsys.readouterr().err
