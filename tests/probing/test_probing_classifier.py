"""A saved classifier file that is damaged or tampered with is refused with one line naming it, on load."""
import json
import struct

import numpy as np
import pytest

from featx.errors import FeatxError
from featx.probing import Classifier


def _classifier(task="classification", classes=("neg", "neu", "pos"), dim=4):
    rng = np.random.default_rng(0)
    block = {"encoder": "/models/text", "name": "text", "modality": "text", "pooling": "mean", "layers": [2],
             "hidden_size": dim, "num_layers": 4}
    c = len(classes) if task == "classification" else 1
    params = {"mean": rng.normal(size=dim), "scale": np.ones(dim), "coef": rng.normal(size=(c, dim)),
              "intercept": np.zeros(c)}
    return Classifier.from_linear(task, block, params, None if task == "regression" else np.asarray(classes))


def _write_raw(path, header_json, arrays):
    """A safetensors file written by hand: 8-byte header length, JSON header, then the array bytes."""
    head, data, offset = {}, b"", 0
    for name, a in arrays.items():
        raw = np.ascontiguousarray(a, dtype="<f8").tobytes()
        head[name] = {"dtype": "F64", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    head["__metadata__"] = {"featx": header_json}
    text = json.dumps(head).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    return path


def _parts(clf):
    header = {"format": "featx-classifier/1", "task": clf.task, "blocks": clf.blocks, "settings": {},
              "classes": None if clf.classes is None else [str(c) for c in clf.classes],
              "classes_dtype": None if clf.classes is None else clf.classes.dtype.kind}
    return header, dict(clf.arrays)


def _variants(tmp_path):
    clf = _classifier()
    header, arrays = _parts(clf)
    good = _write_raw(tmp_path / "good.safetensors", json.dumps(header), arrays)
    raw = open(good, "rb").read()
    out = {}
    out["empty file"] = tmp_path / "empty.safetensors"
    out["empty file"].write_bytes(b"")
    out["not safetensors"] = tmp_path / "junk.safetensors"
    out["not safetensors"].write_bytes(b"not a file at all")
    out["header length lies"] = tmp_path / "lies.safetensors"
    out["header length lies"].write_bytes(struct.pack("<Q", 10 ** 9) + raw[8:])
    out["truncated"] = tmp_path / "trunc.safetensors"
    out["truncated"].write_bytes(raw[:-40])
    out["bad JSON"] = _write_raw(tmp_path / "badjson.safetensors", "{not json", arrays)
    out["JSON not an object"] = _write_raw(tmp_path / "list.safetensors", "[1, 2]", arrays)
    out["missing array"] = _write_raw(tmp_path / "missing.safetensors", json.dumps(header),
                                      {k: v for k, v in arrays.items() if k != "coef"})
    out["wrong coef shape"] = _write_raw(tmp_path / "coef.safetensors", json.dumps(header),
                                         {**arrays, "coef": np.zeros((3, 5))})
    out["no classes"] = _write_raw(tmp_path / "noclass.safetensors", json.dumps({**header, "classes": None}), arrays)
    out["NaN weights"] = _write_raw(tmp_path / "nan.safetensors", json.dumps(header),
                                    {**arrays, "coef": np.full((3, 4), np.nan)})
    out["mean of the wrong shape"] = _write_raw(tmp_path / "mean.safetensors", json.dumps(header),
                                                {**arrays, "mean_0": np.zeros((1, 1))})
    out["no blocks"] = _write_raw(tmp_path / "blocks.safetensors", json.dumps({**header, "blocks": []}), arrays)
    out["no task"] = _write_raw(tmp_path / "task.safetensors",
                                json.dumps({k: v for k, v in header.items() if k != "task"}), arrays)
    def with_extraction(extraction):
        return json.dumps({**header, "blocks": [{**header["blocks"][0], "extraction": extraction}]})
    out["extraction settings not a mapping"] = _write_raw(tmp_path / "ext.safetensors", with_extraction("fp32"),
                                                          arrays)
    out["unknown extraction setting"] = _write_raw(tmp_path / "extkey.safetensors",
                                                   with_extraction({"precision": "fp32", "warp": 9}), arrays)
    return good, out


def test_valid_classifier_loads_and_predicts(tmp_path):
    good, _ = _variants(tmp_path)
    clf = Classifier.load(str(good))
    assert clf.predict([np.zeros((5, 1, 4))]).shape == (5,)
    reg = _classifier("regression")
    reg.save(str(tmp_path / "reg.safetensors"))
    assert Classifier.load(str(tmp_path / "reg.safetensors")).task == "regression"


@pytest.mark.parametrize("case", ["empty file", "not safetensors", "header length lies", "truncated", "bad JSON",
                                  "JSON not an object", "missing array", "wrong coef shape", "no classes",
                                  "NaN weights", "mean of the wrong shape", "no blocks", "no task",
                                  "extraction settings not a mapping", "unknown extraction setting"])
def test_damaged_classifier_is_one_line_naming_the_file(tmp_path, case):
    _, variants = _variants(tmp_path)
    path = str(variants[case])
    with pytest.raises(FeatxError) as e:
        Classifier.load(path)
    assert path in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("n_classes, probe", [(2, "logistic"), (3, "logistic"), (3, "batched")])
def test_class_probabilities_are_those_of_the_logistic_probe_it_saved(n_classes, probe):
    """predict_proba of a saved probe = scikit-learn's LogisticRegression.predict_proba of the fit it was saved
    from (two classes: one logit, sigmoid; more: softmax)."""
    from _synthetic import planted
    from featx.probing.registry import make_probe

    X, _ = planted(n=150, num_layers=3, dim=6, k=1, task="classification", seed=2)
    y = np.asarray(["a", "b", "c"][:n_classes])[np.arange(150) % n_classes]
    X[:, 1, 0] += np.arange(150) % n_classes   # layer 1 tells the classes apart, not perfectly
    est = make_probe(probe, 0, "cpu").set_params(task="classification").fit(X[:100], y[:100], X[100:], y[100:])
    block = {"encoder": "/m/t", "name": "t", "modality": "text", "pooling": "mean", "layers": [1], "hidden_size": 6,
             "num_layers": 3}
    clf = Classifier.from_linear("classification", block, est.linear_params(1), est.classes_)
    got = clf.predict_proba([X[100:, 1:2]])
    assert got.shape == (50, n_classes)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-12)
    assert list(clf.classes[got.argmax(1)]) == list(clf.predict([X[100:, 1:2]]))
    if probe == "logistic":
        np.testing.assert_allclose(got, est.estimators_[1].predict_proba(X[100:, 1]), atol=1e-6)  # float32 X
    with pytest.raises(FeatxError, match="regression"):
        _classifier("regression").predict_proba([X[:3, 1:2, :4]])
