"""featx.runinfo: the one meta.json writer that probe, fuse and finetune share."""
import json

import numpy as np

from featx import runinfo


def test_write_meta_is_strict_synced_and_atomic(tmp_path, monkeypatch):
    synced = []
    real_fsync = runinfo.os.fsync
    monkeypatch.setattr(runinfo.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "meta.json"
    path.write_text("old")
    runinfo.write_meta({"x": float("nan"), "n": np.int64(2), **runinfo.provenance({"seeds": (0, 1)})}, path)
    meta = json.loads(path.read_text())
    assert synced and not (tmp_path / "meta.json.tmp").exists()   # the probe's writer neither synced nor renamed
    assert meta["x"] is None and meta["n"] == 2 and meta["settings"] == {"seeds": [0, 1]}
    assert isinstance(meta["command"], list) and set(meta["versions"]) == set(runinfo.VERSIONED)


def test_the_command_line_names_the_program_featx(monkeypatch):
    import os

    from featx.runinfo import command_line

    monkeypatch.setattr("sys.argv", [os.path.join("/x", "site-packages", "featx", "__main__.py"), "probe", "c.h5"])
    assert command_line() == ["featx", "probe", "c.h5"]
    monkeypatch.setattr("sys.argv", ["/venv/bin/featx", "fuse"])
    assert command_line() == ["featx", "fuse"]
    monkeypatch.setattr("sys.argv", ["myscript.py", "a"])
    assert command_line() == ["myscript.py", "a"]
