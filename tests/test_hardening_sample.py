"""Hardening of `sample` and `bench`: bad numbers and templates, --out safety, chunks, empty runs, no generator."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from wyckoff_lab.app.cli import emit, main
from wyckoff_lab.app.commands import sample as sample_command
from wyckoff_lab.core import generators as generators_module
from wyckoff_lab.core.generators import Conditions, GenerationResult
from wyckoff_lab.core.templates import parse_template

ORIGINAL_GET_GENERATOR = generators_module.get_generator


@pytest.fixture(scope="module")
def shipped(shipped_generator):
    return shipped_generator


@pytest.fixture
def reuse_shipped(shipped, monkeypatch):
    """`sample` gets the one loaded shipped transformer (loading the weights per call costs seconds)."""
    def get(name, **kwargs):
        return shipped if name == "wyckoff-transformer" and not kwargs else ORIGINAL_GET_GENERATOR(name, **kwargs)

    monkeypatch.setattr(generators_module, "get_generator", get)
    return shipped


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(sample_command, "FIRST_CHUNK", 2)
    monkeypatch.setattr(sample_command, "CHUNK", 2)


FAST = ["--elements", "Al,Ca,Cu", "--spacegroup", "225"]  # conditions the shipped model samples quickly


def _strict_loads(text: str):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# -- 1. temperature, top-p, strict JSON ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
    (["--temperature", "inf", "--json"], "--temperature must be a finite number > 0, got inf"),
    (["--temperature", "0"], "--temperature must be a finite number > 0"),
    (["--temperature", "-1"], "--temperature must be a finite number > 0"),
    (["--top-p", "0"], "must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "must be in (0, 1], got 1.5"),
    (["--top-p", "nan"], "must be in (0, 1], got nan"),
])
def test_sample_refuses_bad_temperature_and_top_p_at_the_command_line(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(generators_module, "get_generator", lambda *a, **k: pytest.fail("loaded a generator"))
    assert main(["sample", "--n", "1", *argv]) == 2
    captured = capsys.readouterr()
    if "--json" in argv:  # the error object is strict JSON too
        assert message in _strict_loads(captured.out)["message"]
    else:
        assert message in captured.err and len(captured.err.strip().splitlines()) == 1


def test_json_output_never_holds_nan_or_infinity(capsys):
    emit({"a": float("nan"), "b": np.float64("inf"), "c": [1.5, float("-inf")], "d": np.array([np.nan, 2.0]),
          "e": (np.float32(3.0),)}, True)
    data = _strict_loads(capsys.readouterr().out)
    assert data == {"a": None, "b": None, "c": [1.5, None], "d": [None, 2.0], "e": [3.0]}
    emit({"x": math.inf}, False)  # the pretty-printed fallback is strict too
    assert _strict_loads(capsys.readouterr().out) == {"x": None}


# -- 2. templates ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacegroup, template, positions", [
    (225, "Ca:99z", "4a, 4b, 8c, 24d, 24e, 32f, 48g, 48h, 48i, 96j, 96k, 192l"),
    (2, "Ca:4e", "1a, 1b, 1c, 1d, 1e, 1f, 1g, 1h, 2i"),
])
def test_a_wyckoff_label_the_group_lacks_is_a_clear_value_error(spacegroup, template, positions, capsys):
    label = template.split(":")[1]
    for call in (lambda: parse_template(template, spacegroup),
                 lambda: Conditions(spacegroup=spacegroup, template=parse_template(template))):
        with pytest.raises(ValueError, match=f"has no Wyckoff position '{label}'") as exc:
            call()
        assert positions in str(exc.value)
    assert main(["sample", "--spacegroup", str(spacegroup), "--template", template, "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert f"has no Wyckoff position '{label}'" in err and positions in err and "Traceback" not in err


# -- 3. --out --------------------------------------------------------------------------------------------------------

def _cifs(folder):
    return sorted(p.name for p in folder.glob("*.cif"))


def test_out_is_checked_before_sampling_and_replaced_only_when_it_is_ours(reuse_shipped, tmp_path, capsys,
                                                                          monkeypatch):
    calls = []
    real_generate = reuse_shipped.generate
    monkeypatch.setattr(reuse_shipped, "generate", lambda *a, **k: calls.append(a) or real_generate(*a, **k))
    afile = tmp_path / "taken.txt"
    afile.write_text("mine")
    assert main(["sample", "--n", "2", "--seed", "1", "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "mine" and not calls

    out = tmp_path / "run"
    assert main(["sample", *FAST, "--n", "3", "--seed", "1", "--out", str(out), "--json"]) == 0
    first = _cifs(out)
    assert len(first) == 3 and len(_strict_loads(capsys.readouterr().out.splitlines()[-1])["conditions"]) > 0
    calls.clear()
    assert main(["sample", *FAST, "--n", "2", "--seed", "2", "--out", str(out)]) == 2  # a second run does not mix in
    assert "not empty" in capsys.readouterr().err and _cifs(out) == first and not calls

    assert main(["sample", *FAST, "--n", "2", "--seed", "2", "--out", str(out), "--overwrite", "--json"]) == 0
    records = json.loads((out / "candidates.json").read_text())
    assert len(_cifs(out)) == 2 and [r["name"] + ".cif" for r in records] == _cifs(out)  # no stale CIFs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken.txt"]  # no temporary folder left behind
    capsys.readouterr()

    (out / "notes.txt").write_text("keep me")
    calls.clear()
    assert main(["sample", "--n", "2", "--out", str(out), "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep me" and not calls


# -- 4. chunks, reproducibility, estimate, Ctrl-C -------------------------------------------------------------------

def test_chunked_runs_are_reproducible_and_chunk_zero_is_the_generators_own_draw(reuse_shipped, small_chunks,
                                                                                   tmp_path, capsys):
    assert sample_command.chunk_sizes(5) == [2, 2, 1] and sample_command.chunk_sizes(2) == [2]
    seeds = [sample_command.chunk_seed(11, i) for i in range(3)]
    assert seeds[0] == 11 and len(set(seeds)) == 3 and sample_command.chunk_seed(None, 2) is None
    runs = []
    for name in ("a", "b"):
        assert main(["sample", *FAST, "--n", "4", "--seed", "11", "--out", str(tmp_path / name), "--json"]) == 0
        capsys.readouterr()
        runs.append(json.loads((tmp_path / name / "candidates.json").read_text()))
    assert [r["tokens"] for r in runs[0]] == [r["tokens"] for r in runs[1]] and len(runs[0]) == 4
    assert [r["seed"] for r in runs[0]][:2] == [11, 11]
    own = reuse_shipped.generate(2, Conditions(elements=("Al", "Ca", "Cu"), spacegroup=225), 1.0, 11)
    assert [r["tokens"] for r in runs[0][:2]] == [c.tokens for c in own.candidates]


def test_ctrl_c_keeps_the_chunks_made_and_a_huge_run_says_how_long(reuse_shipped, small_chunks, tmp_path, capsys,
                                                                    monkeypatch):
    real_generate = reuse_shipped.generate
    calls = []

    def generate(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(reuse_shipped, "generate", generate)
    monkeypatch.setattr(sample_command, "HUGE_RUN", 5)
    out = tmp_path / "big"
    assert main(["sample", *FAST, "--n", "8", "--seed", "3", "--out", str(out), "--json"]) == 130
    captured = capsys.readouterr()
    summary = _strict_loads(captured.out.splitlines()[-1])
    assert summary["interrupted"] and summary["structures"] == len(_cifs(out)) == 4
    assert f"kept {summary['structures']} structures in {out}" in captured.err
    assert "sampling 8 structures takes about" in captured.err and "GB on disk" in captured.err
    records = json.loads((out / "candidates.json").read_text())
    assert [r["name"] + ".cif" for r in records] == _cifs(out)
    assert not (out / sample_command.PARTIAL_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


# -- 6. infeasible conditions, nothing made --------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--formula", "CaCu5", "--max-atoms", "4"], "CaCu5 has 6 atoms per formula unit, more than --max-atoms 4"),
    (["--elements", "Al,Ca,Cu", "--max-atoms", "2"], "3 elements, more than --max-atoms 2"),
    (["--elements", "Xx"], "unknown element Xx in 'Xx'"),
])
def test_infeasible_conditions_are_refused_with_the_reason(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(generators_module, "get_generator", lambda *a, **k: pytest.fail("loaded a generator"))
    assert main(["sample", "--n", "3", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_run_that_makes_nothing_says_why_and_fails(reuse_shipped, monkeypatch, capsys):
    # The real generator's verdicts (failures counted by reason), with every structure then lost to a dead end.
    real_generate = reuse_shipped.generate

    def generate(n, *args, **kwargs):
        result = real_generate(n, *args, **kwargs)
        return GenerationResult([], attempts=result.attempts, failures={"dead_end": result.attempts})

    monkeypatch.setattr(reuse_shipped, "generate", generate)
    assert main(["sample", "--n", "2", "--seed", "0", "--json"]) == 1
    captured = capsys.readouterr()
    summary = _strict_loads(captured.out)
    assert summary["structures"] == 0 and "no token keeps the conditions" in summary["failure_reasons"]["dead_end"]
    assert "no structure was made" in captured.err and "dead_end: constrained decoding" in captured.err


# -- 5. bench with no generator --------------------------------------------------------------------------------------

def test_bench_generate_that_ran_no_generator_exits_1(tmp_path, capsys):
    weights = tmp_path / "corrupt"
    weights.mkdir()
    (weights / "config.json").write_text("{not json")
    (weights / "model.safetensors").write_bytes(b"\x00" * 64)
    assert main(["bench", "generate", "--generators", "wyckoff-transformer", "--weights", str(weights), "--n", "2",
                 "--json"]) == 1
    captured = capsys.readouterr()
    report = _strict_loads(captured.out)
    assert "corrupt or mismatched" in report["generators"]["wyckoff-transformer"]["error"]
    assert "bench generate ran no generator" in captured.err


# -- impossible templates, the generator's own atom limit, an --out that cannot be written ----------------------------

@pytest.mark.parametrize("spacegroup, template, words", [
    (225, "Ca:4a,Cu:4b,Ca:4a", "4a has no free parameters, so it holds one orbit, but the template uses it 2 times"),
    (2, "Ca:4e", "no Wyckoff position '4e' (its e is 1e); its Wyckoff letters are a to i"),
])
def test_an_impossible_template_is_refused_before_any_model_loads(spacegroup, template, words, capsys, monkeypatch):
    from wyckoff_lab.core.templates import template_problems

    assert any(words in problem for problem in template_problems(spacegroup, parse_template(template)))
    monkeypatch.setattr(generators_module, "get_generator", lambda *a, **k: pytest.fail("loaded a generator"))
    assert main(["sample", "--n", "2", "--elements", "Ca,Cu", "--spacegroup", str(spacegroup), "--template",
                 template]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_a_formula_beyond_the_generators_default_atom_limit_is_refused(reuse_shipped, capsys, monkeypatch):
    # Without --max-atoms the transformer allows 20 atoms: Ca7Cu20 (27) used to end in dead ends, one per attempt.
    monkeypatch.setattr(reuse_shipped, "generate", lambda *a, **k: pytest.fail("sampled"))
    assert main(["sample", "--n", "2", "--formula", "Ca7Cu20", "--json"]) == 2
    message = _strict_loads(capsys.readouterr().out)["message"]
    assert "27 atoms per formula unit, more than the 20 atoms wyckoff-transformer allows without --max-atoms" \
        in message


def test_an_out_folder_that_cannot_be_made_is_refused_before_sampling(reuse_shipped, capsys, monkeypatch):
    from pathlib import Path

    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (a folder nobody, root included, can create entries in)")
    monkeypatch.setattr(reuse_shipped, "generate", lambda *a, **k: pytest.fail("sampled"))
    assert main(["sample", "--n", "2", *FAST, "--out", "/proc/self/samples"]) == 2
    err = capsys.readouterr().err
    assert "cannot write beside --out /proc/self/samples" in err and "Traceback" not in err
