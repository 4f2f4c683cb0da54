"""A griffe extension: the interactive examples of docstrings (`>>>` lines and their `...` continuations) become
fenced `pycon` code blocks. Markdown knows no doctest blocks: without this, an example that follows a line of text
is joined to it as one paragraph. Loaded by mkdocstrings (mkdocs.yml, `extensions`)."""
from __future__ import annotations

import griffe

PROMPTS = (">>>", "...")


def fence_examples(text: str) -> str:
    """`text` with every run of prompt lines fenced (at the run's indentation, blank lines around it)."""
    lines, out, k = text.splitlines(), [], 0
    while k < len(lines):
        line = lines[k]
        if not line.lstrip().startswith(">>>"):
            out.append(line)
            k += 1
            continue
        indent = line[:len(line) - len(line.lstrip())]
        run = []
        while k < len(lines) and lines[k].startswith(indent) and lines[k].lstrip().startswith(PROMPTS):
            run.append(lines[k])
            k += 1
        if out and out[-1].strip():
            out.append("")
        out += [f"{indent}```pycon", *run, f"{indent}```"]
        if k < len(lines) and lines[k].strip():
            out.append("")
    return "\n".join(out)


class FencedExamples(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_examples(obj.docstring.value)
