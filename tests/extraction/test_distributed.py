"""torchrun with the gloo backend on the CPU: 2 ranks write shards that merge to a single-process run's values."""
import os
import subprocess
import sys

import numpy as np
import pytest

from featx import extract
from featx.cache import open_cache


def _torchrun(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", FEATX_DIST_BACKEND="gloo", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "featx", "extract", *map(str, args), "--no-progress", "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("family", ["tiny_bert", "tiny_wavlm"])
def test_two_ranks_equal_one_process(family, media, tmp_path, request):
    model = request.getfixturevalue(family)
    single = extract(media, [model], tmp_path / "single", dtype="float32", device="cpu", progress=False)
    r = _torchrun(media, "--model", model, "--out", tmp_path / "dist", "--dtype", "float32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted(os.listdir(tmp_path / "dist"))
    assert files == [os.path.basename(single.paths[0])], files  # shards merged and removed
    with open_cache(single.paths[0]) as a, open_cache(tmp_path / "dist" / files[0]) as b:
        assert list(a.ids) == list(b.ids) and b.done.all()
        np.testing.assert_allclose(a.pooled("mean"), b.pooled("mean"), atol=1e-5)


def test_a_shard_with_pending_items_merges_as_pending_never_as_zeros(tmp_path):
    from featx.cache import CacheWriter, merge_caches
    ids = [f"i{k}" for k in range(8)]
    rng = np.random.default_rng(0)
    vals = rng.standard_normal((8, 3, 4)).astype(np.float32)
    shards = []
    for r, items in enumerate([[0, 2, 4, 6], [1, 3]]):  # rank 1 stopped before items 5 and 7
        p = str(tmp_path / f"c.rank{r:03d}-of-002.h5")
        w = CacheWriter(p, ids=ids, attrs={"model": "m", "modality": "text"}, poolings=["mean"], num_layers=3,
                        hidden_size=4, dtype="float32")
        w.write(np.array(items), {"mean": vals[items]})
        w.close()
        shards.append(p)
    merge_caches(shards, str(tmp_path / "c.h5"))
    with open_cache(tmp_path / "c.h5") as c:
        assert c.done.tolist() == [True] * 5 + [False, True, False]
        np.testing.assert_array_equal(c.layer(1), vals[[0, 1, 2, 3, 4, 6], 1])
