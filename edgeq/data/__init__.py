"""Calibration and validation data: .npz files, .npy folders, image folders, or any Python iterable.

One module per job: `batch` (the Batch value and what labels may hold), `images` (image presets), `files` (safe
numpy reading), `sources` (Dataset and its constructors, `open_data`), `batching` (re-batching and the checks
against the model's inputs). Everything a caller needs is importable from `edgeq.data`.
"""
from edgeq.data.batch import LABELS_KEY, Batch
from edgeq.data.batching import batches, conform, count_nonfinite, fixed_batch_size
from edgeq.data.images import IMAGE_SUFFIXES, PRESETS, ImagePreset
from edgeq.data.sources import Dataset, open_data

__all__ = ["IMAGE_SUFFIXES", "LABELS_KEY", "PRESETS", "Batch", "Dataset", "ImagePreset", "batches", "conform",
           "count_nonfinite", "fixed_batch_size", "open_data"]
