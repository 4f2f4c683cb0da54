"""The Arrow IPC wire format: arrays in and out of the service, and the job store's files on disk.

A message is one Arrow IPC *stream* holding one record batch of one row. Each array is a column of type
`large_list<float32 | float64 | int64>` whose single entry is the array flattened in C order; its shape sits in the
field's metadata. The request (or response) JSON travels in the schema metadata under the key `kred`, so one body
carries everything and there is a single encoding for every transport.

Reading maps the buffers of the message without copying them: the arrays returned by `decode` are read-only views
of the body. Every byte of a body is untrusted: the batch is fully validated (offsets, buffer sizes) before any
buffer is touched, shapes are checked as exact Python integers, compressed (LZ4/zstd) batches are refused before
pyarrow would decompress them, and any malformed body is a `WireError` naming what is wrong. This module needs only numpy and pyarrow (the client imports it without the server's dependencies).
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from .errors import WireError

CONTENT_TYPE = "application/vnd.apache.arrow.stream"
META_KEY = b"kred"
SMALL = 1 << 20          # bytes: messages up to this size are encoded in one pass (see `encode`)
DTYPES = {np.dtype(np.float32): pa.float32(), np.dtype(np.float64): pa.float64(), np.dtype(np.int64): pa.int64()}
MAX_NDIM = 8             # dimensions of one array (batch dimensions + rows + width)
MAX_META = 1 << 20       # bytes of request JSON


def check_shape(shape, what: str) -> tuple[int, ...]:
    """`shape` as a tuple of sizes: a JSON list of at most MAX_NDIM non-negative integers (not booleans) whose
    product fits in int64. Shared by the Arrow and shared-memory paths."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise WireError(f"{what}: shape {shape!r} is not a list of at most {MAX_NDIM} sizes")
    if not all(type(s) is int and s >= 0 for s in shape):
        raise WireError(f"{what}: shape {list(shape)!r} must hold non-negative integers")
    if math.prod(shape) >= 1 << 62:
        raise WireError(f"{what}: shape {list(shape)} holds {math.prod(shape)} values, more than any array can")
    return tuple(shape)


def encode(meta: dict[str, Any], arrays: Sequence[np.ndarray]) -> pa.Buffer:
    """One Arrow IPC stream holding `meta` (JSON) and `arrays` (any order in memory; copied once if not C-ordered)."""
    fields, columns = [], []
    for k, array in enumerate(arrays):
        array = np.asarray(array)
        if array.dtype not in DTYPES:
            raise WireError(f"array {k} has dtype {array.dtype}; the wire carries float32, float64 and int64")
        flat = np.ascontiguousarray(array).reshape(-1)
        values = pa.array(flat, type=DTYPES[array.dtype])         # wraps the numpy buffer, no copy
        column = pa.LargeListArray.from_arrays(pa.array([0, flat.size], pa.int64()), values)
        fields.append(pa.field(f"a{k}", column.type, metadata={b"shape": json.dumps(list(array.shape)).encode()}))
        columns.append(column)
    schema = pa.schema(fields, metadata={META_KEY: json.dumps(meta).encode()})
    batch = pa.record_batch(columns, schema=schema)
    if sum(column.nbytes for column in columns) <= SMALL:     # one pass: the copies are cheaper than a second one
        sink = pa.BufferOutputStream()
        _write(sink, schema, batch)
        return sink.getvalue()
    # Measure first, then write into one buffer of the exact size: a growing buffer would copy 100 MB bodies twice.
    mock = pa.MockOutputStream()
    _write(mock, schema, batch)
    buffer = pa.allocate_buffer(mock.size())
    _write(pa.FixedSizeBufferWriter(buffer), schema, batch)
    return buffer


def _write(sink, schema: pa.Schema, batch: pa.RecordBatch) -> None:
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)


def decode(body) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(meta, arrays) from an Arrow stream (bytes, memoryview, pyarrow Buffer or memory-mapped file)."""
    try:
        source = body if isinstance(body, (pa.Buffer, pa.NativeFile)) else pa.py_buffer(body)
        check_messages(source)         # before pyarrow reads a batch: it would decompress what it names
        reader = pa.ipc.open_stream(source)
        schema = reader.schema
        for field in schema:           # names (nested ones too) must be UTF-8: read them all here, once
            field.name, str(field.type)
        batches = list(reader)
        for batch in batches:          # offsets and buffer sizes checked before any buffer is read
            batch.validate(full=True)
    except WireError:
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError, IndexError, KeyError, OverflowError,
            MemoryError) as e:
        raise WireError(f"the body is not a valid Arrow IPC stream ({type(e).__name__}: {e})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise WireError("the Arrow stream carries no request: its schema metadata lacks the 'kred' JSON")
    if len(raw) > MAX_META:
        raise WireError(f"the 'kred' schema metadata is {len(raw)} bytes; at most {MAX_META} are accepted")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise WireError(f"the 'kred' schema metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise WireError("the 'kred' schema metadata must be a JSON object")
    if len(batches) != 1 or batches[0].num_rows != 1:
        if schema.names:
            raise WireError("the Arrow stream must hold exactly one record batch of one row")
        return meta, []
    return meta, [_column_array(schema.field(k), batches[0].column(k)) for k in range(len(schema.names))]


def check_messages(source) -> None:
    """Refuse a stream whose messages are not one schema then record batches, or whose record batches are
    compressed (LZ4/zstd buffers: a few kB of body can name gigabytes once decompressed, and pyarrow allocates them
    before anything can be checked). Reads only the messages' flatbuffer headers."""
    for message in pa.ipc.MessageReader.open_stream(source):
        if message.type not in ("schema", "record batch"):
            raise WireError(f"the Arrow stream holds a {message.type} message; only a schema and record batches "
                            "are accepted")
        if message.type == "record batch" and _compressed(message.metadata):
            raise WireError("the Arrow stream's record batch is compressed (LZ4/zstd IPC buffers); send it "
                            "uncompressed (compression would let a small body claim any decompressed size)")


def _compressed(header) -> bool:
    """Whether a record-batch message header (a flatbuffer `Message`, Arrow's format/Message.fbs) names a
    `BodyCompression`: `Message.header` is field 2, `RecordBatch.compression` field 3."""
    data = memoryview(header)

    def read(form: str, at: int) -> int:
        if not 0 <= at <= len(data) - struct.calcsize(form):
            raise WireError("the Arrow stream has a record batch header that points outside itself")
        return struct.unpack_from(form, data, at)[0]

    def field(table: int, index: int) -> int:      # a table field's position, or 0 when absent
        vtable = table - read("<i", table)
        slot = 4 + 2 * index
        offset = read("<H", vtable + slot) if slot < read("<H", vtable) else 0
        return table + offset if offset else 0

    root = read("<I", 0)
    at = field(root, 2)
    return bool(at) and bool(field(at + read("<I", at), 3))


def _column_array(field: pa.Field, column: pa.Array) -> np.ndarray:
    if not pa.types.is_large_list(field.type) or field.type.value_type not in DTYPES.values():
        raise WireError(f"column {field.name!r} has type {field.type}; expected large_list of float32/float64/int64")
    try:
        shape = json.loads((field.metadata or {})[b"shape"])
    except (KeyError, ValueError, RecursionError):
        raise WireError(f"column {field.name!r} has no 'shape' metadata (a JSON list of sizes)") from None
    shape = check_shape(shape, f"column {field.name!r}")
    if column.null_count:
        raise WireError(f"column {field.name!r} holds a null")
    start, stop = (int(v) for v in column.offsets.to_numpy()[:2])   # numpy, not pyarrow.compute: ~20 us less
    if not 0 <= start <= stop <= len(column.values):
        raise WireError(f"column {field.name!r}: list offsets [{start}, {stop}] are not within its "
                        f"{len(column.values)} values")
    values = column.values.slice(start, stop - start)
    if values.null_count:
        raise WireError(f"column {field.name!r} holds nulls")
    if len(values) != math.prod(shape):
        raise WireError(f"column {field.name!r}: {len(values)} values do not fill shape {list(shape)}")
    return values.to_numpy(zero_copy_only=True).reshape(shape)


def write_file(path, meta: dict[str, Any], arrays: Sequence[np.ndarray]) -> int:
    """Write one message to `path` (atomically: a temporary file renamed into place). Returns the byte count."""
    import os

    buffer = encode(meta, arrays)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(memoryview(buffer))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return buffer.size


def read_file(path) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Read a message written by `write_file`, memory-mapped (no copy of the arrays)."""
    return decode(pa.memory_map(str(path), "r").read_buffer())
