"""Step 7, the hull: the chemical system's phase diagram from ML-relaxed reference phases with the relaxed
candidates placed on it, and their e_above_hull histogram. Clicking a candidate selects it."""

from __future__ import annotations

import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html, no_update
from pymatgen.core import Composition
from wyckoff_lab.widgets.base import Widget
from wyckoff_lab.widgets.chemistry import system_text
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
# The colour scale spans 0-0.5 eV/atom, where generated candidates mostly lie (at 0.3 most of them saturated);
# anything further above the hull takes the top colour, and the colour bar says "≥ 0.5".
MAX_HULL_COLOR_EV = 0.5
DIAGRAM_HEIGHT_PX = 640  # the diagram is the tab's main element: full width, this tall
HISTOGRAM_HEIGHT_PX = 300
# Label placement assumes at least this triangle side / plot width (px); a wider figure only spreads labels apart.
NOMINAL_PLOT_PX = 440
LABEL_FONT_PX = 12
LABEL_CHAR_PX = 7.4  # an upper bound on the width of one character of a formula at LABEL_FONT_PX (Open Sans)
LABEL_HEIGHT_PX = 16
MARKER_GAP_PX = 7  # plotly leaves about this much between a marker's centre and its text
# Plotly's text positions around a marker, in order of preference (vertical, horizontal: -1, 0, 1).
TEXT_POSITIONS = {"top center": (1, 0), "bottom center": (-1, 0), "middle right": (0, 1), "middle left": (0, -1),
                  "top right": (1, 1), "top left": (1, -1), "bottom right": (-1, 1), "bottom left": (-1, -1)}
LAYOUT_MARGIN = {"l": 60, "r": 40, "t": 80, "b": 60}  # the title sits in the top margin, clear of the plot


def _fractions(composition: dict | Composition, elements: list[str]) -> list[float]:
    comp = Composition(composition)
    return [comp.get_atomic_fraction(el) for el in elements]


def _candidate_points(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("e_above_hull") is not None and r.get("formation_energy_per_atom") is not None]


def _reference_hover(r: dict) -> str:
    return (f"{r['formula']} ({r['source']})<br>E_f = {r['formation_energy_per_atom']:.3f} eV/atom"
            f"<br>E above hull = {r['e_above_hull']:.3f} eV/atom")


def _candidate_hover(r: dict) -> str:
    return (f"#{r['label']} {r['formula']} {r['sg_label']}<br>E_f = {r['formation_energy_per_atom']:.3f} eV/atom"
            f"<br>E above hull = {r['e_above_hull']:.3f} eV/atom")


def ternary_xy(fractions: list[float]) -> tuple[float, float]:
    """Plotly's ternary layout in units of the triangle's side: b at (0, 0), c at (1, 0), a at the top."""
    a, b, c = fractions
    total = (a + b + c) or 1.0
    return (c + a / 2) / total, (3 ** 0.5 / 2) * a / total


def label_box(x: float, y: float, text: str, position: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in px, y up, of `text` drawn at `position` around a marker at (x, y) px."""
    width, height = LABEL_CHAR_PX * len(text) + 2, LABEL_HEIGHT_PX
    vertical, horizontal = TEXT_POSITIONS[position]
    cx = x + horizontal * (width / 2 + MARKER_GAP_PX)
    cy = y + vertical * (height / 2 + MARKER_GAP_PX)
    return cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def place_labels(points_px: list[tuple[float, float]], texts: list[str],
                 bounds: tuple[float, float, float, float] | None = None) -> list[str | None]:
    """A plotly text position for each point's label such that no two labels and no label and marker overlap,
    or None where every position would (that label is left to the hover). Deterministic and greedy: the most
    crowded points choose first, each the first of TEXT_POSITIONS with no overlap (inside `bounds` if given)."""
    markers = [(x - 5, y - 5, x + 5, y + 5) for x, y in points_px]

    def crowding(i):
        x, y = points_px[i]
        return -sum(1 for (u, v) in points_px if abs(u - x) < 60 and abs(v - y) < 30), texts[i], i

    placed: list[tuple[float, float, float, float]] = []
    chosen: list[str | None] = [None] * len(points_px)
    for i in sorted(range(len(points_px)), key=crowding):
        for position in TEXT_POSITIONS:
            box = label_box(*points_px[i], texts[i], position)
            if bounds and (box[0] < bounds[0] or box[1] < bounds[1] or box[2] > bounds[2] or box[3] > bounds[3]):
                continue
            if any(_overlap(box, other) > 0 for other in placed) or any(
                    _overlap(box, m) > 0 for j, m in enumerate(markers) if j != i):
                continue
            chosen[i] = position
            placed.append(box)
            break
    return chosen


def _labelled(texts: list[str], positions: list[str | None]) -> dict:
    """Scatter text arguments: a label where it has a place, none where it would overlap another."""
    return {"text": [t if p else "" for t, p in zip(texts, positions)],
            "textposition": [p or "top center" for p in positions],
            "textfont": {"size": LABEL_FONT_PX}}


def colour_bar() -> dict:
    ticks = [0.0, 0.1, 0.2, 0.3, 0.4, MAX_HULL_COLOR_EV]
    return {"title": {"text": "E above hull<br>(eV/atom)", "side": "top"}, "len": 0.75, "tickvals": ticks,
            "ticktext": [f"{t:g}" for t in ticks[:-1]] + [f"≥ {MAX_HULL_COLOR_EV:g}"]}


def hull_figure(hull: dict | None, records: list[dict]) -> go.Figure:
    """Binary: formation energy against composition with the hull line; ternary: a composition triangle with tie
    lines; unary or more than three elements: energies above the hull against formula. Stable phases are
    labelled where a label fits without overlapping another (`place_labels`); all points have hover text."""
    figure = go.Figure()
    figure.update_layout(template="plotly_white", height=DIAGRAM_HEIGHT_PX, margin=LAYOUT_MARGIN,
                         legend={"orientation": "h", "y": -0.06, "x": 0}, modebar={"orientation": "v"})
    if not hull:
        # A centred note on empty axes: as a title, the long text ran under the plot's toolbar.
        figure.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, annotations=[{
            "text": "No hull yet: press “Build hull” (or “Relax all”)", "showarrow": False,
            "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5, "font": {"size": 15}}])
        return figure
    elements = hull["elements"]
    refs = hull["references"]
    points = _candidate_points(records)
    title = f"{system_text(elements)} convex hull ({hull['potential']}, {len(refs)} reference phases)"
    hover_cand = [_candidate_hover(r) for r in points]
    marker_cand = {"size": 10, "symbol": "diamond", "color": [min(r["e_above_hull"], MAX_HULL_COLOR_EV)
                                                                for r in points],
                   "colorscale": HULL_COLORSCALE, "cmin": 0, "cmax": MAX_HULL_COLOR_EV, "line": {"width": 1},
                   "colorbar": colour_bar()}
    for i, r in enumerate(refs):
        r.setdefault("key", f"{REFERENCE_PREFIX}{i}")
    stable = [r for r in refs if r["on_hull"]]
    unstable = [r for r in refs if not r["on_hull"]]
    if len(elements) == 2:
        x_of = lambda comp: Composition(comp).get_atomic_fraction(elements[1])
        line = sorted(stable, key=lambda r: x_of(r["composition"]))
        energies = [r["formation_energy_per_atom"] for r in refs] + [r["formation_energy_per_atom"] for r in points]
        low, high = min(energies + [0.0]), max(energies + [0.0])
        span = (high - low) or 1.0
        to_px = lambda x, e: (NOMINAL_PLOT_PX * x, NOMINAL_PLOT_PX * 0.8 * (e - low) / span)
        positions = place_labels([to_px(x_of(r["composition"]), r["formation_energy_per_atom"]) for r in line],
                                 [r["formula"] for r in line])
        figure.add_trace(go.Scatter(x=[x_of(r["composition"]) for r in line],
                                    y=[r["formation_energy_per_atom"] for r in line], mode="lines+markers+text",
                                    name="hull (stable phases)", line={"color": "black"},
                                    marker={"size": 9, "color": "black"},
                                    **_labelled([r["formula"] for r in line], positions),
                                    hovertext=[_reference_hover(r) for r in line], hoverinfo="text",
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
        pad = 0.12 * span
        figure.update_layout(xaxis={"title": f"fraction of {elements[1]} (rest {elements[0]})", "range": [-0.05, 1.05]},
                             yaxis={"title": "formation energy (eV/atom)", "range": [low - pad, high + pad]})
    elif len(elements) == 3:
        def tern(comps):
            fr = [_fractions(c, elements) for c in comps]
            return {"a": [f[0] for f in fr], "b": [f[1] for f in fr], "c": [f[2] for f in fr]}

        for a, b in hull["tie_lines"]:  # found once, when the hull was built (jobs.hull_data)
            figure.add_trace(go.Scatterternary(**tern([a, b]), mode="lines", line={"color": "black", "width": 1},
                                               hoverinfo="skip", showlegend=False))
        xy = [ternary_xy(_fractions(r["composition"], elements)) for r in stable]
        positions = place_labels([(NOMINAL_PLOT_PX * x, NOMINAL_PLOT_PX * y) for x, y in xy],
                                 [r["formula"] for r in stable])
        figure.add_trace(go.Scatterternary(**tern([r["composition"] for r in stable]), mode="markers+text",
                                           name="stable reference", marker={"size": 9, "color": "black"},
                                           **_labelled([r["formula"] for r in stable], positions),
                                           hovertext=[_reference_hover(r) for r in stable],
                                           hoverinfo="text", customdata=[r["key"] for r in stable]))
        figure.add_trace(go.Scatterternary(**tern([r["composition"] for r in unstable]), mode="markers",
                                           name="reference, above hull", marker={"size": 7, "color": "#999"},
                                           hovertext=[_reference_hover(r) for r in unstable],
                                           hoverinfo="text", customdata=[r["key"] for r in unstable]))
        figure.add_trace(go.Scatterternary(**tern([r["formula"] for r in points]), mode="markers",
                                           name="candidates", marker=marker_cand, hovertext=hover_cand,
                                           hoverinfo="text", customdata=[r["id"] for r in points]))
        hidden = sum(p is None for p in positions)
        if hidden:
            title += f" · {hidden} crowded labels on hover"
        figure.update_layout(ternary={"aaxis": {"title": elements[0]}, "baxis": {"title": elements[1]},
                                      "caxis": {"title": elements[2]}, "domain": {"x": [0, 0.9], "y": [0, 1]}})
    else:
        ordered = sorted(points, key=lambda r: r["e_above_hull"])
        figure.add_trace(go.Scatter(x=[f"#{r['label']} {r['formula']}" for r in ordered],
                                    y=[r["e_above_hull"] for r in ordered], mode="markers", name="candidates",
                                    marker=marker_cand, text=[_candidate_hover(r) for r in ordered],
                                    hoverinfo="text", customdata=[r["id"] for r in ordered]))
        figure.update_layout(yaxis={"title": "E above hull (eV/atom)"},
                             xaxis={"title": "candidate (a composition diagram needs 2 or 3 elements)"})
    # Left-aligned in the top margin: the toolbar stands vertically at the right edge, away from it.
    figure.update_layout(title={"text": title, "font": {"size": 15}, "x": 0.01, "xanchor": "left", "y": 0.98,
                                "yanchor": "top"})
    return figure


def hull_histogram(records: list[dict]) -> go.Figure:
    values = [r["e_above_hull"] for r in records if r.get("e_above_hull") is not None]
    figure = go.Figure(go.Histogram(x=values, nbinsx=30, marker={"color": "#3273dc"}, name="candidates"))
    figure.add_vline(x=0.1, line_dash="dot", annotation_text="0.1 eV/atom", annotation_position="top right")
    figure.update_layout(template="plotly_white", height=HISTOGRAM_HEIGHT_PX, margin={"l": 50, "r": 40, "t": 50, "b": 40},
                         title={"text": f"E above hull of {len(values)} relaxed candidates", "font": {"size": 13},
                                "x": 0.01, "xanchor": "left"},
                         modebar={"orientation": "v"},
                         xaxis={"title": "E above hull (eV/atom)"}, yaxis={"title": "candidates"})
    return figure


class _Planned(Exception):
    """Raised from `before_relax` to stop a build at its plan (nothing relaxed)."""

    def __init__(self, plan):
        super().__init__(plan.describe())
        self.plan = plan


def hull_plan(book, elements):
    """What building the hull of `elements` with `book` (a `core.pipeline.HullBook`) would cost, without relaxing
    anything: the build's own plan (`HullPlan`: references, how many are not in the relaxation cache, a time
    estimate); a hull the cache already holds costs no relaxation."""
    from wyckoff_lab.core.hull import HullPlan, HullReference

    def stop(plan):
        raise _Planned(plan)

    try:
        hull = HullReference.build(tuple(sorted(elements)), book.potential, dataset=book.dataset, split="all",
                                   max_references=book.max_references, fmax=book.fmax, max_steps=book.max_steps,
                                   before_relax=stop)
    except _Planned as planned:
        return planned.plan
    return HullPlan(tuple(hull.elements), len(hull.references), 0, book.potential.device)


def build_offer(context, session: str | None) -> str:
    """The line beside "Build hull": what a build would cost, or that the session's hull is already shown (the
    tab never builds one unasked: that can mean minutes of relaxations)."""
    from wyckoff_lab.widgets.jobs import session_elements

    records = context.sessions.candidates(session) if session else []
    if not records:
        return "Generate candidates first; then “Build hull” relaxes the system's reference phases."
    elements = session_elements(records)
    hull = context.sessions.get(session, "hull")
    if hull and sorted(hull["elements"]) == sorted(elements):
        return f"The {system_text(elements)} hull of this session is shown; “Build hull” places new relaxations."
    if len(elements) > 5:
        return f"The candidates span {len(elements)} elements: a hull needs at most 5."
    try:
        plan = hull_plan(context.hull_book(), elements)
    except Exception as exc:  # no data offline, no potential: said here, the build would fail the same way
        return f"Cannot plan the {system_text(elements)} hull: {exc}"
    if plan.n_uncached == 0:
        return (f"“Build hull”: {plan.n_references} {system_text(elements)} reference phases, all relaxed before "
                "(seconds).")
    minutes = plan.estimated_s / 60
    when = f"about {minutes:.0f} min" if minutes >= 1 else f"about {plan.estimated_s:.0f} s"
    return (f"“Build hull” relaxes {plan.n_uncached} of {plan.n_references} {system_text(elements)} reference "
            f"phases not relaxed before ({when} on CPU).")


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
            html.Div(id=self.id("offer"), className="wl-note"),
            html.Div(id=self.id("status"), className="wl-status"),
            # The diagram is the tab's main element, full width; the histogram comes below it.
            dcc.Graph(id=self.id("diagram"), responsive=True, style={"height": f"{DIAGRAM_HEIGHT_PX}px", "width": "100%"},
                      figure=hull_figure(None, []), config={"displaylogo": False}),
            dcc.Graph(id=self.id("histogram"), responsive=True,
                      style={"height": f"{HISTOGRAM_HEIGHT_PX}px", "width": "100%"}, figure=hull_histogram([]),
                      config={"displaylogo": False}),
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
            Output(self.id("offer"), "children"),
            Input(self.id("panel"), "id"),  # when the tab is first mounted
            Input(self.links.revision, "data"),
            State(self.links.session, "data"),
        )
        def offer(_mounted, _revision, session):
            return build_offer(context, (session or {}).get("sid"))

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
        def build(set_progress, clicks, session, cancel_clicks):
            if not clicks:  # the tab being mounted fires this despite prevent_initial_call: build only on a click
                return no_update, no_update
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

        self.register_stale_status_clearing(app)

