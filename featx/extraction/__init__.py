"""Extraction: manifest -> decode -> encoder -> pool -> HDF5 cache."""
from featx.extraction.pipeline import ExtractResult, cache_path, extract

__all__ = ["ExtractResult", "cache_path", "extract"]
