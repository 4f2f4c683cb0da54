"""Hosts for the multi-host tests: Linux network namespaces on a private subnet, each with its own disk.

A host is a network namespace (its own interfaces, address, ports and loopback) joined by a veth pair to a bridge
that lives in a namespace of its own (the switch), so nothing is added to this machine's own network. Each host
also has its own mount namespace with private tmpfs on /tmp and /dev/shm (and HOME, the kernel cache and Ray's
session folder under /tmp): no process of one host can read a file another host wrote there, nor map its shared
memory. A holder process (`sleep`) keeps the mount namespace alive; every command of the host enters both
namespaces with `nsenter`. Everything a host ran is found again by namespace (`ip netns pids`) and killed by PID;
`close()` deletes the namespaces. Needs root and iproute2 (`ip netns`).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]        # the source tree: every host imports kred from it
PYTHON = sys.executable                            # and runs this interpreter (its venv's bin/ is on PATH)


def holder_script(name: str) -> str:
    """The shell run in a host's new mount namespace: private tmpfs on /tmp and /dev/shm, then a sleep that holds the
    namespace. The source tree and the interpreter's environment stay visible where they are, also when they live
    under /tmp (a CI clone there): they are bound aside first and back after the tmpfs is mounted."""
    kept = [p for p in dict.fromkeys((ROOT, Path(sys.prefix).resolve())) if p.is_relative_to("/tmp")]
    kept = [p for p in kept if not any(p != q and p.is_relative_to(q) for q in kept)]
    aside = [f"/run/kred-multihost-{os.getpid()}-{name}-{k}" for k in range(len(kept))]
    steps = [f"mkdir -p {a} && mount --bind {shlex.quote(str(p))} {a}" for p, a in zip(kept, aside)]
    steps += ["mount -t tmpfs -o size=1g,mode=1777 tmpfs /tmp", "mount -t tmpfs -o size=1g tmpfs /dev/shm"]
    steps += [f"mkdir -p {shlex.quote(str(p))} && mount --bind {a} {shlex.quote(str(p))}" for p, a in zip(kept, aside)]
    return " && ".join(steps + ["mkdir -p /tmp/home", "echo ready", "exec sleep 100000"])


TOKEN = "multihost-test-token"
BUCKET = "kred-data"
MB = 1024 * 1024
HEAD_CONFIG = json.dumps({"health_check_period_ms": 500, "health_check_timeout_ms": 1000,
                          "health_check_failure_threshold": 4})    # a lost host is noticed within seconds


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "the multi-host tests make network namespaces and must run as root (CI does)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"the multi-host tests need `{tool}` (iproute2 / util-linux): apt-get install iproute2 util-linux"
    probe = f"kred-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=30, **kw)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


class Host:
    """One namespace host: `popen`/`run` a command inside it; `kill()` everything it runs."""

    def __init__(self, net: Subnet, name: str, address: str, env: dict):
        self.net, self.name, self.address = net, name, address
        self.netns = f"{net.prefix}-{name}"
        self.env = env
        self.logs = net.logs / name
        self.logs.mkdir(parents=True, exist_ok=True)
        self.holder = None

    def environ(self, extra: dict | None = None) -> dict:
        return {"PATH": f"{Path(PYTHON).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/tmp/home", "XDG_CACHE_HOME": "/tmp/home/.cache", "PYTHONPATH": str(ROOT),
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                "LANG": "C.UTF-8", **self.env, **(extra or {})}

    def _enter(self, argv: list[str]) -> list[str]:
        return ["nsenter", "--target", str(self.holder.pid), "--mount", "--net", "--", *argv]

    def popen(self, argv: list[str], log: str, env: dict | None = None, **kw) -> subprocess.Popen:
        """Start `argv` in this host; its stdout and stderr go to logs/<host>/<log> (unless `stdout` is given)."""
        if "stdout" not in kw:
            kw["stdout"] = open(self.logs / log, "ab")
            kw.setdefault("stderr", subprocess.STDOUT)
        return subprocess.Popen(self._enter(argv), env=self.environ(env), cwd=ROOT, **kw)

    def run(self, argv: list[str], log: str, env: dict | None = None, timeout: float = 120) -> str:
        """Run `argv` to its end in this host; its output (raises with the log's tail if it failed)."""
        process = self.popen(argv, log, env)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise RuntimeError(f"{self.name}: {argv[:3]} took more than {timeout} s:\n{self.tail(log)}") from None
        if code:
            raise RuntimeError(f"{self.name}: {argv[:3]} exited with {code}:\n{self.tail(log)}")
        return (self.logs / log).read_text(errors="replace")

    def tail(self, log: str, chars: int = 4000) -> str:
        path = self.logs / log
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def signal_processes(self, marker: str, signum: int) -> list[int]:
        """Send `signum` to this host's processes whose command line holds `marker` (Ray names its actors'
        processes `ray::ClassName`); their PIDs."""
        found = []
        for pid in self.pids():
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    os.kill(pid, signum)
                    found.append(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return found

    def kill(self) -> None:
        """The host fails: every process in its namespace gets SIGKILL (by PID), the holder included."""
        for _ in range(20):               # a dying Ray can start processes while it goes: until none is left
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)


class Subnet:
    """Hosts on 10.<a>.<b>.0/24 behind one bridge; `add(name)` makes one; `close()` removes everything."""

    def __init__(self, logs: Path, env: dict | None = None):
        tag = os.getpid() % 100000
        self.prefix = f"kred{tag}"
        self.base = f"10.{200 + tag % 50}.{tag % 250}"
        self.logs, self.env = Path(logs), dict(env or {})
        self.hosts: dict[str, Host] = {}
        self.switch = f"{self.prefix}-switch"
        self._made: list[str] = []
        sh("ip", "netns", "add", self.switch)
        self._made.append(self.switch)
        sh("ip", "netns", "exec", self.switch, "ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "netns", "exec", self.switch, "ip", "link", "set", "br0", "up")

    def address(self, k: int) -> str:
        return f"{self.base}.{k}"

    def add(self, name: str) -> Host:
        k = len(self.hosts) + 1
        host = Host(self, name, self.address(k), self.env)
        sh("ip", "netns", "add", host.netns)
        self._made.append(host.netns)
        outer, inner = f"{self.prefix}v{k}", f"{self.prefix}h{k}"     # at most 15 characters each
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", outer, "netns", self.switch)
        sh("ip", "link", "set", inner, "netns", host.netns)
        inside = ["ip", "netns", "exec", host.netns]
        sh("ip", "netns", "exec", self.switch, "ip", "link", "set", outer, "master", "br0", "up")
        sh(*inside, "ip", "link", "set", inner, "name", "eth0")
        sh(*inside, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
        sh(*inside, "ip", "link", "set", "eth0", "up")
        sh(*inside, "ip", "link", "set", "lo", "up")
        # A default route through eth0 (nothing answers past the subnet): programs that find their own address by
        # "connecting" a UDP socket to a public one (Ray does) find this host's address rather than loopback.
        sh(*inside, "ip", "route", "add", "default", "dev", "eth0")
        host.holder = subprocess.Popen([*inside, "unshare", "--mount", "--propagation", "private", "sh", "-c", holder_script(name)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = host.holder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"host {name}: its mount namespace failed: {host.holder.stderr.read()}")
        self.hosts[name] = host
        return host

    def remove(self, name: str) -> None:
        host = self.hosts.pop(name)
        host.kill()
        subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        for aside in glob.glob(f"/run/kred-multihost-{os.getpid()}-{name}-*"):     # (empty: bound in its namespace)
            try:
                os.rmdir(aside)
            except OSError:
                pass
        self._made.remove(host.netns)

    def close(self) -> None:
        for name in list(self.hosts):
            self.remove(name)
        for netns in self._made:          # the switch (its bridge and veth ends go with it)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self._made = []


class Deployment:
    """kred on namespace hosts: an object store, a Ray head running `kred serve --ray-address auto`, worker hosts
    (`workers`: name -> CPUs) and a client host that runs tests/multihost_client.py."""

    def __init__(self, logs: Path, workers: dict | None = None):
        self.cpus = workers or {"w1": 1, "w2": 1}
        self.net = Subnet(logs)
        try:
            self._start()
        except BaseException:
            self.net.close()
            raise

    def _start(self) -> None:
        self.store = self.net.add("store")
        self.endpoint = f"http://{self.store.address}:5000"
        self.net.env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID="kred-test",
                            AWS_SECRET_ACCESS_KEY="kred-test-secret", AWS_DEFAULT_REGION="us-east-1")
        self.moto = self.store.popen([PYTHON, "-m", "moto.server", "-H", self.store.address, "-p", "5000"],
                                     "moto.log")
        self.wait_log(self.store, "moto.log", "Running on", 60, self.moto)
        self.head = self.net.add("head")
        self.head.run(["ray", "start", "--head", "--node-ip-address", self.head.address, "--port", "6379",
                       "--num-cpus", "0", "--object-store-memory", str(80 * MB), "--include-dashboard=false",
                       "--disable-usage-stats", f"--system-config={HEAD_CONFIG}"], "ray-start.log")
        self.workers = {}
        starting = [self.start_worker(name, cpus) for name, cpus in self.cpus.items()]
        for host, process in starting:
            self.joined(host, process)
        self.client = self.net.add("client")
        self.url = f"http://{self.head.address}:8000"
        self.server = self.head.popen([PYTHON, "-m", "kred", "serve", "--ray-address", "auto",
                                       "--host", self.head.address, "--port", "8000"], "serve.log",
                                      env={"KRED_TOKEN": TOKEN, "KRED_DATASET_ROOTS": f'["s3://{BUCKET}/"]',
                                           "KRED_LOCAL_BELOW_PAIRS": "0", "KRED_STORE_DIR": "/tmp/jobs"})
        self.wait_log(self.head, "serve.log", "kred serve: http://", 180, self.server)

    def start_worker(self, name: str, cpus: int = 1):
        host = self.net.add(name)
        process = host.popen(["ray", "start", "--address", f"{self.head.address}:6379", "--node-ip-address",
                              host.address, "--num-cpus", str(cpus), "--object-store-memory", str(80 * MB),
                              "--disable-usage-stats"], "ray-start.log")
        return host, process

    def joined(self, host, process, timeout: float = 120) -> None:
        if process.wait(timeout):
            raise RuntimeError(f"{host.name}: ray start failed:\n{host.tail('ray-start.log')}")
        self.workers[host.name] = host

    @staticmethod
    def wait_log(host, log: str, text: str, timeout: float, process) -> None:
        deadline = time.monotonic() + timeout
        while text not in host.tail(log, 1 << 20):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.args[5:8]} did not start on {host.name}:\n{host.tail(log)}")
            time.sleep(0.2)

    def call(self, action: str, **args):
        """Run the client host's script; its JSON lines (the last one is the result)."""
        argv = [PYTHON, str(Path(__file__).with_name("multihost_client.py")), action,
                json.dumps({"url": self.url, "token": TOKEN, "bucket": BUCKET, **args})]
        return self.client.popen(argv, f"{action}.log", stdout=subprocess.PIPE,
                                 stderr=open(self.client.logs / f"{action}.err", "ab"), text=True)

    def finish(self, process, action: str, timeout: float = 120) -> dict:
        out, _ = process.communicate(timeout=timeout)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert process.returncode == 0 and lines, self.client.tail(f"{action}.err")
        return lines[-1]

    def jobs(self) -> list[dict]:
        """The cluster driver's line per finished job, in order."""
        text = self.head.tail("serve.log", 1 << 22)
        return [json.loads(m.group(1)) for m in re.finditer(r"kred\.service\.cluster\.jobs: job \d+ (\{.*\})", text)]

    def close(self) -> None:
        self.net.close()
