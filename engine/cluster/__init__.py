"""Layer 6: one reduction over every GPU and node of a Ray cluster.

A plan is cut into shards (rows concatenated, columns merged with the reduction's `merge`), fed through a work queue
to one Ray actor per device, and put back together; shards of lost workers are re-run elsewhere. Ray is imported
only when a Cluster starts, so `import engine` stays free of it.

Job files (`run_job_file`, `JobFileError`) are an application a layer above, in engine.jobs; they stay importable
from here (and from kred.cluster), where users have always imported them.
"""
from .cluster import Cluster, default_cluster
from .dataset import Dataset, DatasetError
from .job import DatasetJob, Job, Progress
from .sharding import Shard, choose_split, make_shards

__all__ = ["Cluster", "Dataset", "DatasetError", "DatasetJob", "Job", "JobFileError", "Progress", "Shard", "choose_split", "default_cluster", "make_shards",
           "run_job_file"]


def __getattr__(name: str):
    # engine.jobs imports this package: read on first use, so that neither import waits for the other
    if name in ("JobFileError", "run_job_file"):
        from .. import jobs
        return getattr(jobs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
