"""Step 6, live relaxation: "Relax" streams FIRE frames into the 3D view with an energy / max-force curve;
"Relax all" relaxes the whole candidate set in the background and places it on the hull."""

from __future__ import annotations

import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html, no_update
from wyckoff_lab.widgets.base import Widget
from wyckoff_lab.widgets.jobs import JobError, hull_message, relax_all, relax_message, relax_one, unexpected
from wyckoff_lab.widgets.state import revision
from wyckoff_lab.widgets.structure_view import structure_payload

FRAME_EVERY_S = 0.3  # at most this often a frame is handed to the browser (it polls at the progress interval)


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
        xaxis={"title": "FIRE step"}, yaxis={"title": "E (eV/atom)"},
        yaxis2={"title": "max force (eV/Å)", "overlaying": "y", "side": "right", "type": "log"},
        legend={"orientation": "h", "y": -0.3}, template="plotly_white")
    return figure


def frame_payload(frame, history, candidate_label: str) -> dict:
    """What the browser gets per frame: the structure for the 3D view and the curve so far."""
    status = "" if frame.result is None else frame.result.status.replace("_", " ")
    title = f"{candidate_label}: step {frame.step}" + (f" — {status}" if status else " (relaxing)")
    return {"view": structure_payload(frame.structure, title, "relaxation"), "history": list(history),
            "title": title}


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
                html.Button("Cancel", id=self.id("cancel"), n_clicks=0, disabled=True,
                            className="button is-light is-small"),
                html.Span("potential: loading…", id=self.id("potential"), className="wl-note"),
            ], className="wl-row wl-buttons"),
            html.Progress(id=self.id("progress"), value="0", max="1", className="progress is-small is-link",
                          style={"visibility": "hidden"}),
            html.Div(id=self.id("progress-label"), className="wl-progress-label"),
            html.Div(id=self.id("status"), className="wl-status"),
            dcc.Graph(id=self.id("curve"), figure=relax_figure([]), config={"displayModeBar": False},
                      style={"height": "260px"}),
            dcc.Store(id=self.id("frame")),
            dcc.Store(id=self.id("final")),
        ], className="wl-panel", id=self.id("panel"))

    def register(self, app):
        context = self.context
        interval = context.settings.progress_interval_ms
        running = [(Output(self.id("one"), "disabled"), True, False),
                   (Output(self.id("all"), "disabled"), True, False),
                   (Output(self.id("cancel"), "disabled"), False, True)]

        @app.callback(
            Output(self.id("final"), "data"),
            Output(self.links.revision, "data", allow_duplicate=True),
            Output(self.id("status"), "children", allow_duplicate=True),
            Input(self.id("one"), "n_clicks"),
            State(self.links.session, "data"),
            State(self.links.selected, "data"),
            background=True, running=running, cancel=[Input(self.id("cancel"), "n_clicks")],
            progress=[Output(self.id("frame"), "data")], interval=interval, prevent_initial_call=True,
        )
        def relax_selected(set_progress, _clicks, session, selected):
            import time

            last = [0.0]
            label = f"#{selected[1:].lstrip('0')}" if selected else ""

            def on_frame(frame, history):
                now = time.perf_counter()
                if frame.result is None and now - last[0] < FRAME_EVERY_S and len(history) > 1:
                    return
                last[0] = now
                set_progress(frame_payload(frame, history, label))
                on_frame.payload = frame_payload(frame, history, label)

            on_frame.payload = None
            try:
                summary = relax_one(context, (session or {}).get("sid"), selected, on_frame)
            except Exception as exc:  # JobError: the user's to fix; anything else: reported, never a broken page
                text = str(exc) if isinstance(exc, JobError) else unexpected(exc)
                return no_update, revision(), html.Div(text, className="wl-message is-danger")
            css = "is-success" if summary["status"] in ("converged", "not_converged") else "is-warning"
            return on_frame.payload, revision(), html.Div(relax_message(summary), className=f"wl-message {css}")

        # Two callbacks, not one with two inputs: a callback that listens to an output of a running background
        # callback (the final frame) is held back by Dash until that callback ends, frames included.
        for source in ("frame", "final"):
            @app.callback(
                Output(self.links.structure, "data", allow_duplicate=True),
                Output(self.id("curve"), "figure", allow_duplicate=True),
                Input(self.id(source), "data"),
                prevent_initial_call=True,
            )
            def show_frame(payload):
                if not payload:
                    return no_update, no_update
                return payload["view"], relax_figure(payload["history"], payload["title"])

        @app.callback(
            Output(self.links.revision, "data", allow_duplicate=True),
            Output(self.id("status"), "children", allow_duplicate=True),
            Input(self.id("all"), "n_clicks"),
            State(self.links.session, "data"),
            background=True,
            running=running + [(Output(self.id("progress"), "style"), {"visibility": "visible"},
                                {"visibility": "hidden"})],
            cancel=[Input(self.id("cancel"), "n_clicks")],
            progress=[Output(self.id("progress"), "value"), Output(self.id("progress"), "max"),
                      Output(self.id("progress-label"), "children")],
            interval=interval, prevent_initial_call=True,
        )
        def relax_everything(set_progress, _clicks, session):
            try:
                summary = relax_all(context, (session or {}).get("sid"),
                                    lambda done, total, label: set_progress((str(done), str(max(total, 1)), label)))
            except Exception as exc:  # partial results stay: the table is refreshed either way
                set_progress(("0", "1", ""))
                text = str(exc) if isinstance(exc, JobError) else unexpected(exc)
                return revision(), html.Div(text, className="wl-message is-danger")
            set_progress(("1", "1", ""))
            return revision(), html.Div(hull_message(summary), className="wl-message is-success")

        @app.callback(Output(self.id("potential"), "children"), Input(self.links.session, "data"))
        def potential_label(_session):
            context.ready.wait(30)
            return f"potential: {context.potential_label()}"
