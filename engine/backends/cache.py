"""The compiled-kernel cache: C source -> a loaded shared library, built at most once per machine.

Entries are content-addressed: the key is the sha256 of the source, the compiler's identity (`cc --version`) and the
flags, so a new compiler or new flags never reuse an old binary. Files live under `KRED_CACHE_DIR` (default: the
user cache directory, e.g. ~/.cache/kred). A build holds a file lock (`filelock`) on its key, compiles into a
temporary file and renames it into place, so any number of processes (or Ray workers) asking for the same new kernel
at once build it once and all load the same file. Each build appends one line to `builds.log` in the cache
directory. An entry that fails to load (a truncated or corrupt file) is rebuilt. Loaded libraries are memoised in
the process.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..errors import BackendError

_MEMO: dict[str, ctypes.CDLL] = {}
_MEMO_LOCK = threading.Lock()


@dataclass(frozen=True)
class Compiler:
    path: str
    identity: str       # the full `--version` text: part of every cache key


@functools.cache
def find_compiler() -> Compiler | None:
    """The system C compiler (`CC` if set, else cc, gcc, clang), or None. Checked once per process."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in names:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if version.returncode == 0:
            return Compiler(path, version.stdout.strip())
    return None


def compiler() -> Compiler:
    found = find_compiler()
    if found is None:
        tried = os.environ.get("CC") or "cc, gcc, clang"
        raise BackendError(f"no C compiler found (tried {tried}); install gcc or set CC, or use backend='reference'")
    return found


def cache_dir() -> Path:
    configured = os.environ.get("KRED_CACHE_DIR")
    if configured:
        return Path(configured)
    import platformdirs
    return Path(platformdirs.user_cache_dir("kred"))


def cache_key(source: str, cc: Compiler, flags: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for part in (source, cc.path, cc.identity, "\0".join(flags)):
        digest.update(part.encode())
        digest.update(b"\0\0")
    return digest.hexdigest()


def load(source: str, flags: tuple[str, ...], libs: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The shared library built from `source` with `flags` (and linked with `libs`), from the cache or built now."""
    cc = compiler()
    key = cache_key(source, cc, flags + libs)
    lib = _MEMO.get(key)
    if lib is not None:
        return lib
    with _MEMO_LOCK:
        lib = _MEMO.get(key)
        if lib is None:
            lib = _load_or_build(source, cc, flags, libs, key)
            _MEMO[key] = lib
    return lib


def _load_or_build(source, cc, flags, libs, key) -> ctypes.CDLL:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{key}.so"
    if target.exists():
        lib = _try_load(target)
        if lib is not None:
            return lib
    with FileLock(str(directory / f"{key}.lock"), timeout=600):
        if target.exists():           # built by another process while we waited, or corrupt
            lib = _try_load(target)
            if lib is not None:
                return lib
            target.unlink()
        _build(source, cc, flags, libs, directory, key, target)
    lib = _try_load(target)
    if lib is None:
        raise BackendError(f"the kernel built at {target} cannot be loaded")
    return lib


def _try_load(path: Path) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def _build(source, cc, flags, libs, directory: Path, key: str, target: Path) -> None:
    source_path = directory / f"{key}.c"
    atomic_write(source_path, source.encode())
    fd, temp = tempfile.mkstemp(prefix=f"{key}.", suffix=".so.tmp", dir=directory)
    os.close(fd)
    command = [cc.path, *flags, "-o", temp, str(source_path), *libs]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(temp)
        raise BackendError(f"could not run the C compiler {cc.path}: {e}") from None
    if done.returncode != 0:
        os.unlink(temp)
        message = (done.stderr or done.stdout).strip()
        raise BackendError(f"the C compiler failed on the generated source {source_path}\n"
                           f"command: {' '.join(command)}\n{message[-4000:]}")
    os.replace(temp, target)
    seconds = time.perf_counter() - start
    with open(directory / "builds.log", "a") as log:
        log.write(f"{key} {seconds:.3f}s pid={os.getpid()}\n")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    fd, temp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temp, path)


def forget_loaded() -> None:
    """Drop the in-process memo (tests use it to exercise the on-disk cache)."""
    with _MEMO_LOCK:
        _MEMO.clear()
