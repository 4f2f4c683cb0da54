"""Run at start-up by any Python whose path holds this checkout (PYTHONPATH=<checkout>): import kred from it
(sourcetree.py). Not part of the package."""
import sourcetree

sourcetree.install()
