"""Every public name of pykeops 2.3 (pykeops.numpy, pykeops.torch, LazyTensor) has a row in README's pykeops
compatibility section, and the row tells the truth: a "yes" exists in kred, a "refused" LazyTensor name raises an
error naming the alternative, a "submodule" is one of pykeops's own modules. pykeops is read for its names only (it
is installed as the benchmark peer), never run."""
from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import kred.numpy as kn
import kred.torch as kt

pykeops_numpy = pytest.importorskip("pykeops.numpy")     # installed with the bench extra, which `make test` installs
pykeops_torch = pytest.importorskip("pykeops.torch")

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def rows(title: str) -> dict[str, str]:
    section = README.split("<!-- section: pykeops -->", 1)[1].split("<!-- section:", 1)[0]
    table = section.split(f"| {title} |", 1)[1].split("\n\n", 1)[0]
    return dict(re.findall(r"^\| `([^`]+)` \| (.+) \|$", table, re.M))


def public(names):
    return sorted(n for n in names if not n.startswith("_"))


@pytest.mark.parametrize("module, ours, title", [(pykeops_numpy, kn, "`pykeops.numpy` name"),
                                                 (pykeops_torch, kt, "`pykeops.torch` name")],
                         ids=["numpy", "torch"])
def test_every_module_name_has_a_true_row(module, ours, title):
    table = rows(title)
    missing = [n for n in public(dir(module)) if n not in table]
    assert not missing, f"pykeops names without a row in README: {missing}"
    for name, status in table.items():
        kind = status.split(":")[0]
        assert kind in ("yes", "refused", "submodule"), (name, status)
        if kind == "yes":
            assert hasattr(ours, name), name
        elif kind == "submodule":
            assert isinstance(getattr(module, name), types.ModuleType) or name == "torch_version_required", name
        else:
            pytest.fail(f"{name}: unknown status {status!r}")


def test_every_lazytensor_name_has_a_true_row():
    table = rows("LazyTensor method or attribute")
    names = public(dir(pykeops_torch.LazyTensor)) + public(dir(pykeops_torch.ComplexLazyTensor))
    missing = sorted({n for n in names if n not in table})
    assert not missing, f"pykeops LazyTensor names without a row in README: {missing}"
    for binding, lazy, complex_lazy in ((kn, np.ones((3, 1, 2)), np.ones((3, 1, 2), np.complex128)),
                                        (kt, torch.ones(3, 1, 2), torch.ones(3, 1, 2, dtype=torch.complex128))):
        lazy, complex_lazy = binding.LazyTensor(lazy), binding.ComplexLazyTensor(complex_lazy)
        for name, status in table.items():
            if status.startswith("yes"):        # complex-only names are checked on the ComplexLazyTensor
                assert hasattr(lazy if hasattr(pykeops_torch.LazyTensor, name) else complex_lazy, name), name
            else:
                assert status.startswith("refused"), (name, status)
                with pytest.raises(AttributeError, match="kred|use "):
                    getattr(lazy, name)
