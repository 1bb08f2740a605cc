"""Probing: per-layer probes, layer-weighted probes, fusion models, sweeps and saved classifiers."""
from featx.probing.classifier import Classifier
from featx.probing.estimators import BatchedLinearProbe, LayerProbe, infer_task
from featx.probing.fusion import EarlyFusion, GatedFusion, LateFusion, WeightedLayerProbe
from featx.probing.sweep import run_probe

__all__ = ["BatchedLinearProbe", "Classifier", "EarlyFusion", "GatedFusion", "LateFusion", "LayerProbe",
           "WeightedLayerProbe", "infer_task", "run_probe"]
