"""Extraction: manifest -> decode -> encoder -> pool -> HDF5 cache (decode, batching, distributed, pipeline)."""
from featx.extraction.pipeline import ExtractResult, ExtractSettings, cache_path, extract

__all__ = ["ExtractResult", "ExtractSettings", "cache_path", "extract"]
