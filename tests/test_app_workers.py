"""Background jobs run in processes forked by the single-threaded job server: none inherits a held lock, a job asked
for during warm-up is queued (the request returns at once) and completes, and twenty hull builds in a row complete.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from wyckoff_lab.widgets.context import JOB_SERVER_NICENESS

CONTEXT = None  # the context the job functions below use (set before the job server is forked: it inherits it)


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def _threads_job(key, progress_key, args, context):
    """Reports what the job process sees: its Python threads, and that a lock held in the server is free here."""
    CONTEXT.manager.handle.set(key, {"threads": threading.active_count(), "pid": os.getpid(),
                                     "pgid": os.getpgid(0), "lock_free": _HELD.acquire(timeout=2),
                                     "niceness": os.nice(0)})


_HELD = threading.Lock()


def _hull_job(key, progress_key, args, context):
    from wyckoff_lab.widgets.jobs import hull_for_session

    try:
        CONTEXT.manager.handle.set(key, {"summary": hull_for_session(CONTEXT, args[0])})
    except Exception as exc:  # reported to the test, not swallowed
        CONTEXT.manager.handle.set(key, {"error": f"{type(exc).__name__}: {exc}"})


def test_a_job_asked_for_during_warm_up_is_queued_and_then_runs_lock_free(tmp_path):
    """The server holds a lock in a second thread while it asks for a job during a (slow) warm-up: the request
    returns at once, the page can say what is loading, and the job, forked by the job server once loading is
    done, runs in a process that had one thread at fork time and in which that lock is free."""
    global CONTEXT
    from wyckoff_lab.widgets.context import LabContext, LabSettings

    CONTEXT = context = LabContext(LabSettings(work_dir=tmp_path / "work"))
    slow = [("reference data (slow test step)", lambda: time.sleep(3)), ("a second step", lambda: None)]
    context.manager._warm_up_steps = lambda: slow
    context.start_job_server()  # this test process may have threads of earlier tests: the jobs' forks count here
    holder = threading.Thread(target=lambda: (_HELD.acquire(), time.sleep(30)), daemon=True)
    holder.start()  # a lock held by another thread of the server, as the hang had
    context.manager.warm_up_jobs()
    _wait(lambda: "slow test step" in context.manager.warm_up_state.message(), 10, "the warm-up message")
    assert context.manager.warm_up_state.message().startswith("loading reference data (slow test step), 1 of 2")
    t0 = time.perf_counter()
    job = context.manager.call_job_fn("result-key", _threads_job, (), {})
    assert time.perf_counter() - t0 < 1.0, "the request waited for the warm-up"
    assert context.manager.job_running(job) and context.manager.started_job(job).pid is None  # queued
    _wait(lambda: context.manager.handle.get("result-key") is not None, 30, "the queued job's result")
    result = context.manager.handle.get("result-key")
    assert result["threads"] == 1 and result["lock_free"], result
    # Background work runs below the web server's priority: the job server's warm-up must not slow the page.
    assert result["niceness"] == min(os.nice(0) + JOB_SERVER_NICENESS, 19), result
    assert context.manager._jobs[job].threads_at_fork == 1  # the job server had one thread when it forked it
    assert result["pgid"] == result["pid"]  # its own process group: a cancel kills it with its workers
    assert context.manager.jobs_ready.is_set() and context.manager.warm_up_state.message() == ""


def test_a_queued_job_that_is_cancelled_never_runs_and_a_running_one_dies_with_its_group(tmp_path):
    global CONTEXT
    from wyckoff_lab.widgets.context import LabContext, LabSettings

    CONTEXT = context = LabContext(LabSettings(work_dir=tmp_path / "work"))
    context.manager._warm_up_steps = lambda: [("a slow step", lambda: time.sleep(2))]
    context.start_job_server()
    queued = context.manager.call_job_fn("never", _threads_job, (), {})  # asking for a job starts the loading
    assert context.manager.job_running(queued)
    context.manager.terminate_job(queued)  # server code outside a request may stop any job it started
    assert not context.manager.job_running(queued)
    _wait(context.manager.jobs_ready.is_set, 30, "the end of the warm-up")
    running = context.manager.call_job_fn("sleeper", _sleep_job, (), {})
    _wait(lambda: context.manager.started_job(running) and context.manager.started_job(running).pid, 10, "the fork")
    pid = context.manager.started_job(running).pid
    context.manager.terminate_job(running)
    _wait(lambda: not context.manager.job_running(running), 10, "the job to stop")
    time.sleep(1)
    assert context.manager.handle.get("never") is None  # the cancelled job was dropped from the queue
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _sleep_job(key, progress_key, args, context):
    time.sleep(60)


def test_twenty_hull_builds_in_a_row_complete(tmp_path, mp20_al_ca_cu, monkeypatch):
    """Twenty hull jobs (Cu, CHGNet, 20 FIRE steps; references cached after the first) each complete."""
    global CONTEXT
    from pymatgen.core import Lattice, Structure
    from wyckoff_lab.widgets.context import LabContext, LabSettings
    from wyckoff_lab.widgets.state import new_session_id

    monkeypatch.setenv("WYCKOFF_LAB_DATA", str(mp20_al_ca_cu))
    monkeypatch.setenv("WYCKOFF_LAB_CACHE", str(tmp_path / "cache"))
    CONTEXT = context = LabContext(LabSettings(work_dir=tmp_path / "work", potential="chgnet", relax_max_steps=20,
                                               hull_max_references=1))
    copper = Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    sid = new_session_id()
    context.sessions.set_candidates(sid, [{"id": "c001", "label": 1, "formula": "Cu", "elements": ["Cu"],
                                           "natoms": 4, "structure": copper.as_dict()}])
    context.start_job_server()  # (this test process has threads of the test before: only the jobs' forks count)
    context.manager.warm_up_jobs()
    seconds = []
    for i in range(20):
        t0 = time.perf_counter()
        job = context.manager.call_job_fn(f"hull-{i}", _hull_job, (sid,), {})
        _wait(lambda: context.manager.handle.get(f"hull-{i}") is not None, 240 if i == 0 else 30, f"hull build {i}")
        result = context.manager.handle.get(f"hull-{i}")
        assert "summary" in result, result
        assert context.manager._jobs[job].threads_at_fork == 1
        seconds.append(time.perf_counter() - t0)
    assert context.sessions.get(sid, "hull")["elements"] == ["Cu"]
    print("hull job seconds:", [round(s, 2) for s in seconds])


def test_the_app_forks_its_job_server_before_any_thread_exists(tmp_path):
    """As `wyckoff-lab app` does it: build the Explorer app, then start the job server; it is forked from a
    process with one thread and no open sqlite connection (a fresh interpreter, so no test's threads count)."""
    import subprocess
    import sys

    script = (
        "from wyckoff_lab.widgets.context import LabContext, LabSettings\n"
        "from wyckoff_lab.widgets.explorer import create_app\n"
        f"context = LabContext(LabSettings(work_dir={str(tmp_path / 'work')!r}, warm_up=False))\n"
        "create_app(context)\n"
        "context.start_job_server()\n"
        "print('THREADS', context.manager.threads_at_zygote_fork, 'OPEN', len(context.manager.databases_at_zygote_fork))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "THREADS 1 OPEN 0" in out.stdout, out.stdout + out.stderr[-3000:]


def test_a_background_callback_registered_after_the_job_server_started_still_runs(tmp_path):
    """Jupyter: a second widget shown in the same kernel registers its background callbacks after the shared
    context's job server was forked (which copied the registry then). Its jobs must run, not be refused: the job
    server is replaced by one that has them, but never while a job of the old one still runs (a job refused then
    says why)."""
    global CONTEXT
    import psutil
    from wyckoff_lab.widgets.context import LabContext, LabSettings

    CONTEXT = context = LabContext(LabSettings(work_dir=tmp_path / "work"))
    manager = context.manager
    manager._warm_up_steps = lambda: [("a quick step", lambda: None)]
    manager.func_registry["first-widget"] = _threads_job
    first_pid = context.start_job_server()
    manager.warm_up_jobs()
    _wait(manager.jobs_ready.is_set, 30, "the first job server's warm-up")
    manager.func_registry["second-widget"] = _late_job  # registered as Dash does: looked up by key in the zygote
    second_pid = context.start_job_server()
    assert second_pid != first_pid
    _wait(lambda: not psutil.pid_exists(first_pid), 10, "the replaced job server to exit")
    manager.call_job_fn("second-result", _late_job, (), {})
    _wait(lambda: manager.handle.get("second-result") is not None, 30, "the second widget's job")
    assert manager.handle.get("second-result") == {"ran": True}
    assert manager.warm_up_state.done, "the new job server was asked to load, as the old one had been"
    _wait(lambda: not manager._has_live_jobs(), 10, "the second widget's job to end")
    manager.func_registry["sleeper"] = _sleep_job
    sleeping = manager.call_job_fn("sleeping", _sleep_job, (), {})  # late too: replaces the server, nothing runs
    _wait(lambda: manager.started_job(sleeping) is not None and manager.started_job(sleeping).pid is not None, 30,
          "the sleeping job to start")
    third_pid = manager.zygote_pid
    assert third_pid != second_pid
    manager.func_registry["third-widget"] = _third_job
    refused = manager.call_job_fn("third-result", _third_job, (), {})
    assert manager.zygote_pid == third_pid  # not replaced under a running job
    assert "try again when it has finished" in manager.handle.get("third-result")["background_callback_error"]["msg"]
    assert manager.started_job(refused) is None and manager.started_job(sleeping) is not None
    manager.terminate_job(sleeping)


def _late_job(key, progress_key, args, context):
    CONTEXT.manager.handle.set(key, {"ran": True})


def _third_job(key, progress_key, args, context):
    CONTEXT.manager.handle.set(key, {"ran": True})


def test_a_dead_job_server_is_said_plainly_on_the_page(tmp_path):
    """If the job server dies, the warm-up line must not keep saying that jobs are queued: it says that nothing can
    start and why, and stops polling."""
    import signal

    from wyckoff_lab.widgets.base import WarmUpBanner
    from wyckoff_lab.widgets.context import LabContext, LabSettings

    context = LabContext(LabSettings(work_dir=tmp_path / "work"))
    context.manager._warm_up_steps = lambda: [("a slow step", lambda: time.sleep(30))]
    pid = context.start_job_server()
    context.manager.warm_up_jobs()
    banner = WarmUpBanner(context)
    _wait(lambda: "a slow step" in banner.shown()[0], 10, "the loading line")
    assert "queued" in banner.shown()[0]
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: context.manager.warm_up_state.error, 10, "the server to notice the job server died")
    text, style, stop_polling = banner.shown()
    assert "stopped" in text and "restart the app" in text and "queued" not in text, text
    assert style["display"] == "block" and stop_polling
    os.waitpid(pid, 0)
