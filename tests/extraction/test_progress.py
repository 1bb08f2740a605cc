"""Progress per item, and only featx's own lines on stderr (library noise silenced, its global state restored)."""
import os
import re
import subprocess
import sys

import pandas as pd

from conftest import write_png, write_wav

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _steps(err, desc):
    """The item counts of `desc`'s progress lines, in order."""
    return [int(m.group(1)) for m in re.finditer(rf"^{re.escape(desc)}: (\d+)/\d+ item", err, re.M)]


def test_extract_progress_advances_per_batch_of_items_not_per_group(tmp_path, tiny_bert, capsys, monkeypatch):
    import featx.progress
    from featx.extraction.pipeline import extract

    monkeypatch.setattr(featx.progress, "LINE_INTERVAL_S", 0.0)  # a line per update
    texts = ["good movie " * (1 + k % 5) for k in range(19)] + [""]  # the empty text fails at decoding
    path = tmp_path / "m.csv"
    pd.DataFrame({"id": [f"u{k}" for k in range(20)], "text": texts}).to_csv(path, index=False)
    extract(path, tiny_bert, tmp_path / "c", batch_size=2, group_size=1000, device="cpu")
    steps = _steps(capsys.readouterr().err, "tiny-bert")
    assert steps[-1] == 20 and steps == sorted(steps), steps
    assert len(steps) >= 10 and max(b - a for a, b in zip([0] + steps, steps)) <= 2, steps


def test_extract_progress_counts_an_item_of_several_windows_once(tmp_path, tiny_wavlm, capsys, monkeypatch):
    import featx.progress
    from featx.extraction.pipeline import extract

    monkeypatch.setattr(featx.progress, "LINE_INTERVAL_S", 0.0)
    rows = [{"id": f"a{k}", "audio": write_wav(tmp_path / f"a{k}.wav", 0.4 + 0.5 * k, seed=k)} for k in range(5)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    extract(tmp_path / "m.csv", tiny_wavlm, tmp_path / "c", batch_size=1, group_size=1000, device="cpu",
            max_audio_seconds=0.5)  # the longer files run as several windows, one batch each
    steps = _steps(capsys.readouterr().err, "tiny-wavlm")
    assert steps[-1] == 5 and all(b - a <= 1 for a, b in zip([0] + steps, steps)), steps


def _featx(args, cwd, pre=""):
    """Run `featx ARGS` in a fresh interpreter (with `pre` run first); returns (returncode, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = f"import sys\n{pre}\nfrom featx.cli import main\nsys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=300)
    return r.returncode, r.stderr


def _foreign(err, descs):
    """stderr lines that are neither featx's own lines, nor its per-item failure lines, nor its progress lines."""
    own = tuple(f"{d}: " for d in descs)
    return [line for line in err.splitlines()
            if line.strip() and not line.startswith(("featx", "  failed ")) and not line.startswith(own)]


def _media_manifest(d):
    rows = [{"id": f"u{k}", "image": os.path.basename(write_png(d / f"i{k}.png", seed=k)),
             "audio": os.path.basename(write_wav(d / f"a{k}.wav", 0.3 + 0.2 * k, seed=k))} for k in range(4)]
    pd.DataFrame(rows).to_csv(d / "m.csv", index=False)
    return d / "m.csv"


def test_extract_stderr_holds_only_featx_lines(tmp_path, tiny_clip, tiny_wavlm):
    manifest = _media_manifest(tmp_path)
    # every warning shown, as `python -W default` would: deprecations from the libraries included
    code, err = _featx(["extract", manifest, "--model", tiny_clip, "--model", tiny_wavlm, "--out", tmp_path / "c"], tmp_path,
                       pre="import warnings; warnings.simplefilter('default')")
    assert code == 0, err
    assert _foreign(err, ["tiny-clip", "tiny-wavlm"]) == [], err


def test_extract_without_torchvision_says_what_to_install(tmp_path, tiny_clip):
    manifest = _media_manifest(tmp_path)
    code, err = _featx(["extract", manifest, "--model", tiny_clip, "--out", tmp_path / "c"], tmp_path,
                       pre="sys.modules['torchvision'] = None")  # as if torchvision were not installed
    assert code == 0, err
    assert _foreign(err, ["tiny-clip"]) == [], err
    advice = [line for line in err.splitlines() if "featx[vision]" in line]
    assert len(advice) == 1 and advice[0].startswith("featx extract: "), err


def test_extract_leaves_logging_and_warnings_as_they_were(tmp_path, tiny_clip, tiny_wavlm):
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from featx.extraction.pipeline import extract

    manifest = _media_manifest(tmp_path)
    hf_logging.set_verbosity_info()
    torch_logger = logging.getLogger("torch")
    before = (list(warnings.filters), hf_logging.get_verbosity(), torch_logger.level, logging.root.level,
              logging.getLogger("huggingface_hub").level)
    try:
        extract(manifest, [tiny_clip, tiny_wavlm], tmp_path / "c", device="cpu", progress=False)
        after = (list(warnings.filters), hf_logging.get_verbosity(), torch_logger.level, logging.root.level,
                 logging.getLogger("huggingface_hub").level)
    finally:
        hf_logging.set_verbosity_warning()
    assert after == before


def test_building_the_demo_models_prints_nothing(tmp_path):
    code = ("import sys; from featx.demo.tiny import build_tiny_bert, build_tiny_clip, build_tiny_wavlm\n"
            "for build in (build_tiny_bert, build_tiny_clip, build_tiny_wavlm): build(sys.argv[1] + build.__name__)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no 'Writing model shards' bar


def _planted_caches(tmp_path, task="classification", n=60, modalities=("text",), drop=0):
    from _synthetic import planted, standard_splits, write_cache

    ids = [f"i{k:03d}" for k in range(n)]
    X, y = planted(n=n, num_layers=2, dim=6, k=1, task=task, seed=0)
    splits = standard_splits(n)
    return [write_cache(tmp_path / f"m__{m}.h5", X[drop * j:], ids[drop * j:], y[drop * j:], splits[drop * j:],
                        model=f"toy/{m}", modality=m) for j, m in enumerate(modalities)]


def test_probe_fits_that_did_not_converge_are_named_in_one_featx_line(tmp_path, capsys, one_torch_thread):
    from featx.probing.estimators import LayerProbe
    from featx.probing.registry import register_probe
    from featx.cli.main import main

    # a real logistic probe, stopped after one lbfgs iteration: scikit-learn warns that it did not converge
    register_probe("logistic-1-iteration", lambda seed, device: LayerProbe(probe="logistic", max_iter=1,
                                                                            random_state=seed))
    caches = _planted_caches(tmp_path)
    assert main(["probe", *caches, "--out", str(tmp_path / "out"), "--probe", "logistic-1-iteration", "-q"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    # with the command's name, as every other line (it said "featx: ...")
    assert len(lines) == 1 and lines[0].startswith("featx probe: ") and "before converging" in lines[0], err
    assert "logistic" in lines[0] and "ConvergenceWarning" not in err, err


def test_featx_warnings_on_the_command_line_are_featx_lines(tmp_path):
    caches = _planted_caches(tmp_path, task="regression", modalities=("text", "image"), drop=3)
    code, err = _featx(["fuse", *caches, "--out", tmp_path / "out", "--fusion", "early", "--quiet"], tmp_path)
    assert code == 0, err
    assert _foreign(err, []) == [] and "featx fuse: fusion uses the 57 labelled items" in err, err


def test_finetune_stderr_holds_only_featx_lines(tmp_path, tiny_bert):
    texts = ["good fun", "awful boring", "great", "bad"]
    rows = [{"id": f"x{i}", "text": texts[i % 4], "label": float(i % 2),
             "split": ["train", "train", "dev", "test"][i % 4]} for i in range(24)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    code, err = _featx(["finetune", tmp_path / "m.csv", "--model", tiny_bert, "--epochs", "1", "--out",
                        tmp_path / "ft", "--quiet"], tmp_path, pre="import warnings; warnings.simplefilter('default')")
    assert code == 0, err
    assert _foreign(err, []) == [], err  # no 'Writing model shards' bar from saving model/
