"""Errors featx raises for usage and configuration mistakes (printed as one line by the CLI)."""


class FeatxError(Exception):
    """A usage or configuration error: the CLI prints it as one line and exits 1."""
