"""Showing a widget's Dash app in Jupyter: its own server in a thread, an iframe at the direct or proxied URL.

Dash's own Jupyter helper (`app.run(jupyter_mode=...)`) asks the kernel, through a comm, for the URL the notebook
page came from; with current ipykernel that comm never answers, and behind jupyter-server-proxy (JupyterHub's
route) the page it shows asks for its scripts at the server root, so it stays at "Loading…". Here the server is
plain Werkzeug on 127.0.0.1:port and the page is told its public path prefix (Dash's `requests_pathname_prefix`):

1. the `path_prefix` argument, else
2. `WYCKOFF_LAB_PATH_PREFIX` (may hold `{port}`, e.g. `/proxy/{port}/`), else
3. `JUPYTERHUB_SERVICE_PREFIX` (set in every JupyterHub single-user server, e.g. `/user/ana/`) + `proxy/{port}/`,
4. else none: the iframe shows http://127.0.0.1:port/ directly (a Jupyter running on this machine).

Only the browser's requests carry the prefix: jupyter-server-proxy strips it before forwarding, so the app's own
routes stay at `/`. The proxy forwards the browser's Host header, which the app's DNS-rebinding guard checks: a
hub's public name is allowed when JupyterHub says it (`JUPYTERHUB_PUBLIC_URL`, `JUPYTERHUB_PUBLIC_HUB_URL`),
otherwise it goes in `WYCKOFF_LAB_ALLOWED_HOSTS`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

PATH_PREFIX_ENV = "WYCKOFF_LAB_PATH_PREFIX"
HUB_PREFIX_ENV = "JUPYTERHUB_SERVICE_PREFIX"
HUB_URL_ENVS = ("JUPYTERHUB_PUBLIC_URL", "JUPYTERHUB_PUBLIC_HUB_URL")  # set by JupyterHub 4+ when it knows them
DASH_PREFIX_ENV = "DASH_REQUESTS_PATHNAME_PREFIX"  # Dash reads constructor defaults from DASH_* variables

_DASH_ENV_LOCK = threading.Lock()


def path_prefix(port: int, prefix: str | None = None, environ=None) -> str | None:
    """The path under which the browser reaches the app on `port` (see the module docstring), or None when it
    reaches it directly. Starts and ends with "/"; anything else is refused with ValueError."""
    environ = os.environ if environ is None else environ
    if prefix is None:
        prefix = environ.get(PATH_PREFIX_ENV) or None
    if prefix is None and environ.get(HUB_PREFIX_ENV):
        prefix = environ[HUB_PREFIX_ENV].rstrip("/") + "/proxy/{port}/"
    if prefix is None:
        return None
    try:
        prefix = prefix.format(port=port)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"path prefix {prefix!r}: only {{port}} may be substituted ({exc})") from None
    return checked_prefix(prefix)


def checked_prefix(prefix: str) -> str:
    """`prefix` as Dash wants it (a URL path that starts and ends with "/"); anything else is refused."""
    if (not isinstance(prefix, str) or not prefix.startswith("/") or "://" in prefix
            or any(c in prefix for c in "?#\"'<> {}")):
        raise ValueError(f"path prefix {prefix!r} must be a URL path starting with '/', such as /proxy/8050/ "
                         f"(set it with path_prefix=... or {PATH_PREFIX_ENV})")
    return prefix if prefix.endswith("/") else prefix + "/"


def hub_host_names(environ=None) -> frozenset[str]:
    """The host names of the hub's public URLs, when JupyterHub gives them to its servers."""
    from urllib.parse import urlsplit

    environ = os.environ if environ is None else environ
    return frozenset(name for name in (urlsplit(environ.get(var) or "").hostname for var in HUB_URL_ENVS) if name)


@contextlib.contextmanager
def dash_requests_prefix(prefix: str | None):
    """While the Dash app is constructed, have it use `prefix` for every URL the page requests (scripts, layout,
    callbacks), without touching how the hosting function calls `Dash(...)`."""
    if prefix is None:
        yield
        return
    with _DASH_ENV_LOCK:
        before = os.environ.get(DASH_PREFIX_ENV)
        os.environ[DASH_PREFIX_ENV] = prefix
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(DASH_PREFIX_ENV, None)
            else:
                os.environ[DASH_PREFIX_ENV] = before


class ThreadedServer:
    """A Dash app's Flask server on host:port in a daemon thread (what a notebook cell needs: it returns at once)."""

    def __init__(self, app, port: int, host: str = "127.0.0.1"):
        from werkzeug.serving import make_server

        try:
            self.server = make_server(host, port, app.server, threaded=True)
        except (OSError, SystemExit) as exc:  # Werkzeug exits (after printing why) when the port is taken
            reason = getattr(exc, "strerror", None) or "address in use"
            raise RuntimeError(f"cannot serve on {host}:{port} ({reason}): choose another port, or leave port=None "
                               f"for a free one") from None
        self.host, self.port = host, self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"wyckoff-lab:{self.port}",
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


DISPLAY_MODES = ("inline", "external")


def checked_mode(mode: str) -> str:
    if mode not in DISPLAY_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, DISPLAY_MODES))}, not {mode!r}")
    return mode


def display_app(url: str, height: int, mode: str = "inline") -> None:
    """The app in the notebook's output: an iframe as wide as the cell ("inline"), or a link to open ("external")."""
    from html import escape

    from IPython.display import HTML, IFrame, display

    if checked_mode(mode) == "inline":
        display(IFrame(url, width="100%", height=height))
    else:
        display(HTML(f'Wyckoff Lab is served at <a href="{escape(url)}" target="_blank">{escape(url)}</a>'))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checked_port(port):
    """`port` if it is None (a free one) or a TCP port number; anything else is refused with ValueError."""
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise ValueError(f"port must be an integer in 1..65535, not {port!r}")
    return port


@dataclass
class NotebookServer:
    """A widget's Dash app served for a notebook: `url` is where the kernel reaches it, `browser_url` what the
    iframe loads (the path prefix behind jupyter-server-proxy, else `url`)."""

    dash_app: object
    server: ThreadedServer
    url: str
    browser_url: str


def serve_for_notebook(build_app, context, port: int | None = None, prefix: str | None = None) -> NotebookServer:
    """Build the app with `build_app()` for the path prefix resolved for `port` (see the module docstring) and
    serve it from a thread on 127.0.0.1:port (None: a free port). What every widget's `show` does."""
    port = checked_port(port) or free_port()
    prefix = path_prefix(port, prefix)
    if prefix:  # the proxy forwards the browser's Host: the hub's own name must pass the host guard
        settings = context.settings
        settings.allowed_hosts = frozenset(settings.allowed_hosts) | hub_host_names()
    with dash_requests_prefix(prefix):
        dash_app = build_app()  # (its host guard reads the allowed hosts now)
    context.start_job_server()  # before the server's threads (Jupyter's own may exist: logged)
    context.start_warm_up()
    server = ThreadedServer(dash_app, port)
    return NotebookServer(dash_app, server, server.url, prefix or server.url)
