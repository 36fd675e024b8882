"""The whole Wyckoff Lab workflow on one page: chemistry, symmetry and generation on the left; candidates with
the 3D view and live relaxation, the hull, the embedding maps and the teaching view in tabs on the right."""

from __future__ import annotations

import json

from dash import Input, Output, State, dcc, html, no_update
from wyckoff_lab.widgets.base import Widget
from wyckoff_lab.widgets.candidates import CandidateTable
from wyckoff_lab.widgets.chemistry import ChemistryPicker
from wyckoff_lab.widgets.context import WARMUP_WAIT_S
from wyckoff_lab.widgets.discover import DiscoverPanel
from wyckoff_lab.widgets.embeddings import TAB_NAME as EMBEDDINGS_TAB
from wyckoff_lab.widgets.embeddings import EmbeddingView
from wyckoff_lab.widgets.generate import GeneratePanel
from wyckoff_lab.widgets.hull import HullView
from wyckoff_lab.widgets.relaxation import RelaxPanel
from wyckoff_lab.widgets.structure_view import StructureView
from wyckoff_lab.widgets.symmetry import SymmetryPanel
from wyckoff_lab.widgets.teach import TeachView

TABS = (("candidates", "Candidates"), ("hull", "Hull"), (EMBEDDINGS_TAB, "Embeddings"), ("teach", "Teach"))


class Explorer(Widget):
    """The full app. `Explorer(elements=["Al", "Ca", "Cu"])` in Jupyter shows it inline; `wyckoff-lab app` serves it.

    Arguments preset the first steps: elements, formula, max_atoms, spacegroup, template. In Jupyter, `port` is
    where its server listens on 127.0.0.1 (None: a free one), `path_prefix` the path the browser reaches it under
    behind jupyter-server-proxy (None: from the environment, see `wyckoff_lab.widgets.jupyter`), `height` the
    iframe's height in pixels.
    """

    default_prefix = "wl"
    default_height = 900

    def __init__(self, elements=(), formula: str | None = None, max_atoms: int = 20, spacegroup: int | None = None,
                 template=(), **kwargs):
        super().__init__(**kwargs)  # (context, links, prefix; port, path_prefix, height for Jupyter)
        shared = {"context": self.context, "links": self.links}
        self.chemistry = ChemistryPicker(elements=elements, formula=formula, max_atoms=max_atoms, **shared)
        self.symmetry = SymmetryPanel(spacegroup_number=spacegroup, template=template, **shared)
        self.generate = GeneratePanel(**shared)
        self.discover = DiscoverPanel(**shared)
        self.candidates = CandidateTable(**shared)
        self.view = StructureView(follow_selection=True, **shared)
        self.relax = RelaxPanel(**shared)
        self.hull = HullView(**shared)
        self.embeddings = EmbeddingView(**shared)
        self.teach = TeachView(**shared)
        self.children = [self.chemistry, self.symmetry, self.generate, self.discover, self.candidates, self.view,
                         self.relax, self.hull, self.embeddings, self.teach]

    @property
    def ct_components(self):
        return [c for child in self.children for c in child.ct_components]

    def page_stores(self):
        return self.links.stores(chemistry=self.chemistry.initial, symmetry=self.symmetry.initial, tab="candidates")

    def header(self):
        return html.Header([
            html.Div([html.Span("Wyckoff Lab", className="wl-brand"),
                      html.Span("generate · relax · judge symmetric crystals", className="wl-tagline")]),
            html.Div("loading models and reference data…", id=self.id("resources"), className="wl-resources"),
        ], className="wl-header")

    def resources(self) -> list:
        """Header tags saying what this session runs on: reference data and potential (after warm-up)."""
        context = self.context
        context.ready.wait(WARMUP_WAIT_S)
        refs = context.references()
        data = (f"{context.settings.dataset}: {len(refs.dataset):,} reference structures" if refs is not None
                else "no reference data: novelty and hulls unavailable")
        return [html.Span(data, className="tag is-light", title=context.reference_error or ""),
                html.Span(f"potential: {context.potential_label()}", className="tag is-light")]

    def tab_content(self, tab: str) -> list:
        """The panels of one tab."""
        if tab == "candidates":
            return [self.candidates.layout(),
                    html.Div([html.Div(self.view.layout(), className="wl-grow"),
                              html.Div(self.relax.layout(), className="wl-relax-column")], className="wl-columns")]
        return [{"hull": self.hull, EMBEDDINGS_TAB: self.embeddings, "teach": self.teach}[tab].layout()]

    def layout(self):
        # Only the first tab is built with the page; the others are mounted the first time they are opened (their
        # figures and 3D scene would otherwise cost the browser seconds before the page answers a click). Once
        # mounted, a tab only changes visibility: a Crystal Toolkit scene is never torn down while its renderer is
        # still drawing (that raised errors in the browser console).
        tabs = [dcc.Tabs(id=self.id("tabs"), value="candidates", className="wl-tabs", children=[
                    dcc.Tab(label=label, value=value, className="wl-tab", selected_className="wl-tab--selected")
                    for value, label in TABS])]
        tabs += [html.Div(self.tab_content(value) if value == "candidates" else [], id=self.id(f"tab-{value}"),
                          style={} if value == "candidates" else {"display": "none"}) for value, _ in TABS]
        return html.Div([
            self.header(),
            html.Div([
                html.Aside([self.chemistry.layout(), self.symmetry.layout(), self.generate.layout(),
                            self.discover.layout()], className="wl-sidebar"),
                html.Main(tabs, className="wl-main"),
            ], className="wl-body"),
        ], id=self.id("explorer"))

    def register(self, app):
        for child in self.children:
            child.register(app)
        app.clientside_callback(
            "function (tab) {\n"
            f"    const panels = {json.dumps([value for value, _ in TABS])};\n"
            "    return [tab].concat(panels.map(p => p === tab ? {} : {display: 'none'}));\n"
            "}",
            Output(self.links.tab, "data"),
            *[Output(self.id(f"tab-{value}"), "style") for value, _ in TABS],
            Input(self.id("tabs"), "value"))
        lazy = [value for value, _ in TABS if value != "candidates"]

        @app.callback(*[Output(self.id(f"tab-{value}"), "children") for value in lazy],
                      Input(self.id("tabs"), "value"),
                      *[State(self.id(f"tab-{value}"), "children") for value in lazy],
                      prevent_initial_call=True)
        def mount_tab(tab, *mounted):
            """Build a tab's panels the first time it is opened; afterwards leave them alone."""
            return [self.tab_content(value) if value == tab and not children else no_update
                    for value, children in zip(lazy, mounted)]

        app.callback(Output(self.id("resources"), "children"), Input(self.links.session, "data"))(
            lambda _session: self.resources())


def create_app(context=None, path_prefix: str | None = None, **explorer_kwargs):
    """The Explorer as a standalone Dash app (what `wyckoff-lab app` serves). `path_prefix`: the path a reverse
    proxy serves it under and strips before forwarding (e.g. "/proxy/8050/"); the page requests everything there."""
    from wyckoff_lab.widgets.base import build_app, default_context
    from wyckoff_lab.widgets.jupyter import checked_prefix, dash_requests_prefix

    prefix = checked_prefix(path_prefix) if path_prefix is not None else None
    context = context or default_context()
    explorer = Explorer(context=context, **explorer_kwargs)
    with dash_requests_prefix(prefix):
        return build_app([explorer], context, title="Wyckoff Lab", extra_stores=explorer.page_stores)
