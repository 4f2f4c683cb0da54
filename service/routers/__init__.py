"""One router per resource: reductions, jobs, formulas, health (and metrics)."""
