"""SevenNet behind relax(): its shipped SevenNet-0 weights on real MP-20 rows, the pinned checkpoint digest, a missing
package, and `bench potentials` on one small system."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from ase.calculators.fd import calculate_numerical_stress

from wyckoff_lab.app.cli import main
from wyckoff_lab.core import paths
from wyckoff_lab.core import relax as relax_mod
from wyckoff_lab.core.relax import (
    PotentialError,
    PotentialUnavailableError,
    cached_flags,
    load_potential,
    load_sevennet,
    relax,
)

pytest.importorskip("sevenn", reason="the sevenn package is not installed (pip install 'wyckoff-lab[sevennet]')")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sevennet():
    """SevenNet-0 (11Jul2024) from the installed wheel on the CPU, loaded once for the module."""
    return load_potential("sevennet", "cpu")


def test_sevennet_energies_forces_and_stress_on_real_rows(sevennet, al_rh_rows):
    structures, ids, _ = al_rh_rows
    assert sevennet.identity.startswith("sevennet:SevenNet-0_11Jul2024:") and sevennet.cutoff == 5.0
    atoms = [relax_mod._to_atoms(s) for s in structures]
    batched = sevennet.evaluate(atoms, True)
    for a, ev, material_id in zip(atoms, batched, ids):
        assert np.shape(ev.forces) == (len(a), 3) and np.shape(ev.stress) == (6,)
        assert np.all(np.isfinite(ev.forces)) and np.all(np.isfinite(ev.stress))
        # DFT-relaxed MP rows: bound, metallic energies per atom, and near-zero forces on the MP geometry
        assert -10 < ev.energy / len(a) < -3, (material_id, ev.energy / len(a))
        assert np.abs(ev.forces).max() < 0.05, material_id
        # The batched path and sevenn's own ASE calculator (built on the same safely loaded model) agree
        single = a.copy()
        single.calc = sevennet.calculator
        assert single.get_potential_energy() == pytest.approx(ev.energy, abs=1e-4)
        np.testing.assert_allclose(single.get_stress(), ev.stress, atol=1e-6)
    # Stress in ASE's sign and Voigt order: against finite differences of the energy on a sheared cell
    sheared = atoms[0].copy()
    sheared.set_cell(sheared.cell.array @ np.array([[1.02, 0.03, 0.0], [0.0, 0.99, 0.02], [0.0, 0.0, 1.01]]),
                     scale_atoms=True)
    sheared.calc = sevennet.calculator
    analytic = sevennet.evaluate([sheared], True)[0].stress
    np.testing.assert_allclose(calculate_numerical_stress(sheared, eps=1e-4), analytic, atol=3e-4)
    assert np.abs(analytic).max() > 3e-3  # the shear is large enough for the comparison to mean something


def test_sevennet_relaxes_a_rattled_real_structure_and_caches_it(sevennet, al_rh_rows):
    start = al_rh_rows[0][0].copy()  # AlRh (mp-364)
    start.apply_strain(0.03)
    start.perturb(0.1, seed=3)
    before = relax(start, sevennet, max_steps=0, cache=False)[0]
    result = relax(start, sevennet, fmax=0.05, max_steps=300)[0]
    assert result.status == "converged", result.message
    assert 0 < result.steps < 300 and result.max_force < 0.05
    assert result.energy < before.energy - 0.01
    assert math.isfinite(result.energy_per_atom) and result.potential == "sevennet"
    assert result.potential_identity == sevennet.identity
    assert cached_flags([start], sevennet, 0.05, 300) == [True]
    again = relax(start, sevennet, fmax=0.05, max_steps=300)[0]
    assert again.cached and again.energy == result.energy and again.steps == result.steps


def test_a_checkpoint_with_another_digest_is_refused_unread(tmp_path, monkeypatch):
    shipped = relax_mod.sevennet_checkpoint()
    data = bytearray(shipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed in the middle of the weights
    tampered = tmp_path / "checkpoint_sevennet_0.pth"
    tampered.write_bytes(bytes(data))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a refused checkpoint must not be unpickled")

    monkeypatch.setattr("torch.load", no_unpickling)
    with pytest.raises(PotentialError, match="not a released SevenNet checkpoint"):
        load_sevennet("cpu", tampered)
    monkeypatch.setenv(relax_mod.SEVENNET_CHECKPOINT_ENV, str(tampered))  # the user's own copy, named by env
    with pytest.raises(PotentialError, match="refused unread"):
        load_sevennet("cpu")
    monkeypatch.setenv(relax_mod.SEVENNET_CHECKPOINT_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(PotentialError, match="is not a file"):
        load_sevennet("cpu")


def test_a_missing_sevenn_package_is_unavailable_with_the_install_command(monkeypatch):
    for name in [m for m in sys.modules if m == "sevenn" or m.startswith("sevenn.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: `import sevenn...` raises ImportError
    monkeypatch.setattr(relax_mod, "_LOADED", {})
    with pytest.raises(PotentialUnavailableError, match=r"pip install 'wyckoff-lab\[sevennet\]'"):
        load_potential("sevennet", "cpu")
    with pytest.raises(PotentialUnavailableError, match="sevenn package cannot be imported"):
        relax_mod.sevennet_checkpoint()


def test_mp2020_corrections_follow_mp_gga_plus_u_rules():
    from pymatgen.core import Lattice, Structure

    from wyckoff_lab.core.potential_agreement import _mp2020_scheme, mp2020_energy

    scheme = _mp2020_scheme()
    rock_salt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.4), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    oxide = scheme.comp_correction["oxide"]
    assert mp2020_energy(rock_salt, -40.0) == pytest.approx(-40.0 + 4 * oxide)  # GGA: anion correction only
    rock_salt.replace_species({"Mg": "Mn"})  # MP runs Mn oxides in GGA+U: U mixing correction per Mn too
    assert mp2020_energy(rock_salt, -40.0) == pytest.approx(-40.0 + 4 * oxide + 4 * scheme.u_corrections["O"]["Mn"])
    alloy = Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.0), ["Al", "Cu"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert mp2020_energy(alloy, -8.0) == -8.0


def test_bench_potentials_on_one_system(mp20_al_ca_cu, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(paths.DATA_ENV, str(mp20_al_ca_cu))
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    code = main(["bench", "potentials", "--systems", "Al-Ca-Cu", "--potentials", "sevennet", "--max-per-system", "4",
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    entry = report["potentials"]["sevennet"]
    assert entry["identity"].startswith("sevennet:SevenNet-0_11Jul2024:")
    system = entry["systems"]["Al-Ca-Cu"]
    assert system["rows"] == 4 and system["stand_ins"] == []  # Al, Ca and Cu kept, one seeded compound
    assert sum(system["relax_status"].values()) == 4 and system["relaxed_now"] == 4
    formulas = {p["formula"] for p in system["phases"]}
    assert {"Al", "Ca", "Cu"} <= formulas and len(formulas) == 4
    assert system["n_pairs"] == 6 and system["n_formation"] == 4  # every pair of the four relaxed rows
    for phase in system["phases"]:
        if phase["status"] in ("converged", "not_converged"):
            assert phase["ml_e_above_hull"] >= -1e-6 and phase["dft_e_above_hull"] >= -1e-6
    kept = system["dft_stable_kept"]
    assert kept["on_hull"] <= kept["within_0.025"] <= kept["within_0.05"] <= kept["n"]
    assert entry["total"]["dft_stable"] == kept["n"] and entry["total"]["rows"] == 4
    corrected = report["potentials"]["sevennet+mp2020"]  # no anions in Al-Ca-Cu: the same energies, from cache
    assert corrected["mp2020_corrections"] and corrected["total"]["relaxed_now"] == 0
    assert corrected["systems"]["Al-Ca-Cu"]["phases"] == system["phases"]
    timing = entry["timing"]
    assert timing["structures"] == 1 and timing["steps"] == 10
    assert timing["batched"]["ms_per_step"] > 0 and timing["single"]["ms_per_atom_step"] > 0
    # A rerun reads every relaxation from the cache
    assert main(["bench", "potentials", "--systems", "Al-Ca-Cu", "--potentials", "sevennet", "--max-per-system",
                 "4", "--json"]) == 0
    rerun = json.loads(capsys.readouterr().out)["potentials"]["sevennet"]["systems"]["Al-Ca-Cu"]
    assert rerun["relaxed_now"] == 0 and rerun["pair_mae_eV"] == system["pair_mae_eV"]
    assert main(["bench", "potentials", "--potentials", "sevennet,nonesuch", "--json"]) == 2
    assert "nonesuch" in json.loads(capsys.readouterr().out)["message"]
