"""Sessions outlive a page reload (and an app restart on the same --work-dir), forged tokens are refused, and a
session saved to a file opens back exactly, while a corrupt or foreign file changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app_timing import free_port, start_browser, stop_process

needs_chromium = pytest.mark.needs_chromium
CELLS = "#wl-cand-table td[data-dash-column=formula]"
TOKEN_KEY = "wl-session-token"


def _start_app(home: Path, data: Path, work_dir: Path, port: int) -> subprocess.Popen:
    """`wyckoff-lab app` on `work_dir` with an empty cache (the job server has everything still to load)."""
    env = dict(os.environ, WYCKOFF_LAB_DATA=str(data), WYCKOFF_LAB_CACHE=str(home / "cache"),
               WYCKOFF_LAB_MODELS=str(home / "no-models"), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("wyckoff-lab")), "app", "--no-browser", "--port", str(port),
         "--generator", "pyxtal", "--potential", "chgnet", "--samples", "12", "--work-dir", str(work_dir)],
        env=env, stdout=open(home / "app.log", "a"), stderr=subprocess.STDOUT)


@needs_chromium
def test_a_reload_and_a_restart_keep_the_candidates_and_a_forged_token_is_refused(mp20_al_ca_cu, tmp_path):
    """Generate right after the page loads (empty cache: the job server is still loading, the job is queued and
    completes), reload: the same candidates; restart the app on the same --work-dir and reload: still there; put a
    forged token in the tab's storage and reload: a fresh, empty session with a valid token."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    from wyckoff_lab.app.commands.app import wait_until_up

    home, work_dir, port = tmp_path / "app", tmp_path / "work", free_port()
    home.mkdir()
    url = f"http://127.0.0.1:{port}/"
    process = _start_app(home, mp20_al_ca_cu, work_dir, port)
    browser = start_browser(tmp_path / "profile")
    try:
        assert wait_until_up(url, 120), (home / "app.log").read_text()
        wait = WebDriverWait(browser, 240)
        text = lambda element_id: browser.find_element(By.ID, element_id).text
        formulas = lambda: [c.text for c in browser.find_elements(By.CSS_SELECTOR, CELLS)]
        token = lambda: browser.execute_script(f"return JSON.parse(sessionStorage.getItem('{TOKEN_KEY}'))")

        browser.get(url)
        wait.until(ec.element_to_be_clickable((By.ID, "wl-gen-run")))
        warm_up_line = text("wl-warmup-text")
        browser.find_element(By.CSS_SELECTOR, 'button[id*=\'"el":"Cu"\']').click()
        browser.find_element(By.ID, "wl-gen-run").click()
        wait.until(lambda d: len(formulas()) == 12)
        first = formulas()
        assert "12 candidates from pyxtal" in text("wl-gen-status")
        assert (work_dir / "session.key").stat().st_mode & 0o777 == 0o600
        sid = token()
        assert sid and len(sid) == 65

        browser.refresh()
        wait.until(lambda d: len(formulas()) == 12)
        assert formulas() == first and token() == sid

        stop_process(process)
        process = _start_app(home, mp20_al_ca_cu, work_dir, port)
        assert wait_until_up(url, 120), (home / "app.log").read_text()
        browser.refresh()
        wait.until(lambda d: len(formulas()) == 12)
        assert formulas() == first and token() == sid

        forged = sid[:33] + ("0" if sid[33] != "0" else "1") + sid[34:]
        browser.execute_script(f"sessionStorage.setItem('{TOKEN_KEY}', JSON.stringify('{forged}'))")
        browser.refresh()
        wait.until(lambda d: token() not in (None, forged))
        time.sleep(2)  # a wrongly adopted session would have filled the table by now
        assert formulas() == [] and token() != sid
        print("warm-up line when Generate was clicked:", repr(warm_up_line))
    finally:
        browser.quit()
        stop_process(process)


def test_save_then_open_round_trip_and_bad_files_change_nothing(tmp_path):
    from pymatgen.core import Lattice, Structure
    from wyckoff_lab.widgets.context import LabContext, LabSettings
    from wyckoff_lab.widgets.session_files import (SessionFileError, open_session_document, parse_session_file,
                                                    session_document)
    from wyckoff_lab.widgets.state import new_session_id

    context = LabContext(LabSettings(work_dir=tmp_path / "work", warm_up=False))
    copper = Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    records = [{"id": f"c{i:03d}", "label": i, "formula": "Cu", "elements": ["Cu"], "natoms": 4,
                "structure": copper.as_dict(), "relax_status": "converged" if i == 1 else None,
                "relaxed_structure": copper.as_dict() if i == 1 else None, "energy": -14.9 if i == 1 else None}
               for i in (1, 2)]
    saved, other = new_session_id(), new_session_id()
    context.sessions.set_candidates(saved, records)
    context.sessions.set(saved, "generation", {"generator": "pyxtal"})
    content = json.dumps(session_document(context, saved)).encode()

    as_json = json.loads(json.dumps(records))  # what any JSON trip makes of them (tuples become lists)
    assert open_session_document(context, other, parse_session_file(content)) == 2
    assert context.sessions.candidates(other) == as_json
    assert context.sessions.get(other, "generation") == {"generator": "pyxtal"}

    damaged = json.loads(content)
    damaged["candidates"][1]["structure"] = {"lattice": "nonsense"}
    bad_files = {b"\x89PNG\r\n": "not JSON", b'{"candidates": []}': "not a Wyckoff Lab session file",
                 json.dumps({**json.loads(content), "version": 99}).encode(): "version 99",
                 json.dumps(damaged).encode(): "Candidate 2's structure cannot be read",
                 content[: len(content) // 2]: "not JSON"}
    for bad, reason in bad_files.items():
        with pytest.raises(SessionFileError, match=reason):
            parse_session_file(bad)
    assert context.sessions.candidates(other) == as_json  # nothing was changed by any of them
