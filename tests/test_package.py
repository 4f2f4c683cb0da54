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


def _kred_folder_modules() -> set[str]:
    """What kred/ itself holds, read from the file system: its modules and packages."""
    folder = ROOT / "kred"
    return ({p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
            | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()})


# Run in a fresh interpreter: where kred and its layers come from, what kred.__path__ lists, what does not import.
INSPECT = """
import json, pkgutil, pydoc, sys
import kred, kred.engine, kred.service, kred.client
refused = []
for name in ("kred.setup", "kred.benchmarks", "kred.tests", "kred.sitecustomize", "kred.sourcetree"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        refused.append(name)
text = pydoc.render_doc(kred, renderer=pydoc.plaintext).splitlines()
sections, current = {}, None
for line in text:
    if line and not line[0].isspace():
        current = sections.setdefault(line.strip(), [])
    elif current is not None and line.strip():
        current.append(line.split()[0])
print(json.dumps({"files": [m.__file__ for m in (kred, kred.engine, kred.service, kred.client)],
                  "modules": sorted(m.name for m in pkgutil.iter_modules(kred.__path__)),
                  "help": sections, "refused": refused, "path": sys.path}))
"""


def _inspect(python: str, cwd: Path, pythonpath: str | None) -> dict:
    import json
    import os
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | ({"PYTHONPATH": pythonpath} if pythonpath
                                                                         else {})
    done = subprocess.run([python, "-c", INSPECT], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _assert_only_kred(seen: dict) -> None:
    assert [Path(f).resolve() for f in seen["files"]] == [
        ROOT / "kred" / "__init__.py", ROOT / "engine" / "__init__.py", ROOT / "service" / "__init__.py",
        ROOT / "client" / "__init__.py"]
    assert set(seen["modules"]) == set(seen["help"]["PACKAGE CONTENTS"]) == _kred_folder_modules()
    assert set(seen["help"]["SUBMODULES"]) <= _kred_folder_modules() | {"engine", "service", "client"}
    assert seen["refused"] == ["kred.setup", "kred.benchmarks", "kred.tests", "kred.sitecustomize",
                               "kred.sourcetree"]


def test_a_checkout_on_pythonpath_imports_its_own_layers_only(tmp_path):
    """PYTHONPATH=<checkout> (the tests, their subprocesses, the GPU check's steps): this checkout's layers, even
    beside an editable install of another checkout, and kred.__path__ is kred/ alone."""
    _assert_only_kred(_inspect(sys.executable, tmp_path, str(ROOT)))


@pytest.mark.slow
def test_editable_install_maps_the_layers_without_the_repository_root(tmp_path):
    """`pip install -e .` in a fresh venv (its dependencies read from this one's site-packages through a path entry,
    whose own .pth files are not run): the layers come from their folders, the repository root is not on sys.path,
    and help(kred) lists kred's modules only. Before installing, the GPU check's way (PYTHONPATH=<checkout>) works."""
    import sysconfig
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                          capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    absent = subprocess.run([python, "-c", "import kred"], cwd=elsewhere, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert absent.returncode != 0 and "No module named 'kred'" in absent.stderr      # not installed there
    _assert_only_kred(_inspect(python, elsewhere, str(ROOT)))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed",
                    "-e", str(ROOT)], check=True, capture_output=True, timeout=600)
    seen = _inspect(python, elsewhere, None)
    _assert_only_kred(seen)
    assert str(ROOT) not in [str(Path(p).resolve()) for p in seen["path"] if p]
