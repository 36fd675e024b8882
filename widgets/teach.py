"""Step 9, teach: place one atom on a Wyckoff position, move its free parameters with sliders and watch every
symmetry-equivalent copy move; see the multiplicity and site symmetry, when copies merge onto a special position,
and when the arrangement (with an optional second position) gains the symmetry of a higher group."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from dash import Input, Output, State, dcc, html, no_update
from pymatgen.core import Lattice, Structure
from wyckoff_lab.core.symmetry import AXES, analyze_symmetry_of, spacegroup
from wyckoff_lab.widgets.base import Widget
from wyckoff_lab.widgets.structure_view import ORBIT_PROPERTY, SCENE_SETTINGS

# A readable cell for each crystal family (Å, degrees): distinct lengths and angles where the family allows them,
# so the lattice itself never adds symmetry the space group does not have.
TEACH_LATTICE = {"cubic": (5.0,), "tetragonal": (5.0, 6.5), "trigonal": (5.0, 6.5), "hexagonal": (5.0, 6.5),
                 "orthorhombic": (5.0, 6.0, 7.0), "monoclinic": (5.0, 6.0, 7.0, 103.0),
                 "triclinic": (5.0, 6.0, 7.0, 78.0, 84.0, 96.0)}
SITE_TOL = 1e-3  # fractional: copies closer than this are the same site
DEFAULT = {"spacegroup": 221, "position": "8g", "element": "Cu", "params": (0.2, 0.2, 0.2)}


@dataclass
class TeachState:
    """What the teaching view shows for one choice of group, positions and parameters."""

    structure: Structure
    multiplicity: int
    site_symmetry: str
    coordinates: list[str]  # each copy's coordinate triplet with the current numbers
    distinct: int  # copies that remain distinct
    messages: list[str] = field(default_factory=list)
    detected: tuple[int, str] | None = None  # spglib's group for the whole arrangement


def _distinct_sites(sites: np.ndarray) -> np.ndarray:
    """Sites with duplicates (modulo lattice translations, within SITE_TOL) removed, order kept."""
    kept: list[np.ndarray] = []
    for site in sites:
        if not any(np.all(np.abs((site - k + 0.5) % 1.0 - 0.5) < SITE_TOL) for k in kept):
            kept.append(site)
    return np.array(kept).reshape(-1, 3)


def teach_state(number: int, label: str, params, element: str = "Cu", second: tuple | None = None) -> TeachState:
    """Expand a Wyckoff position (and optionally a second one: (label, params, element)) into its copies.

    Reports merging copies (the orbit sits on a special position: which one), overlapping orbits, and the space
    group spglib finds for the arrangement when it is higher than the chosen one.
    """
    group = spacegroup(number)
    wp = group.wyckoff(label)
    params = [float(params[i]) for i in wp.free_axes]
    sites = wp.orbit(params)
    distinct = _distinct_sites(sites)
    messages = []
    if len(distinct) < wp.multiplicity:
        special = [other for other in group.wyckoff_positions
                   if other.multiplicity == len(distinct) and other is not wp and _lies_on(other, distinct)]
        where = (f": the atom now sits on Wyckoff position {special[0].label} (site symmetry "
                 f"{special[0].site_symmetry})") if special else ""
        messages.append(f"The {wp.multiplicity} copies of {wp.label} collapse onto {len(distinct)} site{'s' if len(distinct) > 1 else ''}{where}.")
    species = [element] * len(distinct)
    labels = [f"{element} {wp.label}"] * len(distinct)
    coords = [distinct]
    if second is not None:
        label_b, params_b, element_b = second
        wp_b = group.wyckoff(label_b)
        sites_b = _distinct_sites(wp_b.orbit([float(params_b[i]) for i in wp_b.free_axes]))
        overlap = sum(any(np.all(np.abs((s - a + 0.5) % 1.0 - 0.5) < SITE_TOL) for a in distinct) for s in sites_b)
        if overlap:
            messages.append(f"{overlap} site(s) of {wp_b.label} coincide with {wp.label}: two atoms on one spot.")
        species += [element_b] * len(sites_b)
        labels += [f"{element_b} {wp_b.label}"] * len(sites_b)
        coords.append(sites_b)
    family = group.lattice_family
    lattice = Lattice.from_parameters(*family.from_free(TEACH_LATTICE[group.crystal_system]))
    structure = Structure(lattice, species, np.concatenate(coords), site_properties={ORBIT_PROPERTY: labels})
    detected = _detect(structure)
    if detected and detected[0] != number:
        messages.append(f"spglib finds {detected[1]} ({detected[0]}) for this arrangement, not {group.symbol} "
                        f"({number}): at these parameters the atoms have extra symmetry.")
    coordinates = [f"({', '.join(f'{c:.3f}' for c in site)})" for site in sites]
    return TeachState(structure, wp.multiplicity, wp.site_symmetry, coordinates, len(distinct), messages, detected)


def _lies_on(position, sites: np.ndarray) -> bool:
    try:
        position.free_params_from_orbit(sites, tol=SITE_TOL)
        return True
    except ValueError:
        return False


def _detect(structure: Structure) -> tuple[int, str] | None:
    # A tight tolerance: the arrangement is exact, and a near miss is what the lesson is about.
    analysis = analyze_symmetry_of(structure, 1e-3)
    return None if analysis is None else (analysis.number, analysis.spacegroup.symbol)


class TeachView(Widget):
    """Crystallographic symmetry, hands on: sliders move one atom and every copy the group makes of it."""

    default_prefix = "wl-teach"

    def __init__(self, **kwargs):
        from wyckoff_lab.widgets.compat import crystal_toolkit_components

        super().__init__(**kwargs)
        state = teach_state(DEFAULT["spacegroup"], DEFAULT["position"], DEFAULT["params"], DEFAULT["element"])
        self.ct = crystal_toolkit_components().StructureMoleculeComponent(
            state.structure, id=self.id("ct"), bonding_strategy="CutOffDictNN",
            bonding_strategy_kwargs={"cut_off_dict": []}, color_scheme=ORBIT_PROPERTY, show_expand_button=False,
            scene_settings=SCENE_SETTINGS)

    @property
    def ct_components(self):
        return [self.ct]

    def _sliders(self, suffix: str, values=(0.2, 0.2, 0.2)):
        return [html.Div([html.Label(axis, className="label is-small wl-axis"),
                          dcc.Slider(id=self.id(f"{axis}{suffix}"), min=0, max=1, step=0.005, value=value,
                                     marks={0: "0", 0.25: "¼", 0.5: "½", 0.75: "¾", 1: "1"},
                                     updatemode="drag", className="wl-slider")], className="wl-slider-row")
                for axis, value in zip(AXES, values)]

    def layout(self):
        group_options = [{"label": f"{g} · {spacegroup(g).symbol} · {spacegroup(g).crystal_system}", "value": g}
                         for g in range(1, 231)]
        elements = ["Cu", "O", "Na", "Cl", "Si", "Ti", "Ba", "Fe"]
        return html.Div([
            html.H2("9 · Teach: Wyckoff positions hands-on", className="wl-step"),
            html.Div([
                html.Div([
                    html.Label("Space group", className="label is-small"),
                    dcc.Dropdown(id=self.id("group"), options=group_options, value=DEFAULT["spacegroup"],
                                 clearable=False),
                    html.Div([
                        html.Div([html.Label("Position", className="label is-small"),
                                  dcc.Dropdown(id=self.id("position"), value=DEFAULT["position"], clearable=False)],
                                 className="wl-grow"),
                        html.Div([html.Label("Element", className="label is-small"),
                                  dcc.Dropdown(id=self.id("element"), options=elements, value=DEFAULT["element"],
                                               clearable=False)], className="wl-narrow"),
                    ], className="wl-row"),
                    *self._sliders(""),
                    dcc.Checklist(id=self.id("second-on"), options=[{"label": " add a second position",
                                                                      "value": "on"}], value=[]),
                    html.Div([
                        html.Div([
                            html.Div(dcc.Dropdown(id=self.id("position-b"), clearable=False), className="wl-grow"),
                            html.Div(dcc.Dropdown(id=self.id("element-b"), options=elements, value="O",
                                                  clearable=False), className="wl-narrow"),
                        ], className="wl-row"),
                        *self._sliders("-b", (0.5, 0.5, 0.5)),
                    ], id=self.id("second"), style={"display": "none"}),
                    html.Div(id=self.id("info"), className="wl-teach-info"),
                ], className="wl-side"),
                html.Div(self.ct.layout(size="520px"), className="wl-scene"),
            ], className="wl-columns"),
        ], className="wl-panel", id=self.id("panel"))

    def register(self, app):
        @app.callback(
            Output(self.id("position"), "options"), Output(self.id("position"), "value"),
            Output(self.id("position-b"), "options"), Output(self.id("position-b"), "value"),
            Input(self.id("group"), "value"), State(self.id("position"), "value"),
        )
        def positions(number, current):
            labels = [wp.label for wp in spacegroup(number).wyckoff_positions]
            options = [{"label": f"{wp.label} · {wp.site_symmetry} · {wp.ops_xyz[0].replace(' ', '')}",
                        "value": wp.label} for wp in spacegroup(number).wyckoff_positions]
            first = current if current in labels else labels[0]
            return options, first, options, labels[-1]

        @app.callback(Output(self.id("second"), "style"), Input(self.id("second-on"), "value"))
        def toggle_second(on):
            return {} if on else {"display": "none"}

        slider_ids = [self.id(a) for a in AXES]
        slider_ids_b = [self.id(f"{a}-b") for a in AXES]

        @app.callback(
            *[Output(i, "disabled") for i in slider_ids + slider_ids_b],
            Input(self.id("group"), "value"), Input(self.id("position"), "value"), Input(self.id("position-b"), "value"),
        )
        def free_axes(number, label, label_b):
            group = spacegroup(number)
            try:
                free = group.wyckoff(label).free_axes
            except KeyError:
                free = ()
            try:
                free_b = group.wyckoff(label_b).free_axes
            except KeyError:
                free_b = ()
            return [i not in free for i in range(3)] + [i not in free_b for i in range(3)]

        @app.callback(
            Output(self.ct.id(), "data"),
            Output(self.id("info"), "children"),
            Input(self.id("group"), "value"), Input(self.id("position"), "value"), Input(self.id("element"), "value"),
            *[Input(i, "value") for i in slider_ids],
            Input(self.id("second-on"), "value"), Input(self.id("position-b"), "value"),
            Input(self.id("element-b"), "value"),
            *[Input(i, "value") for i in slider_ids_b],
        )
        def update(number, label, element, x, y, z, second_on, label_b, element_b, xb, yb, zb):
            try:
                second = (label_b, (xb, yb, zb), element_b) if second_on and label_b else None
                state = teach_state(number, label, (x, y, z), element, second)
            except (KeyError, ValueError, TypeError):  # a position of the previous group, mid-update
                return no_update, no_update
            group = spacegroup(number)
            wp = group.wyckoff(label)
            info = [
                html.P([html.Strong(f"{wp.label} in {group.symbol} ({number})"),
                        (f": multiplicity {state.multiplicity}, site symmetry {state.site_symmetry}, "
                         f"{wp.dof} free parameter(s) {', '.join(wp.free_parameter_names)}")]),
                html.P(f"{state.distinct} distinct site(s) in the conventional cell"),
                *[html.P(m, className="wl-message is-warning") for m in state.messages],
                html.Details([html.Summary(f"the {state.multiplicity} copies"),
                              html.Ul([html.Li(f"{op}  →  {c}") for op, c in zip(wp.ops_xyz, state.coordinates)],
                                      className="wl-ops")], open=state.multiplicity <= 12),
            ]
            return state.structure.as_dict(), info
