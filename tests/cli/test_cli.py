"""The command line behaves like one program: one name per concept, usage errors exit 1 in one line, outputs
checked before any work, command-line values win over recipes, summaries on the console and as JSON."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from _synthetic import planted, standard_splits, write_cache
from featx.cli.main import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _featx(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "featx", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def caches(tmp_path):
    """Three planted caches (one per modality) of the same 120 items, regression, with splits."""
    ids = [f"i{k:03d}" for k in range(120)]
    splits = standard_splits(120)
    (tmp_path / "caches").mkdir()
    out = []
    for seed, modality in enumerate(("text", "image", "audio")):
        X, y = planted(n=120, num_layers=3, dim=6, k=1, seed=0)
        X += np.random.default_rng(seed + 10).normal(0, 0.5, X.shape).astype(np.float32)
        out.append(write_cache(tmp_path / "caches" / f"m__{modality}.h5", X, ids, y, splits, model=f"toy/{modality}",
                               modality=modality))
    return out


# ---------------------------------------------------------------- usage errors (issue 12 item 12)
@pytest.mark.parametrize("args,expect", [
    (["probe", "--bogus"], "featx probe: error: unknown option --bogus"),
    (["extract", "m.csv", "other.csv"], "featx extract: error: unexpected argument other.csv"),
    ([], "the following arguments are required: COMMAND"),
    (["fuse", "x.h5", "--method", "early"], "--method is now --fusion"),
    (["probe", "x.h5", "--layer", "3"], "--layer is now --fusion-layer"),
    (["finetune", "m.csv", "--pooling", "cls"], "--pooling is now --pool"),
    (["finetune", "m.csv", "--layer", "3"], "--layer is now --layers"),
])
def test_usage_errors_exit_1_with_one_line(args, expect):
    r = _featx(*args)
    assert r.returncode == 1, r.stderr
    line = _one_line(r.stderr)
    assert expect in line and "usage:" not in r.stderr


def test_an_unknown_option_names_the_subcommand_it_was_given_to(capsys):
    """`featx probe --nope` said `featx: error: unrecognized arguments: --nope`: the top parser reported what each
    subcommand's parser handed up. Now the subcommand's parser refuses it, for every subcommand."""
    commands = [[name] for name in build_parser()._subparsers._group_actions[0].choices] + [["manifest", "mmsa"]]
    assert ["probe"] in commands and ["models"] in commands and len(commands) >= 10
    for command in commands:
        code, _, err = _run(capsys, *command, "--nope")
        prog = " ".join(["featx", *command])
        assert code == 1 and _one_line(err) == f"{prog}: error: unknown option --nope (see {prog} --help)", err
    code, _, err = _run(capsys, "probe", "x.h5", "--nope", "3", "--zap=1")
    assert code == 1 and "featx probe: error: unknown options --nope --zap=1 " in _one_line(err)
    code, _, err = _run(capsys, "--nope", "probe")
    assert code == 1 and _one_line(err).startswith("featx: error: unknown option --nope")


def test_help_shows_every_default_and_every_option_has_help():
    r = _featx("probe", "--help")
    assert r.returncode == 0 and "(default: linear)" in r.stdout and "exit status" in r.stdout
    parser = build_parser()
    assert "exit status" in parser.description and "which layer" in parser.description
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers = dict(sub.choices)
    mmsa = next(a for a in parsers.pop("manifest")._actions if isinstance(a, argparse._SubParsersAction))
    parsers["manifest mmsa"] = mmsa.choices["mmsa"]
    parsers.pop("info")   # featx info's own options are another helper's
    for name, p in parsers.items():
        for action in p._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings:
                assert "(default:" in action.help or "(required)" in action.help, (name, action.dest)


def test_probe_after_an_extraction_with_failed_items_says_so_and_its_help_says_what_it_exits_with(tmp_path, tiny_bert,
                                                                                                capsys):
    """A manifest of 42 texts, 2 of them empty: extract records them as failed (exit 2). probe then left them out
    without a word (exit 0, labelled_items 40, no count). Now: one stderr line and `failed` in meta.json; the
    exit status stays 0 (extract reported them), and probe --help no longer promises exit 2 for them."""
    rows = ["id,text,label,split"] + [f"i{k:02d},{'' if k in (5, 17) else f'text number {k} is fine'},{k % 3 - 1},"
                                      f"{['train', 'train', 'train', 'dev', 'test'][k % 5]}" for k in range(42)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    code, _, err = _run(capsys, "extract", tmp_path / "m.csv", "--model", tiny_bert, "--out", tmp_path / "cache", "-q")
    assert code == 2 and "2 failed" in err, err
    cache = tmp_path / "cache" / "m__tiny-bert.h5"
    code, _, err = _run(capsys, "probe", cache, "--out", tmp_path / "p", "--probe", "batched", "-q")
    assert code == 0, err
    assert "featx probe: tiny-bert: 2 item(s) that failed at extraction were left out of training and scoring" in err
    meta = json.loads((tmp_path / "p" / "meta.json").read_text(encoding="utf-8"))
    assert meta["failed"] == {"tiny-bert": 2} and meta["encoders"][0]["labelled_items"] == 40
    for command in ("probe", "fuse"):
        code, out, _ = _run(capsys, command, "--help")
        assert code == 0 and "exit status" in out and "failed at extraction" in out, out
        assert "\n  2 " not in out, out     # probe has no exit 2: nothing of its own fails per item
    code, out, _ = _run(capsys, "extract", "--help")
    assert "\n  2    done, but some items failed" in out, out


# ---------------------------------------------------------------- recipes and the command line (item 2, 11)
def test_command_line_values_win_over_the_recipe_even_when_they_equal_the_default(tmp_path, caches, capsys):
    recipe = tmp_path / "probe.yaml"
    recipe.write_text("caches: [caches/m__text.h5, caches/m__image.h5]\nout: res\nprobe: batched\nseeds: 3\n"
                      "train-sizes: [0.25, 0.5, 1.0]\nfusion: early,late\n")
    code, _, err = _run(capsys, "fuse", "--recipe", recipe, "--seeds", "1", "--train-sizes", "1.0", "--fusion",
                        "early,late,gated", "--quiet")
    assert code == 0, err
    res = pd.read_csv(tmp_path / "res" / "results.csv")
    assert set(res.seed) == {0} and set(res.train_size) == {1.0}
    assert {"fusion-early", "fusion-late", "fusion-gated"} <= set(res.method)


def test_a_flag_a_recipe_turns_on_is_turned_off_on_the_command_line(tmp_path, caches, capsys):
    recipe = tmp_path / "probe.yaml"
    recipe.write_text("caches: [caches/m__text.h5]\nout: res\nseeds: 1\nweighted: true\n")
    methods = []
    for extra in ([], ["--no-weighted"]):
        code, _, err = _run(capsys, "probe", "--recipe", recipe, "--quiet", *extra)
        assert code == 0, err
        methods.append(set(pd.read_csv(tmp_path / "res" / "results.csv").method))
    assert any("weighted" in m for m in methods[0]) and not any("weighted" in m for m in methods[1]), methods
    code, out, _ = _run(capsys, "probe", "--help")
    assert "--no-weighted" not in out  # not listed; the README says it


def test_every_flag_is_turned_off_on_the_command_line(tmp_path, caches, capsys, monkeypatch):
    # --no-quiet was an unknown option, so a recipe's quiet: yes could not be undone; nor no-save-model: yes
    from featx.cli.main import build_parser
    from featx.cli.options import settings_from
    from featx.settings import ExtractSettings, FinetuneSettings, MmsaSettings, ReportSettings

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("caches: [caches/m__text.h5]\nout: res\nseeds: 1\nquiet: true\n")
    code, _, err = _run(capsys, "probe", "--recipe", recipe)
    assert code == 0 and "task: regression" not in err, err
    code, _, err = _run(capsys, "probe", "--recipe", recipe, "--no-quiet")
    assert code == 0 and "featx probe: task: regression" in err, err
    parser = build_parser()
    for argv, cls, recipe_text, off, names in [
            (["extract"], ExtractSettings, "manifest: m.csv\nmodel: [x]\nout: o\nquiet: yes\nseq: yes\n"
             "overwrite: yes\n", ["--no-quiet", "--no-seq", "--no-overwrite", "--no-trust-remote-code"],
             ["quiet", "seq", "overwrite"]),
            (["finetune"], FinetuneSettings, "manifest: m.csv\nmodel: [x]\nout: o\nno-save-model: yes\n",
             ["--save-model"], ["no_save_model"]),
            (["report"], ReportSettings, "results: [r]\nout: o\nno-cka: yes\nbiased-cka: yes\n",
             ["--cka", "--no-biased-cka"], ["no_cka", "biased_cka"])]:
        recipe.write_text(recipe_text)
        on = settings_from(parser.parse_args([*argv, "--recipe", str(recipe)]), cls)
        given = settings_from(parser.parse_args([*argv, "--recipe", str(recipe), *off]), cls)
        assert [getattr(on, k) for k in names] == [True] * len(names), argv
        assert [getattr(given, k) for k in names] == [False] * len(names), argv
    s = settings_from(parser.parse_args(["manifest", "mmsa", "l.csv", "--out", "m.csv", "--allow-missing",
                                         "--no-allow-missing"]), MmsaSettings)
    assert s.allow_missing is False
    code, out, _ = _run(capsys, "probe", "--help")
    assert "--no-quiet" not in out and "--no-weighted" not in out   # not listed; the README says it


def test_probe_accepts_the_repos_mosi_recipe(tmp_path, caches, capsys):
    (tmp_path / "probe").mkdir()
    shutil.copy(os.path.join(REPO, "probe", "mosi.yaml"), tmp_path / "probe" / "mosi.yaml")
    (tmp_path / "cache").mkdir()
    for src, name in zip(caches, ("openai--clip-vit-large-patch14", "microsoft--wavlm-large", "bert-large-uncased")):
        shutil.copy(src, tmp_path / "cache" / f"mosi__{name}.h5")
    code, out, err = _run(capsys, "probe", "--recipe", tmp_path / "probe" / "mosi.yaml", "--seeds", "1",
                          "--fusion", "early", "--quiet")
    assert code == 0, err
    res = pd.read_csv(tmp_path / "results" / "mosi" / "results.csv")
    assert set(res.method) == {"layer", "weighted", "fusion-early"}


def test_bad_values_are_one_line_with_the_valid_choices(tmp_path, caches, capsys):
    code, _, err = _run(capsys, "probe", caches[0], "--out", tmp_path / "o", "--probe", "ridgee")
    assert code == 1 and "batched" in _one_line(err) and "ridgee" in err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"caches: [{caches[0]}]\nout: o\nprobe: ridgee\n")
    code, _, err = _run(capsys, "probe", "--recipe", recipe)
    assert code == 1 and "probe: unknown probe 'ridgee'" in _one_line(err) and "batched" in err
    recipe.write_text("manifest: m.csv\nmodel: [x]\nout: o\nbatch-size: eight\n")
    code, _, err = _run(capsys, "extract", "--recipe", recipe)
    assert code == 1 and "batch-size: must be a whole number, not 'eight'" in _one_line(err)
    code, _, err = _run(capsys, "probe", caches[0], "--out", tmp_path / "o", "--seeds", "0")
    assert code == 1 and "at least 1" in _one_line(err)
    assert not (tmp_path / "o").exists()
    code, _, err = _run(capsys, "probe", caches[0], caches[0], "--out", tmp_path / "o")
    assert code == 1 and "given twice" in _one_line(err)


def test_task_is_forced_from_the_command_line(tmp_path, capsys):
    X, y = planted(n=120, num_layers=3, dim=6, k=1)
    flag = write_cache(tmp_path / "flag.h5", X, [f"i{k}" for k in range(120)], (y > 0).astype(float),
                       standard_splits(120))
    # a 0/1 label is a classification to `auto`; --task regression fits it as a number
    code, _, err = _run(capsys, "probe", flag, "--out", tmp_path / "o", "--task", "regression", "-q")
    assert code == 0, err
    assert json.load(open(tmp_path / "o" / "meta.json"))["task"] == "regression"


# ---------------------------------------------------------------- outputs refused before any work (item 13)
@pytest.mark.parametrize("command", ["extract", "probe", "fuse", "finetune", "report"])
def test_out_that_is_a_file_is_refused_first(tmp_path, command, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    first = {"extract": ["m.csv", "--model", "no/model"], "finetune": ["m.csv", "--model", "no/model"]}.get(
        command, ["missing.h5"])
    code, _, err = _run(capsys, command, *first, "--out", taken)
    assert code == 1 and "is a file" in _one_line(err) and taken.read_text() == "keep me"


def test_outputs_that_would_overwrite_an_input_are_refused(tmp_path, capsys):
    manifest = tmp_path / "M.csv"
    manifest.write_text("id,text\na,hello\n")
    code, _, err = _run(capsys, "predict", manifest, "--classifier", tmp_path / "c.safetensors", "--out", manifest)
    assert code == 1 and "overwrite the input" in _one_line(err)
    code, _, err = _run(capsys, "predict", manifest, "--classifier", tmp_path / "c.safetensors", "--out", tmp_path)
    assert code == 1 and "is a folder" in _one_line(err)
    labels = tmp_path / "L.csv"
    labels.write_text("video_id,clip_id,text,label,mode\nv,1,hi,0.5,train\n")
    code, _, err = _run(capsys, "manifest", "mmsa", labels, "--out", labels)
    assert code == 1 and "overwrite the input" in _one_line(err)
    assert manifest.read_text() == "id,text\na,hello\n" and labels.read_text().startswith("video_id")


# ---------------------------------------------------------------- trust_remote_code (issue 13 item 16)
def test_trust_remote_code_only_from_the_flag_and_named(tmp_path, media, tiny_bert, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"manifest: {media}\nmodel: [{tiny_bert}]\nout: {tmp_path / 'o'}\ntrust-remote-code: true\n")
    code, _, err = _run(capsys, "extract", "--recipe", recipe)
    assert code == 1 and "only be given on the command line" in _one_line(err)
    assert not (tmp_path / "o").exists()
    code, _, err = _run(capsys, "extract", media, "--model", tiny_bert, "--out", tmp_path / "o", "--dtype",
                        "float32", "--trust-remote-code", "-q")
    assert code == 0, err
    named = [line for line in err.splitlines() if "trust-remote-code" in line]
    assert len(named) == 1 and tiny_bert in named[0]


# ---------------------------------------------------------------- summaries and progress (item 9, 15)
def test_probe_prints_a_summary_table_or_json(tmp_path, caches, capsys):
    code, out, err = _run(capsys, "fuse", *caches[:2], "--out", tmp_path / "o", "--fusion", "early", "--probe",
                          "batched", "-q")
    assert code == 0, err
    assert "best_dev_layer" in out and "toy/text" in out and f"results in {tmp_path / 'o'}" in out
    assert err == ""   # --quiet: no progress
    code, out, err = _run(capsys, "fuse", *caches[:2], "--out", tmp_path / "o", "--fusion", "early", "--probe",
                          "batched", "--json", "-q")
    assert code == 0, err

    def no_nan(word):
        raise AssertionError(f"not strict JSON: {word}")

    rows = json.loads(out, parse_constant=no_nan)
    assert {r["encoder"] for r in rows} == {"toy/text", "toy/image"}
    assert all("best_dev_layer" in r for r in rows) and "results in" in err


def test_progress_into_a_pipe_is_plain_lines(tmp_path, caches, capsys):
    code, _, err = _run(capsys, "probe", caches[0], "--out", tmp_path / "o")
    assert code == 0
    assert "\r" not in err and any(line.startswith("probe: ") for line in err.splitlines()), err


def test_line_progress_writes_lines_without_carriage_returns():
    import io

    from featx.progress import LineProgress, progress_bar

    buf = io.StringIO()
    bar = LineProgress(4, "extract", "item", buf, interval=0)
    for _ in range(4):
        bar.update(1)
    bar.set_postfix(loss="0.1")
    bar.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue() and lines[0] == "extract: 1/4 items (25%)" and lines[-1].startswith(
        "extract: 4/4 items (100%) in ") and lines[-1].endswith("loss=0.1")   # not "4/4 item"
    for total, said in ((1, "e: 1/1 batch (100%) in "), (3, "e: 3/3 batches (100%) in ")):
        buf = io.StringIO()
        bar = LineProgress(total, "e", "batch", buf, interval=0)
        bar.update(total)
        bar.close()
        assert buf.getvalue().startswith(said)
    assert isinstance(progress_bar(3, "x", file=io.StringIO()), LineProgress)
    quiet = io.StringIO()
    progress_bar(3, "x", enabled=False, file=quiet).update(3)
    assert quiet.getvalue() == ""


def test_finetune_prints_its_test_rows(tmp_path, tiny_bert, capsys):
    rows = [{"id": f"x{i}", "text": ["good fun", "awful boring", "great", "bad"][i % 4], "label": float(i % 2),
             "split": ["train", "train", "train", "dev", "test"][i % 5]} for i in range(20)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    code, out, err = _run(capsys, "finetune", tmp_path / "m.csv", "--model", tiny_bert, "--out", tmp_path / "o",
                          "--epochs", "1", "--no-save-model", "--json", "-q", "--device", "cpu")
    assert code == 0, err
    table = json.loads(out)
    assert [r["split"] for r in table] == ["test"] and table[0]["train_size"] == 1.0 and len(table[0]) > 5


def test_predict_logs_as_itself_and_says_where_it_wrote(tmp_path, media, tiny_bert, capsys):
    assert _run(capsys, "extract", media, "--model", tiny_bert, "--out", tmp_path / "cache", "--dtype", "float32",
                "-q")[0] == 0
    cache = str(tmp_path / "cache" / "manifest__tiny-bert.h5")
    assert _run(capsys, "probe", cache, "--out", tmp_path / "res", "--probe", "ridge", "--save-classifier",
                "-q")[0] == 0
    saved = [os.path.join(tmp_path / "res", f) for f in os.listdir(tmp_path / "res") if f.endswith(".safetensors")]
    code, _, err = _run(capsys, "predict", media, "--classifier", saved[0], "--out", tmp_path / "p.csv")
    assert code == 0, err
    assert "featx extract" not in err and f"written to {tmp_path / 'p.csv'}" in err
    assert all(line.startswith(("featx predict:", "  ", "tiny-bert:")) for line in err.splitlines()), err


def test_a_reader_that_closes_stdout_early_gets_no_traceback(tmp_path, caches):
    """`featx info c.h5 | head -3` and the like: the reader closes the pipe before featx writes; featx exits
    141 (128 + SIGPIPE) with nothing on stderr (it raised BrokenPipeError with a traceback)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    for args in (["info", caches[0]], ["models"]):
        read, write = os.pipe()
        os.close(read)   # the reader is gone before featx writes a byte
        try:
            done = subprocess.run([sys.executable, "-m", "featx", *map(str, args)], stdout=write,
                                  stderr=subprocess.PIPE, text=True, env=env, timeout=300)
        finally:
            os.close(write)
        assert done.returncode == 141 and done.stderr == "", (args, done.returncode, done.stderr)


def test_a_missing_source_column_names_the_columns_the_manifest_has(tmp_path, tiny_bert, tiny_clip_vision, capsys):
    """A misspelt column (`txt`) is one line that lists the manifest's columns, as a missing `id` is, in English
    ('an image encoder'); it named neither."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,txt,label\na,hello,1\nb,world,2\n", encoding="utf-8")
    for model, expect in ((tiny_bert, "no 'text' column, which a text encoder needs (columns: id, txt, label)"),
                          (tiny_clip_vision, "no 'image' or 'video' column, which an image encoder needs "
                                             "(columns: id, txt, label)")):
        code, _, err = _run(capsys, "extract", manifest, "--model", model, "--out", tmp_path / "cache")
        assert code == 1 and len(err.strip().splitlines()) == 1 and expect in err, err


def test_a_known_column_written_in_other_case_is_named_when_extracting(tmp_path, tiny_bert, capsys):
    """'Label' and 'Split' are kept as metadata (names are exact); extract says so in one line each, instead of
    `featx probe` finding 'no labels to probe' after the extraction."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,text,Label,Split\na,hello,1,train\nb,world,2,test\n", encoding="utf-8")
    code, _, err = _run(capsys, "extract", manifest, "--model", tiny_bert, "--out", tmp_path / "cache", "-q")
    assert code == 0, err
    for col, known in (("Label", "label"), ("Split", "split")):
        assert f"featx extract: manifest m.csv: column '{col}' is kept as metadata; featx reads '{known}'" in err, err
    manifest.write_text("id,text,label,split\na,hello,1,train\nb,world,2,test\n", encoding="utf-8")
    code, _, err = _run(capsys, "extract", manifest, "--model", tiny_bert, "--out", tmp_path / "cache2", "-q")
    assert code == 0 and "kept as metadata" not in err, err


def test_extract_refuses_a_model_given_twice(tmp_path, capsys, tiny_bert, monkeypatch):
    # `featx extract m.csv --model M --model M` ran the model twice and wrote its cache twice
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,text\na,hello\nb,world\n", encoding="utf-8")
    monkeypatch.chdir(os.path.dirname(tiny_bert))
    typed = os.path.basename(tiny_bert)
    for twice in ([tiny_bert, "./" + typed + "/"], ["org/model", "org/model"]):
        code, _, err = _run(capsys, "extract", manifest, "--model", twice[0], "--model", twice[1],
                            "--out", tmp_path / "c")
        assert code == 1 and f"{twice[1]} is given twice (as {twice[0]}); give each model once" in _one_line(err)
        assert not (tmp_path / "c").exists()


def test_report_refuses_one_results_folder_given_twice(tmp_path, capsys):
    # `featx report r r` labelled both copies "r" and their figures overwrote each other
    (tmp_path / "r").mkdir()
    code, _, err = _run(capsys, "report", tmp_path / "r", str(tmp_path / "r") + "/", "--out", tmp_path / "rep")
    assert code == 1 and "given twice" in _one_line(err)
    assert not (tmp_path / "rep").exists()


_BROKEN_ADAPTER = '''
from featx.encoders.registry import Family, register_family
from featx.encoders.text import TextEncoder


class Broken(TextEncoder):
    """A plug-in adapter with a bug in its forward."""

    def forward(self, inputs):
        raise TypeError("Broken.forward() got an unexpected keyword argument 'add_adapter'")


register_family(Family("broken-bert", ("bert",), "text", "broken_adapter:Broken", "encoder.layer"))
'''


def test_an_unexpected_error_is_one_line_naming_it_and_its_traceback_is_one_variable_away(tmp_path, tiny_bert):
    """An error featx did not foresee (here a plug-in adapter's bug; in trial 3 transformers' HuBERT refusing an
    argument) was Python's 40-line traceback: main caught featx's own errors only. Exit 1 either way."""
    (tmp_path / "broken_adapter.py").write_text(_BROKEN_ADAPTER)
    pd.DataFrame({"id": ["a", "b"], "text": ["one text", "another text"]}).to_csv(tmp_path / "m.csv", index=False)
    code = "import broken_adapter; from featx.cli.main import main; raise SystemExit(main())"

    def child(**env):
        env = dict({k: v for k, v in os.environ.items() if k != "FEATX_TRACEBACK"}, HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([REPO, str(tmp_path)]), **env)
        return subprocess.run([sys.executable, "-c", code, "extract", "m.csv", "--model", tiny_bert, "--out", "c",
                               "-q"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    r = child()
    line = _one_line(r.stderr)
    assert r.returncode == 1 and line.startswith("featx extract: error: unexpected TypeError: Broken.forward()")
    assert "FEATX_TRACEBACK=1" in line
    r = child(FEATX_TRACEBACK="1")
    assert r.returncode == 1 and "Traceback" in r.stderr and "broken_adapter.py" in r.stderr
