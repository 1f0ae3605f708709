"""The store's index: block hash -> slot, with each slot's record, made durable as a
journal of small atomic records plus periodic snapshots on a tensorstore kvstore.

Every change (a page listed, a page dropped, pages touched) goes into the
pending record; ``commit`` writes it as one key ``journal-<seq>`` (a single-key
kvstore write is atomic: the file driver writes a temporary file and renames
it) and ``snapshot`` writes the whole table as ``snapshot-<seq>`` and deletes
what it covers. Reopening loads the newest snapshot whose checksum holds and
replays the journal after it, stopping at the first record that is missing or
fails its checksum (and deleting the ones after it, so that no later record
is replayed on top of a new one). Two rules make a restart safe:

* a page is listed (``insert``) only after its data is committed, and the
  record that lists it is written after that: a page whose data was not
  committed is never listed;
* a slot freed by ``remove`` is reused only after the record of its removal
  is durable (``pending_free`` until then): a durable record never names a
  slot whose data has been overwritten since (with ``reuse_at_once``, for the
  segments layout's group commit, a freed slot is reused at once: a page's
  bytes live in its segment row, never in its slot, and segments are deleted
  only after their pages' removal is durable).

Names in shapes: C = capacity (slots), S = page_size, k = keys.

>>> import tensorstore as ts
>>> kv = ts.KvStore.open({"driver": "memory"}).result()
>>> ix = PersistentIndex(kv, capacity=4, page_size=2)
>>> ix.load()
0
>>> slot = ix.allocate(1)[0]
>>> ix.insert(slot, 7, crc=1, tokens=[3, 4], parent=(0, 0), namespace=(0, 0))
>>> ix.commit()
>>> again = PersistentIndex(kv, capacity=4, page_size=2)
>>> again.load(), again.lookup(np.array([7, 8], np.uint64)).tolist()
(1, [0, -1])
"""

from __future__ import annotations

import json
import threading
from typing import Callable, Optional

import google_crc32c
import numpy as np

SNAPSHOT = "snapshot-"
JOURNAL = "journal-"
_SEQ_DIGITS = 16
# the per-slot fields of a snapshot (all) and of a journal record's inserted slots (all but used)
LOADED = ("used", "key", "crc", "tokens", "parent", "namespace", "last_use", "hits", "seg", "off")


class FutureLedger:
  """Every tensorstore future the store issues goes through ``track`` and ``wait``.

  ``issued - awaited`` (``outstanding``) is 0 whenever no call is in progress:
  tensorstore cancels a write whose future is dropped, so none may be.
  """

  def __init__(self):
    self.issued = 0
    self.awaited = 0
    self._lock = threading.Lock()

  def track(self, future):
    with self._lock:
      self.issued += 1
    return future

  def wait(self, future):
    """The future's result (its exception raised), counted as awaited either way."""
    try:
      return future.result()
    finally:
      with self._lock:
        self.awaited += 1

  @property
  def outstanding(self) -> int:
    return self.issued - self.awaited


def seal(body: bytes) -> bytes:
  """``body`` followed by its crc32c (4 bytes, little-endian)."""
  return body + int(google_crc32c.value(body)).to_bytes(4, "little")


def unseal(value: bytes) -> Optional[bytes]:
  """The body of a ``seal``ed value, or None if its checksum fails."""
  if len(value) < 4:
    return None
  body, crc = value[:-4], int.from_bytes(value[-4:], "little")
  return body if int(google_crc32c.value(body)) == crc else None


def _record(**arrays) -> bytes:
  """A sealed record of named arrays: header length, JSON header (name, dtype, shape), bytes."""
  arrays = {k: np.asarray(a) for k, a in arrays.items()}
  header = json.dumps([[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]).encode()
  parts = [len(header).to_bytes(4, "little"), header] + [a.tobytes() for a in arrays.values()]
  return seal(b"".join(parts))


def _load_record(value: bytes) -> Optional[dict]:
  body = unseal(value)
  if body is None:
    return None
  n = int.from_bytes(body[:4], "little")
  out, at = {}, 4 + n
  for name, dtype, shape in json.loads(body[4:at]):
    dt = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    out[name] = np.frombuffer(body, dt, int(np.prod(shape, dtype=np.int64)), at).reshape(
        shape).copy()
    at += size
  return out


def lru_score(last_use: np.ndarray, hits: np.ndarray) -> np.ndarray:
  """Eviction score (lowest goes first): least recently used first."""
  del hits
  return last_use


def lfu_score(last_use: np.ndarray, hits: np.ndarray) -> np.ndarray:
  """Eviction score: fewest hits first, least recently used among equals."""
  return hits.astype(np.float64) * 2.0 ** 40 + last_use


class PersistentIndex:
  """hash key (uint64: lane 0 high, lane 1 low) -> slot, and each slot's record.

  Not thread-safe on its own: the store calls it under its lock. Per-slot
  arrays (host numpy, C entries) are the durable table.
  """

  def __init__(self, kvstore, capacity: int, page_size: int,
               ledger: Optional[FutureLedger] = None,
               score: Callable[[np.ndarray, np.ndarray], np.ndarray] = lru_score):
    self.kvstore = kvstore
    self.capacity = capacity
    self.page_size = page_size
    self.ledger = ledger or FutureLedger()
    self.score = score
    c, s = capacity, page_size
    self.used = np.zeros(c, bool)               # bool [C]  slot lists a page
    self.key = np.zeros(c, np.uint64)           # uint64 [C]  block hash (lane 0 << 32 | lane 1)
    self.crc = np.zeros(c, np.uint32)           # uint32 [C]  crc32c of hash + page bytes
    self.tokens = np.full((c, s), -1, np.int32)  # int32 [C, S]  the page's tokens
    self.parent = np.zeros((c, 2), np.uint32)   # uint32 [C, 2]  parent block hash
    self.namespace = np.zeros((c, 2), np.uint32)  # uint32 [C, 2]  chain seed
    self.last_use = np.zeros(c, np.int64)       # int64 [C]  clock of the last put or hit
    self.hits = np.zeros(c, np.int64)           # int64 [C]  reads that found the page
    self.seg = np.full(c, -1, np.int64)         # int64 [C]  segment of the page (-1: chunks layout)
    self.off = np.zeros(c, np.int32)            # int32 [C]  the page's row in its segment
    self.clock = 0                              # int  logical clock (one tick per call)
    self.slot_of: dict = {}                     # {key: slot} of listed pages
    self.free: list = list(range(c - 1, -1, -1))  # slots reusable now (pop from the end)
    self.pending_free: list = []                # freed since the last durable record
    self.next_seq = 1                           # sequence number of the next record
    self.journal_since_snapshot = 0
    self._inserted: set = set()
    self._removed: set = set()
    self._touched: set = set()
    self.seg_live: dict = {}                    # {segment: listed pages in it}
    self._emptied: set = set()                  # segments emptied since the last durable record
    self.dead_segments: list = []               # emptied, and durably so: the store deletes them
    # the segments layout with grouped commits (StoreConfig.commit_every > 1): a page's bytes
    # live in its segment row, never in its slot, so a freed slot is reusable at once (a
    # durable record naming its old page still points at intact rows: segments are deleted
    # only once their removal is durable); and commit first calls before_commit (the
    # store's fsync of the data its pending records list)
    self.reuse_at_once = False
    self.before_commit: Optional[Callable[[], None]] = None

  # --------------------------------------------------------------------- table

  def __len__(self) -> int:
    return len(self.slot_of)

  def lookup(self, keys: np.ndarray) -> np.ndarray:
    """int64 ``[k]`` slot of each key, -1 where not listed."""
    get = self.slot_of.get
    return np.array([get(int(k), -1) for k in keys], np.int64)

  def allocate(self, n: int, protect=()) -> list:
    """``n`` free slots, evicting by ``score`` (never slots in ``protect``) if needed.

    Slots freed here become usable only after their removal is durable, so a
    shortfall is covered by evicting, committing, then taking the slots.
    Returns the slots and leaves them out of the free list.
    """
    if n > self.capacity:
      raise ValueError(f"a batch of {n} pages does not fit a store of capacity {self.capacity}")
    if len(self.free) < n:
      short = n - len(self.free) - len(self.pending_free)
      if short > 0:
        self.evict(short, protect)
      if len(self.free) < n:   # (reuse_at_once: the evicted slots are free already)
        self.commit()
    if len(self.free) < n:
      raise ValueError(f"cannot free {n} slots (capacity {self.capacity}, "
                       f"{len(self.free)} free)")
    return [self.free.pop() for _ in range(n)]

  def release(self, slots) -> None:
    """Give back slots ``allocate`` returned but nothing was listed in (their data is unlisted)."""
    self.free.extend(int(s) for s in slots)

  def evict(self, n: int, protect=()) -> list:
    """Remove the ``n`` listed pages of lowest ``score`` (not in ``protect``); their keys.

    Ties go to the lowest slot, and the victims are removed in (score, slot) order, so
    which pages leave and which slots are reused next is defined (``np.argpartition``
    alone picked among equal scores by its selection algorithm's internals).
    """
    cand = np.flatnonzero(self.used)
    if len(protect):
      cand = cand[~np.isin(cand, np.asarray(list(protect), np.int64))]
    if n <= 0 or len(cand) == 0:
      return []
    n = min(n, len(cand))
    score = np.asarray(self.score(self.last_use[cand], self.hits[cand]))
    if n < len(cand):   # O(C): the n-th lowest score, then the lowest slots among its ties
      kth = np.partition(score, n - 1)[n - 1]
      below = np.flatnonzero(score < kth)
      pick = np.concatenate([below, np.flatnonzero(score == kth)[:n - len(below)]])
    else:
      pick = np.arange(len(cand))
    pick = pick[np.lexsort((cand[pick], score[pick]))]
    victims = cand[pick]
    keys = [int(self.key[s]) for s in victims]
    for s in victims:
      self.remove(int(s))
    return keys

  def insert(self, slot: int, key: int, *, crc: int, tokens, parent, namespace,
             seg: int = -1, off: int = 0) -> None:
    """List page ``key`` in ``slot`` (its data committed, in row ``off`` of segment ``seg``
    for the segments layout). Durable at the next ``commit``."""
    self.used[slot] = True
    self._place(slot, seg, off)
    self.key[slot] = key
    self.crc[slot] = crc
    self.tokens[slot] = tokens
    self.parent[slot] = parent
    self.namespace[slot] = namespace
    self.last_use[slot] = self.clock
    self.hits[slot] = 0
    self.slot_of[key] = slot
    self._inserted.add(slot)

  def _place(self, slot: int, seg: int, off: int) -> None:
    self.seg[slot], self.off[slot] = seg, off
    if seg >= 0:
      self.seg_live[seg] = self.seg_live.get(seg, 0) + 1
      self._emptied.discard(seg)

  def _unplace(self, slot: int) -> None:
    seg = int(self.seg[slot])
    if seg >= 0:
      self.seg_live[seg] -= 1
      if self.seg_live[seg] == 0:
        del self.seg_live[seg]
        self._emptied.add(seg)

  def relocate(self, slot: int, seg: int, off: int) -> None:
    """The page in ``slot`` now lives in row ``off`` of segment ``seg`` (compaction rewrote
    it; its record is otherwise unchanged). Durable at the next ``commit``."""
    self._unplace(slot)
    self._place(slot, seg, off)
    self._inserted.add(slot)

  def remove(self, slot: int) -> None:
    """Unlist the page in ``slot``; the slot is reusable after the next durable record."""
    if not self.used[slot]:
      return
    self._unplace(slot)
    self.used[slot] = False
    self.slot_of.pop(int(self.key[slot]), None)
    self._inserted.discard(slot)
    self._touched.discard(slot)
    self._removed.add(slot)
    (self.free if self.reuse_at_once else self.pending_free).append(slot)

  def remove_uncommitted(self) -> None:
    """Unlist every page inserted since the last commit (their bytes may be lost)."""
    for slot in sorted(self._inserted):
      self.remove(slot)

  def touch(self, slot: int, hit: bool = True) -> None:
    self.last_use[slot] = self.clock
    self.hits[slot] += int(hit)
    self._touched.add(slot)

  @property
  def dirty(self) -> bool:
    return bool(self._inserted or self._removed or self._touched)

  # --------------------------------------------------------------- durability

  def _write(self, key: str, value: Optional[bytes]) -> None:
    self.ledger.wait(self.ledger.track(self.kvstore.write(key, value)))

  def commit(self) -> None:
    """Write the pending changes as one journal record (nothing if none); then free slots.

    Raises what the kvstore raises (e.g. a full disk); the changes stay
    pending, and the freed slots unusable, until a later commit succeeds.
    """
    if not self.dirty:
      self._durable()
      return
    if self.before_commit is not None:
      self.before_commit()
    ins = np.array(sorted(self._inserted), np.int64)
    rem = np.array(sorted(self._removed), np.int64)
    tch = np.array(sorted(self._touched - self._inserted), np.int64)
    record = _record(seq=np.int64(self.next_seq), clock=np.int64(self.clock), removed=rem,
                  slot=ins, key=self.key[ins], crc=self.crc[ins], tokens=self.tokens[ins],
                  parent=self.parent[ins], namespace=self.namespace[ins],
                  last_use=self.last_use[ins], hits=self.hits[ins], seg=self.seg[ins],
                  off=self.off[ins], touched=tch, touched_last=self.last_use[tch], touched_hits=self.hits[tch])
    self._write(f"{JOURNAL}{self.next_seq:0{_SEQ_DIGITS}d}", record)
    self.next_seq += 1
    self.journal_since_snapshot += 1
    self._inserted, self._removed, self._touched = set(), set(), set()
    self._durable()

  def _durable(self) -> None:
    """What the last durable record freed: its slots reusable, its emptied segments deletable."""
    self.free.extend(self.pending_free)
    self.pending_free = []
    self.dead_segments.extend(sorted(self._emptied))
    self._emptied = set()

  def snapshot(self) -> None:
    """Commit, then write the whole table and delete the records it covers."""
    self.commit()
    seq = self.next_seq - 1
    value = _record(seq=np.int64(seq), clock=np.int64(self.clock), used=self.used, key=self.key,
                 crc=self.crc, tokens=self.tokens, parent=self.parent,
                 namespace=self.namespace, last_use=self.last_use, hits=self.hits,
                 seg=self.seg, off=self.off)
    self._write(f"{SNAPSHOT}{seq:0{_SEQ_DIGITS}d}", value)
    self.journal_since_snapshot = 0
    for name in self._keys():
      kind, s = _parse(name)
      if (kind == JOURNAL and s <= seq) or (kind == SNAPSHOT and s < seq):
        self._write(name, None)

  def _keys(self) -> list:
    keys = self.ledger.wait(self.ledger.track(self.kvstore.list()))
    return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)

  def _read(self, key: str) -> Optional[bytes]:
    r = self.ledger.wait(self.ledger.track(self.kvstore.read(key)))
    return r.value if r.state == "value" else None

  def load(self) -> int:
    """Restore the durable table (newest valid snapshot + the journal after it); pages listed.

    ``self.corrupt_records`` counts snapshots and journal records skipped for
    a failed checksum.
    """
    self.corrupt_records = 0
    names = self._keys()
    snaps = sorted((s, n) for n in names for kind, s in [_parse(n)] if kind == SNAPSHOT)
    base = 0
    for s, name in reversed(snaps):
      d = _load_record(self._read(name) or b"")
      if d is None or d["used"].shape != (self.capacity,) or \
          d["tokens"].shape != (self.capacity, self.page_size):
        self.corrupt_records += 1
        continue
      for f in LOADED:
        if f in d:   # seg / off: absent in stores written before the segments layout
          getattr(self, f)[...] = d[f]
      self.clock = int(d["clock"])
      base = s
      break
    journals = sorted((s, n) for n in names for kind, s in [_parse(n)]
                      if kind == JOURNAL and s > base)
    expect, stop = base + 1, False
    for s, name in journals:
      d = None if stop or s != expect else _load_record(self._read(name) or b"")
      if d is None:
        self.corrupt_records += int(not stop and s == expect)
        stop = True
        self._write(name, None)   # never replayed after a newer record of the same number
        continue
      self._apply(d)
      expect += 1
    self.next_seq = expect
    self.journal_since_snapshot = expect - 1 - base
    self.slot_of = {int(self.key[s]): int(s) for s in np.flatnonzero(self.used)}
    self.free = [int(s) for s in np.flatnonzero(~self.used)[::-1]]
    self.pending_free = []
    live = self.seg[self.used]
    self.seg_live = {int(g): int(c) for g, c in zip(*np.unique(live[live >= 0],
                                                                return_counts=True))}
    self._emptied, self.dead_segments = set(), []
    return len(self.slot_of)

  def _apply(self, d: dict) -> None:
    self.used[d["removed"]] = False
    ins = d["slot"]
    self.used[ins] = True
    for f in LOADED[1:]:
      if f in d:
        getattr(self, f)[ins] = d[f]
    t = d["touched"]
    live = self.used[t]
    self.last_use[t[live]] = d["touched_last"][live]
    self.hits[t[live]] = d["touched_hits"][live]
    self.clock = max(self.clock, int(d["clock"]))


def _parse(name: str) -> tuple:
  for kind in (SNAPSHOT, JOURNAL):
    if name.startswith(kind) and name[len(kind):].isdigit():
      return kind, int(name[len(kind):])
  return None, -1
