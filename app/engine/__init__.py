"""The inference engine: ONNX Runtime sessions and their batch buckets, the dynamic batcher,
admission, host work (threads or isolated worker processes), the decode budget and the service's
own metrics. Uses the core; knows nothing of HTTP, DICOM networking or the command line."""
