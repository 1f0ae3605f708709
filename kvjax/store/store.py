"""``BlockStore``: the persistent page store (L3) on local disk or any tensorstore kvstore,
keyed by block hash.

Layout under the store's root (a local directory by default, any tensorstore
kvstore by configuration), ``StoreConfig.layout``:

* ``"segments"`` (default): ``segments/``, one file per ``put`` batch holding
  its pages' packed rows back to back (``kvjax.store.segments``): one write
  and one fsync a group of ``commit_every`` puts (8 by default on a local
  path, each put on a kvstore), one contiguous
  read for pages written together. A
  local directory is read and written with plain positioned I/O, any other
  kvstore through tensorstore. Segments whose pages were mostly evicted are
  compacted, so the disk holds at most ``capacity * (1 + compact_slack)`` pages.
* ``"chunks"``: ``pages/``, a zarr3 array uint8 ``[C, page_bytes]`` with one
  chunk per slot (one page), compressed (zstd, blosc or none) and followed by
  tensorstore's ``crc32c`` codec. One file per page: slower (measured in
  ``benchmarks/store.py``), but compressed;

and in both ``index/``: ``format.json`` (the ``PageFormat``, capacity, layout,
codecs) and the ``PersistentIndex`` records (``kvjax.store.index``).

Each listed page also carries a crc32c of its block hash and decoded bytes,
checked on every read: it catches what the codec cannot (a slot holding
another page's data). A page whose read fails, whose file is gone or whose
checksum is wrong is a miss, counted, and unlisted; it is never returned.

Every future (tensorstore's, and the store's own reader threads') goes
through ``self.ledger`` (``FutureLedger``) and is awaited before the call that
issued it returns (``get_async``: before its ``result`` returns): ``stats()["futures_outstanding"]`` is 0 between calls.

Writes that fail (a full disk, a file-size limit) raise ``StoreWriteError``
once and turn writing off (``writes_enabled``); later ``put`` calls are
refused and counted, and reads go on. ``enable_writes()`` turns them on. (A
group commit that fails on its timer thread has no caller to raise to: it is
logged and counted, and writing turns off the same way.)

One live ``BlockStore`` per local directory: opening takes the directory's lock
(``flock`` on its ``lock`` file, released by ``close``, by the object's
collection, or by the kernel when the process dies), and a second open while it
is held, in this process or another, raises ``StoreBusyError``: two writers
would overwrite each other's records. (A store on another kvstore has no lock:
one writer at a time is the caller's to keep.)

Names in shapes: n = pages in a batch, S = page_size.

>>> import numpy as np
>>> from kvjax.layout import QuantSpec
>>> fmt = PageFormat.for_specs(QuantSpec(bits=8), QuantSpec(bits=8), num_layers=1,
...                            page_size=2, num_kv_heads=1, head_dim=4)
>>> store = BlockStore(StoreConfig(kvstore={"driver": "memory"}, capacity=8), fmt)
>>> pages = {f.name: np.ones((1, *f.shape), f.dtype) for f in fmt.fields}
>>> store.put(np.array([[1, 2]], np.uint32), pages).tolist()
[True]
>>> store.get(np.array([[1, 2], [3, 4]], np.uint32)).found.tolist()
[True, False]
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
import weakref
from typing import Callable, Mapping, NamedTuple, Optional, Union

import google_crc32c
import numpy as np
import tensorstore as ts

from kvjax.store.format import PageFormat
from kvjax.store.index import FutureLedger
from kvjax.store.index import lfu_score
from kvjax.store.index import lru_score
from kvjax.store.index import PersistentIndex
from kvjax.store.segments import KvSegments
from kvjax.store.segments import PosixSegments

log = logging.getLogger(__name__)

# stores holding a group not yet committed (commit_every > 1): a process that exits without
# close() (a normal exit: not SIGKILL, a default SIGTERM or os._exit) commits them first
_PENDING: "weakref.WeakSet[BlockStore]" = weakref.WeakSet()


os.register_at_fork(after_in_child=_PENDING.clear)   # a forked child's exit: not its stores


@atexit.register
def _commit_at_exit() -> None:
  for store in list(_PENDING):
    try:
      store.flush()
    except Exception as err:  # noqa: BLE001: at exit there is no caller; the group is a miss
      log.error("L3 store group commit at exit failed at %s (%s)", store.config.root(), err)

COMPRESSIONS = ("zstd", "blosc", "none")
LAYOUTS = ("segments", "chunks")
READ_THREADS = 4          # reader threads of a segments store (a batch's pieces in parallel)
READ_PIECE = 4            # pages one reader task reads and checks (a long run split in pieces):
                          # small, so one piece's crc (which holds the GIL) runs while the next
                          # pieces are read; 2,048 cold pages in gets of 64: 16 -> 0.78, 4 -> 0.87
                          # of a raw sequential read (benchmarks/store.py)
SEGMENTS_AT_LEAST = 16    # a segment holds at most capacity / 16 pages
COMPACT_ROUNDS = 8        # segments compacted at most per put (bounds a put's latency)
EVICTIONS = {"lru": lru_score, "lfu": lfu_score}
FORMAT_KEY = "format.json"


@dataclasses.dataclass(frozen=True)
class StoreConfig:
  """Where and how the store keeps its pages.

  Args:
    path: a local directory (the ``file`` kvstore); or
    kvstore: any tensorstore kvstore spec (JSON) of the store's root, e.g.
      ``{"driver": "memory"}``; exactly one of ``path`` / ``kvstore``.
    capacity: pages (slots) the store holds; fixed when it is created.
    layout: ``"segments"`` (one file per put batch; default) or ``"chunks"``
      (a zarr3 chunk per page); fixed when the store is created.
    compression: ``"zstd"``, ``"blosc"`` (lz4) or ``"none"`` (``chunks`` only;
      ``segments`` is ``"none"``); default: ``"none"`` for segments, ``"zstd"``
      for chunks. ``level``: its level.
    sync: fsync each file written (tensorstore's ``file_io_sync``): without
      it a write survives a killed process but not a power loss.
    snapshot_every: journal records between snapshots of the index.
    eviction: ``"lru"``, ``"lfu"`` or a function ``(last_use int64 [k],
      hits int64 [k]) -> scores [k]`` (lowest evicted first).
    compact_slack: segments: the disk may hold ``capacity * (1 +
      compact_slack)`` pages (evicted pages of segments not yet compacted)
      before a put compacts the emptiest segments. Lower: less disk, more
      rewriting (``stats()["compacted_pages"]``). With grouped commits the
      bound holds at each commit (a segment emptied inside a group is
      deleted at the group's commit).
    segment_bytes: segments on a local directory grow by appends up to this
      size or ``capacity / 16`` pages, whichever is less (a put larger than
      that gets a segment of its own); on a kvstore a segment is one put.
    commit_every: puts made durable together (group commit; segments on a
      local ``path`` only). 1: each put fsyncs its data and writes one index
      record before it returns. N > 1: a put's pages are listed and readable
      at once, and every N-th put (and ``flush``, ``evict``, ``close``, a
      compaction, or ``commit_seconds`` after the group's first put) fsyncs the data of the
      puts since the last commit, then writes one record for them all: a
      crash loses at most the last N - 1 puts of the last ``commit_seconds``
      (misses, never wrong pages: L3 is a cache), and fewer fsyncs make
      writing faster (2,048 pages in puts of 64, ``benchmarks/store.py``). A
      failed group fsync unlists the whole group. Default (None): 8 for
      segments on a local path, else 1.
    commit_seconds: with ``commit_every`` > 1, the longest a put waits for its
      commit (a timer thread commits a group that has not filled; a process
      exiting without ``close()`` commits pending groups at exit).
  """

  path: Optional[str] = None
  kvstore: Optional[Mapping] = None
  capacity: int = 65536
  layout: str = "segments"
  compression: Optional[str] = None
  level: int = 1
  sync: bool = True
  snapshot_every: int = 64
  eviction: Union[str, Callable] = "lru"
  compact_slack: float = 0.5
  segment_bytes: int = 256 << 20
  commit_every: Optional[int] = None
  commit_seconds: float = 1.0

  def __post_init__(self):
    if (self.path is None) == (self.kvstore is None):
      raise ValueError(f"StoreConfig needs exactly one of path / kvstore, got path="
                       f"{self.path!r}, kvstore={self.kvstore!r}")
    if not isinstance(self.capacity, int) or self.capacity < 1:
      raise ValueError(f"StoreConfig.capacity must be an int >= 1, got {self.capacity!r}")
    if self.layout not in LAYOUTS:
      raise ValueError(f"StoreConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
    if self.compression is None:
      object.__setattr__(self, "compression", "none" if self.layout == "segments" else "zstd")
    if self.compression not in COMPRESSIONS:
      raise ValueError(f"StoreConfig.compression must be one of {COMPRESSIONS}, "
                       f"got {self.compression!r}")
    if self.layout == "segments" and self.compression != "none":
      raise ValueError(f"StoreConfig.compression={self.compression!r} needs layout='chunks' "
                       "(segments are not compressed)")
    if not isinstance(self.segment_bytes, int) or self.segment_bytes < 1:
      raise ValueError(f"StoreConfig.segment_bytes must be an int >= 1, "
                       f"got {self.segment_bytes!r}")
    if not isinstance(self.compact_slack, (int, float)) or not self.compact_slack >= 0:
      raise ValueError(f"StoreConfig.compact_slack must be a number >= 0, "
                       f"got {self.compact_slack!r}")
    if self.commit_every is None:
      local = self.layout == "segments" and self.path is not None
      object.__setattr__(self, "commit_every", GROUP_COMMIT if local else 1)
    if not isinstance(self.commit_every, int) or self.commit_every < 1:
      raise ValueError(f"StoreConfig.commit_every must be an int >= 1, "
                       f"got {self.commit_every!r}")
    if self.commit_every > 1 and (self.layout != "segments" or self.path is None):
      raise ValueError(f"StoreConfig.commit_every={self.commit_every} needs layout='segments' "
                       f"on a local path, got layout={self.layout!r}, path={self.path!r}")
    if not isinstance(self.commit_seconds, (int, float)) or not self.commit_seconds > 0:
      raise ValueError(f"StoreConfig.commit_seconds must be a number > 0, "
                       f"got {self.commit_seconds!r}")
    if not isinstance(self.snapshot_every, int) or self.snapshot_every < 1:
      raise ValueError(f"StoreConfig.snapshot_every must be an int >= 1, "
                       f"got {self.snapshot_every!r}")
    if not callable(self.eviction) and self.eviction not in EVICTIONS:
      raise ValueError(f"StoreConfig.eviction must be one of {tuple(EVICTIONS)} or a function, "
                       f"got {self.eviction!r}")

  def root(self) -> dict:
    """The root kvstore spec, its path ending in ``/``."""
    spec = dict(self.kvstore) if self.kvstore is not None else {"driver": "file",
                                                               "path": self.path}
    path = spec.get("path", "")
    spec["path"] = path if not path or path.endswith("/") else path + "/"
    return spec

  def codecs(self) -> list:
    """The zarr3 codec chain of a page chunk (``chunks``; none for ``segments``)."""
    if self.layout == "segments":
      return []
    chain = [{"name": "bytes"}]
    if self.compression == "zstd":
      chain.append({"name": "zstd", "configuration": {"level": self.level}})
    elif self.compression == "blosc":
      chain.append({"name": "blosc", "configuration": {
          "cname": "lz4", "clevel": self.level, "shuffle": "shuffle", "typesize": 1,
          "blocksize": 0}})
    return chain + [{"name": "crc32c"}]


class PageInfo(NamedTuple):
  """What the store keeps of a page besides its arrays (the block hash is the key)."""

  tokens: np.ndarray     # int32 [n, S]  the page's tokens (-1 where unknown / a miss)
  parent: np.ndarray     # uint32 [n, 2]  parent block hash ((0, 0): a first block / a miss)
  namespace: np.ndarray  # uint32 [n, 2]  chain seed of the sequence that computed it

  @classmethod
  def empty(cls, n: int, page_size: int) -> "PageInfo":
    return cls(np.full((n, page_size), -1, np.int32), np.zeros((n, 2), np.uint32),
               np.zeros((n, 2), np.uint32))


class StoreRead(NamedTuple):
  """What ``get`` returns."""

  found: np.ndarray   # bool [n]  the page was listed and read back intact
  arrays: dict        # {field: [n, *shape]}  the page's arrays (zeros where not found)
  info: PageInfo      # the pages' records (empty where not found)


class StoreBusyError(OSError):
  """Another live ``BlockStore`` (in this process or another) has the directory open.

  Two writers of one directory would overwrite each other's records, and opening deletes
  the segment files no record lists (another writer's newest), so a second open is refused.
  The lock is the kernel's (``flock`` on ``LOCK_FILE``): a process killed with SIGKILL
  holds it no longer, and ``close`` (or the object's collection) releases it.
  """


class StoreWriteError(OSError):
  """Writing to the store failed (disk full, file-size limit, I/O error); writes are now off.

  ``listed``: bool ``[n]``, the pages of the failed ``put`` that are in the store anyway.
  """

  def __init__(self, message: str, listed: np.ndarray):
    super().__init__(message)
    self.listed = listed


# StoreConfig.commit_every's default on a local path: 2,048 pages in puts of 64 write at
# 0.79-0.82 of a plain file fsynced once in groups of 8 puts, 0.64-0.72 a put at a time
# (writes alone, best of 10: benchmarks/store.py commit_ab; docs/tiers.md)
GROUP_COMMIT = 8

COUNTERS = ("reads", "read_bytes", "writes", "write_bytes", "hits", "misses",
            "checksum_failures", "missing_files", "read_errors", "raced", "already_stored",
            "evictions", "write_errors", "writes_refused", "read_seconds", "write_seconds",
            "orphans_removed", "compactions", "compacted_pages")


LOCK_FILE = "lock"   # in a local store's directory: held (flock) while a BlockStore has it open


def _lock_dir(path: str) -> int:
  """Take the store directory's lock (creating the directory): the open file holding it.

  StoreBusyError when another open file holds it (another process, or another
  ``BlockStore`` of this one).
  """
  os.makedirs(path, exist_ok=True)
  fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise StoreBusyError(f"the L3 store at {path!r} is open in another BlockStore (this "
                         "process or another); one writes a directory at a time") from None
  return fd


def hash_keys(hashes: np.ndarray, name: str = "hashes") -> np.ndarray:
  """uint64 ``[n]`` keys (lane 0 high, lane 1 low) of block hashes uint32 ``[n, 2]``.

  >>> hash_keys(np.array([[1, 2]], np.uint32)).tolist()
  [4294967298]
  """
  h = np.asarray(hashes)
  if h.ndim != 2 or h.shape[1] != 2 or h.dtype != np.uint32:
    raise ValueError(f"{name} must be uint32 [n, 2] block hashes, got {h.dtype}{list(h.shape)}")
  keys = (h[:, 0].astype(np.uint64) << np.uint64(32)) | h[:, 1].astype(np.uint64)
  if np.any(keys == 0):
    raise ValueError(f"{name} holds the reserved no-hash (0, 0) at rows "
                     f"{np.flatnonzero(keys == 0).tolist()[:8]}")
  return keys


def page_crc(key: int, *parts: np.ndarray) -> int:
  """crc32c of a page's block hash (8 bytes, little-endian) and its packed bytes: one ``row``
  or its ``parts`` in order (``PageFormat.parts``; the same value)."""
  crc = google_crc32c.value(int(key).to_bytes(8, "little"))
  for part in parts:
    part = part.view()
    part.setflags(write=False)
    crc = google_crc32c.extend(crc, part)
  return int(crc)


def _classify(err: BaseException) -> str:
  msg = str(err)
  if "NOT_FOUND" in msg:
    return "missing_files"
  if "DATA_LOSS" in msg or "FAILED_PRECONDITION" in msg or "corrupt" in msg.lower():
    return "checksum_failures"
  return "read_errors"


class PendingRead:
  """A batch of page reads in flight (``BlockStore.get_async``); ``result()`` awaits them all."""

  def __init__(self, store: "BlockStore", keys, slots, crcs, listed, batch, started,
               segs=None, rows=None):
    self._store, self._keys, self._slots, self._crcs = store, keys, slots, crcs
    self._listed, self._batch, self._started, self._result = listed, batch, started, None
    self._segs, self._rows = segs, rows   # segments layout: [(seg, off)] per key, the buffer

  def result(self) -> StoreRead:
    if self._result is None:
      self._result = self._store._finish_read(self)
    return self._result


class BlockStore:
  """A persistent, checksummed page store keyed by block hash (thread-safe).

  Args:
    config: ``StoreConfig``.
    fmt: the ``PageFormat`` of a new store; for an existing one, None or
      the format it was created with (else ValueError).

  After opening, ``warm_pages`` is the number of pages the index listed.
  One ``BlockStore`` has a local directory open at a time (``StoreBusyError``
  for another, until ``close``); opening deletes what a killed writer left
  (temporary files, segments no record lists).
  """

  def __init__(self, config: StoreConfig, fmt: Optional[PageFormat] = None):
    self.config = config
    self._dir_lock = None   # a local directory's lock: a finalizer closing the file holding it
    if config.path is not None:
      self._dir_lock = weakref.finalize(self, os.close, _lock_dir(config.path))
    try:
      self._open(fmt)
    except BaseException:
      if self._dir_lock is not None:
        self._dir_lock()
      raise

  def _open(self, fmt: Optional[PageFormat]) -> None:
    config = self.config
    self.ledger = FutureLedger()
    self.context = ts.Context({"file_io_sync": config.sync})
    root = config.root()
    self.kvstore = self._wait(ts.KvStore.open({**root, "path": root["path"] + "index/"},
                                              context=self.context))
    self.format = self._open_format(fmt)
    cap, pb = config.capacity, self.format.page_bytes
    self.array = self.segments = None
    if config.layout == "chunks":
      spec = {"driver": "zarr3", "fill_missing_data_reads": False,
              # a page of zeros is data too: without this its chunk is never written
              "store_data_equal_to_fill_value": True,
              "kvstore": {**root, "path": root["path"] + "pages/"},
              "metadata": {"shape": [cap, pb], "data_type": "uint8",
                           "chunk_grid": {"name": "regular",
                                          "configuration": {"chunk_shape": [1, pb]}},
                           "codecs": config.codecs()}}
      self.array = self._wait(ts.open(spec, create=True, open=True, context=self.context))
    elif config.path is not None:
      self.segments = PosixSegments(os.path.join(config.path, "segments"), pb, config.sync,
                                    defer=config.commit_every > 1)
    else:
      self.segments = KvSegments(self._wait(ts.KvStore.open(
          {**root, "path": root["path"] + "segments/"}, context=self.context)), pb, self.ledger)
    score = EVICTIONS.get(config.eviction) if isinstance(config.eviction, str) else \
        config.eviction
    self.index = PersistentIndex(self.kvstore, cap, self.format.page_size, self.ledger, score)
    self.warm_pages = self.index.load()
    if config.commit_every > 1:
      self.index.reuse_at_once = True
      self.index.before_commit = self._sync_group
    self._puts_pending = 0      # puts since the last commit (commit_every)
    self._timer = None          # commits a group commit_seconds after its first put
    self.writes_enabled = True
    self._lock = threading.RLock()
    self._write_lock = threading.Lock()
    self._stats = dict.fromkeys(COUNTERS, 0)
    self.seg_pages: dict = {}   # {segment: pages written in it} of the segments on disk
    self._next_seg = 0
    self._open_seg = None       # the segment this process appends to (PosixSegments)
    # at most capacity / SEGMENTS_AT_LEAST pages a segment: eviction then empties whole
    # segments and compaction rewrites little (one segment for the whole store made every
    # compaction rewrite all its live pages: write amplification 1.8 on the conversation
    # trace at 2,048 pages, 1.000 with 16 or more; benchmarks/store.py)
    self._seg_rows = max(1, min(config.segment_bytes // self.format.page_bytes,
                                cap // SEGMENTS_AT_LEAST))
    self._readers = None
    self._checksummer = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="kvjax-l3-crc")   # a put's checksums, beside its write
    if self.segments is not None:
      self._open_segments()

  def _open_segments(self) -> None:
    """Delete what no record lists (a killed writer's files); find the next segment id."""
    present = self.segments.list()
    for seg, pages in present.items():
      if seg in self.index.seg_live:
        self.seg_pages[seg] = pages
      else:
        self.segments.delete(seg, pages)
        self._stats["orphans_removed"] += 1
    self._next_seg = 1 + max([*present, *self.index.seg_live, -1])
    self._readers = concurrent.futures.ThreadPoolExecutor(READ_THREADS,
                                                          thread_name_prefix="kvjax-l3-read")

  def _wait(self, future):
    return self.ledger.wait(self.ledger.track(future))

  def _open_format(self, fmt: Optional[PageFormat]) -> PageFormat:
    r = self._wait(self.kvstore.read(FORMAT_KEY))
    want = {"capacity": self.config.capacity, "layout": self.config.layout,
            "codecs": self.config.codecs()}
    if r.state == "value":
      d = json.loads(r.value)
      d.setdefault("layout", "chunks")   # stores made before the segments layout
      stored = PageFormat.from_json(d["format"])
      if fmt is not None and fmt != stored:
        raise ValueError(f"fmt {fmt} differs from the format the store at "
                         f"{self.config.root()} was created with: {stored}")
      for k, v in want.items():
        if d[k] != v:
          raise ValueError(f"StoreConfig {k}={v!r} differs from the store's {d[k]!r}")
      return stored
    if fmt is None:
      raise ValueError(f"no store at {self.config.root()}: fmt (a PageFormat) is needed to "
                       "create one")
    self._wait(self.kvstore.write(FORMAT_KEY, json.dumps({"format": fmt.to_json(), **want})))
    return fmt

  # ------------------------------------------------------------------ reading

  def get_async(self, hashes: np.ndarray) -> PendingRead:
    """Issue the reads of pages ``hashes`` (uint32 ``[n, 2]``); ``.result()`` is ``get``'s."""
    keys = hash_keys(hashes)
    with self._lock:
      self.index.clock += 1
      slots = self.index.lookup(keys)
      at = np.maximum(slots, 0)
      crcs = self.index.crc[at].copy()
      segs = np.stack([self.index.seg[at], self.index.off[at]], 1)
    listed = np.flatnonzero(slots >= 0)
    started = time.perf_counter()
    if self.segments is None:
      batch = self.ledger.track(self.array[slots[listed]].read()) if len(listed) else None
      return PendingRead(self, keys, slots, crcs, listed, batch, started)
    rows = np.empty((len(keys), self.format.page_bytes), np.uint8)   # misses zeroed at the end
    groups = {}
    for i in listed:
      groups.setdefault(int(segs[i, 0]), []).append(int(i))
    batch = []
    for seg, idx in groups.items():
      idx.sort(key=lambda i: segs[i, 1])
      pages = self.seg_pages.get(seg)
      offs = [int(segs[i, 1]) for i in idx]
      if pages is not None:   # scattered pages: all queued at once
        self.segments.advise(seg, offs, READ_PIECE)
      for p in range(0, len(idx), READ_PIECE):   # pieces read and checked in parallel
        piece = idx[p:p + READ_PIECE]
        if pages is None:   # listed, but its file was gone when the store opened
          batch.append((piece, None))
          continue
        batch.append((piece, self.ledger.track(self._readers.submit(
            self._read_piece, seg, pages, offs[p:p + READ_PIECE], rows, piece,
            keys, crcs))))
    return PendingRead(self, keys, slots, crcs, listed, batch, started, segs, rows)

  def _read_piece(self, seg, pages, offs, rows, idx, keys, crcs) -> dict:
    """A reader task: rows ``offs`` of a segment into ``rows[idx]``, each checked against
    its page crc; ``{row: why}`` of the rows that are misses."""
    failed = self.segments.read(seg, pages, offs, rows, idx)
    for i in idx:
      if i not in failed and page_crc(keys[i], rows[i]) != int(crcs[i]):
        failed[i] = "checksum_failures"
    return failed

  def get(self, hashes: np.ndarray) -> StoreRead:
    """Read pages by block hash; a page missing, unreadable or failing its checksum is a miss.

    Args:
      hashes: uint32 ``[n, 2]`` block hashes.

    Returns:
      ``StoreRead(found bool [n], arrays {field: [n, ...]}, info PageInfo)``.
    """
    return self.get_async(hashes).result()

  def _read_chunks(self, pending: PendingRead, rows, found, failed) -> None:
    listed, got = pending._listed, None
    if pending._batch is not None:
      try:
        got = self.ledger.wait(pending._batch)
      except Exception:  # noqa: BLE001: some page failed; read them one by one to tell which
        got = None
    if got is not None:
      rows[listed] = got
      found[listed] = True
    elif len(listed):
      futures = {int(i): self.ledger.track(self.array[int(pending._slots[i])].read())
                 for i in listed}
      for i, fut in futures.items():
        try:
          rows[i] = self.ledger.wait(fut)
          found[i] = True
        except Exception as err:  # noqa: BLE001: any failed read is a miss, classified
          failed[i] = _classify(err)

  def _read_segments(self, pending: PendingRead, found, failed) -> None:
    for idx, fut in pending._batch:   # every future awaited before any result is used
      if fut is None:
        failed.update(dict.fromkeys(idx, "missing_files"))
        continue
      try:
        failed.update(self.ledger.wait(fut))
      except Exception:  # noqa: BLE001: the reader itself failed: its pages are misses
        failed.update(dict.fromkeys(idx, "read_errors"))
    found[pending._listed] = True
    found[list(failed)] = False

  def _finish_read(self, pending: PendingRead) -> StoreRead:
    n = len(pending._keys)
    found = np.zeros(n, bool)
    failed = {}
    if self.segments is None:
      rows = np.zeros((n, self.format.page_bytes), np.uint8)
      self._read_chunks(pending, rows, found, failed)
      for i in np.flatnonzero(found):
        if page_crc(pending._keys[i], rows[i]) != int(pending._crcs[i]):
          failed[int(i)] = "checksum_failures"
          found[i] = False
    else:   # the reader tasks checked the crcs
      rows = pending._rows
      self._read_segments(pending, found, failed)
    rows[~found] = 0
    info = PageInfo.empty(n, self.format.page_size)
    with self._lock:
      ix = self.index
      for i, why in failed.items():
        slot, key = int(pending._slots[i]), int(pending._keys[i])
        moved = pending._segs is not None and (int(ix.seg[slot]), int(ix.off[slot])) != tuple(
            pending._segs[i])
        if ix.slot_of.get(key) != slot or int(ix.crc[slot]) != int(pending._crcs[i]) or moved:
          why = "raced"        # the slot was reused or the page moved after the lookup
        else:
          ix.remove(slot)
        self._stats[why] += 1
      for i in np.flatnonzero(found):
        slot = int(pending._slots[i])
        ix.touch(slot)
        info.tokens[i], info.parent[i] = ix.tokens[slot], ix.parent[slot]
        info.namespace[i] = ix.namespace[slot]
      st = self._stats
      st["reads"] += len(pending._listed)
      st["read_bytes"] += int(found.sum()) * self.format.page_bytes
      st["hits"] += int(found.sum())
      st["misses"] += n - int(found.sum())
      st["read_seconds"] += time.perf_counter() - pending._started
    return StoreRead(found, self.format.unpack(rows), info)

  def ranked(self, n: int) -> np.ndarray:
    """The block hashes (uint32 ``[k, 2]``, k = min(n, pages)) of the ``n`` listed pages the
    eviction policy keeps longest, best first: the reverse of the eviction order (highest
    score, ties to the highest slot, as eviction takes the lowest first); the policy's guess
    at what is read next, for a prefetcher to read ahead.

    >>> from kvjax.layout import QuantSpec
    >>> fmt = PageFormat.for_specs(QuantSpec(bits=8), QuantSpec(bits=8), num_layers=1,
    ...                            page_size=2, num_kv_heads=1, head_dim=4)
    >>> store = BlockStore(StoreConfig(kvstore={"driver": "memory"}, capacity=8), fmt)
    >>> pages = {f.name: np.ones((1, *f.shape), f.dtype) for f in fmt.fields}
    >>> for h in ([0, 1], [0, 2], [0, 3]):
    ...   _ = store.put(np.array([h], np.uint32), pages)
    >>> _ = store.get(np.array([[0, 1]], np.uint32))
    >>> store.ranked(2).tolist()     # (0, 1) was read last, (0, 3) written last
    [[0, 1], [0, 3]]
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f"n must be an int >= 0, got {n!r}")
    with self._lock:
      ix = self.index
      cand = np.flatnonzero(ix.used)
      score = np.asarray(ix.score(ix.last_use[cand], ix.hits[cand]), np.float64)
      best = cand[np.lexsort((-cand, -score))[:n]]
      keys = ix.key[best]
    return np.stack([(keys >> np.uint64(32)).astype(np.uint32),
                     (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)], 1)

  def contains(self, hashes: np.ndarray) -> np.ndarray:
    """bool ``[n]``: which pages are listed (no read, no checksum: ``get`` may still miss)."""
    keys = hash_keys(hashes)
    with self._lock:
      return self.index.lookup(keys) >= 0

  # ------------------------------------------------------------------ writing

  def put(self, hashes: np.ndarray, arrays: Mapping[str, np.ndarray],
          info: Optional[PageInfo] = None) -> np.ndarray:
    """Write pages and list them; pages already held are kept. With ``commit_every`` = 1
    they are listed once their data and record are durable; grouped, at once (readable
    now, durable at the group's commit).

    Args:
      hashes: uint32 ``[n, 2]`` block hashes (distinct pages; a repeat is written once).
      arrays: {field: ``[n, *shape]``} in ``self.format``.
      info: ``PageInfo`` of the pages (default: empty).

    Returns:
      bool ``[n]``: the page is in the store now (written, or already there).
      False for every page when writing is off.

    Raises:
      StoreWriteError: a write failed (the first time; writing is then off). A group
        commit that fails on the timer thread or at exit has no caller: it is logged and
        counted (``write_errors``), writing turns off, and later puts return all False.
    """
    keys = hash_keys(hashes)
    n = len(keys)
    if self.format.check(arrays) != n:
      raise ValueError(f"arrays hold {self.format.check(arrays)} pages, hashes {n}")
    s = self.format.page_size
    info = PageInfo.empty(n, s) if info is None else info
    if (np.shape(info.tokens) != (n, s) or np.shape(info.parent) != (n, 2)
        or np.shape(info.namespace) != (n, 2)):
      raise ValueError(f"info must hold tokens [n, {s}], parent [n, 2], namespace [n, 2] for "
                       f"n={n}, got {[np.shape(a) for a in info]}")
    with self._write_lock:
      with self._lock:
        if not self.writes_enabled:
          self._stats["writes_refused"] += n
          return np.zeros(n, bool)
        self.index.clock += 1
        slots = self.index.lookup(keys)
        for slot in slots[slots >= 0]:
          self.index.touch(int(slot), hit=False)
        self._stats["already_stored"] += int((slots >= 0).sum())
        _, first = np.unique(keys, return_index=True)
        todo = np.array(sorted(i for i in first if slots[i] < 0), np.int64)
        if len(todo) > self.config.capacity:
          raise ValueError(f"hashes: {len(todo)} new pages do not fit a store of capacity "
                           f"{self.config.capacity}")
        try:
          before = len(self.index)
          new = self.index.allocate(len(todo), protect=slots[slots >= 0])
          self._stats["evictions"] += max(0, before - len(self.index))
        except Exception as err:  # noqa: BLE001: the journal write of the evictions failed
          self._fail(err, n, listed=slots >= 0)
      t0 = time.perf_counter()
      whole = len(todo) == n    # every page is new: pack the arrays as they are (no copy)
      sub = arrays if whole else {k: np.asarray(a)[todo] for k, a in arrays.items()}
      if self.segments is not None and self.segments.appendable:
        # written straight from the arrays (one gathered write), no packed copy
        pages = self.format.parts(sub)
        rows = [p for page in pages for p in page]
      else:
        rows = self.format.pack(sub)
        pages = rows[:, None]   # a page's parts: its one packed row (page_crc(key, *parts))
      errors, ok, seg, first, crcs = [], [], -1, 0, []
      if len(new):
        # the checksums are computed on a helper thread while this one writes (the write
        # releases the GIL): 2,048 pages of 105 KB spent 0.066 s of 0.26 s in crc32c
        # before their write began
        checksums = self.ledger.track(self._checksummer.submit(
            lambda: [page_crc(keys[i], *pages[j]) for j, i in enumerate(todo)]))
        # one write for the batch (a segment, or the chunks tensorstore writes concurrently);
        # a batch whose write fails lists none of its pages (an unlisted slot is never read)
        try:
          seg, first = self._write_rows(new, rows)
          if 1 < self.config.commit_every <= self._puts_pending + 1:
            self._sync_group()   # the group's fsync outside the index lock (reads go on)
          ok = list(range(len(new)))
        except Exception as err:  # noqa: BLE001: reported as one StoreWriteError below
          errors.append(err)
        finally:
          crcs = self.ledger.wait(checksums)
      with self._lock:
        ix = self.index
        for j in ok:
          i = todo[j]
          ix.insert(new[j], int(keys[i]), crc=crcs[j], tokens=info.tokens[i],
                    parent=info.parent[i], namespace=info.namespace[i], seg=seg, off=first + j)
        ix.release([] if ok else list(new))
        self._stats["writes"] += len(ok)
        self._stats["write_bytes"] += len(ok) * self.format.page_bytes
        self._stats["write_seconds"] += time.perf_counter() - t0
        self._puts_pending += 1
        try:
          if self._puts_pending >= self.config.commit_every:
            self._commit()
          elif self._timer is None:
            self._timer = threading.Timer(self.config.commit_seconds, self._timed_commit)
            self._timer.daemon = True   # a normal exit commits the group (_commit_at_exit)
            self._timer.start()
            _PENDING.add(self)
        except Exception as err:  # noqa: BLE001
          errors.append(err)
        listed = ix.lookup(keys) >= 0
        if errors:
          self._fail(errors[0], 0, listed, extra=len(errors) - 1)
      self._drop_dead()
      try:
        self._compact()
      except Exception as err:  # noqa: BLE001: the pages of this put are listed anyway
        with self._lock:
          self._fail(err, 0, self.index.lookup(keys) >= 0)
      return listed

  def _commit(self) -> None:
    """Commit the pending changes (one record), then snapshot the index when
    ``snapshot_every`` records have piled up (under the lock)."""
    self.index.commit()
    self._committed()
    if self.index.journal_since_snapshot >= self.config.snapshot_every:
      self.index.snapshot()

  def _committed(self) -> None:
    """Everything put so far is durable: no group pending, no timer (under the lock)."""
    self._puts_pending = 0
    if self._timer is not None:
      self._timer.cancel()   # if it already fired it finds nothing pending
      self._timer = None
    _PENDING.discard(self)

  def _timed_commit(self) -> None:
    """The timer thread: commit a group ``commit_seconds`` after its first put (the fsync
    outside the index lock, as a put does). A failure turns writing off, as in a put."""
    with self._write_lock:
      with self._lock:
        if self._timer is not threading.current_thread():
          return   # disarmed (a commit came first), or a later group's timer
        self._timer = None
        if not self._puts_pending:
          return
      try:
        self._sync_group()
        with self._lock:
          self._commit()
        self._drop_dead()
      except Exception as err:  # noqa: BLE001: no caller to raise to; the next put is refused
        with self._lock:
          log.error("%s", self._writes_off(err))

  def _sync_group(self) -> None:
    """Group commit (``commit_every`` > 1): fsync the data written since the last commit;
    ``PersistentIndex.before_commit``, so no record lists a page before its bytes are
    durable. If the fsync fails, every page listed since the last commit is unlisted (its
    bytes may be lost: a failed fsync is not retried), writing turns off, and it raises."""
    try:
      self.segments.sync_deferred()
    except BaseException:
      with self._lock:
        self.writes_enabled = False
        self.index.remove_uncommitted()
      raise

  def _write_rows(self, slots, rows) -> tuple:
    """Write pages for ``slots``: packed ``rows`` (uint8 ``[n, page_bytes]``) or, to a local
    segment, their bytes as a list of buffers in order (``PageFormat.parts``, flattened).
    Returns ``(segment, first row)`` they went to (appended to this process's open segment
    while it has room, else a new one), or ``(-1, 0)`` (chunks).

    A segment from before this process (a restart) is never appended to: its
    end may hold the rows of an append that was cut off.
    """
    if self.segments is None:
      self.ledger.wait(self.ledger.track(
          self.array[np.asarray(slots, np.int64)].write(rows)).commit)
      return -1, 0
    n = len(rows) if isinstance(rows, np.ndarray) else sum(
        p.nbytes for p in rows) // self.format.page_bytes
    seg = self._open_seg
    if seg is None or self.seg_pages[seg] + n > self._seg_rows:
      seg, self._open_seg = self._next_seg, None
      self._next_seg += 1
    first = self.seg_pages.get(seg, 0)
    self.segments.write(seg, first, rows)
    self.seg_pages[seg] = first + n
    if self.segments.appendable:
      self._open_seg = seg
    return seg, first

  def _drop_dead(self) -> None:
    """Delete the segments whose last page's removal is durable (under the write lock)."""
    with self._lock:
      dead, self.index.dead_segments = self.index.dead_segments, []
      pages = [self.seg_pages.pop(g, None) for g in dead]
      if self._open_seg in dead:
        self._open_seg = None
    for g, p in zip(dead, pages):
      if p is not None:
        try:
          self.segments.delete(g, p)
        except Exception:  # noqa: BLE001: an undeleted segment is an orphan, removed on open
          pass

  def disk_pages(self) -> int:
    """Pages the segments on disk hold, listed or not (``capacity`` for the chunks layout)."""
    with self._lock:
      return sum(self.seg_pages.values()) if self.segments is not None else \
          self.config.capacity

  def _compact(self) -> None:
    """Rewrite the live pages of the emptiest segments while the disk holds more than
    ``capacity * (1 + compact_slack)`` pages (at most ``COMPACT_ROUNDS`` segments a put)."""
    if self.segments is None:
      return
    budget = self.config.capacity * (1 + self.config.compact_slack)
    for _ in range(COMPACT_ROUNDS):
      with self._lock:
        ix = self.index
        # a segment with no live page is deleted once its pages' removal is durable (at the
        # next commit: at once with commit_every=1, at the group's end when grouped), so it is
        # not compacted, and not counted
        live = [(ix.seg_live[g] / p, g) for g, p in self.seg_pages.items()
                if p and g in ix.seg_live]
        if sum(self.seg_pages[g] for _, g in live) <= budget:
          return
        ratio, victim = min(live)
        if ratio >= 1:
          return
        if victim == self._open_seg:   # its live rows move out: append no more to it
          self._open_seg = None
        slots = np.flatnonzero(ix.used & (ix.seg == victim))
        slots = slots[np.argsort(ix.off[slots], kind="stable")]
        offs, keys = ix.off[slots].tolist(), ix.key[slots].copy()
        crcs, pages = ix.crc[slots].copy(), self.seg_pages[victim]
      rows = np.zeros((len(slots), self.format.page_bytes), np.uint8)
      failed = self.segments.read(victim, pages, offs, rows, list(range(len(slots))))
      good = [j for j in range(len(slots)) if j not in failed and
              page_crc(keys[j], rows[j]) == int(crcs[j])]
      seg, first = self._write_rows(None, rows[good]) if good else (-1, 0)
      row_of = {j: first + r for r, j in enumerate(good)}
      with self._lock:
        for j in range(len(slots)):
          if j in row_of:
            ix.relocate(int(slots[j]), seg, row_of[j])
          else:   # unreadable now: a miss, as a read would have found it
            ix.remove(int(slots[j]))
            self._stats[failed.get(j, "checksum_failures")] += 1
        self._stats["compactions"] += 1
        self._stats["compacted_pages"] += len(good)
        self._commit()
      self._drop_dead()

  def _writes_off(self, err: BaseException, refused: int = 0, extra: int = 0) -> str:
    """Turn writing off after ``err`` (counted); returns the message that says so."""
    self.writes_enabled = False
    self._stats["write_errors"] += 1 + extra
    self._stats["writes_refused"] += refused
    return (f"L3 store write failed at {self.config.root()} ({err}); writing is off (reads go "
            "on) until enable_writes()")

  def _fail(self, err: BaseException, refused: int, listed: np.ndarray, extra: int = 0):
    raise StoreWriteError(self._writes_off(err, refused, extra), listed) from err

  def enable_writes(self) -> None:
    """Turn writing back on after a ``StoreWriteError`` (e.g. once space is freed)."""
    self.writes_enabled = True

  def evict(self, hashes: np.ndarray) -> np.ndarray:
    """Unlist pages (their slots are reused later); bool ``[n]``: the page was listed."""
    keys = hash_keys(hashes)
    with self._write_lock, self._lock:
      slots = self.index.lookup(keys)
      for slot in slots[slots >= 0]:
        self.index.remove(int(slot))
      self._stats["evictions"] += int((slots >= 0).sum())
      self._commit()
      if self.segments is not None:
        self._drop_dead()
      return slots >= 0

  def flush(self) -> None:
    """Make every change durable (hits and evictions included)."""
    with self._write_lock, self._lock:
      self._commit()
      if self.segments is not None:
        self._drop_dead()

  def close(self) -> None:
    """Flush and snapshot the index (a restart then replays nothing); release the
    directory (another ``BlockStore`` may open it now)."""
    with self._write_lock, self._lock:
      self.index.snapshot()
      self._committed()
      if self.segments is not None:
        self._drop_dead()
        self.segments.close()
      if self._dir_lock is not None:
        self._dir_lock()   # closes the lock's file (once; later calls do nothing)

  def abandon(self) -> None:
    """Let go of the directory as a killed process would: nothing more is committed (the
    puts of a group not yet committed are not listed at the next open) and the lock is
    released, so another ``BlockStore`` may open the directory at once. The object is not
    to be used afterwards. The tests model a crash with it; a caller can hand the
    directory on after a failure without a commit that could fail again.

    >>> import tempfile
    >>> from kvjax.layout import QuantSpec
    >>> fmt = PageFormat.for_specs(QuantSpec(bits=8), QuantSpec(bits=8), num_layers=1,
    ...                            page_size=2, num_kv_heads=1, head_dim=4)
    >>> d = tempfile.mkdtemp()
    >>> first = BlockStore(StoreConfig(path=d, capacity=8), fmt)
    >>> try:
    ...   BlockStore(StoreConfig(path=d, capacity=8))
    ... except StoreBusyError:
    ...   print("busy")
    busy
    >>> first.abandon()
    >>> BlockStore(StoreConfig(path=d, capacity=8)).warm_pages
    0
    """
    with self._write_lock, self._lock:
      if self._timer is not None:
        self._timer.cancel()
        self._timer = None
      _PENDING.discard(self)
      self.writes_enabled = False
      if self.segments is not None:
        self.segments.close()
      if self._dir_lock is not None:
        self._dir_lock()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __len__(self) -> int:
    return len(self.index)

  def stats(self) -> dict:
    """Counters: pages read / written and their bytes, hits, misses by cause, futures."""
    with self._lock:
      out = dict(self._stats)
    out.update(pages=len(self.index), capacity=self.config.capacity,
               futures_issued=self.ledger.issued, futures_awaited=self.ledger.awaited,
               futures_outstanding=self.ledger.outstanding,
               corrupt_index_records=self.index.corrupt_records,
               warm_pages=self.warm_pages, writes_enabled=self.writes_enabled,
               layout=self.config.layout, disk_pages=self.disk_pages(),
               segments=len(self.seg_pages))
    return out
