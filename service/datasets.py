"""Dataset jobs in the service: every URI a client names is checked against the server's `dataset_roots` before
anything is opened, then turned into the engine's inputs (`engine.cluster.Dataset` for the row-side ones, which the
cluster's workers read; arrays for the others, read here within `max_body_bytes`)."""
from __future__ import annotations

import os
import posixpath

import numpy as np

from kred.engine.cluster.dataset import Dataset, row_reader
from kred.engine.errors import ArgumentError
from kred.engine.plan import ROWS, Plan

from .errors import ApiError
from .schemas import DatasetJobRequest, DatasetSource
from .settings import Settings


def check_uri(uri: str, settings: Settings, what: str) -> str:
    """`uri` if it lies under one of the server's dataset roots, else a 403 naming it."""
    if not settings.dataset_roots:
        raise ApiError(403, "datasets_off", "this server runs no dataset jobs (set KRED_DATASET_ROOTS to the "
                                            "folders or URI prefixes it may read and write)")
    if any(_inside(uri, root) for root in settings.dataset_roots):
        return uri
    raise ApiError(403, "dataset_denied", f"{what} {uri!r} is outside the server's dataset roots")


def _inside(uri: str, root: str) -> bool:
    local = uri.startswith("file://") or "://" not in uri
    if local != (root.startswith("file://") or "://" not in root):
        return False
    if local:
        path = os.path.realpath(uri.removeprefix("file://"))
        base = os.path.realpath(root.removeprefix("file://"))
        return path == base or path.startswith(base.rstrip(os.sep) + os.sep)
    scheme, _, rest = uri.partition("://")
    root_scheme, _, root_rest = root.partition("://")
    if ".." in rest.split("/") or scheme != root_scheme:
        return False
    path, base = posixpath.normpath(rest), posixpath.normpath(root_rest)
    return path == base or path.startswith(base.rstrip("/") + "/")


def sources(plan: Plan, spec: DatasetJobRequest, settings: Settings) -> tuple[list, int, int]:
    """(the job's inputs in the plan's argument order, rows N, columns M). Blocking: reads metadata."""
    names = [arg.name for arg in plan.args]
    missing, unknown = set(names) - set(spec.inputs), set(spec.inputs) - set(names)
    if missing or unknown:
        raise ArgumentError(f"inputs: {', '.join(sorted(missing))} missing; {', '.join(sorted(unknown))} unknown "
                            f"(the formula takes {', '.join(names)})" if missing and unknown else
                            f"no input for {', '.join(sorted(missing))}" if missing else
                            f"inputs {', '.join(sorted(unknown))} are not in the aliases")
    check_uri(spec.output, settings, "output")
    out, rows, dtype, budget = [], None, None, settings.max_body_bytes
    for arg in plan.args:
        source = spec.inputs[arg.name]
        if isinstance(source, list):
            out.append(source)
            continue
        if not isinstance(source, DatasetSource):
            raise ArgumentError(f"{arg.name}: give a dataset (uri, columns) or inline numbers")
        dataset = Dataset(check_uri(source.uri, settings, f"input {arg.name}"),
                          tuple(source.columns) if source.columns else None)
        reader = row_reader(dataset, arg.name, arg.dim, dtype)
        dtype, size = dtype or reader.dtype, reader.pieces[-1].stop if reader.pieces else 0
        if arg.role == ROWS:
            rows = size if rows is None else rows
            out.append(dataset)
            continue
        budget -= size * arg.dim * np.dtype(reader.dtype).itemsize
        if budget < 0:
            raise ApiError(413, "too_large", f"{arg.name}: the inputs reduced over are read whole by the server; "
                                             f"together they exceed max_body_bytes ({settings.max_body_bytes})")
        out.append(reader.read(0, size))
    dtype = np.dtype(dtype or np.float64)
    out = [np.asarray(s, dtype) if isinstance(s, list) else s for s in out]
    # the arrays' checks (dims, dtypes, K <= M), with a one-row stand-in for each dataset
    _, _, _, cols = plan.check_args([np.zeros((1, a.dim), dtype) if isinstance(s, Dataset) else s
                                     for s, a in zip(out, plan.args)])
    return out, rows or 0, cols
