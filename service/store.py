"""The job store: one SQLite table of jobs, and each job's inputs and result as Arrow files beside it.

A job is written (inputs first, then its row) before the client hears its id, so a server that stops loses nothing:
at start, jobs still `queued` or `running` are handed back to the queue. Layout under `directory`:

    jobs.sqlite            id, state, progress, times, error, sizes
    inputs/<id>.arrow      the request (schema metadata) and its arrays
    results/<id>.arrow     the outputs (names and timings in the metadata)

Retention (`expire`): finished jobs (done, failed, cancelled) are deleted, row and files, once older than the
retention time, and the oldest finished ones go first while the store holds more finished jobs or more bytes than
allowed. Queued and running jobs are never deleted. The app calls it at start and then periodically.

The byte cap also holds at every write: `create` and `write_result` are given `max_bytes`, and a file that would
take the store past it first evicts the oldest finished jobs; if it still does not fit, the file is deleted and
`StoreFull` raised (a 507 at submission; the job fails at its result). Each row records its files' bytes, its
tenant (the jobs of one tenant are invisible to others) and the output budget of a dataset job.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from kred.wire import arrow

class StoreFull(Exception):
    """A file that does not fit in the store's byte cap even with every finished job evicted."""


STATES = ("queued", "running", "done", "failed", "cancelled")
UNFINISHED = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT,
    rows INTEGER,
    cols INTEGER,
    timings TEXT NOT NULL DEFAULT '{}',
    tenant TEXT NOT NULL DEFAULT 'default',
    bytes INTEGER NOT NULL DEFAULT 0,
    output_bytes INTEGER NOT NULL DEFAULT 0
)"""
# columns added after the first release: a store made before them gets them on opening
_ADDED = {"tenant": "TEXT NOT NULL DEFAULT 'default'", "bytes": "INTEGER NOT NULL DEFAULT 0",
          "output_bytes": "INTEGER NOT NULL DEFAULT 0"}
_FIELDS = ("id", "state", "progress", "created", "started", "finished", "error", "rows", "cols", "timings",
           "tenant", "output_bytes")


class JobStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        (self.directory / "inputs").mkdir(parents=True, exist_ok=True)
        (self.directory / "results").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.directory / "jobs.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in _ADDED.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
                if column == "bytes":              # sized once from the files already there
                    for (job_id,) in self._db.execute("SELECT id FROM jobs").fetchall():
                        self._db.execute("UPDATE jobs SET bytes = ? WHERE id = ?", (self._bytes(job_id), job_id))

    def inputs_path(self, job_id: str) -> Path:
        return self.directory / "inputs" / f"{job_id}.arrow"

    def result_path(self, job_id: str) -> Path:
        return self.directory / "results" / f"{job_id}.arrow"

    def create(self, request: dict[str, Any], arrays: list[np.ndarray], rows: int, cols: int,
               tenant: str = "default", output_bytes: int = 0, max_bytes: int | None = None) -> dict[str, Any]:
        job_id = secrets.token_hex(12)
        path = self.inputs_path(job_id)
        size = arrow.write_file(path, request, arrays)
        with self._lock:
            self._make_room(size, max_bytes, path)
            self._db.execute("INSERT INTO jobs (id, state, created, rows, cols, tenant, bytes, output_bytes) "
                             "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                             (job_id, time.time(), rows, cols, tenant, size, output_bytes))
        return self.get(job_id)

    def _make_room(self, size: int, max_bytes: int | None, path: Path) -> None:
        """Under the lock: evict the oldest finished jobs until `size` more bytes fit under `max_bytes`; else
        delete `path` (the file just written) and raise StoreFull."""
        if max_bytes is None:
            return
        held = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM jobs").fetchone()[0]
        if held + size <= max_bytes:
            return
        oldest = self._db.execute("SELECT id, bytes FROM jobs WHERE state IN ('done', 'failed', 'cancelled') "
                                  "ORDER BY COALESCE(finished, created)").fetchall()
        doomed = []
        for job_id, job_bytes in oldest:
            if held + size <= max_bytes:
                break
            doomed.append(job_id)
            held -= job_bytes
        if held + size > max_bytes:
            path.unlink(missing_ok=True)
            raise StoreFull(f"the job store holds {held} bytes of unfinished jobs; {size} more would pass its "
                            f"max_store_bytes ({max_bytes})")
        for job_id in doomed:
            self._delete_locked(job_id)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def list(self, limit: int = 100, state: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        query = f"SELECT {', '.join(_FIELDS)} FROM jobs WHERE 1"
        args: tuple = ()
        if state is not None:
            query, args = query + " AND state = ?", args + (state,)
        if tenant is not None:
            query, args = query + " AND tenant = ?", args + (tenant,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created DESC LIMIT ?", args + (limit,)).fetchall()
        return [_record(r) for r in rows]

    def update(self, job_id: str, **fields) -> None:
        if "timings" in fields:
            fields["timings"] = json.dumps(fields["timings"])
        assert set(fields) <= set(_FIELDS[1:]), fields
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    def unfinished(self) -> list[str]:
        """Jobs a previous server left queued or running, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running') ORDER BY created"
                                    ).fetchall()
        return [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | dict(rows)

    def load_inputs(self, job_id: str) -> tuple[dict[str, Any], list[np.ndarray]]:
        return arrow.read_file(self.inputs_path(job_id))

    def write_result(self, job_id: str, meta: dict[str, Any], arrays: list[np.ndarray],
                     max_bytes: int | None = None) -> int:
        path = self.result_path(job_id)
        size = arrow.write_file(path, meta, arrays)
        with self._lock:
            try:
                self._make_room(size, max_bytes, path)
            finally:
                self._db.execute("UPDATE jobs SET bytes = ? WHERE id = ?", (self._bytes(job_id), job_id))
        return size

    def tenant_counts(self) -> dict[tuple[str, str], int]:
        """Jobs by (tenant, state)."""
        with self._lock:
            rows = self._db.execute("SELECT tenant, state, COUNT(*) FROM jobs GROUP BY tenant, state").fetchall()
        return {(tenant, state): n for tenant, state, n in rows}

    def tenant_usage(self, tenant: str) -> tuple[int, int]:
        """(jobs of `tenant` queued or running, output bytes budgeted by its dataset jobs in the store)."""
        with self._lock:
            return self._db.execute(
                "SELECT COALESCE(SUM(state IN ('queued', 'running')), 0), COALESCE(SUM(output_bytes), 0) "
                "FROM jobs WHERE tenant = ?", (tenant,)).fetchone()

    def expire(self, max_age_s: float, max_jobs: int, max_bytes: int, now: float | None = None) -> list[str]:
        """Delete finished jobs past the retention policy (see the module docstring); the ids deleted."""
        now = time.time() if now is None else now
        with self._lock:
            finished = self._db.execute(
                "SELECT id, COALESCE(finished, created) AS t FROM jobs WHERE state IN ('done', 'failed', 'cancelled') "
                "ORDER BY t DESC").fetchall()                  # newest first
            unfinished = [r[0] for r in self._db.execute(
                "SELECT id FROM jobs WHERE state IN ('queued', 'running')").fetchall()]
        kept_bytes = sum(self._bytes(job_id) for job_id in unfinished)
        doomed = []
        for rank, (job_id, finished_at) in enumerate(finished):
            size = self._bytes(job_id)
            if now - finished_at > max_age_s or rank >= max_jobs or kept_bytes + size > max_bytes:
                doomed.append(job_id)
            else:
                kept_bytes += size
        for job_id in doomed:
            self.delete(job_id)
        return doomed

    def delete(self, job_id: str) -> None:
        """Forget a job: its row first (so no reader finds a row without files), then its files."""
        with self._lock:
            self._delete_locked(job_id)

    def _delete_locked(self, job_id: str) -> None:
        self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        for path in (self.inputs_path(job_id), self.result_path(job_id)):
            path.unlink(missing_ok=True)

    def _bytes(self, job_id: str) -> int:
        return sum(path.stat().st_size for path in (self.inputs_path(job_id), self.result_path(job_id))
                   if path.exists())

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row) -> dict[str, Any]:
    record = dict(zip(_FIELDS, row))
    record["timings"] = json.loads(record["timings"] or "{}")
    return record
