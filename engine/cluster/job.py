"""A submitted reduction: the work queue that feeds shards to workers, and the future-like handle on it.

The queue keeps at most `inflight` shards per worker (one computing, one waiting, so a worker never idles for a
round trip), hands the next shard to whichever worker frees up first, duplicates the last stragglers onto idle
workers (the first copy back wins; states are deterministic so the result is the same), re-queues the shards of
workers that died, and fails the whole job at once on a user error (a KredError raised by the engine).

The inputs go to the object store once, as blocks (`blocks.JobBlocks`); a worker is preferably given a shard whose
blocks it already holds, and each worker's fetched bytes are counted (`bytes_fetched` against `bytes_read`, the
bytes of the distinct blocks its shards read).
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import CancelledError, Future
from typing import NamedTuple

import numpy as np

from ..errors import BackendError, KredError
from ..plan import Plan
from .blocks import JobBlocks
from .sharding import Assembler, Shard
from .workers import Worker, WorkerPool

POLL_SECONDS = 0.05          # how often the queue looks at cancellation and at newly started workers
LOCALITY_SCAN = 64           # queued shards looked at for one whose blocks a worker already holds
_ids = itertools.count(1)


def _lost_errors() -> tuple:
    import ray
    return (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
            ray.exceptions.ObjectLostError, ray.exceptions.LocalRayletDiedError, ray.exceptions.OutOfMemoryError)


class Progress(NamedTuple):
    done: int
    total: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


class Job:
    """Future-like handle: `progress()`, `result(timeout)`, `cancel()`, `done()`, `status`."""

    def __init__(self, pool: WorkerPool, plan: Plan, arrays: list[np.ndarray], dtype, shards: list[Shard], *,
                 inflight: int = 2, max_attempts: int = 3, speculate: bool = True, worker_wait: float = 60.0):
        self.id = next(_ids)
        self.plan, self.shards = plan, shards
        self._pool, self._arrays, self._dtype = pool, arrays, dtype
        self._inflight, self._max_attempts = max(1, inflight), max_attempts
        self._speculate, self._worker_wait = speculate, worker_wait
        self._future: Future = Future()
        self._cancel = threading.Event()
        self._done = 0
        self.lost = 0               # shard results lost with their worker
        self.retries = 0            # of those, shards put back in the queue (the others had a copy out already)
        self.duplicates = 0         # straggler copies started on idle workers
        self.bytes_fetched: Counter = Counter()     # worker name -> bytes it fetched from the object store
        self.blocks_read: dict[str, dict] = {}      # worker name -> {block key: bytes} its shards read
        self.first_shard: dict[str, float] = {}     # worker name -> seconds from its start to its first shard
        self.shards_by_node: Counter = Counter()    # node address -> shards whose result came from there
        self.started, self.seconds = time.monotonic(), None     # wall time of the job once it ended
        self.transfers: Counter = Counter()         # GPU worker name -> copies of held states to the host (one)
        self._hold = f"job-{os.getpid()}-{self.id}"     # the key under which GPU workers hold this job's states
        pool.job_started()
        pool.wanted(len(shards))
        self._thread = threading.Thread(target=self._run, name=f"kred-job-{self.id}", daemon=True)
        self._thread.start()

    # The handle ------------------------------------------------------------------------------------------
    def progress(self) -> Progress:
        return Progress(self._done, len(self.shards))

    def done(self) -> bool:
        return self._future.done()

    @property
    def status(self) -> str:
        if not self._future.done():
            return "cancelling" if self._cancel.is_set() else "running"
        if self._future.cancelled():
            return "cancelled"
        return "failed" if self._future.exception() is not None else "done"

    def result(self, timeout: float | None = None, progress: bool = False):
        """The finished result; raises the job's error, CancelledError, or TimeoutError after `timeout` seconds."""
        if progress:
            self._show_progress(timeout)
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None):
        return self._future.exception(timeout)

    def cancel(self, wait: float = 10.0) -> bool:
        """Stop outstanding shards; True if the job ended cancelled (False if it had already finished)."""
        if self._future.done():
            return self._future.cancelled()
        self._cancel.set()
        self._thread.join(wait)
        return self._future.cancelled()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    @property
    def bytes_read(self) -> dict[str, int]:
        """Per worker, the bytes of the distinct blocks its shards read (what an ideal cache would fetch)."""
        return {name: sum(blocks.values()) for name, blocks in self.blocks_read.items()}

    def summary(self) -> dict:
        """Where the job's shards were computed and what it cost (logged by the service's cluster driver)."""
        return {"shards": len(self.shards), "by_node": dict(sorted(self.shards_by_node.items())),
                "seconds": None if self.seconds is None else round(self.seconds, 3), "lost": self.lost,
                "retries": self.retries, "duplicates": self.duplicates,
                "bytes_fetched": int(sum(self.bytes_fetched.values()))}

    def _show_progress(self, timeout):
        from tqdm.auto import tqdm
        deadline = None if timeout is None else time.monotonic() + timeout
        with tqdm(total=len(self.shards), desc=f"kred job {self.id}", unit="shard") as bar:
            while not self._future.done() and (deadline is None or time.monotonic() < deadline):
                self._thread.join(0.1)
                bar.update(self._done - bar.n)
            bar.update(self._done - bar.n)

    # The work queue --------------------------------------------------------------------------------------
    def _run(self):
        try:
            result = self._schedule()
        except CancelledError:
            self._future.cancel()
        except BaseException as e:       # noqa: BLE001 - every failure belongs to the job's caller
            self._future.set_exception(e)
        else:
            self._future.set_result(result)
        finally:
            self.seconds = time.monotonic() - self.started
            self._arrays = None          # the object store keeps what workers still need
            self._pool.job_finished()

    def _schedule(self):
        import ray
        blocks = JobBlocks(self.plan, self._arrays, self.shards, rows=self._row_blocks)
        self._plan_ref = ray.put(self.plan)
        assembler = Assembler(self.plan.reduction, self.shards)
        acc = self.plan.acc_dtype(self._dtype)
        for shard in self.shards:
            if not shard.cols:          # rows no column range reaches (empty M, or outside every cluster)
                assembler.add(shard, self.plan.reduction.identity(shard.rows[1] - shard.rows[0], self._dtype, acc))
                self._done += 1
        queue = deque(shard for shard in self.shards if shard.cols)
        running: dict = {}                    # ref -> (shard, worker)
        load: Counter = Counter()             # worker -> shards in flight
        attempts: Counter = Counter()         # shard index -> lost workers
        held: dict = {}                       # GPU worker -> {shard index: shard} whose states stay on its device
        idle_since = None
        try:
            while True:
                while len(assembler.done) + sum(map(len, held.values())) < len(self.shards):
                    if self._cancel.is_set():
                        raise CancelledError()
                    workers = self._pool.poll()
                    idle_since = self._check_workers(workers, running, idle_since)
                    self._dispatch(workers, queue, running, load, blocks)
                    if not running:
                        time.sleep(POLL_SECONDS)
                        continue
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
                    for ref in ready:
                        if ref in running:     # else a copy cancelled while this batch was handled
                            self._receive(ref, running, load, queue, attempts, assembler, held)
                if not self._collect(held, queue, attempts, assembler):
                    return self._finish(assembler)
        finally:
            for ref in running:
                ray.cancel(ref)
            self._pool.broadcast_forget(self._block_keys(blocks))

    def _receive(self, ref, running, load, queue, attempts, assembler, held) -> None:
        """A shard's reply: its state (into the assembler), None for a state its GPU worker holds, or a loss."""
        import ray
        shard, worker = running.pop(ref)
        load[worker] -= 1
        try:
            # copied out of the object store: results must be writeable and must not pin its memory
            state, fetched = ray.get(ref)
            self.bytes_fetched[worker.spec.name] += fetched
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, KredError):
                raise e.cause from None     # the engine's own message, once, no retry
            raise
        except _lost_errors() as e:
            self._pool.lost(worker)
            self._retry(shard, e, queue, running, attempts, assembler, held)
            return
        except ray.exceptions.TaskCancelledError as e:     # cancelled by someone else: the worker is fine
            self._retry(shard, e, queue, running, attempts, assembler, held)
            return
        if shard.index in assembler.done or any(shard.index in shards for shards in held.values()):
            return                          # a straggler's copy came second
        if state is None:
            held.setdefault(worker, {})[shard.index] = shard
        else:
            assembler.add(shard, tuple(np.array(part) for part in state))
        self._done += 1
        self.shards_by_node[worker.info.get("node_ip", worker.spec.name)] += 1
        for other in [r for r, (s, _) in running.items() if s.index == shard.index]:
            ray.cancel(other)          # a straggler's copy: no longer needed
            load[running.pop(other)[1]] -= 1

    def _collect(self, held: dict, queue: deque, attempts: Counter, assembler: Assembler) -> bool:
        """Bring the states the GPU workers hold to the host, one copy per worker (each merged its row blocks' parts
        on its device first). A merged state stands for its first part, identities for its other parts (a merge
        with an identity changes nothing). True when a worker was lost with its states: their shards go back in
        the queue and the job goes on."""
        import ray
        acc = self.plan.acc_dtype(self._dtype)
        lost = False
        for worker, shards in list(held.items()):
            try:
                merged = ray.get(worker.handle.collect.remote(self._hold, self._plan_ref, sorted(shards)))
            except _lost_errors() as e:
                self._pool.lost(worker)
                del held[worker]
                for shard in shards.values():
                    self._done -= 1
                    self._retry(shard, e, queue, {}, attempts, assembler, held)
                lost = True
                continue
            self.transfers[worker.spec.name] += 1
            by_part = {(shard.block, shard.part): shard for shard in shards.values()}
            for block, parts, state in merged:
                state = tuple(np.array(part) for part in state)
                for k, part in enumerate(parts):
                    shard = by_part[(block, part)]
                    rows = shard.rows[1] - shard.rows[0]
                    assembler.add(shard, state if k == 0 else self.plan.reduction.identity(rows, self._dtype, acc))
            del held[worker]
        return lost

    # What a shard is, for this kind of job (a DatasetJob reads and writes files instead) -------------------
    _row_blocks = True             # the row-side inputs are arrays cut into blocks

    def _call(self, worker: Worker, shard: Shard, refs):
        return worker.handle.partial.remote(shard, self._plan_ref, refs, self._hold)

    def _finish(self, assembler: Assembler):
        return self.plan.reduction.finalize(assembler.state(), self._dtype)

    def _block_keys(self, blocks: JobBlocks) -> list[str]:
        """The workers' cache keys of this job's blocks (and the key of the states they hold), forgotten when it
        ends."""
        return blocks.keys() + [self._hold]

    def _check_workers(self, workers, running, idle_since):
        """Fail when no worker has been available for `worker_wait` seconds (all lost, none restartable)."""
        if self._pool.closed:
            raise BackendError("the Cluster was closed while this job was running")
        if workers or running:
            return None
        now = time.monotonic()
        if idle_since is None:
            return now
        if now - idle_since > self._worker_wait:
            raise BackendError(f"no cluster worker available for {self._worker_wait:.0f} s: every worker was lost "
                               "and none could be restarted (resources gone?)")
        return idle_since

    def _dispatch(self, workers: list[Worker], queue: deque, running: dict, load: Counter, blocks: JobBlocks) -> None:
        def send(worker, shard):
            refs = blocks.for_shard(shard)
            ref = self._call(worker, shard, refs)
            running[ref] = (shard, worker)
            load[worker] += 1
            read = self.blocks_read.setdefault(worker.spec.name, {})
            read.update(zip(refs.keys, refs.nbytes))
            if worker.spec.name not in self.first_shard and worker.live_since is not None:
                self.first_shard[worker.spec.name] = time.monotonic() - worker.live_since

        for worker in sorted(workers, key=lambda w: load[w]):
            while queue and load[worker] < self._inflight:
                send(worker, self._nearest(worker, queue, blocks))
        if queue or not self._speculate:
            return
        # Nothing left to hand out: idle workers take a copy of the newest shard still out on another worker
        # (the newest is the likeliest to be waiting behind another shard there).
        copies = Counter(shard.index for shard, _ in running.values())
        for worker in [w for w in workers if load[w] == 0]:
            for shard, owner in reversed(list(running.values())):
                if copies[shard.index] == 1 and owner is not worker:
                    send(worker, shard)
                    copies[shard.index] += 1
                    self.duplicates += 1
                    break

    def _nearest(self, worker: Worker, queue: deque, blocks: JobBlocks) -> Shard:
        """Take from the queue the first shard whose blocks `worker` already read (most of them), else the first."""
        held = self.blocks_read.get(worker.spec.name)
        if held:
            best, score = 0, 0
            for k, shard in enumerate(itertools.islice(queue, LOCALITY_SCAN)):
                refs = blocks.for_shard(shard)
                have = sum(size for key, size in zip(refs.keys, refs.nbytes) if key in held)
                if have > score:
                    best, score = k, have
            if best:
                shard = queue[best]
                del queue[best]
                return shard
        return queue.popleft()

    def _retry(self, shard, error, queue, running, attempts, assembler, held) -> None:
        """Put back a shard whose worker was lost, unless a copy of it is done (or held) or still out."""
        self.lost += 1
        if shard.index in assembler.done or any(shard.index in shards for shards in held.values()):
            return
        attempts[shard.index] += 1
        if attempts[shard.index] >= self._max_attempts:
            raise BackendError(f"shard {shard.index} (rows {shard.rows}, columns {shard.cols}) lost its worker "
                               f"{attempts[shard.index]} times; last error: {error}") from error
        if not any(s.index == shard.index for s, _ in running.values()):
            queue.appendleft(shard)
            self.retries += 1


class DatasetJob(Job):
    """A job whose row-side inputs are datasets the workers read (`readers`) and whose output is a Parquet dataset
    they write (`output`, a dataset.Output); its result is the output's URI."""

    _row_blocks = False

    def __init__(self, pool, plan, arrays, dtype, shards, readers, output, col_readers=None, **options):
        """`col_readers`: {argument index: RowReader} of the column-side inputs that are datasets."""
        self._readers, self._output, self._col_readers = readers, output, col_readers or {}
        self.skipped = sorted(output.written)        # blocks found already written (a resumed job)
        super().__init__(pool, plan, arrays, dtype, shards, **options)

    def _call(self, worker, shard, refs):
        return worker.handle.write_block.remote(shard, self._plan_ref, refs, self._readers, self._output.location,
                                                self._col_readers)

    def _block_keys(self, blocks):
        return blocks.keys() + [reader.block_key(c0, c1) for reader in self._col_readers.values()
                                for c0, c1 in {cols for shard in self.shards for cols in shard.cols}]

    def _finish(self, assembler):
        self._output.finish()
        return self._output.uri
