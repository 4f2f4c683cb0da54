"""The engine's bounds (issue 10 rows 2 and 11), bounded against unbounded in the same run.

    python -m benchmarks.bench_bounds [--formulas 300] [--no-save]

- Nested `Laplacian(Sum(...), x)` around `Exp(-SqDist(x,y))*Sin(Sum(x*y))` (3 to 5 levels): seconds to a node or a
  FormulaError and the growth of the peak RSS, in a fresh process each, with the default node budget and with the
  budget lifted (KRED_MAX_FORMULA_NODES=10^9: what kred did before the budget).
- `--formulas` distinct formulas run through the CPU backend in one process: memory mappings (/proc/self/maps lines)
  and RSS before and after, with the default loaded-kernel cap and with it lifted (KRED_MAX_LOADED_KERNELS=10^9).
  Both runs share one fresh kernel cache directory, so only the first one compiles.
Results: benchmarks/results/bounds-<host kind>.json with the machine's description.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

from .run import machine_info, results_path, save_results

UNBOUNDED = str(10**9)

LAPLACIANS = textwrap.dedent("""
    import json, resource, time
    from kred.engine.errors import FormulaError
    from kred.engine.formula import parse, parse_aliases
    names = parse_aliases(["x = Vi(3)", "y = Vj(3)"])
    text = "Exp(-SqDist(x,y))*Sin(Sum(x*y))"
    parse(text, names)
    for _ in range({levels}):
        text = f"Laplacian(Sum({{text}}), x)"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        outcome = f"{{len(parse(text, names).postorder())}} nodes"
    except FormulaError as e:
        outcome = "FormulaError"
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print("RESULT " + json.dumps(dict(chars=len(text), outcome=outcome, seconds=round(seconds, 3),
                                      peak_rss_growth_mb=round(grown, 1))))
""")

FORMULAS = textwrap.dedent("""
    import gc, json, resource, sys
    import numpy as np
    from kred.engine.backends import get_backend
    from kred.engine.spec import Spec, make_plan
    def maps():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    backend = get_backend("cpu")
    x, y = np.random.default_rng(0).standard_normal((8, 1)), np.random.default_rng(1).standard_normal((9, 1))
    backend.reduce(make_plan(Spec("Exp(-SqDist(x, y))", ["x = Vi(1)", "y = Vj(1)"], axis=1)), [x, y], 8, 9)
    gc.collect()
    before_maps, before_rss = maps(), rss_mb()
    for k in range({count}):
        plan = make_plan(Spec(f"Exp(-SqDist(x, y) * {{1 + k / 1000!r}})", ["x = Vi(1)", "y = Vj(1)"], axis=1))
        backend.reduce(plan, [x, y], 8, 9)
    gc.collect()
    print("RESULT " + json.dumps(dict(formulas={count}, mappings_before=before_maps, mappings_after=maps(),
                                      rss_mb_before=round(before_rss, 1), rss_mb_after=round(rss_mb(), 1))))
""")


def _run(script: str, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=3600)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"status": f"failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formulas", type=int, default=300)
    parser.add_argument("--no-save", action="store_true")
    options = parser.parse_args()
    rows = []
    print(f"{'case':<34} {'configuration':<12} {'result':<16} {'seconds':>8} {'peak RSS +MB':>12}")
    for levels in (3, 4, 5):
        for name, value in (("bounded", None), ("unbounded", UNBOUNDED)):
            env = dict(os.environ)
            env.pop("KRED_MAX_FORMULA_NODES", None)
            if value:
                env["KRED_MAX_FORMULA_NODES"] = value
            row = dict(case=f"{levels} nested Laplacians", configuration=name,
                       **_run(LAPLACIANS.format(levels=levels), env))
            rows.append(row)
            print(f"{row['case']:<34} {name:<12} {row.get('outcome', row.get('status')):<16} "
                  f"{row.get('seconds', float('nan')):>8.2f} {row.get('peak_rss_growth_mb', float('nan')):>12.1f}")
    print(f"\n{'case':<34} {'configuration':<12} {'mappings before -> after':>24} {'RSS MB before -> after':>24}")
    with tempfile.TemporaryDirectory(prefix="kred-bench-bounds-") as cache:
        for name, value in (("bounded", None), ("unbounded", UNBOUNDED)):
            env = dict(os.environ, KRED_CACHE_DIR=cache, KRED_NUM_THREADS="1")
            env.pop("KRED_MAX_LOADED_KERNELS", None)
            if value:
                env["KRED_MAX_LOADED_KERNELS"] = value
            row = dict(case=f"{options.formulas} distinct formulas (cpu)", configuration=name,
                       **_run(FORMULAS.format(count=options.formulas), env))
            rows.append(row)
            print(f"{row['case']:<34} {name:<12} {row.get('mappings_before')!s:>11} -> {row.get('mappings_after')!s:<9}"
                  f" {row.get('rss_mb_before')!s:>11} -> {row.get('rss_mb_after')!s:<9}")
    if not options.no_save:
        machine = machine_info()
        save_results(results_path("bounds", machine), {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
