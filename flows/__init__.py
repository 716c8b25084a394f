"""Prefect flows over the DVC pipeline: `pipeline` (stage by stage) and `sweep` (parameter sweeps)."""
