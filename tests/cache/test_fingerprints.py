"""Each item's source fingerprint in a cache: an item computed from another source is computed again, also across a
killed run; labels and splits follow the writer's; files without fingerprints read and resume as before."""
import os
import signal
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest

from featx.cache import CacheWriter, is_complete, merge_caches, open_cache, pending_items, update_columns

from test_store import batch, item, writer_args

N = 6
OLD = np.arange(1, N + 1, dtype=np.uint64) * np.uint64(1000003)
NEW = OLD.copy()
NEW[2] += np.uint64(1)  # item 2's source changed


def _complete(path, prints):
    w = CacheWriter(path, **writer_args(N), fingerprints=prints)
    w.write(np.arange(N), *batch(range(N)))
    w.close()


def _settings():
    a = writer_args(N)
    return dict(attrs=a["attrs"], poolings=a["poolings"], dtype=a["dtype"], seq=a["seq"])


def test_an_item_from_another_source_is_computed_again_and_its_new_value_is_kept(tmp_path):
    path = str(tmp_path / "c.h5")
    _complete(path, OLD)
    ids = writer_args(N)["ids"]
    assert is_complete(path, ids, **_settings(), fingerprints=OLD)
    assert not is_complete(path, ids, **_settings(), fingerprints=NEW)
    assert list(pending_items(path, ids, **_settings(), fingerprints=NEW)) == [2]
    assert list(pending_items(path, ids, **_settings())) == []  # no fingerprints given: not compared
    with pytest.warns(UserWarning, match="of 1 item.s. changed since the cache was made, e.g. id item2"):
        w = CacheWriter(path, **writer_args(N), fingerprints=NEW)   # the CLI: one line "featx COMMAND: ..."
    assert list(w.todo) == [2]
    pooled, seq = batch([2])
    w.write([2], {p: 7 * a for p, a in pooled.items()}, [7 * s for s in seq])
    w.close()
    with open_cache(path) as c:
        np.testing.assert_array_equal(c.fingerprints, NEW)
        np.testing.assert_array_equal(c.pooled("mean")[2], 7 * item(2))
        np.testing.assert_array_equal(c.pooled("mean")[3], item(3))
    assert list(CacheWriter(path, **writer_args(N), fingerprints=OLD).todo) == [2]  # the manifest reverted


def test_a_changed_item_whose_recomputation_fails_is_failed_not_done_with_its_old_value(tmp_path):
    path = str(tmp_path / "c.h5")
    _complete(path, OLD)
    w = CacheWriter(path, **writer_args(N), fingerprints=NEW)
    w.fail([2], "file not found")
    assert w.close()["failed"] == 1
    with open_cache(path) as c:
        assert not c.done[2] and c.error[2] == "file not found" and c.fingerprints[2] == 0
        assert not c.pooled("mean", only_done=False)[2].any()


KILLED = """
import sys, time
sys.path.insert(0, sys.argv[2])
import numpy as np
from test_store import batch, writer_args
from test_fingerprints import N, NEW
from featx.cache import CacheWriter

w = CacheWriter(sys.argv[1], **writer_args(N), fingerprints=NEW)
pooled, seq = batch([2])
w.write([2], {p: 7 * a for p, a in pooled.items()}, [7 * s for s in seq])
print("wrote", flush=True)
time.sleep(600)
"""


def test_a_run_killed_after_recomputing_a_changed_item_keeps_it_and_the_old_value_never_counts(tmp_path):
    """kill -9 after the changed item's new part is written, before consolidation: the final file still holds the
    old value, which no reader of pending items counts as done; the next run consolidates the new value."""
    path = str(tmp_path / "c.h5")
    _complete(path, OLD)
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.Popen([sys.executable, "-c", KILLED, path, here], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])})
    try:
        assert p.stdout.readline().strip() == "wrote"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    ids = writer_args(N)["ids"]
    with pytest.warns(UserWarning, match="unmerged parts"), open_cache(path) as c:  # the old file, untouched
        np.testing.assert_array_equal(c.fingerprints, OLD)
    assert list(pending_items(path, ids, **_settings(), fingerprints=NEW)) == []  # the part holds the new value
    assert not is_complete(path, ids, **_settings(), fingerprints=NEW)  # parts wait to be merged
    w = CacheWriter(path, **writer_args(N), fingerprints=NEW)
    assert len(w.todo) == 0
    w.close()
    with open_cache(path) as c:
        np.testing.assert_array_equal(c.fingerprints, NEW)
        np.testing.assert_array_equal(c.pooled("mean")[2], 7 * item(2))
    assert not os.path.exists(path + ".parts")


def test_labels_and_splits_of_a_complete_cache_are_updated_through_consolidation(tmp_path):
    path = str(tmp_path / "c.h5")
    _complete(path, OLD)
    args = writer_args(N)
    labels = list(args["labels"])
    labels[1], labels[4] = 9.0, float("nan")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert not update_columns(path, args["ids"], labels=args["labels"], splits=args["splits"], meta=args["meta"])
        assert said == []
        assert update_columns(path, args["ids"], labels=labels, splits=args["splits"], meta=args["meta"])
    assert len(said) == 1 and f"the manifest's labels of 2 of {N} items differ from those the cache held" in str(
        said[0].message)
    with open_cache(path) as c:
        np.testing.assert_array_equal(c.labels, np.array(labels))
        assert list(c.splits) == list(args["splits"]) and list(c.meta["speaker"]) == list(args["meta"]["speaker"])
        np.testing.assert_array_equal(c.fingerprints, OLD)
        np.testing.assert_array_equal(c.pooled("mean"), np.stack([item(i) for i in range(N)]))
    assert not os.path.exists(path + ".parts")


def test_a_file_without_fingerprints_resumes_without_comparing_and_merges(tmp_path, recwarn):
    """A cache of an earlier featx (no fingerprint dataset): it resumes under fingerprints without a word about
    its items, and merges with one that has them."""
    path = str(tmp_path / "c.h5")
    _complete(path, None)
    with h5py.File(path, "r") as f:
        assert "fingerprint" not in f
    w = CacheWriter(path, **writer_args(N), fingerprints=NEW)
    assert len(w.todo) == 0
    w.close()
    assert not [w for w in recwarn if "changed since" in str(w.message)]
    other = str(tmp_path / "d.h5")
    _complete(other, NEW)
    merge_caches([path, other], str(tmp_path / "m.h5"), fingerprints=NEW)
    with open_cache(str(tmp_path / "m.h5")) as c:
        np.testing.assert_array_equal(c.fingerprints, NEW)
