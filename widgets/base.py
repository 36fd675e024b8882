"""The widget base class, the shared stores that connect widgets, and the Dash app that hosts them.

A widget owns its layout and its callbacks (as Crystal Toolkit components do) and receives what it shares with
other widgets as store ids (`Links`), never through module globals. `build_app` hosts any list of widgets in one
Dash app — the full Explorer, or a single widget shown alone in Jupyter — with every asset served locally.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dash import Dash, dcc, html
from wyckoff_lab.widgets.context import LabContext
from wyckoff_lab.widgets.session_files import SessionFiles
from wyckoff_lab.widgets.state import new_session_id, revision

log = logging.getLogger(__name__)

CT_STATIC_ROUTE = "wl-static/ct"  # Crystal Toolkit's CSS and fonts, served from its wheel


@dataclass(frozen=True)
class Links:
    """Ids of the stores widgets share on one page.

    session: {"sid": ...} of this tab. revision: bumped whenever the session's candidates change.
    selected: id of the selected candidate. chemistry: {"elements", "formula", "max_atoms"}.
    symmetry: {"spacegroup", "template"}. structure: {"structure", "title", "source"} shown in the 3D view.
    tab: the name of the visible tab, so costly views (t-SNE maps) compute only when someone looks at them.
    """

    session: str = "wl-session"
    revision: str = "wl-revision"
    selected: str = "wl-selected"
    chemistry: str = "wl-chemistry"
    symmetry: str = "wl-symmetry"
    structure: str = "wl-structure"
    tab: str = "wl-active-tab"
    session_token: str = "wl-session-token"  # the tab's signed session id, kept in sessionStorage across reloads

    def stores(self, chemistry: dict | None = None, symmetry: dict | None = None,
               structure: dict | None = None, tab: str | None = None) -> list[dcc.Store]:
        """The shared stores for a freshly loaded page: a new session id, so every tab has its own candidates, and
        the token store that brings back the tab's earlier session after a reload (see `restore_sessions`)."""
        return [
            dcc.Store(id=self.session, data={"sid": new_session_id()}),
            dcc.Store(id=self.session_token, storage_type="session"),
            dcc.Store(id=self.revision, data=revision()),
            dcc.Store(id=self.selected, data=None),
            dcc.Store(id=self.chemistry, data=chemistry or {"elements": [], "formula": None, "max_atoms": 20}),
            dcc.Store(id=self.symmetry, data=symmetry or {"spacegroup": None, "template": []}),
            dcc.Store(id=self.structure, data=structure),
            dcc.Store(id=self.tab, data=tab),
        ]


def cancel_jobs(context: LabContext, sid: str, kind: str, clicks: int) -> None:
    """Inside a cancel button's callback: record the cancel (see `jobs.request_cancel`), then stop at once the
    running background jobs whose ids Dash sends with the click. The manager stops only jobs it started for this
    session (`WarmDiskcacheManager.terminate_job`): any other id in the query is refused."""
    import flask
    from wyckoff_lab.widgets.jobs import request_cancel

    request_cancel(context, sid, kind, clicks)
    for job in flask.request.args.getlist("cancelJob"):
        try:
            context.manager.terminate_job(job)
        except Exception as exc:  # gone already: the cancel record stops it anyway
            log.info("could not stop job %s: %s", job, exc)


class Widget:
    """A self-contained part of the page: `layout()` builds it, `register(app)` adds its callbacks.

    Subclasses list the Crystal Toolkit components they embed in `ct_components` so the hosting app generates
    their callbacks and stores (Crystal Toolkit's own plugin would do that for every component ever created).
    """

    default_prefix = "wl"
    default_height = 650  # px of the iframe `show` displays in a notebook

    def __init__(self, context: LabContext | None = None, links: Links | None = None, prefix: str | None = None,
                 port: int | None = None, path_prefix: str | None = None, height: int | None = None):
        from wyckoff_lab.widgets.jupyter import checked_port

        self.port = checked_port(port)  # `show`'s defaults (see there)
        self.path_prefix, self.height = path_prefix, height or self.default_height
        self.notebook = None  # the NotebookServer once shown
        self.context = context or default_context()
        self.links = links or Links()
        self.prefix = prefix or self.default_prefix

    def id(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def layout(self):
        raise NotImplementedError

    def register(self, app: Dash) -> None:
        """Add this widget's callbacks to `app` (called once per app)."""

    def register_cancel_record(self, app: Dash, kind: str, message: str) -> None:
        """On this widget's "cancel" button, record the cancel for `kind` of job in the session, stop the running
        job, and say `message` in its "status". The record stops a job that had not started yet (it waited for the
        warm-up) or had not stored its result (see `jobs.request_cancel`)."""
        from dash import Input, Output, State, no_update

        @app.callback(
            Output(self.id("status"), "children", allow_duplicate=True),
            Input(self.id("cancel"), "n_clicks"),
            State(self.links.session, "data"),
            prevent_initial_call=True,
        )
        def record_cancel(clicks, session):
            sid = (session or {}).get("sid")
            if not sid:
                return no_update
            cancel_jobs(self.context, sid, kind, clicks)
            return html.Div(message, className="wl-message is-warning")

    def background_job_options(self, interval_ms: int, *extra_progress) -> dict:
        """The `app.callback` options of a panel's background job started by its "run" button: run disabled and
        cancel enabled while it runs, "progress" shown, cancel by "cancel", and (value, max, label) of the
        progress bar, then any `extra_progress` outputs, set by `set_progress`."""
        from dash import Input, Output

        return {"background": True,
                "running": [(Output(self.id("run"), "disabled"), True, False),
                            (Output(self.id("cancel"), "disabled"), False, True),
                            (Output(self.id("progress"), "style"), {"visibility": "visible"},
                             {"visibility": "hidden"})],
                "cancel": [Input(self.id("cancel"), "n_clicks")],
                "progress": [Output(self.id("progress"), "value"), Output(self.id("progress"), "max"),
                             Output(self.id("progress-label"), "children"), *extra_progress],
                "interval": interval_ms, "prevent_initial_call": True}

    def register_stale_status_clearing(self, app: Dash) -> None:
        """A status belongs to its job: a switched chemical system drops the last job's "status" line and
        "progress-label", a cancel the progress label (the cancel record writes the status itself)."""
        from dash import Input, Output, ctx

        @app.callback(
            Output(self.id("status"), "children", allow_duplicate=True),
            Output(self.id("progress-label"), "children", allow_duplicate=True),
            Input(self.id("cancel"), "n_clicks"),
            Input(self.links.chemistry, "data"),
            prevent_initial_call=True,
        )
        def clear_stale_status(_cancel, _chemistry):
            return cleared_status(ctx.triggered_id, self.id("cancel"))

    @property
    def ct_components(self) -> list:
        return []

    def page_stores(self) -> list:
        """The shared stores this widget needs when it is shown alone (the Explorer provides them otherwise)."""
        return self.links.stores()

    # -- Jupyter --------------------------------------------------------------------------------------------------

    def app(self) -> Dash:
        """A Dash app showing only this widget."""
        return build_app([self], self.context, title=f"Wyckoff Lab — {type(self).__name__}",
                         extra_stores=self.page_stores)

    def show(self, port: int | None = None, height: int | None = None, path_prefix: str | None = None,
             mode: str = "inline") -> Dash:
        """Serve this widget's app from a thread on 127.0.0.1:`port` and show it in the notebook: an iframe `height`
        px tall (mode="external": a link instead), at the proxied path behind jupyter-server-proxy (JupyterHub;
        `path_prefix`, else from the environment: see `wyckoff_lab.widgets.jupyter`), else at the direct URL.
        Arguments left out take the widget's own (its constructor's port, path_prefix, height; a free port).
        Shown again, it reuses the running server. Sets `url` (where the kernel reaches it) and `browser_url`
        (what the browser loads); returns the Dash app."""
        from wyckoff_lab.widgets.jupyter import checked_mode, checked_port, display_app, serve_for_notebook

        checked_mode(mode)
        port, path_prefix = checked_port(port) or self.port, path_prefix or self.path_prefix
        if self.notebook is None:
            self.notebook = serve_for_notebook(self.app, self.context, port, path_prefix)
            self.dash_app, self.server = self.notebook.dash_app, self.notebook.server
            self.url, self.browser_url = self.notebook.url, self.notebook.browser_url
        elif port not in (None, self.server.port):
            raise ValueError(f"{type(self).__name__} is already served on port {self.server.port}: show it without "
                             f"a port, or create another widget for port {port}")
        display_app(self.browser_url, height or self.height, mode)
        return self.dash_app

    def _ipython_display_(self) -> None:
        self.show()


_DEFAULT_CONTEXT: LabContext | None = None


def cleared_status(trigger: str, cancel_id: str):
    """(status, progress label) after `trigger` fired: a cancel keeps the status (its record writes it) and clears
    the progress label; anything else (a switched system) clears both."""
    from dash import no_update

    return (no_update if trigger == cancel_id else "", "")


def default_context() -> LabContext:
    """One shared context per process for widgets created without one (Jupyter: models load once per kernel)."""
    global _DEFAULT_CONTEXT
    if _DEFAULT_CONTEXT is None:
        _DEFAULT_CONTEXT = LabContext()
    return _DEFAULT_CONTEXT


MAX_REQUEST_BYTES = 32 * 2**20  # the largest callback body the page sends (a 3D payload) is well below this


def guard_requests(app: Dash, allowed_hosts) -> None:
    """Refuse, before any callback runs, a request for a Host this app does not serve (DNS rebinding) and a
    callback request carrying a session id this process did not issue (403 with the reason)."""
    import flask
    from wyckoff_lab.widgets.security import claimed_session_ids, host_name, session_id_is_valid

    allowed = frozenset(allowed_hosts)
    app.server.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES

    @app.server.before_request
    def refuse_untrusted():
        request = flask.request
        if host_name(request.host) not in allowed:
            log.warning("refused a request for host %r (serving %s)", request.host[:100], ", ".join(sorted(allowed)))
            return flask.Response(f"Wyckoff Lab does not serve this host name ({request.host[:100]!r}).", 403,
                                  mimetype="text/plain")
        if request.path.endswith("/_dash-update-component") and request.method == "POST":
            claimed = claimed_session_ids(request.get_json(silent=True))
            if any(not session_id_is_valid(sid) for sid in claimed):
                return flask.Response("Unknown session (not issued by this app, or from before a restart): reload "
                                      "the page.", 403, mimetype="text/plain")
        return None


def restore_sessions(app: Dash, links: Links) -> None:
    """A reload of a tab keeps its session: the tab's sessionStorage keeps its signed id (a new tab starts empty,
    so tabs never share candidates). On load, a stored id this server signed replaces the page's fresh one (and the
    views that show candidates redraw); a missing or forged one is replaced by the fresh id. The stored value is a
    bare string, not {"sid": ...}, so the request guard lets a stale one through to be replaced here."""
    from dash import Input, Output, State, no_update
    from wyckoff_lab.widgets.security import session_id_is_valid

    @app.callback(Output(links.session, "data", allow_duplicate=True),
                  Output(links.revision, "data", allow_duplicate=True),
                  Output(links.session_token, "data"),
                  Input(links.session_token, "data"), State(links.session, "data"),
                  prevent_initial_call="initial_duplicate")
    def restore(token, session):
        current = (session or {}).get("sid")
        if token == current:
            return no_update, no_update, no_update
        if isinstance(token, str) and session_id_is_valid(token):
            return {"sid": token}, revision(), no_update
        return no_update, no_update, current


class WarmUpBanner:
    """The line that says what the job server is still loading ("loading reference data (MP-20), 2 of 4 · jobs you
    start now are queued…"), so a job asked for during warm-up is seen to be queued rather than stuck; it hides
    itself once loading is done."""

    QUEUED_NOTE = "jobs you start now are queued and begin when it is done"

    def __init__(self, context: LabContext, prefix: str = "wl-warmup"):
        self.context, self.prefix = context, prefix

    def shown(self) -> tuple[str, dict, bool]:
        """(text, style, done) for the warm-up's state now: the page's first draw and every tick show the same."""
        state = self.context.manager.warm_up_state
        text = state.message()
        shown = bool(text)
        style = {"padding": "0.4rem 1rem", "marginBottom": "0.5rem", "display": "block" if shown else "none"}
        if state.error:  # nothing is queued any more: the line says why, in red, and stops polling
            style["backgroundColor"], style["color"] = "#feecf0", "#cc0f35"
            return text, style, True
        return (f"{text} · {self.QUEUED_NOTE}" if text else "", style, state.done)

    def layout(self):
        text, style, done = self.shown()
        return html.Div([html.Div(text, id=f"{self.prefix}-text", className="wl-warmup-text"),
                         dcc.Interval(id=f"{self.prefix}-tick", interval=500, disabled=done)],
                        id=self.prefix, className="wl-warmup notification is-info is-light", style=style)

    def register(self, app: Dash) -> None:
        from dash import Input, Output

        @app.callback(Output(f"{self.prefix}-text", "children"), Output(self.prefix, "style"),
                      Output(f"{self.prefix}-tick", "disabled"), Input(f"{self.prefix}-tick", "n_intervals"))
        def tick(_n):
            return self.shown()


def assets_folder() -> str:
    return str(Path(str(resources.files("wyckoff_lab.widgets").joinpath("assets"))))


def build_app(widgets: list[Widget], context: LabContext, title: str = "Wyckoff Lab", extra_stores=None,
              header=None) -> Dash:
    """A Dash app hosting `widgets` on one page, every script, stylesheet and font served from this machine.

    The layout is a function, so each page load (each browser tab) gets a fresh session id, which a reload swaps
    for the tab's earlier one (`restore_sessions`). Above the widgets: the warm-up line and the session files
    buttons (save / open). Call `context.start_job_server()` after this and before serving. Crystal Toolkit's
    components get their stores and callbacks here, and its Bulma / Font Awesome CSS comes from its wheel instead
    of a CDN.
    """
    from flask import send_from_directory
    from wyckoff_lab.widgets import compat

    compat.apply()
    ct_assets = compat.crystal_toolkit_assets_dir()
    ct_css = sorted(p.name for p in ct_assets.glob("main.*.css"))
    app = Dash(
        __name__,
        title=title,
        update_title=None,
        assets_folder=assets_folder(),
        serve_locally=True,
        external_stylesheets=[f"{CT_STATIC_ROUTE}/{name}" for name in ct_css],
        background_callback_manager=context.manager,
        suppress_callback_exceptions=True,
    )

    @app.server.route(f"/{CT_STATIC_ROUTE}/<path:filename>")
    def crystal_toolkit_static(filename):
        return send_from_directory(ct_assets, filename, max_age=3600)

    guard_requests(app, context.settings.allowed_hosts)

    @app.server.before_request
    def warm_up():
        context.start_warm_up()

    cache = compat.make_cache()
    cache.init_app(app.server)
    ct_components = [c for w in widgets for c in w.ct_components]

    links = widgets[0].links if widgets else Links()
    banner = WarmUpBanner(context)
    files = SessionFiles(context, links)

    def page():
        from crystal_toolkit.core.mpcomponent import MPComponent

        stores = list(extra_stores() if callable(extra_stores) else (extra_stores or []))
        for component in ct_components:
            stores += MPComponent._app_stores_dict[component.id()]
        body = [w.layout() for w in widgets]
        return html.Div([banner.layout(), *(header() if callable(header) else [header] if header else []),
                         files.layout(), *body, html.Div(stores, style={"display": "none"})], className="wl-page")

    app.layout = page
    for widget in widgets:
        widget.register(app)
    restore_sessions(app, links)
    banner.register(app)
    files.register(app)
    for component in ct_components:
        component.generate_callbacks(app, cache)
    app.wyckoff_lab_context = context
    return app
