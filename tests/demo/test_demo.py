"""featx demo end to end (small): the recipes run as written, and the report says which models are random."""
import os

import pandas as pd

from featx.demo.run import run_demo


def test_demo_runs_its_recipes_and_says_which_models_are_random(tmp_path):
    html = run_demo(str(tmp_path / "demo"), n=40, seed=1, progress=False)
    assert os.path.isfile(html)
    text = open(html, encoding="utf-8").read()
    assert "RANDOM weights" in text and "<img" in text
    res = pd.read_csv(tmp_path / "demo" / "results" / "results.csv")
    # the demo probe recipe asks for early and late fusion only: the recipe's methods are the ones run
    assert set(res.loc[res.method.str.startswith("fusion"), "method"]) == {"fusion-early", "fusion-late"}
    assert {"text", "image", "audio"} <= set(res.modality)
    assert sorted(res.train_size.unique()) == [0.25, 0.5, 1.0]


def test_the_demo_calls_the_library_not_the_command_line():
    import ast

    import featx.demo.run as run

    tree = ast.parse(open(run.__file__, encoding="utf-8").read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith("featx.cli") for m in imported if m)
    assert {"featx.extraction.pipeline", "featx.probing.sweep", "featx.report", "featx.settings"} <= imported
