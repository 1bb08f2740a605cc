"""featx.cache (schema, writer, reader, merge, describe) on real HDF5 files and real killed processes: round trip, resume, kill -9, settings, reads."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from featx.errors import FeatxError
from featx.cache import Cache, CacheWriter, describe, merge_caches, open_cache, read_layer

L, D = 3, 16  # layers and hidden size of the test caches


# Used by the tests and by the child processes they kill: values are a deterministic function of the index.
def item(i):
    """(L, D) float32 values of item i."""
    return (3 * np.sin(0.1 * np.arange(L * D, dtype=np.float64).reshape(L, D) + i)).astype(np.float32)


def batch(indices):
    """pooled {mean, cls: (B, L, D)} and seq (list of (i % 4, L, D)) of the given items."""
    pooled = {"mean": np.stack([item(i) for i in indices]), "cls": np.stack([-item(i) for i in indices])}
    return pooled, [item(i)[None] * np.arange(1, i % 4 + 1, dtype=np.float32)[:, None, None] for i in indices]


def writer_args(n, **kw):
    args = dict(ids=[f"item{i}" for i in range(n)], attrs={"model": "toy/enc", "modality": "audio",
                "sample_rate": 16000, "max_length": None}, poolings=["mean", "cls"], num_layers=L,
                hidden_size=D, dtype="float32", seq=True, labels=[0.5 * i for i in range(n)],
                splits=["test" if i % 3 == 0 else "train" for i in range(n)],
                meta={"speaker": [f"s{i % 5}" for i in range(n)]})
    return {**args, **kw}


# A writer in a process of its own: writes the todo items in batches, printing each batch once stored, then closes.
CHILD = """
import sys, time
sys.path.insert(0, sys.argv[4])
from test_store import batch, writer_args
from featx.cache import CacheWriter
import torch  # loaded, as in featx extract (the writer casts with it), before the kill clock starts

path, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
w = CacheWriter(path, **writer_args(n))
print("ready", flush=True)
for lo in range(0, len(w.todo), size):
    b = w.todo[lo:lo + size]
    w.write(b, *batch(b))
    print("wrote", *b.tolist(), flush=True)
print("closing", flush=True)
t = time.perf_counter()
w.close()
print("closed", time.perf_counter() - t, flush=True)
"""


def write_all(path, n, order=None, size=7, **kw):
    """One uninterrupted writer over items `order` (default all) in batches of `size`; returns close()."""
    with CacheWriter(path, **writer_args(n, **kw)) as w:
        order = w.todo if order is None else order
        for lo in range(0, len(order), size):
            w.write(order[lo:lo + size], *batch(order[lo:lo + size]))
    return w.close()


def contents(path):
    """Every dataset and attr of a file, as numpy, for comparing two files."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        out["attrs"] = dict(f.attrs)
    return out


def assert_same_file(a, b):
    ca, cb = contents(a), contents(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        if k == "attrs":
            assert ca[k] == cb[k]
        else:
            np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)


def assert_values(path, must_be_done=()):
    """Every done item holds its exact values; items in must_be_done are done."""
    with open_cache(path) as c:
        assert c.done[list(must_be_done)].all()
        done = np.flatnonzero(c.done)
        want = np.array([item(i) for i in done]).reshape(-1, L, D)
        np.testing.assert_array_equal(c.pooled("mean"), want)
        np.testing.assert_array_equal(c.pooled("cls"), -want)
        for i in done[:: max(1, len(done) // 50)]:
            np.testing.assert_array_equal(c.sequence(i), batch([i])[1][0])


def run_child(path, n, size):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(n), str(size), os.path.dirname(os.path.abspath(__file__))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def written(stdout):
    return [int(x) for line in stdout.splitlines() if line.startswith("wrote") for x in line.split()[1:]]


# ---------------------------------------------------------------- round trip and layout
def test_round_trip_out_of_order_batches(tmp_path):
    path = str(tmp_path / "c.h5")
    n = 40
    order = np.random.default_rng(0).permutation(n)[:35]  # 5 stay pending
    with CacheWriter(path, **writer_args(n)) as w:
        for lo in range(0, 30, 6):
            w.write(order[lo:lo + 6], *batch(order[lo:lo + 6]))
        w.fail(order[30:35], ["cannot decode\n  bad header"] + ["too long"] * 4)
    assert w.close() == {"done": 30, "failed": 5, "pending": 5, "path": path}
    assert not os.path.exists(path + ".parts") and not os.path.exists(path + ".tmp")
    with open_cache(path) as c:
        assert (c.model, c.modality, c.num_layers, c.hidden_size, c.dtype) == ("toy/enc", "audio", L, D, "float32")
        assert c.poolings == ["mean", "cls"] and c.attrs["sample_rate"] == 16000 and "max_length" not in c.attrs
        assert c.attrs["featx_version"] and c.attrs["poolings"] == "mean,cls"
        assert list(c.ids) == [f"item{i}" for i in range(n)]
        assert set(np.flatnonzero(c.done)) == set(order[:30].tolist())
        assert c.error[order[30]] == "cannot decode bad header" and c.error[order[31]] == "too long"
        assert (c.error[c.done] == "").all() and (c.error[order[35:]] == "").all()
        np.testing.assert_array_equal(c.labels, 0.5 * np.arange(n))
        assert c.splits[3] == "test" and c.splits[4] == "train" and c.meta["speaker"][7] == "s2"
        np.testing.assert_array_equal(c.pooled("mean", only_done=False)[~c.done], 0)  # rows not done are zeros
        assert c.sequence(order[31]).shape == (0, L, D)
    assert_values(path, must_be_done=order[:30])


def test_float16_stores_the_cast_and_string_labels(tmp_path):
    path = str(tmp_path / "c.h5")
    write_all(path, 12, dtype="float16", labels=["pos", "neg", None] * 4)
    with open_cache(path) as c:
        assert c.dtype == "float16" and c._f["pooled/mean"].dtype == np.float16
        want = np.stack([item(i) for i in range(12)]).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(c.pooled("mean"), want)
        assert not np.array_equal(c.pooled("mean"), np.stack([item(i) for i in range(12)]))  # really float16
        assert list(c.labels[:3]) == ["pos", "neg", ""]


@pytest.mark.parametrize("read_rows", [4096, 128])  # one block, or blocks that straddle the missing items
def test_layer_reads_and_chunk_shape(tmp_path, monkeypatch, read_rows):
    monkeypatch.setattr("featx.cache.reader.READ_ROWS", read_rows)
    path = str(tmp_path / "c.h5")
    n, big_d = 600, 1024
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 2, big_d)).astype(np.float32)
    with CacheWriter(path, ids=[str(i) for i in range(n)], attrs={"model": "m", "modality": "text"},
                     poolings=["mean"], num_layers=2, hidden_size=big_d) as w:
        done = np.setdiff1d(np.arange(n), [5, 400])
        w.write(done, {"mean": x[done]})
    with open_cache(path) as c:
        ds = c._f["pooled/mean"]
        rows, nbytes = ds.chunks[0], ds.chunks[0] * big_d * 2
        assert ds.chunks == (rows, 1, big_d) and 256 * 1024 <= nbytes <= 1024 * 1024
        want = x[done].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(c.layer(1), want[:, 1])
        np.testing.assert_array_equal(c.layer(-2), want[:, 0])
        assert c.layer(0, only_done=False).shape == (n, big_d)
        np.testing.assert_array_equal(c.layer(0, only_done=False)[[5, 400]], 0)
        stored = c.layer(1, dtype=None)
        assert stored.dtype == np.float16 and stored.shape == (n - 2, big_d)
        np.testing.assert_array_equal(stored, x[done, 1].astype(np.float16))
        assert c.layer(1, dtype=np.float64).dtype == np.float64
        np.testing.assert_array_equal(c.pooled(layers=[-1, 0]), want[:, ::-1])
        with pytest.raises(FeatxError, match="layer 2 is out of range"):
            c.layer(2)
        with pytest.raises(FeatxError, match="no pooling 'cls'"):
            c.layer(0, "cls")
        with pytest.raises(FeatxError, match="no sequences"):
            c.sequence(0)
    got = read_layer(path, -1)
    np.testing.assert_array_equal(got.features, want[:, 1])
    assert list(got.ids) == [str(i) for i in done] and got.labels is None and got.splits is None


def test_small_cache_chunks_fit_the_data(tmp_path):
    path = str(tmp_path / "c.h5")
    write_all(path, 9)
    with h5py.File(path, "r") as f:
        assert f["pooled/mean"].chunks == (9, 1, D)
        assert f["seq/data"].chunks[1:] == (1, D) and f["seq/data"].chunks[0] <= f["seq/data"].shape[0]


# ---------------------------------------------------------------- resume
def test_resume_equals_one_shot(tmp_path):
    one, two = str(tmp_path / "one.h5"), str(tmp_path / "two.h5")
    write_all(one, 50)
    write_all(two, 50, order=np.arange(0, 50, 2))
    w = CacheWriter(two, **writer_args(50))
    np.testing.assert_array_equal(w.todo, np.arange(1, 50, 2))
    for lo in range(0, len(w.todo), 4):
        w.write(w.todo[lo:lo + 4], *batch(w.todo[lo:lo + 4]))
    assert w.close()["done"] == 50
    assert_same_file(one, two)


def test_failures_are_retried_and_never_override_done(tmp_path):
    path = str(tmp_path / "c.h5")
    with CacheWriter(path, **writer_args(6)) as w:
        w.write([0, 1], *batch([0, 1]))
        w.fail([2, 3], "decode error")
    w = CacheWriter(path, **writer_args(6))
    np.testing.assert_array_equal(w.todo, [2, 3, 4, 5])
    w.write([2], *batch([2]))
    w.fail([0], "spurious")  # a later failure must not lose item 0
    assert w.close() == {"done": 3, "failed": 1, "pending": 2, "path": path}
    with open_cache(path) as c:
        assert list(c.error) == ["", "", "", "decode error", "", ""]
    assert_values(path, must_be_done=[0, 1, 2])


def test_exception_in_with_block_keeps_what_was_written(tmp_path):
    path = str(tmp_path / "c.h5")
    with pytest.raises(RuntimeError):
        with CacheWriter(path, **writer_args(10)) as w:
            w.write([3, 4], *batch([3, 4]))
            raise RuntimeError("model crashed")
    assert_values(path, must_be_done=[3, 4])
    assert not os.path.exists(path + ".parts")


def test_second_writer_on_the_same_cache_is_refused(tmp_path):
    path = str(tmp_path / "c.h5")
    w = CacheWriter(path, **writer_args(5))
    with pytest.raises(FeatxError, match="another process is writing"):
        CacheWriter(path, **writer_args(5))
    w.write([1], *batch([1]))
    w.close()
    assert_values(path, must_be_done=[1])


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize("change, named", [
    ({"attrs": {"model": "other", "modality": "audio", "sample_rate": 16000}}, "model 'toy/enc'"),
    ({"attrs": {"model": "toy/enc", "modality": "audio", "sample_rate": 8000}}, "sample_rate 16000"),
    ({"attrs": {"model": "toy/enc", "modality": "audio", "sample_rate": 16000, "max_length": 64}}, "max_length"),
    ({"poolings": ["mean"]}, "poolings 'mean,cls'"),
    ({"dtype": "float16"}, "dtype 'float32'"),
    ({"seq": False}, "seq True"),
    ({"ids": [f"x{i}" for i in range(8)]}, "id list differs"),
])
def test_settings_mismatch_is_refused_and_overwrite_starts_again(tmp_path, change, named):
    path = str(tmp_path / "c.h5")
    write_all(path, 8)
    before = contents(path)
    args = writer_args(8, **change)
    with pytest.raises(FeatxError, match="use --overwrite to start again") as e:
        CacheWriter(path, **args)
    assert named in str(e.value) and "\n" not in str(e.value)
    assert contents(path).keys() == before.keys() and not os.path.exists(path + ".parts")  # untouched
    w = CacheWriter(path, **args, overwrite=True)
    np.testing.assert_array_equal(w.todo, np.arange(8))
    assert w.close() == {"done": 0, "failed": 0, "pending": 8, "path": path}
    with open_cache(path) as c:
        assert not c.done.any()


# ---------------------------------------------------------------- non-finite values
def test_non_finite_after_cast_is_recorded_as_failed(tmp_path):
    path = str(tmp_path / "c.h5")
    pooled, seq = batch([0, 1, 2, 3])
    pooled["mean"][1, 2, 5] = 1e6  # fits float32, overflows float16
    pooled["cls"][2, 0, 0] = np.nan
    seq[3][0, 1, 0] = np.inf
    with CacheWriter(path, **writer_args(4, dtype="float16")) as w:
        failed = w.write([0, 1, 2, 3], pooled, seq)
    np.testing.assert_array_equal(failed, [1, 2, 3])
    with open_cache(path) as c:
        assert list(c.done) == [True, False, False, False]
        assert c.error[1] == "non-finite value after cast to float16 (layer 2, pooling mean)"
        assert c.error[2] == "non-finite value after cast to float16 (layer 0, pooling cls)"
        assert c.error[3] == "non-finite value after cast to float16 (layer 1, sequence)"
        np.testing.assert_array_equal(c.pooled("mean")[0], item(0).astype(np.float16).astype(np.float32))
        assert np.isfinite(c.pooled("mean", only_done=False)).all()


def test_bad_batches_are_refused(tmp_path):
    w = CacheWriter(str(tmp_path / "c.h5"), **writer_args(4))
    pooled, seq = batch([0, 1])
    with pytest.raises(ValueError, match="shape"):
        w.write([0, 1], {"mean": pooled["mean"][:, :2], "cls": pooled["cls"]}, seq)
    with pytest.raises(ValueError, match="poolings"):
        w.write([0, 1], {"mean": pooled["mean"]}, seq)
    with pytest.raises(ValueError, match="distinct"):
        w.write([1, 1], pooled, seq)
    with pytest.raises(ValueError, match="0..3"):
        w.fail([4], "x")
    assert w.close()["done"] == 0


# ---------------------------------------------------------------- kill -9
def test_kill9_while_writing_loses_nothing(tmp_path):
    path, ref = tmp_path / "c.h5", str(tmp_path / "ref.h5")
    n, confirmed = 2000, set()  # more than a child can write before its kill
    for run, delay in enumerate([0.1, 0.4, random.Random(7).uniform(0.05, 0.5)]):
        p = run_child(path, n, 3)
        assert p.stdout.readline() == "ready\n", p.stderr.read()
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=60)
        assert "closing" not in out, "the child finished before its kill"
        confirmed |= set(written(out))
        counted = int(describe(path).split(f"items      {n}: ")[1].split(" done")[0])  # a killed run's leftovers
        assert counted >= len(confirmed)
        if run == 0:  # a killed first run: parts only, recognised by their settings
            assert not path.exists() and "unmerged" in describe(path)
            with pytest.raises(FeatxError, match="a killed run left parts"):
                open_cache(path)
            with pytest.raises(FeatxError, match=r"c.h5.parts was made with different settings: model 'toy/enc'"):
                CacheWriter(path, **writer_args(n, attrs={"model": "b", "modality": "audio", "sample_rate": 16000}))
        w = CacheWriter(path, **writer_args(n))  # resume: everything confirmed is done, with its values
        assert confirmed.isdisjoint(w.todo.tolist())
        w.close()
        assert_values(str(path), must_be_done=sorted(confirmed))
    assert confirmed, "no child wrote anything before its kill"
    write_all(str(path), n, size=50)  # finish
    write_all(ref, n, size=50)
    assert_same_file(str(path), ref)


def wait_for(condition, timeout=60):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_kill9_during_consolidation_loses_nothing(tmp_path):
    n, ref = 300, str(tmp_path / "ref.h5")
    w = CacheWriter(ref, **writer_args(n))
    for lo in range(0, n, 2):
        w.write(w.todo[lo:lo + 2], *batch(w.todo[lo:lo + 2]))
    for moment in ("building", "cleaning"):  # the parts a killed writer leaves: 150, so close() takes a while
        shutil.copytree(ref + ".parts", tmp_path / f"{moment}.h5.parts")
    w.close()
    for moment in ("building", "cleaning"):
        path = str(tmp_path / f"{moment}.h5")
        p = run_child(path, n, 2)  # nothing left to write: it goes straight to close()
        wait_for(lambda: os.path.exists(path + ".tmp"))  # the new final file is being built
        if moment == "cleaning":  # renamed into place, the parts are being deleted (if we are quick enough)
            wait_for(lambda: not os.path.exists(path + ".tmp"))
        else:
            time.sleep(0.1)
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate(timeout=60)
        if moment == "building":
            assert "closed" not in out and os.path.exists(path + ".tmp") and not os.path.exists(path)
        w = CacheWriter(path, **writer_args(n))
        assert len(w.todo) == 0  # every item was written before close() began
        w.close()
        assert_same_file(path, ref)


# ---------------------------------------------------------------- reading errors, describe, merge
def test_cache_refuses_missing_and_foreign_files_and_warns_on_parts(tmp_path):
    with pytest.raises(FeatxError, match="no cache at"):
        Cache(tmp_path / "none.h5")
    with pytest.raises(FeatxError, match="no cache at"):
        describe(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(FeatxError, match="not a readable HDF5 file"):
        Cache(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2]
    with pytest.raises(FeatxError, match="not a featx cache"):
        Cache(tmp_path / "other.h5")
    with pytest.raises(FeatxError, match="not a featx cache"):
        CacheWriter(tmp_path / "other.h5", **writer_args(3))
    path = str(tmp_path / "c.h5")
    write_all(path, 5, order=[0, 1])
    w = CacheWriter(path, **writer_args(5))
    w.write([2], *batch([2]))
    with pytest.warns(UserWarning, match="unmerged parts"):
        Cache(path).close()
    assert "5: 3 done" in describe(path) and "unmerged   1 parts" in describe(path)
    w.close()


def test_describe_a_final_file(tmp_path):
    path = str(tmp_path / "c.h5")
    with CacheWriter(path, **writer_args(10)) as w:
        w.write([0, 1, 2], *batch([0, 1, 2]))
        w.fail(list(range(3, 10)), [f"broken file {i}" for i in range(3, 10)])
    text = describe(path)
    for want in ("model      toy/enc (audio)", "items      10: 3 done, 7 failed, 0 pending",
                 "layers     3 (hidden size 16)", "poolings   mean, cls", "dtype      float32",
                 "sequences  yes", "size       ", "sample_rate=16000", "first 5 of 7:", "item3: broken file 3"):
        assert want in text, want
    assert "item8" not in text and "unmerged" not in text


def test_merge_caches_of_shards(tmp_path):
    full, a, b, out = (str(tmp_path / f"{x}.h5") for x in ("full", "a", "b", "out"))
    write_all(full, 30)
    write_all(a, 30, order=np.arange(0, 30, 2))
    write_all(b, 30, order=np.arange(1, 30, 2))
    assert merge_caches([a, b], out)["done"] == 30
    assert_same_file(out, full)
    write_all(str(tmp_path / "f16.h5"), 30, dtype="float16")
    with pytest.raises(FeatxError, match="dtype 'float32'"):
        merge_caches([a, str(tmp_path / "f16.h5")], str(tmp_path / "bad.h5"))
    with pytest.raises(FeatxError, match="already exists"):
        merge_caches([a, b], full)
