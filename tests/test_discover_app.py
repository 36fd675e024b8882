"""The app's Discover action on real MP-20 rows, real generators and CHGNet: the pre-screened pool replaces the
session's candidates in pre-screen order, each relaxation is stored and placed on the session's hull as it
finishes, the set ends ranked by E_hull, a cancel keeps what was stored, and bad input is refused with its reason;
the button itself is tested in test_app_e2e."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = ["Al", "Ca", "Cu"]
GENERATORS = ["pyxtal", "substitution"]


@pytest.fixture
def context(tmp_path, mp20_with_prototypes, monkeypatch):
    from wyckoff_lab.widgets.context import LabContext, LabSettings

    monkeypatch.setenv("WYCKOFF_LAB_DATA", str(mp20_with_prototypes))
    context = LabContext(LabSettings(warm_up=False, work_dir=tmp_path / "work", relax_max_steps=30,
                                     potential="chgnet"))
    yield context
    context.sessions.close()


def session_id() -> str:
    from wyckoff_lab.widgets.state import new_session_id

    return new_session_id()


def test_discover_fills_the_session_in_prescreen_order_then_ranks_by_e_above_hull(context):
    from wyckoff_lab.widgets.discover import discover_for_session, discover_message

    sid = session_id()
    updates, labels = [], []
    summary = discover_for_session(context, sid, SYSTEM, budget_min=10.0, generators=GENERATORS, samples=3,
                                   progress=lambda done, total, label: labels.append(label),
                                   on_update=updates.append)
    records = context.sessions.candidates(sid)
    counts = summary["counts"]
    assert counts["pooled"] == sum(summary["made"].values()) and set(summary["made"]) == set(GENERATORS)
    # Shown: every candidate that went to the pre-screen (duplicates and known structures are counted, not listed).
    assert len(records) == counts["pooled"] - counts["duplicates"] - counts["known"] > 0
    assert updates[0] == 0 and updates[-1] == counts["relaxed"] == len(records)  # the pool first, then each one
    assert any(label.startswith("pre-screening") for label in labels)
    assert any(label.startswith("relaxing the best first") for label in labels)
    for record in records:
        assert record["generator"] in GENERATORS and set(record["elements"]) <= set(SYSTEM)
        assert record["relax_status"] and record["discover_rank"] is not None
        assert record["prescreen"] is None or math.isfinite(record["prescreen"])
    placed = [r for r in records if r["e_above_hull"] is not None]
    assert placed, "no relaxed candidate was placed on the hull"
    # Ranked at the end: placed candidates by E_hull first, the others after.
    assert [r["e_above_hull"] for r in records[:len(placed)]] == sorted(r["e_above_hull"] for r in placed)
    hull = context.sessions.get(sid, "hull")
    assert hull["elements"] == SYSTEM and hull["potential_identity"] == placed[0]["potential_identity"]
    # Each placement agrees with the funnel's own hull: the same self-consistent hull "Build hull" shows.
    assert all(-1.0 < r["e_above_hull"] < 5.0 for r in placed)
    assert all(r["relaxed_unique"] is not None for r in placed)  # judged after relaxation
    text = discover_message(summary)
    assert text.startswith("Ca-Al-Cu: pooled") and "relaxed with chgnet" in text  # the chemist's order


def test_a_cancel_before_the_first_relaxation_stores_nothing(context):
    from wyckoff_lab.widgets.discover import discover_for_session
    from wyckoff_lab.widgets.jobs import JobCancelled

    sid = session_id()
    with pytest.raises(JobCancelled, match="cancelled"):
        discover_for_session(context, sid, SYSTEM, budget_min=10.0, generators=GENERATORS, samples=2,
                             cancelled=lambda: True)
    assert context.sessions.candidates(sid) == []


@pytest.mark.parametrize("elements, kwargs, reason", [
    ([], {}, "Pick the elements"),
    (SYSTEM, {"budget_min": 0}, "budget"),
    (SYSTEM, {"samples": 0}, "samples"),
    (["Al", "Xx"], {}, "unknown element"),
    (SYSTEM, {"generators": ["no-such-generator"]}, "no-such-generator"),
])
def test_bad_discover_requests_are_refused_with_the_reason(context, elements, kwargs, reason):
    from wyckoff_lab.widgets.discover import discover_for_session
    from wyckoff_lab.widgets.jobs import JobError

    sid = session_id()
    arguments = {"budget_min": 1.0, "generators": GENERATORS, "samples": 2, **kwargs}
    with pytest.raises(JobError, match=reason):
        discover_for_session(context, sid, elements, **arguments)
    assert context.sessions.candidates(sid) == []
