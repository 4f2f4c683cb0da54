"""Out-of-core jobs: the row-side inputs are Parquet datasets that each worker reads its own row groups of, and the
output is a Parquet dataset the workers write, one file per row block in input row order.

The driver reads only metadata (row-group sizes), so it never holds an input or output array whole. Row blocks are
the row groups of the first row-side dataset. Column-side inputs (the variables reduced over) may be datasets too:
then column blocks are the row groups of the first of them, each worker reads the column blocks itself and keeps
them in its block cache, and a row block is reduced over the column blocks in order (a worker holds one row block
and the column blocks its cache budget allows, never a whole input). Column-side arrays and parameters are put in
the object store once, cut along the same column blocks.
Each block's file is written under a temporary name and renamed, so a file that exists is complete; a manifest
records the job, so running the same job into the same folder again computes only the blocks that are missing.
Paths are local paths, globs, or any pyarrow filesystem URI (`s3://`, `gs://`, `file://`), for the callers this
process trusts (job files, `Cluster.submit_dataset`). A server hands in `Location`s instead: a filesystem object and a
path in it, built inside its sandbox (`service/datasets.py`: a root's `SubTreeFileSystem`, or `confined` for a local
root, which re-checks every path it opens after resolving symlinks, in whichever process opens it). Readers and
writers open only the Location they were given; a client's text is never parsed again on the way to a worker.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ArgumentError
from ..io import table_to_array
from ..plan import ROWS, Plan
from .sharding import Shard

MANIFEST = "_kred_manifest.json"


class DatasetError(ArgumentError):
    """A dataset input or output that cannot be used as asked."""


@dataclass(frozen=True)
class Location:
    """What a dataset job opens: a pyarrow filesystem and a path in it (picklable: it travels to the workers).
    `uri` is what the caller called it, for messages, manifests and the job's result; it is never opened."""
    fs: object
    path: str
    uri: str

    @classmethod
    def of(cls, uri: str) -> "Location":
        """A trusted caller's URI or local path (pyarrow parses it: options in its query string apply)."""
        import pyarrow.fs as pafs
        if "://" in uri:
            try:
                fs, path = pafs.FileSystem.from_uri(uri)
            except Exception as e:     # noqa: BLE001 - pyarrow raises several types for unknown schemes
                raise DatasetError(f"cannot open {uri}: {e}") from None
            return cls(fs, path, uri)
        return cls(pafs.LocalFileSystem(), os.path.abspath(uri), uri)


@dataclass(frozen=True)
class Dataset:
    """A Parquet dataset input: a file, a directory of files, a glob or a filesystem URI; `columns` picks and
    orders the numeric columns (default: all), or names one fixed-size-list column. `location`, when given, is
    what is opened (a server's sandboxed one); `uri` then only names it."""
    uri: str
    columns: tuple[str, ...] | None = None
    location: Location | None = None

    def locate(self) -> Location:
        return self.location or Location.of(self.uri)


MAX_FILES = 100_000         # a dataset listing longer than this is refused (a folder is not a file system walk)


def files(source: Dataset) -> tuple[object, list[str]]:
    """(filesystem, the dataset's Parquet files in path order)."""
    import pyarrow.fs as pafs
    location = source.locate()
    fs, path = location.fs, location.path
    try:
        if any(c in path for c in "*?["):
            base = path[:min(path.index(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            found = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise DatasetError(f"{source.uri} does not exist")
            if info.type == pafs.FileType.File:
                found = [path]
            else:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                found = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                         and not os.path.basename(i.path).startswith(("_", "."))]
    except OSError as e:
        raise DatasetError(f"cannot list {source.uri}: {e}") from None
    if len(found) > MAX_FILES:
        raise DatasetError(f"{source.uri} holds more than {MAX_FILES} Parquet files")
    if not found:
        raise DatasetError(f"{source.uri} holds no Parquet file")
    return fs, sorted(found)


@dataclass(frozen=True)
class Piece:
    path: str
    row_group: int
    start: int          # global row of its first row
    stop: int


@dataclass(frozen=True)
class RowReader:
    """Reads global rows [r0, r1) of one dataset from the row groups that hold them (picklable, for the workers)."""
    name: str
    fs: object
    pieces: tuple[Piece, ...]
    columns: tuple[str, ...] | None
    dtype: str

    @property
    def rows(self) -> int:
        return self.pieces[-1].stop if self.pieces else 0

    @property
    def key(self) -> str:
        """Names this dataset's content as listed (files, row groups, columns, dtype), for the workers' caches."""
        return "dataset-" + hashlib.sha256(repr((self.pieces, self.columns, self.dtype)).encode()).hexdigest()[:24]

    def block_key(self, r0: int, r1: int) -> str:
        """The cache key of rows [r0, r1) of this dataset."""
        return f"{self.key}:{r0}:{r1}"

    def read(self, r0: int, r1: int) -> np.ndarray:
        import pyarrow.parquet as pq

        parts = []
        for piece in self.pieces:
            if piece.stop <= r0 or piece.start >= r1:
                continue
            with open_on_worker(self.fs, piece.path, self.name) as f:
                table = pq.ParquetFile(f).read_row_group(piece.row_group, columns=list(self.columns or []) or None)
            array = table_to_array(table, self.name, piece.path)
            parts.append(array[max(r0, piece.start) - piece.start:min(r1, piece.stop) - piece.start])
        if not parts:
            return np.empty((0, 0), self.dtype)
        return np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0], dtype=self.dtype)


def open_on_worker(fs, path: str, name: str):
    """`fs.open_input_file(path)`, with an error that says why when this process cannot see a file the driver
    listed (a `file://` dataset on one host's disk: every worker must see the same storage)."""
    try:
        return fs.open_input_file(path)
    except FileNotFoundError:
        raise DatasetError(f"{name}: {path} was listed when the job was submitted but this cluster worker ({where()}) "
                           "cannot see it: the workers cannot read this dataset. Put the datasets of a "
                           "multi-host cluster on storage every worker reads (an s3:// root, or a filesystem "
                           "shared by all hosts at the same path)") from None


def where() -> str:
    import socket
    return f"host {socket.gethostname()}, pid {os.getpid()}"


def row_reader(source: Dataset, name: str, dim: int, dtype=None) -> RowReader:
    """The reader of `source` after checking its columns against the alias (`dim` components) from metadata only."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    fs, paths = files(source)
    pieces, start, schema = [], 0, None
    for path in paths:
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f)
                schema = schema or meta.schema_arrow
                for k in range(meta.metadata.num_row_groups):
                    rows = meta.metadata.row_group(k).num_rows
                    pieces.append(Piece(path, k, start, start + rows))
                    start += rows
        except Exception as e:      # noqa: BLE001 - pyarrow reports unreadable files with many types
            raise DatasetError(f"{name}: {path} is not a readable Parquet file ({e})") from None
    fields = [schema.field(c) for c in source.columns] if source.columns else list(schema)
    if source.columns and any(c not in schema.names for c in source.columns):
        absent = [c for c in source.columns if c not in schema.names]
        raise DatasetError(f"{name}: {source.uri} has no column {', '.join(absent)}")
    width = fields[0].type.list_size if len(fields) == 1 and pa.types.is_fixed_size_list(fields[0].type) \
        else len(fields)
    if width != dim:
        raise DatasetError(f"{name}: {source.uri} has {width} components per row, the alias says {dim}")
    kind = fields[0].type.value_type if pa.types.is_fixed_size_list(fields[0].type) else fields[0].type
    dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.float64 if kind.bit_width == 64 else np.float32)
    return RowReader(name, fs, tuple(pieces), source.columns, dtype.str)


def row_blocks(reader: RowReader) -> list[tuple[int, int]]:
    return [(p.start, p.stop) for p in reader.pieces if p.stop > p.start]


def check_rows(plan: Plan, readers: dict[int, RowReader], arrays: dict[int, np.ndarray]) -> int:
    sizes = {readers[k].name: readers[k].rows for k in readers}
    sizes |= {plan.args[k].name: len(a) for k, a in arrays.items() if plan.args[k].role == ROWS}
    if len(set(sizes.values())) > 1:
        raise DatasetError("row-side inputs differ in length: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return next(iter(sizes.values()))


# The output dataset ---------------------------------------------------------------------------------------

def part_name(block: int) -> str:
    return f"part-{block:06d}.parquet"


def part_budget(plan: Plan, rows: int, dtype) -> int:
    """The most bytes the Parquet file of a row block of `rows` rows may take: its raw columns (values in `dtype`,
    indices int64; written plain, without dictionaries) with half more and 64 KiB per file (and 256 bytes per
    column) for Parquet's pages and footer. The same figure bounds a job's output before it starts (summed over its
    blocks) and each file as it is written."""
    width = sum(dim * (8 if kind == "index" else np.dtype(dtype).itemsize) for kind, dim in plan.reduction.outputs)
    return rows * width * 3 // 2 + (64 << 10) + 256 * sum(dim for _, dim in plan.reduction.outputs)


def output_budget(plan: Plan, blocks: list[tuple[int, int]], dtype) -> int:
    """Bytes the output of a job with these row blocks may write at most (files; the manifest is a few kB)."""
    return sum(part_budget(plan, r1 - r0, dtype) for r0, r1 in blocks)


def shard_budget(plan: Plan, block_rows: int, row_dims: int, col_rows: int, col_dims: int, dtype) -> int:
    """Bytes a worker holds for one shard of a dataset job: the block's rows of the row-side inputs, one column
    block of the column-side datasets, two reduction states (the running one and the next column block's, merged
    as they come) and the finished output."""
    itemsize = np.dtype(dtype).itemsize
    state = sum(part.nbytes for part in plan.reduction.identity(1, np.dtype(dtype), plan.acc_dtype(np.dtype(dtype))))
    out = sum(dim * (8 if kind == "index" else itemsize) for kind, dim in plan.reduction.outputs)
    return block_rows * (row_dims * itemsize + 2 * state + out) + col_rows * col_dims * itemsize


def write_part(out: Location, block: int, result, plan: Plan, max_bytes: int | None = None) -> None:
    """Write one row block's finished result as `part-NNNNNN.parquet`, atomically (temporary name, then rename).
    The file is made in memory first and refused past `max_bytes` (default: the block's `part_budget`, its share
    of the budget the job was admitted with)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    fs, folder = out.fs, out.path.rstrip("/")
    results = result if isinstance(result, tuple) else (result,)
    columns = {f"{kind}_{k}": array[:, k] for (kind, _), array in zip(plan.reduction.outputs, results)
               for k in range(array.shape[1])}
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), buffer, use_dictionary=False)
    data = buffer.getvalue()
    value = next((a for (kind, _), a in zip(plan.reduction.outputs, results) if kind == "value"), results[0])
    max_bytes = part_budget(plan, len(results[0]), value.dtype) if max_bytes is None else max_bytes
    if data.size > max_bytes:
        raise DatasetError(f"block {block} of {out.uri} would write {data.size} bytes, past its output budget "
                           f"of {max_bytes} bytes")
    final = f"{folder}/{part_name(block)}"
    tmp = f"{folder}/.{part_name(block)}.{os.getpid()}.tmp"
    try:
        with fs.open_output_stream(tmp) as sink:
            sink.write(data)
        fs.move(tmp, final)
    except FileNotFoundError:
        raise DatasetError(f"{out.uri}: the output folder, made when the job was submitted, is not visible to "
                           f"this cluster worker ({where()}): the workers cannot write this dataset. Put the "
                           "outputs of a multi-host cluster on storage every worker reads") from None


class Output:
    """The output folder of a dataset job: its manifest and the blocks already written."""

    def __init__(self, target: str | Location, job: dict):
        import pyarrow.fs as pafs
        self.location = target if isinstance(target, Location) else Location.of(target)
        uri = self.uri = self.location.uri
        self.job = json.loads(json.dumps(job))      # as the manifest holds it (lists, not tuples)
        job = self.job
        self.fs, self.folder = self.location.fs, self.location.path.rstrip("/")
        if not self.folder:
            raise DatasetError(f"{uri}: an output is a folder of its own, not the root of a filesystem")
        try:
            self.fs.create_dir(self.folder, recursive=True)
            manifest = self._read_manifest()
            infos = self.fs.get_file_info(pafs.FileSelector(self.folder))
        except OSError as e:            # a file in the way, no permission, an unreachable store
            raise DatasetError(f"cannot write the output {uri}: {e}") from None
        names = {os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File}
        if manifest is not None and manifest["job"] != job:
            raise DatasetError(f"{uri} holds the output of another job (its {MANIFEST} differs): "
                               "write to an empty folder")
        if manifest is None and any(n.startswith("part-") for n in names):
            raise DatasetError(f"{uri} holds part files but no {MANIFEST}: write to an empty folder")
        self.written = {b for b in range(len(job["blocks"])) if part_name(b) in names}
        try:
            self._write_manifest(complete=False)
        except OSError as e:
            raise DatasetError(f"cannot write the output {uri}: {e}") from None

    def _read_manifest(self):
        try:
            with self.fs.open_input_stream(f"{self.folder}/{MANIFEST}") as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError):
            return None

    def _write_manifest(self, complete: bool) -> None:
        tmp = f"{self.folder}/.{MANIFEST}.{os.getpid()}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps({"job": self.job, "complete": complete}, indent=1).encode())
        self.fs.move(tmp, f"{self.folder}/{MANIFEST}")

    def finish(self) -> None:
        self._write_manifest(complete=True)


def dataset_shards(blocks: list[tuple[int, int]], columns: tuple[tuple[int, int], ...], skip: set[int]) -> list[Shard]:
    """One shard per row block not yet written, over every column block in order (its index is the block's, for
    the file name)."""
    return [Shard(b, b, 0, rows, columns) for b, rows in enumerate(blocks) if b not in skip]
