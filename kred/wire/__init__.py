"""The wire format, one module for both sides: the client encodes with it, the server decodes with it.

- `kred.wire.arrow`: arrays (and the request JSON) in one Arrow IPC stream; also the job store's files.
- `kred.wire.shm`: same-host shared memory: segments the client owns, and the server's checked reads and writes.

Arrays are validated here, where they enter (shapes, sizes, offsets, dtypes); a malformed message raises a
`WireError` (a ValueError) naming what is wrong. Needs only numpy, pyarrow and the standard library.
"""
from .errors import WireError

__all__ = ["WireError"]
