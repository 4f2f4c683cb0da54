"""Benchmarks of kred against its peers: `python -m benchmarks.run --help`. See benchmarks/README.md."""
