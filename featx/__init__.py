"""featx: cache every layer of pretrained encoders to HDF5 and probe them."""
from featx.errors import FeatxError, MediaError
from featx.version import __version__

__all__ = ["FeatxError", "MediaError", "__version__", "extract", "read_layer", "open_cache", "Cache"]


def __getattr__(name):
    # Heavy imports (torch, transformers, h5py) only when the API is used, so `featx --help` stays fast.
    if name == "extract":
        from featx.extraction import extract
        return extract
    if name in ("read_layer", "open_cache", "Cache"):
        from featx import cache
        return getattr(cache, name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
