"""featx info: a killed run's progress from its parts, a folder of caches, --json, and paths it must not open."""
import json
import os
import subprocess
import sys

import numpy as np

from featx.cache import inspect
from featx.cli.main import main

from test_cache_hardening import HERE, ROOT, _killed_run
from test_store import write_all


def _strict(text):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_info_shows_a_killed_runs_progress_and_lists_a_folder(tmp_path, capsys):
    killed, done = tmp_path / "killed.h5", str(tmp_path / "done.h5")
    _killed_run(killed)
    write_all(done, 12, order=np.arange(0, 12, 2))
    (tmp_path / "notes.txt").write_text("not a cache")
    assert main(["info", str(killed)]) == 0
    text = capsys.readouterr().out
    assert "items      40: 40 done, 0 failed, 0 pending" in text and "unmerged   5 parts" in text
    assert "(checksums: verified)" in text  # every part is read in full to count it (it said "not checked")
    assert main(["info", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert text.index(done) < text.index(str(killed)) and "notes.txt" not in text
    assert "items      12: 6 done, 0 failed, 6 pending" in text
    assert main(["info", "--json", str(tmp_path)]) == 0
    listed = _strict(capsys.readouterr().out)
    assert [d["path"] for d in listed] == [done, str(killed)]
    assert [(d["status"], d["done"], d["pending"]) for d in listed] == [("complete", 6, 6), ("unmerged parts", 40, 0)]
    assert listed[0] == inspect(done) and listed[0]["settings"] == {"sample_rate": 16000}
    assert listed[0]["format_version"] == "1.0" and listed[0]["poolings"] == ["mean", "cls"]


def test_info_on_a_folder_without_caches_and_on_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 1
    assert main(["info", str(tmp_path / "none.h5")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"featx info: error: no featx caches in {tmp_path}", f"featx info: error: no cache at {tmp_path}/none.h5"]


def test_info_json_reports_each_cache_and_its_error(tmp_path, capsys):
    good, bad = str(tmp_path / "a.h5"), tmp_path / "b.h5"
    write_all(good, 3)
    bad.write_text("hello")
    assert main(["info", "--json", good, str(bad)]) == 1
    listed = _strict(capsys.readouterr().out)
    assert listed[0]["done"] == 3 and listed[1]["path"] == str(bad)
    assert "not a readable HDF5 file" in listed[1]["error"]


def test_info_on_a_fifo_is_one_line_and_does_not_hang(tmp_path):
    fifo = str(tmp_path / "pipe.h5")
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-c", "import sys; from featx.cli.main import main; sys.exit(main())",
                        "info", fifo], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": ROOT}, cwd=HERE)
    assert r.returncode == 1 and r.stderr.strip() == f"featx info: error: {fifo} is not a regular file", r.stderr


def test_probing_a_killed_runs_cache_says_where_its_parts_are(tmp_path, capsys):
    """`featx probe` on the cache of a killed extraction (parts, no file yet) names the parts and how to resume
    them, as `featx info` and open_cache do (it said only 'no such cache')."""
    killed = tmp_path / "killed.h5"
    _killed_run(killed)
    assert main(["probe", str(killed), "--out", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"a killed run left parts in {killed}.parts" in err[0], err
    assert "run the same extraction again to resume" in err[0]
