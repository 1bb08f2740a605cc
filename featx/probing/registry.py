"""The probe registry: a probe's name (`--probe NAME`) -> how to build it and how results name it.

Adding a probe is one module with an estimator that follows LayerProbe's contract (fit(X (N, L, D), y,
X_dev, y_dev), predict_layers(X) -> (N, L), best_layer_) and one `register_probe` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from featx.errors import FeatxError
from featx.probing.estimators import BatchedLinearProbe, LayerProbe


@dataclass(frozen=True)
class ProbeSpec:
    """name: the --probe value. build(seed, device) -> an unfitted estimator. label(task) -> the `probe` column
    of the results table. linear: it has linear_params() and can be saved as a Classifier."""
    name: str
    build: Callable
    label: Callable
    linear: bool = False
    help: str = ""


_PROBES: dict = {}


def register_probe(name, build, label=None, linear=False, help=""):
    """Register a probe under `name`; `label` defaults to the name for every task. Returns the ProbeSpec."""
    spec = ProbeSpec(name, build, label or (lambda task, _n=name: _n), linear, help)
    _PROBES[name] = spec
    return spec


def unregister_probe(name) -> None:
    """Remove the probe `name` (a plug-in's, or a test's); nothing happens for an unknown name."""
    _PROBES.pop(name, None)


def probe_names() -> list:
    return list(_PROBES)


def get_probe(name) -> ProbeSpec:
    if name not in _PROBES:
        raise FeatxError(f"unknown probe {name!r}; choose from {', '.join(_PROBES)}")
    return _PROBES[name]


def make_probe(name, seed=0, device="auto", layer_widths=None):
    """An unfitted estimator of probe `name`. layer_widths: each layer's width when the layers of the X it
    will fit are zero-padded to one width (CacheData.layer_widths), for the probes that fit each layer at its
    own width (LayerProbe: an MLP's numbers depend on its input width; batched linear probes fit the padded
    block, where the zero columns get zero weights and change no number)."""
    est = get_probe(name).build(seed, device)
    if layer_widths is not None and "layer_widths" in est.get_params():
        est.set_params(layer_widths=list(layer_widths))
    return est


def _linear_label(task):
    return "ridge" if task == "regression" else "logistic"


register_probe("linear", lambda seed, device: LayerProbe(probe="linear", random_state=seed), _linear_label,
               linear=True, help="ridge (numbers) or logistic regression (classes), scikit-learn, per layer")
register_probe("ridge", lambda seed, device: LayerProbe(probe="ridge", random_state=seed), linear=True,
               help="scikit-learn ridge regression per layer")
register_probe("logistic", lambda seed, device: LayerProbe(probe="logistic", random_state=seed), linear=True,
               help="scikit-learn logistic regression per layer")
register_probe("mlp", lambda seed, device: LayerProbe(probe="mlp", random_state=seed),
               help="a one-hidden-layer MLP per layer (scikit-learn)")
register_probe("batched", lambda seed, device: BatchedLinearProbe(device=device, random_state=seed),
               lambda task: _linear_label(task) + "-batched", linear=True,
               help="the linear probes of all layers at once in torch (GPU when there is one)")
