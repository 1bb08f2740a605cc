"""featx: cache every layer of pretrained encoders to HDF5 and probe them."""
__version__ = "0.1.0"

from featx.errors import FeatxError, MediaError  # noqa: E402
# Bound after the submodule import, so `featx.extract` is the function (the module stays importable by name).
from featx.extract import extract  # noqa: E402

__all__ = ["FeatxError", "MediaError", "__version__", "extract", "read_layer", "open_cache", "Cache"]


def __getattr__(name):
    if name in ("read_layer", "open_cache", "Cache"):
        from featx import store
        return getattr(store, name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
