"""Array files: what kred reads inputs from and writes results to (.npy, .npz, Parquet, Arrow IPC).

One module for every reader of files (job files, the `kred reduce` command, the workers of dataset jobs) with its
error type. pyarrow is imported only when a table is read or written.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import ArgumentError
from .plan import Plan

INPUT_SUFFIXES = (".npy", ".parquet", ".arrow", ".feather", ".ipc")
OUTPUT_SUFFIXES = (".npy", ".npz", ".parquet", ".arrow")


class FileError(ArgumentError):
    """A file is unreadable, or not what it must be (a job file, or an array file it or a command names)."""


def read_array(path: Path, columns: list[str] | None = None, name: str = "input") -> np.ndarray:
    """A 2D array from .npy, or from a table (.parquet, Arrow IPC file or stream) with one column per component."""
    suffix = path.suffix
    if suffix not in INPUT_SUFFIXES:
        raise FileError(f"{name}: {path} must end in {', '.join(INPUT_SUFFIXES)}")
    try:
        if suffix == ".npy":
            if columns is not None:
                raise FileError(f"{name}: `columns` applies to tables, not to {path}")
            return np.load(path, allow_pickle=False)
        return table_to_array(read_table(path, columns), name, path)
    except OSError as e:
        raise FileError(f"{name}: cannot read {path}: {e}") from None
    except FileError:
        raise
    except Exception as e:                  # pyarrow and numpy report malformed files with many types
        raise FileError(f"{name}: {path} is not a readable {suffix} file ({e})") from None


def read_table(path: Path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    else:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:                   # not the file format: try the stream format
                source.seek(0)
                table = pa.ipc.open_stream(source).read_all()
    if columns is not None:
        absent = [c for c in columns if c not in table.column_names]
        if absent:
            raise FileError(f"{path} has no column {', '.join(absent)} (it has {', '.join(table.column_names)})")
        table = table.select(columns)
    return table


def table_to_array(table, name: str, path: Path) -> np.ndarray:
    import pyarrow as pa
    if table.num_columns == 0:
        raise FileError(f"{name}: {path} has no columns")
    if table.num_columns == 1 and pa.types.is_fixed_size_list(table.schema.field(0).type):
        column = table.column(0).combine_chunks()
        if column.null_count:
            raise FileError(f"{name}: column {table.column_names[0]} of {path} has missing values")
        return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    parts = []
    for column_name, column in zip(table.column_names, table.columns):
        if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
            raise FileError(f"{name}: column {column_name} of {path} is {column.type}, not a number")
        if column.null_count:
            raise FileError(f"{name}: column {column_name} of {path} has missing values")
        parts.append(column.to_numpy())
    return np.column_stack(parts)


def write_output(result, plan: Plan, path: Path) -> None:
    """Write the result atomically (a reader never sees half a file)."""
    results = result if isinstance(result, tuple) else (result,)
    kinds = [kind for kind, _ in plan.reduction.outputs]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        if path.suffix == ".npy":
            np.save(tmp, results[0])
        elif path.suffix == ".npz":
            np.savez(tmp, **dict(zip(kinds, results)))
        else:
            _write_table(tmp, path.suffix, kinds, results)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_table(tmp: str, suffix: str, kinds, results) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = {f"{kind}_{k}": array[:, k] for kind, array in zip(kinds, results) for k in range(array.shape[1])}
    table = pa.table(columns)
    if suffix == ".parquet":
        pq.write_table(table, tmp)
    else:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
