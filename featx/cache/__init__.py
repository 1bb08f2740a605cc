"""The HDF5 cache: one file per manifest x encoder holding every layer's pooled hidden states.

schema (the format), writer (CacheWriter, parts, consolidation), reader (Cache), merge, describe (featx info).
"""
from featx.cache.describe import caches_in, describe, inspect
from featx.cache.merge import merge_caches
from featx.cache.reader import Cache, LayerData, open_cache, read_layer
from featx.cache.schema import FORMAT_VERSION
from featx.cache.writer import CacheWriter, check_settings, is_complete, pending_items, update_columns

__all__ = ["FORMAT_VERSION", "Cache", "CacheWriter", "LayerData", "caches_in", "check_settings", "describe", "inspect",
           "is_complete", "merge_caches", "open_cache", "pending_items", "read_layer", "update_columns"]
