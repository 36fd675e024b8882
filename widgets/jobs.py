"""The long-running work behind the buttons, as plain functions of (context, session, request, progress).

Dash background callbacks call these in processes forked by the job server; tests call them directly. Each one reports progress
through a plain callback, writes its results into the session's records, and turns every expected failure (bad
input, an unloadable model, an exploding relaxation) into a `JobError` whose message the UI shows as it is.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from pymatgen.core import Composition, Structure
from wyckoff_lab.widgets.context import LabContext
from wyckoff_lab.widgets.records import build_records

log = logging.getLogger(__name__)

Progress = Callable[[float, float, str], None]  # (done, total, label)
RELAX_CHUNK = 8  # candidates relaxed per batch in "Relax all": progress after each, cancel between them
USABLE = ("converged", "not_converged")


class JobError(Exception):
    """A failure the user can act on; the message is shown in the UI as it is."""


class JobCancelled(JobError):
    """The user pressed cancel: the job stopped, and what it had stored before the cancel stays."""


GENERATION_CANCELLED = "Generation cancelled; the candidates from before stay as they were."
HULL_CANCELLED = "Hull cancelled; nothing of it was stored, and the candidates keep what they had."


def request_cancel(context: LabContext, session: str, kind: str, clicks: int) -> None:
    """Record that the user pressed a cancel button (`clicks`: its n_clicks) for `kind` of job in `session`.

    Dash also kills the job's process, but a job can outlive that: one still waiting for the warm-up has no
    process to kill yet, and one may be between its last step and its write. Jobs check this record (see
    `cancel_check`) before every step and inside the transaction of every write, so nothing that arrives after
    the cancel reaches the session's records or the page.
    """
    context.sessions.set(session, f"cancel/{kind}", int(clicks or 0))
    retire_jobs(context, session, kind)


# -- statuses that belong to their job ------------------------------------------------------------------------------
#
# A status line is data tied to the job that made it: {"job", "kind", "text", "level"}. A widget starts a job with
# `start_job` (the job id becomes the session's current job of that kind), returns `job_status(job, ...)` from the
# job into a store, and shows it through `visible_status`, which hides it once that job is no longer current: a
# cancel (`request_cancel` retires the job), a newer job of the same kind, or `retire_jobs` (a switched system).


def start_job(context: LabContext, session: str, kind: str) -> str:
    """A new job id, made the session's current job of `kind` (an older job's status stops being shown)."""
    import uuid

    job = uuid.uuid4().hex[:12]
    context.sessions.set(session, f"job/{kind}", job)
    return job


def current_job(context: LabContext, session: str, kind: str) -> str | None:
    return context.sessions.get(session, f"job/{kind}")


def retire_jobs(context: LabContext, session: str, *kinds: str) -> None:
    """No job of these kinds is current any more (cancel, switched chemical system): their statuses disappear."""
    for kind in kinds:
        context.sessions.set(session, f"job/{kind}", None)


def job_status(job: str | None, kind: str, text: str, level: str = "info") -> dict:
    """The status line of one job (level: info, success, warning, danger), as a store value."""
    return {"job": job, "kind": kind, "text": text, "level": level}


def visible_status(context: LabContext, session: str, status: dict | None) -> dict | None:
    """`status` while its job is the session's current one of its kind, else None (the line is stale)."""
    if not status or not session:
        return None
    if status.get("job") is None or status.get("job") != current_job(context, session, status.get("kind", "")):
        return None
    return status


def cancel_check(context: LabContext, session: str, kind: str, seen: int | None) -> Callable[[], bool]:
    """A check that turns True once a cancel newer than `seen` (the cancel button's n_clicks when the job was
    asked for) is recorded for `kind` in `session`."""
    seen = int(seen or 0)
    return lambda: int(context.sessions.get(session, f"cancel/{kind}") or 0) > seen


def _never() -> bool:
    return False


def _no_progress(done, total, label) -> None:
    pass


def unexpected(exc: Exception) -> str:
    """The message for a failure nobody foresaw: logged with its traceback, shown briefly, page and data intact."""
    log.error("unexpected failure in a background job", exc_info=exc)
    return (f"Something went wrong ({type(exc).__name__}: {exc}). Nothing that was already generated or relaxed "
            "is lost; the details are in the app's log.")


class Throttle:
    """Calls `report` at most every `every_s` seconds (and always for the first and the forced calls)."""

    def __init__(self, report: Progress, every_s: float = 0.25):
        self.report, self.every_s, self.last = report, every_s, -math.inf

    def __call__(self, done, total, label, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= self.every_s:
            self.last = now
            self.report(done, total, label)


# -- generation -----------------------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    generator: str
    n: int
    elements: list[str] | None = None
    formula: str | None = None
    max_atoms: int | None = None
    spacegroup: int | None = None
    template: list[list[str]] | None = None
    temperature: float = 1.0
    seed: int | None = None
    stability: str | None = None
    charge_balanced: bool = False  # charge-balanced compositions only (quality.generate_charge_balanced)
    # The generator's per-request options (its declared `GeneratorOption`s, e.g. {"oversample": 3}).
    options: dict = field(default_factory=dict)


def conditions_for(request: GenerationRequest):
    """The `Conditions` of a request; what a generator cannot honour it refuses itself, with its own message."""
    from wyckoff_lab.core.generators import Conditions

    try:
        return Conditions(
            elements=tuple(request.elements) if request.elements else None,
            formula=request.formula or None,
            spacegroup=request.spacegroup or None,
            template=tuple(tuple(p) for p in request.template or ()),
            stability=request.stability or None,
            max_atoms=request.max_atoms or None,
            charge_balanced=bool(request.charge_balanced),
        )
    except (ValueError, KeyError) as exc:
        raise JobError(f"Invalid conditions: {exc.args[0] if exc.args else exc}") from None


MIN_SAMPLES_PER_WORKER = 20  # below this a worker's fork and hand-over cost more than it saves
FORK_THREADS: list[int] = []  # Python threads of this process at each fork of generation workers (tests read it)


def generation_workers(context: LabContext, generator, n: int) -> int:
    """How many processes share a generation: 1 unless the generator is parallel-safe, at most one per core."""
    if not getattr(generator, "parallel_safe", False):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = context.settings.generation_workers or cores
    return max(1, min(wanted, cores, n // MIN_SAMPLES_PER_WORKER))


def generate_in_workers(generator, n: int, conditions, temperature: float, seed: int | None, workers: int,
                        progress: Callable[[int, int], None]):
    """`generator.generate(n, ...)` split over `workers` processes (this one and forked ones), merged in worker order.

    Each share gets its own seed drawn from `seed`, so a given seed and worker count give the same candidates.
    Workers are forked from the job process (the models are inherited) and die with it when the job is cancelled
    (they share its process group). The caller closes its sqlite connections first (`LabContext.close_connections`);
    the job process is single-threaded (forked by the job server), and `FORK_THREADS` records that per fork.
    """
    from wyckoff_lab.core.generators.quality import generate_charge_balanced

    if workers <= 1:
        return generate_charge_balanced(generator, n, conditions, temperature, seed, progress)
    import multiprocessing

    import numpy as np
    from wyckoff_lab.core.generators import GenerationResult

    shares = [n // workers + (i < n % workers) for i in range(workers)]
    seeds = [int(x) for x in np.random.SeedSequence(seed).generate_state(workers)]
    fork = multiprocessing.get_context("fork")
    done = fork.Array("i", workers, lock=False)  # samples finished per share, for the progress bar
    started = time.perf_counter()

    def share(i: int, connection) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = generate_charge_balanced(generator, shares[i], conditions, temperature, seeds[i],
                                                  lambda d, _t: done.__setitem__(i, d))
            connection.send(("ok", result))
        except BaseException as exc:  # reported to the job process, which raises it
            connection.send(("error", (isinstance(exc, ValueError), f"{exc}")))
        finally:
            connection.close()

    pipes, processes = [], []
    import threading

    FORK_THREADS.append(threading.active_count())
    for i in range(1, workers):
        receive, send = fork.Pipe(duplex=False)
        process = fork.Process(target=share, args=(i, send), daemon=True)
        process.start()
        send.close()
        pipes.append(receive)
        processes.append(process)
    try:
        own = generate_charge_balanced(generator, shares[0], conditions, temperature, seeds[0],
                                       lambda d, _t: (done.__setitem__(0, d), progress(sum(done), n)))
        results = [own]
        for receive in pipes:
            while not receive.poll(0.25):
                progress(sum(done), n)
            kind, value = receive.recv()
            if kind == "error":
                is_value_error, message = value
                raise (ValueError if is_value_error else RuntimeError)(message)
            results.append(value)
    finally:
        for process in processes:
            process.join(timeout=1)
            if process.is_alive():
                process.kill()
    merged = GenerationResult([c for r in results for c in r.candidates], attempts=sum(r.attempts for r in results),
                              ranked_out=sum(r.ranked_out for r in results))
    for r in results:
        for mine, theirs in ((merged.failures, r.failures), (merged.rejected, getattr(r, "rejected", {}) or {})):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
    merged.seconds = time.perf_counter() - started
    return merged


def configured_generator(generator, options: dict):
    """`generator.with_options(**options)`: a copy sharing the loaded model, or a clear JobError for an option the
    generator does not take or a value its declaration refuses."""
    try:
        return generator.with_options(**(options or {}))
    except ValueError as exc:
        raise JobError(str(exc)) from None


def run_generation(context: LabContext, session: str, request: GenerationRequest,
                   progress: Progress = _no_progress, cancelled: Callable[[], bool] = _never) -> dict:
    """Generate candidates and make them the session's candidate set. Returns a summary for the status line.

    What was generated before stays untouched when anything fails, and when `cancelled()` turns True before the
    new set is stored (JobCancelled says so).
    """
    if request.n is None or int(request.n) < 1:
        raise JobError("Ask for at least one sample")
    n = int(request.n)
    if n > context.settings.max_samples:
        raise JobError(f"At most {context.settings.max_samples} samples per run")
    try:
        generator = context.generator(request.generator)
    except Exception as exc:  # ModelLoadError and friends: the reason is what the user needs
        raise JobError(f"The {request.generator} generator cannot be used: {exc}") from None
    conditions = conditions_for(request)
    generator = configured_generator(generator, request.options)
    stop = JobCancelled(GENERATION_CANCELLED)
    if cancelled():  # pressed while the job still waited for the app's warm-up
        raise stop
    report = Throttle(progress)
    report(0, n, f"{request.generator}: starting", force=True)
    workers = generation_workers(context, generator, n)
    if workers > 1:
        context.close_connections()  # the workers are forked: no sqlite connection may be copied into them
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = generate_in_workers(
                generator, n, conditions, float(request.temperature or 1.0), request.seed, workers,
                lambda done, total: report(done, total, f"{request.generator}: {done} of {total}"))
    except ValueError as exc:  # impossible templates, unseen elements, unsupported conditions: said by the generator
        raise JobError(str(exc)) from None
    if not result.candidates:
        failures = ", ".join(f"{k}: {v}" for k, v in result.failures.items()) or "no reason given"
        raise JobError(f"No candidate came out of {result.attempts} attempts ({failures})")
    report(n, n, "checking validity and novelty", force=True)
    t0 = time.perf_counter()
    records = build_records(result.candidates, context.references())
    if context.sessions.set_candidates(session, records, unless=cancelled) is None:
        raise stop
    context.sessions.set(session, "generation", {"generator": request.generator, "conditions": conditions.as_dict(),
                                                 "seconds": result.seconds, "attempts": result.attempts,
                                                 "failures": result.failures,
                                                 "options": {o.name: getattr(generator, o.name, None)
                                                             for o in generator.options if o.per_request}})
    return {"n": len(records), "attempts": result.attempts, "failures": result.failures,
            "rejected": dict(getattr(result, "rejected", None) or {}), "ranked_out": result.ranked_out,
            "seconds": result.seconds,
            "check_seconds": time.perf_counter() - t0,
            "valid": sum(r["struct_valid"] and r["comp_valid"] for r in records),
            "novel": sum(bool(r["novel"]) for r in records), "first": records[0]["id"],
            "novelty_known": context.references() is not None}


def generation_message(summary: dict, generator: str) -> str:
    text = (f"{summary['n']} candidates from {generator} in {summary['seconds']:.1f} s "
            f"(+{summary['check_seconds']:.1f} s checks) · {summary['valid']} valid")
    text += f" · {summary['novel']} novel vs MP-20" if summary["novelty_known"] else " · novelty unknown (no MP-20)"
    rejected = summary.get("rejected") or {}
    if rejected:
        reasons = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rejected.items())
        text += f" · {sum(rejected.values())} sampled again by the quality gate ({reasons})"
    ranked_out = summary.get("ranked_out", 0)
    if ranked_out:
        text += f" · the most likely {summary['n']} of {summary['n'] + ranked_out}"
    failed = summary["attempts"] - summary["n"] - sum(rejected.values()) - ranked_out
    if failed > 0:
        reasons = ", ".join(f"{k} {v}" for k, v in summary["failures"].items()) or "no reason given"
        text += f" · {failed} attempts failed ({reasons})"
    return text


# -- relaxation -----------------------------------------------------------------------------------------------------


FIX_SYMMETRY_KEY = "relax/fix_symmetry"  # the session's "keep symmetry" choice (the relax panel's checkbox)
TABLE_SCOPE_KEY = "table/{}"  # the candidate table's "selected" / "filtered" row ids, as the table last showed them
STATUS_BATCH_KEY = "relax/status_batch"  # the candidate set the relax panel's status line speaks of


def _relax_fields(result) -> dict:
    """What a record keeps of a RelaxResult (plain values; the relaxed structure as a dict): status, energies,
    the final forces and stress (for the extxyz export), the space group spglib finds after relaxation, whether
    symmetry was kept (FixSymmetry) and the convergence criterion as it was applied."""
    from wyckoff_lab.core.relax import convergence_criterion
    from wyckoff_lab.widgets.records import relaxed_spacegroup

    usable = result.status in USABLE
    forces = getattr(result, "forces", None)
    stress = getattr(result, "stress", None)
    fmax = getattr(result, "fmax", math.nan)
    fix_symmetry = bool(getattr(result, "fix_symmetry", False))
    return {
        "relax_status": result.status,
        "relax_message": result.message,
        "energy_per_atom": round(result.energy_per_atom, 5) if usable and math.isfinite(result.energy_per_atom)
        else None,
        "energy": result.energy if usable and math.isfinite(result.energy) else None,
        "max_force": result.max_force if math.isfinite(result.max_force) else None,
        "relax_steps": result.steps,
        "relaxed_structure": result.final.as_dict() if usable else None,
        "relaxed_spacegroup": relaxed_spacegroup(result.final) if usable else None,
        "relax_fix_symmetry": fix_symmetry,
        "relax_fmax": fmax if math.isfinite(fmax) else None,
        "relax_criterion": convergence_criterion(fmax, getattr(result, "relax_cell", True), fix_symmetry),
        "forces": [[float(x) for x in row] for row in forces] if usable and forces is not None else None,
        "stress": [float(x) for x in stress] if usable and stress is not None else None,
        "potential": result.potential,
        "potential_identity": result.potential_identity,
        "e_above_hull": None,
        # judged again after relaxation (judge_relaxed); until then unknown
        "relaxed_unique": None, "unique_label": "", "relaxed_novel": None, "relaxed_novel_label": "",
        "sun": None, "sun_label": "",
    }


def _potential(context: LabContext):
    try:
        return context.potential()
    except Exception as exc:
        raise JobError(f"No potential to relax with: {exc}") from None


def fix_symmetry_choice(context: LabContext, session: str) -> bool:
    """Whether the session relaxes under FixSymmetry (the relax panel's checkbox; off unless ticked)."""
    return bool(context.sessions.get(session, FIX_SYMMETRY_KEY) or False)


def judge_relaxed(context: LabContext, session: str, batch: str | None = None,
                  unless: Callable[[], bool] | None = None) -> dict:
    """Uniqueness among the relaxed candidates, their novelty against MP-20 and S.U.N. flags, judged on the
    relaxed structures (`records.post_relaxation_flags`), stored in the records. Returns counts."""
    from wyckoff_lab.widgets.records import post_relaxation_flags

    records = context.sessions.candidates(session)
    flags = post_relaxation_flags(records, context.references())
    if flags:
        context.sessions.update_candidates(session, flags, batch=batch, unless=unless)
    return {"duplicates": sum(not f["relaxed_unique"] for f in flags.values()),
            "relaxed_novel": sum(f["relaxed_novel"] is True for f in flags.values()),
            "sun": sum(f["sun"] is True for f in flags.values()),
            "sun_known": sum(f["sun"] is not None for f in flags.values())}


def relax_one(context: LabContext, session: str, candidate_id: str | None,
              on_frame: Callable[[object, list[dict]], None], cancelled: Callable[[], bool] = _never,
              fix_symmetry: bool | None = None) -> dict:
    """Relax one candidate, calling `on_frame(frame, history)` for every FIRE step (history: step, energy, force).

    The result is stored in the candidate's record (and placed on the session's hull when one exists), then
    uniqueness, novelty and S.U.N. are judged again on the relaxed structures. Once `cancelled()` is True, no
    further frame is reported and nothing is stored: JobCancelled says so. `fix_symmetry` None: the session's
    choice.
    """
    from wyckoff_lab.core.relax import relax_frames

    record = context.sessions.candidate(session, candidate_id)
    if record is None:
        raise JobError("Select a candidate in the table first")
    batch = context.sessions.batch(session)
    context.sessions.set(session, STATUS_BATCH_KEY, batch)
    potential = _potential(context)
    settings = context.settings
    if fix_symmetry is None:
        fix_symmetry = fix_symmetry_choice(context, session)
    history: list[dict] = []
    final = None
    label = f"#{record['label']}"

    def stop(step) -> JobCancelled:
        return JobCancelled(f"Relaxation of {label} cancelled at step {step}; its structure stays as it was "
                            "before (nothing from this run is kept)")

    if cancelled():
        raise stop(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for frame in relax_frames(Structure.from_dict(record["structure"]), potential, fmax=settings.relax_fmax,
                                  max_steps=settings.relax_max_steps, fix_symmetry=fix_symmetry):
            if cancelled():
                raise stop(frame.step)
            if math.isfinite(frame.energy_per_atom):
                history.append({"step": frame.step, "energy_per_atom": frame.energy_per_atom,
                                "max_force": frame.max_force if math.isfinite(frame.max_force) else None})
            on_frame(frame, history)
            final = frame
    result = final.result
    fields = _relax_fields(result)
    hull = context.sessions.get(session, "hull")
    if hull and result.status in USABLE:
        fields.update(place_on_hull(hull, Composition(record["formula"]), result.energy_per_atom,
                                    result.potential_identity))
    stored = context.sessions.update_candidates(session, {record["id"]: fields}, batch=batch, unless=cancelled)
    if not stored and cancelled():
        raise stop(result.steps)
    judged = judge_relaxed(context, session, batch, cancelled) if stored else {}
    mine = context.sessions.candidate(session, record["id"]) or {}
    return {"id": record["id"], "status": result.status, "message": result.message, "steps": result.steps,
            "energy_per_atom": result.energy_per_atom, "max_force": result.max_force,
            "e_above_hull": fields.get("e_above_hull"), "cached": result.cached, "fmax": settings.relax_fmax,
            "fix_symmetry": fix_symmetry, "generated_spacegroup": record.get("spacegroup")
            or record.get("intended_spacegroup"), "relaxed_spacegroup": fields["relaxed_spacegroup"],
            "relaxed_unique": mine.get("relaxed_unique"), "relaxed_novel": mine.get("relaxed_novel"),
            "sun": mine.get("sun"), "judged": judged}


def relax_message(summary: dict) -> str:
    """The relax panel's status line for one relaxation: what "converged" was judged on, the space group before
    and after, and how symmetry was treated."""
    number = summary["id"][1:].lstrip("0")
    if summary["status"] in USABLE:
        fmax = summary.get("fmax")
        criterion = f" (fmax {fmax:g} eV/Å on atoms; cell stress included)" if fmax else ""
        text = (f"Relaxed #{number}: {summary['status'].replace('_', ' ')}{criterion} after "
                f"{summary['steps']} steps, E = {summary['energy_per_atom']:.4f} eV/atom, "
                f"max atomic force {summary['max_force']:.3f} eV/Å")
        if summary.get("e_above_hull") is not None:
            text += f", {1000 * summary['e_above_hull']:.0f} meV/atom above the hull"
        before, after = summary.get("generated_spacegroup"), summary.get("relaxed_spacegroup")
        if "fix_symmetry" in summary:
            sym = "symmetry kept (FixSymmetry)" if summary["fix_symmetry"] else "symmetry free"
            if before and after and before != after:
                text += f"; {sym}: space group {before} → {after}"
            elif after:
                text += f"; {sym}: space group {after}"
        if summary.get("relaxed_unique") is False:
            text += "; a duplicate of another relaxed candidate"
        if summary.get("relaxed_novel") is False:
            text += "; relaxed into an MP-20 phase"
        return text + (" (from cache)" if summary.get("cached") else "")
    return (f"Relaxation of #{number} stopped: {summary['status'].replace('_', ' ')} — "
            f"{summary['message']}. The generated structure is kept.")


def eta_label(done: int, total: int, seconds: float, computed: int) -> str:
    """'12 of 99 relaxed · 6.1 s each · about 9 min left': the ETA from the measured seconds per structure
    relaxed so far (cached ones cost nothing and are left out of the rate)."""
    text = f"{done} of {total} relaxed"
    if computed and done < total:
        each = seconds / computed
        left = each * (total - done)
        text += f" · {each:.1f} s each · about {_duration(left)} left"
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def relax_scope(context: LabContext, session: str, scope: str = "all") -> list[dict]:
    """The records a relax-all job works on: "all" (every one not yet relaxed), "selected" or "filtered" (the
    rows the candidate table last had selected / shown under its filter, not yet relaxed)."""
    records = context.sessions.candidates(session)
    if scope == "all":
        return [r for r in records if not r.get("relax_status")]
    if scope not in ("selected", "filtered"):
        raise JobError(f"Unknown relaxation scope {scope!r}")
    ids = context.sessions.get(session, TABLE_SCOPE_KEY.format(scope))
    if not ids:
        raise JobError("No rows selected in the table: tick some rows first" if scope == "selected" else
                       "The table's filter shows no rows")
    wanted = set(ids)
    return [r for r in records if r["id"] in wanted and not r.get("relax_status")]


def relax_all(context: LabContext, session: str, progress: Progress = _no_progress, build_hull: bool = True,
              cancelled: Callable[[], bool] = _never, scope: str = "all", fix_symmetry: bool | None = None,
              on_update: Callable[[int], None] | None = None) -> dict:
    """Relax the candidates of `scope` (see relax_scope) not yet relaxed, then place all on the hull and judge
    uniqueness, novelty and S.U.N. on the relaxed structures.

    Each structure's result is written to the session's records as soon as it is relaxed; `progress` then gets
    the count and an ETA, and `on_update(done)` is called (the panel bumps the table's revision on it). Once
    `cancelled()` is True nothing more is stored: what was stored before stays, and JobCancelled says how many.
    """
    from wyckoff_lab.core.pipeline import relax_candidates

    if not context.sessions.candidates(session):
        raise JobError("Generate candidates first")
    batch = context.sessions.batch(session)
    context.sessions.set(session, STATUS_BATCH_KEY, batch)
    todo = relax_scope(context, session, scope)
    potential = _potential(context)
    if fix_symmetry is None:
        fix_symmetry = fix_symmetry_choice(context, session)
    settings = context.settings
    t0 = time.perf_counter()
    state = {"done": 0, "computed": 0, "seconds": 0.0}

    def stop(done: int) -> JobCancelled:
        return JobCancelled(f"Relax all cancelled: {done} of {len(todo)} candidates were relaxed before the cancel "
                            "and are kept; the others are as generated")

    def store(i: int, result) -> None:
        if cancelled():
            raise stop(state["done"])
        changed = context.sessions.update_candidates(session, {todo[i]["id"]: _relax_fields(result)}, batch=batch,
                                                     unless=cancelled)
        if not changed:
            if cancelled():
                raise stop(state["done"])
            raise JobError("A new candidate set was generated meanwhile; relaxation stopped")
        state["done"] += 1
        state["computed"] += not result.cached
        if on_update is not None:
            on_update(state["done"])
        progress(state["done"], len(todo), eta_label(state["done"], len(todo), time.perf_counter() - t0,
                                                     state["computed"]) + f" with {potential.name}")

    if cancelled():
        raise stop(0)
    progress(0, max(len(todo), 1), f"relaxing {len(todo)} candidates with {potential.name}"
             + (" (symmetry kept)" if fix_symmetry else ""))
    for start in range(0, len(todo), RELAX_CHUNK):
        if cancelled():
            raise stop(state["done"])
        chunk = todo[start:start + RELAX_CHUNK]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The cell as generated, not the primitive one: the record keeps its atom count, and the 3D view and
            # the export show the relaxed form of the cell the user saw.
            relax_candidates([Structure.from_dict(r["structure"]) for r in chunk], potential, settings.relax_fmax,
                             settings.relax_max_steps, primitive=False, fix_symmetry=fix_symmetry,
                             on_result=lambda i, result, start=start: store(start + i, result))
    progress(len(todo), max(len(todo), 1), "relaxation done")
    if cancelled():
        raise JobCancelled(f"Relax all cancelled after relaxing all {len(todo)} candidates (kept); the hull was "
                           "not built")
    summary = {"relaxed": len(todo), "seconds": time.perf_counter() - t0, "fix_symmetry": fix_symmetry,
               "scope": scope}
    try:
        if build_hull:
            summary.update(hull_for_session(context, session, progress, cancelled))
    finally:
        if not cancelled():  # duplicates and novelty after relaxation, S.U.N. once on the hull
            progress(len(todo), max(len(todo), 1), "judging uniqueness and novelty of the relaxed structures")
            summary.update(judge_relaxed(context, session, batch, cancelled))
    if on_update is not None:
        on_update(len(todo))
    return summary


def relax_all_message(summary: dict) -> str:
    """The "Relax all" status line: the hull's line, then symmetry treatment, duplicates and S.U.N. after
    relaxation."""
    text = hull_message(summary) if "hull_from_cache" in summary else \
        f"Relaxed {summary['relaxed']} candidates in {summary['seconds']:.0f} s"
    text += " · symmetry kept (FixSymmetry)" if summary.get("fix_symmetry") else " · symmetry free"
    if "duplicates" in summary:
        text += (f" · after relaxation: {summary['duplicates']} duplicates, {summary['relaxed_novel']} novel vs "
                 f"MP-20, {summary['sun']} S.U.N. (E hull < 0.1 eV/atom) of {summary['sun_known']} on the hull")
    return text


# -- hull -------------------------------------------------------------------------------------------------------------


def session_elements(records: list[dict]) -> list[str]:
    """The chemical system spanned by the session's candidates."""
    from pymatgen.core import Element

    return sorted({el for r in records for el in r["elements"]}, key=lambda e: Element(e).Z)


def hull_data(hull) -> dict:
    """A HullReference as plain data the session keeps, everything a redraw needs computed here once: elements,
    potential identity, the reference entries (formula, total energy, atoms, formation energy, e_above_hull,
    source, relaxed structure), the tie lines, and the diagram itself as pymatgen's `PhaseDiagram.as_dict()`."""
    from wyckoff_lab.core.hull import diagram_dict, place_entry, tie_lines

    diagram = hull.diagram
    references = []
    for ref in hull.references:
        if ref.status not in USABLE:
            continue
        comp = ref.structure.composition
        references.append({
            "formula": comp.reduced_formula, "energy": ref.energy, "natoms": int(comp.num_atoms),
            "composition": {el.symbol: float(a) for el, a in comp.items()},
            "formation_energy_per_atom": place_entry(diagram, comp, ref.energy).formation_energy_per_atom,
            "e_above_hull": ref.e_above_hull, "on_hull": ref.on_hull, "source": ref.source,
            "structure": ref.structure.as_dict(),  # relaxed: clicking the phase on the hull shows it
        })
    return {"elements": list(hull.elements), "potential_identity": hull.settings.potential_identity,
            "potential": hull.potential.name, "references": references, "tie_lines": tie_lines(diagram),
            "diagram": diagram_dict(diagram)}


def phase_diagram(hull: dict):
    """The pymatgen PhaseDiagram of stored hull data, read back with `PhaseDiagram.from_dict` (no new hull)."""
    from pymatgen.analysis.phase_diagram import PhaseDiagram

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PhaseDiagram.from_dict(hull["diagram"])


def place_on_hull(hull: dict, composition: Composition, energy_per_atom: float, potential_identity: str,
                  diagram=None) -> dict:
    """e_above_hull and formation energy of one relaxed candidate (energy per atom, so any multiple of the formula
    will do); nothing when potentials differ or the candidate lies outside the hull's chemical system."""
    if potential_identity != hull["potential_identity"]:
        return {}
    if not {el.symbol for el in composition} <= set(hull["elements"]):
        return {}
    from wyckoff_lab.core.hull import place_entry

    placed = place_entry(diagram or phase_diagram(hull), composition, energy_per_atom * composition.num_atoms)
    return {"e_above_hull": round(placed.e_above_hull, 5),
            "formation_energy_per_atom": placed.formation_energy_per_atom,
            "decomposition": {formula: round(f, 4) for formula, f in placed.decomposition.items()}}


def hull_for_session(context: LabContext, session: str, progress: Progress = _no_progress,
                     cancelled: Callable[[], bool] = _never) -> dict:
    """Build (or load from the hull cache) the convex hull of the session's chemical system with the app's
    potential, keep it in the session, and place every relaxed candidate on it.

    Once `cancelled()` is True nothing more is stored (JobCancelled); reference relaxations already finished stay
    in the relaxation cache, so the next build resumes from them.
    """
    records = context.sessions.candidates(session)
    if not records:
        raise JobError("Generate candidates first")
    batch = context.sessions.batch(session)
    elements = session_elements(records)
    if len(elements) > 5:
        raise JobError(f"The candidates span {len(elements)} elements ({'-'.join(elements)}); a hull needs a "
                       "chemical system of at most 5: choose the elements in step 1")
    stop = JobCancelled(HULL_CANCELLED)
    if cancelled():  # pressed while the job still waited for the app's warm-up
        raise stop
    potential = _potential(context)
    progress(0, 1, f"relaxing the {'-'.join(elements)} reference phases of {context.settings.dataset} with "
             f"{potential.name} (cached after the first time)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hull = context.hull_book().get(elements)
    except Exception as exc:  # no data offline, failed elemental references: the message says which
        raise JobError(f"Cannot build the {'-'.join(elements)} hull: {exc}") from None
    data = hull_data(hull)
    diagram = hull.diagram
    updates = {}
    for record in records:
        if record.get("relax_status") in USABLE and record.get("energy") is not None:
            energy_per_atom = record["energy"] / record["natoms"]  # relaxation keeps the number of atoms
            updates[record["id"]] = place_on_hull(data, Composition(record["formula"]), energy_per_atom,
                                                  record.get("potential_identity"), diagram)
    if not context.sessions.store_hull(session, data, updates, batch=batch, unless=cancelled):
        raise stop
    progress(1, 1, "hull ready")
    placed = sum(1 for u in updates.values() if u)
    return {"elements": elements, "references": len(data["references"]), "placed": placed,
            "hull_seconds": hull.total_time_s, "hull_from_cache": hull.from_cache}


def hull_message(summary: dict) -> str:
    source = "cached" if summary["hull_from_cache"] else f"built in {summary['hull_seconds']:.0f} s"
    text = (f"{'-'.join(summary['elements'])} hull from {summary['references']} reference phases ({source}); "
            f"{summary['placed']} relaxed candidates placed")
    if "relaxed" in summary:
        text = f"Relaxed {summary['relaxed']} candidates in {summary['seconds']:.0f} s · " + text
    return text
