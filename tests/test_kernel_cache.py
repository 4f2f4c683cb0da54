"""The compiled-kernel cache: content addressing, concurrent builds by many processes, corrupt entries, errors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from kred.engine.backends import cache
from kred.engine.backends.cpu import FLAGS, LIBS
from kred.engine.codegen.cpu import cpu_source
from kred.engine.errors import BackendError
from kred.engine.spec import Spec, make_plan

ROOT = Path(__file__).parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KRED_CACHE_DIR", str(tmp_path))
    return tmp_path


def builds(directory: Path) -> list[str]:
    log = directory / "builds.log"
    return log.read_text().splitlines() if log.exists() else []


def small_source(value: int) -> str:
    return f"int kred_value(void) {{ return {value}; }}\n"


def test_key_depends_on_source_compiler_and_flags():
    cc = cache.compiler()
    key = cache.cache_key("int f;", cc, ("-O3",))
    assert key == cache.cache_key("int f;", cc, ("-O3",))
    assert key != cache.cache_key("int g;", cc, ("-O3",))
    assert key != cache.cache_key("int f;", cc, ("-O2",))
    assert key != cache.cache_key("int f;", cc, ("-O3", "-ffast-math"))
    other = cache.Compiler(cc.path, cc.identity + " (patched)")
    assert key != cache.cache_key("int f;", other, ("-O3",))


def test_build_once_then_memo_and_disk(cache_dir):
    value = int(uuid.uuid4().int % 100000)
    lib = cache.load(small_source(value), FLAGS, LIBS)
    assert lib.kred_value() == value
    assert len(builds(cache_dir)) == 1
    assert cache.load(small_source(value), FLAGS, LIBS) is lib          # in-process memo
    cache.forget_loaded()
    assert lib.kred_value() == value                                    # still loaded while referenced
    assert cache.load(small_source(value), FLAGS, LIBS).kred_value() == value   # from disk, no new build
    assert len(builds(cache_dir)) == 1
    assert cache.load(small_source(value), FLAGS + ("-DKRED_OTHER",), LIBS).kred_value() == value
    assert len(builds(cache_dir)) == 2                                    # other flags, other entry


def test_entry_without_a_checksum_is_rebuilt(cache_dir):
    """An entry with no recorded checksum (an older kred's, or garbage) is rebuilt without being loaded."""
    source = small_source(4242 + int(uuid.uuid4().int % 1000))
    key = cache.cache_key(source, cache.compiler(), FLAGS + LIBS)
    (cache_dir / f"{key}.so").write_bytes(b"\x7fELF this is not a shared library")
    assert cache.load(source, FLAGS, LIBS).kred_value() > 4000
    assert len(builds(cache_dir)) == 1
    assert (cache_dir / f"{key}.so").read_bytes()[:4] == b"\x7fELF"


def test_compile_error_names_the_source_and_the_compiler_message(cache_dir):
    with pytest.raises(BackendError) as info:
        cache.load("int broken( { return ; }\n", FLAGS, LIBS)
    message = str(info.value)
    source_path = message.split("generated source ")[1].split()[0]
    assert Path(source_path).read_text().startswith("int broken(")
    assert "error" in message
    assert not list(cache_dir.glob("*.so")) and not list(cache_dir.glob("*.tmp"))


def test_no_user_text_reaches_the_source():
    plan = make_plan(Spec("Exp(-SqDist(my_secret_point, other_cloud)) * weights_alias",
                     ["my_secret_point = Vi(3)", "other_cloud = Vj(3)", "weights_alias = Vj(1)"], axis=1))
    source = cpu_source(plan, "float32", "float64")
    for name in ("my_secret_point", "other_cloud", "weights_alias"):
        assert name not in source


def test_eight_processes_build_a_new_kernel_once(cache_dir):
    """8 processes ask for the same never-seen formula at once: one build, every process gets the right answer."""
    scale = 1.0 + (uuid.uuid4().int % 10**6) / 10**7        # a formula no cache has seen
    script = textwrap.dedent(f"""
        import numpy as np
        from kred.engine.numpy import Genred
        op = Genred("Exp(-SqDist(x, y) * {scale!r}) * b", ["x = Vi(2)", "y = Vj(2)", "b = Vj(1)"], axis=1)
        rng = np.random.default_rng(0)
        x, y, b = rng.standard_normal((50, 2)), rng.standard_normal((60, 2)), rng.standard_normal((60, 1))
        print(repr(float(op(x, y, b, backend="cpu").sum())))
    """)
    env = dict(os.environ, KRED_CACHE_DIR=str(cache_dir), KRED_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=str(ROOT)) for _ in range(8)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err
    rng = np.random.default_rng(0)
    x, y, b = rng.standard_normal((50, 2)), rng.standard_normal((60, 2)), rng.standard_normal((60, 1))
    want = (np.exp(-((x[:, None] - y[None]) ** 2).sum(-1) * scale) @ b).sum()
    for out, _ in outputs:
        assert abs(float(out) - want) < 1e-9 * abs(want)
    # one build of the OpenMP probe, one of the kernel, whoever won the lock
    assert len(builds(cache_dir)) == 2, builds(cache_dir)
    assert len(list(cache_dir.glob("*.so"))) == 2 and not list(cache_dir.glob("*.tmp"))
    assert all(cache.verified(path) for path in cache_dir.glob("*.so"))
