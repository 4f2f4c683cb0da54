"""A time limit on building kernels: the C compiler runs in its own process group and is killed at the limit.

A server compiling a user's formula must be able to stop: `with time_limit(seconds):` around `Backend.prepare` (or
any call that may compile) gives every compiler started inside it the time that remains, and a compiler still
running then is killed with everything it started (cc1, as, ld: the whole process group), its partial output
removed by the caller, and `CompileTimeout` raised. The limit is a context variable: it follows the calling thread
(or task) only, so other callers compile as before. Outside any limit a compiler gets `DEFAULT_S`.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import signal
import subprocess
import time

from ..errors import BackendError

DEFAULT_S = 600.0

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("kred_compile_deadline", default=None)


class CompileTimeout(BackendError):
    """Building a kernel ran past its time limit; the compiler was killed."""

    def __init__(self):
        super().__init__("the kernel was not compiled within its time limit (a compiler still running was stopped)")


@contextlib.contextmanager
def time_limit(seconds: float):
    """Compilers started in this block (this thread or task) must finish within `seconds` from now."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining() -> float:
    """Seconds left to the current limit (`DEFAULT_S` outside any); raises CompileTimeout when none are left."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return DEFAULT_S
    left = deadline - time.monotonic()
    if left <= 0:
        raise CompileTimeout()
    return left


def run_compiler(command: list[str]) -> subprocess.CompletedProcess:
    """Run `command` (text output captured) within the remaining time, in a process group of its own that is
    killed whole if it runs past it (or if this thread is interrupted)."""
    limit = remaining()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except BaseException as e:
        _kill_group(process)
        if isinstance(e, subprocess.TimeoutExpired):
            raise CompileTimeout() from None
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.communicate()           # reaps it (its children are reparented and reaped by init)
