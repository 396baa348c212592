"""Exporters to other runtimes' formats: `tflite` (LiteRT) today. Each imports its converter lazily."""
from edgeq.export.tflite import TfliteExport, export_tflite, tensor_types

__all__ = ["TfliteExport", "export_tflite", "tensor_types"]
