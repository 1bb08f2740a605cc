"""The HDF5 cache: one file per manifest x encoder holding every layer's pooled hidden states."""
from featx.cache.store import Cache, CacheWriter, describe, merge_caches, open_cache, read_layer

__all__ = ["Cache", "CacheWriter", "describe", "merge_caches", "open_cache", "read_layer"]
