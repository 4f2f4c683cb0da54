"""Compile CUDA C++ source with NVRTC, through `cuda-bindings` (`from cuda.bindings import nvrtc`).

The same function builds the kernels the CUDA backend launches and the ones CI checks on machines without a GPU:
NVRTC is a library (the `nvidia-cuda-nvrtc-cu12` wheel), it needs no driver and no device. `cuda-bindings` finds the
library through `cuda-pathfinder` (the wheel's lib directory, then the system CUDA install).

Kernels are compiled to a cubin (machine code) for the exact architecture when a device is present, which loads on
any driver of the same CUDA major version; PTX is available too (`output="ptx"`), e.g. to read the generated code.
Generated sources include no header, so nothing beyond the NVRTC library itself is needed.
"""
from __future__ import annotations

import functools
import hashlib
import re
import threading
from dataclasses import dataclass

from .. import limits
from ..errors import BackendError
from .compile_limit import remaining

ARCHS = ("sm_75", "sm_80", "sm_90")          # the architectures CI compiles every kernel for
DEFAULT_OPTIONS = ("--std=c++17", "--fmad=true", "--extra-device-vectorization")
INSTALL_HINT = "install the NVRTC extra: pip install 'kred[nvrtc]' (cuda-bindings 12.9 + nvidia-cuda-nvrtc-cu12)"

_MEMO = limits.BoundedLRU(limits.LOADED_KERNELS, limits.LOADED_KERNEL_BYTES, getsizeof=len)     # compiled images
_MEMO_LOCK = threading.Lock()


@functools.cache
def _module():
    """The `cuda.bindings.nvrtc` module, with its library loaded (raises BackendError when either is missing)."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise BackendError(f"NVRTC is not available ({e}); {INSTALL_HINT}") from None
    try:
        _check(nvrtc, nvrtc.nvrtcVersion()[0], "nvrtcVersion")
    except BackendError:
        raise
    except Exception as e:          # the bindings import, but libnvrtc cannot be found or loaded
        raise BackendError(f"the NVRTC library could not be loaded ({e}); {INSTALL_HINT}") from None
    return nvrtc


def version() -> tuple[int, int]:
    """NVRTC's (major, minor) version."""
    nvrtc = _module()
    result, major, minor = nvrtc.nvrtcVersion()
    _check(nvrtc, result, "nvrtcVersion")
    return int(major), int(minor)


def supported_archs() -> list[int]:
    """The compute capabilities (e.g. 90 for sm_90) this NVRTC can compile for."""
    nvrtc = _module()
    result, archs = nvrtc.nvrtcGetSupportedArchs()
    _check(nvrtc, result, "nvrtcGetSupportedArchs")
    return [int(a) for a in archs]


def compile_source(source: str, arch: str = "sm_90", *, options: tuple[str, ...] = (), output: str = "cubin",
                   name: str = "kred.cu", defaults: bool = True) -> bytes:
    """Compile `source` for `arch` ("sm_90", or 90) and return the cubin or PTX bytes.

    Results are memoised in this process by (source hash, arch, options, output): the CUDA runtime keeps its own
    disk cache on top. `defaults=False` compiles with `options` alone (a peer's source, as its library compiles it).
    A compilation error raises BackendError with NVRTC's log and the source lines it points at.
    """
    arch = normalize_arch(arch)
    if output not in ("cubin", "ptx"):
        raise BackendError(f"NVRTC output must be 'cubin' or 'ptx', not {output!r}")
    flags = (DEFAULT_OPTIONS if defaults else ()) + tuple(options)
    key = (hashlib.sha256(source.encode()).hexdigest(), arch, flags, output)
    with _MEMO_LOCK:
        image = _MEMO.get(key)
    if image is None:
        image, _ = _compile(source, arch, flags, output, name)
        with _MEMO_LOCK:
            _MEMO[key] = image
    return image


@dataclass(frozen=True)
class Usage:
    """What ptxas reports for one kernel: registers per thread and local memory (stack, spills) in bytes."""
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int


def resource_usage(source: str, arch: str = "sm_90") -> dict[str, Usage]:
    """Registers and local memory of every kernel in `source`, from ptxas's verbose report (`-v`)."""
    _, log = _compile(source, normalize_arch(arch), DEFAULT_OPTIONS + ("--ptxas-options=-v",), "cubin", "kred.cu")
    usage, kernel, frame = {}, None, (0, 0, 0)
    for line in log.splitlines():
        if (match := re.search(r"Function properties for (\w+)", line)):
            kernel = match.group(1)
        elif kernel and (match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                                             r"loads", line)):
            frame = tuple(int(g) for g in match.groups())
        elif kernel and (match := re.search(r"Used (\d+) registers", line)):
            usage[kernel] = Usage(int(match.group(1)), *frame)
            kernel = None
    return usage


def normalize_arch(arch) -> str:
    """`90`, `"90"`, `"sm_90"` or `"compute_90"` -> `"sm_90"`."""
    text = str(arch)
    match = re.fullmatch(r"(?:sm_|compute_)?(\d{2,3})a?", text)
    if match is None:
        raise BackendError(f"unknown GPU architecture {arch!r}; expected e.g. 'sm_90' or 90")
    return f"sm_{match.group(1)}"


def _compile(source: str, arch: str, options: tuple[str, ...], output: str, name: str) -> tuple[bytes, str]:
    remaining()          # a spent time limit (compile_limit) starts no compile: a running NVRTC call cannot be stopped
    nvrtc = _module()
    target = arch if output == "cubin" else arch.replace("sm_", "compute_")
    flags = [f"--gpu-architecture={target}", *options]
    result, program = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    _check(nvrtc, result, "nvrtcCreateProgram")
    try:
        (result,) = nvrtc.nvrtcCompileProgram(program, len(flags), [f.encode() for f in flags])
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = _log(nvrtc, program)
            raise BackendError(f"NVRTC could not compile {name} for {arch} ({_error_name(nvrtc, result)}):\n"
                               f"{log.rstrip()}{_quoted_lines(source, name, log)}")
        get_size, get = ((nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if output == "cubin"
                         else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
        result, size = get_size(program)
        _check(nvrtc, result, get_size.__name__)
        image = b" " * size
        (result,) = get(program, image)
        _check(nvrtc, result, get.__name__)
        image = image.rstrip(b"\0") if output == "ptx" else image     # PTX text comes NUL-terminated
        return image, _log(nvrtc, program)
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def _log(nvrtc, program) -> str:
    result, size = nvrtc.nvrtcGetProgramLogSize(program)
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return "(NVRTC gave no log)"
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(program, log)
    return log.rstrip(b"\0").decode(errors="replace")


def _quoted_lines(source: str, name: str, log: str, limit: int = 5) -> str:
    """The generated source lines the log points at (`kred.cu(12): error ...`), so the message stands alone."""
    lines = source.splitlines()
    numbers = sorted({int(n) for n in re.findall(rf"{re.escape(name)}\((\d+)\)", log)})[:limit]
    quoted = [f"  {n:5d} | {lines[n - 1]}" for n in numbers if 0 < n <= len(lines)]
    return ("\ngenerated source at those lines:\n" + "\n".join(quoted)) if quoted else ""


def _error_name(nvrtc, result) -> str:
    try:
        return nvrtc.nvrtcGetErrorString(result)[1].decode()
    except Exception:
        return str(result)


def _check(nvrtc, result, call: str) -> None:
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise BackendError(f"NVRTC {call} failed: {_error_name(nvrtc, result)}")
