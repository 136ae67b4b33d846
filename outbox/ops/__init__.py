"""The operator's tools: replay and status (`replay`), reconcile against Polar (`reconcile`),
the production checklist (`doctor`) and the cluster-wide gauges of `/metrics` (`collector`).
Called by the CLI and the admin API; nothing in delivery depends on them. See
docs/operations.md."""
