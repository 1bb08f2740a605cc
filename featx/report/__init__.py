"""The report stage: layer-wise plots, CKA heatmaps and a summary table, as one HTML file plus Markdown."""
from featx.report.cka import cache_cka, cka_matrix, linear_cka

__all__ = ["build_report", "cache_cka", "cka_matrix", "linear_cka"]


def __getattr__(name):
    # matplotlib is imported only when a report is built, so `from featx.report import linear_cka` stays light.
    if name == "build_report":
        from featx.report._build import build_report
        return build_report
    raise AttributeError(f"module 'featx.report' has no attribute {name!r}")
