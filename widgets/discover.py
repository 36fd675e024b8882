"""Discover: every generator's candidates for the chosen system pooled, pre-screened, and the best relaxed within a
time budget in the background; the table and the hull fill in as each relaxation finishes (core.discover's funnel)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

from dash import Input, Output, State, dcc, html, no_update
from pymatgen.core import Composition
from wyckoff_lab.widgets.base import Widget, cancel_jobs
from wyckoff_lab.widgets.context import WARMUP_WAIT_S
from wyckoff_lab.widgets.jobs import (
    STATUS_BATCH_KEY,
    USABLE,
    JobCancelled,
    JobError,
    _potential,
    _relax_fields,
    cancel_check,
    hull_data,
    judge_relaxed,
    phase_diagram,
    place_on_hull,
    unexpected,
)
from wyckoff_lab.widgets.state import revision

DISCOVER_KIND = "discover"  # its cancel record (one cancel button)
DEFAULT_BUDGET_MIN = 5.0
DEFAULT_SAMPLES = 20  # per generator: with four generators, 80 candidates to pre-screen in about a minute
PRESCREEN_LABELS = {"single_point": "single-point energy", "short_relax": "short relaxation (10 FIRE steps)",
                    "none": "none (relax in pool order)"}
STAGE_LABELS = {"pool": "sampling", "dedup": "removing duplicates and known structures",
                "hull": "reference phases", "prescreen": "pre-screening", "relax": "relaxing the best first"}

Progress = Callable[[int, int, str], None]


def discover_generators(context) -> list[str]:
    """Registered generators that take a chemical system: the ones the funnel can pool."""
    from wyckoff_lab.core.generators import generator_class

    return [name for name in context.generator_names() if "elements" in generator_class(name).supported_conditions]


def discover_for_session(context, session: str, elements: list[str], budget_min: float,
                         generators: list[str] | None = None, samples: int = DEFAULT_SAMPLES,
                         prescreen: str = "single_point", seed: int = 0, progress: Progress = lambda *a: None,
                         cancelled: Callable[[], bool] = lambda: False,
                         on_update: Callable[[int], None] | None = None) -> dict:
    """Run the discovery funnel for the session's chemical system and keep its candidates as the session's set.

    Once the pool is pre-screened its candidates replace the session's (in pre-screen order, best first, each with
    its estimated E_hull); each full relaxation is stored as it finishes and placed on the system's hull (the same
    self-consistent hull "Build hull" shows), `on_update(n)` after each. At the end the set is judged after
    relaxation (unique, novel, S.U.N.) and reordered: relaxed by E_hull, then the rest by pre-screen order.
    A cancel stops it between relaxations; what was stored stays.
    """
    from wyckoff_lab.core.defaults import SYMPREC
    from wyckoff_lab.core.discover import DiscoveryPlan, discover
    from wyckoff_lab.core.generators.base import Candidate
    from wyckoff_lab.widgets.records import build_records

    if not elements:
        raise JobError("Pick the elements of a chemical system in step 1 first")
    if budget_min is None or samples is None:  # an empty or invalid number field
        raise JobError("Enter a time budget in minutes (> 0) and the samples per generator (>= 1)")
    settings = context.settings
    try:
        plan = DiscoveryPlan(elements=tuple(elements), budget_min=float(budget_min),
                             generators=tuple(generators) if generators else None, samples=int(samples),
                             seed=int(seed or 0), prescreen=prescreen, fmax=settings.relax_fmax,
                             max_steps=settings.relax_max_steps, max_references=settings.hull_max_references,
                             device=settings.device)
    except (TypeError, ValueError) as exc:
        raise JobError(f"Cannot discover: {exc}") from None
    loaded = {}
    for name in plan.generator_names():
        try:
            loaded[name] = context.generator(name)
        except Exception:  # noqa: BLE001 - core.discover records why a generator could not serve
            pass
    potential = _potential(context)
    state = {"batch": None, "ids": {}, "hull": None, "diagram": None, "hull_stored": False, "stored": 0}

    def ranked(_pool, order) -> None:
        candidates = [Candidate(structure=c.structure, generator=c.generator, conditions=plan.conditions,
                                detected_spacegroup=c.spacegroup_generated, detected_symprec=SYMPREC)
                      for c in order]
        records = build_records(candidates, context.references())
        for record, c in zip(records, order):
            record["prescreen"] = None if not math.isfinite(c.prescreen) else round(c.prescreen, 4)
            record["prescreen_status"] = c.prescreen_status
            record["discover_rank"] = c.rank
            state["ids"][c.index] = record["id"]
        if cancelled():
            raise JobCancelled("Discover cancelled before any candidate was relaxed")
        state["batch"] = context.sessions.set_candidates(session, records, unless=cancelled)
        context.sessions.set(session, STATUS_BATCH_KEY, state["batch"])
        if on_update is not None:
            on_update(0)

    def relaxed(c) -> None:
        record_id = state["ids"].get(c.index)
        if record_id is None or c.result is None:
            return
        fields = _relax_fields(c.result)
        natoms = len(c.structure)
        if c.result.status in USABLE and math.isfinite(c.result.energy_per_atom):
            # The funnel relaxes the primitive cell; the record counts the generated cell's atoms.
            fields["energy"] = c.result.energy_per_atom * natoms
            if state["hull"] is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    state["hull"] = hull_data(context.hull_book().get(plan.elements))  # cached by the funnel
                    state["diagram"] = phase_diagram(state["hull"])  # read back once, not per candidate
            fields.update(place_on_hull(state["hull"], Composition(c.structure.composition.reduced_formula),
                                        c.result.energy_per_atom, c.result.potential_identity, state["diagram"]))
        if state["hull"] is not None and not state["hull_stored"]:  # the Hull tab shows it from now on
            stored = state["hull_stored"] = context.sessions.store_hull(
                session, state["hull"], {record_id: fields}, batch=state["batch"], unless=cancelled)
        else:
            stored = context.sessions.update_candidates(session, {record_id: fields}, batch=state["batch"],
                                                        unless=cancelled)
        if stored:
            state["stored"] += 1
            if on_update is not None:
                on_update(state["stored"])

    def event(stage: str, done: int, total: int, message: str) -> None:
        label = STAGE_LABELS.get(stage, stage)
        progress(done, max(total, 1), f"{label}: {message}" if message else label)

    try:
        result = discover(plan, generators=loaded, potential=potential, on_event=event, on_candidate=relaxed,
                          should_stop=cancelled, on_ranked=ranked)
    except JobCancelled:
        raise
    except ValueError as exc:  # a system no generator serves, a hull that cannot be built: the reason says which
        raise JobError(str(exc)) from None
    batch = state["batch"]
    flags = judge_relaxed(context, session, batch, unless=cancelled) if batch else {}
    if batch:
        order = {record_id: c for c in result.ranked() for record_id in [state["ids"].get(c.index)] if record_id}
        context.sessions.reorder_candidates(session, list(order), batch=batch)
    if cancelled():
        raise JobCancelled(f"Discover cancelled: {state['stored']} relaxed candidates are kept")
    counts = result.counts()
    return {"system": plan.system, "counts": counts, "stopped": result.stopped, "minutes": result.minutes,
            "skipped": result.skipped, "made": result.made, "potential": potential.name, **flags}


def discover_message(summary: dict) -> str:
    counts = summary["counts"]
    minutes = sum(summary["minutes"].values())
    made = ", ".join(f"{name} {n}" for name, n in summary["made"].items())
    from wyckoff_lab.widgets.chemistry import system_text

    text = (f"{system_text(summary['system'].split('-'))}: pooled {counts['pooled']} ({made}); {counts['duplicates']} duplicates and "
            f"{counts['known']} known structures removed; {counts['relaxed']} relaxed with {summary['potential']} "
            f"({summary['stopped']}) in {minutes:.1f} min · {counts['sun']} S.U.N., {counts['msun']} M.S.U.N.")
    if summary["skipped"]:
        text += " · not used: " + "; ".join(f"{n} ({why})" for n, why in summary["skipped"].items())
    return text


class DiscoverPanel(Widget):
    """Pool every generator for the chosen system, pre-screen cheaply, relax the best within a time budget."""

    default_prefix = "wl-disc"

    def layout(self):
        return html.Div([
            html.H2("Discover", className="wl-step"),
            html.P("Every generator's candidates for the chosen system, duplicates and known structures removed, "
                   "ranked by a cheap pre-screen; the best are fully relaxed until the budget is spent.",
                   className="wl-note"),
            html.Div([
                html.Label(["budget (min) ", dcc.Input(id=self.id("budget"), type="number", min=0.05, step="any",
                                                       value=DEFAULT_BUDGET_MIN, className="input is-small",
                                                       style={"width": "5.5rem"})]),
                html.Label([" samples per generator ", dcc.Input(id=self.id("samples"), type="number", min=1,
                                                                 max=500, step=1, value=DEFAULT_SAMPLES,
                                                                 className="input is-small",
                                                                 style={"width": "5rem"})]),
            ], className="wl-row"),
            # Filled once the generators are known (`list_generators`): importing them must not delay the page.
            dcc.Checklist(id=self.id("generators"), options=[], value=[], inline=True, className="wl-note"),
            html.Label(["pre-screen ", dcc.Dropdown(id=self.id("prescreen"), clearable=False, value="single_point",
                                                    options=[{"label": v, "value": k}
                                                             for k, v in PRESCREEN_LABELS.items()])]),
            html.Div([
                html.Button("Discover", id=self.id("run"), n_clicks=0, className="button is-primary is-small"),
                html.Button("Cancel", id=self.id("cancel"), n_clicks=0, disabled=True,
                            className="button is-light is-small"),
            ], className="wl-row wl-buttons"),
            html.Progress(id=self.id("progress"), value="0", max="1", className="progress is-small is-link",
                          style={"visibility": "hidden"}),
            html.Div(id=self.id("progress-label"), className="wl-progress-label"),
            html.Div(id=self.id("status"), className="wl-status"),
            dcc.Store(id=self.id("live")),
        ], className="wl-panel", id=self.id("panel"))

    def register(self, app):
        context = self.context
        interval = context.settings.progress_interval_ms

        @app.callback(
            Output(self.id("generators"), "options"),
            Output(self.id("generators"), "value"),
            Input(self.links.session, "data"),
        )
        def list_generators(_session):
            context.generators_ready.wait(WARMUP_WAIT_S)
            names = discover_generators(context)
            return [{"label": f" {n}", "value": n} for n in names], names

        @app.callback(
            Output(self.links.revision, "data", allow_duplicate=True),
            Output(self.links.selected, "data", allow_duplicate=True),
            Output(self.id("status"), "children"),
            Input(self.id("run"), "n_clicks"),
            State(self.links.session, "data"),
            State(self.links.chemistry, "data"),
            State(self.id("budget"), "value"),
            State(self.id("samples"), "value"),
            State(self.id("generators"), "value"),
            State(self.id("prescreen"), "value"),
            State(self.id("cancel"), "n_clicks"),
            **self.background_job_options(interval, Output(self.id("live"), "data")),
        )
        def run_discover(set_progress, _clicks, session, chemistry, budget, samples, generators, prescreen,
                         cancel_clicks):
            sid = (session or {}).get("sid")
            shown = {"done": -1}

            def report(done, total, label):
                set_progress((str(done), str(max(total, 1)), label, shown["done"]))

            def stored(done):  # a new count in the live store refreshes the table (see `refresh_live`)
                shown["done"] = done

            try:
                summary = discover_for_session(
                    context, sid, list((chemistry or {}).get("elements") or []), budget, generators or None,
                    samples, prescreen or "single_point", progress=report, on_update=stored,
                    cancelled=cancel_check(context, sid, DISCOVER_KIND, cancel_clicks))
            except JobCancelled as exc:
                set_progress(("0", "1", "", -1))
                return revision(), None, html.Div(str(exc), className="wl-message is-warning")
            except Exception as exc:  # what was stored stays: the table is refreshed either way
                set_progress(("0", "1", "", -1))
                text = str(exc) if isinstance(exc, JobError) else unexpected(exc)
                return revision(), no_update, html.Div(text, className="wl-message is-danger")
            set_progress(("1", "1", "", -1))
            return revision(), None, html.Div(discover_message(summary), className="wl-message is-success")

        @app.callback(
            Output(self.links.revision, "data", allow_duplicate=True),
            Input(self.id("live"), "data"),
            prevent_initial_call=True,
        )
        def refresh_live(done):
            """While Discover runs, the ranked pool (0) and each stored relaxation bump the revision."""
            return revision() if done is not None and done >= 0 else no_update

        self.register_stale_status_clearing(app)  # a switched system drops the last run's lines

        @app.callback(
            Output(self.id("status"), "children", allow_duplicate=True),
            Output(self.id("progress-label"), "children", allow_duplicate=True),
            Input(self.id("cancel"), "n_clicks"),
            State(self.links.session, "data"),
            prevent_initial_call=True,
        )
        def cancel(clicks, session):
            sid = (session or {}).get("sid")
            if not sid:
                return no_update, no_update
            cancel_jobs(context, sid, DISCOVER_KIND, clicks)
            relaxed = sum(r.get("relax_status") in USABLE for r in context.sessions.candidates(sid))
            return (html.Div(f"Discover cancelled: {relaxed} relaxed candidates are kept.",
                             className="wl-message is-warning"), "")
