"""featx: cache every layer of pretrained encoders to HDF5 and probe them."""
__version__ = "0.1.0"

from featx.errors import FeatxError, MediaError  # noqa: E402

__all__ = ["FeatxError", "MediaError", "__version__", "extract", "read_layer", "open_cache", "Cache"]


def __getattr__(name):
    # Heavy imports (torch, transformers, h5py) only when the API is used, so `featx --help` stays fast.
    if name == "extract":
        from featx.extract import extract
        return extract
    if name in ("read_layer", "open_cache", "Cache"):
        from featx import store
        return getattr(store, name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
