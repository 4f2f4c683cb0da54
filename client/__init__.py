"""The kred client: reductions, gradients and jobs on a kred server (see client.client).

Needs only httpx, numpy, pyarrow (and tqdm for progress bars): a client-only install does not pull the server's
FastAPI stack. `client.torch.Genred` is the differentiable remote Genred; `kred` is the command line (client.cli).
"""
from .client import AsyncClient, AsyncJob, Client, Job, JobFailed, RemoteGenred
from .errors import LimitExceeded, RemoteError, TooBusy, Unauthorized

__all__ = ["AsyncClient", "AsyncJob", "Client", "Job", "JobFailed", "LimitExceeded", "RemoteError", "RemoteGenred",
           "TooBusy", "Unauthorized"]
