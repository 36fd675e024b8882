"""Step 5, the 3D view: Crystal Toolkit's StructureMoleculeComponent (unit cell, bonds, polyhedra), coloured by
element or by Wyckoff orbit, with the orbit table of the shown structure beside it."""

from __future__ import annotations

import threading
import warnings

import numpy as np
from dash import Input, Output, State, dash_table, dcc, html, no_update
from monty.json import jsanitize
from pymatgen.core import Structure
from wyckoff_lab.core.symmetry import analyze_symmetry_of
from wyckoff_lab.widgets.base import Widget
from wyckoff_lab.widgets.records import SYMPREC, record_structure
from wyckoff_lab.widgets.security import payload_is_signed, sign_payload

ORBIT_PROPERTY = "Wyckoff orbit"  # categorical site property: Crystal Toolkit's legend colours by it
ELEMENT_SCHEME = "VESTA"
# Crystal Toolkit's scene frames the 3D diagonal of the scene's bounding box: a cell that is long along the line of
# sight (or any cell, by up to a factor of two) comes out small. Framing the extent across the screen instead makes
# the structure fill FRAME_FILL of the view, whatever its shape.
FRAME_FILL = 0.75
SCENE_SETTINGS = {"zoomToFit2D": True, "defaultZoom": FRAME_FILL}
# Crystal Toolkit's scene puts its camera on the +z axis (settings "cameraAxis" z, "cameraPosition" back) and puts it
# back there on every new scene: a camera state set from outside is undone by the next structure or relaxation
# frame. Lattices are stored with a along x and c near z, so the view looked down c, and atoms stacked along c hid
# one another. The view turns the drawn crystal instead (a rotation, never a mirror: handedness is kept), so that
# this direction, in units of the cell's own unit vectors (a/|a|, b/|b|, c/|c|), faces the camera with c up.
VIEW_DIRECTION = (1.0, 0.6, 0.4)


DISPLAY_COLOR = "display_color"  # Crystal Toolkit draws a site in this site property's colour, whatever the scheme
# Two colours closer than this CIELAB distance (CIE76 ΔE) read as the same on screen: VESTA's Al, Ca and Cu are three
# blues, Al and Ca only ΔE 11 apart.
MIN_DELTA_E = 30.0
# A qualitative palette for elements whose own colours clash, and for Wyckoff orbits (Okabe-Ito, then Tableau 10).
QUALITATIVE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000",
               "#4E79A7", "#F28E2B", "#E15759", "#76B7B2", "#59A14F", "#EDC948", "#B07AA1", "#FF9DA7",
               "#9C755F", "#BAB0AC")


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(c)):02x}" for c in rgb)


def _rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def cielab(color: str) -> tuple[float, float, float]:
    """CIELAB (D65) of an sRGB hex colour."""
    def linear(c):
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in _rgb(color))
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883
    f = lambda t: t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116
    fx, fy, fz = f(x), f(y), f(z)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def delta_e(first: str, second: str) -> float:
    """CIE76 colour difference of two hex colours."""
    return float(np.linalg.norm(np.subtract(cielab(first), cielab(second))))


def element_colors(elements, scheme: str = ELEMENT_SCHEME) -> dict[str, str]:
    """A colour per element, distinguishable within this set: each keeps its `scheme` (VESTA) colour unless that
    is within MIN_DELTA_E of a colour already given (elements by atomic number), and then takes the first
    QUALITATIVE colour at least MIN_DELTA_E from all of them (the most distant one if none is)."""
    from crystal_toolkit.core.legend import EL_COLORS
    from pymatgen.core import Element

    chosen: dict[str, str] = {}
    for symbol in sorted(set(elements), key=lambda e: Element(e).Z):
        own = _hex(EL_COLORS[scheme].get(symbol, EL_COLORS["Extras"].get(symbol, (128, 128, 128))))
        if all(delta_e(own, other) >= MIN_DELTA_E for other in chosen.values()):
            chosen[symbol] = own
            continue
        distance = lambda c: min(delta_e(c, other) for other in chosen.values())
        free = [c for c in QUALITATIVE if c not in chosen.values()]
        chosen[symbol] = next((c for c in free if distance(c) >= MIN_DELTA_E), max(free, key=distance))
    return chosen


def site_colors(structure: Structure, by: str) -> tuple[list[str], dict[str, str]]:
    """(a colour per site, label -> colour for the legend), by "element" or by Wyckoff orbit (the structure's
    ORBIT_PROPERTY, in order of first appearance)."""
    if by == "orbit" and ORBIT_PROPERTY in structure.site_properties:
        labels = list(dict.fromkeys(structure.site_properties[ORBIT_PROPERTY]))
        legend = {label: QUALITATIVE[i % len(QUALITATIVE)] for i, label in enumerate(labels)}
        return [legend[label] for label in structure.site_properties[ORBIT_PROPERTY]], legend
    legend = element_colors([site.specie.symbol for site in structure])
    return [legend[site.specie.symbol] for site in structure], legend


def legend_chips(legend: dict[str, str]) -> list:
    """The colour key, drawn beside the scene rather than over it (Crystal Toolkit's own pills hid atoms)."""
    def ink(color: str) -> str:
        r, g, b = _rgb(color)
        return "black" if (0.299 * r + 0.587 * g + 0.114 * b) / 255 > 0.5 else "white"

    return [html.Span(label, className="wl-legend-chip", style={"backgroundColor": color, "color": ink(color)})
            for label, color in legend.items()]


def annotate_orbits(structure: Structure, symprec: float = SYMPREC) -> tuple[Structure, str]:
    """A copy of `structure` whose sites carry their Wyckoff orbit ('Ca 4a') as a site property, and the space
    group label. Symmetry from spglib on this very cell (the analysis the records already ran, cached), so every
    displayed atom gets its own orbit."""
    annotated = structure.copy()
    dataset = analyze_symmetry_of(structure, symprec)
    if dataset is None:
        annotated.add_site_property(ORBIT_PROPERTY, [f"{site.specie} (no symmetry)" for site in structure])
        return annotated, "no symmetry found"
    group = dataset.spacegroup
    names: dict[int, str] = {}
    used: dict[str, int] = {}
    for index, orbit in enumerate(dataset.equivalent_atoms):
        orbit = int(orbit)
        if orbit not in names:
            letter = dataset.wyckoff_letters[index]
            base = f"{structure[index].specie} {group.wyckoff(letter).label}"
            used[base] = used.get(base, 0) + 1
            names[orbit] = base if used[base] == 1 else f"{base} ({used[base]})"
    annotated.add_site_property(ORBIT_PROPERTY, [names[int(o)] for o in dataset.equivalent_atoms])
    return annotated, f"{group.symbol} ({group.number})"


def orbit_rows(structure: Structure) -> list[dict]:
    """The Wyckoff form of a structure, one row per orbit: element, position, site symmetry, free parameters."""
    from wyckoff_lab.core.wyckoff import WyckoffCrystal, WyckoffError

    try:
        crystal = WyckoffCrystal.from_structure(structure)
    except WyckoffError as exc:
        return [{"element": "—", "wyckoff": "—", "site_symmetry": "—", "free": f"not representable: {exc}"}]
    rows = []
    for orbit in crystal.orbits:
        free = ", ".join(f"{n}={v:.3f}" for n, v in zip(orbit.position.free_parameter_names, orbit.free_params))
        rows.append({"element": orbit.element, "wyckoff": orbit.label, "site_symmetry": orbit.position.site_symmetry,
                     "free": free or "fixed"})
    return rows


def view_rotation(lattice, direction=VIEW_DIRECTION) -> np.ndarray:
    """The proper rotation (rows: screen right, up, towards the viewer) that turns `direction` (in units of the
    cell's unit vectors) onto +z, where Crystal Toolkit's camera sits, and the cell's c axis to point up on screen
    (its b axis where c is along the view)."""
    unit = lattice.matrix / np.linalg.norm(lattice.matrix, axis=1)[:, None]
    towards_viewer = np.asarray(direction, dtype=float) @ unit
    towards_viewer /= np.linalg.norm(towards_viewer)
    for axis in (unit[2], unit[1]):
        up = axis - (axis @ towards_viewer) * towards_viewer
        if np.linalg.norm(up) > 1e-6:
            break
    up /= np.linalg.norm(up)
    return np.array([np.cross(up, towards_viewer), up, towards_viewer])


def oblique_view(structure: Structure, direction=VIEW_DIRECTION) -> Structure:
    """The same crystal (lattice parameters, fractional coordinates, site properties) with its Cartesian frame
    turned by `view_rotation`: drawn by Crystal Toolkit, it is seen along `direction`, not down a cell axis."""
    rotation = view_rotation(structure.lattice, direction)
    return Structure(structure.lattice.matrix @ rotation.T, structure.species, structure.frac_coords,
                     site_properties=structure.site_properties)


def structure_payload(structure: Structure, title: str, source: str, bonds_key: str | None = None) -> dict:
    """What the shared structure store holds: the structure and how to title it.

    `bonds_key` names a series of frames of one structure (a relaxation): the bonds are found once, on the first
    frame, and drawn between the same atoms in every later frame, instead of running CrystalNN for each.
    """
    payload = {"structure": structure.as_dict(), "title": title, "source": source}
    if bonds_key:
        payload["bonds_key"] = bonds_key
    return sign_payload(payload)  # the view draws only payloads the server made (see `show`)


# Free parameters in full ("x=0.125, y=0.250, z=0.375"): cells wrap instead of being cut to the column's width.
ORBIT_TABLE_STYLE = {
    "style_cell": {"fontSize": 12, "padding": "2px 6px", "textAlign": "left", "whiteSpace": "normal",
                   "height": "auto", "overflow": "visible", "textOverflow": "clip"},
    "style_cell_conditional": [{"if": {"column_id": "free"}, "minWidth": "12em", "fontFamily": "monospace"}],
    "style_header": {"fontWeight": "bold"},
    "style_table": {"overflowX": "auto"},
}
BONDING = "CrystalNN"  # the 3D view's bonding strategy (Crystal Toolkit's settings panel can change it)


class BondCache:
    """CrystalNN bonds (site pairs with their periodic image) of the latest structures and relaxations.

    The 3D view draws a structure with bonds found here (Crystal Toolkit would find the same ones itself). A
    relaxation's frames are drawn with the bonds of its first frame, which is the structure shown before Relax was
    pressed, so no frame of a relaxation waits for CrystalNN (0.1-2 s per frame on two busy cores). Frames come
    wrapped into the cell: an atom that crosses a cell face keeps its bonds, with the periodic image that follows it.
    """

    def __init__(self, size: int = 32, tolerance: float = 1e-3):
        self.size = size
        self.tolerance = tolerance  # fractional: a frame this close to a known structure (modulo 1) shares its bonds
        self._entries: dict[str, tuple[np.ndarray, list]] = {}  # key -> (frac coords of the bonded frame, bonds)
        self._lock = threading.Lock()  # guards the entries
        self._finding = threading.Lock()  # one CrystalNN at a time: frames arriving meanwhile reuse its bonds

    @staticmethod
    def _fingerprint(structure: Structure) -> str:
        abc = np.round(structure.lattice.abc, 2)
        return "sites-" + " ".join(str(site.specie) for site in structure) + f"|{abc.tolist()}"

    def _lookup(self, structure: Structure, key: str | None):
        frac = structure.frac_coords
        with self._lock:
            if key and key in self._entries and len(self._entries[key][0]) == len(frac):
                return self._entries[key]
            for name in (self._fingerprint(structure),):
                for ref, bonds in self._entries.get(name, []):
                    if len(ref) == len(frac) and np.max(np.abs((frac - ref + 0.5) % 1.0 - 0.5)) < self.tolerance:
                        return ref, bonds
        return None

    def _remember(self, structure: Structure, key: str | None, entry: tuple[np.ndarray, list]) -> None:
        with self._lock:
            if key:
                self._entries[key] = entry
            name = self._fingerprint(structure)
            same = [e for e in self._entries.pop(name, []) if e[0] is not entry[0]]
            self._entries[name] = [entry, *same][:4]
            while len(self._entries) > self.size:
                self._entries.pop(next(iter(self._entries)))

    def graph(self, structure: Structure, key: str | None = None):
        """A StructureGraph of `structure` with the bonds of relaxation `key` if known, else of a known structure
        with the same sites (within `tolerance`), else found by CrystalNN now (and remembered under both)."""
        from pymatgen.analysis.graphs import StructureGraph

        entry = self._lookup(structure, key)
        if entry is None:
            with self._finding:
                entry = self._lookup(structure, key)  # found by another frame while this one waited
                if entry is None:
                    from pymatgen.analysis.local_env import CrystalNN

                    graph = StructureGraph.from_local_env_strategy(structure, CrystalNN())
                    bonds = [(int(u), int(v), tuple(int(x) for x in data["to_jimage"]))
                             for u, v, data in graph.graph.edges(data=True)]
                    self._remember(structure, key, (structure.frac_coords.copy(), bonds))
                    return graph
        self._remember(structure, key, entry)
        reference, bonds = entry
        # Whole cells each site moved by since the bonded frame (wrapping), applied to the bond's periodic image.
        shift = np.round(reference - structure.frac_coords).astype(int)
        edges = {(u, v, (0, 0, 0), tuple(int(x) for x in np.add(image, shift[v] - shift[u]))): {}
                 for u, v, image in bonds}
        return StructureGraph.from_edges(structure, edges)


class StructureView(Widget):
    """A structure in 3D with its orbit table. Shows the structure in the shared structure store; in the Explorer,
    `follow_selection` fills that store from the selected candidate (generated or relaxed)."""

    default_prefix = "wl-view"

    def __init__(self, structure: Structure | None = None, title: str | None = None, follow_selection: bool = False,
                 size: int = 430, **kwargs):
        from wyckoff_lab.widgets.compat import crystal_toolkit_components

        super().__init__(**kwargs)
        self.follow_selection = follow_selection
        self.bonds = BondCache()
        self.size = size  # px: Crystal Toolkit's scene is square
        self.initial = None
        if structure is not None:
            self.initial = structure_payload(structure, title or structure.composition.reduced_formula, "given")
        ctc = crystal_toolkit_components()
        self.ct = ctc.StructureMoleculeComponent(
            None, id=self.id("ct"), bonding_strategy=BONDING, color_scheme=ELEMENT_SCHEME,
            show_expand_button=False, show_position_button=True, scene_settings=SCENE_SETTINGS)

    @property
    def ct_components(self):
        return [self.ct]

    def page_stores(self):
        return self.links.stores(structure=self.initial)

    def layout(self):
        return html.Div([
            html.Div([html.H2("5 · Structure", className="wl-step"),
                      html.Div(id=self.id("title"), className="wl-structure-title")], className="wl-row"),
            html.Div([
                html.Div([html.Div(self.ct.layout(size=f"{self.size}px"), className="wl-scene"),
                          # the colour key below the scene: Crystal Toolkit's pills inside it covered atoms
                          html.Div(id=self.id("legend"), className="wl-legend")], className="wl-scene-column"),
                html.Div([
                    html.Div([html.Label("Colour by", className="label is-small"),
                              dcc.RadioItems(id=self.id("colour"), value="element", inline=True,
                                             options=[{"label": " element", "value": "element"},
                                                      {"label": " Wyckoff orbit", "value": "orbit"}])]),
                    html.Div([html.Label("Show", className="label is-small"),
                              dcc.RadioItems(id=self.id("which"), value="relaxed", inline=True,
                                             options=[{"label": " relaxed when available", "value": "relaxed"},
                                                      {"label": " as generated", "value": "generated"}])],
                             style={} if self.follow_selection else {"display": "none"}),
                    html.Div(id=self.id("symmetry"), className="wl-note"),
                    dash_table.DataTable(
                        id=self.id("orbits"), data=[], page_size=12,
                        columns=[{"name": n, "id": i} for i, n in (("element", "element"), ("wyckoff", "Wyckoff"),
                                                                  ("site_symmetry", "site sym."),
                                                                  ("free", "free parameters"))],
                        **ORBIT_TABLE_STYLE),
                ], className="wl-side"),
            ], className="wl-columns"),
        ], className="wl-panel", id=self.id("panel"))

    def register(self, app):
        context = self.context
        if self.follow_selection:
            @app.callback(
                Output(self.links.structure, "data", allow_duplicate=True),
                Input(self.links.selected, "data"),
                Input(self.links.revision, "data"),
                Input(self.id("which"), "value"),
                State(self.links.session, "data"),
                prevent_initial_call=True,
            )
            def show_selected(selected, _revision, which, session):
                record = context.sessions.candidate((session or {}).get("sid"), selected)
                if record is None:
                    return no_update
                relaxed = which == "relaxed" and bool(record.get("relaxed_structure"))
                title = f"#{record['label']} {record['formula']}" + (" (relaxed)" if relaxed else " (as generated)")
                return structure_payload(record_structure(record, relaxed), title, record["id"])

        @app.callback(
            Output(self.ct.id(), "data"),
            Output(self.id("title"), "children"),
            Output(self.id("symmetry"), "children"),
            Output(self.id("orbits"), "data"),
            Output(self.id("legend"), "children"),
            Input(self.links.structure, "data"),
            Input(self.ct.id("graph_generation_options"), "data"),
            Input(self.id("colour"), "value"),
        )
        def show(payload, graph_options, colour):
            if not payload or not payload.get("structure"):
                return no_update, "Nothing selected yet", "", [], []
            if not payload_is_signed(payload):  # a client-made structure: drawing it could cost minutes of CPU
                return no_update, "", "Not shown: this structure did not come from this app.", [], []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_dict(payload["structure"])
                if not np.all(np.isfinite(structure.frac_coords)) or not np.isfinite(structure.volume):
                    return no_update, payload.get("title", ""), "This structure has non-finite coordinates", [], []
                relaxing = bool(payload.get("bonds_key"))
                if not relaxing:  # into the cell, as Crystal Toolkit draws it (frames stay continuous)
                    structure = Structure(structure.lattice, structure.species, np.mod(structure.frac_coords, 1),
                                          site_properties=structure.site_properties)
                annotated, group = annotate_orbits(structure)
                colours, legend = site_colors(annotated, colour or "element")
                annotated.add_site_property(DISPLAY_COLOR, colours)  # wins over Crystal Toolkit's scheme
                # seen obliquely; fractional coordinates are unchanged, so the bond cache still matches
                annotated = oblique_view(annotated)
                rows = orbit_rows(structure)
                options = graph_options or {}
                if options.get("bonding_strategy", BONDING) == BONDING and options.get(
                        "unit_cell_choice", "input") == "input":
                    graph = self.bonds.graph(annotated, payload.get("bonds_key"))
                    data = jsanitize(graph.as_dict(), strict=True)
                else:  # another bonding strategy or cell chosen in Crystal Toolkit's settings: it bonds itself
                    data = annotated.as_dict()
            symmetry = f"{len(structure)} atoms in this cell · space group {group} (symprec {SYMPREC} Å)"
            return data, payload.get("title", ""), symmetry, rows, legend_chips(legend)
