"""Group commit (``StoreConfig.commit_every``): a crash loses at most the last group's puts and
never lists a page whose bytes were not made durable; a full store behaves page for page as
the default store (an OrderedDict LRU model); a failed group fsync unlists the whole group."""

import collections

import numpy as np
import pytest

from kvjax.store import BlockStore
from kvjax.store import StoreConfig
from kvjax.store import StoreWriteError
from kvjax.store.segments import PosixSegments
from test_store import FMT
from test_store import hashes_of
from test_store import lru_put
from test_store import pages_of
from test_store import same_bytes


def grouped(path, capacity=64, every=4, sync=True):
  return BlockStore(StoreConfig(path=str(path), capacity=capacity, sync=sync,
                                commit_every=every), FMT)


def records(store):
  return store.index.next_seq - 1


def test_a_group_is_durable_at_its_last_put_and_readable_at_once(tmp_path):
  store = grouped(tmp_path)
  fsyncs = []
  real = PosixSegments.sync_deferred
  store.segments.sync_deferred = lambda: (fsyncs.append(1), real(store.segments))
  for b in range(3):
    ids = list(range(4 * b, 4 * b + 4))
    assert store.put(hashes_of(ids), pages_of(ids)).all()
    got = store.get(hashes_of(ids))   # listed and readable before the group is durable
    assert got.found.all() and same_bytes(got.arrays, pages_of(ids))
  assert records(store) == 0 and not fsyncs
  # a crash now (the object abandoned, nothing flushed): a restart lists none of the group
  crashed = grouped(tmp_path)
  assert crashed.warm_pages == 0 and not crashed.get(hashes_of(range(12))).found.any()


def test_flush_fsyncs_the_data_before_its_record(tmp_path):
  store = grouped(tmp_path)
  order = []
  real_sync, real_commit = PosixSegments.sync_deferred, store.index._write
  store.segments.sync_deferred = lambda: (order.append("data"), real_sync(store.segments))
  store.index._write = lambda key, value: (order.append(key.split("-")[0]),
                                           real_commit(key, value))
  store.put(hashes_of([1, 2]), pages_of([1, 2]))
  assert order == []
  store.flush()
  assert order == ["data", "journal"]
  again = grouped(tmp_path)
  assert again.get(hashes_of([1, 2])).found.all()


def test_the_nth_put_commits_the_group_and_a_restart_reads_it_back(tmp_path):
  store = grouped(tmp_path)
  for b in range(6):
    ids = list(range(4 * b, 4 * b + 4))
    store.put(hashes_of(ids), pages_of(ids))
  assert records(store) == 1   # puts 1-4; puts 5 and 6 are pending
  again = grouped(tmp_path)
  assert again.warm_pages == 16
  got = again.get(hashes_of(range(24)))
  assert got.found.tolist() == [True] * 16 + [False] * 8
  assert same_bytes({k: v[:16] for k, v in got.arrays.items()}, pages_of(range(16)))
  assert again.stats()["checksum_failures"] == 0


@pytest.mark.parametrize("every", [1, 3])
def test_a_full_store_matches_the_lru_model_and_survives_close(tmp_path, every):
  capacity = 8
  store = grouped(tmp_path, capacity=capacity, every=every, sync=False)
  model = collections.OrderedDict()
  rng = np.random.default_rng(every)
  puts = 0
  for step in range(300):
    k = int(rng.integers(0, 20))   # one page a call: no ties of recency
    if rng.random() < 0.5:
      got = store.get(hashes_of([k]))
      assert got.found[0] == (k in model), step
      if k in model:
        assert same_bytes(got.arrays, pages_of([k]))
        model.move_to_end(k)
    else:
      store.put(hashes_of([k]), pages_of([k]))
      puts += 1
      lru_put(model, k, capacity)
    listed = [k for k in range(20) if store.contains(hashes_of([k]))[0]]
    assert listed == sorted(model), step
  assert store.stats()["evictions"] > 0
  # by default a record a put, and one more when it evicts (the freed slots wait for it);
  # grouped, one record a group: the slots are reusable at once
  assert records(store) == puts // every if every > 1 else records(store) > puts
  store.close()
  again = grouped(tmp_path, capacity=capacity, every=every, sync=False)
  got = again.get(hashes_of(sorted(model)))
  assert got.found.all() and same_bytes(got.arrays, pages_of(sorted(model)))


def test_a_failed_group_fsync_unlists_the_group_and_keeps_what_was_durable(tmp_path):
  store = grouped(tmp_path, every=3)
  for b in range(3):   # one durable group: pages 0-5
    store.put(hashes_of([2 * b, 2 * b + 1]), pages_of([2 * b, 2 * b + 1]))
  assert records(store) == 1
  store.put(hashes_of([6, 7]), pages_of([6, 7]))
  store.put(hashes_of([8, 9]), pages_of([8, 9]))

  def broken():
    store.segments._dirty.clear()   # as the kernel may drop dirty pages after a failed fsync
    raise OSError(5, "Input/output error")

  store.segments.sync_deferred = broken
  with pytest.raises(StoreWriteError) as err:
    store.put(hashes_of([10, 11]), pages_of([10, 11]))
  assert not err.value.listed.any()
  assert store.get(hashes_of(range(6))).found.all()
  assert not store.get(hashes_of(range(6, 12))).found.any()   # the whole group is unlisted
  assert not store.writes_enabled
  assert not store.put(hashes_of([12]), pages_of([12])).any()   # refused, counted
  assert store.stats()["writes_refused"] == 1
  del store.segments.sync_deferred   # the disk works again (nothing is left to sync)
  store.flush()   # the unlisting is durable; no record ever listed pages 6-11
  again = grouped(tmp_path, every=3)
  got = again.get(hashes_of(range(12)))
  assert got.found.tolist() == [True] * 6 + [False] * 6
  assert same_bytes({k: v[:6] for k, v in got.arrays.items()}, pages_of(range(6)))


def test_commit_every_errors(tmp_path):
  with pytest.raises(ValueError, match="commit_every must be an int >= 1"):
    StoreConfig(path=str(tmp_path), commit_every=0)
  with pytest.raises(ValueError, match="needs layout='segments' on a local path"):
    StoreConfig(path=str(tmp_path), layout="chunks", commit_every=2)
  with pytest.raises(ValueError, match="needs layout='segments' on a local path"):
    StoreConfig(kvstore={"driver": "memory"}, commit_every=2)
