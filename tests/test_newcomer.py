"""A newcomer's first hour: a missing extra is named, Ctrl-C of the server's cluster driver prints no traceback,
docstring examples render as code on the API pages."""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "gen"))

from griffe_code import fence_examples  # noqa: E402


def test_client_torch_without_torch_names_the_extra():
    code = "import sys; sys.modules['torch'] = None\nfrom kred.client.torch import Genred"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1
    assert "kred.client.torch needs torch: pip install 'kred[client,torch]'" in done.stderr.splitlines()[-1]


def _driver_child(conn):
    from kred.service import cluster_driver
    cluster_driver._leave_interrupts_to_parent()
    conn.send("ready")
    try:
        conn.recv()                       # blocks as the driver's loop does, until the pipe closes
    except EOFError:
        pass


def test_ctrl_c_leaves_the_cluster_driver_to_its_parent(capfd):
    """Ctrl-C sends SIGINT to the whole process group: the driver child ignores it (the server closes it)."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_driver_child, args=(child,))
    process.start()
    child.close()
    assert parent.poll(60) and parent.recv() == "ready"
    os.kill(process.pid, signal.SIGINT)
    time.sleep(0.5)
    assert process.is_alive()            # not interrupted
    parent.close()                       # what the server's close does: the child's loop ends
    process.join(30)
    assert process.exitcode == 0
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def test_docstring_examples_become_code_blocks():
    text = textwrap.dedent("""\
        A reduction, compiled on first use.
        >>> op = Genred("x", ["x = Vi(1)"])
        >>> with Cluster() as cl:
        ...     a = cl.reduce()
        Then text again.

            >>> indented()
        """)
    assert fence_examples(text).splitlines() == [
        "A reduction, compiled on first use.", "",
        "```pycon", '>>> op = Genred("x", ["x = Vi(1)"])', ">>> with Cluster() as cl:", "...     a = cl.reduce()",
        "```", "", "Then text again.", "",
        "    ```pycon", "    >>> indented()", "    ```"]


def test_the_extension_is_loaded_by_the_site():
    assert "docs/gen/griffe_code.py:FencedExamples" in (ROOT / "mkdocs.yml").read_text()
