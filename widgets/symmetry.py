"""Step 2, symmetry: a space-group picker, the group's Wyckoff table, and a template of pinned (element, position)
pairs that the foundation's template check validates live."""

from __future__ import annotations

from dataclasses import dataclass, field

from dash import ALL, Input, Output, State, ctx, dash_table, dcc, html, no_update
from wyckoff_lab.core.symmetry import all_spacegroups, spacegroup
from wyckoff_lab.widgets.base import Widget
from wyckoff_lab.widgets.chemistry import system_text
from wyckoff_lab.widgets.context import WARMUP_WAIT_S

CRYSTAL_SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic")
# Conventional-cell atoms per primitive-cell atom, from the centring letter (R groups on hexagonal axes).
CENTERING = {"P": 1, "A": 2, "B": 2, "C": 2, "I": 2, "F": 4, "R": 3}
MAX_COMPOSITIONS_CHECKED = 3000  # bound on the live check for a chemical system without a formula


def spacegroup_options(frequencies: dict[int, float], crystal_system: str | None = None) -> list[dict]:
    """Dropdown options: number, Hermann–Mauguin symbol, crystal system and frequency in the reference data."""
    options = []
    for group in all_spacegroups():
        if crystal_system and group.crystal_system != crystal_system:
            continue
        share = frequencies.get(group.number)
        common = f" · {100 * share:.1f}% of MP-20" if share else (" · not in MP-20" if frequencies else "")
        options.append({"label": f"{group.number} · {group.symbol} · {group.crystal_system}{common}",
                        "value": group.number, "search": f"{group.number} {group.symbol} {group.crystal_system}"})
    return options


def wyckoff_rows(number: int | None) -> list[dict]:
    """The Wyckoff table of a space group: label, multiplicity, site symmetry, coordinates, degrees of freedom."""
    if not number:
        return []
    rows = []
    for wp in spacegroup(number).wyckoff_positions:
        rows.append({"label": wp.label, "multiplicity": wp.multiplicity, "site_symmetry": wp.site_symmetry,
                     "coordinates": wp.ops_xyz[0].replace(" ", ""),
                     "dof": f"{wp.dof} ({', '.join(wp.free_parameter_names)})" if wp.dof else "0"})
    return rows


WYCKOFF_TABLE_HEIGHT = "15em"  # one scrollable page: Fm-3m's 15 positions, special ones included, without paging


def wyckoff_table(ident, rows: list[dict]):
    """All of a group's positions on one scrollable page, in the International Tables' order (general position
    first) until the user sorts a column: the special positions users pin are never on a second page."""
    columns = [{"name": n, "id": i, **({"type": "numeric"} if i == "multiplicity" else {})}
               for i, n in (("label", "Wyckoff"), ("multiplicity", "mult."), ("site_symmetry", "site sym."),
                            ("coordinates", "coordinates"), ("dof", "DOF"))]
    return dash_table.DataTable(
        id=ident, data=rows, columns=columns, page_action="none", sort_action="native",
        style_cell={"fontSize": 12, "padding": "2px 6px", "fontFamily": "monospace", "textAlign": "left"},
        style_header={"fontWeight": "bold"},
        style_table={"overflowX": "auto", "overflowY": "auto", "maxHeight": WYCKOFF_TABLE_HEIGHT})


@dataclass
class Verdict:
    """Outcome of the live template check, for the panel: ok, a headline, and the reasons or an example."""

    ok: bool | None  # None: nothing to check yet
    headline: str
    details: list[str] = field(default_factory=list)


def template_verdict(elements, formula, number, template, max_atoms) -> Verdict:
    """Can the chosen space group, with the pinned orbits, hold the requested chemistry within `max_atoms`?

    With a formula: every multiple z of it with z * atoms <= max_atoms (primitive cell) is tried in the
    conventional cell (z times the centring factor), through `check_template`. Without one: charge-balanced
    compositions of the chemical system are tried until one fits (that is what the PyXtal baseline samples).
    """
    from pymatgen.core import Composition
    from wyckoff_lab.core.templates import check_template

    if not number:
        if template:
            return Verdict(False, "A template needs a space group")
        return Verdict(None, "Any space group: the generator chooses")
    group = spacegroup(number)
    template = [tuple(pair) for pair in template or []]
    outside = sorted({el for el, _ in template} - set(elements or []))
    if elements and outside:
        return Verdict(False, f"The template places {', '.join(outside)}, which is not in {system_text(elements)}")
    factor = CENTERING[group.symbol[0]]
    if formula:
        comp = Composition(formula).reduced_composition
        ratio = {el.symbol: round(amount) for el, amount in comp.items()}
        per_unit = sum(ratio.values())
        reasons = []
        for z in range(1, max_atoms // per_unit + 1):
            counts = {el: factor * z * n for el, n in ratio.items()}
            check = check_template(counts, number, template)
            if check.feasible:
                assignment = "; ".join(f"{el}: {' '.join(labels)}" for el, labels in check.assignment.items())
                return Verdict(True, f"{comp.reduced_formula} fits {group.symbol} ({number}) with "
                               f"{sum(counts.values())} atoms in the conventional cell", [assignment])
            reasons += [f"{sum(counts.values())} atoms: {r}" for r in check.reasons]
        if per_unit > max_atoms:
            reasons.append(f"{comp.reduced_formula} has {per_unit} atoms, more than max atoms = {max_atoms}")
        return Verdict(False, f"{comp.reduced_formula} cannot fit {group.symbol} ({number})"
                       + (" with this template" if template else ""), reasons[:6])
    if not elements:
        if template:
            return Verdict(False, "Choose the elements of the template in step 1")
        return Verdict(True, f"{group.symbol} ({number}): the generator chooses the chemistry")
    from wyckoff_lab.core.compositions import candidate_compositions

    elements = list(elements)
    checked = 0
    for ratio in candidate_compositions(tuple(elements), max_atoms):
        for z in range(1, max_atoms // sum(ratio) + 1):
            counts = {el: factor * z * n for el, n in zip(elements, ratio)}
            checked += 1
            if check_template(counts, number, template).feasible:
                example = Composition(counts).formula.replace(" ", "")
                return Verdict(True, f"{system_text(elements)} fits {group.symbol} ({number})"
                               + (" with this template" if template else ""),
                               [f"for example {example} in the conventional cell"])
            if checked >= MAX_COMPOSITIONS_CHECKED:
                return Verdict(None, f"No fit among the first {checked} compositions; give an exact formula "
                               "for a complete check")
    return Verdict(False, f"No charge-balanced composition of {system_text(elements)} with at most {max_atoms} atoms "
                   f"fits {group.symbol} ({number})" + (" with this template" if template else ""),
                   ["Try another space group, fewer pinned orbits or a larger maximum number of atoms"])


class SymmetryPanel(Widget):
    """Pick a space group, read its Wyckoff table, pin elements to positions; see live whether it can work."""

    default_prefix = "wl-sym"

    def __init__(self, spacegroup_number: int | None = None, template=(), **kwargs):
        super().__init__(**kwargs)
        self.initial = {"spacegroup": spacegroup_number, "template": [list(p) for p in template]}

    def page_stores(self):
        return self.links.stores(symmetry=self.initial)

    def layout(self):
        number = self.initial["spacegroup"]
        return html.Div([
            html.H2("2 · Symmetry", className="wl-step"),
            html.Div([
                html.Div(dcc.Dropdown(id=self.id("system"), placeholder="crystal system", clearable=True,
                                      options=[{"label": s, "value": s} for s in CRYSTAL_SYSTEMS]),
                         className="wl-dd-small"),
                html.Div(dcc.Dropdown(id=self.id("spacegroup"), options=spacegroup_options({}), value=number,
                                      placeholder="any space group (type a number or symbol)", clearable=True,
                                      optionHeight=28), className="wl-dd-wide"),
            ], className="wl-row"),
            wyckoff_table(self.id("wyckoff"), wyckoff_rows(number)),
            html.Div([
                html.Div(dcc.Dropdown(id=self.id("pin-element"), placeholder="element"), className="wl-dd-small"),
                html.Div(dcc.Dropdown(id=self.id("pin-position"), placeholder="Wyckoff position",
                                      options=[r["label"] for r in wyckoff_rows(number)]), className="wl-dd-small"),
                html.Button("Pin", id=self.id("pin"), n_clicks=0, className="button is-small is-link"),
                html.Button("Clear template", id=self.id("clear"), n_clicks=0, className="button is-small is-light"),
            ], className="wl-row"),
            html.Div(id=self.id("template"), className="wl-tags"),
            html.Div(id=self.id("verdict"), className="wl-verdict"),
        ], className="wl-panel", id=self.id("panel"))

    def register(self, app):
        @app.callback(Output(self.id("spacegroup"), "options"), Input(self.id("system"), "value"))
        def filter_groups(system):
            self.context.ready.wait(WARMUP_WAIT_S)  # MP-20 frequencies come with the reference data
            return spacegroup_options(self.context.spacegroup_frequencies(), system)

        @app.callback(Output(self.id("pin-element"), "options"), Input(self.links.chemistry, "data"))
        def template_elements(chemistry):
            return list((chemistry or {}).get("elements") or [])

        @app.callback(
            Output(self.links.symmetry, "data"),
            Input(self.id("spacegroup"), "value"),
            Input(self.id("pin"), "n_clicks"),
            Input(self.id("clear"), "n_clicks"),
            Input({"type": self.id("unpin"), "index": ALL}, "n_clicks"),
            State(self.id("pin-element"), "value"),
            State(self.id("pin-position"), "value"),
            State(self.links.symmetry, "data"),
        )
        def update_symmetry(number, _pin, _clear, unpin_clicks, element, position, current):
            current = current or {"template": []}
            template = [list(p) for p in current.get("template") or []]
            trigger = ctx.triggered_id
            if trigger == self.id("pin") and element and position and number:
                template.append([element, position])
            elif trigger == self.id("clear"):
                template = []
            elif isinstance(trigger, dict) and any(unpin_clicks):
                template = [p for i, p in enumerate(template) if i != trigger["index"]]
            if number:  # positions of another group make no sense after a change of group
                labels = {wp.label for wp in spacegroup(number).wyckoff_positions}
                template = [p for p in template if p[1] in labels]
            else:
                template = []
            new = {"spacegroup": number, "template": template}
            return no_update if new == current else new

        @app.callback(
            Output(self.id("wyckoff"), "data"),
            Output(self.id("pin-position"), "options"),
            Output(self.id("template"), "children"),
            Input(self.links.symmetry, "data"),
        )
        def show_group(symmetry):
            number = (symmetry or {}).get("spacegroup")
            rows = wyckoff_rows(number)
            tags = [html.Span([f"{el} @ {label}",
                               html.Button("×", id={"type": self.id("unpin"), "index": i}, n_clicks=0,
                                           className="delete is-small", title="remove")], className="tag is-info")
                    for i, (el, label) in enumerate((symmetry or {}).get("template") or [])]
            return rows, [r["label"] for r in rows], tags

        @app.callback(Output(self.id("verdict"), "children"), Output(self.id("verdict"), "className"),
                      Input(self.links.symmetry, "data"), Input(self.links.chemistry, "data"))
        def check(symmetry, chemistry):
            symmetry, chemistry = symmetry or {}, chemistry or {}
            try:
                verdict = template_verdict(chemistry.get("elements"), chemistry.get("formula"),
                                           symmetry.get("spacegroup"), symmetry.get("template"),
                                           int(chemistry.get("max_atoms") or 20))
            except Exception as exc:  # never let a bad combination break the page
                verdict = Verdict(False, f"Cannot check this template: {exc}")
            state = {True: "is-ok", False: "is-bad", None: "is-neutral"}[verdict.ok]
            children = [html.Strong(verdict.headline)] + [html.Div(d, className="wl-reason") for d in verdict.details]
            return children, f"wl-verdict {state}"
