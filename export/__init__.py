"""Export: torch -> ONNX (fp32, fp16), ONNX -> TensorRT engine, and parity.
Imported as ``pneumo_edge.export`` (mapped in pyproject.toml); needs torch and onnx."""
