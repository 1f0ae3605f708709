"""``Prefetcher``: a host thread pool that reads pages from the store ahead of need into a
bounded host buffer, and hands them over under a policy (HiCache's three).

``issue(hashes)`` queues reads of pages expected soon (a queued request's
prefix, a policy's ranking: the source is the caller's); workers read them
in batches (``BlockStore.get``, so every page is checksummed) and stage the
result. ``take(hashes, policy)`` hands over what is staged:

* ``best_effort``: what is ready now; pages still in flight are abandoned;
* ``wait_complete``: waits until every requested page in flight is ready;
* ``timeout``: waits at most ``timeout_s``, then abandons the rest.

A page not handed over is the caller's to load (or recompute). The buffer
holds at most ``capacity`` pages, staged or in flight; issuing into a full
buffer drops the oldest staged page (wasted) or, if all are in flight, skips.

Counters (``stats()``): ``issued`` pages read ahead; ``used`` handed over;
``wasted`` read but never handed over (dropped, abandoned, discarded) and
``wasted_bytes``; ``late`` requested while still in flight; ``unissued``
requested but never issued; ``prefetch_misses`` read but not in the store;
``skipped`` not issued for a full buffer; ``wait_seconds`` spent in ``take``.

>>> import numpy as np
>>> from kvjax.layout import QuantSpec
>>> from kvjax.store.store import BlockStore, StoreConfig
>>> fmt = PageFormat.for_specs(QuantSpec(), QuantSpec(), num_layers=1, page_size=1,
...                            num_kv_heads=1, head_dim=2)
>>> store = BlockStore(StoreConfig(kvstore={"driver": "memory"}, capacity=4), fmt)
>>> h = np.array([[0, 1], [0, 2]], np.uint32)
>>> _ = store.put(h, {f.name: np.ones((2, *f.shape), f.dtype) for f in fmt.fields})
>>> with Prefetcher(store, workers=1) as pf:
...   pf.issue(h)
...   pf.take(h, PrefetchPolicy("wait_complete")).found.tolist()
2
[True, True]
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time

import numpy as np

from kvjax.store.format import PageFormat
from kvjax.store.store import BlockStore
from kvjax.store.store import hash_keys
from kvjax.store.store import PageInfo
from kvjax.store.store import StoreRead

POLICIES = ("best_effort", "wait_complete", "timeout")
COUNTERS = ("issued", "used", "wasted", "wasted_bytes", "late", "unissued", "prefetch_misses",
            "skipped", "wait_seconds")


@dataclasses.dataclass(frozen=True)
class PrefetchPolicy:
  """mode: one of ``POLICIES``; timeout_s: the bounded wait of ``"timeout"`` (seconds)."""

  mode: str = "best_effort"
  timeout_s: float = 0.005

  def __post_init__(self):
    if self.mode not in POLICIES:
      raise ValueError(f"PrefetchPolicy.mode must be one of {POLICIES}, got {self.mode!r}")
    if not self.timeout_s >= 0:
      raise ValueError(f"PrefetchPolicy.timeout_s must be >= 0, got {self.timeout_s!r}")


class _Entry:
  __slots__ = ("ready", "read", "row")

  def __init__(self):
    self.ready = False
    self.read = None   # the batch's StoreRead once ready (None: the read failed)
    self.row = 0       # this page's row in it


class Prefetcher:
  """Reads ahead from ``store`` with ``workers`` threads, ``batch`` pages a read.

  Args:
    store: a ``BlockStore``.
    workers: threads (>= 1). capacity: pages staged or in flight at most.
    batch: pages per store read.
  """

  def __init__(self, store: BlockStore, *, workers: int = 2, capacity: int = 256,
               batch: int = 16):
    for name, v in (("workers", workers), ("capacity", capacity), ("batch", batch)):
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"Prefetcher {name} must be an int >= 1, got {v!r}")
    self.store = store
    self.format: PageFormat = store.format
    self.capacity = capacity
    self.batch = batch
    self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="l3-prefetch")
    self._cond = threading.Condition()
    self._entries: collections.OrderedDict = collections.OrderedDict()  # key -> _Entry
    self._futures: set = set()
    self._stats = dict.fromkeys(COUNTERS, 0)

  # ---------------------------------------------------------------- issuing

  def issue(self, hashes: np.ndarray) -> int:
    """Queue reads of pages ``hashes`` (uint32 ``[n, 2]``) not staged or in flight; pages queued."""
    keys = hash_keys(hashes)
    h = np.asarray(hashes)
    todo = []
    with self._cond:
      seen = set()
      for i, k in enumerate(keys.tolist()):
        if k in self._entries or k in seen:
          continue
        if len(self._entries) >= self.capacity and not self._drop_oldest_ready():
          self._stats["skipped"] += len(keys) - i
          break
        seen.add(k)
        self._entries[k] = _Entry()
        todo.append(i)
      self._stats["issued"] += len(todo)
      for at in range(0, len(todo), self.batch):
        rows = np.asarray(todo[at:at + self.batch], np.int64)
        batch = [(k, self._entries[k]) for k in keys[rows].tolist()]
        fut = self._pool.submit(self._load, h[rows], batch)
        self._futures.add(fut)
        fut.add_done_callback(self._done)
    return len(todo)

  def _done(self, fut) -> None:
    with self._cond:
      self._futures.discard(fut)

  def _drop_oldest_ready(self) -> bool:
    for k, e in self._entries.items():
      if e.ready:
        del self._entries[k]
        self._waste(e)
        return True
    return False

  def _waste(self, e: _Entry) -> None:
    if e.read is not None and e.read.found[e.row]:
      self._stats["wasted"] += 1
      self._stats["wasted_bytes"] += self.format.page_bytes

  def _load(self, hashes: np.ndarray, batch: list) -> None:
    try:
      read = self.store.get(hashes)
    except Exception:  # noqa: BLE001: a failed batch is a miss for each of its pages
      read = None
    with self._cond:
      for row, (k, e) in enumerate(batch):
        e.ready, e.read, e.row = True, read, row
        if read is None or not read.found[row]:
          self._stats["prefetch_misses"] += 1
        if self._entries.get(k) is not e:   # abandoned or discarded meanwhile
          self._waste(e)
      self._cond.notify_all()

  # ---------------------------------------------------------------- handing over

  def take(self, hashes: np.ndarray, policy: PrefetchPolicy = PrefetchPolicy()) -> StoreRead:
    """Hand over the staged pages among ``hashes`` under ``policy``; they leave the buffer.

    Returns:
      ``StoreRead``: ``found`` bool ``[n]`` marks the pages handed over (read
      ahead and in the store); the rest are the caller's to load.
    """
    keys = hash_keys(hashes).tolist()
    n = len(keys)
    t0 = time.perf_counter()
    with self._cond:
      wanted = [self._entries.get(k) for k in keys]
      self._stats["late"] += sum(e is not None and not e.ready for e in wanted)
      self._stats["unissued"] += sum(e is None for e in wanted)
      def pending():
        return all(e is None or e.ready for e in wanted)
      if policy.mode == "wait_complete":
        self._cond.wait_for(pending)
      elif policy.mode == "timeout":
        self._cond.wait_for(pending, timeout=policy.timeout_s)
      arrays = {f.name: np.zeros((n, *f.shape), f.dtype) for f in self.format.fields}
      info = PageInfo.empty(n, self.format.page_size)
      found = np.zeros(n, bool)
      for i, (k, e) in enumerate(zip(keys, wanted)):
        if e is None:
          continue
        if self._entries.get(k) is e:
          del self._entries[k]            # handed over, or abandoned while in flight
        if not e.ready or e.read is None or not e.read.found[e.row]:
          continue
        found[i] = True
        for f in arrays:
          arrays[f][i] = e.read.arrays[f][e.row]
        for dst, src in zip(info, e.read.info):
          dst[i] = src[e.row]
      self._stats["used"] += int(found.sum())
      self._stats["wait_seconds"] += time.perf_counter() - t0
    return StoreRead(found, arrays, info)

  def discard(self) -> int:
    """Drop every staged page (counted wasted); in-flight ones are dropped on arrival."""
    with self._cond:
      n = len(self._entries)
      for e in self._entries.values():
        if e.ready:
          self._waste(e)
      self._entries.clear()
      return n

  def close(self) -> None:
    """Wait for every read in flight, drop what is staged, stop the threads."""
    with self._cond:
      futures = list(self._futures)
    concurrent.futures.wait(futures)
    self.discard()
    self._pool.shutdown(wait=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def stats(self) -> dict:
    with self._cond:
      out = dict(self._stats)
      out["buffered"] = len(self._entries)
      out["in_flight"] = sum(not e.ready for e in self._entries.values())
    out["accuracy"] = out["used"] / out["issued"] if out["issued"] else 0.0
    return out
