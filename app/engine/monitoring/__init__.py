"""Watching the model in use (README, "Monitoring"): live performance against readers' feedback
(``performance``, exported as Prometheus gauges by ``exporter``), and ``drift``, which compares recent
prediction records with the model's validation baseline (pure), refreshed off the request path by
``monitor``, which sets the drift gauges."""
