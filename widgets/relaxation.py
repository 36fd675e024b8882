"""Step 6, live relaxation: "Relax" streams FIRE frames into the 3D view with an energy / max-force curve;
"Relax all" (or "Relax selected" / "Relax filtered": the table's ticked or filtered rows) relaxes candidates in the
background, each row updated as it finishes, and places them on the hull. "Keep symmetry" relaxes under FixSymmetry."""

from __future__ import annotations

import plotly.graph_objects as go
from dash import Input, Output, State, ctx, dcc, html, no_update
from wyckoff_lab.widgets.base import Widget, cancel_jobs
from wyckoff_lab.widgets.jobs import (
    FIX_SYMMETRY_KEY,
    STATUS_BATCH_KEY,
    USABLE,
    JobCancelled,
    JobError,
    cancel_check,
    relax_all,
    relax_all_message,
    relax_message,
    relax_one,
    unexpected,
)
from wyckoff_lab.widgets.state import revision
from wyckoff_lab.widgets.structure_view import structure_payload

FRAME_EVERY_S = 0.3  # at most this often a frame is handed to the browser (it polls at the progress interval)
FRAME_POLL_MS = 250  # how often the browser asks for a new frame while relaxing (the first arrives this much sooner)
CANCEL_KIND = "relax"  # the cancel record shared by "Relax" and "Relax all" (one cancel button)
FINISHED_KEY = "relax/finished"  # the last live relaxation of a session that has ended (its late frames are dropped)
SCOPES = {"all": "all", "some": "selected", "filtered": "filtered"}  # button id suffix -> relax_all scope


def relax_figure(history: list[dict] | None, title: str = "") -> go.Figure:
    """Energy per atom (left axis) and the largest atomic force (right axis, log scale) against the FIRE step."""
    history = history or []
    steps = [h["step"] for h in history]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=steps, y=[h["energy_per_atom"] for h in history], name="E (eV/atom)",
                                mode="lines+markers", marker={"size": 4}, line={"color": "#3273dc"}))
    figure.add_trace(go.Scatter(x=steps, y=[h["max_force"] for h in history], name="max force (eV/Å)",
                                mode="lines", yaxis="y2", line={"color": "#f14668", "dash": "dot"}))
    figure.update_layout(
        title={"text": title, "font": {"size": 13}, "x": 0.02, "y": 0.98}, height=260,
        margin={"l": 60, "r": 60, "t": 44, "b": 40},
        xaxis={"title": "FIRE step"},
        # Ticks as short numbers (1.5, 0.05), not plotly's raw floats on a narrow log range (1.52194).
        yaxis={"title": "E (eV/atom)", "tickformat": ".4~g"},
        yaxis2={"title": "max force (eV/Å)", "overlaying": "y", "side": "right", "type": "log",
                "tickformat": ".2~g"},
        legend={"orientation": "h", "y": -0.3}, template="plotly_white")
    return figure


def frame_payload(frame, history, candidate_label: str, cancel_clicks: int | None = None,
                  run: str | None = None) -> dict:
    """What the browser gets per frame: the structure for the 3D view and the curve so far, and the cancel
    button's clicks when the relaxation was asked for (a frame of a relaxation cancelled since is not shown).
    `run` names the relaxation: the 3D view finds bonds on its first frame and keeps them for the others."""
    status = "" if frame.result is None else frame.result.status.replace("_", " ")
    title = f"{candidate_label}: step {frame.step}" + (f" — {status}" if status else " (relaxing)")
    view = structure_payload(frame.structure, title, "relaxation", bonds_key=run and f"relax-{run}")
    return {"view": view, "history": list(history), "title": title, "cancel_clicks": int(cancel_clicks or 0),
            "run": run}


def stale_status_update(context, sid: str | None, chemistry_changed: bool):
    """(status, progress label) for `drop_stale_status`: both cleared when the candidate set the relax status
    speaks of is no longer the session's, or the chemical system was switched; else unchanged."""
    if not sid:
        return no_update, no_update
    owner = context.sessions.get(sid, STATUS_BATCH_KEY)
    if owner is None:
        return no_update, no_update
    if chemistry_changed or owner != context.sessions.batch(sid):
        context.sessions.set(sid, STATUS_BATCH_KEY, None)
        return "", ""
    return no_update, no_update


class RelaxPanel(Widget):
    """Relax the selected candidate live, or every candidate in the background; both can be cancelled."""

    default_prefix = "wl-relax"

    def layout(self):
        return html.Div([
            html.H2("6 · Relax", className="wl-step"),
            html.Div([
                html.Button("Relax", id=self.id("one"), n_clicks=0, className="button is-primary is-small",
                            title="relax the selected candidate and watch it move"),
                html.Button("Relax all", id=self.id("all"), n_clicks=0, className="button is-link is-small",
                            title="relax every candidate, then place them on the convex hull"),
                html.Button("Relax selected", id=self.id("some"), n_clicks=0, className="button is-link is-small "
                            "is-light", title="relax the rows ticked in the candidate table"),
                html.Button("Relax filtered", id=self.id("filtered"), n_clicks=0,
                            className="button is-link is-small is-light",
                            title="relax the rows the candidate table's filter shows"),
                html.Button("Cancel", id=self.id("cancel"), n_clicks=0, disabled=True,
                            className="button is-light is-small"),
                html.Span("potential: loading…", id=self.id("potential"), className="wl-note"),
            ], className="wl-row wl-buttons"),
            dcc.Checklist(id=self.id("fix-symmetry"), value=[], className="wl-note",
                          options=[{"label": " keep symmetry (ASE FixSymmetry: forces and stress symmetrised, the "
                                             "generated space group kept)", "value": "fix"}]),
            html.Progress(id=self.id("progress"), value="0", max="1", className="progress is-small is-link",
                          style={"visibility": "hidden"}),
            html.Div(id=self.id("progress-label"), className="wl-progress-label"),
            html.Div(id=self.id("status"), className="wl-status"),
            # The curve (a plotly graph) is mounted once the page is idle after the potential has loaded: plotly.js
            # costs the browser more than a second to start, which the page's first seconds should not wait for.
            html.Div(id=self.id("curve-box"), style={"height": "260px"}),
            dcc.Store(id=self.id("curve-go")),
            dcc.Store(id=self.id("frame")),
            dcc.Store(id=self.id("final")),
            dcc.Store(id=self.id("live")),  # relax-all: how many are stored so far (the table refreshes on it)
        ], className="wl-panel", id=self.id("panel"))

    def curve(self, payload: dict | None = None):
        history, title = (payload["history"], payload["title"]) if payload else ([], "")
        return dcc.Graph(id=self.id("curve"), figure=relax_figure(history, title), config={"displayModeBar": False},
                         style={"height": "260px"})

    def register(self, app):
        context = self.context
        interval = context.settings.progress_interval_ms
        frame_interval = min(interval, FRAME_POLL_MS)
        running = [(Output(self.id("one"), "disabled"), True, False),
                   *[(Output(self.id(key), "disabled"), True, False) for key in SCOPES],
                   (Output(self.id("cancel"), "disabled"), False, True)]

        @app.callback(
            Output(self.id("final"), "data"),
            Output(self.links.revision, "data", allow_duplicate=True),
            Output(self.id("status"), "children", allow_duplicate=True),
            Input(self.id("one"), "n_clicks"),
            State(self.links.session, "data"),
            State(self.links.selected, "data"),
            State(self.id("cancel"), "n_clicks"),
            background=True, running=running, cancel=[Input(self.id("cancel"), "n_clicks")],
            progress=[Output(self.id("frame"), "data")], interval=frame_interval, prevent_initial_call=True,
        )
        def relax_selected(set_progress, _clicks, session, selected, cancel_clicks):
            import time
            import uuid

            sid = (session or {}).get("sid")
            last = [0.0]
            label = f"#{selected[1:].lstrip('0')}" if selected else ""
            run = f"{selected}-{uuid.uuid4().hex[:8]}"

            def on_frame(frame, history):
                now = time.perf_counter()
                # The first two steps always go out: step 0 is the structure already on screen, step 1 the first
                # that moves (a poll that finds both delivers the latter).
                if frame.result is None and now - last[0] < FRAME_EVERY_S and len(history) > 2:
                    return
                last[0] = now
                on_frame.payload = frame_payload(frame, history, label, cancel_clicks, run)
                set_progress(on_frame.payload)

            on_frame.payload = None
            try:
                summary = relax_one(context, sid, selected, on_frame,
                                    cancelled=cancel_check(context, sid, CANCEL_KIND, cancel_clicks))
            except JobCancelled as exc:
                if sid:
                    context.sessions.set(sid, FINISHED_KEY, run)
                return no_update, revision(), html.Div(str(exc), className="wl-message is-warning")
            except Exception as exc:  # JobError: the user's to fix; anything else: reported, never a broken page
                if sid:
                    context.sessions.set(sid, FINISHED_KEY, run)
                text = str(exc) if isinstance(exc, JobError) else unexpected(exc)
                return no_update, revision(), html.Div(text, className="wl-message is-danger")
            # A frame sent just before the end can reach the browser together with the final one, and last.
            context.sessions.set(sid, FINISHED_KEY, run)
            css = "is-success" if summary["status"] in ("converged", "not_converged") else "is-warning"
            return on_frame.payload, revision(), html.Div(relax_message(summary), className=f"wl-message {css}")

        def late(payload: dict, session: dict | None, source: str) -> bool:
            """A frame of a relaxation the user cancelled since (it may still sit in the progress queue), or an
            intermediate frame of one that has finished (the final frame and the stored result are shown)."""
            sid = (session or {}).get("sid")
            if not sid:
                return False
            if cancel_check(context, sid, CANCEL_KIND, payload.get("cancel_clicks"))():
                return True
            return source == "frame" and payload.get("run") is not None and \
                context.sessions.get(sid, FINISHED_KEY) == payload["run"]

        # One callback per source and per output, not one with several inputs: a callback that listens to an
        # output of a running background callback (the final frame) is held back by Dash until that callback ends,
        # frames included; and the curve may not be mounted yet when the first frame arrives.
        for source in ("frame", "final"):
            @app.callback(
                Output(self.links.structure, "data", allow_duplicate=True),
                Input(self.id(source), "data"),
                State(self.links.session, "data"),
                prevent_initial_call=True,
            )
            def show_frame(payload, session, source=source):
                if not payload or late(payload, session, source):
                    return no_update
                return payload["view"]

            @app.callback(
                Output(self.id("curve"), "figure", allow_duplicate=True),
                Input(self.id(source), "data"),
                State(self.links.session, "data"),
                prevent_initial_call=True,
            )
            def show_curve(payload, session, source=source):
                if not payload or late(payload, session, source):
                    return no_update
                return relax_figure(payload["history"], payload["title"])

        app.clientside_callback(
            """function (_label) {
                // after the potential has loaded and the browser has nothing else to do (or 3 s at most)
                const idle = window.requestIdleCallback || (f => setTimeout(f, 300));
                return new Promise(resolve => setTimeout(() => idle(() => resolve(true), {timeout: 3000}), 300));
            }""",
            Output(self.id("curve-go"), "data"),
            Input(self.id("potential"), "children"),
            prevent_initial_call=True,
        )

        @app.callback(
            Output(self.id("curve-box"), "children"),
            Input(self.id("curve-go"), "data"),
            State(self.id("frame"), "data"),
            State(self.id("curve-box"), "children"),
            prevent_initial_call=True,
        )
        def mount_curve(_go, payload, mounted):
            return no_update if mounted else self.curve(payload)

        @app.callback(
            Output(self.links.revision, "data", allow_duplicate=True),
            Output(self.id("status"), "children", allow_duplicate=True),
            Output(self.id("progress-label"), "children", allow_duplicate=True),
            Input(self.id("cancel"), "n_clicks"),
            State(self.links.session, "data"),
            prevent_initial_call=True,
        )
        def cancel(clicks, session):
            """Record the cancel (so nothing that arrives later is stored or shown), stop the job's process at
            once, then show what the session holds: what was relaxed before the cancel, and nothing else."""
            sid = (session or {}).get("sid")
            if not sid:
                return no_update, no_update, no_update
            cancel_jobs(context, sid, CANCEL_KIND, clicks)
            records = context.sessions.candidates(sid)
            relaxed = sum(r.get("relax_status") in USABLE for r in records)
            text = (f"Relaxation cancelled. {relaxed} of {len(records)} candidates are relaxed (kept); nothing from "
                    "the cancelled run arrives later.")
            # The running job's progress line ("relaxing 25–32 of 99") is the cancelled job's: it goes too.
            return revision(), html.Div(text, className="wl-message is-warning"), ""

        @app.callback(
            Output(self.links.revision, "data", allow_duplicate=True),
            Output(self.id("status"), "children", allow_duplicate=True),
            *[Input(self.id(key), "n_clicks") for key in SCOPES],
            State(self.links.session, "data"),
            State(self.id("cancel"), "n_clicks"),
            background=True,
            running=running + [(Output(self.id("progress"), "style"), {"visibility": "visible"},
                                {"visibility": "hidden"})],
            cancel=[Input(self.id("cancel"), "n_clicks")],
            progress=[Output(self.id("progress"), "value"), Output(self.id("progress"), "max"),
                      Output(self.id("progress-label"), "children"), Output(self.id("live"), "data")],
            interval=interval, prevent_initial_call=True,
        )
        def relax_everything(set_progress, _all, _selected, _filtered, session, cancel_clicks):
            sid = (session or {}).get("sid")
            trigger = (ctx.triggered_id or "").removeprefix(self.id(""))
            scope = SCOPES.get(trigger, "all")
            shown = {"done": 0}

            def report(done, total, label):
                set_progress((str(done), str(max(total, 1)), label, shown["done"]))

            def stored(done):  # a new count in the live store refreshes the table (see `refresh_live`)
                shown["done"] = done

            try:
                summary = relax_all(context, sid, report, scope=scope, on_update=stored,
                                    cancelled=cancel_check(context, sid, CANCEL_KIND, cancel_clicks))
            except JobCancelled as exc:
                set_progress(("0", "1", "", -1))
                return revision(), html.Div(str(exc), className="wl-message is-warning")
            except Exception as exc:  # partial results stay: the table is refreshed either way
                set_progress(("0", "1", "", -1))
                text = str(exc) if isinstance(exc, JobError) else unexpected(exc)
                return revision(), html.Div(text, className="wl-message is-danger")
            set_progress(("1", "1", "", -1))
            return revision(), html.Div(relax_all_message(summary), className="wl-message is-success")

        @app.callback(
            Output(self.links.revision, "data", allow_duplicate=True),
            Input(self.id("live"), "data"),
            prevent_initial_call=True,
        )
        def refresh_live(done):
            """While "Relax all" runs, each newly stored result bumps the revision: the table shows it."""
            return revision() if done and done > 0 else no_update

        @app.callback(
            Output(self.id("fix-symmetry"), "className"),
            Input(self.id("fix-symmetry"), "value"),
            State(self.links.session, "data"),
            prevent_initial_call=True,
        )
        def choose_symmetry(value, session):
            sid = (session or {}).get("sid")
            if sid:
                context.sessions.set(sid, FIX_SYMMETRY_KEY, "fix" in (value or []))
            return "wl-note"

        @app.callback(
            Output(self.id("status"), "children", allow_duplicate=True),
            Output(self.id("progress-label"), "children", allow_duplicate=True),
            Input(self.links.revision, "data"),
            Input(self.links.chemistry, "data"),
            State(self.links.session, "data"),
            prevent_initial_call=True,
        )
        def drop_stale_status(_revision, _chemistry, session):
            """A relax status speaks of one candidate set: it goes when another set replaces it, or when the
            user picks another chemical system."""
            return stale_status_update(context, (session or {}).get("sid"), ctx.triggered_id == self.links.chemistry)

        @app.callback(Output(self.id("potential"), "children"), Input(self.links.session, "data"))
        def potential_label(_session):
            context.ready.wait(30)
            return f"potential: {context.potential_label()}"
