"""File-level history of the head view (the server's ΔFtail, WCFS.md §3.2, §3.5).

What it answers, for the *tracked* part of every head file:

* ``update(tid, oids)`` -- which tracked blocks a commit changed, whether the
  file's size may have changed, and whether the ZBigFile itself changed
  ("epoch");
* ``blk_rev_at(file, blk, at)`` -- the last revision <= ``at`` that changed
  the block (exact when the window allows, else an upper bound; any value in
  ``[exact, at]`` names the same data);
* ``changed_since(file, at)`` -- explicitly tracked blocks changed in
  ``(at, head]``, in O(changed) rather than O(file), for watch setup.

Tracking model.  A block is tracked when it is read through ``head/``: we
remember its key, the ZBlk oid it maps to and every BTree node on the path to
it (with the key range each node covered).  The tracked set never shrinks.
Invariant: if a block can be in the kernel page cache of a head file, it is
tracked (the read path calls ``track`` before returning data).  A commit can
change block ``k`` only by re-storing its ZBlk (the writer re-stores a ZBlk1
whenever a chunk changes, so ZData never needs watching) or by changing the
BTree mapping ``k -> ZBlk``, which always modifies a node on ``k``'s old path.
So intersecting a commit's oids with the tracked oids finds every candidate;
for changed tree nodes we re-walk, at the new revision, the tracked keys
inside the changed node's key range (a bucket holds <= 60 keys; interior nodes
change only on splits and merges), compare the ZBlk each key maps to, and
extend tracking to nodes newly on those paths.

Revisions.  Each tracked block carries ``lastrev`` -- the last revision <=
head that changed it, exact or an upper bound -- and per file a list of
``(rev, blk)`` events sorted by rev, from which ``changed_since`` scans
backwards.  ``blk_rev_at`` walks the block's history with raw loads: the
candidate is the max serial over its path nodes and its ZBlk; if the mapping
and the ZBlk revision are the same just before the candidate, the candidate
was a change of a neighbour and the walk continues further back.

Concurrency: one mutex ``_mu`` protects all tables.  ``update`` is called by
the commit processor with the head lock held exclusively; ``track`` and the
queries are called by readers and watch setups under the head lock held
shared, so they may run concurrently with each other but never with update.
Raw loads happen outside ``_mu``.
"""
from __future__ import annotations

import logging
import threading
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, field
from typing import Iterable

from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

from .zobj import BlkLookup, PathNode, Ref, ZReader

log = logging.getLogger("wcfs")

MAX_WALK = 256        # bound of blk_rev_at's backward walk; beyond it an upper bound is returned


@dataclass
class FileDelta:
    """What one commit did to one tracked file."""
    blocks: set[int] = field(default_factory=set)
    size_changed: bool = False
    epoch: bool = False


@dataclass
class TrackedFile:
    oid: bytes
    blksize: int
    root: bytes                                     # blktab LOBTree oid
    zblk_of: dict[int, bytes | None] = field(default_factory=dict)   # blk -> ZBlk oid | None (hole)
    blocks_of: dict[bytes, set[int]] = field(default_factory=dict)   # ZBlk oid -> blks mapping to it
    keys: list[int] = field(default_factory=list)  # sorted tracked blocks
    nodes: dict[bytes, tuple[int, int]] = field(default_factory=dict)   # node oid -> key range
    lastrev: dict[int, tuple[int, bool]] = field(default_factory=dict)  # blk -> (rev, exact)
    events: list[tuple[int, int]] = field(default_factory=list)         # sorted (rev, blk)


class History:
    """Tracked set and change history of head files.  See the module docstring."""

    def __init__(self, reader: ZReader, head: int) -> None:
        self._reader = reader
        self._mu = threading.Lock()      # protects everything below
        self._head = head
        self._tail = head
        self._files: dict[bytes, TrackedFile] = {}
        self._node_files: dict[bytes, set[bytes]] = {}   # BTree node oid -> file oids
        self._zblk_files: dict[bytes, set[bytes]] = {}   # ZBlk oid -> file oids

    # --- state ----------------------------------------------------------------
    @property
    def head(self) -> int:
        return self._head

    @property
    def tail(self) -> int:
        return self._tail

    def forget_past(self, cut: int) -> None:
        """Drop history <= cut; the tail never moves backwards."""
        with self._mu:
            if cut <= self._tail:
                return
            self._tail = min(cut, self._head)
            for f in self._files.values():
                i = bisect_right(f.events, (self._tail, 2**63))
                del f.events[:i]

    # --- tracking -------------------------------------------------------------
    def add_file(self, oid: bytes, blksize: int, root: bytes) -> None:
        with self._mu:
            if oid not in self._files:
                self._files[oid] = TrackedFile(oid, blksize, root)

    def _track_path_locked(self, f: TrackedFile, path: Iterable[PathNode]) -> None:
        for n in path:
            f.nodes[n.oid] = (n.lo, n.hi)
            self._node_files.setdefault(n.oid, set()).add(f.oid)

    def track_path(self, file_oid: bytes, path: Iterable[PathNode]) -> None:
        """Track BTree nodes (e.g. the path to the max key, for size changes)."""
        with self._mu:
            self._track_path_locked(self._files[file_oid], path)

    def track(self, file_oid: bytes, blk: int, lk: BlkLookup, zblk_serial: int | None) -> None:
        """Track block ``blk`` read at head with lookup result ``lk``.

        ``zblk_serial`` is the serial of its ZBlk at head (None for a hole).
        The block's last change is bounded by the path and ZBlk serials.
        """
        bound = max(lk.rev_max, zblk_serial or 0)
        with self._mu:
            f = self._files[file_oid]
            self._track_path_locked(f, lk.path)
            zoid = lk.zblk.oid if lk.zblk is not None else None
            if blk not in f.zblk_of:
                insort(f.keys, blk)
            self._set_zblk_locked(f, blk, zoid)
            if blk not in f.lastrev and bound > self._tail:
                f.lastrev[blk] = (bound, False)
                insort(f.events, (bound, blk))

    # --- commits --------------------------------------------------------------
    def update(self, tid: int, oids: Iterable[bytes]) -> dict[bytes, FileDelta]:
        """Apply commit ``tid``: return per tracked file what changed.

        The reader must already see ``tid`` (its node cache invalidated).
        Loads at ``tid`` happen here: the caller holds the head lock exclusively.
        """
        oids = set(oids)
        deltas: dict[bytes, FileDelta] = {}
        with self._mu:
            files = self._files
            changed_nodes: dict[bytes, list[bytes]] = {}
            for oid in oids:
                if oid in files:
                    deltas.setdefault(oid, FileDelta()).epoch = True
                for foid in self._zblk_files.get(oid, ()):
                    deltas.setdefault(foid, FileDelta()).blocks.update(files[foid].blocks_of.get(oid, ()))
                for foid in self._node_files.get(oid, ()):
                    changed_nodes.setdefault(foid, []).append(oid)
            work = {foid: [files[foid].nodes[n] for n in nodes] for foid, nodes in changed_nodes.items()}

        # Epochs are checked by the caller against the ZBigFile's new state;
        # here an epoch only needs the flag.  Re-walk tracked keys under changed nodes.
        for foid, ranges in work.items():
            d = deltas.setdefault(foid, FileDelta())
            d.size_changed = True
            with self._mu:
                f = files[foid]
                keys = set()
                for lo, hi in ranges:
                    keys.update(f.keys[bisect_left(f.keys, lo):bisect_left(f.keys, hi)])
                root = f.root
            walked = {k: self._reader.lookup(root, k, tid) for k in sorted(keys)}
            with self._mu:
                for k, lk in walked.items():
                    self._track_path_locked(f, lk.path)
                    newz = lk.zblk.oid if lk.zblk is not None else None
                    if newz != f.zblk_of.get(k):
                        d.blocks.add(k)
                        self._set_zblk_locked(f, k, newz)

        with self._mu:
            for foid, d in deltas.items():
                f = files[foid]
                for k in d.blocks:
                    f.lastrev[k] = (tid, True)
                    f.events.append((tid, k))
            self._head = tid
        return deltas

    def _set_zblk_locked(self, f: TrackedFile, blk: int, zoid: bytes | None) -> None:
        old = f.zblk_of.get(blk)
        if old is not None and old != zoid:
            f.blocks_of[old].discard(blk)
        f.zblk_of[blk] = zoid
        if zoid is not None:
            f.blocks_of.setdefault(zoid, set()).add(blk)
            self._zblk_files.setdefault(zoid, set()).add(f.oid)

    # --- queries ----------------------------------------------------------------
    def lastrev(self, file_oid: bytes, blk: int) -> tuple[int, bool] | None:
        """(rev, exact) of the last change of a tracked block, None if <= tail."""
        with self._mu:
            return self._files[file_oid].lastrev.get(blk)

    def changed_since(self, file_oid: bytes, at: int) -> list[int]:
        """Explicitly tracked blocks changed in ``(at, head]`` (exactly)."""
        with self._mu:
            f = self._files.get(file_oid)
            if f is None:
                return []
            cand = {}
            for rev, blk in reversed(f.events):
                if rev <= at:
                    break
                cur = f.lastrev.get(blk)
                if cur is not None and cur[0] == rev:
                    cand[blk] = cur
            head = self._head
        out = []
        for blk, (rev, exact) in cand.items():
            if not exact:
                rev = self._refine(file_oid, blk, head, rev)
            if rev > at:
                out.append(blk)
        return sorted(out)

    def _refine(self, file_oid: bytes, blk: int, head: int, bound: int) -> int:
        """Make a tracked block's lastrev exact and re-file its event."""
        rev, exact = self.blk_rev_at(file_oid, blk, head)
        with self._mu:
            f = self._files[file_oid]
            if f.lastrev.get(blk) == (bound, False) and exact:
                f.lastrev[blk] = (rev, True)
                if rev > self._tail:
                    insort(f.events, (rev, blk))
                else:
                    del f.lastrev[blk]
        return rev

    def blk_rev_at(self, file_oid: bytes, blk: int, at: int) -> tuple[int, bool]:
        """Last revision <= at that changed ``file[blk]`` -> (rev, exact).

        ``tail <= at <= head`` is required.  A revision at or below the tail is
        reported as the tail (an upper bound, since the window ends there).
        """
        with self._mu:
            f = self._files[file_oid]
            root, tail = f.root, self._tail
        r = self._reader
        cur_at = at
        lk = r.lookup(root, blk, cur_at)
        zser = self._zblk_serial(lk.zblk, cur_at)
        for _ in range(MAX_WALK):
            cand = max(lk.rev_max, zser)
            if cand <= tail:
                return tail, False
            prev_at = cand - 1
            try:
                plk = r.lookup(root, blk, prev_at)
            except POSKeyError:
                return cand, True           # the tree did not exist before: created at cand
            pz = plk.zblk.oid if plk.zblk is not None else None
            z = lk.zblk.oid if lk.zblk is not None else None
            if pz != z:
                return cand, True
            pzser = self._zblk_serial(plk.zblk, prev_at)
            if pzser != zser:
                return cand, True
            lk, zser, cur_at = plk, pzser, prev_at
        return max(lk.rev_max, zser), False

    def _zblk_serial(self, zblk: Ref | None, at: int) -> int:
        if zblk is None:
            return 0
        _, serial, _ = self._reader.load_before(zblk.oid, p64(at + 1))
        return u64(serial)
