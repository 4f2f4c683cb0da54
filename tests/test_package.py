"""The installed package: one top-level `kred` namespace, and no module importing the layers by their folder names."""
import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"engine", "service", "client"}


def test_public_modules_expose_the_front_ends():
    import kred
    import kred.cluster
    import kred.numpy
    import kred.torch
    from kred.engine.numpy import Genred as EngineGenred

    assert kred.numpy.Genred is EngineGenred
    assert {"Genred", "LazyTensor", "KernelSolve", "Vi", "Vj", "Pm"} <= set(kred.numpy.__all__) & set(kred.torch.__all__)
    assert kred.cluster.Cluster is kred.Cluster
    assert kred.Client.__module__ == "kred.client.client"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kred.nope


def test_no_module_imports_a_layer_by_its_folder_name():
    offenders = []
    for path in [p for d in (*LAYERS, "kred", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in LAYERS]
    assert offenders == []


@pytest.mark.slow
def test_wheel_has_a_single_top_level_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("kred-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"kred", wheel.name.split("-py")[0] + ".dist-info"}
    for must in ("kred/__init__.py", "kred/py.typed", "kred/engine/formula/ops.py", "kred/service/app.py",
                 "kred/client/cli.py", "kred/numpy.py", "kred/torch.py", "kred/cluster.py",
                 "kred/wire/arrow.py", "kred/wire/shm.py"):
        assert must in names
    assert not any(n.startswith("kred/tests") or n.startswith("kred/benchmarks") for n in names)
