"""An out-of-core style batch job: a Parquet dataset in, a job file, a Parquet dataset out.

The script first makes its data: N points and M weighted centres, written as Parquet datasets (folders of files,
as a data pipeline would leave them). The job is the Gaussian density a_i = sum_j exp(-|x_i - y_j|^2 / 2) b_j,
described by a job file (`kred run job.yaml`). Job files read `.npy`, Parquet and Arrow files; dataset inputs (a
folder of Parquet files, read block by block by the workers) are not on this branch yet, so the datasets are
converted to `.npy` inputs next to the job file. The job then runs in-process, on the cluster (`kred run`'s own
code, kred.cluster.run_job_file) or as a server job (`POST /v1/jobs`), and the result is written as a Parquet
dataset, one file per block of rows. The check reads that dataset back and compares a subsample of rows with dense
numpy.

    python examples/batch_job.py --size 1000000 --mode cluster
"""
from __future__ import annotations

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
FILES = 4                       # files per dataset
JOB = """\
formula: Exp(-SqDist(x, y) * 0.5) * b
aliases: [x = Vi(3), y = Vj(3), b = Vj(1)]
inputs:
  x: x.npy
  y: y.npy
  b: b.npy
reduction: Sum
axis: 1
output: result.npy
cluster: {device: cpu}
"""


def write_dataset(folder: Path, table: pa.Table, files: int = FILES) -> None:
    """`table` as a folder of Parquet files (rows in order, part-000.parquet first)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, rows in enumerate(np.array_split(np.arange(table.num_rows), files)):
        pq.write_table(table.slice(rows[0], len(rows)) if len(rows) else table.slice(0, 0), folder / f"part-{k:03d}.parquet")


def read_dataset(folder: Path, columns) -> np.ndarray:
    """A Parquet dataset's columns as one (rows, columns) float array, files in name order."""
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    table = ds.dataset(files, format="parquet").to_table(columns=list(columns))
    return np.stack([table[c].to_numpy() for c in columns], 1)


def make_data(folder: Path, n: int, rng) -> None:
    """The job's data, as two Parquet datasets: points (x, y, z) and centres (x, y, z, weight)."""
    points = rng.normal(size=(n, 3)).astype(np.float32)
    centres = rng.normal(scale=1.5, size=(CENTRES, 3)).astype(np.float32)
    weights = rng.uniform(0, 1, CENTRES).astype(np.float32)
    write_dataset(folder / "points", pa.table({"x": points[:, 0], "y": points[:, 1], "z": points[:, 2]}))
    write_dataset(folder / "centres", pa.table({"x": centres[:, 0], "y": centres[:, 1], "z": centres[:, 2],
                                                "weight": weights}))


def prepare_job(folder: Path) -> Path:
    """The job file and its `.npy` inputs, converted from the datasets."""
    np.save(folder / "x.npy", read_dataset(folder / "points", "xyz"))
    np.save(folder / "y.npy", read_dataset(folder / "centres", "xyz"))
    np.save(folder / "b.npy", read_dataset(folder / "centres", ["weight"]))
    (folder / "job.yaml").write_text(JOB)
    return folder / "job.yaml"


def run_job(mode: Mode, path: Path) -> np.ndarray:
    """Run the job file where the mode says; the result array."""
    if mode.name == "cluster":
        from kred.cluster import run_job_file
        return np.load(run_job_file(path, progress=False))
    spec = yaml.safe_load(path.read_text())
    args = [np.load(path.parent / spec["inputs"][alias.split("=")[0].strip()]) for alias in spec["aliases"]]
    if mode.name == "server":
        job = mode.client.submit(spec["formula"], spec["aliases"], *args, reduction_op=spec["reduction"],
                                 axis=spec["axis"])
        return job.result(timeout=600)
    return mode.reduce(spec["formula"], spec["aliases"], *args, reduction_op=spec["reduction"], axis=spec["axis"])


def main(argv=None, client=None) -> int:
    args = parser(__doc__, size=1_000_000).parse_args(argv)
    mode = Mode(args, client)
    rng = np.random.default_rng(args.seed)
    folder = args.out / "batch_job"
    make_data(folder, args.size, rng)
    job = prepare_job(folder)
    start = time.perf_counter()
    result = run_job(mode, job)
    write_dataset(folder / "result", pa.table({"density": result[:, 0]}))
    print(f"batch job: N={args.size:,} points x {CENTRES:,} centres in {time.perf_counter() - start:.2f} s "
          f"({args.mode}); result dataset {folder / 'result'} ({FILES} files)")

    # Check: read the output dataset back; a subsample of rows against dense numpy from the input datasets
    density = read_dataset(folder / "result", ["density"])
    points = read_dataset(folder / "points", "xyz").astype(np.float64)
    centres = read_dataset(folder / "centres", ["x", "y", "z", "weight"]).astype(np.float64)
    rows = rng.choice(len(points), min(len(points), 500), replace=False)
    exact = np.exp(-((points[rows, None] - centres[None, :, :3]) ** 2).sum(-1) / 2) @ centres[:, 3:]
    error = np.abs(density[rows] - exact).max() / np.abs(exact).max()
    mode.check("output dataset", len(density) == args.size and error < 1e-5,
               f"{len(density):,} rows; relative error {error:.1e} on {len(rows)} rows against dense numpy")

    fig, ax = figure(figsize=(6, 5))
    shown = rng.choice(len(points), min(len(points), 5000), replace=False)
    dots = ax.scatter(points[shown, 0], points[shown, 1], c=density[shown, 0], s=3, cmap="viridis")
    fig.colorbar(dots, label="density")
    ax.set_title(f"batch job output, N={args.size:,} (x, y shown)")
    save_figure(fig, args.out, "batch_job")
    return mode.finish()


if __name__ == "__main__":
    sys.exit(main())
