"""The app's security model, tested as an attacker would: HTTP requests to the running `wyckoff-lab app` on
127.0.0.1 that try to kill processes, use invented or foreign sessions, come through a foreign Host name, or make
the server draw a structure it never made; and the app's clean-up of its work folder on SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymatgen.core import Lattice, Structure

APP_START_S = 120


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(home: Path, data: Path, tmpdir: Path | None = None) -> tuple[subprocess.Popen, int]:
    """`wyckoff-lab app` in a subprocess (CHGNet, no MatterSim download probe); returns it and its port."""
    from wyckoff_lab.app.commands.app import wait_until_up

    port = _free_port()
    env = dict(os.environ, WYCKOFF_LAB_DATA=str(data), WYCKOFF_LAB_CACHE=str(home / "cache"), OMP_NUM_THREADS="1")
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    log = open(home / "app.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("wyckoff-lab")), "app", "--no-browser", "--port", str(port),
         "--potential", "chgnet", "--generator", "pyxtal"], env=env, stdout=log, stderr=subprocess.STDOUT)
    if not wait_until_up(f"http://127.0.0.1:{port}/", APP_START_S):
        process.kill()
        pytest.fail("the app did not start:\n" + (home / "app.log").read_text())
    return process, port


@pytest.fixture(scope="module")
def server(mp20_al_ca_cu, tmp_path_factory):
    home = tmp_path_factory.mktemp("secure-app")
    process, port = _start_app(home, mp20_al_ca_cu)
    yield process, port, home / "app.log"
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


def _request(port: int, method: str, path: str, body=None, host: str | None = None, timeout: float = 60):
    """(status, body text) of one request; `host` sets the Host header as a rebinding page's browser would."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Host": host or f"127.0.0.1:{port}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    connection.request(method, path, body=data, headers=headers)
    response = connection.getresponse()
    text = response.read().decode(errors="replace")
    connection.close()
    return response.status, text


@pytest.fixture(scope="module")
def dependencies(server):
    _, port, _ = server
    status, text = _request(port, "GET", "/_dash-dependencies")
    assert status == 200
    return json.loads(text)


def _issued_session(port: int) -> str:
    """The session id the server puts into a fresh page (what a browser tab gets)."""
    status, text = _request(port, "GET", "/_dash-layout")
    assert status == 200
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("props", {}).get("id") == "wl-session":
                found.append(node["props"]["data"]["sid"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(json.loads(text))
    return found[0]


def _callback_body(dependencies, output_prefix: str, values: dict) -> dict:
    """A callback request as the browser builds it, for the callback whose output starts with `output_prefix` and
    whose inputs include every `values` key it names first; unnamed inputs and states are None."""
    def spec_of(dep):
        return {f"{i['id']}.{i['property']}" for i in dep["inputs"]}

    first_input = next(iter(values))
    dep = next(d for d in dependencies if d["output"].strip(".").startswith(output_prefix)
               and first_input in spec_of(d))
    outputs = [{"id": o.split(".")[0], "property": o.split(".")[1].split("@")[0]}
               for o in dep["output"].strip(".").split("...")]

    def items(specs):
        return [{"id": s["id"], "property": s["property"], "value": values.get(f"{s['id']}.{s['property']}")}
                for s in specs]

    return {"output": dep["output"], "outputs": outputs if len(outputs) > 1 else outputs[0],
            "inputs": items(dep["inputs"]), "state": items(dep["state"]), "changedPropIds": [first_input]}


# -- who may stop what ------------------------------------------------------------------------------------------------


def test_no_client_can_make_the_app_kill_a_process(server, dependencies):
    """cancelJob / oldJob / job carrying a pid the app did not start (an unrelated process, the server itself)
    are refused: Dash's own manager would kill them."""
    process, port, log = server
    victim = subprocess.Popen(["sleep", "300"])
    sid = _issued_session(port)
    try:
        attacks = []
        for cancel in ("wl-gen-cancel", "wl-hull-cancel", "wl-relax-cancel"):
            # Dash's own cancel callback (output `<button>.id`) and ours (the status / revision outputs)
            for dep in dependencies:
                if f"{cancel}.n_clicks" in {f"{i['id']}.{i['property']}" for i in dep["inputs"]}:
                    body = _callback_body([dep], dep["output"].strip(".").split(".")[0],
                                          {f"{cancel}.n_clicks": 1, "wl-session.data": {"sid": sid}})
                    attacks.append((body, "cancelJob"))
        assert len(attacks) >= 6
        generate = _callback_body(dependencies, "wl-revision.data", {"wl-gen-run.n_clicks": 1,
                                                                       "wl-session.data": {"sid": sid}})
        attacks.append((generate, "oldJob"))
        for pid in (victim.pid, process.pid, "not-a-pid"):
            for body, parameter in attacks:
                status, text = _request(port, "POST", f"/_dash-update-component?{parameter}={pid}", body)
                assert status in (200, 204), text[:300]
            # polling a "finished" job with this pid (Dash stops a job whose result has come)
            status, _ = _request(port, "POST", f"/_dash-update-component?cacheKey=x&job={pid}", generate)
            assert status in (200, 204, 500)
        time.sleep(0.5)
        assert victim.poll() is None, "the app killed a process it did not start"
        assert process.poll() is None, "the app killed itself"
        assert _request(port, "GET", "/")[0] == 200
        assert "refused to stop process" in log.read_text()
    finally:
        victim.kill()
        victim.wait()


def test_a_job_is_stopped_only_for_the_session_that_started_it(tmp_path):
    """The manager stops a job it started when the owning session asks, never when another session asks."""
    import diskcache

    from flask import Flask
    from wyckoff_lab.widgets.context import WarmDiskcacheManager
    from wyckoff_lab.widgets.state import new_session_id

    manager = WarmDiskcacheManager(diskcache.Cache(str(tmp_path / "jobs")))  # no warm-up: jobs fork at once
    flask_app = Flask(__name__)
    owner, other = new_session_id(), new_session_id()

    def body(sid):
        return {"inputs": [{"id": "wl-run", "property": "n_clicks", "value": 1}],
                "state": [{"id": "wl-session", "property": "data", "value": {"sid": sid}}]}

    with flask_app.test_request_context("/_dash-update-component", method="POST", json=body(owner)):
        pid = manager.call_job_fn("key", _sleep_job, (), {})
    assert manager.job_running(pid)
    for request in (body(other), body("forged." + "0" * 58), {"inputs": []}):
        with flask_app.test_request_context("/_dash-update-component", method="POST", json=request):
            manager.terminate_job(pid)
        assert manager.job_running(pid), f"stopped for {request}"
    with flask_app.test_request_context("/_dash-update-component", method="POST", json=body(owner)):
        manager.terminate_job(pid)
    deadline = time.monotonic() + 10
    while manager.job_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not manager.job_running(pid)
    assert manager.started_job(os.getpid()) is None  # the server is no job of its own


def _sleep_job(key, progress_key, args, context):
    time.sleep(60)


# -- sessions ---------------------------------------------------------------------------------------------------------


def test_only_session_ids_the_server_issued_are_accepted(server, dependencies):
    _, port, _ = server
    from wyckoff_lab.widgets.security import session_id_is_valid

    issued = _issued_session(port)
    assert issued != _issued_session(port)  # each page load (each tab) its own
    table = "wl-cand-table.data"
    ok, text = _request(port, "POST", "/_dash-update-component",
                        _callback_body(dependencies, "wl-cand-table.data", {"wl-revision.data": "r1",
                                                                             "wl-session.data": {"sid": issued}}))
    assert ok == 200, text[:300]
    nonce = issued[:32]
    for forged in ("tab-1", "0" * 32, f"{nonce}.{'0' * 32}", "x" * 1_000_000, 12, ["a"]):
        body = _callback_body(dependencies, "wl-cand-table.data", {"wl-revision.data": "r1",
                                                                    "wl-session.data": {"sid": forged}})
        status, text = _request(port, "POST", "/_dash-update-component", body)
        assert status == 403 and "reload the page" in text, (str(forged)[:40], status, text[:200])
        assert not session_id_is_valid(forged)
    assert table  # the candidates of an issued session are readable; no forged id ever reached the store


def test_the_store_refuses_ids_it_did_not_issue(tmp_path):
    from wyckoff_lab.widgets.security import UntrustedInputError
    from wyckoff_lab.widgets.state import SessionStore, new_session_id

    store = SessionStore(str(tmp_path / "sessions"))
    sid = new_session_id()
    store.set(sid, "x", 1)
    assert store.get(sid, "x") == 1
    for forged in ("tab", sid[:-1] + ("0" if sid[-1] != "0" else "1"), "a" * 10**6, None):
        with pytest.raises(UntrustedInputError):
            store.candidates(forged)
    store.close()


# -- Host header ------------------------------------------------------------------------------------------------------


def test_only_local_host_names_are_served(server):
    _, port, _ = server
    for host in ("evil.example", "evil.example:80", f"attacker.test:{port}", "127.0.0.2"):
        status, text = _request(port, "GET", "/", host=host)
        assert status == 403 and "host name" in text, host
        status, _ = _request(port, "POST", "/_dash-update-component", {"output": "x"}, host=host)
        assert status == 403
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert _request(port, "GET", "/", host=host)[0] == 200, host


def test_allowed_host_names_follow_the_bound_address(monkeypatch):
    import socket

    from wyckoff_lab.widgets.context import ALLOWED_HOSTS_ENV, LabSettings
    from wyckoff_lab.widgets.security import allowed_host_names, host_name

    monkeypatch.setenv(ALLOWED_HOSTS_ENV, "hub.example, proxy.lan")
    assert {"hub.example", "proxy.lan", "localhost"} <= LabSettings().allowed_hosts
    monkeypatch.delenv(ALLOWED_HOSTS_ENV)
    assert LabSettings().allowed_hosts == {"127.0.0.1", "localhost", "::1"}

    assert allowed_host_names("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert "192.168.1.5" in allowed_host_names("192.168.1.5") and "lab.local" in allowed_host_names(
        "127.0.0.1", ["lab.local"])
    assert socket.gethostname().lower() in allowed_host_names("0.0.0.0")
    assert host_name("[::1]:8050") == "::1" and host_name("LocalHost:80") == "localhost" and host_name("a.b") == "a.b"


# -- the 3D view ------------------------------------------------------------------------------------------------------


def test_the_view_draws_only_structures_the_server_made(server, dependencies):
    """A posted 2,048-atom structure is not drawn (it took 17 s of server CPU); a payload the server signed is."""
    _, port, _ = server
    from wyckoff_lab.widgets.structure_view import structure_payload

    big = Structure(Lattice.cubic(40.0), ["Cu"] * 2048,
                    [[i / 16, j / 16, k / 8] for i in range(16) for j in range(16) for k in range(8)])
    posted = {"structure": big.as_dict(), "title": "mine", "source": "attacker"}
    forged = {**structure_payload(big, "mine", "attacker"), "title": "changed after signing"}
    for payload in (posted, forged):
        body = _callback_body(dependencies, "CTwl-view-ct.data", {"wl-structure.data": payload})
        started = time.perf_counter()
        status, text = _request(port, "POST", "/_dash-update-component", body)
        assert status == 200 and time.perf_counter() - started < 5
        assert "did not come from this app" in text and "Cu" not in json.loads(text)["response"].get(
            "CTwl-view-ct", {}).get("data", "")


def test_signed_payloads_survive_the_browser_round_trip():
    from wyckoff_lab.widgets.security import payload_is_signed, sign_payload

    payload = sign_payload({"structure": {"lattice": [[1.0, 0.0, 0.0]], "charge": 0.0}, "title": "NaCl"})
    # JavaScript sends 1.0 back as 1 and may reorder keys
    back = json.loads(json.dumps(payload).replace("1.0", "1").replace("0.0", "0"))
    assert payload_is_signed(back) and payload_is_signed(dict(reversed(list(back.items()))))
    assert not payload_is_signed({**back, "title": "KCl"}) and not payload_is_signed({"title": "NaCl"})
    assert not payload_is_signed("text") and not payload_is_signed({**back, "signature": 3})


# -- the work folder --------------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_stale_work_folders_are_removed(tmp_path):
    from wyckoff_lab.widgets.context import OWNER_FILE, WORK_DIR_PREFIX, remove_stale_work_dirs

    stale, alive, fresh = (tmp_path / f"{WORK_DIR_PREFIX}{name}" for name in ("stale", "alive", "fresh"))
    for folder in (stale, alive, fresh):
        folder.mkdir()
    (stale / OWNER_FILE).write_text(str(_dead_pid()))
    (alive / OWNER_FILE).write_text(str(os.getppid()))
    assert remove_stale_work_dirs(tmp_path) == [stale]
    assert alive.is_dir() and fresh.is_dir()  # a live owner, or one still being made, keeps its folder
    old = time.time() - 2 * 24 * 3600
    os.utime(fresh, (old, old))
    assert remove_stale_work_dirs(tmp_path) == [fresh]


def test_sigterm_removes_the_session_folder(mp20_al_ca_cu, tmp_path):
    """Killed with SIGTERM, the app removes its session folder; the next start removes a stale one."""
    from wyckoff_lab.widgets.context import OWNER_FILE, WORK_DIR_PREFIX

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    stale = tmpdir / f"{WORK_DIR_PREFIX}left-by-a-kill"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(str(_dead_pid()))
    process, port = _start_app(tmp_path, mp20_al_ca_cu, tmpdir)
    try:
        ours = [f for f in tmpdir.glob(f"{WORK_DIR_PREFIX}*")]
        assert not stale.exists() and len(ours) == 1
        assert (ours[0] / OWNER_FILE).read_text() == str(process.pid) and (ours[0] / "sessions").is_dir()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert not ours[0].exists(), (tmp_path / "app.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
