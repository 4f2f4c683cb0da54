"""`kred.cluster`: one reduction over every GPU and node of a Ray cluster (see kred.engine.cluster)."""
from kred.engine.cluster import *  # noqa: F401,F403
from kred.engine.cluster import __all__  # noqa: F401
