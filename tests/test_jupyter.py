"""Jupyter: the Explorer and a widget shown alone behind a real jupyter-server-proxy (JupyterHub's /proxy/PORT/
route), and the Explorer at notebook width.

A real `jupyter server` with a token runs in a temporary folder; the Explorer is shown the way a notebook cell
shows it (`Explorer(port=...).show()`, its path prefix from WYCKOFF_LAB_PATH_PREFIX) in another process; headless
Chromium opens http://127.0.0.1:JPORT/proxy/APORT/?token=... and must get past "Loading…" with every request
under the prefix. The same page, at 900 and 1000 px wide, must not overlap the 3D scene with the Relax panel. A
single widget's `show()` goes the same way (its page and scripts under the prefix, over real HTTP and through the
proxy in Chromium).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from app_timing import free_port, page_interactive, start_browser, stop_process

from wyckoff_lab.widgets.jupyter import HUB_PREFIX_ENV, PATH_PREFIX_ENV, checked_prefix, hub_host_names, path_prefix

needs_chromium = pytest.mark.needs_chromium

SHOW_EXPLORER = """
import sys
from wyckoff_lab.widgets import Explorer, LabContext, LabSettings

context = LabContext(LabSettings(default_generator="pyxtal", potential="chgnet", relax_max_steps=20))
explorer = Explorer(elements=["Al", "Ca", "Cu"], port=int(sys.argv[1]), context=context)
explorer.show()
print("BROWSER_URL", explorer.browser_url, "URL", explorer.url, flush=True)
sys.stdin.read()  # serve until the test closes stdin
"""


def test_path_prefix_comes_from_argument_then_environment():
    """The argument wins, then WYCKOFF_LAB_PATH_PREFIX ({port} filled in), then JupyterHub's service prefix +
    proxy/PORT/; no variable: no prefix (direct URL). Malformed prefixes are refused with the reason."""
    hub = {HUB_PREFIX_ENV: "/user/ana/"}
    assert path_prefix(8123, environ={}) is None
    assert path_prefix(8123, environ=hub) == "/user/ana/proxy/8123/"
    assert path_prefix(8123, environ={**hub, PATH_PREFIX_ENV: "/lab/{port}"}) == "/lab/8123/"
    assert path_prefix(8123, "/mine/", environ={**hub, PATH_PREFIX_ENV: "/lab/{port}/"}) == "/mine/"
    for bad in ("proxy/8123/", "http://evil.example/", "/a b/", "/x/{host}/", '/"><script>/'):
        with pytest.raises(ValueError, match="path prefix"):
            path_prefix(8123, bad, environ={})
    with pytest.raises(ValueError, match="must be a URL path"):
        checked_prefix("relative/")
    assert hub_host_names({"JUPYTERHUB_PUBLIC_URL": "https://hub.example.org:8443/", "JUPYTERHUB_PUBLIC_HUB_URL": ""}
                          ) == {"hub.example.org"}
    assert hub_host_names({}) == frozenset()


def test_dash_app_takes_the_prefix_and_the_port_in_use_is_refused():
    """A Dash app built inside `dash_requests_prefix` requests everything under the prefix (the environment is
    left as it was); a server on a port already taken fails with the reason, not a bare OSError."""
    import socket

    from dash import Dash, html

    from wyckoff_lab.widgets.jupyter import DASH_PREFIX_ENV, ThreadedServer, dash_requests_prefix

    assert DASH_PREFIX_ENV not in os.environ
    with dash_requests_prefix("/user/ana/proxy/8123/"):
        app = Dash(__name__)
    assert DASH_PREFIX_ENV not in os.environ
    app.layout = html.Div("x")
    assert app.config.requests_pathname_prefix == "/user/ana/proxy/8123/"
    assert app.config.routes_pathname_prefix == "/"  # the proxy strips the prefix before forwarding
    index = app.server.test_client().get("/").get_data(as_text=True)
    assert '"/user/ana/proxy/8123/_dash-component-suites/' in index and 'src="/_dash' not in index
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="cannot serve on 127.0.0.1"):
            ThreadedServer(app, taken.getsockname()[1])


def test_create_app_takes_a_path_prefix():
    """`create_app(path_prefix=...)` (the app behind a reverse proxy that strips the prefix) and its refusal."""
    from wyckoff_lab.widgets import LabContext, LabSettings, create_app

    context = LabContext(LabSettings(warm_up=False))
    app = create_app(context, path_prefix="/lab")
    assert (app.config.requests_pathname_prefix, app.config.routes_pathname_prefix) == ("/lab/", "/")
    with pytest.raises(ValueError, match="must be a URL path"):
        create_app(context, path_prefix="lab/")


def test_explorer_port_is_checked():
    from wyckoff_lab.widgets.explorer import Explorer

    for bad in (0, 70000, "8050"):
        with pytest.raises(ValueError, match="port must be an integer"):
            Explorer(port=bad, context=object())


def _get(url: str, headers=None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.read().decode()


def _shown_in_notebook(monkeypatch) -> list:
    """What `show` puts in the notebook's output (IPython's `display` outside a kernel prints only a repr)."""
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    return shown


def test_a_widget_shown_alone_serves_its_page_and_scripts_under_the_prefix(tmp_path, monkeypatch):
    """TeachView.show(port, path_prefix) as a notebook cell runs it: its own server on 127.0.0.1:port, an iframe at
    the prefix, a page whose every script (Dash's, Crystal Toolkit's) is requested under the prefix and is served at
    the stripped path (what jupyter-server-proxy forwards); shown again, the same server; another port is refused."""
    from wyckoff_lab.widgets import LabContext, LabSettings, TeachView

    shown = _shown_in_notebook(monkeypatch)
    context = LabContext(LabSettings(warm_up=False, work_dir=tmp_path / "work"))
    port = free_port()
    view = TeachView(context=context)
    app = view.show(port=port, height=480, path_prefix="/hub/proxy/{port}")
    try:
        prefix = f"/hub/proxy/{port}/"
        assert (view.url, view.browser_url) == (f"http://127.0.0.1:{port}/", prefix)
        assert app.config.requests_pathname_prefix == prefix and app.config.routes_pathname_prefix == "/"
        assert [(type(f).__name__, f.src, f.height) for f in shown] == [("IFrame", prefix, 480)]
        status, index = _get(view.url)
        config = json.loads(re.search(r'<script id="_dash-config" type="application/json">(.*?)</script>', index,
                                      re.S).group(1))
        scripts = re.findall(r'<script src="([^"]+)"', index)
        # Stylesheets: Dash's under the prefix, Crystal Toolkit's relative to the page (so under it too).
        styles = [href if href.startswith("/") else prefix + href
                  for href in re.findall(r'<link rel="stylesheet" href="([^"]+)"', index)]
        assert status == 200 and config["requests_pathname_prefix"] == prefix
        assert len(scripts) > 5 and all(src.startswith(prefix) for src in scripts + styles), (scripts, styles)
        assert any("_dash-component-suites/dash/" in src for src in scripts), scripts
        assert any("dash_mp_components" in src for src in scripts), scripts  # Crystal Toolkit's 3D scene
        assert any("wl-static/ct/" in href for href in styles), styles
        for src in scripts + styles:
            status, body = _get(view.url + src[len(prefix):])
            assert status == 200 and len(body) > 100, src
        _, layout = _get(view.url + "_dash-layout")
        _, dependencies = _get(view.url + "_dash-dependencies")
        assert '"wl-teach-group"' in layout and "wl-teach-" in dependencies and '"wl-warmup-text"' in layout
        assert view.show() is app and shown[-1].src == prefix  # the running server, shown again
        with pytest.raises(ValueError, match="already served on port"):
            view.show(port=free_port())
        with pytest.raises(ValueError, match="mode must be one of"):
            view.show(mode="jupyterlab")
    finally:
        view.server.stop()


@needs_chromium
def test_a_widget_shown_alone_behind_jupyter_server_proxy(jupyter_server, tmp_path, monkeypatch):
    """ChemistryPicker().show() with WYCKOFF_LAB_PATH_PREFIX=/proxy/{port}/, opened through the real proxy in
    Chromium: past "Loading…" (an element clicked, the server's summary answers), every request under the prefix,
    nothing failed, a clean console."""
    pytest.importorskip("jupyter_server_proxy", reason="jupyter-server-proxy is not installed (pip install -e .[test])")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from wyckoff_lab.widgets import ChemistryPicker, LabContext, LabSettings

    jport, token = jupyter_server
    shown = _shown_in_notebook(monkeypatch)
    monkeypatch.setenv(PATH_PREFIX_ENV, "/proxy/{port}/")
    picker = ChemistryPicker(context=LabContext(LabSettings(warm_up=False, work_dir=tmp_path / "work")))
    picker.show()
    aport = picker.server.port
    driver = start_browser(tmp_path / "profile", console_log=True)
    try:
        assert picker.browser_url == f"/proxy/{aport}/" and shown[0].src == picker.browser_url
        driver.get(f"http://127.0.0.1:{jport}{picker.browser_url}?token={token}")
        wait = WebDriverWait(driver, 60, poll_frequency=0.2)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[id*='\"el\":\"Cu\"']"))
        driver.find_element(By.CSS_SELECTOR, "button[id*='\"el\":\"Cu\"']").click()
        wait.until(lambda d: "Chemical system Cu," in d.find_element(By.ID, "wl-chem-summary").text)
        requested, failed = _network(driver)
        served = [u for u in requested if u.startswith(f"http://127.0.0.1:{jport}/")]
        outside = [u for u in served if not u.startswith(f"http://127.0.0.1:{jport}/proxy/{aport}/")]
        assert any("_dash-component-suites" in u for u in served) and any("_dash-update-component" in u for u in served)
        assert not outside, outside
        assert not failed, failed
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
        picker.server.stop()


def _wait(url: str, deadline_s: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{what} never answered at {url}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def jupyter_home(tmp_path_factory):
    """A temporary HOME and Jupyter config/data/runtime folders; the environment the servers run with."""
    home = tmp_path_factory.mktemp("jupyter")
    env = dict(os.environ, HOME=str(home), JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_DATA_DIR=str(home / "data"), JUPYTER_RUNTIME_DIR=str(home / "runtime"), OMP_NUM_THREADS="1")
    env.pop(HUB_PREFIX_ENV, None)
    return home, env


@pytest.fixture(scope="module")
def jupyter_server(jupyter_home):
    """A real `jupyter server` (with every server extension installed here: jupyter-server-proxy, JupyterLab) on
    127.0.0.1 with a token; yields (port, token)."""
    pytest.importorskip("jupyter_server", reason="jupyter-server is not installed (pip install -e .[test])")
    home, env = jupyter_home
    token, port = secrets.token_hex(16), free_port()
    log = open(home / "jupyter.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={home}", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(f"http://127.0.0.1:{port}/api/status?token={token}", 60, "jupyter server", server, home / "jupyter.log")
        yield port, token
    finally:
        stop_process(server)
        log.close()


@pytest.fixture(scope="module")
def proxied_explorer(jupyter_home, jupyter_server, mp20_al_ca_cu):
    """(browser URL through jupyter-server-proxy, Jupyter port, app port, app log)."""
    pytest.importorskip("jupyter_server_proxy", reason="jupyter-server-proxy is not installed (pip install -e .[test])")
    home, env = jupyter_home
    jport, token = jupyter_server
    aport = free_port()
    env = dict(env, WYCKOFF_LAB_DATA=str(mp20_al_ca_cu), WYCKOFF_LAB_CACHE=str(home / "cache"),
               WYCKOFF_LAB_MODELS=str(home / "no-models"), **{PATH_PREFIX_ENV: "/proxy/{port}/"})
    log = open(home / "app.log", "w")
    app = subprocess.Popen([sys.executable, "-c", SHOW_EXPLORER, str(aport)], env=env, stdin=subprocess.PIPE,
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(f"http://127.0.0.1:{aport}/_dash-layout", 90, "the Explorer", app, home / "app.log")
        yield f"http://127.0.0.1:{jport}/proxy/{aport}/?token={token}", jport, aport, home / "app.log"
    finally:
        app.stdin.close()
        stop_process(app)
        log.close()


def test_jupyterlab_wants_no_build(jupyter_server):
    """JupyterLab's build check (what its "Build recommended" / "Build failed" dialogs act on) finds nothing to
    build: Dash's source lab extension, which JupyterLab 4 cannot build without Node.js, is removed by
    `make install` (see Makefile)."""
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (pip install -e .[test])")
    port, token = jupyter_server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab/api/build?token={token}", timeout=60) as response:
        build = json.load(response)
    assert build["status"] != "needed", (
        f"{build}: remove {Path(sys.prefix) / 'share/jupyter/lab/extensions/dash-jupyterlab.tgz'} (README, In Jupyter)")


@needs_chromium
def test_jupyterlab_opens_without_a_build_dialog(jupyter_server, tmp_path):
    """Headless JupyterLab: once its build check has answered, no "Build recommended" dialog is open."""
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (pip install -e .[test])")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port, token = jupyter_server
    driver = start_browser(tmp_path / "profile", console_log=True)
    try:
        driver.get(f"http://127.0.0.1:{port}/lab?token={token}")
        WebDriverWait(driver, 60, poll_frequency=0.25).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Launcher"))
        answered = []
        deadline = time.monotonic() + 30
        while not answered and time.monotonic() < deadline:
            answered = [u for u in _network(driver, all_responses=True)[1] if "/lab/api/build" in u[1]]
            time.sleep(0.25)
        assert answered, "JupyterLab never asked for its build status"
        time.sleep(2)  # the dialog opens as soon as the answer is read
        dialogs = [d.text for d in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog")]
        assert not dialogs, dialogs
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def proxied_page(proxied_explorer, tmp_path_factory):
    """Chromium with the proxied Explorer loaded and interactive; yields (driver, seconds until interactive)."""
    from selenium.webdriver.support.ui import WebDriverWait

    url = proxied_explorer[0]
    driver = start_browser(tmp_path_factory.mktemp("profile"), console_log=True)
    try:
        started = time.perf_counter()
        driver.get(url)
        WebDriverWait(driver, 90, poll_frequency=0.2).until(page_interactive)
        yield driver, time.perf_counter() - started
    finally:
        driver.quit()


def _network(driver, all_responses: bool = False) -> tuple[list[str], list[tuple[int, str]]]:
    """(every URL the page requested, (status, URL) of every response of 400 or more, or of all of them)."""
    requested, failed = [], []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message.get("method") == "Network.requestWillBeSent":
            requested.append(params["request"]["url"])
        elif message.get("method") == "Network.responseReceived" and (
                all_responses or params["response"]["status"] >= 400):
            failed.append((params["response"]["status"], params["response"]["url"]))
    return requested, failed


@needs_chromium
def test_explorer_behind_jupyter_server_proxy(proxied_explorer, proxied_page):
    """Through /proxy/APORT/ the page gets past "Loading…" (periodic table and Generate clickable), every script,
    stylesheet, font and callback goes through the prefix, nothing fails and the console is clean."""
    _url, jport, aport, app_log = proxied_explorer
    driver, interactive_s = proxied_page
    requested, failed = _network(driver)
    served = [u for u in requested if u.startswith(f"http://127.0.0.1:{jport}/")]
    outside = [u for u in served if not u.startswith(f"http://127.0.0.1:{jport}/proxy/{aport}/")]
    assert len(served) > 10, requested  # the page, Dash's scripts, Crystal Toolkit's CSS, callbacks
    assert any("_dash-component-suites" in u for u in served) and any("_dash-update-component" in u for u in served)
    assert not outside, outside
    web = [u for u in requested if u.startswith(("http:", "https:", "ws:", "wss:"))]  # not chrome:// internals
    assert not [u for u in web if not u.startswith("http://127.0.0.1")], web
    assert not failed, failed
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    assert "Traceback" not in app_log.read_text(), app_log.read_text()[-3000:]
    assert interactive_s < 60, interactive_s


LAYOUT_BOXES = """
const box = el => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const scene = document.querySelector('#wl-tab-candidates .wl-scene');
const others = [...document.querySelectorAll('#wl-tab-candidates .wl-relax-column, .wl-sidebar, '
                                             + '#wl-tab-candidates > *:first-child')];
return {scene: box(scene), others: others.map(el => [el.className, box(el)]),
        scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth};
"""


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


@needs_chromium
@pytest.mark.parametrize("width", [900, 1000])
def test_notebook_width_layout(proxied_page, width):
    """At a notebook's width the 3D scene overlaps neither the Relax panel nor any other panel, and the page does
    not scroll sideways."""
    driver, _ = proxied_page
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    try:
        time.sleep(0.5)  # the scene's resize observer redraws
        boxes = driver.execute_script(LAYOUT_BOXES)
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert boxes["innerWidth"] == width, boxes
    assert boxes["scrollWidth"] <= boxes["innerWidth"], boxes
    scene = boxes["scene"]
    assert scene[2] - scene[0] > 250, boxes  # still a usable view
    assert scene[2] <= width, boxes
    for name, other in boxes["others"]:
        assert _overlap(scene, other) < 1, (name, boxes)
