"""The JSON the service reads and writes (pydantic). Arrays never travel as JSON: see kred.wire."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kred.engine.spec_schema import spec_model

DType = Literal["float32", "float64", "int64"]
# Numbers in one JSON array at most (a dataset job's inline parameters): bulk arrays travel as Arrow or shm
MAX_JSON_NUMBERS = 65_536


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArrayRef(Strict):
    """An array inside a client's shared-memory segment."""
    segment: str = Field(max_length=64)
    offset: int = Field(ge=0, lt=1 << 62)
    dtype: DType
    shape: list[int] = Field(max_length=8)


class OutRoom(Strict):
    """The part of a client's segment the server may write the result into."""
    segment: str = Field(max_length=64)
    offset: int = Field(ge=0, lt=1 << 62)
    size: int = Field(ge=0, lt=1 << 62)


class GradSpec(Strict):
    """Ask for the gradient of the reduction with respect to one argument instead of its value.

    The cotangent (same shape as the reduction's output) is sent as one more array after the reduction's arguments;
    the result has the shape of argument `wrt` (an alias name or a position).
    """
    wrt: str | int


# The server's limits on Spec's fields (the text lengths are checked against settings: limits.check_text)
SPEC_LIMITS = {"aliases": Field(max_length=256), "reduction_op": Field(max_length=64)}

ReductionSpec = spec_model(
    "ReductionSpec", limits=SPEC_LIMITS, grad=(GradSpec | None, None),
    doc="""What to compute, as JSON: the fields of `engine.spec.Spec` (pykeops' Genred; `ranges: true`: the last
    six arrays are the block-sparse `ranges` 6-tuple), with the server's size limits, and `grad`. Its `spec` is what
    every other part of the service reads.""")


class DatasetSource(Strict):
    """A Parquet dataset on storage the server can read: a path or URI under one of its `dataset_roots`."""
    uri: str = Field(max_length=4096)
    columns: list[str] | None = Field(None, max_length=4096)


class DatasetJobRequest(ReductionSpec):
    """POST /v1/jobs as JSON with datasets: the cluster's workers read the inputs and write `output` (a Parquet
    dataset, one file per row block); the job's result names it. Parameters may be inline numbers."""
    inputs: dict[str, DatasetSource | Annotated[list[float], Field(max_length=MAX_JSON_NUMBERS)]] = Field(
        max_length=256)
    output: str = Field(max_length=4096)

    @field_validator("inputs", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, inputs):
        """An inline array is checked here in one pass, with one error: validated as the union of its types, each
        bad element of a long list would cost an error object of its own (0.8 M of them, +500 MB, for 4 MB)."""
        if not isinstance(inputs, dict):
            return inputs
        for name, value in list(inputs.items())[:257]:
            if not isinstance(value, list):
                continue
            if len(value) > MAX_JSON_NUMBERS:
                raise ValueError(f"inputs.{str(name)[:64]}: an inline array holds at most {MAX_JSON_NUMBERS} numbers, "
                                 f"got {len(value)}; send larger arrays as a dataset")
            for k, item in enumerate(value):
                if isinstance(item, bool) or not isinstance(item, (int, float)):
                    raise ValueError(f"inputs.{str(name)[:64]}[{k}]: an inline array holds numbers only, got "
                                     f"{type(item).__name__}")
        return inputs


class ReduceRequest(ReductionSpec):
    """The request: in an Arrow stream's metadata (arrays are its columns) or as a JSON body with shared memory."""
    arrays: list[ArrayRef] | None = Field(None, max_length=256)
    out: OutRoom | None = None
    shm_key: str | None = Field(None, max_length=64)     # the client's key, held by the header of its segments


class SharedResult(BaseModel):
    """Reply to a shared-memory request: where in the client's segment the outputs were written."""
    outputs: list[ArrayRef]
    names: list[str]
    timings: dict[str, float]


class ArgInfo(BaseModel):
    position: int
    name: str
    category: Literal["Vi", "Vj", "Pm"]
    dim: int


class OutputInfo(BaseModel):
    name: str
    kind: Literal["value", "index"]
    dim: int


class Validation(BaseModel):
    formula: str                 # normalised text, as the engine reduces it (over j; i and j swapped for axis=0)
    formula2: str | None
    reduction_op: str
    axis: int
    args: list[ArgInfo]
    outputs: list[OutputInfo]


class JobInfo(BaseModel):
    id: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: float
    created: float
    started: float | None = None
    finished: float | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    error: str | None = None
    rows: int | None = None
    cols: int | None = None


class ErrorBody(BaseModel):
    error: str                   # a short kind: FormulaError, ArgumentError, unauthorized, too_busy, ...
    detail: str                  # what was wrong, for a person


class ShmProbe(Strict):
    segment: str = Field(max_length=64)
    size: int = Field(ge=1, le=4096)
    key: str = Field(max_length=64)              # the client's key: only its own segment is read


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    version: str
    executor: str
    shared_memory: bool
    reason: str | None = None          # why the executor cannot take work now (status "unavailable")
