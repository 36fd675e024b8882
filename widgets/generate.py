"""Step 3, generate: generator, number of samples, temperature, seed, stability token and the generator's own
options (likelihood ranking, top-p ...), run in the background.

The generator list comes from the `Generator` registry; each generator's declared `supported_conditions` and
`uses_temperature` decide which controls are enabled, and its declared per-request `options` become the inputs of
its options row: a new generator appears here without UI changes.
"""

from __future__ import annotations


from dash import ALL, Input, Output, State, dcc, html, no_update
from wyckoff_lab.widgets.base import Widget
from wyckoff_lab.widgets.context import WARMUP_WAIT_S
from wyckoff_lab.widgets.jobs import (
    GENERATION_CANCELLED,
    GenerationRequest,
    JobCancelled,
    JobError,
    cancel_check,
    generation_message,
    run_generation,
    unexpected,
)
from wyckoff_lab.widgets.state import revision

CANCEL_KIND = "generate"  # the session's cancel record for this widget's jobs (see jobs.request_cancel)
RESULT_POLL_MS = 250  # how often the browser asks whether the candidates are ready (they show this much sooner)
STABILITY_OPTIONS = [{"label": "any stability", "value": ""},
                     {"label": "stable (low E above hull)", "value": "low"},
                     {"label": "unstable (high E above hull)", "value": "high"}]


CHARGE_BALANCED_HELP = ("Keep only compositions where one oxidation state per element sums to zero (SMACT's rule); "
                        "alloys and other all-metal systems count as balanced. What the generator makes otherwise "
                        "is sampled again.")


def request_for(name, n, chemistry: dict | None, symmetry: dict | None, temperature, seed, stability,
                options: dict, charge_balanced: bool) -> GenerationRequest:
    """The GenerationRequest of the panel's controls."""
    chemistry, symmetry = chemistry or {}, symmetry or {}
    return GenerationRequest(
        generator=name, n=n, elements=chemistry.get("elements") or None,
        formula=chemistry.get("formula"), max_atoms=chemistry.get("max_atoms"),
        spacegroup=symmetry.get("spacegroup"), template=symmetry.get("template"),
        temperature=temperature or 1.0, seed=None if seed in (None, "") else int(seed),
        stability=stability or None, options=options, charge_balanced=bool(charge_balanced))


def generator_options(context) -> tuple[list[dict], dict[str, str]]:
    """Dropdown options for every registered generator (unusable ones disabled) and their status messages."""
    options, notes = [], {}
    for name in context.generator_names():
        usable, message = context.generator_status(name)
        label = name if usable else f"{name} — unavailable"
        options.append({"label": label, "value": name, "disabled": not usable})
        notes[name] = message if usable else f"Unavailable: {message}"
    return options, notes


def controls_for(context, name: str | None) -> dict:
    """Which controls a generator can use: from its declared conditions, never from a hard-coded list."""
    try:
        generator = context.generator(name) if name else None
    except Exception:
        generator = None
    supported = getattr(generator, "supported_conditions", frozenset())
    return {"temperature": bool(getattr(generator, "uses_temperature", False)),
            "rank": bool(getattr(generator, "ranks_by_likelihood", False)),
            "stability": "stability" in supported,
            "template": "template" in supported, "spacegroup": "spacegroup" in supported,
            "supported": sorted(supported)}


def option_settings(name: str, ids: list | None, values: list | None) -> dict:
    """{option: value} of generator `name`'s option inputs (a checkbox's list of ticks as a bool)."""
    return {ident["name"]: (bool(value) if isinstance(value, list) else value)
            for ident, value in zip(ids or [], values or []) if ident.get("generator") == name}


class GeneratePanel(Widget):
    """Run a generator on the chosen chemistry and symmetry; progress bar and cancel; never blocks the page."""

    default_prefix = "wl-gen"

    def layout(self):
        # Generator availability is filled in by a callback once models are loaded: the page must not wait.
        names = self.context.generator_names()
        settings = self.context.settings
        return html.Div([
            html.H2("3 · Generate", className="wl-step"),
            dcc.Dropdown(id=self.id("generator"), options=[{"label": f"{n} (loading…)", "value": n} for n in names],
                         value=None, clearable=False, placeholder="loading generators…"),
            html.Div("", id=self.id("note"), className="wl-note"),
            html.Div(id=self.id("unavailable")),
            html.Div([
                _field("Samples", dcc.Input(id=self.id("n"), type="number", min=1, max=settings.max_samples, step=1,
                                            value=settings.default_samples, className="input is-small")),
                _field("Temperature", dcc.Input(id=self.id("temperature"), type="number", min=0.05, max=5,
                                                step=0.05, value=1.0, className="input is-small")),
                _field("Seed", dcc.Input(id=self.id("seed"), type="number", min=0, step=1, value=0,
                                         placeholder="random", className="input is-small")),
            ], className="wl-row"),
            html.Div([], id=self.id("options"), className="wl-row"),
            dcc.Dropdown(id=self.id("stability"), options=STABILITY_OPTIONS, value="", clearable=False),
            html.Div(dcc.Checklist(id=self.id("charge-balanced"),
                                   options=[{"label": " charge-balanced compositions only", "value": "on"}],
                                   value=[], className="wl-check"), title=CHARGE_BALANCED_HELP),
            html.Div([
                html.Button("Generate", id=self.id("run"), n_clicks=0, className="button is-primary"),
                html.Button("Cancel", id=self.id("cancel"), n_clicks=0, disabled=True,
                            className="button is-light"),
            ], className="wl-row wl-buttons"),
            html.Progress(id=self.id("progress"), value="0", max="1", className="progress is-small is-primary",
                          style={"visibility": "hidden"}),
            html.Div(id=self.id("progress-label"), className="wl-progress-label"),
            html.Div(id=self.id("status"), className="wl-status"),
        ], className="wl-panel", id=self.id("panel"))

    def option_inputs(self, name: str) -> list:
        """One input per per-request option generator `name` declares (its default shown), ids tagged with the
        generator so a value typed for one is never sent to another."""
        from wyckoff_lab.core.generators import generator_class

        try:
            declared = generator_class(name).options
        except ValueError:
            return []
        inputs = []
        for option in declared:
            if not option.per_request:
                continue
            ident = {"type": self.id("option"), "name": option.name, "generator": name}
            if option.kind == "bool":
                control = dcc.Checklist(id=ident, options=[{"label": option.ui_label, "value": "on"}],
                                        value=["on"] if option.default else [], className="wl-check")
            elif option.kind in ("int", "float"):
                low = option.minimum if option.minimum is not None else option.above
                control = dcc.Input(id=ident, type="number", min=low, max=option.maximum,
                                    step=1 if option.kind == "int" else "any", value=option.default,
                                    className="input is-small")
            elif option.choices:
                control = dcc.Dropdown(id=ident, options=list(option.choices), value=option.default, clearable=False)
            else:
                control = dcc.Input(id=ident, type="text", value=option.default, className="input is-small")
            inputs.append(html.Div([html.Label(option.ui_label, className="label is-small", title=option.help),
                                    control], className="wl-field wl-narrow", title=option.help))
        return inputs

    @staticmethod
    def _note(controls: dict, description: str) -> str:
        return f"{description}. Honours: {', '.join(controls['supported']) or 'nothing'}."

    def register(self, app):
        context = self.context

        @app.callback(
            Output(self.id("generator"), "options"),
            Output(self.id("generator"), "value"),
            Output(self.id("unavailable"), "children"),
            Input(self.links.session, "data"),
        )
        def list_generators(_session):
            context.generators_ready.wait(WARMUP_WAIT_S)
            options, notes = generator_options(context)
            unavailable = [html.Div(notes[o["value"]], className="wl-message is-warning")
                           for o in options if o["disabled"]]
            return options, context.default_generator(), unavailable

        @app.callback(
            Output(self.id("temperature"), "disabled"),
            Output(self.id("options"), "children"),
            Output(self.id("stability"), "disabled"),
            Output(self.id("note"), "children"),
            Input(self.id("generator"), "value"),
        )
        def enable_controls(name):
            if not name:
                return no_update, no_update, no_update, "Loading generators…"
            controls = controls_for(context, name)
            usable, message = context.generator_status(name) if name else (False, "no generator")
            note = self._note(controls, message) if usable else f"Unavailable: {message}"
            return not controls["temperature"], self.option_inputs(name), not controls["stability"], note

        @app.callback(
            Output(self.links.revision, "data", allow_duplicate=True),
            Output(self.links.selected, "data", allow_duplicate=True),
            Output(self.id("status"), "children"),
            Input(self.id("run"), "n_clicks"),
            State(self.links.session, "data"),
            State(self.links.chemistry, "data"),
            State(self.links.symmetry, "data"),
            State(self.id("generator"), "value"),
            State(self.id("n"), "value"),
            State(self.id("temperature"), "value"),
            State(self.id("seed"), "value"),
            State({"type": self.id("option"), "name": ALL, "generator": ALL}, "value"),
            State({"type": self.id("option"), "name": ALL, "generator": ALL}, "id"),
            State(self.id("stability"), "value"),
            State(self.id("charge-balanced"), "value"),
            State(self.id("cancel"), "n_clicks"),
            **self.background_job_options(min(context.settings.progress_interval_ms, RESULT_POLL_MS)),
        )
        def generate(set_progress, _clicks, session, chemistry, symmetry, name, n, temperature, seed, option_values,
                     option_ids, stability, charge_balanced, cancel_clicks):
            sid = (session or {}).get("sid")
            try:
                request = request_for(name, n, chemistry, symmetry, temperature, seed, stability,
                                      option_settings(name, option_ids, option_values), bool(charge_balanced))
                summary = run_generation(context, sid, request,
                                         lambda done, total, label: set_progress((str(done), str(max(total, 1)),
                                                                                  label)),
                                         cancelled=cancel_check(context, sid, CANCEL_KIND, cancel_clicks))
            except JobCancelled as exc:
                set_progress(("0", "1", ""))
                return no_update, no_update, html.Div(str(exc), className="wl-message is-warning")
            except Exception as exc:  # JobError: the user's to fix; anything else: reported, never a broken page
                set_progress(("0", "1", ""))
                text = str(exc) if isinstance(exc, JobError) else unexpected(exc)
                return no_update, no_update, html.Div(text, className="wl-message is-danger")
            set_progress(("1", "1", ""))
            return revision(), summary["first"], html.Div(generation_message(summary, name),
                                                          className="wl-message is-success")

        self.register_cancel_record(app, CANCEL_KIND, GENERATION_CANCELLED)

        self.register_stale_status_clearing(app)


def _field(label: str, control):
    return html.Div([html.Label(label, className="label is-small"), control], className="wl-field wl-narrow")
