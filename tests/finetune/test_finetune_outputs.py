"""featx finetune's outputs: --layer best at layer 0, a model/ folder that outlives its base models, strict
meta.json with the command line, settings and versions, training sizes as given with their label counts."""
import json
import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from featx.cli.main import main
from test_finetune import FAST, planted_manifest, run_quiet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _no_nan(constant):
    raise ValueError(f"not strict JSON: {constant}")


def strict_json(path):
    with open(path, encoding="utf-8") as f:
        return json.loads(f.read(), parse_constant=_no_nan)


def probe_results_with_best_layer_0(folder, encoder):
    """A `featx probe` results folder whose dev scores put the encoder's best layer at 0."""
    os.makedirs(folder)
    rows = [dict(encoder=encoder, modality="text", num_layers=3, layer=k, pooling="mean", probe="logreg",
                 method="layer", train_size=1.0, seed=0, split=split, metric="f1_macro", value=v)
            for k in range(3) for split, v in (("dev", 0.9 - 0.2 * k), ("test", 0.5))]
    pd.DataFrame(rows).to_csv(os.path.join(folder, "results.csv"), index=False)
    return str(folder)


def test_layer_best_may_be_layer_0(tmp_path, tiny_bert):
    from featx.finetune import finetune

    manifest = planted_manifest(tmp_path / "data", n=20, broken=False)
    probe = probe_results_with_best_layer_0(tmp_path / "probe", tiny_bert)
    result, _ = run_quiet(finetune, manifest, [tiny_bert],
                          str(tmp_path / "out"), layers=["best"], probe_results=probe, epochs=1, **FAST)
    assert set(result.rows["layer"]) == {0}
    meta = strict_json(tmp_path / "out" / "meta.json")
    assert [e["layer"] for e in meta["encoders"]] == [0]
    # A model cut at the embeddings keeps one block (a model without blocks gives no hidden states).
    saved = json.loads((tmp_path / "out" / "model" / "encoder-0" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1


def test_model_folder_predicts_after_the_base_models_are_deleted(tmp_path, tiny_bert, tiny_clip, capsys):
    from featx.finetune import finetune, load_finetuned

    base = tmp_path / "base"
    bert, clip = shutil.copytree(tiny_bert, base / "bert"), shutil.copytree(tiny_clip, base / "clip")
    manifest = planted_manifest(tmp_path / "data", n=30, broken=False)
    result, _ = run_quiet(finetune, manifest, [str(bert), str(clip)], str(tmp_path / "out"), layers=["1", "last"],
                          epochs=1, **FAST)
    before, _ = run_quiet(load_finetuned(result.model_path).predict_manifest, manifest)
    shutil.rmtree(base)

    model = tmp_path / "out" / "model"
    assert main(["predict", manifest, "--classifier", str(model), "--out", str(tmp_path / "pred.csv")]) == 0, capsys.readouterr().err
    after = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert after["id"].tolist() == before["id"].tolist()
    assert after["prediction"].tolist() == before["prediction"].fillna("").tolist()
    assert before["prediction"].notna().sum() == 30
    # The encoders are kept only up to their cut: bert cut at 1 keeps its block 0 and the frozen block above the
    # cut (featx.finetune.model.kept_blocks), clip (last = 2) its two.
    kept = [json.loads((model / f"encoder-{i}" / "config.json").read_text())["num_hidden_layers"] for i in (0, 1)]
    assert kept == [2, 2]
    assert (model / "encoder-0" / "tokenizer_config.json").exists()
    assert (model / "encoder-1" / "preprocessor_config.json").exists()


def test_meta_is_strict_json_with_command_settings_and_versions(tmp_path, tiny_bert, monkeypatch):
    from featx.finetune import finetune
    from featx.version import __version__

    manifest = planted_manifest(tmp_path / "data", n=30, regression=True, broken=False)
    argv = ["featx", "finetune", manifest, "--model", tiny_bert]
    monkeypatch.setattr(sys, "argv", argv)
    result, _ = run_quiet(finetune, manifest, [tiny_bert], str(tmp_path / "out"), epochs=1,
                          train_sizes="0.5,10,1.0", **FAST)
    meta = strict_json(tmp_path / "out" / "meta.json")  # the chance predictor's corr is undefined: null
    assert meta["task"] == "regression" and meta["chance"]["corr"] is None
    assert meta["command"] == argv
    assert set(meta["versions"]) == {"featx", "torch", "transformers", "scikit-learn", "numpy"}
    assert meta["versions"]["featx"] == __version__ and all(meta["versions"].values())
    s = meta["settings"]
    assert s["train_sizes"] == ["0.5", "10", "1.0"] and s["seeds"] == [0] and s["head_lr"] == FAST["head_lr"]
    assert s["cut_layers"] == [2] and s["precision"] == "fp32" and s["task"] == "regression"

    # Training sizes as given, with the number of labels each gave (18 items in the training part).
    rows = result.rows
    labels = dict(zip(rows["train_size"], rows["train_labels"]))
    assert labels == {"0.5": 9, "10": 10, "1.0": 18}
    table = pd.read_csv(tmp_path / "out" / "results.csv", dtype={"train_size": str})
    assert dict(zip(table["train_size"], table["train_labels"])) == labels
    # The saved model is the one trained on the whole training part.
    trained_on = json.loads((tmp_path / "out" / "model" / "config.json").read_text())["trained_on"]
    assert trained_on["train_size"] == "1.0" and trained_on["train_items"] == 18


def test_the_full_training_part_is_added_when_not_asked_for_and_heads_the_report(tmp_path, tiny_bert, capsys):
    """--train-sizes 0.5 alone: the full training part (1.0) is trained too, with a note, so that the score the
    report shows "at the full training part" is one made with the whole training part (as `featx probe`)."""
    from featx.probing.results import load_results
    from featx.report.results import FINETUNE_COLUMN, summary_table

    manifest = planted_manifest(tmp_path / "data", n=20, broken=False)
    out = tmp_path / "ft"
    assert main(["finetune", manifest, "--model", tiny_bert, "--out", str(out), "--epochs", "1", "--train-sizes",
                 "0.5", "--lr", "1e-3", "--batch-size", "8", "--dropout", "0", "-q"]) == 0
    err = capsys.readouterr().err
    note = "the full training part (1.0) was added to the training sizes: the headline uses it"
    assert f"featx finetune: {note}" in err.splitlines(), err
    meta = strict_json(out / "meta.json")
    assert note in meta["notes"]
    assert meta["settings"]["train_sizes"] == ["0.5"] and meta["settings"]["train_sizes_run"] == ["0.5", "1.0"]

    table = pd.read_csv(out / "results.csv", dtype={"train_size": str})
    labels = dict(zip(table["train_size"], table["train_labels"]))
    assert set(labels) == {"0.5", "1.0"} and labels["0.5"] < labels["1.0"]
    assert sorted(os.listdir(out / "runs")) == ["n0.5-s0-f0", "n1.0-s0-f0"]
    trained_on = json.loads((out / "model" / "config.json").read_text())["trained_on"]
    assert trained_on["train_size"] == "1.0"

    # The report's fine-tuned score is the full training part's test score, not the 0.5 run's.
    res = load_results(str(out))
    assert res.full_train_size == "1.0"
    metric = res.primary_metric
    full = table[(table["train_size"] == "1.0") & (table["split"] == "test") & (table["metric"] == metric)]
    shown = summary_table(res, [metric])[FINETUNE_COLUMN].dropna()
    assert len(full) == 1 and shown.tolist() == pytest.approx(full["value"].tolist())


def test_a_count_larger_than_the_training_part_is_a_one_line_error(tmp_path, tiny_bert, capsys):
    manifest = planted_manifest(tmp_path / "data", n=20, broken=False)
    rc = main(["finetune", manifest, "--model", tiny_bert, "--out", str(tmp_path / "out"), "--train-sizes",
               "0.5,50", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "larger than the training part" in err[0], err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_model_saved_in_the_first_format_still_loads(tmp_path, tiny_bert):
    from safetensors.torch import save_model

    from featx.encoders import load_encoder
    from featx.finetune import HeadSettings, load_finetuned
    from featx.finetune.model import build_model

    torch.manual_seed(0)
    model = build_model([load_encoder(tiny_bert)], [1], [0], HeadSettings(), 3)
    save_model(model, str(tmp_path / "model.safetensors"))
    config = {"format": "featx-finetune/1", "task": "classification", "classes": ["a", "b", "c"],
              "target_mean": 0.0, "target_std": 1.0, "max_length": None, "max_audio_seconds": 30.0,
              "encoders": [{"model": tiny_bert, "modality": "text", "layer": 1, "num_layers": 3}],
              "head": vars(HeadSettings())}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        expected = model.eval()([model.branches[0].adapter.prepare(["good movie", "bad"])]).argmax(1).numpy()
    got = load_finetuned(tmp_path).predict([["good movie", "bad"]])
    assert got.tolist() == np.asarray(["a", "b", "c"])[expected].tolist()
