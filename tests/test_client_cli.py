"""The `kred` command as a new user meets it: --version, one line naming the extra a command needs when it is not
installed, one line (no traceback) for a server that is down."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import kred

ROOT = Path(__file__).resolve().parents[1]


def kred_command(*args, blocked=(), env=None):
    """`kred ARGS` in a fresh interpreter where the modules `blocked` cannot be imported (an install without them)."""
    script = (f"import sys\nfor name in {list(blocked)!r}:\n    sys.modules[name] = None\n"
              f"sys.argv = ['kred', *{list(args)!r}]\nfrom kred.__main__ import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)


def test_version():
    done = kred_command("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"kred {kred.__version__}"


@pytest.mark.parametrize("args,blocked,extra,missing", [
    (["jobs", "list"], ["httpx"], "client", "httpx"),                    # an engine-only install
    (["run", "job.yaml"], ["yaml"], "cluster", "yaml"),                  # [client] only: no yaml, no ray
    (["serve"], ["fastapi", "uvicorn"], "server", "fastapi, uvicorn"),
    (["reduce", "x", "-a", "x=Vi(1)", "-i", "x=x.npy", "-o", "o.npy"], ["pyarrow"], "client", "pyarrow"),
])
def test_each_command_names_the_extra_it_needs(tmp_path, args, blocked, extra, missing):
    if args[0] == "run":
        (tmp_path / "job.yaml").write_text("formula: x\n")
        args = ["run", str(tmp_path / "job.yaml")]
    done = kred_command(*args, blocked=blocked)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: kred {args[0]} needs the '{extra}' extra ({missing} not installed): "
                                   f"pip install 'kred[{extra}]'")


def test_without_typer_the_command_says_what_to_install():
    done = kred_command("--help", blocked=["typer"])
    assert done.returncode == 1 and done.stderr.strip().endswith("pip install 'kred[client]'")
    assert "Traceback" not in done.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]            # nothing listens there once the socket is closed


def test_a_down_server_is_one_line_naming_its_url():
    url = f"http://127.0.0.1:{closed_port()}"
    done = kred_command("jobs", "list", "--url", url)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach a kred server at {url}: ")


def test_the_client_raises_its_own_error_for_a_down_server():
    from kred.client import Client, ServerUnreachable
    url = f"http://127.0.0.1:{closed_port()}"
    with Client(url, retries=1) as c, pytest.raises(ServerUnreachable, match=f"at {url}") as raised:
        c.health()
    assert raised.value.url == url and isinstance(raised.value, ConnectionError)


def test_serve_prints_its_banner_once_it_accepts_connections(tmp_path):
    import httpx
    port = closed_port()
    env = dict(os.environ, KRED_BACKEND="reference")
    process = subprocess.Popen([sys.executable, "-m", "kred", "serve", "--executor", "local", "--port", str(port),
                                "--store-dir", str(tmp_path), "--log-level", "warning"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = process.stdout.readline()               # blocks until the banner (or the server's end)
        assert line.startswith(f"kred serve: http://127.0.0.1:{port} ")
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)    # at once: no retry, no wait
        assert health.status_code == 200
    finally:
        process.terminate()
        process.wait(30)


def test_job_progress_bar_in_a_log_is_calm_and_in_percent():
    import io
    import time

    from kred.client.jobs import LOG_REDRAW_S, _bar
    log = io.StringIO()                                # not a terminal
    bar = _bar("0123456789abcdef", file=log)
    start = time.monotonic()
    for percent in range(1, 101):                      # a job polled every few ms
        bar.update(1)
        time.sleep(0.002)
    elapsed = time.monotonic() - start
    bar.close()
    draws = [d for d in log.getvalue().replace("\n", "\r").split("\r") if d.strip()]
    assert elapsed < LOG_REDRAW_S and len(draws) <= 2  # the first draw and the closing one
    assert draws[-1].startswith("kred job 01234567: 100%|") and "/s" not in log.getvalue()
