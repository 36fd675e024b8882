"""Save a session (candidates, relaxations, hull) to a versioned JSON file, and open one back into a tab.

The file is plain JSON: {"format": "wyckoff-lab-session", "version": 1, "saved": ..., "candidates": [records],
"hull": hull data or null, "generation": the last generation's summary or null}. Opening validates the whole file
before anything changes: a corrupt, foreign or newer file gets a message saying what is wrong, and the tab keeps
what it had.
"""

from __future__ import annotations

import base64
import json
import time

from dash import Dash, Input, Output, State, dcc, html, no_update
from wyckoff_lab.widgets.state import revision

SESSION_FORMAT = "wyckoff-lab-session"
SESSION_VERSION = 1
MAX_SESSION_BYTES = 24 * 2**20  # below the app's request limit (base.MAX_REQUEST_BYTES) once base64-encoded
RECORD_KEYS = ("id", "label", "formula", "structure", "elements", "natoms")


class SessionFileError(ValueError):
    """A session file that cannot be opened; the message says why (nothing was changed)."""


def session_document(context, sid: str) -> dict:
    """Everything a session file keeps of session `sid`."""
    sessions = context.sessions
    return {"format": SESSION_FORMAT, "version": SESSION_VERSION,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "candidates": sessions.candidates(sid), "hull": sessions.get(sid, "hull"),
            "generation": sessions.get(sid, "generation")}


def parse_session_file(content: bytes) -> dict:
    """The validated document of a session file's bytes; SessionFileError says what is wrong with it."""
    from pymatgen.core import Structure

    if len(content) > MAX_SESSION_BYTES:
        raise SessionFileError(f"The file is {len(content) / 2**20:.0f} MB; a session file is at most "
                               f"{MAX_SESSION_BYTES // 2**20} MB")
    try:
        document = json.loads(content.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SessionFileError(f"This is not a session file (not JSON: {exc})") from None
    if not isinstance(document, dict) or document.get("format") != SESSION_FORMAT:
        raise SessionFileError("This is not a Wyckoff Lab session file (no \"format\": \"wyckoff-lab-session\")")
    version = document.get("version")
    if not isinstance(version, int) or version > SESSION_VERSION or version < 1:
        raise SessionFileError(f"Session file version {version!r} is not one this app reads (it reads 1 to "
                               f"{SESSION_VERSION}): update Wyckoff Lab")
    records = document.get("candidates")
    if not isinstance(records, list):
        raise SessionFileError("The session file has no candidate list")
    seen = set()
    for i, record in enumerate(records):
        if not isinstance(record, dict) or any(key not in record for key in RECORD_KEYS):
            raise SessionFileError(f"Candidate {i + 1} of the file lacks some of {', '.join(RECORD_KEYS)}")
        if record["id"] in seen:
            raise SessionFileError(f"Candidate id {record['id']!r} appears twice in the file")
        seen.add(record["id"])
        for field in ("structure", "relaxed_structure"):
            if record.get(field) is not None:
                try:
                    Structure.from_dict(record[field])
                except Exception as exc:  # noqa: BLE001 - any failure means the file is damaged
                    raise SessionFileError(f"Candidate {i + 1}'s {field.replace('_', ' ')} cannot be read "
                                           f"({type(exc).__name__}: {exc})") from None
    hull = document.get("hull")
    if hull is not None and not (isinstance(hull, dict) and {"elements", "diagram", "potential_identity"} <= set(hull)):
        raise SessionFileError("The session file's hull is damaged (elements, diagram or potential missing)")
    if hull is not None:
        from wyckoff_lab.widgets.jobs import phase_diagram

        try:
            phase_diagram(hull)
        except Exception as exc:  # noqa: BLE001
            raise SessionFileError(f"The session file's hull cannot be read ({type(exc).__name__}: {exc})") from None
    generation = document.get("generation")
    if generation is not None and not isinstance(generation, dict):
        raise SessionFileError("The session file's generation summary is damaged")
    return document


def open_session_document(context, sid: str, document: dict) -> int:
    """Replace session `sid`'s candidates (and hull) with a validated document's; returns the candidate count."""
    sessions = context.sessions
    batch = sessions.set_candidates(sid, document["candidates"])
    if document.get("hull") is not None:
        sessions.store_hull(sid, document["hull"], {}, batch=batch)
    sessions.set(sid, "generation", document.get("generation"))
    return len(document["candidates"])


class SessionFiles:
    """"Save session" and "Open session" buttons with their message line (a Crystal Toolkit style component: it
    owns its layout and callbacks and takes the context and the page's store ids)."""

    def __init__(self, context, links, prefix: str = "wl-files"):
        self.context, self.links, self.prefix = context, links, prefix

    def id(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def layout(self):
        return html.Div([
            html.Button("Save session", id=self.id("save"), className="button is-small",
                        title="download this tab's candidates, relaxations and hull as a JSON file"),
            dcc.Upload(html.Button("Open session", className="button is-small",
                                   title="replace this tab's candidates with those of a saved session file"),
                       id=self.id("open"), accept=".json,application/json", multiple=False,
                       max_size=MAX_SESSION_BYTES),
            dcc.Download(id=self.id("download")),
            html.Span(id=self.id("message"), className="wl-session-message"),
        ], className="wl-session-files buttons are-small")

    def register(self, app: Dash) -> None:
        context = self.context

        @app.callback(Output(self.id("download"), "data"), Output(self.id("message"), "children"),
                      Input(self.id("save"), "n_clicks"), State(self.links.session, "data"),
                      prevent_initial_call=True)
        def save(_clicks, session):
            sid = (session or {}).get("sid")
            if not sid:
                return no_update, no_update
            document = session_document(context, sid)
            name = time.strftime("wyckoff-lab-session-%Y%m%d-%H%M%S.json")
            return (dict(content=json.dumps(document), filename=name, type="application/json"),
                    f"saved {len(document['candidates'])} candidates as {name}")

        @app.callback(Output(self.links.revision, "data", allow_duplicate=True),
                      Output(self.id("message"), "children", allow_duplicate=True),
                      Input(self.id("open"), "contents"), State(self.id("open"), "filename"),
                      State(self.links.session, "data"), prevent_initial_call=True)
        def open_file(contents, filename, session):
            sid = (session or {}).get("sid")
            if not sid or not contents:
                return no_update, no_update
            try:
                _, encoded = contents.split(",", 1)
                document = parse_session_file(base64.b64decode(encoded, validate=False))
            except SessionFileError as exc:
                return no_update, html.Span(f"{filename}: {exc}; nothing was changed", className="has-text-danger")
            except (ValueError, TypeError) as exc:
                return no_update, html.Span(f"{filename}: cannot be read ({exc}); nothing was changed",
                                            className="has-text-danger")
            n = open_session_document(context, sid, document)
            return revision(), f"opened {filename}: {n} candidates"
