"""Feedback on long relaxation work: relax-all rows stored one by one with an ETA, relax selected / filtered,
post-relaxation duplicates, novelty and S.U.N., statuses that go with their job, formatted force ticks, CLI
progress bars on stderr with pure JSON on stdout, and the MatterSim download host probed once a day."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from pymatgen.core import Lattice, Structure

from wyckoff_lab.app.cli import main
from wyckoff_lab.core import relax as relax_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def context(tmp_path, mp20_al_ca_cu, monkeypatch):
    from wyckoff_lab.widgets.context import LabContext, LabSettings

    monkeypatch.setenv("WYCKOFF_LAB_DATA", str(mp20_al_ca_cu))
    context = LabContext(LabSettings(warm_up=False, work_dir=tmp_path / "work", relax_max_steps=6,
                                     potential="chgnet", hull_max_references=1))
    yield context
    context.sessions.close()


def rocksalt(shift: float) -> Structure:
    structure = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    structure.perturb(shift, 0.0)
    return structure


def records_of(structures: list[Structure]) -> list[dict]:
    from wyckoff_lab.core.generators import Candidate, Conditions
    from wyckoff_lab.widgets.records import build_records

    return build_records([Candidate(s, "test", Conditions(), intended_spacegroup=225) for s in structures])


def test_relax_all_stores_each_structure_as_it_finishes_with_an_eta(context):
    from wyckoff_lab.widgets import jobs
    from wyckoff_lab.widgets.state import new_session_id

    sid = new_session_id()
    context.sessions.set_candidates(sid, records_of([rocksalt(0.05 + 0.01 * i) for i in range(3)]))
    stored_at_update, labels = [], []

    def on_update(done):  # what the table would show at each refresh
        stored_at_update.append(sum(bool(r["relax_status"]) for r in context.sessions.candidates(sid)))

    summary = jobs.relax_all(context, sid, lambda done, total, label: labels.append((done, total, label)),
                             build_hull=False, on_update=on_update)
    # one refresh per structure, all three in one batch of RELAX_CHUNK: the rows arrive one by one (they used to
    # arrive together at the end of each batch of 8)
    assert stored_at_update[:3] == [1, 2, 3]
    eta = [label for done, total, label in labels if 0 < done < total]
    assert eta and all(" s each · about " in label and "left" in label for label in eta)
    assert summary["relaxed"] == 3 and summary["fix_symmetry"] is False
    # judged again after relaxation: the three rock salts are one crystal (two duplicates); no hull: S.U.N. unknown
    records = context.sessions.candidates(sid)
    assert [r["unique_label"] for r in records] == ["unique", "duplicate", "duplicate"]
    assert all(r["relaxed_novel"] is True for r in records)  # NaCl is not among the loaded Al-Ca-Cu rows
    assert all(r["sun_label"] == "" for r in records)
    assert "2 duplicates" in jobs.relax_all_message(summary)


def test_sun_flag_after_the_hull_places_relaxed_candidates(context):
    from wyckoff_lab.widgets import jobs
    from wyckoff_lab.widgets.records import table_rows
    from wyckoff_lab.widgets.state import new_session_id

    sid = new_session_id()
    context.sessions.set_candidates(sid, records_of([rocksalt(0.05), rocksalt(0.3)]))
    jobs.relax_all(context, sid, build_hull=False)
    context.sessions.update_candidates(sid, {"c001": {"e_above_hull": 0.02}, "c002": {"e_above_hull": 0.5}})
    counts = jobs.judge_relaxed(context, sid)
    first, second = context.sessions.candidates(sid)
    assert first["sun"] is True and table_rows([first])[0]["sun_label"] == "S.U.N."
    assert second["sun"] is False  # a duplicate, and 0.5 eV/atom above the hull
    assert counts["sun"] == 1 and counts["sun_known"] == 2


def test_relax_selected_and_filtered_relax_only_those_rows(context):
    from wyckoff_lab.widgets import jobs
    from wyckoff_lab.widgets.candidates import remember_table_scope
    from wyckoff_lab.widgets.state import new_session_id

    sid = new_session_id()
    context.sessions.set_candidates(sid, records_of([rocksalt(0.05 + 0.01 * i) for i in range(3)]))
    with pytest.raises(jobs.JobError, match="No rows selected"):
        jobs.relax_all(context, sid, build_hull=False, scope="selected")
    remember_table_scope(context, sid, ["c002"], ["c001", "c003"])
    assert jobs.relax_all(context, sid, build_hull=False, scope="selected")["relaxed"] == 1
    assert [bool(r["relax_status"]) for r in context.sessions.candidates(sid)] == [False, True, False]
    assert jobs.relax_all(context, sid, build_hull=False, scope="filtered")["relaxed"] == 2
    assert all(r["relax_status"] for r in context.sessions.candidates(sid))


def test_relax_status_line_goes_when_another_candidate_set_replaces_its_own(context):
    from wyckoff_lab.widgets import jobs
    from wyckoff_lab.widgets.relaxation import stale_status_update
    from wyckoff_lab.widgets.state import new_session_id

    sid = new_session_id()
    context.sessions.set_candidates(sid, records_of([rocksalt(0.05)]))
    jobs.relax_one(context, sid, "c001", lambda frame, history: None)
    unchanged = stale_status_update(context, sid, chemistry_changed=False)
    assert all(value != "" for value in unchanged)  # still its candidate set: the line stays
    context.sessions.set_candidates(sid, records_of([rocksalt(0.1)]))  # a new generation
    assert stale_status_update(context, sid, chemistry_changed=False) == ("", "")
    jobs.relax_one(context, sid, "c001", lambda frame, history: None)
    assert stale_status_update(context, sid, chemistry_changed=True) == ("", "")  # another chemical system


def test_force_axis_ticks_are_formatted():
    from wyckoff_lab.widgets.relaxation import relax_figure

    history = [{"step": i, "energy_per_atom": -3.2 - 0.001 * i, "max_force": 1.52194 - 0.01 * i} for i in range(5)]
    layout = relax_figure(history).layout
    assert layout.yaxis2.tickformat == ".2~g" and layout.yaxis.tickformat == ".4~g"


def test_cli_relax_progress_bar_on_stderr_and_pure_json_on_stdout(tmp_path, capsys):
    cif = tmp_path / "nacl.cif"
    rocksalt(0.05).to(filename=str(cif))
    code = main(["relax", str(cif), "--potential", "chgnet", "--max-steps", "5", "--json", "--progress",
                 "--fix-symmetry", "--no-cache"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # nothing but the JSON object on stdout
    assert code == 0 and report["fix_symmetry"] is True and "FixSymmetry" in report["criterion"]
    assert "relaxing nacl.cif" in captured.err and "FIRE step" in captured.err
    main(["relax", str(cif), "--potential", "chgnet", "--max-steps", "5", "--json", "--no-cache"])
    assert "FIRE step" not in capsys.readouterr().err  # stderr is not a terminal here: no bar unless asked


def test_cli_hull_progress_bar_on_stderr(tmp_path, capsys, mp20_al_ca_cu, monkeypatch):
    monkeypatch.setenv("WYCKOFF_LAB_DATA", str(mp20_al_ca_cu))
    code = main(["hull", "--elements", "Cu", "--potential", "chgnet", "--max-references", "1", "--max-steps", "3",
                 "--json", "--progress"])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["elements"] == ["Cu"]
    assert "Cu references" in captured.err and "FIRE step" in captured.err


def test_mattersim_download_host_is_probed_once_and_the_answer_kept(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WYCKOFF_LAB_MATTERSIM_CHECKPOINT", raising=False)
    monkeypatch.setattr(relax_mod, "MATTERSIM_CACHE_DIR", str(tmp_path / "no-mattersim"))
    monkeypatch.setattr(relax_mod, "_LOADED", {k: v for k, v in relax_mod._LOADED.items() if k[0] == "chgnet"})
    monkeypatch.setattr(relax_mod, "_FALLBACK_WARNED", False)
    relax_mod._probe_path().unlink(missing_ok=True)
    probes = []

    def offline(*args, **kwargs):
        probes.append(args)
        raise OSError("network is blocked in this test")

    monkeypatch.setattr(socket, "create_connection", offline)
    with caplog.at_level(logging.INFO, logger="wyckoff_lab.core.relax"):
        assert relax_mod.load_potential(None, "cpu").name == "chgnet"
        assert len(probes) == 1
        # the next command (a new process: its own model cache and warning flag) does not probe again
        monkeypatch.setattr(relax_mod, "_LOADED", {k: v for k, v in relax_mod._LOADED.items() if k[0] == "chgnet"})
        monkeypatch.setattr(relax_mod, "_FALLBACK_WARNED", False)
        assert relax_mod.load_potential(None, "cpu").name == "chgnet"
        assert len(probes) == 1
    said = [r for r in caplog.records if "MatterSim is not available" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.INFO]  # warned once, then only noted
    assert "not tried again for 24 h" in said[1].getMessage()
    with pytest.raises(relax_mod.PotentialUnavailableError, match="unreachable"):
        relax_mod.load_potential("mattersim", "cpu")
    assert len(probes) == 1
    # a day later the host is tried again
    assert relax_mod._remembered_probe_failure(now=relax_mod.time.time() + relax_mod.MATTERSIM_PROBE_TTL_S + 1) \
        is None


@pytest.mark.needs_chromium
def test_relax_all_fills_the_table_while_it_runs_in_chromium(mp20_al_ca_cu, tmp_path):
    """The real app: "Relax all" on generated candidates shows relaxed rows and an ETA while the job still runs
    (the table used to stay as generated until the whole job, hull included, had finished)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from app_timing import free_port, start_browser, stop_process
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from wyckoff_lab.app.commands.app import wait_until_up

    port = free_port()
    env = dict(os.environ, WYCKOFF_LAB_DATA=str(mp20_al_ca_cu), WYCKOFF_LAB_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen([str(Path(sys.executable).with_name("wyckoff-lab")), "app", "--no-browser", "--port",
                                str(port), "--potential", "chgnet", "--relax-max-steps", "5", "--samples", "12",
                                "--elements", "Al,Ca,Cu"], env=env, stdout=log, stderr=subprocess.STDOUT)
    browser = None
    try:
        url = f"http://127.0.0.1:{port}/"
        assert wait_until_up(url, 120), (tmp_path / "app.log").read_text()
        browser = start_browser(tmp_path / "profile")
        wait = WebDriverWait(browser, 240, poll_frequency=0.2)
        text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731
        browser.get(url)
        wait.until(ec.element_to_be_clickable((By.ID, "wl-gen-run")))
        browser.find_element(By.ID, "wl-gen-run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=formula]")))
        wait.until(lambda d: "potential: " in text("wl-relax-potential") and "loading" not in
                   text("wl-relax-potential"))
        browser.find_element(By.ID, "wl-relax-all").click()
        seen = []

        def live(d) -> bool:
            cells = [c.text for c in d.find_elements(By.CSS_SELECTOR,
                                                      "#wl-cand-table td[data-dash-column=relax_status]")]
            running = d.find_element(By.ID, "wl-relax-cancel").is_enabled()
            seen.append((sum(bool(c.strip()) for c in cells), len(cells), running, text("wl-relax-progress-label")))
            # Both while the job runs, not necessarily in the same poll (a loaded machine may pass the last ETA
            # before the table redraws): a relaxed row in the table, and an ETA in the progress line.
            rows_while_running = any(r and n > 0 for n, _, r, _ in seen)
            eta_while_running = any(r and "s each · about" in label for _, _, r, label in seen)
            return rows_while_running and eta_while_running

        wait.until(live)
        assert any(running and "relaxed" in label for _, _, running, label in seen), seen[-5:]
        assert any("sym free" in c.text for c in browser.find_elements(
            By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=relax_status]"))
    finally:
        if browser is not None:
            browser.quit()
        stop_process(process)
        log.close()
