"""Layer 6: one reduction over every GPU and node of a Ray cluster.

A plan is cut into shards (rows concatenated, columns merged with the reduction's `merge`), fed through a work queue
to one Ray actor per device, and put back together; shards of lost workers are re-run elsewhere. Ray is imported
only when a Cluster starts, so `import engine` stays free of it.
"""
from .cluster import Cluster, default_cluster
from .job import Job, Progress
from .sharding import Shard, choose_split, make_shards

__all__ = ["Cluster", "Job", "Progress", "Shard", "choose_split", "default_cluster", "make_shards"]
