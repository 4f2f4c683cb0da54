"""Layer 6: one reduction over every GPU and node of a Ray cluster.

A plan is cut into shards (rows concatenated, columns merged with the reduction's `merge`), fed through a work queue
to one Ray actor per device, and put back together; shards of lost workers are re-run elsewhere. Ray is imported
only when a Cluster starts, so `import engine` stays free of it.
"""
from .cluster import Cluster, default_cluster
from .dataset import Dataset, DatasetError
from .job import DatasetJob, Job, Progress
from .jobfile import JobFileError, run_job_file
from .sharding import Shard, choose_split, make_shards

__all__ = ["Cluster", "Dataset", "DatasetError", "DatasetJob", "Job", "JobFileError", "Progress", "Shard", "choose_split", "default_cluster", "make_shards",
           "run_job_file"]
