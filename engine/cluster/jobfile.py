"""Batch jobs from a YAML file (`kred run JOB.yaml`): read the inputs, run on a cluster, write the output.

    formula: Exp(-SqDist(x, y)) * b
    aliases: [x = Vi(3), y = Vj(3), b = Vj(1)]
    inputs:                      # one entry per alias; paths are relative to this file
      x: points.npy              # .npy: the array itself
      y: {path: centers.parquet, columns: [u, v, w]}    # .parquet / .arrow: one numeric column per component
      b: weights.arrow           # (or a single fixed-size-list column), all columns when `columns` is left out
    reduction_op: Sum            # optional: opt_arg (K), formula2, axis (default 0), dtype, dtype_acc
    axis: 1
    output: result.npy           # .npy, .npz, .parquet or .arrow
    cluster: {address: ray://head:10001, device: auto, workers: null, threads: null, backend: auto}

Parameters (Pm) may also be given inline as a list of numbers.

Out of core: an input may be a Parquet dataset (a folder, a glob such as `x/*.parquet`, or any pyarrow filesystem
URI: `s3://bucket/x/`, `file:///data/x/`), and an `output` ending in `/` is a Parquet dataset written by the
workers, one file per row group of the row-side input, in row order (see `dataset.py`); then the row-side inputs
must be Parquet, the workers read them (and the column-side inputs given as Parquet, block by block), and the driver
never holds them or the output. Running the same job again
into the same output folder computes only the blocks that are missing.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal, Union

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from ..errors import ArgumentError
from ..plan import COLS, ROWS, Plan
from ..spec_schema import spec_model
from .dataset import Dataset, row_reader

INPUT_SUFFIXES = (".npy", ".parquet", ".arrow", ".feather", ".ipc")
OUTPUT_SUFFIXES = (".npy", ".npz", ".parquet", ".arrow")


class JobFileError(ArgumentError):
    """The job file is unreadable, invalid, or names inputs that do not fit the formula."""


class InputFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    columns: list[str] | None = None      # table columns to use, in order (default: all)


class ClusterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    device: Literal["auto", "gpu", "cpu"] = "auto"
    workers: int | None = Field(default=None, ge=1)
    threads: int | None = Field(default=None, ge=1)
    backend: str = "auto"


# A job file: Spec's fields (`reduction_op`, also spelled `reduction` as older job files do), its inputs and output
JobSpec = spec_model(
    "JobSpec", exclude=("ranges",),
    limits={"reduction_op": Field(validation_alias=AliasChoices("reduction_op", "reduction"))},
    inputs=(dict[str, Union[str, InputFile, list[float]]], ...),
    dtype=(Literal["float32", "float64"] | None, None),      # cast every input (default: as stored)
    output=(str, ...),
    cluster=(ClusterSettings, ClusterSettings()))


def load_job(path) -> tuple[JobSpec, Plan, Path]:
    """Parse and validate the job file; returns (spec, plan, folder that relative paths start from)."""
    import yaml
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise JobFileError(f"cannot read job file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise JobFileError(f"{path} is not valid YAML: {e}") from None
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'job'}: {err['msg']}" for err in e.errors())
        raise JobFileError(f"{path}: {problems}") from None
    plan = spec.spec.plan()
    names = [arg.name for arg in plan.args]
    missing, unknown = set(names) - set(spec.inputs), set(spec.inputs) - set(names)
    if missing or unknown:
        parts = ([f"no input for {', '.join(sorted(missing))}"] if missing else []) + \
                ([f"inputs {', '.join(sorted(unknown))} are not in the aliases"] if unknown else [])
        raise JobFileError(f"{path}: {'; '.join(parts)} (the formula takes {', '.join(names)})")
    suffix = Path(spec.output).suffix
    if is_dataset_output(spec.output):
        return spec, plan, path.parent
    if suffix not in OUTPUT_SUFFIXES:
        raise JobFileError(f"{path}: output {spec.output!r} must end in {', '.join(OUTPUT_SUFFIXES)} "
                           "(or in / for a Parquet dataset)")
    if suffix == ".npy" and len(plan.reduction.outputs) > 1:
        raise JobFileError(f"{path}: {spec.spec.reduction_op} returns values and indices, which one .npy cannot hold; "
                           "write .npz, .parquet or .arrow")
    return spec, plan, path.parent


def load_inputs(spec: JobSpec, plan: Plan, folder: Path, skip=frozenset(), inline_dtype=None) -> list[np.ndarray]:
    """The arrays in the plan's argument order (None for the names in `skip`, whose dtype is `inline_dtype`)."""
    arrays = {}
    for arg in plan.args:
        source = spec.inputs[arg.name]
        if arg.name in skip:
            arrays[arg.name] = None
        elif not isinstance(source, list):
            source = source if isinstance(source, InputFile) else InputFile(path=source)
            if is_dataset(source.path, folder):
                reader = row_reader(Dataset(locate(source.path, folder), _columns(source)), arg.name, arg.dim)
                arrays[arg.name] = reader.read(0, reader.pieces[-1].stop if reader.pieces else 0)
            else:
                arrays[arg.name] = read_array(folder / source.path, source.columns, arg.name)
    # inline numbers take the dtype of the files (or of `dtype:`), so that they never cause a mismatch
    dtype = spec.dtype or next((a.dtype for a in arrays.values() if a is not None), inline_dtype or np.float64)
    for arg in plan.args:
        if isinstance(spec.inputs[arg.name], list) and arg.name not in skip:
            arrays[arg.name] = np.asarray(spec.inputs[arg.name], dtype=dtype)
    return [arrays[arg.name].astype(spec.dtype) if spec.dtype and arrays[arg.name] is not None
            else arrays[arg.name] for arg in plan.args]


def read_array(path: Path, columns: list[str] | None = None, name: str = "input") -> np.ndarray:
    """A 2D array from .npy, or from a table (.parquet, Arrow IPC file or stream) with one column per component."""
    suffix = path.suffix
    if suffix not in INPUT_SUFFIXES:
        raise JobFileError(f"{name}: {path} must end in {', '.join(INPUT_SUFFIXES)}")
    try:
        if suffix == ".npy":
            if columns is not None:
                raise JobFileError(f"{name}: `columns` applies to tables, not to {path}")
            return np.load(path, allow_pickle=False)
        return _table_to_array(_read_table(path, columns), name, path)
    except OSError as e:
        raise JobFileError(f"{name}: cannot read {path}: {e}") from None
    except JobFileError:
        raise
    except Exception as e:                  # pyarrow and numpy report malformed files with many types
        raise JobFileError(f"{name}: {path} is not a readable {suffix} file ({e})") from None


def _read_table(path: Path, columns):
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
            raise JobFileError(f"{path} has no column {', '.join(absent)} (it has {', '.join(table.column_names)})")
        table = table.select(columns)
    return table


def _table_to_array(table, name: str, path: Path) -> np.ndarray:
    import pyarrow as pa
    if table.num_columns == 0:
        raise JobFileError(f"{name}: {path} has no columns")
    if table.num_columns == 1 and pa.types.is_fixed_size_list(table.schema.field(0).type):
        column = table.column(0).combine_chunks()
        if column.null_count:
            raise JobFileError(f"{name}: column {table.column_names[0]} of {path} has missing values")
        return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    parts = []
    for column_name, column in zip(table.column_names, table.columns):
        if not (pa.types.is_floating(column.type) or pa.types.is_integer(column.type)):
            raise JobFileError(f"{name}: column {column_name} of {path} is {column.type}, not a number")
        if column.null_count:
            raise JobFileError(f"{name}: column {column_name} of {path} has missing values")
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


# Datasets ------------------------------------------------------------------------------------------------

def is_dataset(path: str, folder: Path) -> bool:
    """A Parquet dataset rather than one file: a URI, a glob, a folder."""
    return "://" in path or any(c in path for c in "*?[") or path.endswith("/") or (folder / path).is_dir()


def is_dataset_output(path: str) -> bool:
    return path.endswith("/")


def locate(path: str, folder: Path) -> str:
    """A URI as it is; a local path relative to the job file's folder."""
    return path if "://" in path else str(folder / path) + ("/" if path.endswith("/") else "")


def _columns(source: InputFile):
    return tuple(source.columns) if source.columns else None


def dataset_inputs(spec: JobSpec, plan: Plan, folder: Path) -> list:
    """The inputs of a dataset job: Datasets for the row-side inputs and for the column-side ones given as Parquet
    datasets (the workers read both), arrays for the others."""
    datasets = {}
    for arg in plan.args:
        source = spec.inputs[arg.name]
        source = InputFile(path=source) if isinstance(source, str) else source
        parquet = isinstance(source, InputFile) and (is_dataset(source.path, folder)
                                                     or source.path.endswith(".parquet"))
        if arg.role == ROWS and not parquet:
            raise JobFileError(f"{arg.name}: an output dataset (ending in /) needs the row-side inputs as "
                               "Parquet files or datasets")
        if arg.role == ROWS or arg.role == COLS and parquet:
            datasets[arg.name] = Dataset(locate(source.path, folder), _columns(source))
    first = next((arg for arg in plan.args if arg.name in datasets), None)       # its dtype, for inline numbers
    dtype = row_reader(datasets[first.name], first.name, first.dim, spec.dtype).dtype if first else None
    arrays = load_inputs(spec, plan, folder, skip=set(datasets), inline_dtype=dtype)
    return [datasets.get(arg.name, array) for arg, array in zip(plan.args, arrays)]


def run_job_file(path, address: str | None = None, progress: bool = True) -> Path | str:
    """Run the job described by the YAML file `path` (on `address`, else the file's cluster address, else an
    embedded local Ray); returns the path (or URI) of the output it wrote."""
    from .cluster import Cluster
    spec, plan, folder = load_job(path)
    dataset_job = is_dataset_output(spec.output)
    sources = dataset_inputs(spec, plan, folder) if dataset_job else load_inputs(spec, plan, folder)
    settings = spec.cluster
    with Cluster(address or settings.address, device=settings.device, workers=settings.workers,
                 threads=settings.threads, backend=settings.backend) as cluster:
        if dataset_job:
            job = cluster.submit_dataset(plan, sources, locate(spec.output, folder), dtype=spec.dtype)
            return job.result(progress=progress)
        result = cluster.run_plan(plan, sources, progress=progress)
    output = folder / spec.output
    write_output(result, plan, output)
    return output
