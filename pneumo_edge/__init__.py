"""pneumo-edge: train, export (ONNX, TensorRT FP16) and score a chest X-ray pneumonia detector.

The core package imports only numpy, Pillow and click; torch, onnxruntime and tensorrt are
imported inside the runtimes that need them."""

__version__ = "0.1.0"
