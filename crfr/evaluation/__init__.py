"""Evaluation: LR probes (probes), verifying models (run), results and metrics.json (results), tables,
thresholds, plots."""
