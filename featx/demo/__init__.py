"""An offline end-to-end demo: small data set, tiny models, every stage, one report."""
from featx.demo.run import run_demo

__all__ = ["run_demo"]
