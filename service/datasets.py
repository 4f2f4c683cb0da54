"""Dataset jobs in the service: every URI a client names is resolved once, inside the server's `dataset_roots`,
into a `Location` (a sandboxed filesystem and a path in it) before anything is opened; only that Location reaches the
cluster's workers. Then the URIs become the engine's inputs: `engine.cluster.Dataset`s for the row- and column-side
variables (the workers read them, block by block), arrays for the parameters (a few numbers, read here within
`max_body_bytes`), and the job's output and shard budgets are checked before it is stored.

Resolution (`resolve`): a client URI has no query string or fragment (filesystem options, endpoints, credentials and
schemes come only from the server's configuration: its roots and the AWS_* environment), is percent-decoded when it
is a URI (as pyarrow would), has no `..` segment, and lies under a root of its own scheme. A local root is opened as
`engine.cluster.confined` (every open re-resolves symlinks and refuses a path that leaves the root), a remote one as a
`SubTreeFileSystem` over the root's filesystem, built from the operator's root URI. Anything outside gets one 403
text, whether or not something exists there, before the filesystem is touched.
"""
from __future__ import annotations

import functools
import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import unquote

import numpy as np

from kred.engine.cluster.confined import confined
from kred.engine.cluster.dataset import Dataset, Location, output_budget, row_blocks, row_reader, shard_budget
from kred.engine.errors import ArgumentError
from kred.engine.plan import COLS, ROWS, Plan

from .errors import ApiError
from .schemas import DatasetJobRequest, DatasetSource
from .settings import Settings

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def resolve(uri: str, settings: Settings, what: str) -> Location:
    """The Location of a client's dataset URI under one of the server's roots; a 403/422 naming why otherwise."""
    if not settings.dataset_roots:
        raise ApiError(403, "datasets_off", "this server runs no dataset jobs (set KRED_DATASET_ROOTS to the "
                                            "folders or URI prefixes it may read and write)")
    denied = ApiError(403, "dataset_denied", f"{what} is outside the server's dataset roots")
    if any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise ApiError(422, "invalid_dataset_uri", f"{what}: a dataset URI has no control characters")
    scheme, path = _split(uri, what)
    segments = path.split("/")
    if ".." in segments or "\0" in path:
        raise denied
    for root in settings.dataset_roots:
        root_scheme, root_path = _split_root(root)
        if root_scheme != scheme:
            continue
        if scheme == "file":
            location = _local(uri, path, root_path)
        else:
            location = _remote(uri, path, root, root_path)
        if location is not None:
            return location
    raise denied


def _split(uri: str, what: str) -> tuple[str, str]:
    """(scheme, path) of a client URI: "file" for a local path; a URI's path percent-decoded, dot segments and
    empty segments dropped."""
    match = SCHEME.match(uri)
    if match is None:                                 # a plain path: opened as written, never decoded
        if not uri.startswith("/"):
            return "file", "/.."                      # relative: under no root (refused as outside)
        return "file", posixpath.normpath(uri) if ".." not in uri.split("/") else uri
    if "?" in uri or "#" in uri:
        raise ApiError(422, "invalid_dataset_uri",
                       f"{what}: dataset URIs take no query string or fragment (filesystem options, endpoints, "
                       "credentials and schemes come only from the server's configuration)")
    scheme, rest = match.group(1).lower(), uri[match.end():]
    if scheme == "file":
        if not rest.startswith(("/", "localhost/")):
            raise ApiError(422, "invalid_dataset_uri", f"{what}: a file URI names no host (file:///path)")
        rest = rest.removeprefix("localhost")
    try:
        decoded = unquote(rest, errors="strict") if "%" in rest else rest
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_dataset_uri", f"{what}: its percent-escapes are not UTF-8") from None
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded):
        raise ApiError(422, "invalid_dataset_uri", f"{what}: a dataset URI has no control characters")
    parts = [p for p in decoded.split("/") if p not in ("", ".")]
    return scheme, ("/" if scheme == "file" else "") + "/".join(parts) if ".." not in parts else "/.."


def _split_root(root: str) -> tuple[str, str]:
    match = SCHEME.match(root)
    if match is None:
        return "file", os.path.abspath(root)
    scheme, rest = match.group(1).lower(), root[match.end():].split("?", 1)[0]
    if scheme == "file":
        return "file", os.path.abspath(unquote(rest.removeprefix("localhost")))
    return scheme, "/".join(p for p in unquote(rest).split("/") if p)


def _under(path: str, base: str) -> str | None:
    """`path` relative to `base` when it lies under it (both normalised), else None."""
    base = base.rstrip("/")
    if path == base:
        return ""
    if path.startswith(base + "/"):
        return path[len(base) + 1:]
    return None


def _local(uri: str, path: str, root: str) -> Location | None:
    real_root = os.path.realpath(root)
    relative = _under(path, root)
    if relative is None:
        relative = _under(path, real_root)
    if relative is None:
        return None
    fs = confined(real_root)
    try:
        fs.handler.real(relative)          # symlinks resolved: still inside?
    except PermissionError:
        return None
    return Location(fs, relative, uri)


def _remote(uri: str, path: str, root: str, root_path: str) -> Location | None:
    import pyarrow.fs as pafs
    relative = _under(path, root_path)
    if relative is None:
        return None
    fs, base = _root_filesystem(root)
    return Location(pafs.SubTreeFileSystem(base, fs), relative, uri)


@functools.lru_cache(maxsize=64)
def _root_filesystem(root: str):
    """(filesystem, base path) of an operator's remote root, made once per process. The root is trusted text: its
    query string (e.g. `?endpoint_override=...`) and the AWS_* environment configure it."""
    import pyarrow.fs as pafs
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if root.lower().startswith("s3://") and region and "region=" not in root:
        # pyarrow otherwise asks the bucket for its region (a request) before anything else
        root += ("&" if "?" in root else "?") + f"region={region}"
    try:
        return pafs.FileSystem.from_uri(root)
    except Exception as e:     # noqa: BLE001 - pyarrow raises several types
        raise ApiError(503, "dataset_root", f"the server's dataset root {root} cannot be opened: {e}") from None


@dataclass
class Sources:
    """A dataset job's inputs (in the plan's argument order), sizes, output and budgets."""
    inputs: list
    rows: int
    cols: int
    output: Location
    output_bytes: int          # the most its output files may take (engine.cluster.dataset.output_budget)
    shard_bytes: int           # what a worker holds for its largest shard


def sources(plan: Plan, spec: DatasetJobRequest, settings: Settings) -> Sources:
    """Resolve and check a dataset job's URIs and sizes (blocking: reads metadata). 403 outside the roots; 413
    past the server's output or shard budget."""
    names = [arg.name for arg in plan.args]
    missing, unknown = set(names) - set(spec.inputs), set(spec.inputs) - set(names)
    if missing or unknown:
        raise ArgumentError(f"inputs: {', '.join(sorted(missing))} missing; {', '.join(sorted(unknown))} unknown "
                            f"(the formula takes {', '.join(names)})" if missing and unknown else
                            f"no input for {', '.join(sorted(missing))}" if missing else
                            f"inputs {', '.join(sorted(unknown))} are not in the aliases")
    output = resolve(spec.output, settings, "output")
    if not output.path.strip("/"):
        raise ApiError(422, "invalid_dataset_uri", "output: a dataset job writes a folder under a dataset root, "
                                                   "not the root itself")
    locations = {arg.name: resolve(source.uri, settings, f"input {arg.name}") for arg in plan.args
                 if isinstance(source := spec.inputs[arg.name], DatasetSource)}
    out, rows, dtype, budget = [], None, None, settings.max_body_bytes
    readers = {}
    for k, arg in enumerate(plan.args):
        source = spec.inputs[arg.name]
        if isinstance(source, list):
            out.append(source)
            continue
        if not isinstance(source, DatasetSource):
            raise ArgumentError(f"{arg.name}: give a dataset (uri, columns) or inline numbers")
        dataset = Dataset(source.uri, tuple(source.columns) if source.columns else None, locations[arg.name])
        reader = readers[k] = row_reader(dataset, arg.name, arg.dim, dtype)
        dtype, size = dtype or reader.dtype, reader.rows
        if arg.role == ROWS:
            rows = size if rows is None else rows
            out.append(dataset)
            continue
        if arg.role == COLS:
            out.append(dataset)
            continue
        budget -= size * arg.dim * np.dtype(reader.dtype).itemsize
        if budget < 0:
            raise ApiError(413, "too_large", f"{arg.name}: the parameters are read whole by the server; "
                                             f"together they exceed max_body_bytes ({settings.max_body_bytes})")
        out.append(reader.read(0, size))
    dtype = np.dtype(dtype or np.float64)
    out = [np.asarray(s, dtype) if isinstance(s, list) else s for s in out]
    # the arrays' checks (dims, dtypes, K <= M), with a stand-in for each dataset: one row, or the column count
    stand_ins = [np.zeros((readers[k].rows if a.role == COLS else 1, a.dim), dtype) if isinstance(s, Dataset) else s
                 for k, (s, a) in enumerate(zip(out, plan.args))]
    _, _, _, cols = plan.check_args(stand_ins)
    row_side = [k for k, a in enumerate(plan.args) if a.role == ROWS and k in readers]
    col_side = [k for k, a in enumerate(plan.args) if a.role == COLS and k in readers]
    blocks = row_blocks(readers[row_side[0]]) if row_side else []
    col_blocks = row_blocks(readers[col_side[0]]) if col_side else [(0, cols)]
    output_bytes = output_budget(plan, blocks, dtype)
    shard = shard_budget(plan, max((b - a for a, b in blocks), default=0),
                         sum(plan.args[k].dim for k in row_side), max((b - a for a, b in col_blocks), default=0),
                         sum(plan.args[k].dim for k in col_side), dtype)
    if shard > settings.max_shard_bytes:
        raise ApiError(413, "too_large", f"one shard of this job would hold {shard} bytes on a worker, past "
                                         f"max_shard_bytes ({settings.max_shard_bytes}): write the datasets with "
                                         "smaller row groups (a shard is one row group of the row-side input, "
                                         "reduced over one row group of the column-side one at a time)")
    return Sources(out, rows or 0, cols, output, output_bytes, shard)
