"""The engine's bounds: how much symbolic work one formula may cost, and how much its caches may hold.

Each bound has a default and an environment variable, read when this module is imported (so set them before the
first `import kred`; `kred serve` passes its environment on). `BoundedLRU` is the engine's cache bounded by count and
by bytes (plans, loaded kernels, compiled images): least recently used entries go first.
"""
from __future__ import annotations

import os
import threading

import cachetools

from .errors import KredError


def env_int(name: str, default, error: type[KredError] = KredError):
    """The positive integer in environment variable `name`, or `default` when it is unset or blank."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise error(f"{name} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise error(f"{name} must be a positive integer, got {text!r}")
    return value


# Nodes that one piece of symbolic work (parsing one formula with its derivatives, one gradient, ...) may create,
# garbage included: nested derivatives grow exponentially, and this stops them while they are being built.
FORMULA_NODES = env_int("KRED_MAX_FORMULA_NODES", 20_000)
# Plans kept by make_plan (and gradient plans kept per plan).
PLANS = env_int("KRED_MAX_PLANS", 512)
PLAN_BYTES = env_int("KRED_MAX_PLAN_BYTES", 256 << 20)
# Compiled kernels kept loaded in one process (each one is a shared library: ~40 kB and 5 memory mappings).
LOADED_KERNELS = env_int("KRED_MAX_LOADED_KERNELS", 128)
LOADED_KERNEL_BYTES = env_int("KRED_MAX_LOADED_KERNEL_BYTES", 256 << 20)
# The on-disk kernel cache (KRED_CACHE_DIR): least recently used entries are deleted past this size.
DISK_CACHE_BYTES = env_int("KRED_CACHE_MAX_BYTES", 1 << 30)


class BoundedLRU(cachetools.LRUCache):
    """An LRU cache bounded by `max_count` entries and `max_bytes` in total (`getsizeof(value)` bytes each).

    Thread-safe for the single operations used here (get, set); a value heavier than `max_bytes` is not kept."""

    def __init__(self, max_count: int, max_bytes: int, getsizeof=lambda value: 1):
        super().__init__(max_bytes, getsizeof)
        self.max_count = max_count
        self.lock = threading.RLock()

    def get(self, key, default=None):
        with self.lock:
            return super().get(key, default)

    def __setitem__(self, key, value):
        with self.lock:
            try:
                super().__setitem__(key, value)
            except ValueError:          # larger than the whole cache: used once, not kept
                return
            while len(self) > self.max_count:
                self.popitem()
