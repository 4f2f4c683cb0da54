"""mkdocs hook: the pages that are generated from the code and the repository, so that they cannot drift.

- reference/formulas.md and reference/reductions.md: from the op table (kred.engine.formula.ops.ROWS) and the
  reduction table (kred.engine.reductions.REDUCTIONS), whatever rows they hold when the site is built;
- http-api.md: from the OpenAPI schema of kred.service.app.create_app;
- gallery/index.md: from the examples' docstrings, with their pictures (docs/gallery/<example>.png);
- install, quick start, guide pages and benchmarks: sections of README.md (between `<!-- section: name -->` marks);
  deployment.md: deploy/README.md; benchmarks: every JSON and PNG of benchmarks/results; architecture.md:
  docs/ARCHITECTURE.md, served as it is.
The API pages document the public names (`::: kred.numpy.Genred`): griffe reads the package as it is installed, a
`kred/` folder holding the repository's kred/ files and its layers (engine/, service/, client/), which `on_config`
lays out as links in a temporary folder.
Links from the repository's markdown to files that are not on the site become plain code text.
"""
from __future__ import annotations

import ast
import atexit
import json
import re
import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]

# README sections -> pages (a page may gather several sections)
README_PAGES = {
    "install.md": ("Install", ["install", "development"]),
    "quickstart.md": ("Quick start", ["quickstart", "lazytensor"]),
    "guide/backends.md": ("Backends", ["backends"]),
    "guide/cluster.md": ("Cluster and batch jobs", ["cluster"]),
    "guide/service.md": ("Service and client", ["service"]),
}
LAYERS = ["engine", "service", "client"]          # installed as kred.engine, kred.service, kred.client (setup.py)
EXAMPLES = ["kmeans", "knn", "gp_regression", "sinkhorn", "gmm_em", "block_sparse", "batch_job"]


@event_priority(100)                    # before mkdocstrings' own on_config, which creates the handler
def on_config(config):
    """Point mkdocstrings' python handler at the installed layout of the package, so that pages, headings and cross
    references name `kred.numpy.Genred`, `kred.cluster.Cluster`..., never the repository's folders."""
    handler = config.plugins["mkdocstrings"].config.handlers.setdefault("python", {})
    handler["paths"] = [str(installed_layout())]
    return config


def installed_layout() -> Path:
    """A temporary folder holding `kred/`: links to kred/'s entries and to the layers, as the wheel installs them."""
    top = Path(tempfile.mkdtemp(prefix="kred-griffe-"))
    atexit.register(shutil.rmtree, top, ignore_errors=True)
    package = top / "kred"
    package.mkdir()
    for entry in [*(ROOT / "kred").iterdir(), *(ROOT / layer for layer in LAYERS)]:
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return top


def on_files(files, config):
    pages = {
        **{page: readme_page(title, sections, page) for page, (title, sections) in README_PAGES.items()},
        "reference/formulas.md": formulas_page(),
        "reference/reductions.md": reductions_page(),
        "http-api.md": http_api_page(),
        "gallery/index.md": gallery_page(),
        "deployment.md": "# Deployment\n\n" + strip_title(publish_links(read("deploy/README.md"), "deploy", "deployment.md")),
        "benchmarks.md": benchmarks_page(),
    }
    for uri, text in pages.items():
        files.append(File.generated(config, uri, content=text))
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{path.name}", abs_src_path=str(path)))
    return files


# Repository markdown -------------------------------------------------------------------------------------------

def read(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


def readme_sections() -> dict[str, str]:
    parts = re.split(r"<!-- section: (\w+) -->\n", read("README.md"))
    return dict(zip(parts[1::2], parts[2::2]))


def readme_page(title: str, names: list[str], page: str) -> str:
    sections = readme_sections()
    body = "\n".join(demote(publish_links(sections[name], ".", page)) for name in names if name in sections)
    return f"# {title}\n\n{body}"


def demote(text: str) -> str:
    """README headings one level down, under the page's own title."""
    return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)


def strip_title(text: str) -> str:
    return re.sub(r"\A# .*\n", "", text)


def publish_links(text: str, folder: str, page: str) -> str:
    """Links of a markdown file in `folder` of the repository, made right for the site page `page`: benchmark plots
    point at their published copies, deploy/README.md at the deployment page, other repository files become code
    text."""
    up = "../" * page.count("/")

    def fix(match):
        bang, label, target = match.group(1), match.group(2), match.group(3)
        if re.match(r"[a-z]+://|#|mailto:", target):
            return match.group(0)
        path = (Path(folder) / target).as_posix().lstrip("./")
        path = str(Path(path))
        if path.startswith("benchmarks/results/") and path.endswith(".png"):
            return f"{bang}[{label}]({up}{path.replace('results/', '')})"
        if path == "deploy/README.md":
            return f"[{label}]({up}deployment.md)"
        return f"{label} (`{path}`)" if label != path else f"`{path}`"
    return re.sub(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)", fix, text)


# The op and reduction tables -----------------------------------------------------------------------------------

def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def formulas_page() -> str:
    from kred.engine.formula.ops import ROWS
    intro = readme_sections().get("formulas", "")
    intro = demote(intro.split("\nThe ops")[0]) if "\nThe ops" in intro else ""
    lines = ["# Formula reference", "", "Generated from the op table (`kred.engine.formula.ops`) when the site is built.",
             "", intro, "", "## Ops", "",
             "| op | operands | integer parameters | gradient rules (per operand) | C (one component) | rewritten as |",
             "|---|---|---|---|---|---|"]
    for row in ROWS:
        if getattr(row, "leaf", False) and row.name == "Var":
            continue
        grad = row.grad if isinstance(row.grad, tuple) else (None if row.grad is None else "computed from parameters")
        if isinstance(grad, tuple):
            grad = "; ".join("not differentiable" if rule is None else f"`{rule}`" for rule in grad)
        expand = row.expand if isinstance(row.expand, str) else ("by dimension" if row.expand else "")
        lines.append("| " + " | ".join(cell(v) for v in (
            f"`{row.name}`" + (f" — {row.doc}" if getattr(row, "doc", "") else ""), row.arity,
            ", ".join(getattr(row, "params", ()) or ()) or "", grad or "",
            f"`{row.c}`" if getattr(row, "c", None) else "", f"`{expand}`" if expand else "")) + " |")
    lines += ["", "In gradient rules `x`, `y`, `z` are the operands, `out` the op's value and `g` its cotangent; "
              "`{d0}`, `{p0}` stand for an operand's dimension and a parameter."]
    return "\n".join(lines) + "\n"


def reductions_page() -> str:
    from kred.engine import reductions
    intro = readme_sections().get("reductions", "")
    lines = ["# Reduction reference", "", "Generated from the reduction table (`kred.engine.reductions`) when the "
             "site is built.", "", demote(intro.split("\n| reduction")[0]), "",
             "## Reductions", "", "| reduction | opt_arg (K) | formula2 (weights) | differentiable | "
             "over an empty set | outputs for a formula of dimension D | state |", "|---|---|---|---|---|---|---|"]
    for name, cls in reductions.REDUCTIONS.items():
        weighted = bool(getattr(cls, "weighted", False) or getattr(cls, "uses_formula2", False) is True)
        try:
            bound = reductions.bind(name, 1 if weighted else 3, 2 if weighted else None, 4)
            outputs = ", ".join(f"{kind} ({width})" for kind, width in bound.outputs)
            state = ", ".join(part[0] for part in bound.layout())
            dims = "D = 1, formula2 of dimension 2" if weighted else "D = 3, K = 4"
            outputs = f"{outputs} — for {dims}"
        except Exception as error:          # a row this page does not know how to bind: say so, do not hide it
            outputs, state = f"(could not bind: {error})", ""
        lines.append("| " + " | ".join(cell(v) for v in (
            f"`{name}`", "yes" if getattr(cls, "needs_k", False) else "", "yes" if weighted else "",
            "yes" if getattr(cls, "differentiable", True) else "no",
            "allowed" if getattr(cls, "empty_ok", True) else "an error", outputs, state)) + " |")
    return "\n".join(lines) + "\n"


# The HTTP API ---------------------------------------------------------------------------------------------------

def http_api_page() -> str:
    from kred.service.app import create_app
    from kred.service.settings import Settings
    schema = create_app(Settings()).openapi()
    lines = ["# HTTP API", "", f"Generated from the OpenAPI schema of `kred.service.app.create_app` "
             f"({schema['info'].get('title', '')} {schema['info'].get('version', '')}). A running server also "
             "serves it at `/openapi.json` and interactively at `/docs`.", ""]
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            lines += [f"## `{method.upper()} {path}`", "", op.get("summary", ""), "", op.get("description", ""), ""]
            params = op.get("parameters", [])
            if params:
                lines += ["| parameter | in | type | required |", "|---|---|---|---|"]
                lines += [f"| `{p['name']}` | {p.get('in', '')} | {cell(type_of(p.get('schema', {})))} | "
                          f"{'yes' if p.get('required') else ''} |" for p in params]
                lines.append("")
            body = op.get("requestBody", {}).get("content", {})
            for kind, content in body.items():
                lines.append(f"Request body (`{kind}`): {type_of(content.get('schema', {}))}")
            if body:
                lines.append("")
            lines += ["| status | meaning |", "|---|---|"]
            lines += [f"| {code} | {cell(reply.get('description', ''))} |" for code, reply in op.get("responses", {}).items()]
            lines.append("")
    models = schema.get("components", {}).get("schemas", {})
    if models:
        lines += ["## Schemas", ""]
        for name, model in models.items():
            lines += [f"### {name}", "", model.get("description", ""), ""]
            props = model.get("properties", {})
            if props:
                required = set(model.get("required", []))
                lines += ["| field | type | required | default |", "|---|---|---|---|"]
                lines += [f"| `{field}` | {cell(type_of(spec))} | {'yes' if field in required else ''} | "
                          f"{cell(json.dumps(spec['default'])) if 'default' in spec else ''} |"
                          for field, spec in props.items()]
                lines.append("")
    return "\n".join(lines) + "\n"


def type_of(spec: dict) -> str:
    if "$ref" in spec:
        name = spec["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    for key in ("anyOf", "oneOf", "allOf"):
        if key in spec:
            return " or ".join(type_of(s) for s in spec[key])
    if spec.get("type") == "array":
        return f"array of {type_of(spec.get('items', {}))}"
    if "enum" in spec:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in spec["enum"])
    return spec.get("type", "any")


# Gallery and benchmarks -----------------------------------------------------------------------------------------

def gallery_page() -> str:
    lines = ["# Gallery", "", "Applications in `examples/`. Each is a short script with `--size` and "
             "`--mode local|cluster|server` (in-process, the embedded Ray cluster, a server through `kred.Client`), "
             "saves its picture and prints a check against an independent computation on a subsample (it exits "
             "with status 1 when a check fails). The pictures here were made at sizes that run in a minute or two on a 2-core machine "
             "(block-sparse: 10^6 points); `tests/test_examples.py` runs every example at a small size in CI.", ""]
    for name in EXAMPLES:
        source = ROOT / "examples" / f"{name}.py"
        doc = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8"))) or ""
        title, _, rest = doc.partition("\n")
        body, _, command = rest.strip().rpartition("\n\n")
        lines += [f"## {title.rstrip('.')}", "", body, "", "```bash", command.strip(), "```", ""]
        if (ROOT / "docs" / "gallery" / f"{name}.png").exists():
            lines += [f"![{name}]({name}.png)", ""]
    return "\n".join(lines)


def benchmarks_page() -> str:
    sections = readme_sections()
    lines = ["# Benchmarks", "", demote(publish_links(sections.get("performance", ""), ".", "benchmarks.md")), "",
             "## Result files", "", "Every result in `benchmarks/results/` (`python -m benchmarks.run` and the "
             "`benchmarks/bench_*.py` scripts write them, with the machine they ran on).", "",
             "| file | machine |", "|---|---|"]
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        try:
            machine = json.loads(path.read_text()).get("machine", "")
        except (ValueError, AttributeError):
            machine = ""
        if isinstance(machine, dict):
            machine = ", ".join(f"{k}: {v}" for k, v in list(machine.items())[:4])
        lines.append(f"| `{path.name}` | {cell(machine)} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}](benchmarks/{p.name})" for p in sorted((ROOT / "benchmarks" / "results").glob("*.png"))]
    return "\n".join(lines) + "\n"
