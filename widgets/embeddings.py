"""Step 8, embeddings: t-SNE maps of a generator's learned element and space-group embeddings, and
a map of the generated candidates among the reference structures of their chemical system.

The candidate map needs no model: each structure is described by its composition, volume and density and a
radial distribution of interatomic distances, so the map works for every generator.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html, no_update
from pymatgen.core import Element, Structure
from wyckoff_lab.core.symmetry import spacegroup
from wyckoff_lab.widgets.base import Widget
from wyckoff_lab.widgets.chemistry import element_family
from wyckoff_lab.widgets.records import record_structure

TAB_NAME = "embeddings"
RDF_BINS = np.linspace(1.0, 6.0, 26)  # Å
MAX_REFERENCES_ON_MAP = 400
SYSTEM_COLORS = {"triclinic": "#8c564b", "monoclinic": "#9467bd", "orthorhombic": "#2ca02c",
                 "tetragonal": "#1f77b4", "trigonal": "#ff7f0e", "hexagonal": "#d62728", "cubic": "#17becf"}


def tsne_2d(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """2D t-SNE with a perplexity suited to small sets (PCA for fewer than 5 points, where t-SNE is undefined)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    vectors = np.asarray(vectors, dtype=float)
    n = len(vectors)
    if n < 3:  # nothing to embed: points on a line
        return np.c_[np.arange(n, dtype=float), np.zeros(n)]
    if n < 5:
        return PCA(n_components=2).fit_transform(vectors)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                max_iter=500).fit_transform(vectors)


def structure_features(structure: Structure, elements: list[str]) -> np.ndarray:
    """Composition fractions over the chemical system, volume per atom, density, and a normalised histogram of
    interatomic distances (1–6 Å): a model-free description in which similar crystals lie close together."""
    comp = structure.composition
    fractions = [comp.get_atomic_fraction(el) for el in elements]
    n = len(structure)
    distances = structure.get_neighbor_list(RDF_BINS[-1])[3]
    rdf, _ = np.histogram(distances, bins=RDF_BINS)
    rdf = rdf / max(n, 1)
    rdf = rdf / (np.linalg.norm(rdf) or 1.0)
    return np.concatenate([3 * np.array(fractions), [structure.volume / n / 20.0, structure.density / 10.0], rdf])


def element_figure(symbols: list[str], coords: np.ndarray) -> go.Figure:
    figure = go.Figure()
    families = [element_family(s) for s in symbols]
    for family in sorted(set(families)):
        idx = [i for i, f in enumerate(families) if f == family]
        figure.add_trace(go.Scatter(x=coords[idx, 0], y=coords[idx, 1], mode="markers+text", name=family,
                                    text=[symbols[i] for i in idx], textposition="top center",
                                    marker={"size": 9}, hovertext=[Element(symbols[i]).long_name for i in idx],
                                    hoverinfo="text"))
    return _map_layout(figure, "Element embeddings (t-SNE), by family")


def spacegroup_figure(numbers: list[int], coords: np.ndarray) -> go.Figure:
    figure = go.Figure()
    systems = [spacegroup(n).crystal_system for n in numbers]
    for system in SYSTEM_COLORS:
        idx = [i for i, s in enumerate(systems) if s == system]
        if idx:
            figure.add_trace(go.Scatter(
                x=coords[idx, 0], y=coords[idx, 1], mode="markers", name=system,
                marker={"size": 8, "color": SYSTEM_COLORS[system]},
                hovertext=[f"{numbers[i]} {spacegroup(numbers[i]).symbol}" for i in idx], hoverinfo="text"))
    return _map_layout(figure, "Space-group embeddings (t-SNE), by crystal system")


def _map_layout(figure: go.Figure, title: str, height: int = 420) -> go.Figure:
    figure.update_layout(template="plotly_white", height=height, title={"text": title, "font": {"size": 13}},
                         margin={"l": 20, "r": 20, "t": 40, "b": 20}, legend={"font": {"size": 10}},
                         xaxis={"showticklabels": False, "title": ""}, yaxis={"showticklabels": False, "title": ""})
    return figure


def message_figure(text: str) -> go.Figure:
    figure = go.Figure()
    figure.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                          font={"size": 13, "color": "#666"})
    return _map_layout(figure, "", height=300)


def candidate_map(records: list[dict], references: list[tuple[str, Structure, dict]], colour: str) -> go.Figure:
    """t-SNE of candidates (diamonds, clickable) and reference structures (circles) of the same chemistry."""
    elements = sorted({el for r in records for el in r["elements"]}, key=lambda e: Element(e).Z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structures = [record_structure(r) for r in records]
        features = [structure_features(s, elements) for s in structures]
        features += [structure_features(s, elements) for _, s, _ in references]
    coords = tsne_2d(np.array(features))
    cand, ref = coords[:len(records)], coords[len(records):]
    figure = go.Figure()
    if len(ref):
        ref_sg = [p.get("spacegroup") for _, _, p in references]
        figure.add_trace(go.Scatter(
            x=ref[:, 0], y=ref[:, 1], mode="markers", name="MP-20 reference",
            marker={"size": 7, "color": "#bbb", "line": {"width": 1, "color": "#777"}},
            hovertext=[f"{mid} {p['formula']} SG {sg or '?'}" for (mid, _, p), sg in zip(references, ref_sg)],
            hoverinfo="text"))
    hover = [f"#{r['label']} {r['formula']} {r['sg_label']}" + (
        f"<br>E hull {1000 * r['e_above_hull']:.0f} meV/atom" if r.get("e_above_hull") is not None else "")
        for r in records]
    if colour == "e_above_hull":
        values = [r.get("e_above_hull") for r in records]
        known = [i for i, v in enumerate(values) if v is not None]
        unknown = [i for i, v in enumerate(values) if v is None]
        if known:
            figure.add_trace(go.Scatter(
                x=cand[known, 0], y=cand[known, 1], mode="markers", name="candidates (E hull)",
                marker={"size": 11, "symbol": "diamond", "color": [values[i] for i in known], "cmin": 0,
                        "cmax": 0.3, "colorscale": "Viridis", "colorbar": {"title": "E hull", "len": 0.6}},
                hovertext=[hover[i] for i in known], hoverinfo="text",
                customdata=[records[i]["id"] for i in known]))
        if unknown:
            figure.add_trace(go.Scatter(
                x=cand[unknown, 0], y=cand[unknown, 1], mode="markers", name="candidates (not on a hull yet)",
                marker={"size": 10, "symbol": "diamond-open", "color": "#3273dc"},
                hovertext=[hover[i] for i in unknown], hoverinfo="text",
                customdata=[records[i]["id"] for i in unknown]))
    else:
        systems = [spacegroup(r["spacegroup"]).crystal_system if r.get("spacegroup") else "unknown" for r in records]
        for system in [*SYSTEM_COLORS, "unknown"]:
            idx = [i for i, s in enumerate(systems) if s == system]
            if idx:
                figure.add_trace(go.Scatter(
                    x=cand[idx, 0], y=cand[idx, 1], mode="markers", name=f"candidates, {system}",
                    marker={"size": 11, "symbol": "diamond", "color": SYSTEM_COLORS.get(system, "#000")},
                    hovertext=[hover[i] for i in idx], hoverinfo="text", customdata=[records[i]["id"] for i in idx]))
    return _map_layout(figure, f"{len(records)} candidates and {len(references)} reference structures (t-SNE of "
                       "composition, density and distance histograms)", height=480)


class EmbeddingView(Widget):
    """Learned embeddings of a model and a map of the candidates among the references."""

    default_prefix = "wl-emb"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._maps: dict[int, tuple[go.Figure, go.Figure]] = {}
        self._lock = threading.Lock()

    def page_stores(self):
        return self.links.stores(tab=TAB_NAME)

    def layout(self):
        return html.Div([
            html.H2("8 · Embeddings", className="wl-step"),
            html.Div([
                html.Label("Colour candidates by ", className="label is-small"),
                dcc.RadioItems(id=self.id("colour"), value="e_above_hull", inline=True,
                               options=[{"label": " E above hull ", "value": "e_above_hull"},
                                        {"label": " crystal system", "value": "system"}]),
            ], className="wl-row"),
            dcc.Loading(dcc.Graph(id=self.id("candidates"), responsive=True, style={"height": "480px"}, figure=message_figure("Open this tab to compute"),
                                  config={"displaylogo": False})),
            html.Div(id=self.id("model-message"), className="wl-note"),
            html.Div([
                dcc.Loading(dcc.Graph(id=self.id("elements"), responsive=True, style={"height": "420px"}, figure=message_figure(""),
                                      config={"displaylogo": False}), parent_className="wl-grow"),
                dcc.Loading(dcc.Graph(id=self.id("spacegroups"), responsive=True, style={"height": "420px"}, figure=message_figure(""),
                                      config={"displaylogo": False}), parent_className="wl-grow"),
            ], className="wl-columns"),
        ], className="wl-panel", id=self.id("panel"))

    def model_maps(self) -> tuple[go.Figure, go.Figure, str]:
        """Element and space-group t-SNE maps of the most preferred generator that has learned embeddings
        (`Generator.has_learned_embeddings`; computed once per loaded model)."""
        from wyckoff_lab.core.generators import generator_class

        names = [n for n in self.context.generator_names() if generator_class(n).has_learned_embeddings]
        if not names:
            text = "No registered generator has learned embeddings to show"
            return message_figure(text), message_figure(text), text
        usable = [n for n in names if self.context.generator_status(n)[0]]
        if not usable:
            text = f"No weights for {', '.join(names)}, so no learned embeddings to show"
            return (message_figure(text), message_figure(text),
                    f"{text}: {self.context.generator_status(names[0])[1]}")
        name = usable[0]
        generator = self.context.generator(name)
        with self._lock:
            key = id(getattr(generator, "model", generator))
            if key not in self._maps:
                embeddings = generator.learned_embeddings()
                symbols, vectors = embeddings["elements"]
                seen = set(getattr(generator, "seen_elements", ())) or set(symbols)
                keep = [i for i, s in enumerate(symbols) if s in seen]
                element_map = element_figure([symbols[i] for i in keep], tsne_2d(vectors[keep]))
                numbers, vectors = embeddings["spacegroups"]
                seen_groups = set(getattr(generator, "seen_spacegroups", ())) or set(numbers)
                keep = [i for i, n in enumerate(numbers) if n in seen_groups]
                group_map = spacegroup_figure([numbers[i] for i in keep], tsne_2d(vectors[keep]))
                self._maps[key] = (element_map, group_map)
        element_map, group_map = self._maps[key]
        return element_map, group_map, (f"Embeddings of {name}: {len(element_map.data)} element "
                                        f"families, {sum(len(t.x) for t in group_map.data)} space groups seen in "
                                        "training")

    def register(self, app):
        context = self.context

        @app.callback(
            Output(self.id("elements"), "figure"),
            Output(self.id("spacegroups"), "figure"),
            Output(self.id("model-message"), "children"),
            Input(self.links.tab, "data"),
        )
        def show_model(tab):
            if tab != TAB_NAME:
                return no_update, no_update, no_update
            try:
                return self.model_maps()
            except Exception as exc:  # a model without embeddings must not break the page
                return message_figure(str(exc)), message_figure(str(exc)), f"Cannot map the embeddings: {exc}"

        @app.callback(
            Output(self.id("candidates"), "figure"),
            Input(self.links.tab, "data"),
            Input(self.links.revision, "data"),
            Input(self.id("colour"), "value"),
            State(self.links.session, "data"),
        )
        def show_candidates(tab, _revision, colour, session):
            if tab != TAB_NAME:
                return no_update
            records = context.sessions.candidates((session or {}).get("sid"))
            if not records:
                return message_figure("Generate candidates to see them among the reference structures")
            elements = sorted({el for r in records for el in r["elements"]})
            references = []
            refset = context.references()
            if refset is not None and len(elements) <= 5:
                references = refset.structures_in(elements, limit=MAX_REFERENCES_ON_MAP)
            try:
                return candidate_map(records, references, colour)
            except Exception as exc:
                return message_figure(f"Cannot compute the map: {exc}")

        @app.callback(
            Output(self.links.selected, "data", allow_duplicate=True),
            Input(self.id("candidates"), "clickData"),
            prevent_initial_call=True,
        )
        def select(click):
            point = (click or {}).get("points", [{}])[0]
            return point.get("customdata") or no_update
