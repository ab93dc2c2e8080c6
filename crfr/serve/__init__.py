"""Serving a model: the embedder, the MLflow pyfunc, ONNX export and runtime, and the HTTP service."""
