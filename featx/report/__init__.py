"""The report stage: layer-wise plots, CKA heatmaps and a summary table, as one HTML file plus Markdown."""
from featx.report.build import build_report
from featx.report.cka import cache_cka, cka_matrix, linear_cka

__all__ = ["build_report", "cache_cka", "cka_matrix", "linear_cka"]
