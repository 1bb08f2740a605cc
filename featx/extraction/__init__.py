"""Extraction: manifest -> decode -> encoder -> pool -> HDF5 cache (decode, batching, distributed, pipeline)."""
from featx.extraction.pipeline import ExtractResult, ResolvedSettings, cache_path, extract

__all__ = ["ExtractResult", "ResolvedSettings", "cache_path", "extract"]
