"""Same-host shared memory: arrays cross between client and server without being copied through a socket.

The client owns every segment: it writes the input arrays into one, leaves room for the result, and sends the
segment's name with offsets, dtypes and shapes (`ArrayRef` dicts) in a small JSON request. The server maps the
segment, reads the inputs in place and writes the result into the client's room. Only names this module generates
(`kred_` + 32 hex digits, unguessable) are ever mapped.

Python < 3.13: `SharedMemory(name)` registers an *attached* segment with the process's resource tracker, which then
unlinks it when that process exits (destroying the client's segment, or warning about it). The server therefore maps
segments itself (`_map`) and never registers them; only the creator, the client, is tracked and unlinks.
This module needs only numpy and the standard library (the client imports it).
"""
from __future__ import annotations

import mmap
import os
import re
import secrets
import threading
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Sequence

import numpy as np

PREFIX = "kred_"
NAME = re.compile(r"kred_[0-9a-f]{32}")
ALIGN = 64                                   # every array starts on a cache line
DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64), "int64": np.dtype(np.int64)}


class SharedMemoryError(ValueError):
    """A shared-memory reference that cannot be honoured (unknown segment, out of bounds, bad dtype...)."""


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# Segments ---------------------------------------------------------------------------------------------

class Segment:
    """A mapped segment: created by this process (owned: unlinked on `close`) or attached to (borrowed).

    numpy views of a segment do not pin an explicit unmap, so a borrowed segment is never unmapped explicitly: `close`
    drops this object's reference and the mapping goes away with the last array viewing it (no dangling pointers).
    An owned segment is unmapped and unlinked by `close`; its owner (the client) copies results out first.
    """

    def __init__(self, name: str, buf: memoryview, owner: SharedMemory | None = None):
        self.name, self.buf, self._owner = name, buf, owner

    @property
    def size(self) -> int:
        return len(self.buf)

    @classmethod
    def create(cls, size: int) -> "Segment":
        shm = SharedMemory(name=PREFIX + secrets.token_hex(16), create=True, size=max(int(size), 1))
        return cls(shm.name, shm.buf, shm)

    @classmethod
    def attach(cls, name: str) -> "Segment":
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise SharedMemoryError(f"segment name {name!r} is not one this service accepts (kred_ + 32 hex digits)")
        try:
            return cls(name, _map(name))
        except FileNotFoundError:
            raise SharedMemoryError(f"shared-memory segment {name!r} does not exist on the server's host") from None
        except (OSError, ValueError, ImportError) as e:
            raise SharedMemoryError(f"shared-memory segment {name!r} cannot be mapped ({e})") from None

    def array(self, offset: int, dtype, shape: Sequence[int]) -> np.ndarray:
        """A view of `shape` x `dtype` at `offset` (bounds are checked)."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise SharedMemoryError(f"shape {list(shape)} has a negative size")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset < 0 or offset % dtype.itemsize or offset + nbytes > self.size:
            raise SharedMemoryError(f"{list(shape)} x {dtype} at offset {offset} does not fit segment {self.name} "
                                    f"of {self.size} bytes (or is misaligned)")
        return np.ndarray(shape, dtype, buffer=self.buf, offset=offset)

    def close(self) -> None:
        self.buf = memoryview(b"")
        if self._owner is not None:
            owner, self._owner = self._owner, None
            owner.close()
            try:
                owner.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _map(name: str) -> memoryview:
    """Map an existing segment read-write, without registering it with the resource tracker."""
    import _posixshmem      # what SharedMemory uses on POSIX; its public API only gained track=False in 3.13

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        return memoryview(mmap.mmap(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)


# Client side: pack arrays into a segment -------------------------------------------------------------

def ref(segment: Segment, offset: int, array: np.ndarray) -> dict[str, Any]:
    return {"segment": segment.name, "offset": offset, "dtype": array.dtype.name, "shape": list(array.shape)}


def pack(segment: Segment, arrays: Sequence[np.ndarray], offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Copy `arrays` into `segment` from `offset` (C order, aligned). Returns their refs and the next free offset."""
    refs = []
    for array in arrays:
        view = segment.array(offset, array.dtype, array.shape)
        np.copyto(view, array, casting="no")
        refs.append(ref(segment, offset, view))
        offset = aligned(offset + array.nbytes)
    return refs, offset


def packed_size(arrays: Sequence[np.ndarray]) -> int:
    return sum(aligned(a.nbytes) for a in arrays)


class SegmentPool:
    """Segments a client reuses between calls: creating and first touching 100 MB costs more than copying it."""

    def __init__(self, keep: int = 4):
        self.keep, self._free, self._lock = keep, [], threading.Lock()

    def acquire(self, size: int) -> Segment:
        with self._lock:
            fits = [s for s in self._free if s.size >= size]
            if fits:
                best = min(fits, key=lambda s: s.size)
                self._free.remove(best)
                return best
        return Segment.create(max(aligned(size + size // 8), 1 << 16))

    def release(self, segment: Segment) -> None:
        with self._lock:
            self._free.append(segment)
            self._free.sort(key=lambda s: s.size)
            extra = self._free[:-self.keep] if len(self._free) > self.keep else []
            self._free = self._free[len(extra):]
        for s in extra:
            s.close()

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for s in free:
            s.close()


# Server side: map the refs of a request --------------------------------------------------------------

class Mapped:
    """The segments a request names, mapped once each; `close` unmaps them all."""

    def __init__(self):
        self.segments: dict[str, Segment] = {}

    def segment(self, name: str) -> Segment:
        if name not in self.segments:
            self.segments[name] = Segment.attach(name)
        return self.segments[name]

    def array(self, item: dict[str, Any]) -> np.ndarray:
        dtype = DTYPES.get(item.get("dtype"))
        if dtype is None:
            raise SharedMemoryError(f"dtype {item.get('dtype')!r} is not one of {', '.join(DTYPES)}")
        return self.segment(item["segment"]).array(int(item["offset"]), dtype, item["shape"])

    def write(self, out: dict[str, Any], arrays: Sequence[np.ndarray]) -> list[dict[str, Any]] | None:
        """Write `arrays` into the client's room `out` = {segment, offset, size}; None when they do not fit."""
        offset, end = int(out["offset"]), int(out["offset"]) + int(out["size"])
        segment = self.segment(out["segment"])
        if packed_size(arrays) > end - offset or end > segment.size:
            return None
        return pack(segment, arrays, offset)[0]

    def close(self) -> None:
        for s in self.segments.values():
            s.close()
        self.segments.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
