"""`kred.cluster`: one reduction over every GPU and node of a Ray cluster (see kred.engine.cluster), and batch jobs
from YAML files (`run_job_file`, see kred.engine.jobs)."""
from kred.engine.cluster import *  # noqa: F401,F403
from kred.engine.cluster import __all__  # noqa: F401
from kred.engine.jobs import JobFileError, run_job_file  # noqa: F401
