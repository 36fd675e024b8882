"""Measure the app's quality-bar timings the way a user meets them, in headless Chromium.

    WYCKOFF_LAB_DATA=... .venv/bin/python tests/app_timing.py [--runs 3] [--generator wyckoff-transformer]
                                                              [--samples 100] [--startup-only] [--json]

1. startup: seconds from starting `wyckoff-lab app --no-browser` until the page is interactive: the periodic table
   and the Generate button clickable and a generator selected in the dropdown (Generate works from then on).
   Chromium is started first (a user's browser is already open), then the app; the page is requested as soon
   as the server answers.
2. generate: Al, Ca, Cu picked, Generate pressed -> the candidate table shows `--samples` rows.
3. relax: a candidate selected, Relax pressed -> the 3D scene holds the first frame that differs from the structure
   shown before (first_frame_s; first_frame_title_s: the view's title says "step"). Each run generates with a new
   seed, so the relaxation is computed, not read from the relaxation cache.

Each run is a fresh app process on a free port with the default settings (`wyckoff-lab app` with no options but
--no-browser/--port and --samples), so models, reference data and the user cache are what a user has.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-extensions", "--enable-unsafe-swiftshader",
                  "--window-size=1600,1150")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_browser(profile: Path, downloads: Path | None = None, console_log: bool = False):
    """Headless Debian Chromium through chromedriver (shared with the end-to-end test): `downloads` sets where files
    go without a prompt, `console_log` keeps the browser console and network log for reading back."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    if downloads is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def stop_process(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Terminate an app process, killing it if it has not exited after `timeout_s`."""
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()


def wait_for_server(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} never answered")


def page_interactive(driver) -> bool:
    """Element buttons and Generate clickable, a generator chosen: what a user needs to start working."""
    from selenium.webdriver.common.by import By

    try:
        run = driver.find_element(By.ID, "wl-gen-run")
        element = driver.find_element(By.CSS_SELECTOR, "button[id*='\"el\":\"Cu\"']")
        chosen = driver.find_elements(By.CSS_SELECTOR, "#wl-gen-generator .Select-value-label, "
                                                       "#wl-gen-generator .Select__single-value")
        label = driver.find_element(By.ID, "wl-gen-generator").text
    except Exception:
        return False
    return (run.is_displayed() and run.is_enabled() and element.is_displayed() and element.is_enabled()
            and bool(chosen or label) and "loading" not in label.lower())


SCENE_DATA = """try {
    const scene = window.dash_component_api.getLayout('CTwl-view-ct_scene');
    return JSON.stringify(scene.props.data || null);
} catch (e) { return null; }"""


def scene_data(driver) -> str | None:
    """The 3D view's scene as the browser holds it (JSON), to tell when a new frame has reached it."""
    return driver.execute_script(SCENE_DATA)


def one_run(args, driver, env) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [str(Path(sys.executable).with_name("wyckoff-lab")), "app", "--no-browser", "--port", str(port),
               "--samples", str(args.samples)] + (["--generator", args.generator] if args.generator else [])
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    out: dict = {}
    t0 = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_server(url, time.monotonic() + 120)
        out["server_up_s"] = time.perf_counter() - t0
        driver.get(url)
        WebDriverWait(driver, 120, poll_frequency=0.05).until(page_interactive)
        out["interactive_s"] = time.perf_counter() - t0
        out["generator"] = driver.find_element(By.ID, "wl-gen-generator").text.strip()
        if args.reload:  # the same page again on the warm server: what the browser and the callbacks cost
            driver.get("about:blank")
            t_reload = time.perf_counter()
            driver.get(url)
            WebDriverWait(driver, 120, poll_frequency=0.05).until(page_interactive)
            out["reload_interactive_s"] = time.perf_counter() - t_reload
        if args.startup_only:
            return out
        text = lambda element_id: driver.find_element(By.ID, element_id).text
        wait = WebDriverWait(driver, 300, poll_frequency=0.05)
        for symbol in ("Al", "Ca", "Cu"):
            driver.find_element(By.CSS_SELECTOR, f"button[id*='\"el\":\"{symbol}\"']").click()
        wait.until(lambda d: "Ca-Al-Cu" in text("wl-chem-summary"))
        seed = driver.find_element(By.ID, "wl-gen-seed")  # a fresh seed: new candidates, no cached relaxation
        seed.clear()
        seed.send_keys(str(args.seed if args.seed is not None else int(time.time()) % 100000))
        time.sleep(0.5)  # let the chemistry store settle, as a user would
        t1 = time.perf_counter()
        driver.find_element(By.ID, "wl-gen-run").click()
        wait.until(lambda d: f"{args.samples} candidates" in text("wl-cand-summary")
                   or "is-danger" in (d.find_element(By.CSS_SELECTOR, "#wl-gen-status div").get_attribute("class")
                                      if d.find_elements(By.CSS_SELECTOR, "#wl-gen-status div") else ""))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=formula]"))
        out["generate_s"] = time.perf_counter() - t1
        out["generate_status"] = text("wl-gen-status")
        rows = driver.find_elements(By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=formula]")
        rows[1].click()
        wait.until(lambda d: text("wl-view-title").startswith("#2 "))
        time.sleep(0.5)
        wait.until(lambda d: scene_data(d) is not None)
        before = scene_data(driver)
        t2 = time.perf_counter()
        driver.find_element(By.ID, "wl-relax-one").click()
        wait.until(lambda d: "step" in text("wl-view-title"))
        out["first_frame_title_s"] = time.perf_counter() - t2
        wait.until(lambda d: scene_data(d) not in (None, before))
        out["first_frame_s"] = time.perf_counter() - t2
        wait.until(lambda d: "Relax" in text("wl-relax-status"))
        out["relax_done_s"] = time.perf_counter() - t2
        out["relax_status"] = text("wl-relax-status")
        return out
    finally:
        stop_process(process)
        log.seek(0)
        tail = log.read()[-3000:]
        if "Traceback" in tail or sys.exc_info()[0] is not None:
            out["log_tail"] = tail
            print(tail, file=sys.stderr)
        log.close()
        os.unlink(log.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--generator", default=None)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=None, help="generation seed (default: a new one per run)")
    parser.add_argument("--startup-only", action="store_true")
    parser.add_argument("--reload", action="store_true",
                        help="also time a reload of the page once the server is warm")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    results = []
    with tempfile.TemporaryDirectory() as profile:
        driver = start_browser(Path(profile))
        try:
            for i in range(args.runs):
                result = one_run(args, driver, env)
                results.append(result)
                if not args.json:
                    print(f"run {i + 1}: " + json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                                        for k, v in result.items()}), flush=True)
                driver.get("about:blank")
        finally:
            driver.quit()
    keys = [k for k in ("server_up_s", "interactive_s", "reload_interactive_s", "generate_s", "first_frame_title_s",
                        "first_frame_s", "relax_done_s") if all(k in r for r in results)]
    summary = {k: {"median": round(statistics.median(r[k] for r in results), 2),
                   "min": round(min(r[k] for r in results), 2), "max": round(max(r[k] for r in results), 2)}
               for k in keys}
    print(json.dumps({"runs": results, "summary": summary} if args.json else summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
