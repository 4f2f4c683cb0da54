"""`kred.torch`: the torch front end, call-compatible with `pykeops.torch` (see kred.engine.torch)."""
from kred.engine.torch import *  # noqa: F401,F403
from kred.engine.torch import __all__  # noqa: F401
