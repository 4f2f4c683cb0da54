"""The compiled-kernel cache: C source -> a loaded shared library, built at most once per machine.

Entries are content-addressed: the key is the sha256 of the source, the compiler's identity (`cc --version`) and the
flags, so a new compiler or new flags never reuse an old binary. Files live under `KRED_CACHE_DIR` (default: the
user cache directory, e.g. ~/.cache/kred). A build holds a file lock (`filelock`, one of 256 lock files chosen by the
key), compiles into a temporary file and renames it into place, so any number of processes (or Ray workers) asking
for the same new kernel at once build it once and all load the same file. Each build appends one line to
`builds.log` in the cache directory.

Integrity: every entry (CPU `.so`, CUDA `.cubin`) has a `.sum` file beside it with the size and sha256 recorded when
it was written; an entry is loaded only when it matches, else it is discarded and rebuilt (with one warning), so a
truncated or overwritten file never reaches dlopen. Bounds: the directory is trimmed to `KRED_CACHE_MAX_BYTES`
(least recently used entries first; an entry's mtime is refreshed when a process loads it) after each build, and a
process keeps at most `KRED_MAX_LOADED_KERNELS` libraries (`KRED_MAX_LOADED_KERNEL_BYTES`) loaded through this
module's memo; a library is closed (dlclose) when the last reference to it goes.
"""
from __future__ import annotations

import _ctypes      # dlclose (POSIX), for Library's finalizer
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from .. import limits
from ..errors import BackendError
from .compile_limit import run_compiler

LOG_BYTES = 1 << 20         # builds.log is rotated (to builds.log.1) past this size
TRIM_TO = 0.8               # a trim deletes down to this fraction of the cap, so it does not run on every build

_LOADED = limits.BoundedLRU(limits.LOADED_KERNELS, limits.LOADED_KERNEL_BYTES, getsizeof=lambda lib: lib.size)
_LOAD_LOCK = threading.Lock()


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


def load(source: str, flags: tuple[str, ...], libs: tuple[str, ...] = ()) -> "Library":
    """The shared library built from `source` with `flags` (and linked with `libs`), from the cache or built now."""
    cc = compiler()
    key = cache_key(source, cc, flags + libs)
    lib = _LOADED.get(key)
    if lib is None:
        with _LOAD_LOCK:
            lib = _LOADED.get(key)
            if lib is None:
                lib = _load_or_build(source, cc, flags, libs, key)
                _LOADED[key] = lib
    return lib


class Library(ctypes.CDLL):
    """A loaded kernel library. It stays mapped while this object or a function taken from it is referenced, and is
    closed (dlclose) when the last reference goes, so evicted kernels give their memory and mappings back."""

    def __init__(self, path: Path):
        self.size = path.stat().st_size
        super().__init__(str(path))
        close = getattr(_ctypes, "dlclose", None)
        if close is not None:
            weakref.finalize(self, close, self._handle).atexit = False


def _load_or_build(source, cc, flags, libs, key) -> Library:
    directory = cache_dir()
    build = functools.partial(_build, source, cc, flags, libs, directory, key)
    for _ in range(2):              # a verified entry can be trimmed by another process before we open it
        target = entry(directory, f"{key}.so", build)
        try:
            return Library(target)
        except OSError as e:
            error = e
    raise BackendError(f"the kernel built at {target} cannot be loaded: {error}")


# Entries: verified files, built under a lock, trimmed to a size ----------------------------------------------

def entry(directory: Path, name: str, build: Callable[[Path], None]) -> Path:
    """The path of the cache entry `directory/name`, checked against its recorded size and hash; when it is missing
    or does not match, `build(path)` writes it (under the entry's file lock) and its checksum is recorded."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if verified(path):
        _touch(path)
        return path
    with FileLock(str(lock_path(directory, name)), timeout=600):
        if verified(path):           # built by another process while we waited
            return path
        _discard(path)
        build(path)
        _record(path)
    trim(keep=name.split(".")[0])
    return path


def verified(path: Path) -> bool:
    """Does the file match the size and sha256 recorded when it was written?"""
    try:
        size, digest = _sum_path(path).read_text().split()
        if path.stat().st_size != int(size):
            return False
        return hashlib.sha256(path.read_bytes()).hexdigest() == digest
    except (OSError, ValueError):
        return False


def lock_path(directory: Path, name: str) -> Path:
    """One of 256 lock files, chosen by the entry's key (its hex name): lock files do not pile up with entries."""
    locks = directory / "locks"
    locks.mkdir(exist_ok=True)
    return locks / f"{name[:2]}.lock"


def _sum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sum")


def _record(path: Path) -> None:
    data = path.read_bytes()
    atomic_write(_sum_path(path), f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())


def _discard(path: Path) -> None:
    """Remove a bad entry; warn when it had a checksum (an entry without one was written by an older kred)."""
    if path.exists() and _sum_path(path).exists():
        warnings.warn(f"kred: the cached kernel {path} does not match its recorded size and hash (corrupt or "
                      "truncated); it is discarded and rebuilt", RuntimeWarning, stacklevel=2)
    for stale in (path, _sum_path(path)):
        try:
            stale.unlink()
        except FileNotFoundError:
            pass


def _touch(path: Path) -> None:
    """Mark an entry as used now (trimming deletes the least recently used first)."""
    try:
        os.utime(path)
    except OSError:
        pass


def trim(directory: Path | None = None, max_bytes: int | None = None, keep: str = "") -> int:
    """Delete least recently used entries until the cache holds at most `max_bytes` (KRED_CACHE_MAX_BYTES); once
    over, down to TRIM_TO of it. The entry `keep` (a key: the one just built) and entries being built or checked
    (their lock held) are skipped; one process trims at a time. Returns the bytes deleted."""
    directory = directory or cache_dir()
    max_bytes = limits.DISK_CACHE_BYTES if max_bytes is None else max_bytes
    try:
        with FileLock(str(directory / "trim.lock"), timeout=0):
            return _trim(directory, max_bytes, keep)
    except Timeout:
        return 0
    except OSError as e:            # a cache we cannot tidy (permissions, a full disk) still serves its kernels
        warnings.warn(f"kred: could not trim the kernel cache {directory}: {e}", RuntimeWarning, stacklevel=2)
        return 0


def _trim(directory: Path, max_bytes: int, keep: str) -> int:
    groups: dict[tuple[Path, str], list] = {}        # (folder, key) -> [files, bytes, last use]
    for folder in (directory, directory / "cuda"):
        try:
            listing = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for item in listing:
            key = item.name.split(".")[0]
            if len(key) != 64 or key == keep or not item.is_file(follow_symlinks=False):
                continue        # builds.log, locks/, trim.lock, the cuda/ folder, the entry just built
            try:
                stat = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            group = groups.setdefault((folder, key), [[], 0, 0.0])
            group[0].append(Path(item.path))
            group[1] += stat.st_size
            group[2] = max(group[2], stat.st_mtime)
    total = sum(size for _, size, _ in groups.values())
    if total <= max_bytes:
        return 0
    deleted = 0
    for (folder, key), (files, size, _) in sorted(groups.items(), key=lambda item: item[1][2]):
        if total - deleted <= max_bytes * TRIM_TO:
            break
        try:
            with FileLock(str(lock_path(folder, key)), timeout=0):
                for file in files:
                    try:
                        file.unlink()
                    except FileNotFoundError:
                        pass
        except Timeout:
            continue
        deleted += size
    return deleted


def _build(source, cc, flags, libs, directory: Path, key: str, target: Path) -> None:
    """Compile `source` into `target` (called by `entry`, under the entry's lock)."""
    source_path = directory / f"{key}.c"
    atomic_write(source_path, source.encode())
    fd, temp = tempfile.mkstemp(prefix=f"{key}.", suffix=".so.tmp", dir=directory)
    os.close(fd)
    command = [cc.path, *flags, "-o", temp, str(source_path), *libs]
    start = time.perf_counter()
    try:            # within the caller's time limit, if any (compile_limit): no partial output is left behind
        done = run_compiler(command)
    except BaseException as e:
        os.unlink(temp)
        if isinstance(e, (OSError, subprocess.SubprocessError)):
            raise BackendError(f"could not run the C compiler {cc.path}: {e}") from None
        raise
    if done.returncode != 0:
        os.unlink(temp)
        message = (done.stderr or done.stdout).strip()
        raise BackendError(f"the C compiler failed on the generated source {source_path}\n"
                           f"command: {' '.join(command)}\n{message[-4000:]}")
    os.replace(temp, target)
    seconds = time.perf_counter() - start
    log_path = directory / "builds.log"
    with open(log_path, "a") as log:
        log.write(f"{key} {seconds:.3f}s pid={os.getpid()}\n")
    if log_path.stat().st_size > LOG_BYTES:
        os.replace(log_path, directory / "builds.log.1")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    fd, temp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temp, path)


def forget_loaded() -> None:
    """Drop the in-process memo (tests use it to exercise the on-disk cache); libraries still in use stay loaded."""
    with _LOAD_LOCK:
        _LOADED.clear()
