"""`kred.numpy`: the numpy front end, call-compatible with `pykeops.numpy` (see kred.engine.numpy)."""
from kred.engine.numpy import *  # noqa: F401,F403
from kred.engine.numpy import __all__  # noqa: F401
