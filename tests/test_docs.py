"""The documentation site builds offline with warnings as errors (what `make docs` runs), its generated references
hold every row of the op and reduction tables, and no page loads a script or stylesheet from outside the site."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kred.engine.formula.ops import ROWS
from kred.engine.reductions import REDUCTIONS

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_no_external_scripts_or_stylesheets(site):
    pages = list(site.rglob("*.html"))
    assert len(pages) > 10
    offenders = {str(p.relative_to(site)): EXTERNAL.findall(p.read_text(encoding="utf-8")) for p in pages}
    assert not {page: found for page, found in offenders.items() if found}
    assert EXTERNAL.search('<link rel="stylesheet" href="https://fonts.googleapis.com/css">')   # the grep works


def test_references_are_generated_from_the_tables(site):
    formulas = (site / "reference" / "formulas" / "index.html").read_text(encoding="utf-8")
    for row in ROWS:
        if row.name != "Var":
            assert f"<code>{row.name}</code>" in formulas, row.name
    reductions = (site / "reference" / "reductions" / "index.html").read_text(encoding="utf-8")
    for name in REDUCTIONS:
        assert f"<code>{name}</code>" in reductions, name
    assert "could not bind" not in reductions


def test_pages_and_pictures(site):
    gallery = (site / "gallery" / "index.html").read_text(encoding="utf-8")
    for example in sorted(p.stem for p in (ROOT / "examples").glob("*.py") if p.stem != "modes"):
        assert f'src="{example}.png"' in gallery, example
        assert (site / "gallery" / f"{example}.png").stat().st_size > 1000
    http = (site / "http-api" / "index.html").read_text(encoding="utf-8")
    assert "/v1/reduce" in http and "/v1/jobs" in http
    for page in ("install", "quickstart", "deployment", "benchmarks", "ARCHITECTURE", "api/frontends", "api/cluster",
                 "api/client"):
        assert (site / page / "index.html").exists(), page
    assert "LazyTensor" in (site / "api" / "frontends" / "index.html").read_text(encoding="utf-8")


def test_api_pages_name_the_public_modules(site):
    """Headings and anchors read kred.numpy.Genred, kred.Client..., not the repository's folders (engine.numpy...)."""
    public = {"frontends": ["kred.numpy.Genred", "kred.numpy.LazyTensor", "kred.numpy.KernelSolve",
                            "kred.torch.Genred", "kred.torch.LazyTensor", "kred.torch.KernelSolve"],
              "cluster": ["kred.cluster.Cluster", "kred.cluster.run_job_file", "kred.cluster.Dataset"],
              "client": ["kred.Client", "kred.AsyncClient", "kred.client.torch.Genred", "kred.client.torch.LazyTensor"]}
    for page, names in public.items():
        html = (site / "api" / page / "index.html").read_text(encoding="utf-8")
        anchors = re.findall(r'<h\d id="([\w.]+)" class="doc doc-heading"', html)
        headings = {re.sub(r"<[^>]+>", "", h).split("(")[0].strip()
                    for h in re.findall(r'class="doc doc-heading">\s*(<code.*?</code>)', html, re.S)}
        for name in names:
            assert name in anchors and name in headings, (page, name)
        assert anchors and all(a.startswith("kred.") for a in anchors), (page, anchors)
