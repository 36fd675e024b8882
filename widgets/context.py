"""Process-wide resources of the app: settings, loaded models and datasets, the session store, background jobs.

Everything here is shared by all browser tabs and is read-only after loading (models, reference data); what
differs per tab lives in the `SessionStore` under the tab's session id. Long work (generation, relaxation, hulls)
runs as Dash background callbacks in forked processes, which inherit the models loaded here for free.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dash import DiskcacheManager
from wyckoff_lab.widgets.security import allowed_host_names, request_session_ids
from wyckoff_lab.widgets.state import SessionStore

log = logging.getLogger(__name__)

WARMUP_WAIT_S = 60.0  # a job that starts during warm-up waits at most this long for the models to be loaded
JOB_TORCH_THREADS = 1  # see _job_entry
WORK_DIR_PREFIX = "wyckoff-lab-app-"  # temporary work folders, one per app process
OWNER_FILE = "owner.pid"  # the process that made a work folder: once it is gone, the folder is stale


ALLOWED_HOSTS_ENV = "WYCKOFF_LAB_ALLOWED_HOSTS"  # comma-separated Host names to serve besides loopback ones


def extra_hosts() -> list[str]:
    """Host names a user allows besides the loopback ones (a Jupyter or reverse proxy's name), from the
    environment, so widgets shown in Jupyter honour them too."""
    return [name for name in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if name.strip()]


def _remove_work_dir(folder: Path, owner_pid: int) -> None:
    """At exit of the process that made it (forked jobs inherit the atexit hook and must not run it)."""
    if os.getpid() == owner_pid:
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_work_dirs(root: Path | None = None) -> list[Path]:
    """Remove temporary work folders whose app process is gone (killed without a chance to clean up); returns them.

    A folder without a readable owner file is left alone unless it is a day old (it may be one being made now).
    """
    import psutil

    root = Path(root or tempfile.gettempdir())
    removed = []
    for folder in root.glob(f"{WORK_DIR_PREFIX}*"):
        try:
            owner = int((folder / OWNER_FILE).read_text().strip())
            stale = owner != os.getpid() and not psutil.pid_exists(owner)
        except (OSError, ValueError):
            try:
                stale = time.time() - folder.stat().st_mtime > 24 * 3600
            except OSError:
                continue
        if stale and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d stale work folder(s) of app processes that are gone", len(removed))
    return removed


@dataclass
class LabSettings:
    """What the app runs with. None means: the embedded default (see README)."""

    potential: str | None = None  # "mattersim", "chgnet", or None: MatterSim when its checkpoint can be had
    device: str | None = None  # torch device for relaxations and the transformer; None: cuda if available
    dataset: str = "mp_20"  # reference structures (novelty, hull phases, space-group frequencies)
    default_generator: str | None = None  # None: the Wyckoff transformer when its weights load, else PyXtal
    relax_fmax: float = 0.05  # eV/Å
    relax_max_steps: int = 300
    hull_max_references: int = 3  # polymorphs per formula relaxed for the hull
    default_samples: int = 100
    max_samples: int = 1000
    generation_workers: int | None = None  # processes for parallel-safe generators (PyXtal); None: one per core
    progress_interval_ms: int = 400  # how often the browser polls a running job
    work_dir: Path | None = None  # session store + job results; a temporary folder (removed at exit) when None
    warm_up: bool = True  # load models and reference data in a thread once the first request arrives
    generator_kwargs: dict = field(default_factory=dict)  # name -> constructor kwargs (e.g. weights folder)
    # Host header names served (see security.allowed_host_names); anything else gets 403 (DNS rebinding).
    allowed_hosts: frozenset[str] = field(default_factory=lambda: allowed_host_names("127.0.0.1", extra_hosts()))


class LabContext:
    """Shared resources: the session store, the background-job manager, cached generators, potential, references."""

    def __init__(self, settings: LabSettings | None = None):
        import diskcache

        self.settings = settings or LabSettings()
        if self.settings.work_dir is None:
            remove_stale_work_dirs()
            folder = Path(tempfile.mkdtemp(prefix=WORK_DIR_PREFIX))
            (folder / OWNER_FILE).write_text(str(os.getpid()))
            atexit.register(_remove_work_dir, folder, os.getpid())
        else:
            folder = Path(self.settings.work_dir)
            folder.mkdir(parents=True, exist_ok=True)
        self.work_dir = folder
        self.sessions = SessionStore(str(folder / "sessions"))
        self.ready = threading.Event()  # everything loaded: background jobs may fork
        self.generators_ready = threading.Event()  # generators loaded: the generate form can be used
        self.manager = WarmDiskcacheManager(diskcache.Cache(str(folder / "jobs")), self.ready)
        # One lock per resource: a page asking for reference data must not wait for the potential to load.
        self._generator_lock, self._potential_lock, self._reference_lock = (threading.RLock() for _ in range(3))
        self._generators: dict[str, object] = {}
        self._generator_errors: dict[str, str] = {}
        self._potential = None
        self._potential_error: str | None = None
        self._references = None
        self._reference_error: str | None = None
        self._frequencies: dict[int, float] | None = None
        self._warm_up_started = False
        if not self.settings.warm_up:
            self.ready.set()  # nothing preloaded: every resource loads when first used
            self.generators_ready.set()

    def start_warm_up(self) -> None:
        """Start loading in a thread (idempotent). The app calls this on its first request rather than at
        start-up: the imports would otherwise compete with the server's own start for the interpreter."""
        if self._warm_up_started or self.ready.is_set():
            return
        self._warm_up_started = True
        threading.Thread(target=self.warm_up, name="wyckoff-lab-warm-up", daemon=True).start()

    # -- warm-up --------------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Load what the first user action needs (generators, reference data, potential), then open the job gate.

        Background jobs are forked from this process: loading here once means no job pays for it again, and the
        job gate (`ready`) keeps a fork from happening while a model is half loaded. Generators come first and
        say so (`generators_ready`): the generate form waits only for them, not for the potential.
        """
        t0 = time.perf_counter()
        try:
            for name in self.generator_names():
                self.generator_status(name)
            self.generators_ready.set()
            log.info("generators loaded in %.1f s", time.perf_counter() - t0)
            self.references()
            self.spacegroup_frequencies()
            self.potential()
        except Exception:  # warm-up is an optimisation: every loader reports its own error when used
            log.exception("warm-up failed")
        finally:
            self.generators_ready.set()
            self.ready.set()
            log.info("warm-up done in %.1f s", time.perf_counter() - t0)

    # -- generators -----------------------------------------------------------------------------------------------

    @staticmethod
    def generator_names() -> list[str]:
        """Every registered generator: new ones appear in the app without changes here."""
        from wyckoff_lab.core.generators import available_generators

        return available_generators()

    def generator(self, name: str):
        """The loaded generator `name` (cached); raises its own error (e.g. ModelLoadError) when it cannot load."""
        from wyckoff_lab.core.generators import get_generator

        with self._generator_lock:
            if name not in self._generators:
                self._generators[name] = get_generator(name, **self.settings.generator_kwargs.get(name, {}))
                self._generator_errors.pop(name, None)
            return self._generators[name]

    def generator_status(self, name: str) -> tuple[bool, str]:
        """(usable, message): tries to load once, and again later if it failed (weights may appear meanwhile)."""
        try:
            generator = self.generator(name)
        except Exception as exc:  # ModelLoadError, missing packages: shown in the UI, never raised
            self._generator_errors[name] = str(exc)
            return False, str(exc)
        return True, getattr(generator, "description", "") or name

    def default_generator(self) -> str:
        names = self.generator_names()
        preferred = [self.settings.default_generator, *names]  # names: most preferred first
        for name in preferred:
            if name in names and self.generator_status(name)[0]:
                return name
        return names[0]

    # -- potential ------------------------------------------------------------------------------------------------

    def potential(self):
        """The relaxation potential (cached). Raises PotentialError with the reason when none can be loaded."""
        from wyckoff_lab.core.relax import load_potential

        with self._potential_lock:
            if self._potential is None:
                try:
                    self._potential = load_potential(self.settings.potential, self.settings.device)
                    self._potential_error = None
                except Exception as exc:
                    self._potential_error = str(exc)
                    raise
            return self._potential

    def hull_book(self):
        """A `core.pipeline.HullBook` with the app's potential, dataset and relaxation settings (those of "Relax"
        and "Relax all"), for one job: a hull built there is cached on disk, so the next job reads it back."""
        from wyckoff_lab.core.pipeline import HullBook

        s = self.settings
        return HullBook(self.potential(), s.hull_max_references, s.dataset, s.relax_fmax, s.relax_max_steps)

    def potential_label(self) -> str:
        try:
            return self.potential().name
        except Exception as exc:
            return f"unavailable ({exc})"

    # -- reference data -------------------------------------------------------------------------------------------

    def references(self):
        """ReferenceSet over the reference dataset, or None (with `reference_error`) when it is not available."""
        from wyckoff_lab.core.datasets import load_dataset
        from wyckoff_lab.widgets.records import ReferenceSet

        with self._reference_lock:
            if self._references is None and self._reference_error is None:
                try:
                    self._references = ReferenceSet(load_dataset(self.settings.dataset))
                except Exception as exc:  # DataUnavailableError offline without WYCKOFF_LAB_DATA
                    self._reference_error = str(exc)
                    log.warning("reference dataset unavailable: %s", exc)
            return self._references

    @property
    def reference_error(self) -> str | None:
        return self._reference_error

    def spacegroup_frequencies(self) -> dict[int, float]:
        """Fraction of reference rows per space group (empty without reference data); computed once."""
        references = self.references()
        if references is None:
            return {}
        with self._reference_lock:
            if self._frequencies is None:
                counts = references.dataset.frame["spacegroup"].dropna().astype(int).value_counts()
                total = int(counts.sum()) or 1
                self._frequencies = {int(k): int(v) / total for k, v in counts.items()}
            return self._frequencies


@dataclass(frozen=True)
class StartedJob:
    """A background job this app started: its process (pid + start time, so a reused pid is not taken for it) and
    the sessions whose request started it."""

    pid: int
    create_time: float
    sessions: frozenset[str]


class WarmDiskcacheManager(DiskcacheManager):
    """Dash's diskcache background manager, with three changes that matter for a process holding torch models.

    1. A job waits for the warm-up gate before it forks, so no fork happens while a model is half loaded (a lock
       held by the loading thread would stay locked forever in the child).
    2. The child runs torch single-threaded: GNU OpenMP does not survive fork once the parent has used its thread
       pool (measured: a CHGNet step in a forked child hangs with 2 threads and completes with 1).
    3. It stops only processes it started, and only at the request of the session that started them. Dash's own
       manager kills whatever pid a client puts in `cancelJob`, `oldJob` or `job`, the server's included.
    """

    def __init__(self, cache, ready: threading.Event, **kwargs):
        super().__init__(cache, **kwargs)
        self._ready = ready
        self._jobs: dict[int, StartedJob] = {}
        self._jobs_lock = threading.Lock()

    def call_job_fn(self, key, job_fn, args, context):
        import multiprocess
        import psutil

        sessions = request_session_ids()  # before the wait: the request is what says whose job this is
        self._ready.wait(WARMUP_WAIT_S)
        process = multiprocess.get_context("fork").Process(
            target=_job_entry, args=(job_fn, key, self._make_progress_key(key), args, context), daemon=True)
        process.start()
        try:
            started = psutil.Process(process.pid).create_time()
        except psutil.NoSuchProcess:  # finished already: nothing left to stop
            started = -1.0
        with self._jobs_lock:
            self._forget_finished()
            self._jobs[process.pid] = StartedJob(process.pid, started, sessions)
        return process.pid

    def started_job(self, job) -> StartedJob | None:
        """The job with this id if this manager started it and its process is still that one; else None."""
        import psutil

        try:
            pid = int(str(job))
        except (TypeError, ValueError):
            return None
        with self._jobs_lock:
            record = self._jobs.get(pid)
        if record is None:
            return None
        try:
            if psutil.Process(pid).create_time() != record.create_time:
                raise psutil.NoSuchProcess(pid)
        except psutil.NoSuchProcess:
            with self._jobs_lock:
                self._jobs.pop(pid, None)
            return None
        return record

    def _forget_finished(self) -> None:
        import psutil

        for pid, record in list(self._jobs.items()):
            try:
                if psutil.Process(pid).create_time() != record.create_time:
                    del self._jobs[pid]
            except psutil.NoSuchProcess:
                del self._jobs[pid]

    def may_stop(self, job) -> StartedJob | None:
        """The job if the current caller may stop it: server code outside a request always, a request only when
        it carries a (signed) session id of the session that started the job."""
        import flask

        record = self.started_job(job)
        if record is None:
            if job is not None:
                log.warning("refused to stop process %.40r: not a job this app started", str(job))
            return None
        if flask.has_request_context() and record.sessions and not (record.sessions & request_session_ids()):
            log.info("refused to stop job %s for a request of another (or no) session", record.pid)
            return None
        return record

    def terminate_job(self, job):
        record = self.may_stop(job)
        if record is not None:
            super().terminate_job(record.pid)

    def terminate_unhealthy_job(self, job):
        record = self.may_stop(job)
        return record is not None and super().terminate_unhealthy_job(record.pid)

    def job_running(self, job):
        record = self.started_job(job)
        return record is not None and super().job_running(record.pid)


def _job_entry(job_fn, key, progress_key, args, context) -> None:
    """Run one background job in its forked process (see WarmDiskcacheManager)."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(JOB_TORCH_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(JOB_TORCH_THREADS)
    job_fn(key, progress_key, args, context)
