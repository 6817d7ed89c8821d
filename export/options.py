"""The ``export`` command's own options (the CLI reads default and help from these fields).
Parity tolerances, INT8 calibration and the TensorRT build have theirs next to the code that
uses them: ``Tolerance`` (parity.py), ``QuantOptions`` (quantize.py), ``BuildOptions``
(tensorrt.py). ``run_export`` takes its keyword defaults from :data:`EXPORT_DEFAULTS`."""

from __future__ import annotations

from dataclasses import dataclass, field

from pneumo_edge.export.onnx import DEFAULT_OPSET


@dataclass(frozen=True)
class ExportOptions:
    opset: int = field(default=DEFAULT_OPSET, metadata={
        "help": "ONNX opset; the default parses in onnxruntime and TensorRT 10 and 11."})
    int8: bool = field(default=True, metadata={
        "help": "Also write model.int8.onnx (onnxruntime static INT8, calibrated on training "
                "images) and check its parity."})


#: The defaults, for ``run_export``'s signature (frozen: shared by every caller).
EXPORT_DEFAULTS = ExportOptions()
