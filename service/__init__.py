"""svertka: an image-classification inference service (gRPC, onnxruntime)."""

__version__ = "0.1.0"
