"""The simulator's parts: the scenario file, callers, the queueing model of the centres, the
three ways of routing (the real router, diversion by hand, none), the run, the report."""
