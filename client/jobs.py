"""`Job` and `AsyncJob`: a job on the server, its status, progress bar, result and cancellation. Polling is a
protocol flow (`Protocol.job_wait`); both classes drive the same flows through their client."""
from __future__ import annotations

from .protocol import job_path

LOG_REDRAW_S = 10.0             # a job's progress bar, written to a log rather than a terminal, redraws this rarely


class _Job:
    """What `Job` and `AsyncJob` share: the calls, each one protocol flow driven by the job's client."""

    def __init__(self, client, info: dict, like=None, expected_bytes: int | None = None):
        job_path(info.get("id") if isinstance(info, dict) else None)        # a plain token, or refused here
        self.client, self.info, self._like, self._expected = client, info, like, expected_bytes
        self.id: str = info["id"]

    def _keep(self, info: dict) -> dict:
        self.info = info
        return info

    def status(self):
        return self.client._drive(self.client._flows.job_status(self.id), then=self._keep)

    def wait(self, timeout: float | None = None, progress: bool = False, poll: float = 0.1):
        """Poll until the job finishes (a tqdm bar with `progress`); TimeoutError after `timeout` seconds."""
        flow = self.client._flows.job_wait(self.id, timeout, _bar(self.id) if progress else None, poll)
        return self.client._drive(flow, then=self._keep)

    def result(self, timeout: float | None = None, progress: bool = False):
        """The outputs once done; raises JobFailed if the job failed or was cancelled."""
        return self.client._drive(self.client._flows.job_result(self.id, self._like, self._expected, timeout,
                                                                _bar(self.id) if progress else None))

    def cancel(self, wait: bool = True, timeout: float = 30.0):
        """Cancel; with `wait`, until the job has really stopped."""
        return self.client._drive(self.client._flows.job_cancel(self.id, wait, timeout), then=self._keep)


class Job(_Job):
    """A job on the server: `status()`, `progress`, `wait()`, `result(progress=True)`, `cancel()`."""

    @property
    def state(self) -> str:
        return self.status()["state"]

    @property
    def progress(self) -> float:
        return self.status()["progress"]


class AsyncJob(_Job):
    """The async twin of `Job` (every call is awaited)."""


def _bar(job_id: str, file=None):
    """A job's progress bar in percent. Its rate would read "%/s", so the format leaves it out; in a log (not a
    terminal) it is redrawn at most every LOG_REDRAW_S seconds rather than at every poll."""
    import sys

    from tqdm.auto import tqdm
    file = sys.stderr if file is None else file
    terminal = getattr(file, "isatty", lambda: False)()
    return tqdm(total=100, desc=f"kred job {job_id[:8]}", file=file, mininterval=0.1 if terminal else LOG_REDRAW_S,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
