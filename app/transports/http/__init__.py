"""The HTTP layer: routes, problem+json rendering, request middleware. No imaging, no ONNX Runtime."""
