"""Static GPU performance check, no GPU needed: SASS instructions per pair of kred's kernels and of KeOps 2.3's.

    python -m benchmarks.gpu_static            # a table
    python -m benchmarks.gpu_static --json     # [{"case", "kred_sass_per_pair", "keops_sass_per_pair",
                                               #   "registers", "spills"}, ...]

Both kernels of a case are compiled for sm_90 with NVRTC (the `nvrtc` extra) — kred's generated module as the CUDA
backend compiles it, KeOps's `GpuConv1DOnDevice` as keopscore 2.3 generates it (its own source generator runs without
a GPU) and compiles it (`-use_fast_math`) — and disassembled with `cuobjdump -sass` (the `nvidia-cuda-cuobjdump`
wheel of the `gpu-static` extra). The pair loop is the innermost loop (a back edge to a head that dominates it) whose
cycle loads from shared memory and holds no barrier. What is counted is its shortest cycle through the control-flow
graph: the path a column takes when no data-dependent branch leaves it — all of a straight-line loop, and for the
K-best reductions the no-insert path (the candidate is not better than the K-th best), which almost every column
takes once the list has filled. The compiler unrolls the loop, so the cycle's length is divided by the unroll
factor: the bytes its shared-memory loads read over the bytes of one column. An issue-bound kernel (every one here: one MUFU per
pair against four schedulers issuing one instruction per clock) runs at about
    SMs x 4 x clock / (SASS per pair)   pairs per second,
so these counts compare kernels before any GPU is lent. `registers` and `spills` are ptxas's for kred's kernel.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARCH = "sm_90"
K = 10


@dataclass(frozen=True)
class StaticCase:
    name: str
    formula: str             # kred (pykeops) syntax over x = Vi(d), y = Vj(d)[, b = Vj(1)]
    reduction: str
    d: int
    keops: str               # the same reduction in keopscore's syntax, over Var(pos, dim, cat)
    with_b: bool = False
    opt_arg: int | None = None
    gradient: bool = False   # the backward kernel of the Sum w.r.t. x (its cost adds to the forward's)

    def aliases(self) -> list[str]:
        return [f"x = Vi({self.d})", f"y = Vj({self.d})"] + (["b = Vj(1)"] if self.with_b else [])


def _gauss(d):
    return f"Exp(-SqDist(Var(0,{d},0),Var(1,{d},1)))*Var(2,1,1)"


CASES = [
    StaticCase("gaussian_sum_f32_d3", "Exp(-SqDist(x, y)) * b", "Sum", 3, f"Sum_Reduction({_gauss(3)},0)",
               with_b=True),
    StaticCase("logsumexp_f32_d3", "-SqDist(x, y)", "LogSumExp", 3,
               "Max_SumShiftExp_Reduction(-SqDist(Var(0,3,0),Var(1,3,1)),0)"),
    StaticCase("argkmin_k10_f32_d3", "SqDist(x, y)", "ArgKMin", 3,
               f"ArgKMin_Reduction(SqDist(Var(0,3,0),Var(1,3,1)),{K},0)", opt_arg=K),
    StaticCase("gaussian_grad_f32_d3", "Exp(-SqDist(x, y)) * b", "Sum", 3,
               f"Sum_Reduction(Grad({_gauss(3)},Var(0,3,0),Var(3,1,0)),0)", with_b=True, gradient=True),
]

# The goals of issue 12, held by tests/test_gpu_static.py.
GOALS = {"gaussian_sum_f32_d3": 9}


# Disassembly -------------------------------------------------------------------------------------------------

def _tool(name: str) -> str:
    """A CUDA binary tool from the nvidia-cuda-* wheels (nvidia/cu13/bin or nvidia/cuda_*/bin), else from PATH."""
    import shutil
    try:
        import nvidia
        for root in nvidia.__path__:
            for found in sorted(Path(root).glob(f"*/bin/{name}")):
                return str(found)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: pip install 'kred[gpu-static]' (the nvidia-cuda-{name} wheel)")
    return found


def sass(cubin: bytes, kernel: str) -> list[tuple[int, str]]:
    """(address, instruction) of `kernel` in `cubin`, from cuobjdump -sass."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([_tool("cuobjdump"), "-sass", "-fun", kernel, file.name], check=True,
                              capture_output=True, text=True).stdout
    code = []
    for line in text.splitlines():
        match = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if match:
            code.append((int(match.group(1), 16), match.group(2)))
    return code


@dataclass(frozen=True)
class PairLoop:
    instructions: tuple[str, ...]
    unroll: int

    @property
    def per_pair(self) -> float:
        return round(len(self.instructions) / self.unroll, 2)

    def mix(self) -> dict[str, float]:
        counts: dict[str, int] = {}
        for text in self.instructions:
            opcode = _opcode(text)
            counts[opcode] = counts.get(opcode, 0) + 1
        return {op: round(n / self.unroll, 2) for op, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def _successors(code: list[tuple[int, str]]) -> list[list[int]]:
    """The control-flow successors of each instruction (by position): a predicated branch or exit also falls
    through; BREAK/BSSY/BSYNC only manage convergence and fall through."""
    index = {address: k for k, (address, _) in enumerate(code)}
    successors = []
    for k, (_, text) in enumerate(code):
        predicated = text.startswith("@")
        opcode = _opcode(text)
        following = [k + 1] if k + 1 < len(code) else []
        if opcode == "BRA":
            target = index.get(int(re.search(r"0x([0-9a-f]+)\s*$", text).group(1), 16))
            successors.append(([target] if target is not None else []) + (following if predicated else []))
        elif opcode in ("EXIT", "RET"):
            successors.append(following if predicated else [])
        elif opcode in ("BRX", "JMX", "JMP"):
            raise RuntimeError(f"indirect branch in the pair loop's kernel: {text}")
        else:
            successors.append(following)
    return successors


def _shortest_path(successors, start: int, end: int) -> list[int] | None:
    """The fewest instructions from `start` to `end` (breadth first: every instruction costs one issue)."""
    before = {start: None}
    frontier = [start]
    while frontier and end not in before:
        following = []
        for k in frontier:
            for n in successors[k]:
                if n not in before:
                    before[n] = k
                    following.append(n)
        frontier = following
    if end not in before:
        return None
    path = [end]
    while path[-1] != start:
        path.append(before[path[-1]])
    return path[::-1]


def _dominates(successors, head: int, k: int) -> bool:
    """Every path from the kernel's entry to instruction k passes through `head` (so k -> head is a loop's back
    edge, not a branch from an out-of-line block back into the middle of a loop)."""
    seen, stack = {0}, [0]
    while stack:
        for n in successors[stack.pop()]:
            if n != head and n not in seen:
                seen.add(n)
                stack.append(n)
    return k not in seen


def pair_loop(code: list[tuple[int, str]], column_bytes: int) -> PairLoop:
    """The pair loop and its fast path (see the module docstring): of the loops (back edges to a dominating head)
    whose shortest cycle loads from shared memory and holds no barrier nor an inner loop, the longest; its
    instructions are those of that shortest cycle, i.e. the path every column takes when no data-dependent branch
    leaves it (for K-best reductions: the candidate is not better than the K-th best, nothing is inserted)."""
    successors = _successors(code)
    edges = [(k, head) for k, nexts in enumerate(successors) for head in nexts if head <= k]
    loops = [(head, k) for k, head in edges if _dominates(successors, head, k)]
    cycles = {}
    for head, k in loops:
        path = _shortest_path(successors, head, k)
        if path is not None:
            cycles[head, k] = path
    candidates = []
    for (head, k), path in cycles.items():
        body = [code[n][1] for n in path]
        on_path = set(path)
        inner = any(h2 != head and h2 in on_path and k2 in on_path for h2, k2 in cycles)
        if inner or any("BAR" in t for t in body) or not any(_opcode(t).startswith("LDS") for t in body):
            continue
        candidates.append(body)
    if not candidates:
        raise RuntimeError("no pair loop found in the kernel's SASS")
    body = max(candidates, key=len)
    loaded = 0
    for text in body:
        match = re.search(r"\bLDS(?:\.U)?(?:\.(\d+))?\s", re.sub(r"^@!?U?P\w+\s+", "", text))
        if match:
            loaded += int(match.group(1) or 32) // 8
    return PairLoop(tuple(body), max(1, round(loaded / column_bytes)))


# kred ----------------------------------------------------------------------------------------------------------

def kred_plan(case: StaticCase, fast_math: bool = True):
    from kred.engine.numpy import Genred
    plan = Genred(case.formula, case.aliases(), reduction_op=case.reduction, axis=1, opt_arg=case.opt_arg,
                  use_fast_math=fast_math).plan
    if case.gradient:
        from kred.engine.reductions.gradients import gradient
        plan = gradient(plan, 0).plan
    return plan


def kred_kernel(case: StaticCase, dtype=np.float32, fast_math: bool = True) -> dict:
    """kred's kernel of `case`: the default fast path, or with `fast_math=False` the exact one (direct differences,
    the C library's exp)."""
    from kred.engine.backends import nvrtc
    from kred.engine.codegen import cuda as template

    plan = kred_plan(case, fast_math)
    program = template.build(plan, dtype, plan.acc_dtype(dtype))
    cubin = nvrtc.compile_source(program.source, ARCH)
    loop = pair_loop(sass(cubin, "kred_final"), program.column_bytes)
    usage = nvrtc.resource_usage(program.source, ARCH)["kred_final"]
    return {"per_pair": loop.per_pair, "unroll": loop.unroll, "mix": loop.mix(), "registers": usage.registers,
            "spills": usage.spill_stores + usage.spill_loads, "stack": usage.stack}


# KeOps 2.3 -------------------------------------------------------------------------------------------------------

def keops_source(formula: str, nargs: int) -> tuple[str, int]:
    """KeOps 2.3's 1D GPU kernel source for `formula` (float32, block sums, data on the device) and its j-stride in
    numbers. keopscore's generator runs without a GPU once its CUDA probe is told a version (it is never called)."""
    from keopscore.config import cuda_config
    cuda_config.get_cuda_version = lambda *args, **kwargs: 12090
    cuda_config.get_gpu_props = lambda: (0, "")
    from keopscore.mapreduce.gpu.GpuReduc1D import GpuReduc1D
    from keopscore.mapreduce.MapReduce import MapReduce

    reduc = GpuReduc1D.__new__(GpuReduc1D)     # skips Gpu_link_compile.__init__, which wants a device
    with contextlib.redirect_stdout(sys.stderr):        # keopscore prints as it parses
        # (formula, aliases, nargs, dtype, dtypeacc, sum_scheme, tagHostDevice, tagCPUGPU, tag1D2D, use_half,
        #  use_fast_math, device_id)
        MapReduce.__init__(reduc, formula, [], nargs, "float", "float", "block_sum", 1, 1, 0, 0, 1, 0)
        reduc.dimy = reduc.varloader.dimy
        reduc.get_code()
    return reduc.code, reduc.dimy


def keops_kernel(case: StaticCase, fast_math: bool = True) -> dict:
    """KeOps's kernel of `case`, compiled as pykeops compiles it with use_fast_math=True (its default) or False."""
    from kred.engine.backends import nvrtc

    nargs = 2 + case.with_b + case.gradient
    source, dimy = keops_source(case.keops, nargs)
    cubin = nvrtc.compile_source(source, ARCH, options=("-use_fast_math",) if fast_math else (), defaults=False)
    loop = pair_loop(sass(cubin, "GpuConv1DOnDevice"), 4 * max(dimy, 1))
    return {"per_pair": loop.per_pair, "unroll": loop.unroll, "mix": loop.mix()}


# Report ----------------------------------------------------------------------------------------------------------

def measure(cases=CASES, keops: bool = True) -> list[dict]:
    rows = []
    for case in cases:
        mine, exact = kred_kernel(case), kred_kernel(case, fast_math=False)
        theirs = keops_kernel(case) if keops else None
        theirs_exact = keops_kernel(case, fast_math=False) if keops else None
        rows.append({"case": case.name, "kred_sass_per_pair": mine["per_pair"],
                     "kred_exact_sass_per_pair": exact["per_pair"], "exact_spills": exact["spills"],
                     "keops_sass_per_pair": theirs["per_pair"] if theirs else None,
                     "keops_exact_sass_per_pair": theirs_exact["per_pair"] if theirs else None,
                     "registers": mine["registers"], "spills": mine["spills"],
                     "kred_mix": mine["mix"], "keops_mix": theirs["mix"] if theirs else None})
    return rows


RESULTS = Path(__file__).parent / "results" / f"gpu-static-{ARCH.replace('_', '')}.json"


def _save(rows: list[dict]) -> None:
    from kred.engine.backends import nvrtc

    from . import run
    machine = run.machine_info()
    settings = {"name": "gpu-static", "target": ARCH, "nvrtc": ".".join(map(str, nvrtc.version())),
                "what": "SASS instructions per pair in the inner loop (no GPU needed): kred's fast path (default) "
                        "and exact path (use_fast_math=False) vs KeOps 2.3's own kernel of the same formula with and "
                        "without -use_fast_math; ArgKMin: the no-insert path", "date": machine["date"]}
    RESULTS.write_text(json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON list only")
    parser.add_argument("--no-keops", action="store_true", help="kred's kernels only (no keopscore installed)")
    parser.add_argument("--mix", action="store_true", help="also print the SASS opcodes per pair")
    parser.add_argument("--save", action="store_true", help=f"write {RESULTS.name} (the committed figures)")
    options = parser.parse_args(argv)
    rows = measure(keops=not options.no_keops)
    if options.json:
        keys = ("case", "kred_sass_per_pair", "keops_sass_per_pair", "kred_exact_sass_per_pair",
                "keops_exact_sass_per_pair", "registers", "spills", "exact_spills")
        print(json.dumps([{k: row[k] for k in keys} | ({"kred_mix": row["kred_mix"], "keops_mix": row["keops_mix"]}
                                                       if options.mix else {}) for row in rows], indent=1))
        return 0
    if options.save:
        _save(rows)
    print(f"{'case':24} {'kred SASS/pair':>15} {'KeOps 2.3':>10} {'kred exact':>11} {'KeOps exact':>12} "
          f"{'registers':>10} {'spills':>7}")
    for row in rows:
        keops, keops_exact = row["keops_sass_per_pair"], row["keops_exact_sass_per_pair"]
        print(f"{row['case']:24} {row['kred_sass_per_pair']:>15} {keops if keops is not None else '-':>10} "
              f"{row['kred_exact_sass_per_pair']:>11} {keops_exact if keops_exact is not None else '-':>12} "
              f"{row['registers']:>10} {row['spills']:>7}")
        if options.mix:
            print(f"    kred:  {row['kred_mix']}\n    KeOps: {row['keops_mix']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
