"""Fuzz a kred server: grammar-aware formulas, mutated Arrow bodies and mutated shared-memory descriptors.

    python -m benchmarks.fuzz --count 100000          # a real `kred serve` in its own process; JSON to results/
    python -m benchmarks.fuzz --count 100000 --seconds 360     # as many as fit in 6 minutes (the counts are saved)

Every answer must be < 500 and the server must stay up with bounded memory. The same generators drive the bounded
CI test (tests/test_safety_fuzz.py), against the app in-process and against a real server.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from kred.wire import arrow
from kred.wire.shm import HEADER, SegmentPool, pack

RESULTS = Path(__file__).resolve().parent / "results"
ALIASES = ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)", "p = Pm(1)"]
UNARY = ["Exp", "Log", "Sin", "Cos", "Sqrt", "Rsqrt", "Abs", "Sign", "SqNorm2", "Sum", "Norm2", "Inv", "Relu"]
BINARY = ["+", "-", "*", "/", "|"]
CALLS2 = ["SqDist", "Pow", "Elem", "Grad", "Laplacian", "Concat", "Min", "Max", "Atan2", "ScalarProduct"]
LEAVES = ["x", "y", "b", "p", "1", "2.5", "-0.5", "1e300", "0", "IntCst(3)", "Zero(3)", "nan", "x[0]", "y[1:3]"]
REDUCTIONS = ["Sum", "Min", "ArgMin", "KMin", "LogSumExp", "Max_SumShiftExp", "SumSoftMaxWeight", "Nope"]


def formula(rng: random.Random, depth: int = 0) -> str:
    """A random expression of the formula language, sometimes ill-formed on purpose."""
    if depth > 5 or rng.random() < 0.3:
        return rng.choice(LEAVES)
    kind = rng.random()
    if kind < 0.35:
        return f"{rng.choice(UNARY)}({formula(rng, depth + 1)})"
    if kind < 0.7:
        return f"({formula(rng, depth + 1)} {rng.choice(BINARY)} {formula(rng, depth + 1)})"
    name = rng.choice(CALLS2)
    second = str(rng.randint(-3, 5)) if name in ("Pow", "Elem") else formula(rng, depth + 1)
    return f"{name}({formula(rng, depth + 1)}, {second})"


def mutate_text(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(text) + 1)
        choice = rng.random()
        if choice < 0.4:
            text = text[:at] + text[at + 1:]
        elif choice < 0.8:
            text = text[:at] + rng.choice("()[],|+-*/ xyzbp0123456789.eE_ſ\u0000\u00e9") + text[at:]
        else:
            text = text[:at] + "9" * rng.randint(1, 400) + text[at:]
    return text


def formula_request(rng: random.Random) -> dict:
    text = formula(rng)
    if rng.random() < 0.3:
        text = mutate_text(rng, text)
    return {"formula": text, "aliases": ALIASES, "reduction_op": rng.choice(REDUCTIONS),
            "axis": rng.choice([0, 1, 1, 2]), "opt_arg": rng.choice([None, 2, 0, -1])}


def mutate_bytes(rng: random.Random, body: bytes) -> bytes:
    body = bytearray(body)
    for _ in range(rng.randint(1, 8)):
        choice = rng.random()
        if choice < 0.6 and body:
            body[rng.randrange(len(body))] = rng.randrange(256)
        elif choice < 0.75:
            body = body[:rng.randrange(len(body) + 1)]
        elif choice < 0.9 and body:
            at = rng.randrange(len(body))
            body[at:at + 8] = rng.choice([2 ** 63 - 1, 2 ** 62, -8, 2 ** 32, 0xFFFFFFFF]).to_bytes(8, "little",
                                                                                               signed=True)
        else:
            at = rng.randrange(len(body) + 1)
            body[at:at] = rng.randbytes(rng.randint(1, 64))
    return bytes(body)


def arrow_body(rng: random.Random) -> bytes:
    n, m = rng.randint(1, 30), rng.randint(1, 30)
    arrays = [np.ones((n, 3)), np.ones((m, 3)), np.ones((m, 1)), np.ones((1,))]
    meta = {"formula": "Exp(-SqDist(x,y))*b*p", "aliases": ALIASES, "axis": 1}
    body = arrow.encode(meta, arrays)
    if rng.random() < 0.1:          # compressed record batches are refused before decompression: mutated ones too
        body = compressed(body, rng.choice(["lz4", "zstd"]))
    return mutate_bytes(rng, bytes(body))


def compressed(body, codec: str) -> bytes:
    """The same Arrow stream with its record batches compressed by `codec`."""
    table = pa.ipc.open_stream(body).read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def shm_request(rng: random.Random, pool: SegmentPool) -> dict:
    """A descriptor of a real segment of this client (its key), with fields replaced by hostile values."""
    segment = pool.acquire(4096)
    refs, end = pack(segment, [np.ones((5, 3)), np.ones((4, 3)), np.ones((4, 1)), np.ones((1,))])
    pool.release(segment)
    body = {"formula": "Exp(-SqDist(x,y))*b*p", "aliases": ALIASES, "axis": 1, "arrays": refs, "shm_key": pool.key,
            "out": {"segment": segment.name, "offset": end, "size": segment.size - end}}
    hostile = [2 ** 63, 2 ** 64, -1, 0, 1, HEADER - 8, 7, 2 ** 31, True, None, "0", 1.5, [], [2 ** 63, 1], [-8, 142]]
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(["array", "out", "top"])
        if where == "array" and isinstance(body["arrays"], list) and body["arrays"]:
            ref = rng.choice(body["arrays"])
            if not isinstance(ref, dict):       # the list itself was replaced by a hostile one
                continue
            field = rng.choice(["segment", "offset", "dtype", "shape"])
            ref[field] = rng.choice(hostile + ["kred_" + "0" * 32, "../x", "float16", [2 ** 32, 2 ** 32], [5, 3, 1]])
        elif where == "out" and isinstance(body["out"], dict):
            body["out"][rng.choice(["segment", "offset", "size"])] = rng.choice(hostile)
        elif where == "top":
            body[rng.choice(["shm_key", "arrays", "out"])] = rng.choice(hostile + ["ab" * 32])
    return body


def fuzz(http, rng: random.Random, formulas: int, arrows: int, shms: int, seconds: float | None = None) -> dict:
    """Send the cases through `http` (an httpx.Client), the three kinds interleaved; stop early after `seconds`.
    Returns the counts of answers by status class, the 5xx and unanswered requests seen (`failures`), the cases
    sent of each kind, and any exception of the generators themselves (`generator_errors`: a bug of this file, which
    must not end a long run)."""
    counts: dict[str, int] = {}
    failures: list[str] = []
    generator_errors: list[str] = []
    sent = {"formula": 0, "arrow": 0, "shm": 0}
    pool = SegmentPool()
    deadline = None if seconds is None else time.monotonic() + seconds

    def case(kind: str, make, send) -> None:
        try:
            body = make()
        except Exception as e:
            generator_errors.append(f"{kind}: {type(e).__name__}: {e}")
            return
        sent[kind] += 1
        try:
            response = send(body)
        except Exception as e:       # no answer (timeout, connection reset): as bad as a 5xx
            failures.append(f"{kind} no answer ({type(e).__name__}: {e}): {str(body)[:300]!r}")
            return
        key = f"{kind} {response.status_code // 100}xx"
        counts[key] = counts.get(key, 0) + 1
        if response.status_code >= 500:
            failures.append(f"{kind} {response.status_code}: {str(body)[:300]!r} -> {response.text[:300]}")

    total = max(formulas, arrows, shms, 1)
    try:
        for k in range(total):       # kind i goes out count_i times, spread evenly over the run
            if deadline is not None and time.monotonic() > deadline:
                break
            if k * formulas // total != (k + 1) * formulas // total:
                case("formula", lambda: formula_request(rng),
                     lambda body: http.post("/v1/formulas/validate", json=body))
            if k * arrows // total != (k + 1) * arrows // total:
                case("arrow", lambda: arrow_body(rng),
                     lambda body: http.post("/v1/reduce", content=body, headers={"content-type": arrow.CONTENT_TYPE}))
            if k * shms // total != (k + 1) * shms // total:
                case("shm", lambda: shm_request(rng, pool),
                     lambda body: http.post("/v1/reduce", content=json.dumps(body),
                                            headers={"content-type": "application/json"}))
    finally:
        pool.close()
    return {"counts": counts, "failures": failures, "generator_errors": generator_errors, "sent": sent}


def main() -> None:
    import httpx

    from benchmarks.run import machine_info, results_path, save_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="formulas (Arrow bodies: count/4, shm: count/10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long (the counts sent are saved)")
    args = parser.parse_args()
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from safety_helpers import ServerProcess

    import tempfile
    with tempfile.TemporaryDirectory() as tmp, ServerProcess(Path(tmp), compile_timeout_s=2.0) as server:
        began, rss0 = time.monotonic(), server.rss()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            result = fuzz(http, random.Random(args.seed), args.count, args.count // 4, args.count // 10,
                          args.seconds)
        seconds, rss1 = time.monotonic() - began, server.rss()
        alive = server.alive()
    info = machine_info()
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": info, "seed": args.seed,
              "count": args.count, "time_budget_s": args.seconds, "formulas": result["sent"]["formula"],
              "arrow_bodies": result["sent"]["arrow"], "shm_descriptors": result["sent"]["shm"],
              "seconds": round(seconds, 1), "server_rss_mb": [round(rss0 / 2 ** 20), round(rss1 / 2 ** 20)],
              "server_alive": alive, **result}
    print(f"{'kind':<12}{'answers':>10}")
    for key, value in sorted(result["counts"].items()):
        print(f"{key:<12}{value:>10}")
    print(f"sent: {result['sent']}; generator errors: {len(result['generator_errors'])}")
    print(f"5xx or no answer: {len(result['failures'])}, server alive: {alive}, RSS {record['server_rss_mb'][0]} -> "
          f"{record['server_rss_mb'][1]} MB, {seconds:.0f} s")
    save_results(results_path("fuzz", info), record)


if __name__ == "__main__":
    main()
