"""The `kred` command line (installed as `kred`; also `python -m kred`).

    kred --version
    kred serve [--host 127.0.0.1] [--port 8000] [--ray-address ADDR] [--token-file PATH] [--executor cluster|local]
    kred run JOB.yaml [--address ADDR]                          batch job on a Ray cluster (engine.cluster)
    kred reduce FORMULA -a 'x=Vi(3)' -a 'y=Vj(3)' -i x=x.npy -i y=y.npy --axis 1 -o out.npy [--url URL] [--local]
    kred jobs list | show ID | result ID -o out.npy | cancel ID

Client commands read the server from --url or $KRED_URL and the token from --token-file or $KRED_TOKEN.
Each command first checks that the extra it needs is installed and otherwise says which one (one line, no
traceback); the errors a user can cause (a bad formula, a server that is down or answers an error) are one line too.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from kred import __version__

# What each extra brings that a command imports (pyproject.toml's optional dependencies).
EXTRAS = {"server": ("fastapi", "uvicorn", "pydantic_settings", "ray"),
          "cluster": ("ray", "yaml", "pydantic"),
          "client": ("httpx", "pyarrow", "pydantic")}

app = typer.Typer(help="kred: KeOps-style formula reductions on CPUs, GPUs, Ray clusters and over HTTP.",
                  no_args_is_help=True, add_completion=False)
jobs_app = typer.Typer(help="Jobs on a kred server.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"kred {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="print kred's version and exit")):
    """kred: KeOps-style formula reductions on CPUs, GPUs, Ray clusters and over HTTP."""

URL = typer.Option(os.environ.get("KRED_URL", "http://127.0.0.1:8000"), "--url", help="the server ($KRED_URL)")
TOKEN_FILE = typer.Option(None, "--token-file", help="file holding the bearer token (else $KRED_TOKEN)")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _need(extra: str, command: str) -> None:
    """Fail with the pip command to run when the extra `command` needs is not installed."""
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        _fail(f"kred {command} needs the '{extra}' extra ({', '.join(missing)} not installed): "
              f"pip install 'kred[{extra}]'")


def _one_line(command):
    """Errors a user can cause end the command with one line (`error: ...`), not a traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from kred.engine.errors import KredError
        try:
            from .errors import RemoteError, ServerUnreachable
            expected = (KredError, RemoteError, ServerUnreachable, TimeoutError)
        except ImportError:            # no client extra: _need said so before anything could raise these
            expected = (KredError,)
        try:
            return command(*args, **kwargs)
        except expected as e:
            _fail(str(e))
    return wrapper


def _token(token_file: Optional[Path]) -> Optional[str]:
    if token_file is None:
        return None
    try:
        return token_file.read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError):
        _fail(f"cannot read a token from {token_file}")


def _client(url: str, token_file: Optional[Path], command: str = "jobs"):
    _need("client", command)
    from .client import Client
    return Client(url, _token(token_file))


# serve --------------------------------------------------------------------------------------------------

@app.command()
def serve(host: Optional[str] = typer.Option(None, help="address to bind (default 127.0.0.1; $KRED_HOST)"),
          port: Optional[int] = typer.Option(None, help="port (default 8000; $KRED_PORT)"),
          ray_address: Optional[str] = typer.Option(None, help="Ray cluster to run on (default: an embedded Ray)"),
          token_file: Optional[Path] = typer.Option(None, help="require this bearer token (first line of the file)"),
          executor: Optional[str] = typer.Option(None, help="'cluster' (Ray, default) or 'local' (in-process)"),
          store_dir: Optional[Path] = typer.Option(None, help="job store directory ($KRED_STORE_DIR)"),
          shm: Optional[bool] = typer.Option(None, "--shm/--no-shm", help="accept same-host shared memory"),
          insecure: bool = typer.Option(False, help="allow a non-loopback address without a token"),
          log_level: str = typer.Option("info", help="uvicorn log level")):
    """Start the HTTP service (settings also come from KRED_* environment variables). Needs the 'server' extra."""
    _need("server", "serve")
    import uvicorn

    from kred.service.app import create_app, server_config, widen_uvicorn_reads
    from kred.service.settings import Settings
    overrides = {"host": host, "port": port, "ray_address": ray_address, "token_file": token_file,
                 "executor": executor, "store_dir": store_dir, "allow_shm": shm}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "executor" not in overrides and "KRED_EXECUTOR" not in os.environ:
        overrides["executor"] = "cluster"            # `kred serve` runs on Ray (embedded unless --ray-address)
    try:
        settings = Settings(**overrides)
    except ValueError as e:
        _fail(str(e))
    if settings.token is None and not settings.tenants and not insecure and not _loopback(settings.host):
        _fail(f"refusing to serve on {settings.host} without a token: anyone who reaches it could run reductions. "
              "Pass --token-file (or --insecure on a trusted network).")
    banner = (f"kred serve: http://{settings.host}:{settings.port} (docs at /docs), executor {settings.executor}"
              f"{' on ' + settings.ray_address if settings.ray_address else ''}, "
              f"auth {'on' if settings.token or settings.tenants else 'off'}, jobs in {settings.store_dir}")

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)        # the app's startup (Ray, the job store), then the listening socket
            if not self.should_exit:
                typer.echo(banner)                # so the banner means: connections are accepted now

    widen_uvicorn_reads()
    config = server_config(create_app(settings), settings, log_level=log_level)
    Server(config).run()


def _loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# run (batch job) ------------------------------------------------------------------------------------------

@app.command()
@_one_line
def run(job_file: Path = typer.Argument(..., help="the job's YAML file", exists=True, dir_okay=False),
        address: Optional[str] = typer.Option(None, help="Ray cluster address (overrides the file's)"),
        progress: bool = typer.Option(True, "--progress/--quiet")):
    """Run a batch job described by a YAML file on a Ray cluster and write its output. Needs the 'cluster' extra."""
    _need("cluster", "run")
    from kred.engine.jobs import run_job_file
    output = run_job_file(job_file, address, progress=progress)
    typer.echo(f"wrote {output}")


# reduce (files) -----------------------------------------------------------------------------------------

@app.command()
@_one_line
def reduce(formula: str = typer.Argument(..., help="e.g. 'Exp(-SqDist(x,y))*b'"),
           alias: List[str] = typer.Option(..., "--alias", "-a", help="e.g. 'x=Vi(3)' (repeat, in order)"),
           input: List[str] = typer.Option(..., "--input", "-i", help="NAME=PATH (.npy, .parquet, .arrow)"),
           output: Path = typer.Option(..., "--output", "-o", help=".npy, .npz, .parquet or .arrow"),
           reduction: str = typer.Option("Sum", help="reduction_op"),
           axis: int = typer.Option(0, help="0: reduce over i; 1: reduce over j"),
           opt_arg: Optional[int] = typer.Option(None, help="K of KMin / ArgKMin / KMin_ArgKMin"),
           formula2: Optional[str] = typer.Option(None, help="the weights of *Weight reductions"),
           local: bool = typer.Option(False, "--local", help="compute in this process instead of on a server"),
           job: bool = typer.Option(False, "--job", help="submit as a job and show its progress"),
           url: str = URL, token_file: Optional[Path] = TOKEN_FILE):
    """Reduce arrays stored in files, on a server (default) or locally, and write the result to a file.
    Needs the 'client' extra."""
    _need("client", "reduce")
    from kred.engine.io import read_array, write_output
    from kred.engine.spec import Spec

    spec = Spec(formula, alias, reduction, axis, opt_arg, formula2)
    plan = spec.plan()
    files = dict(_pair(item) for item in input)
    missing = [a.name for a in plan.args if a.name not in files]
    if missing:
        _fail(f"no --input for {', '.join(missing)} (the formula takes {', '.join(a.name for a in plan.args)})")
    arrays = [read_array(Path(files[a.name]), None, a.name) for a in plan.args]
    options = spec.options()
    if local:
        from kred.engine.run import run
        result = run(plan, arrays)
    else:
        with _client(url, token_file, "reduce") as client:
            if job:
                result = client.submit(formula, alias, *arrays, **options).result(progress=True)
            else:
                result = client.reduce(formula, alias, *arrays, **options)
    write_output(result, plan, output)
    typer.echo(f"wrote {output}")


def _pair(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name.strip() or not path.strip():
        _fail(f"--input {item!r}: expected NAME=PATH")
    return name.strip(), path.strip()


# jobs -----------------------------------------------------------------------------------------------------

@jobs_app.command("list")
@_one_line
def jobs_list(state: Optional[str] = typer.Option(None, help="queued, running, done, failed or cancelled"),
              limit: int = typer.Option(20), url: str = URL, token_file: Optional[Path] = TOKEN_FILE):
    """The most recent jobs."""
    with _client(url, token_file) as client:
        for info in client.jobs(limit, state):
            error = f"  {info['error'].splitlines()[0]}" if info.get("error") else ""
            typer.echo(f"{info['id']}  {info['state']:<9} {100 * info['progress']:5.1f}%{error}")


@jobs_app.command("show")
@_one_line
def jobs_show(job_id: str, url: str = URL, token_file: Optional[Path] = TOKEN_FILE):
    """A job's state, progress, timings and error, as JSON."""
    with _client(url, token_file) as client:
        typer.echo(json.dumps(client.job(job_id).status(), indent=2))


@jobs_app.command("result")
@_one_line
def jobs_result(job_id: str, output: Path = typer.Option(..., "--output", "-o", help=".npy or .npz"),
                wait: bool = typer.Option(True, "--wait/--no-wait"),
                url: str = URL, token_file: Optional[Path] = TOKEN_FILE):
    """Write a job's result (waiting for it, with a progress bar)."""
    import numpy as np

    with _client(url, token_file) as client:
        result = client.job(job_id).result(progress=wait, timeout=None if wait else 0)
    if output.suffix == ".npz":
        results = result if isinstance(result, tuple) else (result,)
        np.savez(output, *results)
    else:
        np.save(output, result[0] if isinstance(result, tuple) else result)
    typer.echo(f"wrote {output}")


@jobs_app.command("cancel")
@_one_line
def jobs_cancel(job_id: str, url: str = URL, token_file: Optional[Path] = TOKEN_FILE):
    """Cancel a queued or running job."""
    with _client(url, token_file) as client:
        info = client.job(job_id).cancel(wait=True)
    typer.echo(f"{job_id}  {info['state']}")


def main() -> None:
    app(prog_name="kred")


if __name__ == "__main__":
    main()
