"""Prefect flows over the DVC pipeline: `pipeline` (stage by stage) and `sweep` (parameter sweeps)."""

import os

# Prefect's temporary local server sends usage telemetry by default and, on SQLite, its first write
# races the flow's own ("database is locked" tracebacks). Opt out unless the user chose otherwise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
