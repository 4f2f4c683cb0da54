"""The server's Ray driver in a process of its own, so that Ray's failures never take the HTTP server down.

A Ray driver exits on the spot when its raylet dies (killed, out of memory, or its dashboard agent killed, which
takes the raylet with it). So the cluster executor does not run `engine.cluster.Cluster` in the server's process:
`RemoteCluster` runs it in a child process and talks to it over a pipe. When the child dies, the server stays up:
every reduction running on it fails with `DriverLost` (the job manager queues jobs again), `health()` says why
(`/healthz` answers 503), and a new child with a new embedded Ray is started, with a growing pause between quick
failures; once it is ready, health is ok again.

One supervisor thread, alive as long as the RemoteCluster, starts every child and reads its replies. It must be
the same long-lived thread: the child asks for SIGKILL when its parent *thread* ends (PR_SET_PDEATHSIG is per
thread), so a child started from a thread that then returns is killed at once, and restarted, and killed...
When the server dies, its child dies with it, and the child's Cluster watcher (`engine.cluster.reaper`) stops the
Ray processes that child started.
"""
from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import pickle
import threading
import time
from concurrent.futures import CancelledError, Future
from types import SimpleNamespace

from kred.engine.errors import BackendError

from .errors import Interrupted

log = logging.getLogger("kred.service.cluster")
jobs_log = logging.getLogger("kred.service.cluster.jobs")
START_TIMEOUT_S = 300.0        # a cold Ray start on a busy machine
CLOSE_TIMEOUT_S = 30.0
EXIT_WAIT_S = 5.0              # for a driver whose pipe closed to exit by itself
FIRST_PAUSE_S, MAX_PAUSE_S = 1.0, 30.0     # between restarts of a child that failed soon after its start
STABLE_S = 60.0                # a child that lived this long resets the pause


class DriverLost(Interrupted):
    """The cluster's driver process died, or is being restarted, while a reduction needed it."""


class RemoteJob:
    """The parent's handle on a job running in the driver process: what `ClusterExecutor` needs of a Job."""

    def __init__(self, driver: RemoteCluster, job_id: int):
        self._driver, self.id = driver, job_id
        self._future: Future = Future()
        self._fraction = 0.0

    def result(self, timeout: float | None = None):
        return self._future.result(timeout)

    def progress(self):
        return SimpleNamespace(fraction=self._fraction)

    def cancel(self) -> None:
        try:
            self._driver._send(("cancel", self.id))
        except DriverLost:          # the job went with the driver
            pass

    def _on(self, kind: str, payload) -> None:
        if self._future.done():
            return
        if kind == "progress":
            self._fraction = payload
        elif kind == "done":
            self._future.set_result(payload)
        elif kind == "cancelled":
            self._future.set_exception(CancelledError())
        else:
            self._future.set_exception(payload)


class RemoteCluster:
    """`engine.cluster.Cluster(address, **options)` in a child process, restarted whenever it dies. The first start
    is waited for (its error, e.g. a wrong address, is raised here); later ones happen in the background."""

    def __init__(self, address: str | None = None, **options):
        self._context = multiprocessing.get_context("spawn")
        self._address, self._options = address, options
        self._lock = threading.Lock()               # guards _jobs and writes to the pipe
        self._jobs: dict[int, RemoteJob] = {}
        self._ids = itertools.count(1)
        self._conn = self._process = None
        self._closed = False
        self._first = Future()
        self.problem: str | None = "the cluster driver is starting"      # None while the driver is up
        self._supervisor = threading.Thread(target=self._supervise, name="kred-cluster-driver", daemon=True)
        self._supervisor.start()
        self._first.result()                        # raises the first start's error

    def health(self) -> str | None:
        """None when the driver is up, else what is wrong (and that it is being restarted)."""
        return self.problem

    # Jobs ------------------------------------------------------------------------------------------------
    def submit_plan(self, plan, arrays, ranges=None) -> RemoteJob:
        return self._submit(("plan", plan, list(arrays), ranges))

    def submit_dataset(self, plan, sources, output: str) -> RemoteJob:
        return self._submit(("dataset", plan, sources, output))

    def _submit(self, request: tuple) -> RemoteJob:
        problem = self.problem
        if problem is not None:
            raise DriverLost(f"the cluster is unavailable: {problem}")
        job = RemoteJob(self, next(self._ids))
        with self._lock:
            self._jobs[job.id] = job
        try:
            self._send((request[0], job.id, *request[1:]))
        except DriverLost:
            with self._lock:
                self._jobs.pop(job.id, None)
            raise
        return job

    def _send(self, message: tuple) -> None:
        try:
            with self._lock:
                self._conn.send(message)
        except (OSError, ValueError, AttributeError) as e:    # the driver is gone: the supervisor fails its jobs
            raise DriverLost(f"the cluster driver process is gone ({e})") from None

    # The supervisor thread -------------------------------------------------------------------------------
    def _supervise(self) -> None:
        pause = FIRST_PAUSE_S
        while not self._closed:
            try:
                process, conn = self._start()
            except BaseException as e:          # noqa: BLE001 - the first error is the caller's; later, retry
                if not self._first.done():
                    self._first.set_exception(e)
                    return
                self.problem = f"restarting the cluster driver failed ({e}); retrying in {pause:.0f} s"
                log.error("%s", self.problem)
                time.sleep(pause)
                pause = min(2 * pause, MAX_PAUSE_S)
                continue
            if self._closed:                    # closed while this one was starting
                process.kill()
                process.join()
                return
            started = time.monotonic()
            with self._lock:
                self._process, self._conn = process, conn
            self.problem = None
            if self._first.done():
                log.warning("the cluster driver is back (pid %s)", process.pid)
            else:
                self._first.set_result(None)
            self._read(conn)                    # until the pipe closes: the child exited, or is exiting
            process.join(EXIT_WAIT_S)
            if process.is_alive():              # a Ray driver whose raylet died can hang in its exit: end it
                process.kill()
                process.join()
            if self._closed:
                return
            self.problem = (f"the cluster driver process exited (code {process.exitcode}: its raylet or a Ray agent "
                            "died?); restarting it")
            log.error("%s", self.problem)
            with self._lock:
                jobs, self._jobs, self._conn = list(self._jobs.values()), {}, None
            conn.close()
            for job in jobs:
                job._on("error", DriverLost(self.problem))
            pause = FIRST_PAUSE_S if time.monotonic() - started > STABLE_S else pause
            time.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE_S)

    def _start(self):
        """A new driver process, once it has said it is ready (its Cluster started)."""
        parent, child = self._context.Pipe()
        process = self._context.Process(target=serve, args=(child, self._address, self._options),
                                        name="kred-cluster-driver", daemon=True)
        process.start()
        child.close()
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise BackendError(f"the cluster driver did not start within {START_TIMEOUT_S:.0f} s")
            kind, _, payload = parent.recv()
        except EOFError:
            raise BackendError(f"the cluster driver exited while starting (code {process.exitcode})") from None
        except BaseException:
            process.kill()
            process.join()
            parent.close()
            raise
        if kind != "ready":
            process.join(CLOSE_TIMEOUT_S)
            parent.close()
            raise payload
        return process, parent

    def _read(self, conn) -> None:
        try:
            while True:
                kind, job_id, payload = conn.recv()
                with self._lock:
                    job = self._jobs.get(job_id) if kind == "progress" else self._jobs.pop(job_id, None)
                if job is not None:
                    job._on(kind, payload)
        except (EOFError, OSError):
            pass

    def close(self) -> None:
        self._closed = True
        try:
            self._send(("close", 0))
        except DriverLost:
            pass
        process = self._process
        if process is not None:
            process.join(CLOSE_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        self._supervisor.join(CLOSE_TIMEOUT_S)


# In the driver process ----------------------------------------------------------------------------------

def serve(conn, address, options) -> None:
    """The driver process: a Cluster, answering the parent's requests until told to close (or orphaned)."""
    _die_with_parent()
    _leave_interrupts_to_parent()
    _log_to_stderr()
    try:
        from kred.engine.cluster import Cluster
        cluster = Cluster(address, **options)
    except BaseException as e:            # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", 0, _portable(e)))
        return
    send_lock = threading.Lock()
    jobs: dict = {}

    def send(message):
        with send_lock:
            conn.send(message)

    def watch(job_id, job):
        while True:
            try:
                result = job.result(timeout=0.2)
            except TimeoutError:
                send(("progress", job_id, job.progress().fraction))
                continue
            except CancelledError:
                send(("cancelled", job_id, None))
            except BaseException as e:    # noqa: BLE001 - the job's error belongs to the parent
                send(("error", job_id, _portable(e)))
            else:
                send(("done", job_id, result))
            jobs.pop(job_id, None)
            # one line per job: where its shards ran (operators see a cluster's balance; the multi-host test reads it)
            jobs_log.info("job %d %s", job_id, json.dumps(job.summary()))
            return

    send(("ready", 0, None))
    while True:
        try:
            kind, job_id, *rest = conn.recv()
        except (EOFError, OSError):       # the server is gone
            break
        if kind == "close":
            break
        if kind == "cancel":
            job = jobs.get(job_id)
            if job is not None:
                threading.Thread(target=job.cancel, daemon=True).start()
            continue
        try:
            job = cluster.submit_plan(rest[0], rest[1], ranges=rest[2]) if kind == "plan" else \
                cluster.submit_dataset(*rest)
        except BaseException as e:        # noqa: BLE001 - e.g. a bad argument: the parent raises it
            send(("error", job_id, _portable(e)))
            continue
        jobs[job_id] = job
        threading.Thread(target=watch, args=(job_id, job), daemon=True).start()
    cluster.close()


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else a BackendError with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:                     # noqa: BLE001
        return BackendError(f"{type(error).__name__}: {error}")


def _leave_interrupts_to_parent() -> None:
    """Ctrl-C reaches every process of the terminal's group: the server shuts down on it and closes this driver
    through the pipe, so here it is ignored (else a KeyboardInterrupt traceback interrupts whatever was running)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _log_to_stderr() -> None:
    """The spawned driver has no logging set up: its INFO lines (one per job) go to stderr, like the server's."""
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        jobs_log.addHandler(handler)
        jobs_log.setLevel(logging.INFO)
        jobs_log.propagate = False


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the thread that started it ends (the supervisor, which lives as long as
    the server's executor), however the server dies. Elsewhere: nothing (the closed pipe ends the loop instead)."""
    import ctypes
    import signal
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
