"""Evaluation: the verification protocol, LR probes, evaluating models at every resolution (run), 1:N
identification, results with intervals, tables, thresholds, plots, and a new benchmark in one command."""
