"""Step 4, candidates: a sortable, filterable table of the session's candidates; selecting a row shows it.
Export buttons (step 10) sit above it."""

from __future__ import annotations

import time

from dash import Input, Output, State, ctx, dash_table, dcc, html, no_update
from wyckoff_lab.widgets.base import Widget
from wyckoff_lab.widgets.export import cif_zip, extxyz
from wyckoff_lab.widgets.records import TABLE_COLUMNS, summarize, table_rows
from wyckoff_lab.widgets.state import select_records

EXPORTS = {"cif-selected": ("CIF (selected)", "cif", True), "cif-all": ("CIF zip (all)", "cif", False),
           "xyz-selected": ("extxyz (selected)", "xyz", True), "xyz-all": ("extxyz (all)", "xyz", False)}


def summary_text(records: list[dict]) -> str:
    if not records:
        return "No candidates yet: choose a chemistry and press Generate."
    s = summarize(records)
    text = f"{s['n']} candidates · {s['valid']} valid · {s['novel']} novel · {s['relaxed']} relaxed"
    if s["relaxed"]:
        text += f" · {s['on_hull']} on the hull · {s['metastable']} within 0.1 eV/atom"
        text += f" · {s['sym_changed']} changed space group · {s['duplicates']} duplicates · {s['sun']} S.U.N."
    return text


def remember_table_scope(context, sid: str | None, selected, filtered):
    """Store the table's ticked and filtered row ids in the session (what "Relax selected" / "Relax filtered"
    relax); returns the note shown under the table."""
    if not sid:
        return no_update
    context.sessions.set(sid, "table/selected", list(selected or []))
    context.sessions.set(sid, "table/filtered", list(filtered or []))
    return f"{len(selected)} ticked for “Relax selected”" if selected else ""


class CandidateTable(Widget):
    """The candidate table with native sorting and filtering (e.g. `novel` in the novel column, `< 0.1` for
    E hull); clicking a row selects that candidate everywhere on the page."""

    default_prefix = "wl-cand"

    def layout(self):
        columns = [{"name": header, "id": key, "type": kind} for key, header, kind in TABLE_COLUMNS]
        return html.Div([
            html.Div([
                html.H2("4 · Candidates", className="wl-step"),
                html.Div(summary_text([]), id=self.id("summary"), className="wl-summary"),
                html.Div([html.Button(label, id=self.id(key), n_clicks=0, className="button is-small is-light")
                          for key, (label, _, _) in EXPORTS.items()], className="buttons wl-exports"),
            ], className="wl-row wl-spread"),
            dcc.Download(id=self.id("download")),
            html.Div(id=self.id("export-message"), className="wl-note"),
            html.Div(id=self.id("scope-note"), className="wl-note"),
            dash_table.DataTable(
                id=self.id("table"), columns=columns, data=[], page_size=12, sort_action="native",
                filter_action="native", sort_mode="multi", row_selectable="multi", selected_rows=[],
                cell_selectable=True,
                style_table={"overflowX": "auto"}, style_header={"fontWeight": "bold"},
                style_cell={"fontSize": 13, "padding": "3px 8px", "textAlign": "left", "cursor": "pointer"},
                style_data_conditional=[],
                tooltip_header={"natoms": "atoms in the cell as generated (the conventional cell; the "
                                          "primitive cell of a centred lattice has 1/2 to 1/4 of them)",
                                "sg_label": "space group spglib (0.1 Å) finds in the generated structure",
                                "relaxed_sg_label": "space group spglib (0.1 Å) finds after relaxation; "
                                                    "'changed' where it differs from the generated one",
                                "relaxed_novel_label": "relaxed structure: no StructureMatcher match in MP-20",
                                "unique_label": "relaxed structure: not a StructureMatcher match of an earlier "
                                                "relaxed candidate",
                                "sun_label": "stable (E hull < 0.1 eV/atom), unique and novel after relaxation",
                                "relax_status": "status · whether symmetry was kept (FixSymmetry) or free; "
                                               "converged = max atomic force < fmax and the cell's stress forces "
                                               "< fmax",
                                "valid": "ok = no atoms closer than 0.5 Å and SMACT charge-neutral",
                                "symmetry": "whether spglib (0.1 Å) finds the space group the generator sampled",
                                "novel_label": "no StructureMatcher match in MP-20 (all splits)",
                                "e_above_hull": "energy above the ML convex hull of the chemical system"}),
        ], className="wl-panel", id=self.id("panel"))

    def register(self, app):
        context = self.context

        @app.callback(
            Output(self.id("table"), "data"),
            Output(self.id("summary"), "children"),
            Input(self.links.revision, "data"),
            State(self.links.session, "data"),
        )
        def show(_revision, session):
            records = context.sessions.candidates((session or {}).get("sid"))
            return table_rows(records), summary_text(records)

        @app.callback(
            Output(self.links.selected, "data", allow_duplicate=True),
            Input(self.id("table"), "active_cell"),
            prevent_initial_call=True,
        )
        def select(active_cell):
            if not active_cell or not active_cell.get("row_id"):
                return no_update
            return active_cell["row_id"]

        @app.callback(Output(self.id("table"), "style_data_conditional"), Input(self.links.selected, "data"))
        def highlight(selected):
            styles = [{"if": {"filter_query": '{valid} contains "bad"', "column_id": "valid"},
                      "color": "#b00020"},
                      {"if": {"filter_query": '{symmetry} contains "found"', "column_id": "symmetry"},
                       "color": "#8a5a00"},
                      {"if": {"filter_query": "{novel_label} = novel", "column_id": "novel_label"},
                       "color": "#007a5a", "fontWeight": "bold"},
                      {"if": {"filter_query": '{relaxed_sg_label} contains "changed"',
                              "column_id": "relaxed_sg_label"}, "color": "#8a5a00"},
                      {"if": {"filter_query": "{unique_label} = duplicate", "column_id": "unique_label"},
                       "color": "#b00020"},
                      {"if": {"filter_query": '{sun_label} = "S.U.N."', "column_id": "sun_label"},
                       "color": "#007a5a", "fontWeight": "bold"}]
            if selected:
                styles.append({"if": {"filter_query": f'{{id}} = "{selected}"'},
                               "backgroundColor": "#e8f4ff", "fontWeight": "bold"})
            return styles

        @app.callback(
            Output(self.id("scope-note"), "children"),
            Input(self.id("table"), "selected_row_ids"),
            Input(self.id("table"), "derived_virtual_row_ids"),
            State(self.links.session, "data"),
            prevent_initial_call=True,
        )
        def remember_scope(selected, filtered, session):
            """Keep the ticked rows and the rows the filter shows in the session: "Relax selected" and "Relax
            filtered" relax those."""
            return remember_table_scope(context, (session or {}).get("sid"), selected, filtered)

        @app.callback(
            Output(self.id("download"), "data"),
            Output(self.id("export-message"), "children"),
            *[Input(self.id(key), "n_clicks") for key in EXPORTS],
            State(self.links.session, "data"),
            State(self.links.selected, "data"),
            prevent_initial_call=True,
        )
        def export(*args):
            session, selected = args[-2], args[-1]
            key = ctx.triggered_id.removeprefix(self.id(""))
            _, kind, only_selected = EXPORTS[key]
            records = context.sessions.candidates((session or {}).get("sid"))
            if only_selected:
                records = select_records(records, [selected] if selected else [])
            if not records:
                return no_update, "Nothing to export: " + ("select a candidate first" if only_selected
                                                           else "generate candidates first")
            stamp = time.strftime("%Y%m%d-%H%M%S")
            name = f"wyckoff-lab_{records[0]['id'] if only_selected else 'candidates'}_{stamp}"
            if kind == "cif":
                return dcc.send_bytes(cif_zip(records), f"{name}.zip"), f"Exported {len(records)} as CIF (zip)"
            return {"content": extxyz(records), "filename": f"{name}.extxyz"}, f"Exported {len(records)} as extxyz"
