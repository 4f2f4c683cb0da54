"""An out-of-core batch job: a Parquet dataset in, a job file, a Parquet dataset out.

The script first makes its data: N points as a Parquet dataset (a folder of files, as a data pipeline would leave
them, with row groups of up to 125,000 rows) and M = 2,000 weighted centres as one Parquet file. The job is the
Gaussian density a_i = sum_j exp(-|x_i - y_j|^2 / 2) b_j, described by a job file whose input `x` is the points
folder and whose output `result/` (ending in `/`) is a Parquet dataset: the cluster's workers read their own row
groups and write one file per row group, so the driver never holds the points or the densities. `--mode local` and
`--mode cluster` run the job file as `kred run job.yaml` does (kred.cluster.run_job_file: an embedded Ray, or the
cluster at --address); `--mode server` sends the same job as `POST /v1/jobs` with the datasets' paths (the server
must run the cluster executor, with the folder under its KRED_DATASET_ROOTS). The check reads the output dataset
back and compares a subsample of rows with dense numpy in float64.

    python examples/batch_job.py --size 1000000 --mode local
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import yaml

from modes import Mode, figure, parser, save_figure

CENTRES = 2000
FILES = 4                       # files of the points dataset
ROW_GROUP = 125_000             # rows per row group: the job's blocks
JOB = {
    "formula": "Exp(-SqDist(x, y) * 0.5) * b",
    "aliases": ["x = Vi(3)", "y = Vj(3)", "b = Vj(1)"],
    "inputs": {"x": {"path": "points/", "columns": ["x", "y", "z"]},
               "y": {"path": "centres.parquet", "columns": ["x", "y", "z"]},
               "b": {"path": "centres.parquet", "columns": ["weight"]}},
    "reduction": "Sum",
    "axis": 1,
    "output": "result/",
    "cluster": {"device": "cpu"},
}


def make_data(folder: Path, n: int, rng) -> Path:
    """The job's data (points: a dataset of FILES files; centres: one file) and its job file; the job file's path."""
    points = rng.normal(size=(n, 3)).astype(np.float32)
    centres = rng.normal(scale=1.5, size=(CENTRES, 3)).astype(np.float32)
    weights = rng.uniform(0, 1, CENTRES).astype(np.float32)
    (folder / "points").mkdir(parents=True, exist_ok=True)
    for k, rows in enumerate(np.array_split(np.arange(n), FILES)):
        part = points[rows[0]:rows[-1] + 1] if len(rows) else points[:0]
        pq.write_table(pa.table({"x": part[:, 0], "y": part[:, 1], "z": part[:, 2]}),
                       folder / "points" / f"part-{k:03d}.parquet", row_group_size=ROW_GROUP)
    pq.write_table(pa.table({"x": centres[:, 0], "y": centres[:, 1], "z": centres[:, 2], "weight": weights}),
                   folder / "centres.parquet")
    (folder / "job.yaml").write_text(yaml.safe_dump(JOB, sort_keys=False))
    return folder / "job.yaml"


def read_dataset(path: Path, columns) -> np.ndarray:
    """A Parquet file's or dataset's columns as one (rows, columns) array, files in name order."""
    files = sorted(str(p) for p in path.glob("*.parquet")) if path.is_dir() else [str(path)]
    table = ds.dataset(files, format="parquet").to_table(columns=list(columns))
    return np.stack([table[c].to_numpy() for c in columns], 1)


def run_job(mode: Mode, job: Path, address: str | None) -> Path:
    """Run the job file where the mode says; the output dataset's folder."""
    if mode.name != "server":
        from kred.cluster import run_job_file             # what `kred run job.yaml [--address]` runs
        return Path(run_job_file(job, address=address, progress=False))
    # the same job as POST /v1/jobs: dataset inputs are paths (or URIs) the server's workers can read
    spec, folder = yaml.safe_load(job.read_text()), job.parent.resolve()
    output = f"{folder / spec['output']}/"
    inputs = {name: {"uri": str(folder / source["path"]), "columns": source["columns"]}
              for name, source in spec["inputs"].items()}
    info = mode.client.submit_dataset(spec["formula"], spec["aliases"], inputs, output,
                                      reduction_op=spec["reduction"], axis=spec["axis"]).wait(timeout=3600)
    if info["state"] != "done":
        raise SystemExit(f"dataset job {info['id']} {info['state']}: {info.get('error')}")
    return Path(output)


def main(argv=None, client=None) -> int:
    args = parser(__doc__, size=1_000_000).parse_args(argv)
    mode = Mode(args, client)
    rng = np.random.default_rng(args.seed)
    folder = args.out / "batch_job"
    job = make_data(folder, args.size, rng)
    shutil.rmtree(folder / "result", ignore_errors=True)      # a new job: an old output folder would be refused
    start = time.perf_counter()
    output = run_job(mode, job, args.address)
    parts = sorted(output.glob("part-*.parquet"))
    print(f"batch job: N={args.size:,} points x {CENTRES:,} centres in {time.perf_counter() - start:.2f} s "
          f"({args.mode}); output dataset {output} ({len(parts)} files)")

    # Check: read the output dataset back; a subsample of rows against dense numpy from the input datasets
    density = read_dataset(output, ["value_0"])
    points = read_dataset(folder / "points", "xyz").astype(np.float64)
    centres = read_dataset(folder / "centres.parquet", ["x", "y", "z", "weight"]).astype(np.float64)
    rows = rng.choice(len(points), min(len(points), 500), replace=False)
    exact = np.exp(-((points[rows, None] - centres[None, :, :3]) ** 2).sum(-1) / 2) @ centres[:, 3:]
    error = np.abs(density[rows] - exact).max() / np.abs(exact).max()
    mode.check("output dataset", len(density) == args.size and error < 1e-5,
               f"{len(density):,} rows in {len(parts)} files; relative error {error:.1e} on {len(rows)} rows "
               "against dense numpy")

    fig, ax = figure(figsize=(6, 5))
    shown = rng.choice(len(points), min(len(points), 5000), replace=False)
    dots = ax.scatter(points[shown, 0], points[shown, 1], c=density[shown, 0], s=3, cmap="viridis")
    fig.colorbar(dots, label="density")
    ax.set_title(f"batch job output, N={args.size:,} (x, y shown)")
    save_figure(fig, args.out, "batch_job")
    return mode.finish()


if __name__ == "__main__":
    sys.exit(main())
