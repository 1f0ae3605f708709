"""BlockStore: round trips against the arrays put, LRU capacity against an OrderedDict
model, warm restart (snapshot and journal replay), the write policies, every
tensorstore future awaited (counted by a proxy around the store's arrays), and the
segments layout's compaction (disk bounded, pages intact, against the index)."""

import collections
import functools
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from kvjax.layout import PRESETS
from kvjax.layout import Pages
from kvjax.layout import QuantSpec
from kvjax.store import BlockStore
from kvjax.store import hash_keys
from kvjax.store import page_arrays
from kvjax.store import PageFormat
from kvjax.store import PageInfo
from kvjax.store import StoreConfig
from kvjax.store import WritePolicy
from kvjax.store.segments import PosixSegments
from kvjax.store.segments import segment_name

FMT = PageFormat.for_specs(*PRESETS["int4-kivi"], num_layers=2, page_size=4, num_kv_heads=1,
                           head_dim=32)


def hashes_of(ids):
  """Block hashes uint32 [n, 2] for integer ids (lane 0 = id, lane 1 = a mix of it)."""
  ids = np.asarray(ids, np.uint64)
  return np.stack([ids.astype(np.uint32) + 1, ((ids * 2654435761) % 2**32).astype(np.uint32)],
                  axis=1)


@functools.lru_cache(maxsize=None)
def page_row(i: int, page_bytes: int) -> np.ndarray:
  return np.random.default_rng(i).integers(0, 256, page_bytes, np.uint8)


def pages_of(ids, fmt=FMT):
  """Page arrays whose every byte is drawn from the id (any bit pattern of any dtype)."""
  rows = np.stack([page_row(int(i), fmt.page_bytes) for i in ids]) if len(ids) else \
      np.zeros((0, fmt.page_bytes), np.uint8)
  return fmt.unpack(rows)


def info_of(ids, fmt=FMT):
  ids = np.asarray(ids, np.int64)
  tokens = (ids[:, None] * 10 + np.arange(fmt.page_size)).astype(np.int32)
  return PageInfo(tokens, hashes_of(ids + 1000), np.tile(np.array([[7, 9]], np.uint32),
                                                          (len(ids), 1)))


def open_store(path, capacity=16, sync=False, commit_every=1, **kw):
  """A store on ``path`` committing every put (these tests abandon a store and reopen the
  directory as a crash would; grouped commits, the default on a path, are tested in
  test_store_group.py)."""
  return BlockStore(StoreConfig(path=str(path), capacity=capacity, sync=sync,
                                commit_every=commit_every, **kw), FMT)


def page_span(store, root, page_id):
  """(file, first byte, end byte) of page ``page_id``'s bytes on disk in either layout."""
  slot = store.index.slot_of[int(hash_keys(hashes_of([page_id]))[0])]
  root = pathlib.Path(root)
  if store.config.layout == "chunks":
    path = root / "pages" / "c" / str(slot) / "0"
    return path, 0, path.stat().st_size
  seg, off = int(store.index.seg[slot]), int(store.index.off[slot])
  pb = store.format.page_bytes
  name = segment_name(seg, store.seg_pages[seg]) if store.config.kvstore else f"{seg:016d}"
  return root / "segments" / name, off * pb, (off + 1) * pb


def same_bytes(a, b):
  return all(np.array_equal(np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8))
             for k in a)


def test_format_of_real_pages_and_page_arrays():
  k_spec, v_spec = PRESETS["int4-kivi"]
  rng = np.random.default_rng(0)
  k = Pages(data=jnp.asarray(rng.integers(0, 256, (2, 5, 4, 1, 16), np.uint8)),
            scale=jnp.asarray(rng.normal(size=(2, 5, 1, 1, 32)), jnp.bfloat16),
            zero=jnp.asarray(rng.integers(-5, 5, (2, 5, 1, 1, 32)), jnp.int8), spec=k_spec)
  v = Pages(data=jnp.asarray(rng.integers(0, 256, (2, 5, 4, 1, 16), np.uint8)),
            scale=jnp.asarray(rng.normal(size=(2, 5, 4, 1, 1)), jnp.bfloat16),
            zero=jnp.asarray(rng.integers(-5, 5, (2, 5, 4, 1, 1)), jnp.int8), spec=v_spec)
  assert PageFormat.from_pages(k, v) == FMT
  got = page_arrays(k, v, [3, 1])
  for name, a in (("k_data", k.data), ("k_scale", k.scale), ("v_zero", v.zero)):
    for row, p in enumerate([3, 1]):
      np.testing.assert_array_equal(got[name][row], np.asarray(a)[:, p])
  assert same_bytes(FMT.unpack(FMT.pack(got)), got)


def test_put_get_round_trip_and_misses(tmp_path):
  store = open_store(tmp_path)
  ids = [3, 5, 8]
  assert store.put(hashes_of(ids), pages_of(ids), info_of(ids)).tolist() == [True] * 3
  r = store.get(hashes_of([5, 4, 3, 8]))
  assert r.found.tolist() == [True, False, True, True]
  want = pages_of([5, 4, 3, 8])
  for name in want:
    want[name][1] = 0
  assert same_bytes(r.arrays, want)
  np.testing.assert_array_equal(r.info.tokens[[0, 2, 3]], info_of([5, 3, 8]).tokens)
  np.testing.assert_array_equal(r.info.parent[0], hashes_of([1005])[0])
  assert (r.info.tokens[1] == -1).all()
  s = store.stats()
  assert (s["hits"], s["misses"], s["writes"], s["reads"]) == (3, 1, 3, 3)
  assert s["write_bytes"] == 3 * FMT.page_bytes
  assert store.contains(hashes_of([3, 4])).tolist() == [True, False]
  # a page already held is not written again; a repeat in one batch is written once
  assert store.put(hashes_of([3, 9, 9]), pages_of([3, 9, 9])).all()
  assert store.stats()["writes"] == 4 and store.stats()["already_stored"] == 1
  assert store.evict(hashes_of([3, 4])).tolist() == [True, False]
  assert store.get(hashes_of([3])).found.tolist() == [False]


def test_scattered_reads_are_advised_together(tmp_path, monkeypatch):
  """A get's scattered pages (runs shorter than a reader's piece) are asked of the kernel
  up front, each run once; a long run is not (its preadv asks for it); the bytes are
  what was put either way, and a segment gone since is still a miss."""
  from kvjax.store import store as store_mod
  store = open_store(tmp_path, capacity=64)
  ids = list(range(40))
  store.put(hashes_of(ids), pages_of(ids))   # one segment, rows 0..39 in order
  calls = []
  real = os.posix_fadvise

  def recorded(fd, at, n, how):
    calls.append((at // FMT.page_bytes, n // FMT.page_bytes, how))
    return real(fd, at, n, how)

  monkeypatch.setattr(os, "posix_fadvise", recorded)
  want = [30, 3, 4, 17, 9, 10, 11, 12, 13, 14, 15, 16]   # runs 3-4, 9-17 (long), 30
  r = store.get(hashes_of(want))
  assert r.found.all() and same_bytes(r.arrays, pages_of(want))
  assert store_mod.READ_PIECE <= 9
  assert calls == [(3, 2, os.POSIX_FADV_WILLNEED), (30, 1, os.POSIX_FADV_WILLNEED)]
  for f in os.listdir(tmp_path / "segments"):
    os.remove(tmp_path / "segments" / f)
  assert not store.get(hashes_of([3, 30])).found.any()


@pytest.mark.parametrize("layout,compression", [("segments", None), ("chunks", "zstd"),
                                                ("chunks", "blosc"), ("chunks", "none")])
def test_warm_restart_snapshot_and_journal(tmp_path, layout, compression):
  cfg = dict(layout=layout, compression=compression)
  store = open_store(tmp_path, snapshot_every=4, **cfg)
  for b in range(5):   # 5 puts and an evict, 6 records: a snapshot after 4, 2 replayed
    store.put(hashes_of([2 * b, 2 * b + 1]), pages_of([2 * b, 2 * b + 1]),
              info_of([2 * b, 2 * b + 1]))
  store.evict(hashes_of([4]))
  names = os.listdir(tmp_path / "index")
  assert any(n.startswith("snapshot-") for n in names)
  assert any(n.startswith("journal-") for n in names)
  del store   # no close: the journal after the snapshot is replayed
  again = open_store(tmp_path, **cfg)
  assert again.warm_pages == 9
  r = again.get(hashes_of(range(10)))
  assert r.found.tolist() == [i != 4 for i in range(10)]
  live = [i for i in range(10) if i != 4]
  assert same_bytes({k: a[r.found] for k, a in r.arrays.items()}, pages_of(live))
  np.testing.assert_array_equal(r.info.tokens[r.found], info_of(live).tokens)
  again.close()
  assert [n for n in os.listdir(tmp_path / "index") if n.startswith("journal-")] == []
  assert open_store(tmp_path, **cfg).warm_pages == 9


def lru_put(model: collections.OrderedDict, k: int, capacity: int) -> None:
  """The LRU model's put of page k: to the end if held, else in (evicting the oldest)."""
  if k in model:
    model.move_to_end(k)
  else:
    if len(model) == capacity:
      model.popitem(last=False)
    model[k] = True


def test_lru_capacity_matches_an_ordered_dict_model_across_a_restart(tmp_path):
  capacity = 6
  store = open_store(tmp_path, capacity=capacity)
  model = collections.OrderedDict()
  rng = np.random.default_rng(1)
  for step in range(160):
    if step == 80:
      store.abandon()   # a crash, then a restart: recency must survive
      store = open_store(tmp_path, capacity=capacity)
    k = int(rng.integers(0, 14))
    if rng.random() < 0.5:
      hit = store.get(hashes_of([k])).found[0]
      assert hit == (k in model), step
      if hit:
        model.move_to_end(k)
    else:
      store.put(hashes_of([k]), pages_of([k]))
      lru_put(model, k, capacity)
    assert sorted(i for i in range(14) if store.contains(hashes_of([i]))[0]) == sorted(model)
  assert store.stats()["evictions"] > 0


def test_lfu_eviction_keeps_the_hit_pages(tmp_path):
  store = open_store(tmp_path, capacity=4, eviction="lfu")
  store.put(hashes_of(range(4)), pages_of(range(4)))
  for _ in range(2):
    store.get(hashes_of([0, 1]))
  store.put(hashes_of([10, 11]), pages_of([10, 11]))
  assert store.contains(hashes_of([0, 1, 2, 3, 10, 11])).tolist() == [True, True, False, False,
                                                                     True, True]


def test_reopen_checks_format_and_config(tmp_path):
  open_store(tmp_path).close()
  other = PageFormat.for_specs(QuantSpec(), QuantSpec(), num_layers=2, page_size=4,
                               num_kv_heads=1, head_dim=32)
  with pytest.raises(ValueError, match="differs from the format"):
    BlockStore(StoreConfig(path=str(tmp_path), capacity=16), other)
  with pytest.raises(ValueError, match="capacity"):
    open_store(tmp_path, capacity=32)
  with pytest.raises(ValueError, match="layout='chunks' differs from the store's 'segments'"):
    open_store(tmp_path, layout="chunks")
  assert BlockStore(StoreConfig(path=str(tmp_path), capacity=16)).format == FMT
  with pytest.raises(ValueError, match="fmt"):
    BlockStore(StoreConfig(path=str(tmp_path / "new"), capacity=16))


def test_argument_errors(tmp_path):
  with pytest.raises(ValueError, match="exactly one of path / kvstore"):
    StoreConfig()
  with pytest.raises(ValueError, match="compression"):
    StoreConfig(path="x", compression="gzip")
  with pytest.raises(ValueError, match="eviction"):
    StoreConfig(path="x", eviction="mru")
  with pytest.raises(ValueError, match="layout must be one of"):
    StoreConfig(path="x", layout="log")
  with pytest.raises(ValueError, match="compression='zstd' needs layout='chunks'"):
    StoreConfig(path="x", compression="zstd")
  with pytest.raises(ValueError, match="compact_slack"):
    StoreConfig(path="x", compact_slack=-1)
  with pytest.raises(ValueError, match="segment_bytes"):
    StoreConfig(path="x", segment_bytes=0)
  assert StoreConfig(path="x", layout="chunks").compression == "zstd"
  store = open_store(tmp_path, capacity=2)
  with pytest.raises(ValueError, match="uint32"):
    store.get(np.zeros((2, 2), np.int64))
  with pytest.raises(ValueError, match="no-hash"):
    store.get(np.zeros((1, 2), np.uint32))
  bad = pages_of([1])
  bad["k_scale"] = bad["k_scale"].astype(np.float32)
  with pytest.raises(ValueError, match="k_scale"):
    store.put(hashes_of([1]), bad)
  with pytest.raises(ValueError, match="capacity 2"):
    store.put(hashes_of([1, 2, 3]), pages_of([1, 2, 3]))


def test_write_policies():
  ev = [("insert", 0), ("hit", 1), ("hit", 2), ("hit", 3), ("evict", 3)]
  table = {"write_through": [True, False, False, False, False],
           "write_back": [False, False, False, False, True]}
  for mode, want in table.items():
    assert [WritePolicy(mode).wants(e, h) for e, h in ev] == want
  assert [WritePolicy("write_through_selective", hits=2).wants(e, h) for e, h in ev] == [
      False, False, True, True, False]
  with pytest.raises(ValueError, match="mode"):
    WritePolicy("write_around")
  with pytest.raises(ValueError, match="event"):
    WritePolicy().wants("promote")


class CountingArray:
  """Wraps a tensorstore array (or kvstore): keeps every future its reads and writes return."""

  def __init__(self, inner, futures):
    self.inner, self.futures = inner, futures

  def __getitem__(self, idx):
    return CountingArray(self.inner[idx], self.futures)

  def _keep(self, fut):
    self.futures.append(fut)
    return fut

  def read(self, *a, **kw):
    return self._keep(self.inner.read(*a, **kw))

  def write(self, *a, **kw):
    return self._keep(self.inner.write(*a, **kw))

  def list(self, *a, **kw):
    return self._keep(self.inner.list(*a, **kw))


@pytest.mark.parametrize("layout", ["chunks", "segments"])
def test_every_future_is_awaited(tmp_path, layout):
  # segments through tensorstore's file kvstore (a kvstore config), not the local fast path
  store = BlockStore(StoreConfig(kvstore={"driver": "file", "path": str(tmp_path)}, capacity=8,
                                 snapshot_every=2, sync=False, layout=layout), FMT)
  futures = []
  if layout == "chunks":
    store.array = CountingArray(store.array, futures)
  else:
    store.segments.kvstore = CountingArray(store.segments.kvstore, futures)
  store.index.kvstore = CountingArray(store.index.kvstore, futures)
  ids = list(range(20))
  for b in range(0, 20, 4):          # 20 pages through 8 slots: evictions, slot reuse, snapshots
    store.put(hashes_of(ids[b:b + 4]), pages_of(ids[b:b + 4]))
    pending = store.get_async(hashes_of(ids[max(0, b - 4):b + 4]))
    assert store.ledger.outstanding > 0 or b == 0
    pending.result()
    assert store.ledger.outstanding == 0
  gone = page_span(store, tmp_path, 19)[0]   # a segment: the put's four pages
  lost = {i for i in ids[12:] if page_span(store, tmp_path, i)[0] == gone}
  os.remove(gone)
  store.get(hashes_of(ids))          # a failed read is awaited too
  store.evict(hashes_of(ids[-2:]))
  store.close()
  assert len(futures) > 40
  assert all(f.done() for f in futures)
  if layout == "chunks":   # one array write per put
    writes = [f for f in futures if isinstance(f, ts.WriteFutures)]
    assert len(writes) == 5 and all(f.commit.done() and f.exception() is None for f in writes)
  s = store.stats()
  assert s["futures_outstanding"] == 0 and s["futures_issued"] == s["futures_awaited"] >= len(
      futures)
  # and what was committed is there: a fresh process-like reopen reads the last 6 intact
  again = BlockStore(StoreConfig(kvstore={"driver": "file", "path": str(tmp_path)}, capacity=8,
                                 layout=layout), FMT)
  r = again.get(hashes_of(ids[12:18]))
  assert r.found.tolist() == [i not in lost for i in ids[12:18]]
  assert same_bytes({k: a[r.found] for k, a in r.arrays.items()},
                    pages_of([i for i in ids[12:18] if i not in lost]))


def test_any_kvstore_by_configuration():
  store = BlockStore(StoreConfig(kvstore={"driver": "memory", "path": "l3"}, capacity=4), FMT)
  store.put(hashes_of([1, 2]), pages_of([1, 2]))
  r = store.get(hashes_of([2, 1]))
  assert r.found.all() and same_bytes(r.arrays, pages_of([2, 1]))


def test_a_page_of_zeros_is_stored_and_read_back(tmp_path):
  # tensorstore skips writing a chunk equal to the fill value (zeros) unless told otherwise;
  # the store must keep it: an all-zero page (int8 zeros, an empty bfloat16 page) is data.
  store = open_store(tmp_path)
  zeros = FMT.unpack(np.zeros((2, FMT.page_bytes), np.uint8))
  assert store.put(hashes_of([1, 2]), zeros).all()
  store.abandon()
  r = open_store(tmp_path).get(hashes_of([1, 2]))
  assert r.found.all() and same_bytes(r.arrays, zeros)


def test_lru_ties_go_to_the_lowest_slot(tmp_path):
  # Pages 0..7 fill slots 0..7 in one put (one clock tick: equal last use); a get refreshes
  # all but 2 and 5. Three new pages evict 2, 5 and, of the equally recent rest, slot 0's
  # page (np.argpartition alone took slot 1's).
  store = open_store(tmp_path, capacity=8)
  store.put(hashes_of(range(8)), pages_of(range(8)))
  store.get(hashes_of([0, 1, 3, 4, 6, 7]))
  store.put(hashes_of([10, 11, 12]), pages_of([10, 11, 12]))
  assert store.contains(hashes_of(range(8))).tolist() == [False, True, False, True, True, False,
                                                          True, True]


@pytest.mark.parametrize("via", ["path", "path-grouped", "kvstore"])
def test_compaction_bounds_the_disk_and_keeps_every_page(tmp_path, via):
  # ~250 pages through 24 slots in batches of 1-6 with gets in between: LRU kept (no page
  # left listed that was used less recently than one evicted: compaction moves pages, it
  # does not refresh them), the disk within capacity * (1 + slack) after every put, the
  # segment files on disk exactly the ones the store keeps, every listed page intact,
  # across a reopen without close
  capacity, slack = 24, 0.25
  # grouped: commits every 4 puts and at compactions, never on a timer (none races the
  # file listing below)
  where = dict(path=str(tmp_path), commit_every=4 if via == "path-grouped" else 1,
               commit_seconds=600.0) \
      if via != "kvstore" else dict(kvstore={"driver": "file", "path": str(tmp_path)})

  def open_():   # segments of at most 8 pages (appended to on a path)
    return BlockStore(StoreConfig(capacity=capacity, compact_slack=slack, sync=False,
                                  segment_bytes=8 * FMT.page_bytes, **where), FMT)

  store, rng, nxt = open_(), np.random.default_rng(3), 0
  last = {}   # page -> the call that last put or hit it
  for call in range(120):
    listed = [i for i in last if store.contains(hashes_of([i]))[0]]
    if rng.random() < 0.4 and listed:
      ids = rng.choice(listed, min(len(listed), int(rng.integers(1, 6))), replace=False)
      r = store.get(hashes_of(ids))
      assert r.found.all() and same_bytes(r.arrays, pages_of(ids))
    else:
      ids = list(range(nxt, nxt + int(rng.integers(1, 7))))
      nxt += len(ids)
      assert store.put(hashes_of(ids), pages_of(ids), info_of(ids)).all()
      if via != "path-grouped" or store._puts_pending == 0:   # grouped: at each commit
        assert store.disk_pages() <= capacity * (1 + slack), call
    last.update(dict.fromkeys((int(i) for i in ids), call))
    inside = store.contains(hashes_of(list(last)))
    assert inside.sum() == min(capacity, len(last))
    used = np.array(list(last.values()))
    assert used[~inside].max(initial=-1) <= used[inside].min(), call
    on_disk = {int(n.split(".")[0]) for n in os.listdir(tmp_path / "segments")}
    assert on_disk == set(store.seg_pages)
    # grouped, a segment whose last page left is deleted at the group's commit
    assert (set(store.index.seg_live) <= on_disk) if via == "path-grouped" else \
        set(store.index.seg_live) == on_disk
    if call == 60:   # a flush (the hits since the last put durable), no snapshot: the journal
      store.flush()  # is replayed, compaction goes on from there
      store.abandon()
      store = open_()
  s = store.stats()
  assert s["compactions"] > 5 and s["compacted_pages"] > 0, s
  assert s["futures_outstanding"] == 0
  live = [i for i in last if store.contains(hashes_of([i]))[0]]
  store.flush()   # grouped: a reopen without close sees what was committed
  store.abandon()
  r = open_().get(hashes_of(live))
  assert r.found.all() and same_bytes(r.arrays, pages_of(live))
  np.testing.assert_array_equal(r.info.tokens, info_of(live).tokens)


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_ranked_is_the_reverse_of_the_eviction_order(tmp_path, eviction):
  # the pages ranked best are the ones evicted last: put a full store's worth, read some
  # more than others, then check ranked(n) against a plain sort of (score, slot) and against
  # which pages survive when new pages evict the rest one by one
  store = open_store(tmp_path, capacity=10, eviction=eviction)
  rng = np.random.default_rng(5)
  for b in range(5):
    store.put(hashes_of([2 * b, 2 * b + 1]), pages_of([2 * b, 2 * b + 1]))
  for _ in range(12):
    store.get(hashes_of(rng.choice(10, int(rng.integers(1, 4)), replace=False)))
  ix = store.index
  slots = np.flatnonzero(ix.used)
  score = ix.score(ix.last_use[slots], ix.hits[slots])
  order = sorted(range(len(slots)), key=lambda j: (-float(score[j]), -int(slots[j])))
  want = [int(ix.key[slots[j]]) for j in order]
  got = hash_keys(store.ranked(10)).tolist()
  assert got == want and hash_keys(store.ranked(3)).tolist() == want[:3]
  assert store.ranked(0).shape == (0, 2)
  survivors = want[:4]
  store.put(hashes_of(range(100, 106)), pages_of(range(100, 106)))   # evicts the 6 worst
  left = [int(k) for k in hash_keys(hashes_of(range(10)))
          if store.contains(np.array([[k >> 32, k & 0xFFFFFFFF]], np.uint32))[0]]
  assert sorted(left) == sorted(survivors)
  with pytest.raises(ValueError, match="n must be"):
    store.ranked(-1)


def test_a_segment_run_longer_than_iov_max_reads_back(tmp_path):
  # compaction reads a whole segment: one run of thousands of rows (a single preadv of
  # them failed with EINVAL, and compaction dropped every page as unreadable)
  segs = PosixSegments(str(tmp_path), page_bytes=8, sync=False)
  rows = np.random.default_rng(0).integers(0, 256, (3000, 8), np.uint8)
  segs.write(0, 0, rows[:1000])
  segs.write(0, 1000, [r for r in rows[1000:]])     # appended, as a gathered write
  got = np.zeros_like(rows)
  assert segs.read(0, 3000, list(range(3000)), got, list(range(3000))) == {}
  np.testing.assert_array_equal(got, rows)
  assert segs.list() == {0: 3000}
