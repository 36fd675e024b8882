"""`wyckoff-lab app`: serve the Wyckoff Lab web app on this machine and open it in the browser."""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
import urllib.request
from pathlib import Path

from wyckoff_lab.app.cli import CommandError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("app", help="start the Wyckoff Lab app (Dash + Crystal Toolkit) in the browser")
    p.add_argument("--port", type=int, default=8050, help="port to listen on (default 8050)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: only this machine can connect)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host header is NAME (a reverse proxy's name; repeatable). "
                        "Loopback names and the --host address are always served, nothing else")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--potential", default=None, choices=("mattersim", "chgnet", "sevennet"),
                   help="relaxation potential (default: MatterSim when its checkpoint can be had, else CHGNet)")
    p.add_argument("--generator", default=None,
                   help="generator selected at start (default: the most preferred registered one that loads)")
    p.add_argument("--elements", default="", help="preselect a chemical system, e.g. Al,Ca,Cu or Al-Ca-Cu")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--relax-max-steps", type=int, default=300,
                   help="FIRE steps per relaxation, candidates and hull references alike (default 300)")
    p.add_argument("--samples", type=int, default=100, help="number of samples preset in the form (default 100)")
    p.add_argument("--work-dir", default=None, metavar="FOLDER",
                   help="keep sessions and job results in FOLDER (with the 0600 key that signs session ids), so a "
                        "restart with the same folder keeps every tab's candidates (default: a temporary folder, "
                        "removed when the app stops)")
    p.add_argument("--path-prefix", default=None, metavar="PATH",
                   help="the URL path a reverse proxy serves the app under and strips before forwarding, e.g. "
                        "/proxy/8050/ (jupyter-server-proxy) or /wyckoff/ (default: $WYCKOFF_LAB_PATH_PREFIX, "
                        "else none); the page then asks for every script and callback under it")
    p.add_argument("--debug", action="store_true", help="Dash debug mode (dev tools, reloading)")
    p.set_defaults(func=run)


def wait_until_up(url: str, timeout_s: float = 60.0) -> bool:
    """Poll `url` until the server answers (so the browser never opens on a connection error)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end the server as Ctrl+C does, so exit handlers remove its work folder (sessions and job
    results in /tmp); by default those signals kill the process without running them."""
    import signal
    import sys

    def stop(signum, _frame):
        import atexit
        import os

        log.info("stopping on signal %d", signum)
        # The exit handlers (work folder removal), then out without interpreter finalisation: a warm-up thread in
        # the middle of loading torch would otherwise abort the process ("terminate called...", exit -6).
        atexit._run_exitfuncs()
        sys.stdout.flush()
        os._exit(0)

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), stop)


def run(args: argparse.Namespace) -> int:
    import socket

    started = time.perf_counter()
    with socket.socket() as probe:
        # As the server itself does: connections of a previous run in TIME_WAIT must not block the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as exc:
            raise CommandError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); "
                               "is the app already running? try --port") from None

    from wyckoff_lab.app.generator_flags import chemical_system
    from wyckoff_lab.widgets.context import LabContext, LabSettings, extra_hosts
    from wyckoff_lab.widgets.explorer import create_app
    from wyckoff_lab.widgets.security import allowed_host_names

    if args.relax_max_steps < 0 or args.samples < 1:
        raise CommandError("--relax-max-steps must be >= 0 and --samples >= 1")
    from wyckoff_lab.widgets.jupyter import path_prefix

    try:  # the flag, else the environment variable ({port} filled in); JupyterHub's own prefix is for notebooks
        prefix = path_prefix(args.port, args.path_prefix, environ={k: v for k, v in os.environ.items()
                                                                   if k != "JUPYTERHUB_SERVICE_PREFIX"})
    except ValueError as exc:
        raise CommandError(f"--path-prefix: {exc}") from None
    stop_on_signals()  # before the context makes its work folder: SIGTERM must run its clean-up
    hosts = allowed_host_names(args.host, [*extra_hosts(), *args.allow_host])
    context = LabContext(LabSettings(potential=args.potential, device=args.device, default_generator=args.generator,
                                     relax_max_steps=args.relax_max_steps, default_samples=args.samples,
                                     allowed_hosts=hosts, work_dir=Path(args.work_dir) if args.work_dir else None))
    elements = list(chemical_system(args.elements, "--elements")) if args.elements.strip() else []
    app = create_app(context, path_prefix=prefix, elements=elements)
    # Now: the callbacks are registered and no thread runs yet, so the job server forks a lock-free process.
    context.start_job_server()
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}/"

    def announce():
        if wait_until_up(url):
            where = f"{url} (through the proxy at {prefix})" if prefix else url
            print(f"Wyckoff Lab is running at {where} (ready in {time.perf_counter() - started:.1f} s); "
                  "press Ctrl+C to stop", flush=True)
            if not args.no_browser and not prefix:  # behind a proxy only the proxy's URL works
                import webbrowser

                webbrowser.open(url)

    threading.Thread(target=announce, daemon=True).start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING if args.verbose else logging.ERROR)
    app.run(host=args.host, port=args.port, debug=args.debug, use_reloader=False, threaded=True)
    return 0
