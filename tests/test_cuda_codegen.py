"""The generated CUDA compiles with NVRTC for sm_90 (and samples of it for sm_75 and sm_80, see JOBS): every op
row of tests/test_ops.py (rows grouped, several per module) and every reduction of tests/test_reductions.py (each
compiled once, not the cross product) in every dtype the CUDA backend takes, plus the large-dimension and benchmark
kernels (whose register use is checked too). No GPU is needed: NVRTC is a library. A broken kernel fails with
NVRTC's log. The package also stays free of CUDA at import time.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kred.engine.backends import nvrtc
from kred.engine.backends import cuda as runtime
from kred.engine.codegen import cuda as template
from kred.engine.errors import BackendError
from kred.engine.formula import Node, make
from kred.engine.numpy import Genred
from kred.engine.plan import plan_from_nodes
from kred.engine.reductions import REDUCTIONS
from test_ops import ROWS
from test_reductions import genred

ARCHS = nvrtc.ARCHS


def op_plan(row):
    aliases = [f"{name} = V{cat}({dim})" if cat != "p" else f"{name} = Pm({dim})"
               for name, (cat, dim, _) in row.variables.items()]
    return Genred(row.formula, aliases, reduction_op="Sum", axis=1).plan


def combined(rows) -> object:
    """One plan whose formula concatenates the rows' formulas, each over its own variables: one module compiles
    every row's generated code (NVRTC's start-up cost dominates a small module, so this keeps CI fast)."""
    formulas, offset = [], 0
    for row in rows:
        plan = op_plan(row)
        moved = {}
        for node in plan.formula.postorder():
            if node.op == "Var":
                pos, dim, cat = node.params
                moved[node] = make("Var", (), (pos + offset, dim, cat))
            else:
                moved[node] = Node(node.op, tuple(moved[c] for c in node.children), node.params, node.dim)
        formulas.append(moved[plan.formula])
        offset += plan.nargs
    formula = formulas[0]
    for more in formulas[1:]:
        formula = make("Concat", (formula, more))
    return plan_from_nodes(formula, None, "Sum", axis=1)


GROUP = 8           # op rows per module
CASES = {f"ops:{rows[0].op}..{rows[-1].op}": (combined(rows), np.float32)
         for rows in (ROWS[k:k + GROUP] for k in range(0, len(ROWS), GROUP))}
# reductions in all three dtypes (the state and finalize code depends on the accumulator and storage types);
# float16 and float64 on sm_90 only (what differs between architectures does not depend on the dtype)
for _name in sorted(REDUCTIONS):
    for _dtype in (np.float16, np.float32, np.float64):
        CASES[f"reduction:{_name}:{np.dtype(_dtype).name}"] = (genred(_name, 1).plan, _dtype)
# sm_90 compiles every case; each older architecture an eighth of the float32 ones, sm_75 and sm_80 different
# eighths (the source is the same for every architecture: what an older one can refuse is an intrinsic or a
# resource, which the sample's ops and reductions meet). NVRTC's front end costs as much per architecture as the
# whole sm_90 sweep, so this takes `make test` about 2 minutes less on 2 cores. KRED_NVRTC_EVERY_ARCH=1: the full sweep.
EVERY_ARCH = os.environ.get("KRED_NVRTC_EVERY_ARCH", "") not in ("", "0")
OLDER_SAMPLE = {arch: k for k, arch in enumerate(a for a in ARCHS if a != "sm_90")}     # arch -> its eighth
_FLOAT32 = [name for name in CASES if not name.startswith("reduction:") or name.endswith("float32")]


def _sampled(name: str, arch: str) -> bool:
    if arch == "sm_90":
        return True
    if name not in _FLOAT32:
        return False
    return EVERY_ARCH or _FLOAT32.index(name) % 8 == 4 * OLDER_SAMPLE[arch] % 8


JOBS = [(name, arch) for name in CASES for arch in ARCHS if _sampled(name, arch)]
BENCHMARK = {   # the kernels of benchmarks/bench_gpu.py, whose register use is checked below
    "gaussian": Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"], axis=1).plan,
    "logsumexp": Genred("-SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], reduction_op="LogSumExp", axis=1).plan,
    "argkmin_d3": Genred("SqDist(x, y)", ["x = Vi(3)", "y = Vj(3)"], reduction_op="ArgKMin", axis=1,
                         opt_arg=10).plan,
    "argkmin_d100": Genred("SqDist(x, y)", ["x = Vi(100)", "y = Vj(100)"], reduction_op="ArgKMin", axis=1,
                           opt_arg=10).plan,
    "sum_out100": Genred("Exp(-SqDist(x, y)) * b", ["x = Vi(3)", "y = Vj(3)", "b = Vj(100)"], axis=1).plan,
}
for _name, _plan in BENCHMARK.items():
    CASES[f"benchmark:{_name}"] = (_plan, np.float32)


def sources(plan, dtype) -> list[str]:
    """The modules the CUDA backend builds for `plan` (one, or one per slice of a large state's components)."""
    acc = plan.acc_dtype(dtype)
    return [template.build(group, dtype, acc).source for group in runtime.component_groups(plan, dtype, acc)]


@pytest.fixture(scope="module")
def compiled() -> dict:
    """Every case compiled for every architecture, in a thread pool: (name, arch) -> None or the error text."""
    jobs = JOBS

    def compile_one(job):
        name, arch = job
        try:
            for source in sources(*CASES[name]):
                nvrtc.compile_source(source, arch)
        except BackendError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(jobs, pool.map(compile_one, jobs)))


@pytest.mark.parametrize("name, arch", JOBS)
def test_generated_source_compiles(compiled, name, arch):
    error = compiled[(name, arch)]
    assert error is None, error


def test_every_op_and_reduction_is_covered():
    ops = {node.op for name, (plan, _) in CASES.items() if name.startswith("ops:") for node in plan.formula.postorder()}
    # every op the rows' formulas hold once built (composites are expanded, some ops simplified away)
    wanted = {node.op for row in ROWS for node in op_plan(row).formula.postorder()}
    assert wanted == ops, wanted ^ ops
    reductions = {name.split(":")[1] for name in CASES if name.startswith("reduction:")}
    assert reductions == set(REDUCTIONS)


@pytest.mark.parametrize("name", list(BENCHMARK))
def test_benchmark_kernels_do_not_spill(name):
    """ptxas's report for sm_90: no spill stores or loads in the reduction kernels (the large-dimension ones
    included: D = 100 takes the chunked path, an output of dimension 100 keeps its state in registers)."""
    for source in sources(BENCHMARK[name], np.float32):
        usage = nvrtc.resource_usage(source, "sm_90")
        assert set(usage) == set(template.KERNELS)
        for kernel in ("kred_final", "kred_state"):
            assert usage[kernel].spill_stores == 0 and usage[kernel].spill_loads == 0, (kernel, usage[kernel])


def test_broken_kernel_fails_with_the_nvrtc_log():
    source = 'extern "C" __global__ void broken(float* x)\n{\n    x[0] = undefined_thing + 1.0f;\n}\n'
    with pytest.raises(BackendError) as failure:
        nvrtc.compile_source(source, "sm_80")
    message = str(failure.value)
    assert "NVRTC could not compile" in message and "sm_80" in message
    assert 'identifier "undefined_thing" is undefined' in message          # NVRTC's own log
    assert "x[0] = undefined_thing + 1.0f;" in message                      # the generated line it points at


def test_architectures_and_versions():
    assert nvrtc.version() >= (12, 0)
    assert {75, 80, 90} <= set(nvrtc.supported_archs())
    assert nvrtc.normalize_arch(90) == nvrtc.normalize_arch("compute_90") == "sm_90"
    with pytest.raises(BackendError, match="unknown GPU architecture"):
        nvrtc.normalize_arch("ampere")
    ptx = nvrtc.compile_source('extern "C" __global__ void k(float* x) { x[0] = 1.0f; }', "sm_75", output="ptx")
    assert b".target sm_75" in ptx and b".entry k" in ptx


def test_generated_source_holds_no_user_text():
    """Alias names never reach the source: only generated identifiers."""
    plan = Genred("Exp(-SqDist(secret_alpha, secret_beta))", ["secret_alpha = Vi(2)", "secret_beta = Vj(2)"],
                  axis=1).plan
    assert "secret" not in template.build(plan, np.float32, np.float64).source


def test_two_dimensional_rule():
    """The 1D scheme when rows fill the GPU; otherwise columns split into spans of whole tiles, bounded by the
    column count and the partial-state memory."""
    assert runtime.choose_splits(1_000_000, 1_000_000, 256, 132, 8) == 1
    splits = runtime.choose_splits(1_000, 1_000_000, 256, 132, 8)
    assert splits == 132           # 4 row-blocks, 528 blocks wanted
    assert runtime.choose_splits(1_000, 2_000, 256, 132, 8) == 1               # too few columns to split
    assert runtime.choose_splits(1, 10**9, 256, 132, 10**9) == 1               # states too large to split
    span = runtime.span_of(1_000_000, splits, 256)
    assert span % 256 == 0 and span * splits >= 1_000_000 and span <= 1_000_000 // splits + 256


def test_shared_memory_layout_fits_the_device():
    """A tile too wide for 48 KiB is staged in the device's opt-in shared memory when it has enough (sm_90: 227
    KiB), else read from global memory; chunked sums stage their j-variables chunk by chunk. Each compiles."""
    plan = Genred("x * y", ["x = Vi(1)", "y = Vj(600)"], axis=1).plan
    small = template.build(plan, np.float64, np.float64)
    assert small.shared_bytes <= template.SHARED_BUDGET and "arg1[(jt + jj) * 600 + 599]" in small.source
    large = template.build(plan, np.float64, np.float64, shared_limit=227 * 1024)
    assert template.SHARED_DEFAULT < large.shared_bytes <= 227 * 1024 and "arg1[(jt + jj)" not in large.source
    plan = Genred("SqDist(x, y)", ["x = Vi(4096)", "y = Vj(4096)"], reduction_op="ArgKMin", axis=1, opt_arg=10).plan
    chunked = template.build(plan, np.float64, np.float64)
    assert chunked.chunked and chunked.shared_bytes <= template.SHARED_BUDGET
    for program in (small, large, chunked):
        nvrtc.compile_source(program.source, "sm_90")


def test_import_does_not_touch_cuda():
    """`import engine` (and choosing the auto backend) loads neither CuPy nor the CUDA driver: safe before fork."""
    code = ("import sys, engine, engine.numpy\n"
            "from engine.backends import auto_choice\n"
            "auto_choice()\n"
            "bad = [m for m in sys.modules if m.startswith(('cupy', 'cuda.bindings.driver', 'cuda.bindings.runtime'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
