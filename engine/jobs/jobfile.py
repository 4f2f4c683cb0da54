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

from pathlib import Path
from typing import Literal, Union

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from ..cluster.cluster import Cluster
from ..cluster.dataset import Dataset, row_reader
from ..io import OUTPUT_SUFFIXES, FileError, read_array, write_output
from ..plan import COLS, ROWS, Plan
from ..spec_schema import spec_model

# The job file is unreadable, invalid, or names inputs that do not fit the formula; or an input file it names is
# unreadable: one error type for the files given to kred (engine.io's).
JobFileError = FileError


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
