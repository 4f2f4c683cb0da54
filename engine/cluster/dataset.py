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
Paths are local paths, globs, or any pyarrow filesystem URI (`s3://`, `gs://`, `file://`).
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
class Dataset:
    """A Parquet dataset input: a file, a directory of files, a glob or a filesystem URI; `columns` picks and
    orders the numeric columns (default: all), or names one fixed-size-list column."""
    uri: str
    columns: tuple[str, ...] | None = None


def filesystem(uri: str):
    """(pyarrow filesystem, path in it) for a URI or a local path."""
    import pyarrow.fs as pafs
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as e:     # noqa: BLE001 - pyarrow raises several types for unknown schemes
            raise DatasetError(f"cannot open {uri}: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def files(source: Dataset) -> tuple[object, list[str]]:
    """(filesystem, the dataset's Parquet files in path order)."""
    import pyarrow.fs as pafs
    fs, path = filesystem(source.uri)
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
            with self.fs.open_input_file(piece.path) as f:
                table = pq.ParquetFile(f).read_row_group(piece.row_group, columns=list(self.columns or []) or None)
            array = table_to_array(table, self.name, piece.path)
            parts.append(array[max(r0, piece.start) - piece.start:min(r1, piece.stop) - piece.start])
        if not parts:
            return np.empty((0, 0), self.dtype)
        return np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0], dtype=self.dtype)


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


def write_part(out: str, block: int, result, plan: Plan) -> None:
    """Write one row block's finished result as `part-NNNNNN.parquet`, atomically (temporary name, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    fs, folder = filesystem(out)
    results = result if isinstance(result, tuple) else (result,)
    columns = {f"{kind}_{k}": array[:, k] for (kind, _), array in zip(plan.reduction.outputs, results)
               for k in range(array.shape[1])}
    final = f"{folder.rstrip('/')}/{part_name(block)}"
    tmp = f"{folder.rstrip('/')}/.{part_name(block)}.{os.getpid()}.tmp"
    with fs.open_output_stream(tmp) as sink:
        pq.write_table(pa.table(columns), sink)
    fs.move(tmp, final)


class Output:
    """The output folder of a dataset job: its manifest and the blocks already written."""

    def __init__(self, uri: str, job: dict):
        import pyarrow.fs as pafs
        self.uri, self.job = uri, json.loads(json.dumps(job))      # as the manifest holds it (lists, not tuples)
        job = self.job
        self.fs, self.folder = filesystem(uri)
        self.folder = self.folder.rstrip("/")
        self.fs.create_dir(self.folder, recursive=True)
        manifest = self._read_manifest()
        infos = self.fs.get_file_info(pafs.FileSelector(self.folder))
        names = {os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File}
        if manifest is not None and manifest["job"] != job:
            raise DatasetError(f"{uri} holds the output of another job (its {MANIFEST} differs): "
                               "write to an empty folder")
        if manifest is None and any(n.startswith("part-") for n in names):
            raise DatasetError(f"{uri} holds part files but no {MANIFEST}: write to an empty folder")
        self.written = {b for b in range(len(job["blocks"])) if part_name(b) in names}
        self._write_manifest(complete=False)

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
