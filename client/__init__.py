"""The kred client: reductions, gradients and jobs on a kred server (see client.client; the protocol in client.protocol).

Needs only httpx, numpy, pyarrow (and tqdm for progress bars): a client-only install does not pull the server's
FastAPI stack. `client.torch.Genred` is the differentiable remote Genred; `kred` is the command line (client.cli).
Names are imported on first use, so that `kred.client.cli` (the `kred` command) loads without the client's extra.
"""
from importlib import import_module as _import_module

_LAZY = {"Client": ".client", "Job": ".jobs", "RemoteGenred": ".operations", "AsyncClient": ".aio",
         "AsyncJob": ".jobs", "JobFailed": ".errors", "LimitExceeded": ".errors", "RemoteError": ".errors",
         "ServerUnreachable": ".errors", "TooBusy": ".errors", "Unauthorized": ".errors",
         "ReplyTooLarge": ".errors", "DeadlineExceeded": ".errors"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(_import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'kred.client' has no attribute {name!r}")
