"""Watching the model in use: live performance against readers' feedback (``performance``) and its
export as Prometheus gauges (``exporter``)."""
