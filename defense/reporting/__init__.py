"""Reports of a run: csv and markdown tables, plots, the per-channel records."""
