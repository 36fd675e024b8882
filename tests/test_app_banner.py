"""The warm-up line in headless Chromium: while the job server loads, the page says what ("loading reference data
(MP-20), 2 of 4") and that jobs are queued, a Generate pressed then waits in the queue, and the line hides once
loading is done (and the queued job runs).

The app is started as `wyckoff-lab app` starts it (create_app, then the job server, then the server), with one
change: the job server's reference-data step waits until the test creates a file, so the test decides when warm-up
may finish and nothing depends on how fast this machine loads MP-20.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from app_timing import free_port, page_interactive, start_browser, stop_process

needs_chromium = pytest.mark.needs_chromium

SERVE_WITH_HELD_WARM_UP = """
import os
import sys
import time
from pathlib import Path

from wyckoff_lab.widgets import LabContext, LabSettings, create_app

port, gate = int(sys.argv[1]), Path(sys.argv[2])
context = LabContext(LabSettings(default_generator="pyxtal", potential="chgnet", relax_max_steps=20,
                                 default_samples=4))


def held_until_the_gate_opens(loader):
    def load():  # runs in the job server, a child of the app process
        app_pid = os.getppid()
        while not gate.exists():
            if os.getppid() != app_pid:  # the app is gone (a failed test): do not linger
                os._exit(0)
            time.sleep(0.1)
        return loader()
    return load


steps = context.warm_up_steps  # the job server's real steps; only the reference data waits for the test
context.manager._warm_up_steps = lambda: [(label, held_until_the_gate_opens(load) if label.startswith("reference")
                                          else load) for label, load in steps()]
app = create_app(context)
context.start_job_server()
app.run(host="127.0.0.1", port=port, threaded=True)
"""

BANNER = re.compile(r"^loading reference data \(MP-20\), (\d) of (\d) · jobs you start now are queued and begin "
                    r"when it is done$")
CELLS = "#wl-cand-table td[data-dash-column=formula]"


@needs_chromium
def test_the_warm_up_line_shows_what_loads_then_hides(mp20_al_ca_cu, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from wyckoff_lab.app.commands.app import wait_until_up

    port, gate = free_port(), tmp_path / "gate"
    env = dict(os.environ, WYCKOFF_LAB_DATA=str(mp20_al_ca_cu), WYCKOFF_LAB_CACHE=str(tmp_path / "cache"),
               WYCKOFF_LAB_MODELS=str(tmp_path / "no-models"), OMP_NUM_THREADS="1")
    log_path = tmp_path / "app.log"
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-c", SERVE_WITH_HELD_WARM_UP, str(port), str(gate)], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    driver = start_browser(tmp_path / "profile", console_log=True)
    banner = lambda: driver.find_element(By.ID, "wl-warmup")
    banner_text = lambda: driver.find_element(By.ID, "wl-warmup-text").text
    rows = lambda: driver.find_elements(By.CSS_SELECTOR, CELLS)
    try:
        url = f"http://127.0.0.1:{port}/"
        assert wait_until_up(url, 120), log_path.read_text()[-3000:]
        driver.get(url)
        wait = WebDriverWait(driver, 240, poll_frequency=0.2)
        wait.until(page_interactive)
        # The job server has loaded the generators and now waits at the reference data, for as long as the gate
        # stays shut: the line must say so.
        t0 = time.perf_counter()
        wait.until(lambda d: BANNER.match(banner_text()))
        shown_s = time.perf_counter() - t0
        step, steps = map(int, BANNER.match(banner_text()).groups())
        assert (step, steps) == (2, 4) and banner().is_displayed(), banner_text()

        driver.find_element(By.CSS_SELECTOR, "button[id*='\"el\":\"Cu\"']").click()
        wait.until(lambda d: "Chemical system Cu," in d.find_element(By.ID, "wl-chem-summary").text)
        driver.find_element(By.ID, "wl-gen-run").click()
        time.sleep(3)  # a job that did not wait in the queue would have its 4 rows by now
        assert not rows() and BANNER.match(banner_text()) and banner().is_displayed(), banner_text()
        assert driver.find_element(By.ID, "wl-gen-run").get_attribute("disabled"), "Generate is not running"

        gate.touch()
        t1 = time.perf_counter()
        wait.until(lambda d: not banner().is_displayed())
        hidden_s = time.perf_counter() - t1
        assert driver.find_element(By.ID, "wl-warmup-text").get_attribute("textContent") == ""  # (.text: shown only)
        wait.until(lambda d: len(rows()) == 4)  # the queued job ran once loading was done
        assert "4 candidates from pyxtal" in driver.find_element(By.ID, "wl-gen-status").text
        assert not banner().is_displayed()
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        assert "Traceback" not in log_path.read_text(), log_path.read_text()[-3000:]
        print(f"line seen {shown_s:.1f} s after the page was interactive; hidden {hidden_s:.1f} s after the gate "
              f"opened")
    finally:
        gate.touch()  # (a held job server would otherwise wait for its app's end to notice)
        driver.quit()
        stop_process(process)
        log.close()
