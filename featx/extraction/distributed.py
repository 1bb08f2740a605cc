"""Extraction under torchrun: each rank caches a shard of the items, rank 0 merges the shards into one cache.

Started by `torchrun --nproc-per-node N -m featx extract ...` (WORLD_SIZE > 1), rank r takes items
r, r+W, r+2W, ... and writes its own shard `<cache>.rank<r>-of-<W>.h5` (consolidated atomically by its
writer); rank 0 then merges the shards and any earlier final file into the one cache and removes the
shards. A killed job resumes per shard.

The process group uses NCCL when torch sees CUDA and gloo otherwise. The environment variable
FEATX_DIST_BACKEND=gloo forces gloo on CUDA machines too (only the barriers go through it; no tensors do),
e.g. where NCCL cannot start.
"""
from __future__ import annotations

import os

import torch

from featx.errors import FeatxError

__all__ = ["Distributed", "backend"]


def backend() -> str:
    """The process group's backend: nccl when torch sees CUDA, unless FEATX_DIST_BACKEND=gloo; else gloo."""
    return "nccl" if torch.cuda.is_available() and os.environ.get("FEATX_DIST_BACKEND") != "gloo" else "gloo"


def shard_name(path, rank, world) -> str:
    """`<cache>.rank<r>-of-<W>.h5`: rank r's shard of cache `path` (a .h5 file)."""
    return f"{path[:-3]}.rank{rank:03d}-of-{world:03d}.h5"


def has_shards(path) -> bool:
    """Whether shards of cache `path` from a torchrun job are still waiting to be merged into it."""
    import glob

    return bool(glob.glob(glob.escape(path[:-3]) + ".rank*-of-*.h5"))


class Distributed:
    """This rank's place in a torchrun job (rank, world), and the shard logic of one cache."""

    def __init__(self):
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group(backend())
        self.td, self.rank, self.world = td, td.get_rank(), td.get_world_size()

    @classmethod
    def current(cls):
        """The job's Distributed under torchrun with WORLD_SIZE > 1, else None."""
        return cls() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None

    def shard_path(self, path):
        return shard_name(path, self.rank, self.world)

    def shard_paths(self, path):
        return [shard_name(path, r, self.world) for r in range(self.world)]

    def prepare_final(self, path, overwrite):
        """With overwrite, rank 0 removes the final cache; every rank waits for it."""
        if overwrite and self.rank == 0 and os.path.exists(path):
            os.remove(path)
        self.td.barrier()

    def my_todo(self, todo, path, fingerprints=None):
        """This rank's share of `todo`, less what an earlier run's final file already holds (computed from the
        items' sources now: `fingerprints`, see featx.cache.schema; None: not compared)."""
        todo = todo[todo % self.world == self.rank]
        if os.path.exists(path):
            from featx.cache import open_cache

            with open_cache(path) as c:
                done = c.done
                if fingerprints is not None:
                    done = done & ((c.fingerprints == 0) | (c.fingerprints == fingerprints))
                todo = todo[~done[todo]]
        return todo

    def merge(self, path, fingerprints=None):
        """Rank 0 merges the shards (and an earlier final file) into `path`, a value computed from another source
        than today's (`fingerprints`) left out; returns its done/failed/pending."""
        from featx.cache import merge_caches, open_cache

        self.td.barrier()
        if self.rank == 0:
            shards = self.shard_paths(path)
            missing = [p for p in shards if not os.path.exists(p)]
            if missing:
                raise FeatxError(f"shard(s) missing, not merged: {', '.join(map(os.path.basename, missing))}; "
                                 "run the same command again to finish them")
            sources = ([path] if os.path.exists(path) else []) + shards
            merge_caches(sources, path, fingerprints)
            for p in shards:
                os.remove(p)
        self.td.barrier()
        with open_cache(path) as c:
            failed = int(sum(1 for e in c.error if e))
            return {"done": int(c.done.sum()), "failed": failed, "pending": len(c.ids) - int(c.done.sum()) - failed}
