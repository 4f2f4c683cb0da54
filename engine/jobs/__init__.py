"""Batch jobs from YAML files (`kred run JOB.yaml`): an application of the engine, a layer above the cluster it
runs on (engine.cluster) and the file formats it reads (engine.io)."""
from .jobfile import JobFileError, JobSpec, load_job, run_job_file

__all__ = ["JobFileError", "JobSpec", "load_job", "run_job_file"]
