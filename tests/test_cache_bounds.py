"""Issue 10, engine rows 7 and 11: corrupt cache entries are rebuilt, never loaded; loaded kernels and the disk cache
are bounded (LRU), and bounded kernels give their memory mappings back."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from kred.engine import limits
from kred.engine.backends import cache
from kred.engine.backends.cpu import FLAGS, LIBS, CpuBackend
from kred.engine.spec import Spec, make_plan

ROOT = Path(__file__).parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KRED_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def small_memo(monkeypatch):
    """The process memo of loaded libraries, bounded to 4."""
    memo = limits.BoundedLRU(4, 1 << 30, getsizeof=lambda lib: lib.size)
    monkeypatch.setattr(cache, "_LOADED", memo)
    return memo


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def builds(directory: Path) -> list[str]:
    log = directory / "builds.log"
    return log.read_text().splitlines() if log.exists() else []


def fresh_source(value: int) -> str:
    return f"/* {uuid.uuid4()} */ int kred_value(void) {{ return {value}; }}\n"


# Row 7: corrupt entries ------------------------------------------------------------------------------------------

def truncate_half(data: bytes) -> bytes:
    return data[:len(data) // 2]


def zero_4k(data: bytes) -> bytes:
    return data[:4096] + bytes(4096) + data[8192:]


def flip_64(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


CORRUPTIONS = [truncate_half, zero_4k, flip_64]
KERNEL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from kred.engine.numpy import Genred
    op = Genred("Exp(-SqDist(x, y) * {scale!r}) * b", ["x = Vi(2)", "y = Vj(2)", "b = Vj(1)"], axis=1)
    rng = np.random.default_rng(1)
    x, y, b = rng.standard_normal((40, 2)), rng.standard_normal((50, 2)), rng.standard_normal((50, 1))
    np.save(sys.argv[1], op(x, y, b, backend="cpu"))
""")


def dense(scale: float) -> np.ndarray:
    rng = np.random.default_rng(1)
    x, y, b = rng.standard_normal((40, 2)), rng.standard_normal((50, 2)), rng.standard_normal((50, 1))
    return np.exp(-((x[:, None] - y[None]) ** 2).sum(-1) * scale) @ b


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_a_corrupt_kernel_is_rebuilt_with_one_warning(corrupt, cache_dir, tmp_path):
    """The reported corruptions of a cached kernel crashed the process that loaded it: now each run (a fresh
    process, as a restarted server would be) gives the right result, warns once and rebuilds the entry."""
    scale = 1.0 + (uuid.uuid4().int % 10**6) / 10**7
    script = KERNEL_SCRIPT.format(scale=scale)
    env = dict(os.environ, KRED_CACHE_DIR=str(cache_dir), KRED_NUM_THREADS="1")

    def run_once() -> subprocess.CompletedProcess:
        out = tmp_path / "out.npy"
        done = subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", script, str(out)], env=env,
                              cwd=str(ROOT), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        np.testing.assert_allclose(np.load(out), dense(scale), rtol=1e-12, atol=1e-13)   # b has both signs: sums cancel
        return done

    assert "does not match" not in run_once().stderr
    kernels = [p for p in cache_dir.glob("*.so") if (cache_dir / (p.name[:64] + ".c")).read_text().count("kred_run")]
    assert len(kernels) == 1
    kernel = kernels[0]
    good = kernel.read_bytes()
    kernel.write_bytes(corrupt(good))
    second = run_once()
    assert second.stderr.count("does not match its recorded size and hash") == 1
    assert cache.verified(kernel) and kernel.read_bytes() == good       # the same build again
    assert sum(line.startswith(kernel.name[:64]) for line in builds(cache_dir)) == 2


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_a_corrupt_cubin_is_rebuilt_with_one_warning(corrupt, cache_dir):
    """The CUDA cubins share the entry mechanism (compiled by NVRTC, no GPU needed)."""
    from kred.engine.backends.cuda import cubin_path

    source = f'extern "C" __global__ void kred_k(float* out) {{ out[threadIdx.x] = {uuid.uuid4().int % 1000}.0f; }}\n'
    path = cubin_path(source, "sm_80")
    good = path.read_bytes()
    path.write_bytes(corrupt(good))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = cubin_path(source, "sm_80")
    assert again == path and path.read_bytes() == good and cache.verified(path)
    assert [str(w.message).count("does not match") for w in caught] == [1]


# Row 11: bounded loaded kernels ----------------------------------------------------------------------------------

def test_loaded_libraries_are_bounded_and_closed(cache_dir, small_memo):
    """30 distinct libraries through a memo of 4: the process keeps few mappings (unbounded: 5 per library),
    while a function someone still holds keeps its library loaded."""
    first = cache.load(fresh_source(1000), FLAGS, LIBS)["kred_value"]
    gc.collect()
    before = mappings()
    for k in range(30):
        assert cache.load(fresh_source(k), FLAGS, LIBS).kred_value() == k
    gc.collect()
    assert mappings() - before <= 4 * 6 + 5, mappings() - before
    assert len(small_memo) == 4
    assert first() == 1000


def test_the_cpu_backend_keeps_a_bounded_number_of_kernels(cache_dir, small_memo, monkeypatch):
    monkeypatch.setattr(limits, "LOADED_KERNELS", 3)
    backend = CpuBackend()
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((30, 1)), rng.standard_normal((20, 1))
    gc.collect()
    before = mappings()
    for k in range(7):
        scale = 1.0 + k / 8 + (uuid.uuid4().int % 10**6) / 10**9
        # the integer factor makes 7 kernels (float constants are run-time arguments: they alone would make one)
        plan = make_plan(Spec(f"Exp(-SqDist(x, y) * {scale!r}) * {k + 2}", ["x = Vi(1)", "y = Vj(1)"], axis=1))
        got = backend.reduce(plan, [x, y], 30, 20)
        np.testing.assert_allclose(got, (k + 2) * np.exp(-(x - y.T) ** 2 * scale).sum(1, keepdims=True), rtol=1e-12)
    gc.collect()
    assert len(backend._kernels) == 3
    assert mappings() - before <= 5 * 6 + 5, mappings() - before


# Row 11: the disk cache has a size cap ---------------------------------------------------------------------------

def entry_files(directory: Path) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in directory.iterdir():
        if path.is_file() and len(path.name.split(".")[0]) == 64:
            groups.setdefault(path.name[:64], []).append(path)
    return groups


def sources_in_separate_lock_files(directory: Path, count: int) -> list[str]:
    """`count` fresh sources whose keys fall in different lock files (one of 256, by key prefix: a held lock keeps
    every entry of its file, so two entries sharing one would both count as being built)."""
    for _ in range(100):
        sources = [fresh_source(k) for k in range(count)]
        keys = [cache.cache_key(source, cache.compiler(), FLAGS + LIBS) for source in sources]
        if len({cache.lock_path(directory, key) for key in keys}) == count:
            return sources
    raise AssertionError("no draw of keys fell in separate lock files")


def test_trim_deletes_least_recently_used_entries(cache_dir, small_memo):
    keys, sources = [], sources_in_separate_lock_files(cache_dir, 10)
    for k, source in enumerate(sources):
        cache.load(source, FLAGS, LIBS)
        key = cache.cache_key(source, cache.compiler(), FLAGS + LIBS)
        for path in entry_files(cache_dir)[key]:
            os.utime(path, (1_000_000 + k, 1_000_000 + k))           # entry k last used at time k
        keys.append(key)
    os.utime(cache_dir / f"{keys[0]}.so", (2_000_000, 2_000_000))     # entry 0 used most recently
    sizes = {key: sum(p.stat().st_size for p in files) for key, files in entry_files(cache_dir).items()}
    total = sum(sizes.values())
    with FileLock(str(cache.lock_path(cache_dir, keys[1]))):           # entry 1 is being built or checked: kept
        deleted = cache.trim(cache_dir, max_bytes=total // 2)
    left = entry_files(cache_dir)
    assert sum(sizes[key] for key in left) <= total // 2 * cache.TRIM_TO + max(sizes.values())
    assert deleted == total - sum(sizes[key] for key in left)
    assert keys[0] in left and keys[1] in left and keys[9] in left and keys[2] not in left
    assert len(list((cache_dir / "locks").iterdir())) <= 256
    cache.trim(cache_dir, max_bytes=1, keep=keys[9])                   # the entry just built is never trimmed
    assert list(entry_files(cache_dir)) == [keys[9]]
    # a trimmed entry is simply built again
    cache.forget_loaded()
    built = len(builds(cache_dir))
    assert cache.load(sources[2], FLAGS, LIBS).kred_value() == 2
    assert len(builds(cache_dir)) == built + 1


def test_processes_building_under_a_small_cap_all_get_their_kernels(cache_dir):
    """3 processes each build and use 6 libraries while the cap holds about 3: every value is right, the cache
    ends near its cap (a trim skips entries other processes are building), and no temporary file is left."""
    script = textwrap.dedent("""
        import sys, uuid
        from kred.engine.backends import cache
        from kred.engine.backends.cpu import FLAGS, LIBS
        for k in range(6):
            value = int(sys.argv[1]) * 100 + k
            lib = cache.load(f"/* {uuid.uuid4()} */ int kred_value(void) {{ return {value}; }}", FLAGS, LIBS)
            assert lib.kred_value() == value
        print("ok")
    """)
    cap = 60_000
    env = dict(os.environ, KRED_CACHE_DIR=str(cache_dir), KRED_CACHE_MAX_BYTES=str(cap))
    processes = [subprocess.Popen([sys.executable, "-c", script, str(p)], env=env, cwd=str(ROOT),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(3)]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.strip() == "ok", err[-2000:]
    sizes = {key: sum(p.stat().st_size for p in files) for key, files in entry_files(cache_dir).items()}
    assert sum(sizes.values()) <= cap + 3 * max(sizes.values()), sizes
    assert len(sizes) < 18 and not list(cache_dir.glob("*.tmp"))


# Row 11: bounded plans ---------------------------------------------------------------------------------------------

def test_make_plan_caches_plans_with_a_bound_on_count_and_bytes(monkeypatch):
    from kred.engine import plan as plan_module
    from kred.engine import spec as spec_module
    from kred.engine.errors import ArgumentError
    from kred.engine.formula import nodes

    aliases = ["x = Vi(3)", "y = Vj(3)"]
    first = make_plan(Spec("Exp(-SqDist(x, y) * 0.25)", aliases, axis=1))
    assert make_plan(Spec("Exp(-SqDist(x, y) * 0.25)", list(aliases), axis=1)) is first
    assert make_plan(Spec("Exp(-SqDist(x, y) * 0.25)", aliases, axis=0)) is not first
    with pytest.raises(ArgumentError, match="axis"):
        make_plan(Spec("Exp(-SqDist(x, y) * 0.25)", aliases, axis=True))      # not the cached plan of axis=1
    small = limits.BoundedLRU(8, 40 * plan_module.NODE_BYTES, getsizeof=plan_module.plan_bytes)
    monkeypatch.setattr(spec_module, "_PLANS", small)
    gc.collect()
    before = len(nodes._TABLE)
    for k in range(200):
        make_plan(Spec(f"Exp(-SqDist(x, y) * {k + 0.5}) * Sin(x | y) * {k + 1000.5}", aliases, axis=1))
    assert len(small) <= 8 and small.currsize <= 40 * plan_module.NODE_BYTES
    gc.collect()
    assert len(nodes._TABLE) - before < 100          # the nodes of dropped plans are freed (unbounded: ~2,000)
