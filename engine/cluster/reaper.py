"""Stop the Ray processes a Cluster started when the process that owns them dies without cleaning up (SIGKILL, OOM).

Ray's raylet and GCS die with their driver, but its dashboard and runtime-env agents can outlive it. So when a
Cluster starts its own Ray, it starts this watcher in a session of its own, with the ids of the Ray processes it
started: once the owner is gone, the watcher kills those that are still there. A process is named by pid and start
time (from /proc), so a pid reused by an unrelated process is never touched. Linux only (elsewhere: a no-op).

    python -m kred.engine.cluster.reaper OWNER_PID PID:START ...
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_SECONDS = 0.5


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc/*/stat parent links)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(parent, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def watch(owner: int, before: set[int]) -> subprocess.Popen | None:
    """Start the watcher for the processes below `owner` that were not there `before` (call right after `ray.init`
    started Ray, with the descendants from just before)."""
    if not os.path.isdir("/proc"):
        return None
    named = [f"{pid}:{start}" for pid in descendants(owner) if pid not in before
             and (start := start_time(pid)) is not None]
    if not named:
        return None
    return subprocess.Popen([sys.executable, "-m", "kred.engine.cluster.reaper", str(owner), *named],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    owner, named = int(argv[0]), [tuple(map(int, item.split(":"))) for item in argv[1:]]
    owner_start = start_time(owner)
    while owner_start is not None and start_time(owner) == owner_start:
        time.sleep(POLL_SECONDS)
    for pid, start in named:
        if start_time(pid) == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
