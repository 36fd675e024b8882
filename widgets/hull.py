"""Step 7, the hull: the chemical system's phase diagram from ML-relaxed reference phases with the relaxed
candidates placed on it, and their e_above_hull histogram. Clicking a candidate selects it."""

from __future__ import annotations

import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html, no_update
from pymatgen.core import Composition
from wyckoff_lab.widgets.base import Widget
from wyckoff_lab.widgets.jobs import (
    HULL_CANCELLED,
    JobCancelled,
    JobError,
    cancel_check,
    hull_for_session,
    hull_message,
    unexpected,
)
from wyckoff_lab.widgets.state import revision

CANCEL_KIND = "hull"  # the session's cancel record for this widget's jobs (see jobs.request_cancel)
HULL_COLORSCALE = "Viridis"
REFERENCE_PREFIX = "ref:"  # customdata of a reference phase on the diagram; a candidate's is its id
MAX_HULL_COLOR_EV = 0.3  # colour scale saturates here: anything further above the hull looks the same


def _fractions(composition: dict | Composition, elements: list[str]) -> list[float]:
    comp = Composition(composition)
    return [comp.get_atomic_fraction(el) for el in elements]


def _candidate_points(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("e_above_hull") is not None and r.get("formation_energy_per_atom") is not None]


def _reference_hover(r: dict) -> str:
    return (f"{r['formula']} ({r['source']})<br>E_f = {r['formation_energy_per_atom']:.3f} eV/atom"
            f"<br>E hull = {1000 * r['e_above_hull']:.0f} meV/atom")


def _candidate_hover(r: dict) -> str:
    return (f"#{r['label']} {r['formula']} {r['sg_label']}<br>E_f = {r['formation_energy_per_atom']:.3f} eV/atom"
            f"<br>E hull = {1000 * r['e_above_hull']:.0f} meV/atom")


def hull_figure(hull: dict | None, records: list[dict]) -> go.Figure:
    """Binary: formation energy against composition with the hull line; ternary: a composition triangle with tie
    lines; unary or more than three elements: energies above the hull against formula."""
    figure = go.Figure()
    figure.update_layout(template="plotly_white", height=460, margin={"l": 60, "r": 20, "t": 40, "b": 50},
                         legend={"orientation": "h", "y": -0.12})
    if not hull:
        # A centred note on empty axes: as a title, the long text ran under the plot's toolbar.
        figure.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, annotations=[{
            "text": "No hull yet: press “Relax all”<br>(or “Build hull” for relaxed candidates)", "showarrow": False,
            "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5, "font": {"size": 15}}])
        return figure
    elements = hull["elements"]
    refs = hull["references"]
    points = _candidate_points(records)
    title = f"{'-'.join(elements)} convex hull ({hull['potential']}, {len(refs)} reference phases)"
    hover_cand = [_candidate_hover(r) for r in points]
    marker_cand = {"size": 10, "symbol": "diamond", "color": [r["e_above_hull"] for r in points],
                   "colorscale": HULL_COLORSCALE, "cmin": 0, "cmax": MAX_HULL_COLOR_EV, "line": {"width": 1},
                   "colorbar": {"title": "E hull (eV/atom)", "len": 0.7}}
    for i, r in enumerate(refs):
        r.setdefault("key", f"{REFERENCE_PREFIX}{i}")
    stable = [r for r in refs if r["on_hull"]]
    unstable = [r for r in refs if not r["on_hull"]]
    if len(elements) == 2:
        x_of = lambda comp: Composition(comp).get_atomic_fraction(elements[1])
        line = sorted(stable, key=lambda r: x_of(r["composition"]))
        figure.add_trace(go.Scatter(x=[x_of(r["composition"]) for r in line],
                                    y=[r["formation_energy_per_atom"] for r in line], mode="lines+markers",
                                    name="hull (stable phases)", line={"color": "black"},
                                    marker={"size": 9, "color": "black"},
                                    text=[_reference_hover(r) for r in line], hoverinfo="text",
                                    customdata=[r["key"] for r in line]))
        figure.add_trace(go.Scatter(x=[x_of(r["composition"]) for r in unstable],
                                    y=[r["formation_energy_per_atom"] for r in unstable], mode="markers",
                                    name="reference, above hull", marker={"size": 7, "color": "#999"},
                                    text=[_reference_hover(r) for r in unstable], hoverinfo="text",
                                    customdata=[r["key"] for r in unstable]))
        figure.add_trace(go.Scatter(x=[x_of(r["formula"]) for r in points],
                                    y=[r["formation_energy_per_atom"] for r in points], mode="markers",
                                    name="candidates", marker=marker_cand, text=hover_cand, hoverinfo="text",
                                    customdata=[r["id"] for r in points]))
        figure.update_layout(xaxis={"title": f"fraction of {elements[1]} (rest {elements[0]})", "range": [-0.02, 1.02]},
                             yaxis={"title": "formation energy (eV/atom)"})
    elif len(elements) == 3:
        def tern(comps):
            fr = [_fractions(c, elements) for c in comps]
            return {"a": [f[0] for f in fr], "b": [f[1] for f in fr], "c": [f[2] for f in fr]}

        for a, b in hull["tie_lines"]:  # found once, when the hull was built (jobs.hull_data)
            figure.add_trace(go.Scatterternary(**tern([a, b]), mode="lines", line={"color": "black", "width": 1},
                                               hoverinfo="skip", showlegend=False))
        figure.add_trace(go.Scatterternary(**tern([r["composition"] for r in stable]), mode="markers+text",
                                           name="stable reference", marker={"size": 9, "color": "black"},
                                           text=[r["formula"] for r in stable], textposition="top center",
                                           hovertext=[_reference_hover(r) for r in stable],
                                           hoverinfo="text", customdata=[r["key"] for r in stable]))
        figure.add_trace(go.Scatterternary(**tern([r["composition"] for r in unstable]), mode="markers",
                                           name="reference, above hull", marker={"size": 7, "color": "#999"},
                                           hovertext=[_reference_hover(r) for r in unstable],
                                           hoverinfo="text", customdata=[r["key"] for r in unstable]))
        figure.add_trace(go.Scatterternary(**tern([r["formula"] for r in points]), mode="markers",
                                           name="candidates", marker=marker_cand, hovertext=hover_cand,
                                           hoverinfo="text", customdata=[r["id"] for r in points]))
        figure.update_layout(ternary={"aaxis": {"title": elements[0]}, "baxis": {"title": elements[1]},
                                      "caxis": {"title": elements[2]}})
    else:
        ordered = sorted(points, key=lambda r: r["e_above_hull"])
        figure.add_trace(go.Scatter(x=[f"#{r['label']} {r['formula']}" for r in ordered],
                                    y=[r["e_above_hull"] for r in ordered], mode="markers", name="candidates",
                                    marker=marker_cand, text=[_candidate_hover(r) for r in ordered],
                                    hoverinfo="text", customdata=[r["id"] for r in ordered]))
        figure.update_layout(yaxis={"title": "E above hull (eV/atom)"},
                             xaxis={"title": "candidate (a composition diagram needs 2 or 3 elements)"})
    figure.update_layout(title={"text": title, "font": {"size": 14}})
    return figure


def hull_histogram(records: list[dict]) -> go.Figure:
    values = [r["e_above_hull"] for r in records if r.get("e_above_hull") is not None]
    figure = go.Figure(go.Histogram(x=values, nbinsx=30, marker={"color": "#3273dc"}, name="candidates"))
    figure.add_vline(x=0.1, line_dash="dot", annotation_text="0.1 eV/atom", annotation_position="top right")
    figure.update_layout(template="plotly_white", height=300, margin={"l": 50, "r": 20, "t": 40, "b": 40},
                         title={"text": f"E above hull of {len(values)} relaxed candidates", "font": {"size": 13}},
                         xaxis={"title": "E above hull (eV/atom)"}, yaxis={"title": "candidates"})
    return figure


def clicked_point(context, session: str | None, click: dict | None):
    """(selected, structure, status) for a click on the hull diagram: a candidate becomes the selection (the 3D
    view follows it); a reference phase goes to the 3D view as relaxed for the hull."""
    from wyckoff_lab.widgets.structure_view import structure_payload

    points = (click or {}).get("points") or [{}]
    key = points[0].get("customdata")
    if isinstance(key, list):  # plotly sends customdata of one point as a list when it has several fields
        key = key[0] if key else None
    if not key or not session:
        return no_update, no_update, no_update
    if not str(key).startswith(REFERENCE_PREFIX):
        record = context.sessions.candidate(session, key)
        if record is None:
            return no_update, no_update, no_update
        return key, no_update, html.Div(f"Selected #{record['label']} {record['formula']}: shown in the Candidates "
                                        "tab", className="wl-note")
    hull = context.sessions.get(session, "hull") or {}
    try:
        ref = hull["references"][int(str(key)[len(REFERENCE_PREFIX):])]
    except (KeyError, IndexError, ValueError):
        return no_update, no_update, no_update
    if not ref.get("structure"):
        return no_update, no_update, html.Div(f"{ref['formula']} ({ref['source']}): no structure kept for this "
                                              "phase; rebuild the hull", className="wl-note")
    from pymatgen.core import Structure

    title = f"{ref['formula']} ({ref['source']}, reference relaxed with {hull.get('potential', 'the potential')})"
    payload = structure_payload(Structure.from_dict(ref["structure"]), title, f"reference:{ref['source']}")
    return no_update, payload, html.Div(f"{ref['formula']} ({ref['source']}): shown in the Candidates tab",
                                        className="wl-note")


class HullView(Widget):
    """The phase diagram with reference phases and relaxed candidates, plus the e_above_hull histogram."""

    default_prefix = "wl-hull"

    def layout(self):
        return html.Div([
            html.Div([
                html.H2("7 · Convex hull", className="wl-step"),
                html.Button("Build hull", id=self.id("build"), n_clicks=0, className="button is-link is-small",
                            title="relax the reference phases of the chemical system (cached) and place the "
                                  "relaxed candidates"),
                html.Button("Cancel", id=self.id("cancel"), n_clicks=0, disabled=True,
                            className="button is-light is-small"),
                html.Span(id=self.id("progress-label"), className="wl-progress-label"),
            ], className="wl-row"),
            html.Div(id=self.id("status"), className="wl-status"),
            html.Div([
                dcc.Graph(id=self.id("diagram"), responsive=True, style={"height": "460px"}, figure=hull_figure(None, []), config={"displaylogo": False},
                          className="wl-grow"),
                dcc.Graph(id=self.id("histogram"), responsive=True, style={"height": "320px"}, figure=hull_histogram([]), config={"displaylogo": False},
                          className="wl-side"),
            ], className="wl-columns"),
        ], className="wl-panel", id=self.id("panel"))

    def register(self, app):
        context = self.context

        @app.callback(
            Output(self.id("diagram"), "figure"),
            Output(self.id("histogram"), "figure"),
            Input(self.links.revision, "data"),
            State(self.links.session, "data"),
        )
        def show(_revision, session):
            sid = (session or {}).get("sid")
            records = context.sessions.candidates(sid)
            try:
                return hull_figure(context.sessions.get(sid, "hull"), records), hull_histogram(records)
            except Exception as exc:  # a degenerate hull must not break the page
                figure = hull_figure(None, [])
                figure.update_layout(title=f"Cannot draw this hull: {exc}")
                return figure, hull_histogram(records)

        @app.callback(
            Output(self.links.selected, "data", allow_duplicate=True),
            Output(self.links.structure, "data", allow_duplicate=True),
            Output(self.id("status"), "children", allow_duplicate=True),
            Input(self.id("diagram"), "clickData"),
            State(self.links.session, "data"),
            prevent_initial_call=True,
        )
        def select(click, session):
            """A candidate's point selects it everywhere; a reference phase's shows its relaxed structure."""
            return clicked_point(context, (session or {}).get("sid"), click)

        @app.callback(
            Output(self.links.revision, "data", allow_duplicate=True),
            Output(self.id("status"), "children"),
            Input(self.id("build"), "n_clicks"),
            State(self.links.session, "data"),
            State(self.id("cancel"), "n_clicks"),
            background=True,
            running=[(Output(self.id("build"), "disabled"), True, False),
                     (Output(self.id("cancel"), "disabled"), False, True)],
            cancel=[Input(self.id("cancel"), "n_clicks")],
            progress=[Output(self.id("progress-label"), "children")],
            interval=context.settings.progress_interval_ms, prevent_initial_call=True,
        )
        def build(set_progress, _clicks, session, cancel_clicks):
            sid = (session or {}).get("sid")
            try:
                summary = hull_for_session(context, sid, lambda done, total, label: set_progress(label),
                                           cancelled=cancel_check(context, sid, CANCEL_KIND, cancel_clicks))
            except JobCancelled as exc:
                set_progress("")
                return no_update, html.Div(str(exc), className="wl-message is-warning")
            except Exception as exc:  # JobError: the user's to fix; anything else: reported, never a broken page
                set_progress("")
                text = str(exc) if isinstance(exc, JobError) else unexpected(exc)
                return no_update, html.Div(text, className="wl-message is-danger")
            set_progress("")
            return revision(), html.Div(hull_message(summary), className="wl-message is-success")

        self.register_cancel_record(app, CANCEL_KIND, HULL_CANCELLED)
