"""Same-host shared memory: arrays cross between client and server without going through a socket.

The client owns every segment: it writes the input arrays into one, leaves room for the result, and sends the
segment's name with offsets, dtypes and shapes (`ArrayRef` dicts) in a small JSON request. Two rules keep a server
safe from its clients:

- **Proof of ownership.** Segment names are visible to every user of the host (`ls /dev/shm`), so a name proves
  nothing. Each segment starts with a header: a magic string and the creating client's secret key (`SegmentPool.key`,
  32 random bytes). A request carries that key; the server touches a segment only when its header holds the same
  key, which only a process that can read the segment can know. A client can thus only reach memory it could reach
  anyway. The probe (`/v1/shm/probe`) checks the key too.
- **No mapping of client memory.** A client may shrink (ftruncate) its segment at any time; a server that had mapped
  it would die of SIGBUS on the next access. The server never maps a client segment: it reads inputs into its own
  arrays and writes results with `pread`/`pwrite` on the segment's file descriptor, which report a short read instead
  of faulting. Sizes are checked (fstat) before and after.

Python < 3.13: `SharedMemory(name)` registers an *attached* segment with the process's resource tracker, which then
unlinks it when that process exits. The server opens segments by name itself (`_open`) and never registers them;
only the creator, the client, is tracked, and its pool unlinks what it created when it is closed, collected or at exit.
This module needs only numpy and the standard library (the client imports it).
"""
from __future__ import annotations

import hmac
import math
import os
import re
import secrets
import stat
import threading
import weakref
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Sequence

import numpy as np

from .arrow import check_shape
from .errors import WireError

PREFIX = "kred_"
NAME = re.compile(r"kred_[0-9a-f]{32}")
KEY = re.compile(r"[0-9a-f]{64}")
ALIGN = 64                                   # every array starts on a cache line
MAGIC = b"kred-shm-v1\0"
HEADER = ALIGN                               # MAGIC + 32-byte key, padded: arrays start after it
DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64), "int64": np.dtype(np.int64)}


class SharedMemoryError(WireError):
    """A shared-memory reference that cannot be honoured (unknown segment, not the client's, out of bounds...)."""


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def new_key() -> str:
    return secrets.token_hex(32)


def header(key: str) -> bytes:
    return MAGIC + bytes.fromhex(key)


# Client side: segments it creates and owns --------------------------------------------------------------

class Segment:
    """A segment created by this process, headed by its owner's key, unlinked on `close`. The client reads and
    writes it in place (`array`); results are copied out before the segment is reused or closed."""

    def __init__(self, shm: SharedMemory, key: str):
        self._shm, self.name, self.key, self.buf = shm, shm.name, key, shm.buf

    @property
    def size(self) -> int:
        return len(self.buf)

    @classmethod
    def create(cls, size: int, key: str) -> "Segment":
        shm = SharedMemory(name=PREFIX + secrets.token_hex(16), create=True, size=HEADER + max(int(size), 1))
        shm.buf[:HEADER] = header(key).ljust(HEADER, b"\0")
        return cls(shm, key)

    def array(self, offset: int, dtype, shape: Sequence[int]) -> np.ndarray:
        """A view of `shape` x `dtype` at `offset` (bounds are checked; offsets start after the header)."""
        dtype = np.dtype(dtype)
        nbytes = _extent(offset, dtype, shape, self.size, self.name)
        return np.ndarray(tuple(shape), dtype, buffer=self.buf, offset=offset) if nbytes else np.empty(shape, dtype)

    def close(self) -> None:
        shm, self._shm = self._shm, None
        self.buf = memoryview(b"")
        if shm is not None:
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _extent(offset, dtype: np.dtype, shape, size: int, name: str) -> int:
    """The byte count of `shape` x `dtype` at `offset`, refused unless it lies after the header within `size`."""
    shape = check_shape(shape, f"segment {name}")
    if type(offset) is not int:
        raise SharedMemoryError(f"offset {offset!r} in segment {name} is not an integer")
    nbytes = math.prod(shape) * dtype.itemsize
    if offset < HEADER or offset % dtype.itemsize or offset + nbytes > size:
        raise SharedMemoryError(f"{list(shape)} x {dtype} at offset {offset} does not fit segment {name} of {size} "
                                f"bytes after its {HEADER}-byte header (or is misaligned)")
    return nbytes


def ref(segment: Segment, offset: int, array: np.ndarray) -> dict[str, Any]:
    return {"segment": segment.name, "offset": offset, "dtype": array.dtype.name, "shape": list(array.shape)}


def pack(segment: Segment, arrays: Sequence[np.ndarray], offset: int = HEADER) -> tuple[list[dict[str, Any]], int]:
    """Copy `arrays` into `segment` from `offset` (C order, aligned). Returns their refs and the next free offset."""
    refs = []
    for array in arrays:
        view = segment.array(offset, array.dtype, list(array.shape))
        np.copyto(view, array, casting="no")
        refs.append(ref(segment, offset, view))
        offset = aligned(offset + array.nbytes)
    return refs, offset


def packed_size(arrays: Sequence[np.ndarray]) -> int:
    return sum(aligned(a.nbytes) for a in arrays)


class SegmentPool:
    """The segments of one client, all headed by its `key`, reused between calls (creating and first touching 100 MB
    costs more than copying it). Everything it created is unlinked on `close`, when the pool is collected, or at
    interpreter exit (a script that never closes its client leaves nothing behind and no resource-tracker warning)."""

    def __init__(self, keep: int = 4):
        self.keep, self.key = keep, new_key()
        self._free: list[Segment] = []
        self._all: set[Segment] = set()          # every live segment, also those lent out: closed by the finalizer
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_all, self._all)

    def segment(self, size: int) -> Segment:
        """A new segment of this pool's key, not pooled (the probe): closed with the pool at the latest."""
        segment = Segment.create(size, self.key)
        with self._lock:
            self._all.add(segment)
        return segment

    def discard(self, segment: Segment) -> None:
        with self._lock:
            self._all.discard(segment)
        segment.close()

    def acquire(self, size: int) -> Segment:
        with self._lock:
            fits = [s for s in self._free if s.size >= HEADER + size]
            if fits:
                best = min(fits, key=lambda s: s.size)
                self._free.remove(best)
                return best
        return self.segment(max(aligned(size + size // 8), 1 << 16))

    def release(self, segment: Segment) -> None:
        with self._lock:
            self._free.append(segment)
            self._free.sort(key=lambda s: s.size)
            extra = self._free[:-self.keep] if len(self._free) > self.keep else []
            self._free = self._free[len(extra):]
        for s in extra:
            self.discard(s)

    def close(self) -> None:
        with self._lock:
            self._free = []
        self._finalizer()


def _close_all(segments: set[Segment]) -> None:
    while segments:
        segments.pop().close()


# Server side: the client segments a request names, read and written through their file descriptors ------------

def _open(name: str) -> int:
    """A file descriptor of an existing segment (glibc's shm_open adds O_NOFOLLOW), not registered with the
    resource tracker (SharedMemory's public API only gained track=False in 3.13)."""
    import _posixshmem

    return _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)


def _transfer(call, fd: int, view: memoryview, offset: int) -> int:
    """preadv/pwritev of all of `view` (one call moves at most ~2 GiB); stops early at the end of the file."""
    done = 0
    while done < len(view):
        moved = call(fd, [view[done:]], offset + done)
        if moved <= 0:
            break
        done += moved
    return done


class ClientSegments:
    """The segments one request names, opened once each after checking the client's key; `close` closes them."""

    def __init__(self, key: str | None):
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise SharedMemoryError("a shared-memory request must carry its client's key ('shm_key': 64 hex digits)")
        self.key, self._fds = key, {}

    def _fd(self, name: str) -> int:
        if name in self._fds:
            return self._fds[name]
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise SharedMemoryError(f"segment name {name!r} is not one this service accepts (kred_ + 32 hex digits)")
        try:
            fd = _open(name)
        except FileNotFoundError:
            raise SharedMemoryError(f"shared-memory segment {name!r} does not exist on the server's host") from None
        except (OSError, ValueError, ImportError) as e:
            raise SharedMemoryError(f"shared-memory segment {name!r} cannot be opened ({e})") from None
        try:
            expected = header(self.key)
            if not stat.S_ISREG(os.fstat(fd).st_mode) or not hmac.compare_digest(os.pread(fd, len(expected), 0),
                                                                                 expected):
                raise SharedMemoryError(f"segment {name!r} does not belong to this client (its header does not "
                                        "hold the request's shm_key)")
        except BaseException:
            os.close(fd)
            raise
        self._fds[name] = fd
        return fd

    def size(self, name: str) -> int:
        return os.fstat(self._fd(name)).st_size

    def read(self, item: dict[str, Any]) -> np.ndarray:
        """A copy, owned by the server, of the array `item` = {segment, offset, dtype, shape} names."""
        dtype = DTYPES.get(item.get("dtype"))
        if dtype is None:
            raise SharedMemoryError(f"dtype {item.get('dtype')!r} is not one of {', '.join(DTYPES)}")
        name = item.get("segment")
        fd = self._fd(name)
        nbytes = _extent(item.get("offset"), dtype, item.get("shape"), os.fstat(fd).st_size, name)
        array = np.empty(tuple(item["shape"]), dtype)
        if nbytes and _transfer(os.preadv, fd, memoryview(array).cast("B"), item["offset"]) != nbytes:
            raise SharedMemoryError(f"segment {name} shrank while its arrays were being read")
        return array

    def read_bytes(self, name: str, size: int) -> bytes:
        """The first `size` bytes after the header (the probe)."""
        data = os.pread(self._fd(name), size, HEADER)
        if len(data) != size:
            raise SharedMemoryError(f"segment {name} holds fewer than {size} bytes after its header")
        return data

    def write(self, out: dict[str, Any], arrays: Sequence[np.ndarray]) -> list[dict[str, Any]] | None:
        """Write `arrays` into the client's room `out` = {segment, offset, size}; None when they do not fit."""
        name, offset, room = out["segment"], out["offset"], out["size"]
        fd = self._fd(name)
        if offset < HEADER or packed_size(arrays) > room or offset + room > os.fstat(fd).st_size:
            return None
        refs = []
        for array in arrays:
            array = np.ascontiguousarray(array)
            if array.nbytes and _transfer(os.pwritev, fd, memoryview(array).cast("B"), offset) != array.nbytes:
                raise SharedMemoryError(f"the result could not be written into segment {name}")
            refs.append({"segment": name, "offset": offset, "dtype": array.dtype.name, "shape": list(array.shape)})
            offset = aligned(offset + array.nbytes)
        if os.fstat(fd).st_size < offset:          # shrunk meanwhile (pwrite regrew it): the client's problem
            raise SharedMemoryError(f"segment {name} shrank while the result was being written")
        return refs

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
