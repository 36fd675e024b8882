"""Step 1, chemistry: a periodic-table element picker (1–5 elements), an optional exact formula, a maximum size."""

from __future__ import annotations

import functools

from dash import ALL, Input, Output, State, ctx, dcc, html, no_update
from pymatgen.core import Composition, Element
from wyckoff_lab.core.defaults import MAX_ATOMS
from wyckoff_lab.widgets.base import Widget

MAX_ELEMENTS = 5
MAX_Z = 103  # through Lr; the periodic table shows the f-block in two rows below the main table
DEFAULT_MAX_ATOMS = MAX_ATOMS  # core.defaults: MP-20's primitive-cell limit


def chemists_order(elements) -> list[str]:
    """Elements in a chemist's order: increasing Pauling electronegativity, as pymatgen's `Composition.formula`
    writes a formula (Ca, Al, Cu; Li, Fe, P, O); elements without one (noble gases) last, ties by symbol."""
    import math
    import warnings

    def key(symbol: str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen warns on noble gases' missing electronegativity
            x = Element(symbol).X
        return (x if math.isfinite(x) else math.inf, symbol)

    return sorted(dict.fromkeys(elements or []), key=key)


def system_text(elements) -> str:
    """A chemical system as the app prints it everywhere: `Ca-Al-Cu` (`chemists_order`)."""
    return "-".join(chemists_order(elements))


def element_family(symbol: str) -> str:
    """The element's family (colours the periodic table and the element-embedding map)."""
    el = Element(symbol)
    checks = (("alkali metal", el.is_alkali), ("alkaline earth", el.is_alkaline), ("lanthanoid", el.is_lanthanoid),
              ("actinoid", el.is_actinoid), ("transition metal", el.is_transition_metal),
              ("post-transition metal", el.is_post_transition_metal), ("metalloid", el.is_metalloid),
              ("halogen", el.is_halogen), ("noble gas", el.is_noble_gas))
    return next((name for name, flag in checks if flag), "nonmetal")


@functools.cache
def table_positions() -> dict[str, tuple[int, int]]:
    """Element symbol -> (row, column) in an 18-column periodic table; La–Lu and Ac–Lr on rows 9 and 10."""
    positions = {}
    for z in range(1, MAX_Z + 1):
        el = Element.from_Z(z)
        if 57 <= z <= 71:
            positions[el.symbol] = (9, z - 57 + 3)
        elif 89 <= z <= 103:
            positions[el.symbol] = (10, z - 89 + 3)
        else:
            positions[el.symbol] = (el.row, el.group)
    return positions


def chemistry_state(elements, formula, max_atoms) -> tuple[dict, str | None]:
    """Validate the user's chemistry: (store value, message or None). Invalid parts are reported, not raised."""
    elements = sorted(dict.fromkeys(elements or []), key=lambda e: Element(e).Z)
    message = None
    formula = (formula or "").strip() or None
    if formula:
        try:
            comp = Composition(formula)
            formula_elements = sorted((el.symbol for el in comp), key=lambda e: Element(e).Z)
            if any(abs(x - round(x)) > 1e-8 for x in comp.values()):
                raise ValueError("amounts must be whole numbers")
        except Exception as exc:  # pymatgen raises several types for unreadable formulas
            message, formula = f"Cannot read formula {formula!r}: {exc}", None
        else:
            if elements and set(formula_elements) != set(elements):
                message = (f"{comp.reduced_formula} is not in the chemical system {system_text(elements)}; "
                           "the formula's elements are used")
            elements, formula = formula_elements, comp.reduced_formula
    if len(elements) > MAX_ELEMENTS:
        message = f"At most {MAX_ELEMENTS} elements: {system_text(elements)} has {len(elements)}"
    try:
        max_atoms = int(max_atoms)
        if max_atoms < 1:
            raise ValueError
    except (TypeError, ValueError):
        message = message or "The maximum number of atoms must be a positive whole number; using 20"
        max_atoms = DEFAULT_MAX_ATOMS
    return {"elements": elements, "formula": formula, "max_atoms": max_atoms}, message


_CELL_SIZES: dict[int, dict[str, int]] = {}  # id(reference frame) -> reduced formula -> smallest cell (atoms)


def smallest_known_cells(frame) -> dict[str, int]:
    """Reduced formula -> the fewest atoms of its cells in a reference table (MP-20's cells are primitive),
    computed once per table (about 2 s for MP-20)."""
    key = id(frame)
    if key not in _CELL_SIZES:
        reduced = frame["formula"].map(lambda f: Composition(f).reduced_formula)
        _CELL_SIZES.clear()
        _CELL_SIZES[key] = {k: int(v) for k, v in frame.groupby(reduced)["num_atoms"].min().items()}
    return _CELL_SIZES[key]


def cell_size_warning(formula: str | None, max_atoms: int, known: dict[str, int] | None,
                      dataset: str = "MP-20") -> str | None:
    """Why `max_atoms` excludes the formula's known cell (the smallest of its cells in the reference data) or,
    for a formula the data lacks, its formula unit; None when it does not."""
    if not formula:
        return None
    comp = Composition(formula)
    reduced = comp.reduced_formula
    if known and reduced in known:
        if known[reduced] > max_atoms:
            return (f"{reduced} needs {known[reduced]} atoms in the primitive cell in {dataset}; raise max atoms "
                    f"(now {max_atoms})")
        return None
    unit = int(round(comp.reduced_composition.num_atoms))
    if unit > max_atoms:
        return (f"{reduced} has {unit} atoms per formula unit, more than max atoms = {max_atoms}; raise max atoms")
    return None


class ChemistryPicker(Widget):
    """Click elements on a periodic table (1–5), optionally type an exact formula, set the maximum cell size."""

    default_prefix = "wl-chem"

    def __init__(self, elements=(), formula: str | None = None, max_atoms: int = DEFAULT_MAX_ATOMS, **kwargs):
        super().__init__(**kwargs)
        self.initial, self.initial_message = chemistry_state(list(elements), formula, max_atoms)

    def page_stores(self):
        return self.links.stores(chemistry=self.initial)

    def _element_button(self, symbol: str, row: int, column: int, selected: set[str]):
        classes = f"wl-el wl-fam-{element_family(symbol).replace(' ', '-')}"
        if symbol in selected:
            classes += " is-selected"
        return html.Button(symbol, id={"type": self.id("el"), "el": symbol}, n_clicks=0, className=classes,
                           title=f"{Element(symbol).long_name} ({element_family(symbol)})",
                           style={"gridRow": row, "gridColumn": column})

    def layout(self):
        selected = set(self.initial["elements"])
        buttons = [self._element_button(symbol, row, column, selected)
                   for symbol, (row, column) in table_positions().items()]
        return html.Div([
            html.H2("1 · Chemistry", className="wl-step"),
            html.Div(buttons, className="wl-ptable", id=self.id("table")),
            html.Div(self._summary(self.initial), id=self.id("summary"), className="wl-chem-summary"),
            html.Div([
                html.Div([html.Label("Exact formula (optional)", className="label is-small"),
                          dcc.Input(id=self.id("formula"), type="text", placeholder="e.g. CaCu2Al",
                                    value=self.initial["formula"] or "", debounce=True, className="input is-small")],
                         className="wl-field"),
                html.Div([html.Label("Max atoms (primitive cell)", className="label is-small"),
                          dcc.Input(id=self.id("max-atoms"), type="number", min=1, max=200, step=1,
                                    value=self.initial["max_atoms"], debounce=True, className="input is-small")],
                         className="wl-field wl-narrow"),
                html.Button("Clear", id=self.id("clear"), n_clicks=0, className="button is-small is-light"),
            ], className="wl-row"),
            html.Div(self.initial_message, id=self.id("message"), className="wl-message is-warning"),
            html.Div(id=self.id("cell-warning"), className="wl-message is-warning"),
            dcc.Store(id=self.id("picked"), data=list(self.initial["elements"])),
        ], className="wl-panel", id=self.id("panel"))

    @staticmethod
    def _summary(state: dict) -> str:
        if not state["elements"]:
            return "No elements chosen: generators pick the chemistry themselves."
        text = f"Chemical system {system_text(state['elements'])}"
        if state.get("formula"):
            text += f", formula {state['formula']}"
        return text + f", at most {state['max_atoms']} atoms in the primitive cell"

    def register(self, app):
        # Clicks are handled in the browser: a server round trip per click would read a stale selection when the
        # user clicks quickly (three elements in a second lost one of them). The server only validates.
        app.clientside_callback(
            """function (_clicks, _clear, picked) {
                const ctx = dash_clientside.callback_context;
                const trigger = ctx.triggered_id;
                if (!trigger) { return dash_clientside.no_update; }
                if (typeof trigger === "string") { return []; }
                const current = picked || [];
                return current.includes(trigger.el) ? current.filter(e => e !== trigger.el)
                                                    : current.concat([trigger.el]);
            }""",
            Output(self.id("picked"), "data"),
            Input({"type": self.id("el"), "el": ALL}, "n_clicks"),
            Input(self.id("clear"), "n_clicks"),
            State(self.id("picked"), "data"),
            prevent_initial_call=True,
        )
        app.clientside_callback(
            """function (chemistry, classes, ids) {
                const chosen = (chemistry && chemistry.elements) || [];
                return classes.map((c, i) => c.replace(/ is-selected/g, "")
                                              + (chosen.includes(ids[i].el) ? " is-selected" : ""));
            }""",
            Output({"type": self.id("el"), "el": ALL}, "className"),
            Input(self.links.chemistry, "data"),
            State({"type": self.id("el"), "el": ALL}, "className"),
            State({"type": self.id("el"), "el": ALL}, "id"),
        )

        @app.callback(
            Output(self.links.chemistry, "data"),
            Output(self.id("summary"), "children"),
            Output(self.id("message"), "children"),
            Output(self.id("formula"), "value"),
            Input(self.id("picked"), "data"),
            Input(self.id("formula"), "value"),
            Input(self.id("max-atoms"), "value"),
            prevent_initial_call=True,
        )
        def update(picked, formula, max_atoms):
            formula_value = no_update
            if ctx.triggered_id == self.id("picked") and formula:
                formula, formula_value = None, ""  # clicking elements asks for a system, not that formula
            state, message = chemistry_state(picked, formula, max_atoms)
            if len(state["elements"]) > MAX_ELEMENTS:
                state["elements"] = state["elements"][:MAX_ELEMENTS]
            return state, self._summary(state), message, formula_value

        @app.callback(Output(self.id("cell-warning"), "children"), Input(self.links.chemistry, "data"))
        def warn_cell_size(chemistry):
            """The formula's known cell against max atoms, once the reference data is loaded (else the formula
            unit alone)."""
            chemistry = chemistry or {}
            references = self.context.references() if chemistry.get("formula") else None
            known = smallest_known_cells(references.dataset.frame) if references is not None else None
            dataset = self.context.settings.dataset.upper().replace("_", "-")
            return cell_size_warning(chemistry.get("formula"), int(chemistry.get("max_atoms") or DEFAULT_MAX_ATOMS),
                                     known, dataset)
