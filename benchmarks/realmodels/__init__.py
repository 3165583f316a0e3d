"""Helpers of benchmarks/real_models.py: fetch wheels, YOLOv8 and OCR pre/post-processing."""
