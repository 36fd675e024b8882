"""End to end: the real `wyckoff-lab app` driven in headless Chromium, the way a user would use it.

Pick Al–Ca–Cu, generate, select a candidate, relax it (frames must stream), open the hull and t-SNE tabs, open
the teaching view, export CIF and extxyz. Fails on any browser console error and on any request that leaves this
machine; saves screenshots (also into $WYCKOFF_LAB_SCREENSHOTS when set, which is how the README's are made).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from app_timing import free_port, start_browser, stop_process

SYSTEM = ("Al", "Ca", "Cu")

needs_chromium = pytest.mark.needs_chromium  # skipped by conftest where Chromium is not installed


@pytest.fixture(scope="module")
def app_url(mp20_al_ca_cu, tmp_path_factory):
    """`wyckoff-lab app` in a subprocess, as the README starts it; yields (url, seconds until it answered)."""
    port = free_port()
    home = tmp_path_factory.mktemp("app")
    env = dict(os.environ, WYCKOFF_LAB_DATA=str(mp20_al_ca_cu), WYCKOFF_LAB_CACHE=str(home / "cache"),
               WYCKOFF_LAB_MODELS=str(home / "no-models"), OMP_NUM_THREADS="1")
    log = open(home / "app.log", "w")
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("wyckoff-lab")), "app", "--no-browser", "--port", str(port),
         "--generator", "pyxtal", "--relax-max-steps", "40", "--samples", "30"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        from wyckoff_lab.app.commands.app import wait_until_up

        assert wait_until_up(url, 120), (home / "app.log").read_text()
        yield url, time.perf_counter() - started, home / "app.log"
    finally:
        stop_process(process)
        log.close()


@pytest.fixture
def browser(tmp_path):
    driver = start_browser(tmp_path / "profile", downloads=tmp_path / "downloads", console_log=True)
    driver.downloads = tmp_path / "downloads"
    yield driver
    driver.quit()


def _shot(driver, name: str, tmp_path: Path) -> None:
    driver.save_screenshot(str(tmp_path / f"{name}.png"))
    target = os.environ.get("WYCKOFF_LAB_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(target) / f"{name}.png"))


def _scene_fill(driver, scene_id: str = "CTwl-view-ct_scene") -> float:
    """How much of the 3D view the drawn structure spans (the larger of its width and height fractions), leaving
    out the scene's buttons (right edge), its compass (bottom left), its legend (bottom) and the frame."""
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.CSS_SELECTOR, f"#{scene_id} canvas")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    image = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB")).astype(int)
    drawn = np.abs(image - image[4, 4]).sum(axis=2) > 30
    height, width = drawn.shape
    drawn[:, int(0.86 * width):] = drawn[int(0.84 * height):, :] = False
    drawn[:3, :] = drawn[:, :3] = False
    ys, xs = np.nonzero(drawn)
    if not len(xs):
        return 0.0
    return max((xs.max() - xs.min() + 1) / width, (ys.max() - ys.min() + 1) / (0.84 * height))


# The 3D scene as the browser holds it: a new relaxation frame has reached the view when this changes.
SCENE_DATA = ("try { return JSON.stringify(window.dash_component_api.getLayout('CTwl-view-ct_scene').props.data); }"
              " catch (e) { return null; }")


def _console_errors(driver) -> list[str]:
    return [f"{e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _remote_requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            remote = url.startswith(("http:", "https:", "ws:", "wss:")) and not url.startswith("http://127.0.0.1")
            if remote:
                urls.append(url)
    return urls


@needs_chromium
def test_full_workflow_in_chromium(app_url, browser, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, server_seconds, app_log = app_url
    wait = WebDriverWait(browser, 240)
    text = lambda element_id: browser.find_element(By.ID, element_id).text
    timings = {"server_up_s": server_seconds}

    t0 = time.perf_counter()
    browser.get(url)
    wait.until(ec.element_to_be_clickable((By.ID, "wl-gen-run")))
    wait.until(lambda d: "pyxtal" in text("wl-gen-generator"))
    timings["page_interactive_s"] = time.perf_counter() - t0
    # The options row holds PyXtal's declared options, and no ranking (PyXtal has no likelihood)
    wait.until(lambda d: "Volume factor" in text("wl-gen-options"))
    assert "Keep most likely" not in text("wl-gen-options")

    # 1. chemistry
    for symbol in SYSTEM:
        browser.find_element(By.CSS_SELECTOR, f'button[id*=\'"el":"{symbol}"\']').click()
    wait.until(lambda d: "Ca-Al-Cu" in text("wl-chem-summary"))
    wait.until(lambda d: "fits" in text("wl-sym-verdict") or "Any space group" in text("wl-sym-verdict"))

    # 3. generate (the form is preset to 30 samples by --samples)
    t0 = time.perf_counter()
    browser.find_element(By.ID, "wl-gen-run").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=formula]"))
    timings["generate_30_s"] = time.perf_counter() - t0
    assert "30 candidates from pyxtal" in text("wl-gen-status"), text("wl-gen-status")
    rows = browser.find_elements(By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=formula]")
    _shot(browser, "candidates", tmp_path)

    # 4–5. select the second candidate: it appears in the 3D view with its orbit table
    rows[1].click()
    wait.until(lambda d: text("wl-view-title").startswith("#2 "))
    wait.until(lambda d: browser.find_elements(By.CSS_SELECTOR, "#wl-view-orbits td"))
    # the structure fills the view (Crystal Toolkit's own framing left some at a tenth of it)
    fills = []
    try:
        WebDriverWait(browser, 20, poll_frequency=0.5).until(lambda d: fills.append(_scene_fill(d)) or fills[-1] >= 0.6)
    except TimeoutException:
        raise AssertionError(f"the structure spans at most {max(fills, default=0):.2f} of the 3D view") from None
    browser.find_element(By.XPATH, "//*[@id='wl-view-colour']//label[contains(., 'Wyckoff orbit')]").click()

    # 6. relax: frames stream into the 3D view before the relaxation ends
    wait.until(lambda d: d.execute_script(SCENE_DATA))
    time.sleep(1)  # the colour change has reached the scene
    before = browser.execute_script(SCENE_DATA)
    t0 = time.perf_counter()
    browser.find_element(By.ID, "wl-relax-one").click()
    wait.until(lambda d: "step" in text("wl-view-title"))
    wait.until(lambda d: d.execute_script(SCENE_DATA) not in (None, before))
    timings["first_relax_frame_s"] = time.perf_counter() - t0
    wait.until(lambda d: "Relax" in text("wl-relax-status"))
    assert "#2" in text("wl-relax-status"), text("wl-relax-status")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#wl-relax-curve .main-svg"))  # the curve was mounted
    wait.until(lambda d: any(c.text.strip() for c in
                             d.find_elements(By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=relax_status]")))
    _shot(browser, "relaxation", tmp_path)

    # cancel "Relax all" while it runs: the job stops, the buttons come back, the page says what is kept
    browser.find_element(By.ID, "wl-relax-all").click()
    wait.until(lambda d: d.find_element(By.ID, "wl-relax-cancel").is_enabled())
    time.sleep(1.0)
    browser.find_element(By.ID, "wl-relax-cancel").click()
    wait.until(lambda d: "cancelled" in text("wl-relax-status"))
    wait.until(lambda d: d.find_element(By.ID, "wl-relax-all").is_enabled())
    assert "candidates are relaxed" in text("wl-relax-status"), text("wl-relax-status")
    relaxed = [c.text for c in browser.find_elements(By.CSS_SELECTOR,
                                                       "#wl-cand-table td[data-dash-column=relax_status]")]
    assert any(relaxed), relaxed  # what was relaxed before the cancel is still shown

    # 7. hull tab: nothing is built on opening it; "Build hull" relaxes the references (40 steps each here)
    browser.find_element(By.XPATH, "//div[contains(@class,'wl-tab') and normalize-space()='Hull']").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#wl-hull-diagram .main-svg"))
    assert "No hull yet" in text("wl-hull-diagram")
    wait.until(ec.element_to_be_clickable((By.ID, "wl-hull-build"))).click()
    WebDriverWait(browser, 300).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#wl-hull-diagram .ternarylayer")
        and "No hull yet" not in text("wl-hull-diagram"))
    time.sleep(1.0)  # let the labels settle before the screenshot
    _shot(browser, "hull", tmp_path)

    # 8. embeddings tab: the candidate map is computed when the tab opens
    browser.find_element(By.XPATH, "//div[contains(@class,'wl-tab') and normalize-space()='Embeddings']").click()
    wait.until(lambda d: "candidates and" in (d.find_element(By.CSS_SELECTOR, "#wl-emb-candidates .gtitle").text
                                              if d.find_elements(By.CSS_SELECTOR, "#wl-emb-candidates .gtitle")
                                              else ""))
    wait.until(lambda d: text("wl-emb-model-message"))
    _shot(browser, "embeddings", tmp_path)

    # 9. teach: the default 8g of Pm-3m; moving x to 0 collapses the copies
    browser.find_element(By.XPATH, "//div[contains(@class,'wl-tab') and normalize-space()='Teach']").click()
    wait.until(lambda d: "multiplicity 8" in text("wl-teach-info"))
    handle = browser.find_element(By.CSS_SELECTOR, "#wl-teach-x .rc-slider-handle")
    handle.send_keys(Keys.HOME)
    wait.until(lambda d: "collapse" in text("wl-teach-info"))
    _shot(browser, "teach", tmp_path)

    # 10. export: all as CIF zip, the selected one as extxyz
    browser.find_element(By.XPATH, "//div[contains(@class,'wl-tab') and normalize-space()='Candidates']").click()
    wait.until(ec.element_to_be_clickable((By.ID, "wl-cand-cif-all"))).click()
    wait.until(lambda d: list(browser.downloads.glob("*.zip")))
    browser.find_element(By.ID, "wl-cand-xyz-selected").click()
    wait.until(lambda d: list(browser.downloads.glob("*.extxyz")))
    time.sleep(0.5)  # let Chromium finish writing
    (archive,) = browser.downloads.glob("*.zip")
    names = zipfile.ZipFile(archive).namelist()
    assert "candidates.json" in names and sum(n.endswith(".cif") for n in names) >= len(rows)
    assert any("_relaxed" in n and n.endswith(".cif") for n in names)  # <stem>_relaxed_sg<M>.cif
    (frames,) = browser.downloads.glob("*.extxyz")
    assert "wyckoff_lab" in frames.read_text()

    print("\nquality bar timings:", json.dumps({k: round(v, 2) for k, v in timings.items()}))
    # Generous bounds (the bar is 10 s from the command and 2 s per frame on an idle 2-core machine; the suite
    # runs beside other work): they catch a page that waits for every model again, or frames that queue behind
    # CrystalNN, not a slow machine.
    assert timings["page_interactive_s"] < 15, timings
    assert timings["first_relax_frame_s"] < 8, timings
    assert not _console_errors(browser), _console_errors(browser)
    assert not _remote_requests(browser), _remote_requests(browser)
    assert "Traceback" not in app_log.read_text(), app_log.read_text()[-3000:]


@needs_chromium
def test_the_discover_button_runs_the_funnel_in_the_real_app(app_url, browser):
    """Al, Cu picked, a budget of 0.2 min and 3 samples per generator, Discover pressed: the progress line names
    the stages, the table fills with ranked candidates, some relaxed and placed on the hull; the page stays clean."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, log = app_url
    browser.get(url)
    wait = WebDriverWait(browser, 240, poll_frequency=0.1)
    text = lambda element_id: browser.find_element(By.ID, element_id).text
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#wl-disc-generators input"))
    for symbol in ("Al", "Cu"):
        browser.find_element(By.CSS_SELECTOR, f"button[id*='\"el\":\"{symbol}\"']").click()
    wait.until(lambda d: "Al-Cu" in text("wl-chem-summary"))
    from selenium.webdriver.common.keys import Keys

    for element_id, value in (("wl-disc-budget", "0.2"), ("wl-disc-samples", "3")):
        field = browser.find_element(By.ID, element_id)
        field.send_keys(Keys.CONTROL, "a")  # (clear() is undone by React re-rendering the preset value)
        field.send_keys(value)
        wait.until(lambda d, field=field, value=value: field.get_attribute("value") == value)
    time.sleep(0.5)
    browser.find_element(By.ID, "wl-disc-run").click()
    seen = set()

    def finished(driver):
        label = text("wl-disc-progress-label")
        seen.update(stage for stage in ("sampling", "pre-screening", "relaxing the best first") if stage in label)
        return "pooled" in text("wl-disc-status") or "is-danger" in driver.find_element(
            By.ID, "wl-disc-status").get_attribute("innerHTML")

    try:
        wait.until(finished)
    except Exception:
        raise AssertionError(f"Discover never finished: progress {text('wl-disc-progress-label')!r}, status "
                             f"{text('wl-disc-status')!r}; app log: {log.read_text()[-3000:]}") from None
    status = text("wl-disc-status")
    assert "pooled" in status and "relaxed with chgnet" in status, status
    assert {"sampling", "relaxing the best first"} <= seen, seen
    rows = browser.find_elements(By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=formula]")
    assert rows
    cells = browser.find_elements(By.CSS_SELECTOR, "#wl-cand-table td[data-dash-column=e_above_hull]")
    hull = [cell.text for cell in cells]
    assert any(value.strip() for value in hull), hull
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe
    assert "Traceback" not in log.read_text()



def test_notebook_embeds_the_explorer(mp20_al_ca_cu, tmp_path, monkeypatch):
    """tests/notebooks/explorer.ipynb runs headless: the Explorer and a lone StructureView display inline (an iframe
    each) and their servers answer."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    monkeypatch.setenv("WYCKOFF_LAB_DATA", str(mp20_al_ca_cu))
    monkeypatch.setenv("WYCKOFF_LAB_MODELS", str(tmp_path / "no-models"))
    notebook = nbformat.read(Path(__file__).parent / "notebooks" / "explorer.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    html = [output.get("data", {}).get("text/html", "") for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", [])]
    assert sum("<iframe" in h for h in html) == 2, html
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
