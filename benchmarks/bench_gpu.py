"""GPU benchmark of the CUDA backend (issue 12) against pykeops 2.3 and torch, on the same GPU, in the same run.

    pip install -e '.[cuda,torch,bench]' pykeops==2.3 keopscore==2.3      # pykeops only for this comparison
    python -m benchmarks.bench_gpu                 # every case (a few minutes on an H100)
    python -m benchmarks.bench_gpu --quick         # small sizes: checks that everything runs

Cases (inputs already on the GPU as torch tensors, so no transfer is timed):
- gaussian_sum: Sum_j exp(-|x_i - y_j|^2) b_j, D = 3, N = M = 1e5 and 1e6, float32 (and float16, float64 at 1e5);
- logsumexp: LogSumExp_j -|x_i - y_j|^2, D = 3, N = M = 1e5 and 1e6;
- argkmin: the K = 10 nearest y_j of each x_i, D = 3 and 100, N = M = 1e5;
- gaussian_sum_grad: forward and backward (gradient with respect to x) of gaussian_sum, D = 3.
Impls: `kred` (engine.torch.Genred on the CUDA backend), `pykeops` (pykeops.torch.Genred; recorded as absent where
it is not installed), `torch` (dense blocks of rows: exp/logsumexp of |x|^2 + |y|^2 - 2 x.y by matmul, matmul +
topk; the backward recomputes each block through torch.utils.checkpoint so memory stays bounded). Each call is made
once untimed (compilation), then timed up to `--reps` times or `--budget-s` seconds, whichever comes first, with
the GPU synchronised (median kept). Errors are measured against float64 on 128 rows (a matmul-form float64
reference, blocked over columns: seconds at M = 1e6, D = 100): max relative error; 1 - recall for argkmin. A size
whose predicted time exceeds `--max-seconds` is skipped and says so.

Goals (issue 12): Gaussian Sum N = M = 1e6 f32 >= 1.3x pykeops and >= 75% of the MUFU floor (one exp per pair:
SMs x 16 SFU lanes x clock pairs/s; `fraction_of_mufu_floor` in the record); ArgKMin at or above torch's matmul + topk.

For kred the JSON also holds the generated kernel's profile: the PTX instructions of its pair loop (per pair: FP32
arithmetic, SFU, shared-memory loads, other), registers from ptxas, and the fraction of the chip's FP32 and SFU
limits that the measured pairs/s represent (limits: SMs x FP32 lanes per SM x clock; SMs x 16 SFU lanes x clock).
Results: benchmarks/results/gpu-<gpu>.json, with the GPU's name, clock, SM count and the versions used.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

K = 10
FP32_LANES = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128, (10, 0): 128}
SFU_LANES = 16


@dataclass(frozen=True)
class Case:
    name: str
    formula: str
    reduction: str
    dims: tuple[int, ...]
    sizes: tuple[int, ...]
    with_b: bool = False
    backward: bool = False
    opt_arg: int | None = None
    dtype: str = "float32"

    @property
    def label(self) -> str:
        return self.name if self.dtype == "float32" else f"{self.name}_{self.dtype}"

    def aliases(self, d: int) -> list[str]:
        return [f"x = Vi({d})", f"y = Vj({d})"] + (["b = Vj(1)"] if self.with_b else [])


CASES = [
    Case("gaussian_sum", "Exp(-SqDist(x, y)) * b", "Sum", (3,), (100_000, 1_000_000), with_b=True),
    Case("logsumexp", "-SqDist(x, y)", "LogSumExp", (3,), (100_000, 1_000_000)),
    Case("argkmin", "SqDist(x, y)", "ArgKMin", (3, 100), (100_000,), opt_arg=K),
    Case("gaussian_sum_grad", "Exp(-SqDist(x, y)) * b", "Sum", (3,), (100_000, 1_000_000), with_b=True,
         backward=True),
    Case("gaussian_sum", "Exp(-SqDist(x, y)) * b", "Sum", (3,), (100_000,), with_b=True, dtype="float16"),
    Case("gaussian_sum", "Exp(-SqDist(x, y)) * b", "Sum", (3,), (100_000,), with_b=True, dtype="float64"),
]


# Impls: each returns a zero-argument callable that computes on tensors already on the GPU ------------------------

def kred_impl(case: Case, tensors):
    from kred.engine.torch import Genred
    op = Genred(case.formula, case.aliases(tensors[0].shape[1]), reduction_op=case.reduction, axis=1,
                opt_arg=case.opt_arg)
    return _with_backward(case, tensors, lambda *t: op(*t, backend="cuda"))


def pykeops_impl(case: Case, tensors):
    from pykeops.torch import Genred
    op = Genred(case.formula, case.aliases(tensors[0].shape[1]), reduction_op=case.reduction, axis=1,
                opt_arg=case.opt_arg)
    return _with_backward(case, tensors, lambda *t: op(*t, backend="GPU"))


def torch_impl(case: Case, tensors):
    import torch
    from torch.utils.checkpoint import checkpoint

    def sqdist(xs, y):
        return ((xs * xs).sum(1, keepdim=True) + (y * y).sum(1)[None] - 2 * xs @ y.T).clamp_min(0)

    blocks = {      # argkmin: |y|^2 - 2 x.y ranks the columns as |x - y|^2 does (matmul + topk)
        "gaussian_sum": lambda xs, y, b: torch.exp(-sqdist(xs, y)) @ b,
        "logsumexp": lambda xs, y: torch.logsumexp(-sqdist(xs, y), 1, keepdim=True),
        "argkmin": lambda xs, y: torch.topk((y * y).sum(1)[None] - 2 * xs @ y.T, K, 1, largest=False).indices,
        "gaussian_sum_grad": lambda xs, y, b: torch.exp(-sqdist(xs, y)) @ b,
    }
    block = blocks[case.name]
    m = tensors[1].shape[0]
    step = max(1, (1 << 28) // m)              # 2^28 pairs per block: 1 GiB of float32 temporaries

    def reduce(x, *rest):
        parts = []
        for k in range(0, x.shape[0], step):
            xs = x[k:k + step]
            parts.append(checkpoint(block, xs, *rest, use_reentrant=False) if case.backward else block(xs, *rest))
        return torch.cat(parts, 0)
    return _with_backward(case, tensors, reduce)


def _with_backward(case: Case, tensors, forward):
    import torch
    if not case.backward:
        def call():
            with torch.no_grad():
                return forward(*tensors)
        return call
    x = tensors[0].detach().requires_grad_(True)
    rest = tensors[1:]

    def call():
        out = forward(x, *rest)
        (grad,) = torch.autograd.grad(out.sum(), x)
        return grad
    return call


IMPLS = {"kred": kred_impl, "pykeops": pykeops_impl, "torch": torch_impl}


# Reference and errors ------------------------------------------------------------------------------------------

def reference(case: Case, arrays, rows):
    """float64 answer on the chosen rows: |x|^2 + |y|^2 - 2 x.y by matmul (BLAS), in blocks of columns. Its
    cancellation, ~1e-16 (|x|^2 + |y|^2), is far below any float32 error measured against it."""
    x = arrays[0][rows].astype(np.float64)
    y = arrays[1].astype(np.float64)
    xx = (x * x).sum(1)[:, None]
    d2 = np.concatenate([np.maximum(xx + (y[k:k + 100_000] ** 2).sum(1)[None] - 2 * x @ y[k:k + 100_000].T, 0)
                         for k in range(0, len(y), 100_000)], 1)
    if case.name == "gaussian_sum":
        return np.exp(-d2) @ arrays[2].astype(np.float64)
    if case.name == "logsumexp":
        top = d2.min(1, keepdims=True)
        return -top + np.log(np.exp(-(d2 - top)).sum(1, keepdims=True))
    if case.name == "argkmin":
        return np.argsort(d2, axis=1, kind="stable")[:, :K]
    # gradient of sum_i sum_j exp(-|x_i - y_j|^2) b_j with respect to x_i
    k = np.exp(-d2) * arrays[2][:, 0].astype(np.float64)[None]
    return -2 * (k.sum(1, keepdims=True) * x - k @ y)


def error(case: Case, got, want) -> float:
    if case.name == "argkmin":
        hits = sum(len(set(g) & set(w)) for g, w in zip(got.tolist(), want.tolist()))
        return 1.0 - hits / want.size
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))


# Kernel profile ------------------------------------------------------------------------------------------------

def kernel_profile(case: Case, d: int, device) -> dict:
    """The generated module's pair loop (PTX) and registers (ptxas) for this case, and the chip's limits."""
    from kred.engine.backends import nvrtc
    from kred.engine.backends import cuda as runtime
    from kred.engine.codegen import cuda as template
    from kred.engine.numpy import Genred
    plan = Genred(case.formula, case.aliases(d), reduction_op=case.reduction, axis=1, opt_arg=case.opt_arg).plan
    arch = f"sm_{device['major']}{device['minor']}"
    profile = {"arch": arch}
    dtype = np.dtype(case.dtype)
    groups = runtime.component_groups(plan, dtype, plan.acc_dtype(dtype))
    programs = [template.build(g, dtype, plan.acc_dtype(dtype)) for g in groups]
    profile["chunked"] = any(p.chunked for p in programs)
    profile["block"] = programs[0].block
    usage = nvrtc.resource_usage(programs[0].source, arch)
    profile["registers"] = {name: u.registers for name, u in usage.items()}
    profile["local_memory_bytes"] = {name: u.stack for name, u in usage.items()}
    if not profile["chunked"]:
        ptx = nvrtc.compile_source(programs[0].source, arch, output="ptx").decode()
        profile["ptx_per_pair"] = pair_loop(ptx, "kred_state")
    return profile


INSTRUCTION_CLASSES = [
    ("sfu", re.compile(r"^(ex2|lg2|rsqrt|rcp|sqrt|sin|cos)\.approx")),
    ("fp32", re.compile(r"^(add|sub|mul|fma|neg|abs|min|max|cvt\.sat|div|setp\.[a-z]+)(\.[a-z]+)*\.f32\b")),
    ("fp64", re.compile(r"^(add|sub|mul|fma|neg|abs|min|max|div|setp\.[a-z]+)(\.[a-z]+)*\.f64\b")),
    ("shared_load", re.compile(r"^ld\.shared")),
    ("move", re.compile(r"^mov\.")),         # constants and bit casts: folded into other SASS instructions
]


def pair_loop(ptx: str, kernel: str) -> dict:
    """Instructions per pair in the loop over a tile's columns: the largest PTX loop of `kernel` that loads from
    shared memory without a barrier, divided by its unroll factor (the step of its trip counter)."""
    start = ptx.index(f".entry {kernel}")
    end = ptx.find(".entry", start + 10)
    lines = [line.strip() for line in ptx[start:end if end > 0 else None].splitlines()]
    labels = {line[:-1]: k for k, line in enumerate(lines) if line.startswith("$L__") and line.endswith(":")}
    best = None
    for k, line in enumerate(lines):
        match = re.search(r"bra(?:\.uni)?\s+(\$L__\w+);", line)
        if match and labels.get(match.group(1), k + 1) < k:
            body = [b for b in lines[labels[match.group(1)] + 1:k + 1] if b and not b.startswith(("$L__", "//"))]
            if any("ld.shared" in b for b in body) and not any("bar.sync" in b for b in body):
                if best is None or len(body) > len(best):
                    best = body
    if best is None:
        return {}
    steps = [abs(int(m.group(2))) for b in best
             if (m := re.match(r"add\.s32\s+(%r\d+),\s*\1,\s*(-?\d+);", b)) and int(m.group(2)) not in (0,)]
    unroll = max(steps, default=1)
    counts: dict[str, float] = {}
    for instruction in best:
        kind = next((name for name, pattern in INSTRUCTION_CLASSES if pattern.match(instruction)), "other")
        counts[kind] = counts.get(kind, 0) + 1
    return {"unroll": unroll, **{kind: round(n / unroll, 2) for kind, n in sorted(counts.items())}}


def limits(device: dict) -> dict:
    """The chip's FP32 and SFU (MUFU) instruction rates; empty when its clock is unknown."""
    if not device.get("clock_khz"):
        return {}
    lanes = FP32_LANES.get((device["major"], device["minor"]), 128)
    hz = device["clock_khz"] * 1e3
    return {"fp32_lanes_per_sm": lanes, "fp32_per_s": device["sm_count"] * lanes * hz,
            "sfu_per_s": device["sm_count"] * SFU_LANES * hz}


# Running ------------------------------------------------------------------------------------------------------

CLOCK_RATE = 13     # cudaDevAttrClockRate (kHz): cudaDeviceProp.clockRate is gone from CUDA 13's properties


def device_info() -> dict:
    import cupy
    import torch
    runtime = cupy.cuda.runtime
    props = runtime.getDeviceProperties(0)
    name = props.get("name", b"unknown")
    name = name.decode() if isinstance(name, bytes) else str(name)
    clock = props.get("clockRate")
    if not clock:
        try:
            clock = runtime.deviceGetAttribute(CLOCK_RATE, 0)
        except Exception:
            clock = None
    return {"name": name, "major": int(props.get("major", 0)), "minor": int(props.get("minor", 0)),
            "sm_count": int(props["multiProcessorCount"]), "clock_khz": int(clock) if clock else None,
            "memory_gb": round(props.get("totalGlobalMem", 0) / 2**30, 1),
            "driver": _call(runtime, "driverGetVersion"), "runtime": _call(runtime, "runtimeGetVersion"),
            "torch_cuda": torch.version.cuda, "cupy": cupy.__version__}


def _call(namespace, name: str):
    function = getattr(namespace, name, None)
    return function() if function else None


def synchronize() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(call, reps: int, budget_s: float) -> tuple[float, float, object]:
    """(median seconds, first call's seconds, output): at least one timed call, then up to `reps` within
    `budget_s` seconds."""
    synchronize()
    start = time.perf_counter()
    out = call()                                # warm-up: compiles
    synchronize()
    first = time.perf_counter() - start
    times: list[float] = []
    while len(times) < max(1, reps) and (not times or sum(times) + times[-1] <= budget_s):
        start = time.perf_counter()
        out = call()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), first, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = M = 1e4 and 3e4 only")
    parser.add_argument("--sizes", help="comma-separated N (= M) for every case, e.g. 200,500 (overrides --quick)")
    parser.add_argument("--cases", help="comma-separated case labels, e.g. gaussian_sum,argkmin_float64 (default all)")
    parser.add_argument("--impls", default="kred,pykeops,torch")
    parser.add_argument("--reps", type=int, default=3, help="timed calls at most (median kept)")
    parser.add_argument("--budget-s", type=float, default=10.0, help="stop repeating a call after this many seconds")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="skip a size predicted to take longer")
    parser.add_argument("--tensors", default="cuda", help="torch device of the inputs ('cpu': the CPU emulation)")
    parser.add_argument("--out", help="results file (default benchmarks/results/gpu-<gpu>.json)")
    parser.add_argument("--jsonl", help="also append each record to this file as it is measured (flushed: a run "
                                        "killed midway keeps what it measured)")
    args = parser.parse_args(argv)

    import torch
    from benchmarks.run import machine_info
    device = device_info()
    chip = limits(device)
    impls = [name for name in args.impls.split(",") if name]
    cases = [c for c in CASES if not args.cases or c.label in args.cases.split(",")]
    sizes = [int(n) for n in args.sizes.split(",")] if args.sizes else (10_000, 30_000) if args.quick else None
    records, predicted = [], {}

    def keep(record: dict) -> None:
        records.append(record)
        if args.jsonl:
            from benchmarks.gpu_check import append_line
            append_line(Path(args.jsonl), record)

    clock = f"{device['clock_khz'] / 1e6:.2f} GHz" if device["clock_khz"] else "unknown clock"
    print(f"# {device['name']}: {device['sm_count']} SMs at {clock}" + (
        f", FP32 limit {chip['fp32_per_s'] / 1e12:.1f} T instr/s, SFU {chip['sfu_per_s'] / 1e12:.2f} T/s"
        if chip else ""))
    for case in cases:
        dtype = np.dtype(case.dtype)
        for d in case.dims:
            profile = kernel_profile(case, d, device) if "kred" in impls and device["major"] else {}
            for n in sizes or case.sizes:
                rng = np.random.default_rng(0)
                arrays = [(rng.standard_normal((n, d)) / np.sqrt(d)).astype(dtype) for _ in range(2)]
                if case.with_b:
                    arrays.append(rng.standard_normal((n, 1)).astype(dtype))
                rows = np.linspace(0, n - 1, min(n, 128)).astype(int)
                want = reference(case, arrays, rows)
                tensors = [torch.from_numpy(a).to(args.tensors) for a in arrays]
                for impl in impls:
                    record = {"case": case.name, "n": n, "m": n, "d": d, "impl": impl, "dtype": case.dtype}
                    key = (case.label, d, impl)
                    line = f"{case.label:22s} N={n:>9,d} D={d:<3d} {impl:8s}"
                    if key in predicted and predicted[key] * (n / predicted[key + ("n",)]) ** 2 > args.max_seconds:
                        record["status"] = f"skipped: predicted over {args.max_seconds:.0f} s"
                        keep(record)
                        print(f"{line} {record['status']}")
                        continue
                    try:
                        call = IMPLS[impl](case, tensors)
                        seconds, first, out = time_call(call, args.reps, args.budget_s)
                    except ImportError as e:        # pykeops not installed here: recorded as absent
                        record["status"] = f"absent: {e}"
                        keep(record)
                        print(f"{line} {record['status']}")
                        continue
                    except Exception as e:          # a peer failing is recorded, not fatal
                        record["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                        keep(record)
                        print(f"{line} {record['status']}")
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        continue
                    predicted[key], predicted[key + ("n",)] = seconds, n
                    got = out.detach().cpu().numpy()[rows] if hasattr(out, "detach") else np.asarray(out)[rows]
                    record.update(status="ok", seconds=seconds, first_call_s=first, pairs_per_s=n * n / seconds,
                                  error=error(case, got.astype(np.float64) if case.name != "argkmin" else got, want))
                    if impl == "kred" and profile:
                        record["kernel"] = profile
                        per_pair = profile.get("ptx_per_pair", {})
                        if per_pair and not case.backward and chip:
                            rate = record["pairs_per_s"]
                            record["fraction_of_fp32_limit"] = rate * per_pair.get("fp32", 0) / chip["fp32_per_s"]
                            record["fraction_of_sfu_limit"] = rate * per_pair.get("sfu", 0) / chip["sfu_per_s"]
                    if case.name == "gaussian_sum" and not case.backward and chip:
                        record["fraction_of_mufu_floor"] = record["pairs_per_s"] / chip["sfu_per_s"]   # 1 exp/pair
                    keep(record)
                    print(f"{line} {seconds:9.4f} s {record['pairs_per_s']:10.3e} pairs/s  err {record['error']:.1e}"
                          + (f"  MUFU floor {record['fraction_of_mufu_floor']:.0%}"
                             if "fraction_of_mufu_floor" in record else ""))
                del tensors
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    info = {**machine_info(), "gpu_device": device, "chip_limits": chip, "pykeops": _version("pykeops"),
            "keopscore": _version("keopscore")}
    slug = re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu-{slug}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "settings": vars(args), "records": records,
                               "ratios": ratios(records)}, indent=1, default=str))
    print(f"# wrote {out}")
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def ratios(records: list[dict]) -> list[dict]:
    """kred's speed over each peer's, per (case, dtype, N, D) measured by both in this run."""
    ok = {(r["case"], r["dtype"], r["n"], r["d"], r["impl"]): r["seconds"] for r in records if r["status"] == "ok"}
    out = []
    for (case, dtype, n, d, impl), seconds in ok.items():
        if impl != "kred":
            mine = ok.get((case, dtype, n, d, "kred"))
            if mine:
                out.append({"case": case, "dtype": dtype, "n": n, "d": d, "peer": impl, "kred_speedup": seconds / mine})
    return out


if __name__ == "__main__":
    sys.exit(main())
