"""Per-tab state kept on the server: candidate records, relaxations and hulls, keyed by a session id.

Each browser tab gets its own session id (a `dcc.Store` filled when its page is built), so tabs never see each
other's candidates; ids are signed by the server (see `security`) and the store refuses any other. The data itself
lives in a diskcache folder rather than in the browser: background jobs run in forked processes and must read and
update the same records, and a hundred structures would make every callback ship megabytes of JSON back and forth.
diskcache is process-safe; read-modify-write goes through `transact()`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

import diskcache
from wyckoff_lab.widgets.security import check_session_id, issue_session_id

SESSION_TTL_S = 7 * 24 * 3600  # a tab left open for a week still finds its candidates


def new_session_id() -> str:
    """A session id for a new tab, signed by this server process (the store refuses any other)."""
    return issue_session_id()


class SessionStore:
    """Candidate records and per-session extras (the hull, the last generation's summary) in a diskcache."""

    def __init__(self, folder: str):
        self.cache = diskcache.Cache(folder, size_limit=2**31)

    def _key(self, session: str, name: str) -> str:
        # Only ids this process issued: a client-invented (or 1 MB) id never becomes a key.
        return f"session/{check_session_id(session)}/{name}"

    # -- candidates -----------------------------------------------------------------------------------------------

    def candidates(self, session: str) -> list[dict]:
        """The session's candidate records, in generation order (an empty list before the first generation)."""
        return self.cache.get(self._key(session, "candidates"), default=[])

    def candidate(self, session: str, candidate_id: str | None) -> dict | None:
        if not candidate_id:
            return None
        return next((r for r in self.candidates(session) if r["id"] == candidate_id), None)

    def set_candidates(self, session: str, records: list[dict], batch: str | None = None,
                       unless: Callable[[], bool] | None = None) -> str | None:
        """Replace the candidate set; returns the new batch id (updates addressed to an older batch are dropped).

        With `unless`, nothing changes (and None is returned) if it returns True inside the transaction.
        """
        batch = batch or uuid.uuid4().hex[:8]
        with self.cache.transact():
            if unless is not None and unless():
                return None
            self.cache.set(self._key(session, "candidates"), list(records), expire=SESSION_TTL_S)
            self.cache.set(self._key(session, "batch"), batch, expire=SESSION_TTL_S)
            self.cache.delete(self._key(session, "hull"))
        return batch

    def batch(self, session: str) -> str | None:
        return self.cache.get(self._key(session, "batch"))

    def update_candidates(self, session: str, updates: dict[str, dict], batch: str | None = None,
                          unless: Callable[[], bool] | None = None) -> int:
        """Merge fields into records by id, atomically; returns how many records changed.

        With `batch`, nothing changes if the user generated a new set meanwhile (a late relaxation result must not
        land on an unrelated candidate that happens to share its id). With `unless`, nothing changes if it returns
        True inside the transaction (a cancel recorded before this write wins; one recorded after it sees it).
        """
        with self.cache.transact():
            if unless is not None and unless():
                return 0
            return self._merge(session, updates, batch)

    def reorder_candidates(self, session: str, ids: list[str], batch: str | None = None) -> bool:
        """Put the records with these ids first, in this order (the others after them, in their order); nothing
        changes if `batch` is no longer current. The hull and every record's fields stay as they are."""
        with self.cache.transact():
            if batch is not None and self.batch(session) != batch:
                return False
            records = self.candidates(session)
            place = {record_id: i for i, record_id in enumerate(ids)}
            records.sort(key=lambda r: place.get(r["id"], len(place)))
            self.cache.set(self._key(session, "candidates"), records, expire=SESSION_TTL_S)
        return True

    def store_hull(self, session: str, hull: dict, placements: dict[str, dict], batch: str | None = None,
                   unless: Callable[[], bool] | None = None) -> bool:
        """Keep the session's hull and merge each candidate's place on it, in one transaction: both or, when
        `unless()` is True inside it, neither (False). Placements addressed to an older batch are dropped."""
        with self.cache.transact():
            if unless is not None and unless():
                return False
            self.cache.set(self._key(session, "hull"), hull, expire=SESSION_TTL_S)
            self._merge(session, placements, batch)
        return True

    def _merge(self, session: str, updates: dict[str, dict], batch: str | None) -> int:
        """Merge fields into records by id (inside the caller's transaction); 0 if `batch` is not current."""
        if batch is not None and self.batch(session) != batch:
            return 0
        records = self.candidates(session)
        changed = 0
        for record in records:
            fields = updates.get(record["id"])
            if fields:
                record.update(fields)
                changed += 1
        if changed:
            self.cache.set(self._key(session, "candidates"), records, expire=SESSION_TTL_S)
        return changed

    # -- extras ---------------------------------------------------------------------------------------------------

    def get(self, session: str, name: str, default=None):
        return self.cache.get(self._key(session, name), default=default)

    def set(self, session: str, name: str, value) -> None:
        self.cache.set(self._key(session, name), value, expire=SESSION_TTL_S)

    def close(self) -> None:
        self.cache.close()


def revision() -> str:
    """A fresh token for the revision store: callbacks that show candidates listen to it, jobs bump it."""
    return f"{time.time():.6f}-{uuid.uuid4().hex[:6]}"


def select_records(records: Iterable[dict], ids: Iterable[str] | None) -> list[dict]:
    """The records with the given ids, in record order (all records when ids is None)."""
    if ids is None:
        return list(records)
    wanted = set(ids)
    return [r for r in records if r["id"] in wanted]

