"""The cache against hostile names, damaged and crafted files and a full disk: one line each, nothing lost."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from featx.cache import CacheWriter, check_settings, describe, is_complete, open_cache, pending_items, read_layer
from featx.cache import writer as cache_writer
from featx.cli.main import main
from featx.data.manifest import read_manifest
from featx.errors import FeatxError

from test_store import L, D, assert_values, batch, writer_args, write_all

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _no_traceback(text):
    return "Traceback" not in text and "Segmentation" not in text


# ---------------------------------------------------------------- metadata names, NUL ids (issue 13 items 1, 3)
def test_metadata_columns_named_with_slash_and_dot_extract_read_resume_and_info(tmp_path, tiny_bert, capsys):
    from featx import extract

    rows = [{"id": f"u{i}", "text": f"word {i} " * (i + 1), "a/b": f"x{i}", ".": f"dot{i}", "..": i,
             "label": float(i % 2)} for i in range(6)]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    out = tmp_path / "out"
    res = extract(str(manifest), [tiny_bert], str(out), device="cpu", progress=False)
    path = res.paths[0]
    with open_cache(path) as c:
        assert c.done.all()
        assert list(c.meta) == ["a/b", ".", ".."]
        assert list(c.meta["a/b"]) == [f"x{i}" for i in range(6)] and c.meta["."][5] == "dot5"
        first = c.pooled("mean")
    assert read_layer(path, -1).features.shape[0] == 6
    again = extract(str(manifest), [tiny_bert], str(out), device="cpu", progress=False)  # resume: nothing to do
    with open_cache(again.paths[0]) as c:
        np.testing.assert_array_equal(c.pooled("mean"), first)
    capsys.readouterr()
    assert main(["info", path]) == 0
    assert "6: 6 done" in capsys.readouterr().out


def test_any_column_name_round_trips_through_the_writer(tmp_path):
    names = ["a/b", ".", "..", "meta/0", "0", "tab\there", "ümlaut", "a" * 300, " "]
    path = str(tmp_path / "c.h5")
    write_all(path, 5, meta={k: [f"{k}-{i}" for i in range(5)] for k in names})
    with open_cache(path) as c:
        assert list(c.meta) == names
        for k in names:
            assert list(c.meta[k]) == [f"{k}-{i}" for i in range(5)]


def test_an_id_with_nul_is_refused_when_the_manifest_is_read(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "text": "t"}) for i in ["a", "b", "c\u0000d", "e"]))
    with pytest.raises(FeatxError, match=r"NUL character \(rows \[3\]\)"):
        read_manifest(path)


# ---------------------------------------------------------------- disk full (item 8)
FULL_CHILD = """
import resource, signal, sys
sys.path.insert(0, sys.argv[3])
from test_store import batch, writer_args
from featx.cache import CacheWriter
from featx.errors import FeatxError
import torch  # imported before the limit, as in featx extract

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    with CacheWriter(sys.argv[1], **writer_args(200)) as w:
        for lo in range(0, 200, 10):
            b = list(range(lo, lo + 10))
            w.write(b, *batch(b))
except FeatxError as e:
    print("error:", e, file=sys.stderr)
    sys.exit(1)
"""


def _full_run(path, limit):
    return subprocess.run([sys.executable, "-c", FULL_CHILD, str(path), str(limit), HERE], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})


def _leftovers(folder):
    return [n for root, _, files in os.walk(folder) for n in files if n.endswith(".tmp")]


@pytest.mark.parametrize("limit, where", [(100_000, "while writing c.h5.tmp"), (2_000, "for a part of 10 items")])
def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, limit, where):
    """A real file-size limit (RLIMIT_FSIZE): consolidation (100 kB: parts of 33 kB fit, the final file of 195 kB does not) or
    the first part (2 kB) runs out of room."""
    path = tmp_path / "c.h5"
    r = _full_run(path, limit)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and _no_traceback(r.stderr), r.stderr
    folder = tmp_path if "while" in where else f"{path}.parts"
    assert lines[0].startswith(f"error: no space left in {folder} {where}: it needs about "), lines[0]
    assert _leftovers(tmp_path) == [] and not path.exists()
    if limit > 50_000:  # every part survived: the next run only consolidates
        w = CacheWriter(str(path), **writer_args(200))
        assert len(w.todo) == 0
        w.close()
        assert_values(str(path), must_be_done=range(200))


def test_free_space_is_checked_before_consolidating(tmp_path, monkeypatch):
    path = str(tmp_path / "c.h5")
    w = CacheWriter(path, **writer_args(40))
    w.write(list(range(40)), *batch(list(range(40))))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(FeatxError, match=f"no space left in {tmp_path} to consolidate c.h5: it needs about"):
        w.close()
    assert not os.path.exists(path) and _leftovers(tmp_path) == []
    monkeypatch.undo()
    w = CacheWriter(path, **writer_args(40))
    assert len(w.todo) == 0
    w.close()
    assert_values(path, must_be_done=range(40))


def test_the_guarded_file_reads_past_its_end_as_zeros(tmp_path):
    """Past the end of the file being consolidated lie the writes dropped after an error, which HDF5 may read back:
    h5py's file-object driver leaves what a short read did not fill unset, and HDF5, taking that garbage for
    strings, crashed on a full disk (depending on the heap's layout)."""
    guard = cache_writer._GuardedFile(str(tmp_path / "f.tmp"))
    guard.write(b"abc")
    guard.seek(1)
    buf = bytearray(b"\xff" * 8)
    assert guard.readinto(memoryview(buf)) == 8 and bytes(buf) == b"bc" + bytes(6)
    guard.close()


@pytest.mark.parametrize("code, error", [(errno.ENOSPC, "no space left in {folder} while writing c.h5.tmp"),
                                         (errno.EIO, "Input/output error")])
def test_an_error_of_the_early_sync_is_raised_and_nothing_is_lost(tmp_path, monkeypatch, code, error):
    """A sync failing in the background thread that writes the new file to the disk while it is built (a full disk
    or a failing one) fails the consolidation: no .tmp, every part kept; the next close consolidates them."""
    path = str(tmp_path / "c.h5")
    w = CacheWriter(path, **writer_args(40))
    w.write(list(range(40)), *batch(list(range(40))))

    def failing(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cache_writer, "_datasync", failing)
    with pytest.raises((FeatxError, OSError), match=re.escape(error.format(folder=tmp_path))):
        w.close()
    assert not os.path.exists(path) and _leftovers(tmp_path) == [] and len(os.listdir(path + ".parts")) == 3
    monkeypatch.undo()
    w = CacheWriter(path, **writer_args(40))
    assert len(w.todo) == 0
    w.close()
    assert_values(path, must_be_done=range(40))


# ---------------------------------------------------------------- damaged parts, settings, foreign files (item 10)
KILLED_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[2])
from test_store import batch, writer_args
from featx.cache import CacheWriter
w = CacheWriter(sys.argv[1], **writer_args(40))
for lo in range(0, 40, 8):
    w.write(list(range(lo, lo + 8)), *batch(list(range(lo, lo + 8))))
os._exit(0)  # killed: parts, no final file
"""


def _killed_run(path):
    subprocess.run([sys.executable, "-c", KILLED_CHILD, str(path), HERE], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": ROOT})
    return sorted(os.listdir(str(path) + ".parts"))


def _damage_parts(path):
    folder = str(path) + ".parts"
    p2, p3 = os.path.join(folder, "part-00000002.h5"), os.path.join(folder, "part-00000003.h5")
    with open(p2, "r+b") as f:  # truncated
        f.truncate(os.path.getsize(p2) // 2)
    with open(p3, "r+b") as f:  # bytes overwritten in the middle of its values
        f.seek(os.path.getsize(p3) // 2)
        f.write(b"\xff" * 256)
    open(os.path.join(folder, "notes.txt"), "w").write("mine")
    return p2, p3


def test_damaged_parts_are_named_set_aside_and_recomputed(tmp_path, capfd):
    path = tmp_path / "c.h5"
    _killed_run(path)
    p2, p3 = _damage_parts(path)
    text = describe(str(path))  # read-only: names them, sets nothing aside
    assert "40: 24 done, 0 failed, 16 pending" in text, text
    assert f"damaged    {p2}" in text and f"damaged    {p3}" in text and "notes.txt: not a file" in text
    assert main(["info", str(path)]) == 0
    with pytest.warns(UserWarning) as said:   # the CLI: one line "featx COMMAND: ..." each
        w = CacheWriter(str(path), **writer_args(40))
    said = [str(x.message) for x in said]
    assert any(x.startswith(f"{p2}: damaged part") and "set aside as part-00000002.h5.bad" in x for x in said), said
    assert list(w.todo) == list(range(8, 24))
    w.write(w.todo, *batch(w.todo))
    w.close()
    assert_values(str(path), must_be_done=range(40))
    assert sorted(os.listdir(str(path) + ".parts")) == ["notes.txt.bad", "part-00000002.h5.bad",
                                                        "part-00000003.h5.bad"]
    assert "set aside  3 file(s)" in describe(str(path))


def test_a_damaged_settings_file_sets_its_parts_aside(tmp_path, capfd):
    path = tmp_path / "c.h5"
    _killed_run(path)
    settings = str(path) + ".parts/settings.json"
    open(settings, "w").write('{"attrs": ')
    with pytest.raises(FeatxError, match="settings.json is unreadable"):
        describe(str(path))
    assert main(["info", str(path)]) == 1
    assert len(capfd.readouterr().err.strip().splitlines()) == 1
    with pytest.warns(UserWarning, match="settings.json: damaged"):
        w = CacheWriter(str(path), **writer_args(40))
    assert len(w.todo) == 40
    w.write(w.todo, *batch(w.todo))
    w.close()
    assert_values(str(path), must_be_done=range(40))


# ---------------------------------------------------------------- checksums (item 12)
def test_bytes_overwritten_in_a_cache_are_found_and_named(tmp_path):
    path = str(tmp_path / "c.h5")
    write_all(path, 600, size=50)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(np.random.default_rng(0).bytes(8192))
    damaged = r"c.h5: dataset (pooled/mean|pooled/cls|seq/data) is damaged: a checksum or structure check failed"
    with pytest.raises(FeatxError, match=damaged):
        describe(path)
    with pytest.raises(FeatxError, match=damaged):
        with open_cache(path) as c:
            c.pooled("mean"), c.pooled("cls"), [c.sequence(i) for i in range(600)]


# ---------------------------------------------------------------- crafted files (item 13)
def _crafted(tmp_path, change):
    path = str(tmp_path / "c.h5")
    write_all(path, 10)
    other = str(tmp_path / "other.h5")
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros((10, L, D), np.float32)
    with h5py.File(path, "a") as f:
        change(f, other)
    return path


def _fewer_rows(f, other):
    del f["pooled/mean"]
    f["pooled/mean"] = np.zeros((4, L, D), np.float32)


def _external_link(f, other):
    del f["pooled/mean"]
    f["pooled/mean"] = h5py.ExternalLink(other, "/x")


def _external_storage(f, other):
    del f["pooled/mean"]
    raw = str(other) + ".raw"
    np.zeros((10, L, D), np.float32).tofile(raw)
    f.create_dataset("pooled/mean", (10, L, D), np.float32, external=[(raw, 0, h5py.h5f.UNLIMITED)])


def _attr_type(f, other):
    f.attrs["num_layers"] = "three"


def _attr_array(f, other):
    f.attrs["max_length"] = np.arange(3)


def _vlen_pooled(f, other):
    del f["pooled/mean"]
    f.create_dataset("pooled/mean", (10, L, D), h5py.vlen_dtype(np.float32))


def _huge_ids(f, other):
    del f["ids"]
    f.create_dataset("ids", (10 ** 12,), h5py.string_dtype(), chunks=(1024,))


def _newer(f, other):
    f.attrs["format_version"] = "2.0"


def _bad_offsets(f, other):
    offsets = f["seq/offsets"][:]
    offsets[2] = offsets[1] - 1
    del f["seq/offsets"]
    f["seq/offsets"] = offsets


@pytest.mark.parametrize("change, message", [
    (_fewer_rows, r"pooled/mean has shape \(4, 3, 16\), the format needs \(10, 3, 16\)"),
    (_external_link, "/pooled/mean is a soft or external link; a featx cache holds no links"),
    (_external_storage, "pooled/mean stores its data outside the file"),
    (_attr_type, "attribute num_layers is a str, the format needs int"),
    (_attr_array, "attribute max_length is a ndarray"),
    (_vlen_pooled, "pooled/mean has dtype object, the format needs float32"),
    (_huge_ids, r"ids declares \(1000000000000,\), more than the file could hold"),
    (_newer, r"written by a newer featx \(cache format 2.0; this featx reads 1.x\)"),
    (_bad_offsets, "seq/offsets do not index seq/data"),
])
def test_a_crafted_cache_is_refused_with_one_line(tmp_path, change, message, capsys):
    path = _crafted(tmp_path, change)
    with pytest.raises(FeatxError, match=message):
        open_cache(path)
    assert main(["info", path]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and _no_traceback(err)


def test_a_file_without_format_version_reads_as_1_0(tmp_path):
    path = str(tmp_path / "c.h5")
    write_all(path, 5, meta={"speaker": list("abcde")})
    with h5py.File(path, "a") as f:  # the layout before the version attribute: meta/<column>
        del f.attrs["format_version"]
        f.move("meta/0", "meta/speaker")
        del f["meta"].attrs["columns"]
    with open_cache(path) as c:
        assert c.format_version == "1.0" and list(c.meta["speaker"]) == list("abcde")
    assert_values(path, must_be_done=range(5))


# ---------------------------------------------------------------- what is left, before a model loads (item 9)
def test_pending_items_reads_without_writing(tmp_path):
    path = str(tmp_path / "c.h5")
    a = writer_args(20)
    settings = dict(attrs=a["attrs"], poolings=a["poolings"], dtype=a["dtype"], seq=a["seq"])
    assert list(pending_items(path, a["ids"], **settings)) == list(range(20))
    assert os.listdir(tmp_path) == []
    write_all(path, 20, order=np.arange(0, 20, 2))
    w = CacheWriter(path, **writer_args(20))
    w.write([1], *batch([1]))
    w.fail([3], "broken")  # failed items are tried again
    del w  # killed: its part stays
    before = sorted(os.listdir(tmp_path)), os.path.getmtime(path)
    assert list(pending_items(path, a["ids"], **settings)) == [3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert (sorted(os.listdir(tmp_path)), os.path.getmtime(path)) == before
    with pytest.raises(FeatxError, match="poolings 'mean,cls' \\(now 'mean'\\)"):
        pending_items(path, a["ids"], **{**settings, "poolings": ["mean"]})
    with pytest.raises(FeatxError, match="hidden_size 16 \\(now 8\\)"):
        pending_items(path, a["ids"], **settings, num_layers=L, hidden_size=8)


def test_check_settings_refuses_as_the_writer_would_without_reading_a_part_or_writing(tmp_path):
    path, folder = str(tmp_path / "c.h5"), str(tmp_path / "c.h5.parts")
    a = writer_args(6)
    known = {"model": "toy/enc", "modality": "audio", "poolings": "mean,cls"}   # no sample_rate: the model's
    settings = dict(attrs=known, poolings=["cls", "mean"], dtype=a["dtype"], seq=a["seq"], attrs_given_only=True)
    other = {**settings, "attrs": {**known, "model": "other"}}
    check_settings(path, a["ids"], **other)   # nothing stored yet: nothing to check
    assert os.listdir(tmp_path) == []
    w = CacheWriter(path, **a)
    w.write([0], *batch([0]))
    del w  # killed: a parts folder, no final file
    with pytest.raises(FeatxError) as by_writer:
        CacheWriter(path, **writer_args(6, attrs={**a["attrs"], "model": "other"}))
    before = sorted(os.listdir(folder))
    with pytest.raises(FeatxError) as checked:
        check_settings(path, a["ids"], **other)
    assert str(checked.value) == str(by_writer.value)
    assert str(checked.value).startswith(f"{folder} was made with different settings: model 'toy/enc' (now 'other')")
    check_settings(path, a["ids"], **other, parts_folder=False)   # the folder left out, and no final file
    check_settings(path, a["ids"], **settings)
    with pytest.raises(FeatxError, match="sample_rate 16000 \\(now None\\)"):
        check_settings(path, a["ids"], **{**settings, "attrs_given_only": False})
    assert sorted(os.listdir(folder)) == before and not os.path.exists(path)
    CacheWriter(path, **a).close()   # consolidated: the final file's header is what is compared
    with pytest.raises(FeatxError, match=f"^{path} was made with different settings: dtype 'float32' "
                                         "\\(now 'float16'\\); run with the settings"):
        check_settings(path, a["ids"], **{**settings, "dtype": "float16"}, parts_folder=False)
    with pytest.raises(FeatxError, match="number of items 6 \\(now 5\\)"):
        check_settings(path, a["ids"][:5], **settings)
    check_settings(path, a["ids"], **settings)
    damaged = tmp_path / "d.h5"
    damaged.write_bytes(b"not hdf5")
    check_settings(str(damaged), a["ids"], **other)   # left to the writer, which names what is wrong


def test_is_complete_compares_the_attributes_known_before_a_model_loads(tmp_path):
    path = str(tmp_path / "c.h5")
    a = writer_args(6)
    known = {"model": "toy/enc", "modality": "audio", "poolings": "mean,cls"}   # no sample_rate: the model's
    settings = dict(attrs=known, poolings=["cls", "mean"], dtype=a["dtype"], seq=a["seq"], attrs_given_only=True)
    assert not is_complete(path, a["ids"], **settings)
    w = CacheWriter(path, **a)
    w.write(range(6), *batch(range(6)))
    assert not is_complete(path, a["ids"], **settings)   # written, but its parts are not consolidated yet
    w.close()
    before = sorted(os.listdir(tmp_path)), os.path.getmtime(path)
    assert is_complete(path, a["ids"], **settings)
    assert not is_complete(path, a["ids"], **{**settings, "attrs_given_only": False})   # sample_rate unknown
    assert not is_complete(path, a["ids"], **{**settings, "attrs": {**known, "model": "other"}})
    assert not is_complete(path, a["ids"][:5], **settings)
    assert (sorted(os.listdir(tmp_path)), os.path.getmtime(path)) == before
