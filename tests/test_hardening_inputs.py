"""Bad input reaches a clear error, never a crash: tolerances spglib would segfault on, broken model weights and
configs, sampling settings that crashed the sampler, and training checkpoints that cannot be resumed from."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pymatgen.core import Lattice, Structure

BAD_TOLERANCES = ("-1", "-0.1", "nan", "0", "inf")


def rocksalt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _cli(args, capsys) -> tuple[int, str]:
    """rc and stderr of `wyckoff-lab ARGS` run in this process (argparse errors exit 2 through SystemExit)."""
    from wyckoff_lab.app.cli import main

    try:
        rc = main(args)
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


# -- tolerances -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cif(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cif") / "NaCl.cif"
    rocksalt().to(filename=str(path))
    return path


def test_negative_symprec_is_an_error_not_a_segfault(cif, tmp_path):
    """Each command in its own process: a segmentation fault shows as rc -11 there instead of killing pytest."""
    command = str(Path(sys.executable).with_name("wyckoff-lab"))
    for args in (["represent", "show", str(cif)], ["evaluate", "--input", str(cif.parent)],
                 ["represent", "roundtrip", "--limit", "2"]):
        out = subprocess.run([command, *args, "--symprec=-1"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (args, out.returncode, out.stderr[-500:])
        lines = [line for line in out.stderr.splitlines() if "error" in line]
        assert len(lines) == 1 and "finite number > 0" in lines[0], out.stderr


@pytest.mark.parametrize("value", BAD_TOLERANCES)
def test_every_tolerance_flag_refuses_bad_values(value, cif, capsys):
    for args in (["represent", "show", str(cif)], ["evaluate", "--input", str(cif.parent)],
                 ["represent", "roundtrip"]):
        rc, err = _cli([*args, f"--symprec={value}"], capsys)
        assert rc == 2 and "--symprec" in err and "Traceback" not in err, (args, value, err)


@pytest.mark.parametrize("value", [-1.0, -0.1, math.nan, 0.0, math.inf])
def test_core_refuses_bad_tolerances_before_spglib(value):
    from wyckoff_lab.core.metrics import analyze_symmetry, evaluate, symmetry_info
    from wyckoff_lab.core.symmetry import detected_spacegroup
    from wyckoff_lab.core.wyckoff import WyckoffCrystal, roundtrip_failures

    structure = rocksalt()
    calls = [lambda: detected_spacegroup(structure, value), lambda: WyckoffCrystal.from_structure(structure, value),
             lambda: WyckoffCrystal.from_structure(structure, angle_tolerance=value),
             lambda: symmetry_info(structure, value), lambda: analyze_symmetry([structure], value),
             lambda: roundtrip_failures([structure], value, processes=1),
             lambda: evaluate([structure], [structure], symprec=value)]
    for call in calls:
        with pytest.raises(ValueError, match="finite number > 0"):
            call()
    assert detected_spacegroup(structure, 0.1) == 225  # sound values still work


# -- model weights and configs ----------------------------------------------------------------------------------------


@pytest.fixture
def weights_copy(tmp_path) -> Path:
    from wyckoff_lab.core.generators.wyckoff_transformer import default_weights_dir

    folder = tmp_path / "wyckoff_transformer"
    shutil.copytree(default_weights_dir(), folder)
    return folder


def _corrupt_tensor(folder: Path, value: float) -> str:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    name = next(k for k, t in state.items() if t.is_floating_point() and t.dim() == 2)
    state[name] = state[name].clone()
    state[name].view(-1)[7] = value
    save_file(state, folder / "model.safetensors")
    return name


@pytest.mark.parametrize("value, words", [(math.nan, "NaN"), (math.inf, "NaN or infinite"), (1e30, "magnitude")])
def test_weights_that_are_not_numbers_fail_at_load(weights_copy, value, words):
    from wyckoff_lab.core.generators.nn.checkpoints import ModelLoadError
    from wyckoff_lab.core.generators.wyckoff_transformer import load_model

    name = _corrupt_tensor(weights_copy, value)
    with pytest.raises(ModelLoadError, match=words) as info:
        load_model(weights_copy, device="cpu")
    assert name in str(info.value)


def test_config_whose_heads_do_not_divide_the_width_fails_at_load(weights_copy):
    from wyckoff_lab.core.generators.nn.checkpoints import ModelLoadError
    from wyckoff_lab.core.generators.wyckoff_transformer import load_model

    config = json.loads((weights_copy / "config.json").read_text())
    config["model"]["n_heads"] = 5
    (weights_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"n_heads \(5\) must divide d_model"):
        load_model(weights_copy, device="cpu")
    config["model"].update(n_heads=6, head="diffusion")
    (weights_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="head must be"):
        load_model(weights_copy, device="cpu")


def test_cli_sample_with_broken_weights_says_so(weights_copy, monkeypatch, capsys):
    _corrupt_tensor(weights_copy, math.nan)
    monkeypatch.setenv("WYCKOFF_LAB_MODELS", str(weights_copy.parent))
    rc, err = _cli(["sample", "--generator", "wyckoff-transformer", "--n", "2", "--elements", "Na,Cl"], capsys)
    assert rc == 2 and "NaN" in err and "Traceback" not in err


def test_non_finite_model_output_is_a_model_error(one_torch_thread):
    """Weights that break after loading (here: set to NaN in memory) stop sampling with a model error."""
    from wyckoff_lab.core.generators import Conditions, get_generator
    from wyckoff_lab.core.generators.nn.decoding import ModelOutputError

    generator = get_generator("wyckoff-transformer", device="cpu")
    with torch.no_grad():
        next(generator.model.parameters()).fill_(float("nan"))
    with pytest.raises(ModelOutputError, match="non-finite"):
        generator.generate(4, Conditions(elements=("Na", "Cl")), seed=0)


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0, 0.0, 1e-9, 1e9])
def test_sampling_refuses_temperatures_it_cannot_use(temperature, one_torch_thread):
    from wyckoff_lab.core.generators import Conditions, get_generator

    generator = get_generator("wyckoff-transformer", device="cpu")
    with pytest.raises(ValueError, match="temperature must be"):
        generator.generate(2, Conditions(elements=("Na", "Cl")), temperature=temperature, seed=0)
    assert len(generator.generate(2, Conditions(elements=("Na", "Cl")), temperature=1.0, seed=0).candidates) == 2


def test_transformer_refuses_a_bad_gate_tolerance_before_loading():
    from wyckoff_lab.core.generators.wyckoff_transformer import WyckoffTransformerGenerator

    for value in (-1.0, math.nan):
        with pytest.raises(ValueError, match="symprec must be a finite number > 0"):
            WyckoffTransformerGenerator(weights="/nonexistent", symprec=value)  # refused before the weights are read


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0])
def test_pyxtal_refuses_temperatures_too(temperature):
    """The baseline ignores temperature, but a NaN one is the caller's bug: refused as by the transformer."""
    from wyckoff_lab.core.generators import Conditions, get_generator

    with pytest.raises(ValueError, match="temperature must be"):
        get_generator("pyxtal").generate(1, Conditions(elements=("Na", "Cl"), spacegroup=225), temperature=temperature)


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.5, math.nan])
def test_sampling_refuses_top_p_outside_the_unit_interval(top_p):
    from wyckoff_lab.core.generators.nn.decoding import check_sampling_settings

    with pytest.raises(ValueError, match="top_p"):
        check_sampling_settings(1.0, top_p)
    check_sampling_settings(1.0, 0.9)


# -- training checkpoints ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"\xff\xfe not a checkpoint", b"PK\x03\x04 truncated zip", b""])
def test_train_refuses_a_corrupt_checkpoint_at_once(content, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(content)
    rc, err = _cli(["train", "wyckoff-transformer", "--out", str(out), "--epochs", "1"], capsys)
    assert rc == 2 and "cannot resume from" in err and "checkpoint.pt" in err and "Traceback" not in err, err
    assert (out / "checkpoint.pt").read_bytes() == content  # nothing lost: the file is left for the user


def test_checkpoint_with_pickled_code_is_not_run(tmp_path):
    """weights_only: a checkpoint that would run code when unpickled is refused, and the code does not run."""
    import pickle

    from wyckoff_lab.core.generators.nn.training import CheckpointError, read_checkpoint

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": Payload(), "optimizer": {}, "state": "{}"}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="cannot resume"):
        read_checkpoint(path, "cpu")
    assert not marker.exists()


def test_train_refuses_an_unusable_model_config(tmp_path, capsys):
    rc, err = _cli(["train", "wyckoff-transformer", "--out", str(tmp_path / "run"), "--set", "model.d_model=100",
                    "--set", "model.n_heads=3"], capsys)
    assert rc == 2 and "n_heads (3) must divide d_model (100)" in err


@pytest.mark.parametrize("args, words", [(["--lr", "nan"], "lr must be a finite number > 0"),
                                         (["--lr=-1"], "lr must be a finite number > 0"),
                                         (["--max-minutes", "0"], "max_minutes must be a finite number > 0"),
                                         (["--set", "model.dropout=x"], "model.dropout must be float"),
                                         (["--set", "model.size=3"], "unknown setting 'model.size'"),
                                         (["--batch-size", "0"], "batch_size must be a whole number >= 1"),
                                         (["--epochs", "-3"], "epochs must be a whole number >= 1")])
def test_train_refuses_settings_it_cannot_train_with(args, words, tmp_path, capsys):
    """Before any data loads: a zero batch size was a ZeroDivisionError, a NaN learning rate hours of NaN weights."""
    rc, err = _cli(["train", "wyckoff-transformer", "--out", str(tmp_path / "run"), *args], capsys)
    assert rc == 2 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_train_config_lists_its_problems():
    from wyckoff_lab.core.generators.wyckoff_transformer.train import TrainConfig

    assert TrainConfig().problems() == []
    problems = TrainConfig(lr=math.nan, max_minutes=-1.0, warmup_fraction=math.inf).problems()
    assert problems == ["lr must be a finite number > 0 (got nan)", "max_minutes must be a finite number > 0 (got -1.0)",
                        "warmup_fraction must be a finite number >= 0 (got inf)"]
