"""Process-wide resources of the app: settings, loaded models and datasets, the session store, background jobs.

Everything here is shared by all browser tabs and is read-only after loading (models, reference data); what
differs per tab lives in the `SessionStore` under the tab's session id. Long work (generation, relaxation, hulls)
runs as Dash background callbacks in processes forked by a single-threaded job server (see WarmDiskcacheManager
for why that design), which inherit the models it loaded for free.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dash import DiskcacheManager
from wyckoff_lab.widgets.security import allowed_host_names, request_session_ids, use_secret_file
from wyckoff_lab.widgets.state import SessionStore

log = logging.getLogger(__name__)

WARMUP_WAIT_S = 60.0  # a page part that needs loaded models waits at most this long for them
JOB_TORCH_THREADS = 1  # see _job_entry
# The job server and every job it forks run at this niceness (Unix), below the web server and the browser: its
# warm-up (about 2.5 s of CPU loading the models again) overlapped the page's first load and, on two cores, made
# the page 2 s slower to become usable than before the job server existed. Background work should use the CPU
# the page leaves, not take it; alone on the machine a job runs as fast at any niceness.
JOB_SERVER_NICENESS = 10
WORK_DIR_PREFIX = "wyckoff-lab-app-"  # temporary work folders, one per app process
OWNER_FILE = "owner.pid"  # the process that made a work folder: once it is gone, the folder is stale
SECRET_FILE = "session.key"  # the signing secret of a --work-dir (0600), so its sessions outlive a restart


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

    potential: str | None = None  # "mattersim", "chgnet", "sevennet", or None: MatterSim where its checkpoint is
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
        self.ready = threading.Event()  # everything loaded in this process (its own callbacks; jobs load in the job server)
        self.generators_ready = threading.Event()  # generators loaded: the generate form can be used
        if self.settings.work_dir is not None:  # a restart with the same --work-dir keeps its sessions
            use_secret_file(folder / SECRET_FILE)
        self.manager = WarmDiskcacheManager(diskcache.Cache(str(folder / "jobs")),
                                            self.warm_up_steps if self.settings.warm_up else None,
                                            before_fork=self.close_connections)
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
        self.manager.start_job_server()  # (already started by `wyckoff-lab app`; see the manager)
        threading.Thread(target=self.warm_up, name="wyckoff-lab-warm-up", daemon=True).start()

    def start_job_server(self) -> int:
        """Fork the process background jobs are forked from (see WarmDiskcacheManager): once the app's callbacks
        are registered, before the server starts any thread."""
        return self.manager.start_job_server()

    def close_connections(self) -> None:
        """Close this process's sqlite connections (they reopen when next used), so a fork copies none."""
        self.sessions.close()
        self.manager.handle.close()

    def warm_up_steps(self) -> list[tuple[str, object]]:
        """What the job server loads before it forks jobs, in order, each with the label the page shows."""
        return [("the generators", lambda: [self.generator_status(n) for n in self.generator_names()]),
                (f"reference data ({self.settings.dataset.upper().replace('_', '-')})", self.references),
                ("space-group frequencies", self.spacegroup_frequencies),
                ("the relaxation potential", self.potential)]

    # -- warm-up --------------------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Load what this server's own callbacks need (generators, reference data, potential), then set `ready`.

        Background jobs do not use these: the job server loads its own copy, single-threaded, and is told to start
        once the generators are loaded here (so that on two cores the form is not delayed by both loading at once).
        Generators come first and say so (`generators_ready`): the generate form waits only for them.
        """
        t0 = time.perf_counter()
        try:
            for name in self.generator_names():
                self.generator_status(name)
            self.generators_ready.set()
            log.info("generators loaded in %.1f s", time.perf_counter() - t0)
            # Only now the job server loads its own copy: on two cores, both loading at once would delay the form.
            # A job asked for earlier starts its loading at once (the zygote loads on the first job too).
            self.manager.warm_up_jobs()
            self.references()
            self.spacegroup_frequencies()
            self.potential()
        except Exception:  # warm-up is an optimisation: every loader reports its own error when used
            log.exception("warm-up failed")
        finally:
            self.generators_ready.set()
            self.manager.warm_up_jobs()  # (again after a failure: the message is idempotent)
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


@dataclass
class StartedJob:
    """A background job this app started: its job number (what the page holds), its process once the job server
    forked it (pid + start time, so a reused pid is not taken for it), and the sessions whose request started it."""

    job: int
    sessions: frozenset[str]
    pid: int | None = None  # None while the job waits in the job server's queue (warm-up not done yet)
    create_time: float = -1.0
    ended: bool = False
    threads_at_fork: int | None = None  # Python threads of the process that forked it (1: no lock inherited)


@dataclass
class WarmUpState:
    """What the job server is loading, as the page shows it ("loading reference data (MP-20), 2 of 4")."""

    step: int = 0
    steps: int = 0
    label: str = ""
    done: bool = False
    error: str = ""  # the job server is gone: no job can start, and nothing is loading any more

    def message(self) -> str:
        if self.error:
            return self.error
        if self.done:
            return ""
        if not self.steps:
            return "preparing background jobs (loading the generators first)…"
        return f"loading {self.label}, {min(self.step + 1, self.steps)} of {self.steps}"


class WarmDiskcacheManager(DiskcacheManager):
    """Dash's diskcache background manager whose jobs are forked by a job server ("zygote"), never by the server.

    Why a zygote and not spawned workers: a spawned worker would import torch and load the transformer, CHGNet and
    MP-20 again for every job (tens of seconds on a 2-core machine), and Dash's job functions are closures that
    cannot be pickled. The zygote is forked once, when the app is built (its callbacks registered) and before the
    server has any thread or open sqlite connection (`start_job_server` checks and records that); it loads the
    models itself, single-threaded (torch with one thread, so no OpenMP pool exists to break in a fork), and forks
    one child per job. A child therefore inherits the models from a process that never had a second thread: no
    lock can be held at fork time. Only the job number, the callback's registry key, its args and context cross
    the pipe. A job asked for during warm-up is queued in the zygote (the request returns at once; the page shows
    what is loading) and forked when loading is done.

    Each job runs in its own process group, so a cancel kills it with everything it forked (generation workers).
    The manager stops only jobs it started, and only at the request of the session that started them: Dash's own
    manager kills whatever pid a client puts in `cancelJob`, `oldJob` or `job`, the server's included. Job ids
    are random job numbers, not pids, so a client cannot name a process at all.
    """

    def __init__(self, cache, warm_up_steps=None, before_fork=None, **kwargs):
        super().__init__(cache, **kwargs)
        self._warm_up_steps = warm_up_steps  # () -> [(label, loader)], run in the zygote once the app is used
        self._before_fork = before_fork  # closes the server's sqlite connections before the zygote is forked
        self._jobs: dict[int, StartedJob] = {}
        self._jobs_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._server_lock = threading.Lock()
        self._connection = None
        self.zygote_pid: int | None = None
        self.threads_at_zygote_fork: int | None = None
        self.databases_at_zygote_fork: list[str] | None = None
        self.warm_up_state = WarmUpState()
        self.jobs_ready = threading.Event()  # the zygote finished loading: jobs fork at once
        self._registered_at_fork = 0  # background callbacks the zygote has (it copied the registry when forked)
        self._keys_at_fork: frozenset = frozenset()
        self._warm_asked = False

    # -- the job server -------------------------------------------------------------------------------------------

    def start_job_server(self) -> int:
        """Fork the job server (idempotent); returns its pid. Call it after the app's callbacks are registered and
        before the server starts threads (`wyckoff-lab app` does); a later call from a threaded process still
        works but is logged, since a lock held by another thread at that moment would stay held in the zygote."""
        with self._server_lock:
            if self.zygote_pid is not None:
                if len(self.func_registry) == self._registered_at_fork or self._has_live_jobs():
                    return self.zygote_pid
                # A widget shown later in the same kernel registered background callbacks the zygote never saw
                # (it copied the registry when forked, and closures cannot cross the pipe): replace it by one
                # that has them. Never while a job runs: an old zygote takes its jobs with it.
                self._retire_job_server()
            import multiprocessing

            if self._before_fork is not None:
                self._before_fork()
            self.handle.close()  # diskcache reopens its connection when next used
            threads = threading.active_count()
            if threads > 1:
                log.warning("the job server is forked from a process with %d threads (%s); start it before the "
                            "server runs", threads, ", ".join(t.name for t in threading.enumerate()))
            self.databases_at_zygote_fork = _open_database_files()
            parent_end, child_end = multiprocessing.Pipe(duplex=True)
            steps = self._warm_up_steps
            if steps is None:  # nothing preloaded: jobs fork at once and load what they use
                self.warm_up_state = WarmUpState(done=True)
                self.jobs_ready.set()
            pid = os.fork()
            if pid == 0:  # the zygote
                code = 0
                try:
                    parent_end.close()
                    _zygote_main(self, child_end, steps)
                except BaseException:  # noqa: BLE001 - whatever happens, never return into the server's code
                    log.exception("job server failed")
                    code = 1
                finally:
                    os._exit(code)
            child_end.close()
            self._connection = parent_end
            self.zygote_pid = pid
            self.threads_at_zygote_fork = threads
            self._registered_at_fork = len(self.func_registry)
            self._keys_at_fork = frozenset(self.func_registry)
            if self._warm_asked:  # the zygote it replaces had been asked to load: so is this one
                parent_end.send(("warm",))
            threading.Thread(target=self._read_job_server, name="wyckoff-lab-job-server-reader",
                             daemon=True).start()
            return pid

    def warm_up_jobs(self) -> None:
        """Let the zygote start loading (the app calls this on its first request, see `LabContext.start_warm_up`)."""
        self.start_job_server()
        self._warm_asked = True
        self._send(("warm",))

    def _has_live_jobs(self) -> bool:
        with self._jobs_lock:
            self._forget_finished()
            return bool(self._jobs)

    def _retire_job_server(self) -> None:
        """Close the zygote's pipe (it exits when it reads the end) and reap it in the background."""
        old_pid, connection = self.zygote_pid, self._connection
        self.zygote_pid, self._connection = None, None
        self.jobs_ready.clear()
        self.warm_up_state = WarmUpState()
        # Said, not just closed: this process's reader thread is blocked reading the pipe, which keeps it open.
        with contextlib.suppress(OSError), self._send_lock:
            connection.send(("stop",))
        connection.close()
        log.info("job server %d replaced: background callbacks were registered after it started", old_pid)
        threading.Thread(target=_reap, args=(old_pid,), name="wyckoff-lab-job-server-reaper", daemon=True).start()

    def _send(self, message) -> None:
        with self._send_lock:
            self._connection.send(message)

    def _read_job_server(self) -> None:
        """Server side: apply what the zygote reports (warm-up steps, jobs forked, ended, refused)."""
        connection = self._connection
        while True:
            try:
                message = connection.recv()
            except (EOFError, OSError):
                if connection is not self._connection:  # retired on purpose: a new job server has taken over
                    return
                log.error("the job server is gone: background jobs can no longer start")
                self.warm_up_state = WarmUpState(error="the background-job server has stopped: generation, "
                                                       "relaxation and hulls cannot start; restart the app")
                return
            kind = message[0]
            if kind == "warming":
                _, step, steps, label = message
                self.warm_up_state = WarmUpState(step, steps, label)
            elif kind == "ready":
                self.warm_up_state = WarmUpState(done=True)
                self.jobs_ready.set()
            elif kind == "started":
                _, job, pid, create_time, threads = message
                with self._jobs_lock:
                    record = self._jobs.get(job)
                    if record is not None:
                        record.pid, record.create_time, record.threads_at_fork = pid, create_time, threads
            elif kind in ("ended", "dropped"):
                with self._jobs_lock:
                    record = self._jobs.get(message[1])
                    if record is not None:
                        record.ended = True
            elif kind == "failed":
                _, job, key, text = message
                self.handle.set(key, {"background_callback_error": {"msg": text, "tb": ""}})
                with self._jobs_lock:
                    record = self._jobs.get(job)
                    if record is not None:
                        record.ended = True

    # -- Dash's manager interface ---------------------------------------------------------------------------------

    def call_job_fn(self, key, job_fn, args, context):
        import secrets

        sessions = request_session_ids()  # the request is what says whose job this is
        self.start_job_server()
        registered = next((k for k, fn in self.func_registry.items() if fn is job_fn), None)
        reference = ("registered", registered) if registered is not None else ("object", job_fn)
        job = secrets.randbits(52) + 1  # not a pid: a client's job id names nothing outside this registry
        if registered is not None and registered not in self._keys_at_fork:  # a job of an earlier widget runs
            self.handle.set(key, {"background_callback_error": {
                "msg": "this panel was shown after the background-job server started, which cannot be replaced "
                       "while another panel's job runs: try again when it has finished", "tb": ""}})
            with self._jobs_lock:
                self._jobs[job] = StartedJob(job, sessions, ended=True)
            return job
        with self._jobs_lock:
            self._forget_finished()
            self._jobs[job] = StartedJob(job, sessions)
        self._send(("job", job, reference, key, self._make_progress_key(key), args, dict(context)))
        return job

    def started_job(self, job) -> StartedJob | None:
        """The job with this number if this manager started it and it is queued or still running; else None."""
        try:
            number = int(str(job))
        except (TypeError, ValueError):
            return None
        with self._jobs_lock:
            record = self._jobs.get(number)
        if record is None or record.ended:
            return None
        if record.pid is not None and not _same_process(record.pid, record.create_time):
            with self._jobs_lock:
                record.ended = True
            return None
        return record

    def _forget_finished(self) -> None:
        for number, record in list(self._jobs.items()):
            if record.ended or (record.pid is not None and not _same_process(record.pid, record.create_time)):
                del self._jobs[number]

    def may_stop(self, job) -> StartedJob | None:
        """The job if the current caller may stop it: server code outside a request always, a request only when
        it carries a (signed) session id of the session that started the job."""
        import flask

        record = self.started_job(job)
        if record is None:
            if job is not None:
                log.warning("refused to stop process %.40r: not a running job this app started", str(job))
            return None
        if flask.has_request_context() and record.sessions and not (record.sessions & request_session_ids()):
            log.info("refused to stop job %s for a request of another (or no) session", record.job)
            return None
        return record

    def terminate_job(self, job):
        import signal

        record = self.may_stop(job)
        if record is None:
            return
        if record.pid is None:  # still queued: the zygote drops it (and its cancel record stops it anyway)
            self._send(("drop", record.job))
            with self._jobs_lock:
                record.ended = True
            return
        try:
            os.killpg(record.pid, signal.SIGKILL)  # the job and everything it forked
        except ProcessLookupError:
            pass
        with self._jobs_lock:
            record.ended = True

    def terminate_unhealthy_job(self, job):
        record = self.may_stop(job)
        if record is None or record.pid is None:
            return False
        if not self.job_running(job):
            self.terminate_job(job)
            return True
        return False

    def job_running(self, job):
        record = self.started_job(job)
        if record is None:
            return False
        if record.pid is None:
            return True  # queued: the page keeps polling (and shows the warm-up)
        import psutil

        try:
            return psutil.Process(record.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


def _open_database_files() -> list[str]:
    """The sqlite files this process holds open (Linux; empty elsewhere): a fork must copy none."""
    found = []
    folder = Path("/proc/self/fd")
    for entry in folder.iterdir() if folder.is_dir() else ():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.endswith((".db", ".db-wal", ".db-shm")):
            found.append(target)
    return found


def _same_process(pid: int, create_time: float) -> bool:
    import psutil

    try:
        return psutil.Process(pid).create_time() == create_time
    except psutil.NoSuchProcess:
        return False


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


def _zygote_main(manager: WarmDiskcacheManager, connection, warm_up_steps) -> None:
    """The job server's loop: load once asked to (reporting each step), queue jobs until then, fork one per job.

    Single-threaded by construction: it never starts a thread, so every fork here copies a process in which no
    other thread can hold a lock.
    """
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C stops the server; this process follows its pipe's end
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(os, "nice"):
        try:
            os.nice(JOB_SERVER_NICENESS)
        except OSError as exc:  # a sandbox may refuse: jobs then run at the server's priority
            log.info("job server: niceness unchanged (%s)", exc)
    os.environ["OMP_NUM_THREADS"] = str(JOB_TORCH_THREADS)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(JOB_TORCH_THREADS)
    try:  # tqdm's monitor thread takes tqdm's lock every few seconds: forked then, every later bar would hang
        from tqdm.std import tqdm as tqdm_class

        tqdm_class.monitor_interval = 0
    except ImportError:
        pass
    queue: list[tuple] = []
    children: dict[int, int] = {}  # pid -> job number
    ready = warm_up_steps is None

    def fork_job(message) -> None:
        _, job, reference, key, progress_key, args, context = message
        kind, value = reference
        job_fn = manager.func_registry.get(value) if kind == "registered" else value
        if job_fn is None:
            connection.send(("failed", job, key, "this background callback was registered after the job server "
                                                 "started; restart the app"))
            return
        threads = threading.active_count()
        if threads > 1:
            log.warning("job server: forking a job beside threads %s",
                        ", ".join(t.name for t in threading.enumerate()))
        pid = os.fork()
        if pid == 0:  # the job
            code = 0
            try:
                os.setpgid(0, 0)
                connection.close()
                _job_entry(job_fn, key, progress_key, args, context)
            except BaseException:  # noqa: BLE001
                log.exception("background job failed")
                code = 1
            finally:
                os._exit(code)
        try:
            os.setpgid(pid, pid)  # also here: a cancel right after the fork must find the group
        except OSError:
            pass
        children[pid] = job
        try:
            import psutil

            create_time = psutil.Process(pid).create_time()
        except Exception:  # noqa: BLE001 - ended already
            create_time = -1.0
        connection.send(("started", job, pid, create_time, threads))

    def reap() -> None:
        while children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                return
            if pid == 0:
                return
            job = children.pop(pid, None)
            if job is not None:
                connection.send(("ended", job))

    def handle(message) -> None:
        nonlocal queue
        kind = message[0]
        if kind == "job":
            if ready:
                fork_job(message)
            else:
                queue.append(message)
        elif kind == "stop":  # replaced by a new job server: leave as when the server is gone
            raise EOFError
        elif kind == "drop":
            kept = [m for m in queue if m[1] != message[1]]
            if len(kept) != len(queue):
                connection.send(("dropped", message[1]))
            queue = kept

    def drain() -> None:
        while connection.poll(0):
            handle(connection.recv())

    try:
        while not ready:  # wait for the first request (or a job) before loading, as the server did
            if not connection.poll(0.5):
                continue
            message = connection.recv()
            handle(message)
            if message[0] in ("warm", "job"):
                steps = list(warm_up_steps())
                t0 = time.perf_counter()
                for i, (label, loader) in enumerate(steps):
                    connection.send(("warming", i, len(steps), label))
                    drain()  # jobs asked for meanwhile are queued, cancels honoured
                    try:
                        loader()
                    except Exception:  # noqa: BLE001 - every loader reports its own error when used
                        log.exception("job server: loading %s failed", label)
                drain()
                ready = True
                log.info("job server ready in %.1f s", time.perf_counter() - t0)
                connection.send(("ready",))
                for queued in queue:
                    fork_job(queued)
                queue = []
        while True:
            if connection.poll(0.2):
                handle(connection.recv())
            reap()
    except (EOFError, OSError):  # the server is gone: so are its jobs
        pass
    finally:
        import signal as _signal

        for pid in list(children):
            try:
                os.killpg(pid, _signal.SIGKILL)
            except OSError:
                pass


def _job_entry(job_fn, key, progress_key, args, context) -> None:
    """Run one background job in its process, forked by the job server (see WarmDiskcacheManager)."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(JOB_TORCH_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(JOB_TORCH_THREADS)
    job_fn(key, progress_key, args, context)
