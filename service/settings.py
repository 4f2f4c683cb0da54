"""Server settings: defaults here, overridden by environment variables `KRED_<NAME>` or by `kred serve` options."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


# --- sec-data: tenants (issue 20 row 8) ---------------------------------------------------------------------
class TenantConfig(BaseModel):
    """One named token: the jobs made with it belong to `name`; the quotas are optional (None: the server's)."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    token: SecretStr
    max_jobs: int | None = Field(None, ge=0)              # its jobs queued or running at once
    max_output_bytes: int | None = Field(None, ge=0)      # dataset-job output of its jobs in the store together
# --- end sec-data ----------------------------------------------------------------------------------------------


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KRED_", extra="ignore")

    # Where and how to listen. 127.0.0.1 unless told otherwise: the service runs user formulas.
    host: str = "127.0.0.1"
    port: int = 8000
    token: SecretStr | None = None               # bearer token; requests without it get 401 when set
    token_file: Path | None = None               # or read it from a file (first line)

    # Where reductions run: "local" (engine in a thread pool) or "cluster" (engine.cluster over Ray).
    executor: Literal["local", "cluster"] = "local"
    ray_address: str | None = None               # None: an embedded local Ray
    backend: str = "auto"                        # engine backend for the local executor
    # With the cluster executor, reductions of fewer pairs (N x M) than this run in the server's process: below it
    # the cluster's round trips (~10-50 ms) cost more than computing. Measured default: the crossover part of
    # benchmarks/bench_cluster_scale.py (results/cluster-crossover-cpu-2c.json, idle 2-core machine: the cluster
    # is within 5% of the local path from N = M = 40,000 on, and up to 7x slower below); re-measure on your hardware.
    local_below_pairs: float = Field(1.6e9, ge=0)
    threads: int = Field(4, ge=1)                # concurrent synchronous reductions

    # Where dataset jobs (POST /v1/jobs with dataset URIs) may read and write: path or URI prefixes, e.g.
    # ["/data/", "s3://bucket/kred/"]. Empty: dataset jobs are refused.
    dataset_roots: list[str] = Field(default_factory=list)
    # The job store. By default one per server address (host_port under the user's data folder), so that two
    # servers on one machine never share jobs; servers meant to share a store are given the same store_dir.
    store_dir: Path | None = None
    job_retention_s: float = Field(7 * 86400.0, gt=0)    # finished jobs (and their results) are deleted after this
    max_stored_jobs: int = Field(10_000, ge=0)            # finished jobs kept at most (the oldest go first)
    max_store_bytes: int = Field(50 << 30, ge=0)          # bytes of stored inputs and results kept at most
    cleanup_interval_s: float = Field(300.0, gt=0)        # how often the retention policy is applied
    allow_shm: bool = True                       # accept same-host shared-memory requests

    # Limits. A request past one gets a 4xx naming the limit.
    max_body_bytes: int = 1 << 30                # 413
    max_inflight_bytes: int = 2 << 30            # bodies (and shm inputs) held at once by all requests; 429 past it
    body_timeout_s: float = Field(30.0, gt=0)    # a body that sends nothing for this long is a 408
    shutdown_timeout_s: float = Field(5.0, ge=0)  # SIGTERM: requests still running after this are cut off
    max_formula_chars: int = 10_000              # 422
    max_formula_depth: int = 100                 # nesting of the parsed formula (after expansion)
    max_formula_nodes: int = 20_000              # distinct nodes (gradients grow formulas)
    max_dim: int = 4096                          # dimension of any node, argument or output
    max_pairs_per_request: float = 1e10          # N x M for POST /v1/reduce
    max_pairs_per_job: float = 1e13              # N x M for POST /v1/jobs
    max_running_jobs: int = Field(2, ge=1)       # jobs computing at once
    max_queued_jobs: int = Field(64, ge=0)       # waiting beyond those; 429 past it
    compile_timeout_s: float = 60.0              # building a plan (parse, differentiate, compile)
    # NaN / inf inputs are a 422 when on. Off by default: the engine computes them with IEEE semantics, as
    # pykeops and kred in-process do, and pykeops programs send them (-inf log-weights, inf clamp bounds)
    reject_nonfinite: bool = False

    # --- sec-data: tenants, dataset-job budgets (issue 20 rows 8, 9) ---------------------------------------------
    # Named tokens, as JSON (KRED_TENANTS='[{"name": "alice", "token": "...", "max_jobs": 4}]') and/or a JSON file
    # holding that list; `token` (above) stays the single-user form: its holder is the tenant "default".
    tenants: list[TenantConfig] = Field(default_factory=list)
    tenants_file: Path | None = None
    max_shard_bytes: int = Field(1 << 30, ge=0)         # 413: what one worker holds for one shard of a dataset job
    # --- end sec-data ----------------------------------------------------------------------------------------
    # --- HTTP ingress and the admission budget (issue 20 rows 4-7, 11, 12) ---------------------------------------
    # A body that is not an Arrow stream (JSON: shared-memory requests, dataset jobs, formulas) holds no bulk data.
    max_json_bytes: int = Field(4 << 20, ge=1024)            # 413 past it
    # body_timeout_s is the total time a body may take, plus one second per min_body_bytes_per_s bytes received
    min_body_bytes_per_s: float = Field(float(1 << 20), gt=0)
    header_timeout_s: float = Field(10.0, gt=0)              # a connection must finish its headers in this long
    max_connections: int = Field(1000, ge=1)                 # past it the oldest idle connection is closed
    max_connections_per_client: int = Field(100, ge=1)       # the same, per client address
    max_inflight_bytes_per_tenant: int | None = None         # one tenant's share of max_inflight_bytes (None: all)
    # One budget per request, computed before any work (limits.admit); the job limits apply to POST /v1/jobs.
    max_output_bytes_per_request: int = Field(256 << 20, ge=0)     # 413
    max_output_bytes_per_job: int = Field(16 << 30, ge=0)
    max_input_bytes_per_job: int = Field(1 << 40, ge=0)      # a dataset job's inputs, from their metadata
    max_work_per_request: float = Field(1e12, ge=0)          # pairs x formula nodes, 422
    max_work_per_job: float = Field(1e15, ge=0)
    max_batch_items: int = Field(10_000, ge=1)               # batch items of one request or job (each runs alone)
    compute_timeout_s: float = Field(300.0, gt=0)            # POST /v1/reduce: work still running then is a 504

    @model_validator(mode="after")
    def _default_store_dir(self):
        if self.store_dir is None:
            address = f"{self.host}_{self.port}".replace(":", "-").replace("/", "-")   # IPv6 hosts have colons
            self.store_dir = platformdirs.user_data_path("kred") / "jobs" / address
        return self

    @model_validator(mode="after")
    def _read_token_file(self):
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("KRED_TOKEN is set but empty (or only whitespace): set a real token to require one, "
                             "or unset KRED_TOKEN to serve without authentication")
        if self.token is None and self.token_file is not None:
            try:
                text = self.token_file.read_text().strip().splitlines()
            except OSError as e:
                raise ValueError(f"token_file {self.token_file}: {e}") from None
            if not text or not text[0].strip():
                raise ValueError(f"token_file {self.token_file} is empty")
            self.token = SecretStr(text[0].strip())
        return self

    # --- sec-data: after _read_token_file, so that a token read from a file is known here ---
    @model_validator(mode="after")
    def _read_tenants(self):
        if self.tenants_file is not None:
            import json
            try:
                listed = json.loads(self.tenants_file.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"tenants_file {self.tenants_file}: {e}") from None
            self.tenants = [*self.tenants, *(TenantConfig.model_validate(t) for t in listed)]
            self.tenants_file = None
        names = [t.name for t in self.tenants]
        tokens = [t.token.get_secret_value() for t in self.tenants]
        if len(set(names)) < len(names) or "default" in names and self.token is not None:
            raise ValueError("tenant names must be unique (\"default\" is the holder of KRED_TOKEN)")
        shared = [self.token.get_secret_value()] if self.token is not None else []
        if any(not t.strip() for t in tokens) or len(set(tokens + shared)) < len(tokens + shared):
            raise ValueError("every tenant needs its own non-empty token")
        return self
