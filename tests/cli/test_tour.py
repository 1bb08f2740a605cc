"""The README's tour and its "Reading a cache" snippet, checked against what featx really writes: the repo's
recipes chain into one another, the snippet runs, and the tour's predict path is the file probe saves."""
import os
import re
import shlex

import numpy as np

from _synthetic import planted, standard_splits, write_cache
from featx.cli.main import main
from featx.extraction.pipeline import cache_path
from featx.settings import ExtractSettings, FuseSettings, build_settings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _readme_section(title):
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _tour_commands():
    """The tour's commands, one string each, continuation lines joined and comments dropped."""
    block = _readme_section("A tour of the stages").split("```bash\n")[1].split("```")[0]
    block = block.replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("featx ")]


def test_the_tours_recipes_read_the_caches_the_tours_extract_writes():
    ext = build_settings(ExtractSettings, {}, recipe=os.path.join(REPO, "extract", "paper.yaml"))
    norm = os.path.normpath
    assert norm(ext.manifest) == os.path.join(REPO, "mosi.csv") and norm(ext.out) == os.path.join(REPO, "cache")
    written = {norm(cache_path(ext.manifest, m, ext.out)) for m in ext.model}
    fuse = build_settings(FuseSettings, {}, recipe=os.path.join(REPO, "probe", "mosi.yaml"))
    assert {norm(c) for c in fuse.caches} == written
    # and the tour's `featx info` line names one of them
    info = next(c for c in _tour_commands() if c.startswith("featx info"))
    assert os.path.join(REPO, shlex.split(info)[2]) in written


def test_the_readme_reading_a_cache_snippet_runs(tmp_path):
    code = _readme_section("Reading a cache from your own code").split("```python\n")[1].split("```")[0]
    n, L, D = 60, 21, 4
    X, y = planted(n=n, num_layers=L, dim=D, k=19)
    seq = [np.repeat(X[i:i + 1], 3, axis=0) for i in range(n)]
    path = write_cache(tmp_path / "mosi__bert-large-uncased.h5", X, [f"i{i}" for i in range(n)], y,
                       standard_splits(n), seq=seq)
    code = code.replace("cache/mosi__bert-large-uncased.h5", path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["X"].shape == (n, D) and scope["all_layers"].shape == (n, L, D)
    assert scope["seq"].shape == (3, L, D)
    assert scope["probe"].scores_.shape == (L,) and scope["probe"].best_layer_ == 19


def test_the_tours_predict_reads_the_classifier_its_probe_saves(tmp_path, capsys):
    commands = _tour_commands()
    probe = shlex.split(next(c for c in commands if c.startswith("featx probe")))
    predict = shlex.split(next(c for c in commands if c.startswith("featx predict")))
    classifier = predict[predict.index("--classifier") + 1]
    assert "--save-classifier" in probe
    n = 120
    X, y = planted(n=n, num_layers=3, dim=6, k=1)
    (tmp_path / "cache").mkdir()
    write_cache(tmp_path / "cache" / "mosi__bert-large-uncased.h5", X, [f"i{i}" for i in range(n)], y,
                standard_splits(n), model="bert-large-uncased")
    args = [a for a in probe[1:] if a != "cache/*.h5"]
    sizes = args.index("--train-sizes") + 1
    args[sizes] = "1.0"   # 120 planted items have no 200-label training part
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main([args[0], "cache/mosi__bert-large-uncased.h5", *args[1:], "--seeds", "1", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    header, row = capsys.readouterr().out.splitlines()[:2]
    # the console table shows the training size as given ("1.0"), not as a 3-decimal float ("1.000")
    assert dict(zip(header.split(), row.split()))["train_size"] == "1.0"
    assert (tmp_path / classifier).is_file(), sorted(p.name for p in (tmp_path / "results").iterdir())
    assert re.fullmatch(r"results/classifier__[^/]+\.safetensors", classifier)


def test_best_layer_equal_to_the_output_layer_is_no_negative_zero(tmp_path):
    from featx.probing.results import load_results
    from featx.probing.sweep import run_probe
    from featx.report.results import summary_table

    X, y = planted(n=150, num_layers=3, dim=6, k=2)   # only the output layer carries the label: MAE, sign -1
    path = write_cache(tmp_path / "c.h5", X, [f"i{i}" for i in range(150)], y, standard_splits(150))
    run_probe([path], tmp_path / "out", probe="ridge", progress=False)
    row = summary_table(load_results(tmp_path / "out")).iloc[0]
    assert row["best layer"] == 2 and row["best minus output"] == 0
    assert not np.signbit(row["best minus output"])
