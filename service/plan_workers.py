"""Worker processes that build plans, so that one past `compile_timeout_s` is really stopped.

Parsing and differentiating a formula is pure Python that cannot be interrupted in a thread: a thread that timed
out kept computing (and holding memory) while every other client's new formula waited behind it. Here each build
runs in a worker process of its own session; a build past its time limit is answered 422 and its worker is killed
(with anything it started) and replaced. Workers start on first use, with `spawn` (the server has threads; a forked
copy of them is not safe), and are shared by the apps of a process; they end with it. Plans come back pickled; they
re-intern their nodes on arrival.
"""
from __future__ import annotations

import asyncio
import atexit
import functools
import importlib
import multiprocessing
import os
import signal
import threading
from typing import Any, Callable

from .errors import ApiError


class TimedOut(Exception):
    """The call ran past its time limit; its worker was killed."""


def _serve(connection, warm: tuple[str, ...]) -> None:
    """A worker's loop: import `warm`, say so, then receive (function, args) and send back ("ok", result) or
    ("error", exception)."""
    os.setsid()                                    # its own process group: killing it kills what it started
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C in the server's terminal is the server's to handle
    for module in warm:                            # imported before the first call's clock starts
        importlib.import_module(module)
    connection.send("ready")
    while True:
        try:
            function, args = connection.recv()
        except EOFError:
            return
        try:
            reply = ("ok", function(*args))
        except ApiError as e:                      # an HTTPException does not pickle by its args: send its parts
            reply = ("api", (e.status, e.kind, e.detail, e.headers))
        except Exception as e:
            reply = ("error", e)
        try:
            connection.send(reply)
        except Exception as e:                     # an unpicklable result or exception
            connection.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))


class _Worker:
    def __init__(self, context, warm: tuple[str, ...]):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, warm), daemon=True, name="kred-plan-worker")
        self.process.start()
        child.close()
        if not self.connection.poll(120) or self.connection.recv() != "ready":
            self.kill()
            raise RuntimeError("a plan worker did not start")

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.process.kill()
        self.process.join(5)
        self.connection.close()


class PlanWorkers:
    """`size` worker processes that import the `warm` modules when they start; `await call(function, *args,
    timeout=...)` runs `function(*args)` in a free one. Usable from any event loop (and thread): apps in one process
    share one pool (`shared`), so that each app does not pay for starting processes."""

    def __init__(self, size: int = 2, warm: tuple[str, ...] = ()):
        self.size, self.warm = size, warm
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()            # idle or busy: all killed by `close`
        self._started = 0

    @classmethod
    @functools.cache
    def shared(cls, size: int = 2, warm: tuple[str, ...] = ()) -> "PlanWorkers":
        pool = cls(size, warm)
        atexit.register(pool.close)
        return pool

    async def _acquire(self) -> _Worker:
        while True:
            with self._lock:
                if self._idle:
                    return self._idle.pop()
                start = self._started < self.size
                self._started += start
            if start:
                try:
                    worker = await asyncio.to_thread(_Worker, self._context, self.warm)
                    with self._lock:
                        self._all.add(worker)
                    return worker
                except BaseException:
                    with self._lock:
                        self._started -= 1
                    raise
            await asyncio.sleep(0.005)

    def _release(self, worker: _Worker | None) -> None:
        with self._lock:
            if worker is None:
                self._started -= 1
            elif worker not in self._all:            # closed meanwhile
                worker.kill()
            else:
                self._idle.append(worker)

    async def call(self, function: Callable, *args, timeout: float) -> Any:
        worker = await self._acquire()
        healthy = False
        try:
            worker.connection.send((function, args))
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            fd = worker.connection.fileno()
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await asyncio.wait_for(ready, timeout)
            except asyncio.TimeoutError:
                raise TimedOut() from None
            finally:
                loop.remove_reader(fd)
            # uvloop's add_reader leaves the pipe non-blocking: a reply larger than the pipe's buffer would then
            # fail with EAGAIN part-way. Read it whole in a thread, in blocking mode.
            os.set_blocking(fd, True)
            kind, value = await asyncio.to_thread(worker.connection.recv)
            healthy = True
        except (EOFError, OSError) as e:            # the worker died (killed by the OOM killer, say)
            raise RuntimeError(f"a plan worker ended unexpectedly ({e})") from None
        finally:
            if healthy:
                self._release(worker)
            else:                                   # timed out, cancelled or dead: kill it; a new one starts on demand
                with self._lock:
                    self._all.discard(worker)
                worker.kill()
                self._release(None)
        if kind == "api":
            raise ApiError(*value)
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        with self._lock:
            workers, self._all, self._idle = self._all, set(), []
            self._started -= len(workers)
        for worker in workers:
            worker.kill()
