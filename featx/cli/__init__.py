"""The `featx` command line."""
from featx.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
