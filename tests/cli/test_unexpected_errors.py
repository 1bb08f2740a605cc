"""An unexpected error (a bug in featx, a plug-in or a library; not a FeatxError) is one line on stderr and exit 1,
like a usage error, with what, where and how to see the traceback (FEATX_TRACEBACK=1 raises it instead). It was a
traceback: trial 3 met `IndexError: tuple index out of range` from featx finetune, and a TypeError from extract."""
import contextlib
import io
import sys

import pandas as pd
import pytest

from featx.cli.main import main


def _main(args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    return status, out.getvalue(), err.getvalue()


class BuggyEncoder:
    """Set below: a plug-in text family's adapter with a bug (its forward drops the token ids)."""


def _buggy_class():
    from featx.encoders.text import TextEncoder

    class Buggy(TextEncoder):
        def forward(self, inputs):
            return super().forward({k: v for k, v in inputs.items() if k != "input_ids"})

    return Buggy


@pytest.fixture()
def buggy_bert(tiny_bert):
    """tiny_bert's model type served, for the test, by a plug-in family whose adapter has a bug (the registry as it
    was afterwards)."""
    from featx.encoders import Family, family_of, load_config, register_family
    from featx.encoders.registry import unregister_family

    original = family_of(load_config(tiny_bert), "text")
    sys.modules[__name__].BuggyEncoder = _buggy_class()   # the registry imports adapters as "module:Class"
    register_family(Family("test-buggy", original.model_types, "text", f"{__name__}:BuggyEncoder",
                           original.block_path))
    try:
        yield tiny_bert
    finally:
        unregister_family("test-buggy")
        register_family(original)


def _text_manifest(folder, n=8):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"t{i}", "text": ["good", "bad film", "great fun", "awful"][i % 4], "label": float(i % 2),
             "split": ["train", "train", "dev", "test"][i % 4]} for i in range(n)]
    path = folder / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_an_unexpected_error_is_one_line_exit_1_or_its_traceback_when_asked(buggy_bert, tmp_path, monkeypatch):
    manifest = _text_manifest(tmp_path / "data")
    args = ["finetune", manifest, "--model", buggy_bert, "--out", str(tmp_path / "ft"), "--epochs", "1", "-q",
            "--task", "regression"]
    monkeypatch.delenv("FEATX_TRACEBACK", raising=False)
    status, out, err = _main(args)
    assert status == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith("featx finetune: error: unexpected ValueError: "), line
    assert "input_ids" in line and "(from featx/encoders/text.py:" in line   # what, and where in featx
    assert "FEATX_TRACEBACK=1" in line and "bug" in line
    monkeypatch.setenv("FEATX_TRACEBACK", "1")
    with pytest.raises(ValueError, match="input_ids"), contextlib.redirect_stderr(io.StringIO()):
        main(args + ["--overwrite"])
