"""The compiled CPU backend against pykeops 2.3, torch and numpy on the same cores: the goals table of issue 3.

    python -m benchmarks.bench_cpu [--threads 2] [--quick] [--no-save]

Every throughput measurement goes through the harness (benchmarks.run: one subprocess per case x size x impl,
warm-up call untimed, median of the timed calls, error against the case's float64 reference), with
KRED_NUM_THREADS = OMP_NUM_THREADS = torch threads = `--threads`. Added here:
- cold compile: the first call of a formula no cache has seen (a new integer constant in it, for pykeops too),
  N = M = 100;
- warm call: N = M = 100 Gaussian sum through each library's numpy Genred, best of 5 x 2000 calls;
- the fraction of the machine's peak: flops per pair counted from the generated code (below) times pairs/s, over
  the peak FMA rate measured on these cores (independent 512-bit FMAs, all threads; the nominal-clock figure
  cores x GHz x 32 float32 / 16 float64 flops is kept too, but boost clocks exceed it) and over torch's matmul;
- a CPU-time rate for kred-cpu (pairs per CPU second x threads: the rate with the cores to itself) beside the
  wall-clock one, and the load average before and after: the machine may be shared with other work;
- a plot of pairs/s against N.
Results: benchmarks/results/cpu-<host kind>.json and cpu-gaussian-<host kind>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import uuid

from .run import RESULTS, ROOT, host_kind, machine_info, run_worker, save_results

IMPLS = ("kred-cpu", "pykeops-cpu", "torch", "numpy")

# Flops per pair of each case as our kernels compute it: squared distance in D dims = 3D - 1; our exp polynomial =
# 20 (float32: floor + 2 FMA range reduction + 7 FMA Horner + scaling) or 32 (float64, 13 FMA Horner); the blocked
# large-D path = 3D (a subtraction and an FMA per dimension: squared differences, exact far from the origin).
FLOPS = {
    ("gaussian_sum", 3, "float32"): 8 + 1 + 20 + 2,
    ("gaussian_sum", 3, "float64"): 8 + 1 + 32 + 2,
    ("logsumexp", 3, "float32"): 8 + 1 + 20 + 4,
    ("argkmin", 3, "float32"): 8 + 1,
    ("argkmin", 100, "float32"): 3 * 100 + 1,
}

# (case, N = M values, D, dtype, goal pairs/s or None, pykeops 2.3 figure quoted by the issue)
GOALS = [
    ("gaussian_sum", (1_000, 10_000, 100_000), 3, "float32", 1.5e9, 3.4e8),
    ("logsumexp", (100_000,), 3, "float32", 1.2e9, 3.1e8),
    ("argkmin", (100_000,), 3, "float32", 2.5e9, 1.0e9),
    ("argkmin", (10_000,), 100, "float32", None, 2.5e7),       # goal: 1.5 x torch, measured in the same run
    ("gaussian_sum", (30_000,), 3, "float64", 8e8, 3.6e8),
]
QUICK_SIZES = {100_000: 20_000, 30_000: 10_000, 10_000: 5_000}


def _env(threads: int) -> dict:
    # MALLOC_MMAP_THRESHOLD_ also for the scripts run here (see benchmarks.run.run_worker for why)
    return dict(os.environ, KRED_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), RAY_AUTH_MODE="disabled",
                MALLOC_MMAP_THRESHOLD_="1048576")


def _python(script: str, env: dict, timeout: float = 900) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
    return {"error": tail[0][:300]}


_DATA = """
    import json, time, timeit
    import numpy as np
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((100, 3)).astype(np.float32), rng.standard_normal((100, 3)).astype(np.float32)
    b = rng.standard_normal((100, 1)).astype(np.float32)
"""


def cpu_time_rate(case: str, n: int, d: int, dtype: str, threads: int) -> float | None:
    """Pairs per second of kred-cpu computed from the process's CPU time (x threads): what the threads would reach
    with the cores to themselves. On a shared machine the wall-clock rate is lower by the share taken by others."""
    script = f"""
    import json, time
    import numpy as np
    from benchmarks.cases import CASES
    from kred.engine.numpy import Genred
    case = CASES["{case}"]
    arrays = [a.astype("{dtype}") for a in case.data(np.random.default_rng(0), {n}, {n}, {d})]
    op = Genred(case.formula, case.aliases({d}), case.reduction, axis=1, opt_arg=case.opt_arg)
    op(*arrays, backend="cpu")
    best = 1e9
    for _ in range(3):
        start = time.process_time(); op(*arrays, backend="cpu"); best = min(best, time.process_time() - start)
    print("RESULT " + json.dumps({{"rate": {n} * {n} / best * {threads}}}))
    """
    return _python(script, _env(threads)).get("rate")


def cold_compile(impl: str, threads: int) -> dict:
    """Seconds of the first call of a never-seen formula (codegen, compile, load, run at N = M = 100)."""
    constant = 2 + uuid.uuid4().int % 10**6            # an integer: pykeops 2.3 takes no float literals
    module, backend = ("kred.numpy", "cpu") if impl == "kred-cpu" else ("pykeops.numpy", "CPU")
    script = _DATA + f"""
    from {module} import Genred
    op = Genred("Exp(-SqDist(x, y) / IntCst({constant})) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)
    start = time.perf_counter(); op(x, y, b, backend="{backend}"); first = time.perf_counter() - start
    start = time.perf_counter(); op(x, y, b, backend="{backend}"); second = time.perf_counter() - start
    print("RESULT " + json.dumps({{"first_call_s": first, "warm_call_s": second}}))
    """
    return _python(script, _env(threads))        # the usual caches: only the formula is new


def warm_call(impl: str, threads: int) -> dict:
    """Microseconds per call of an already compiled Gaussian sum, N = M = 100 (best of 5 x 2000 calls)."""
    if impl in ("kred-cpu", "pykeops-cpu"):
        module, backend = ("kred.numpy", "cpu") if impl == "kred-cpu" else ("pykeops.numpy", "CPU")
        setup = f"""
    from {module} import Genred
    op = Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1)
    call = lambda: op(x, y, b, backend="{backend}")
"""
    elif impl == "torch":
        setup = """
    import torch
    tx, ty, tb = (torch.from_numpy(a) for a in (x, y, b))
    def call():
        with torch.no_grad():
            return (torch.exp(-torch.cdist(tx, ty) ** 2) @ tb).numpy()
"""
    else:
        setup = """
    call = lambda: np.exp(-((x[:, None, :] - y[None]) ** 2).sum(-1)) @ b
"""
    tail = """
    call()
    best = min(timeit.repeat(call, number=2000, repeat=5)) / 2000
    cpu = min(timeit.repeat(call, number=2000, repeat=5, timer=time.process_time)) / 2000
    print("RESULT " + json.dumps({"warm_call_us": best * 1e6, "warm_call_cpu_us": cpu * 1e6}))
    """
    return _python(_DATA + setup + tail, _env(threads))


def torch_matmul_gflops(threads: int, dtype: str) -> float | None:
    script = f"""
    import json, time, torch
    torch.set_num_threads({threads})
    a = torch.randn(4096, 4096, dtype=torch.{dtype}); b = torch.randn(4096, 4096, dtype=torch.{dtype})
    a @ b
    best = 1e9
    for _ in range(5):
        start = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - start)
    print("RESULT " + json.dumps({{"gflops": 2 * 4096 ** 3 / best / 1e9}}))
    """
    return _python(script, _env(threads)).get("gflops")


_FMA_SOURCE = r"""
#include <omp.h>
typedef REAL vec __attribute__((vector_size(64)));
double kred_fma_gflops(int threads, long iterations) {
    double start = omp_get_wtime();
    #pragma omp parallel num_threads(threads)
    {
        vec a[12], x, y;
        for (int l = 0; l < (int)(64 / sizeof(REAL)); l++) { x[l] = (REAL)0.999999; y[l] = (REAL)1e-7 * l; }
        for (int k = 0; k < 12; k++) a[k] = y * (REAL)k;
        for (long i = 0; i < iterations; i++) {
            for (int k = 0; k < 12; k++) a[k] = a[k] * x + y;
            __asm__ volatile("" : "+v"(x), "+v"(y));
        }
        vec sum = a[0];
        for (int k = 1; k < 12; k++) sum += a[k];
        if (sum[0] == (REAL)12345) __asm__ volatile("");
    }
    double seconds = omp_get_wtime() - start;
    return threads * (double)iterations * 12 * 2 * (64 / sizeof(REAL)) / seconds / 1e9;
}
"""


def fma_peak_gflops(threads: int, dtype: str) -> float | None:
    """The FMA rate these cores reach on independent 512-bit FMAs (built with the CPU backend's compiler and flags):
    the peak actually available, boost clock included, which the nominal clock in /proc/cpuinfo does not show."""
    real = "float" if dtype == "float32" else "double"
    script = f"""
    import json
    from kred.engine.backends import cache
    from kred.engine.backends.cpu import FLAGS, LIBS
    from benchmarks.bench_cpu import _FMA_SOURCE
    lib = cache.load(_FMA_SOURCE.replace("REAL", "{real}"), FLAGS, LIBS)
    import ctypes
    lib.kred_fma_gflops.restype = ctypes.c_double
    lib.kred_fma_gflops.argtypes = [ctypes.c_int, ctypes.c_long]
    best = max(lib.kred_fma_gflops({threads}, 20_000_000) for _ in range(3))
    print("RESULT " + json.dumps({{"gflops": best}}))
    """
    return _python(script, _env(threads)).get("gflops")


def clock_ghz() -> float | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for a try-out, not for the record)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--cases", help="only these rows of the goals, as case:D,... (e.g. argkmin:100); saved as "
                                        "cpu-<case>-d<D>...-<host kind>.json beside the full run's file")
    args = parser.parse_args(argv)
    chosen = {(c, int(d)) for c, d in (item.split(":") for item in args.cases.split(","))} if args.cases else None
    impls = args.impls.split(",")
    os.environ.update(_env(args.threads))          # the harness's workers inherit the thread settings

    info = machine_info()
    info["load_average_before"] = os.getloadavg()
    info["threads"] = args.threads
    ghz = clock_ghz()
    nominal = {"float32": args.threads * ghz * 32, "float64": args.threads * ghz * 16} if ghz else {}
    peak = {dtype: fma_peak_gflops(args.threads, dtype) for dtype in ("float32", "float64")}
    measured_peak = {dtype: torch_matmul_gflops(args.threads, dtype) for dtype in ("float32", "float64")}
    print(f"# {info['cpu_model']}, {args.threads} threads: FMA peak {peak} GFLOP/s (nominal clock {ghz} GHz: "
          f"{nominal}), torch matmul {measured_peak} GFLOP/s; load average {info['load_average_before']}")

    records = []
    for case, sizes, d, dtype, goal, pykeops_quoted in GOALS:
        if chosen is not None and (case, d) not in chosen:
            continue
        for impl in impls:
            for n in sizes:
                n = QUICK_SIZES.get(n, n) if args.quick else n
                big = n * n >= 10**9        # calls of the peers take minutes there: fewer of them
                compiled = impl in ("kred-cpu", "pykeops-cpu")
                spec = {"case": case, "impl": impl, "n": n, "m": n, "d": d, "dtype": dtype,
                        "reps": args.reps if not big or impl == "kred-cpu" else 1,
                        "warmup": 1 if compiled or not big else 0, "plugins": []}
                record = {**spec, **run_worker(spec, timeout=1800)}
                flops = FLOPS.get((case, d, dtype))
                if record["status"] == "ok" and impl == "kred-cpu" and flops:
                    gflops = flops * record["pairs_per_s"] / 1e9
                    record["flops_per_pair"] = flops
                    record["gflops"] = gflops
                    if peak.get(dtype):
                        record["fraction_of_peak"] = gflops / peak[dtype]
                    if measured_peak.get(dtype):
                        record["fraction_of_torch_matmul"] = gflops / measured_peak[dtype]
                if record["status"] == "ok" and impl == "kred-cpu":
                    rate = record["pairs_per_cpu_s_x_threads"] = cpu_time_rate(case, n, d, dtype, args.threads)
                    if rate and flops and peak.get(dtype):
                        record["fraction_of_peak_cpu_time"] = flops * rate / 1e9 / peak[dtype]
                record["goal_pairs_per_s"] = goal
                record["pykeops_quoted_pairs_per_s"] = pykeops_quoted
                records.append(record)
                rate = f"{record['pairs_per_s']:.3g} pairs/s, error {record['error']:.2g}" \
                    if record["status"] == "ok" else record["status"]
                extra = f", {record['fraction_of_peak']:.0%} of peak" if "fraction_of_peak" in record else ""
                print(f"{case:13s} D={d:<3d} {dtype} N=M={n:<7d} {impl:12s} {rate}{extra}", flush=True)

    latency = {}
    for impl in impls if chosen is None else ():
        latency[impl] = warm_call(impl, args.threads)
        if impl in ("kred-cpu", "pykeops-cpu"):
            latency[impl].update(cold_compile(impl, args.threads))
        print(f"latency {impl:12s} {latency[impl]}", flush=True)
    info["load_average_after"] = os.getloadavg()

    table = goals_table(records, latency)
    print(table)
    if not args.no_save:
        kind = host_kind(info)
        part = "".join(f"{c}-d{d}-" for c, d in sorted(chosen)) if chosen else ""
        path = RESULTS / f"cpu-{part}{kind}.json"
        save_results(path, {"settings": {"threads": args.threads, "reps": args.reps, "quick": args.quick,
                                         "peak_gflops": peak, "nominal_clock_peak_gflops": nominal,
                                         "torch_matmul_gflops": measured_peak},
                            "machine": info, "results": records, "latency": latency, "goals_table": table})
        if chosen is None:
            plot(records, RESULTS / f"cpu-gaussian-{kind}.png", info)
    return 0


def _rate(records, case, d, dtype, impl, n=None):
    found = [r for r in records if r["case"] == case and r["d"] == d and r["dtype"] == dtype and r["impl"] == impl
             and r["status"] == "ok" and (n is None or r["n"] == n)]
    return max(found, key=lambda r: r["n"]) if found else None


def goals_table(records, latency) -> str:
    """The issue's goals table with this run's numbers, as markdown."""
    lines = ["| case | kred cpu | (CPU-time rate) | pykeops 2.3 | torch | numpy | goal | met | kred error | % of peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    names = {("gaussian_sum", 3, "float32"): "Gaussian Sum, D=3, f32", ("logsumexp", 3, "float32"): "LogSumExp, D=3",
             ("argkmin", 3, "float32"): "ArgKMin K=10, D=3", ("argkmin", 100, "float32"): "ArgKMin K=10, D=100",
             ("gaussian_sum", 3, "float64"): "Gaussian Sum, D=3, f64"}
    for case, sizes, d, dtype, goal, _ in GOALS:
        ours = _rate(records, case, d, dtype, "kred-cpu")
        if ours is None:
            continue
        n = ours["n"]
        others = {impl: _rate(records, case, d, dtype, impl, n) for impl in ("pykeops-cpu", "torch", "numpy")}
        if goal is None and others["torch"]:
            goal_text, target = "1.5 x torch", 1.5 * others["torch"]["pairs_per_s"]
        else:
            goal_text, target = (f"{goal:.2g}" if goal else "-"), goal
        met = "yes" if target and ours["pairs_per_s"] >= target else "no" if target else "-"
        cells = [f"{r['pairs_per_s']:.2g}" if r else "-" for r in others.values()]
        share = f"{ours['fraction_of_peak']:.0%}" if "fraction_of_peak" in ours else "-"
        if ours.get("fraction_of_peak_cpu_time"):
            share += f" ({ours['fraction_of_peak_cpu_time']:.0%})"
        cpu_rate = ours.get("pairs_per_cpu_s_x_threads")
        cpu_rate = f"{cpu_rate:.2g}" if cpu_rate else "-"
        lines.append(f"| {names[(case, d, dtype)]}, N=M={n:.0e} | {ours['pairs_per_s']:.2g} | {cpu_rate} | {' | '.join(cells)} "
                     f"| {goal_text} | {met} | {ours['error']:.1e} | {share} |")
    if not latency:             # a run of chosen rows (--cases) measures no latencies
        return "\n".join(lines)
    ours, theirs = latency.get("kred-cpu", {}), latency.get("pykeops-cpu", {})

    def fmt(value, scale, unit):
        return f"{value * scale:.3g} {unit}" if isinstance(value, (int, float)) else "-"
    lines.append(f"| cold compile of a new formula | {fmt(ours.get('first_call_s'), 1, 's')} | - | "
                 f"{fmt(theirs.get('first_call_s'), 1, 's')} | - | - | 0.5 s | "
                 f"{'yes' if ours.get('first_call_s', 1e9) <= 0.5 else 'no'} | - | - |")
    lines.append(f"| warm call N=M=100 | {fmt(ours.get('warm_call_us'), 1, 'µs')} | "
                 f"{fmt(ours.get('warm_call_cpu_us'), 1, 'µs')} | "
                 f"{fmt(theirs.get('warm_call_us'), 1, 'µs')} | {fmt(latency.get('torch', {}).get('warm_call_us'), 1, 'µs')} | "
                 f"{fmt(latency.get('numpy', {}).get('warm_call_us'), 1, 'µs')} | 20 µs | "
                 f"{'yes' if ours.get('warm_call_us', 1e9) <= 20 else 'no'} | - | - |")
    return "\n".join(lines)


def plot(records, path, info) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in IMPLS:
        points = sorted((r["n"], r["pairs_per_s"]) for r in records if r["case"] == "gaussian_sum" and r["d"] == 3
                        and r["dtype"] == "float32" and r["impl"] == impl and r["status"] == "ok")
        if points:
            ax.loglog(*zip(*points), marker="o", label=impl)
    ax.set_xlabel("N = M")
    ax.set_ylabel("pairs / s")
    ax.set_title(f"Gaussian sum, D=3, float32, {info.get('threads')} threads\n{info['cpu_model']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
