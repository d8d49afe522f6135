"""Watching the model in use (README, "Monitoring"): ``drift`` compares recent prediction records with
the model's validation baseline (pure), ``monitor`` refreshes it off the request path and sets the
drift gauges. Live performance (``performance``) joins later: see ``GET /v1/monitoring``."""
