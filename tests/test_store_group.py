"""Group commit (``StoreConfig.commit_every``): a crash loses at most the last group's puts and
never lists a page whose bytes were not made durable; a full store behaves page for page as
the default store (an OrderedDict LRU model); a failed group fsync unlists the whole group."""

import collections
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from kvjax.store import BlockStore
from kvjax.store import StoreConfig
from kvjax.store import StoreWriteError
from kvjax.store.segments import PosixSegments
from kvjax.store.store import GROUP_COMMIT
from test_store import FMT
from test_store import hashes_of
from test_store import lru_put
from test_store import pages_of
from test_store import same_bytes


OPENED = []   # the stores a test opened (their timers are cancelled when it ends)


def grouped(path, capacity=64, every=4, sync=True, commit_seconds=600.0, **kw):
  """A grouped store. The timer waits ``commit_seconds`` (long here: a test that abandons a
  store as a crash must not see its timer commit first on a slow machine)."""
  store = BlockStore(StoreConfig(path=str(path), capacity=capacity, sync=sync,
                                 commit_every=every, commit_seconds=commit_seconds, **kw), FMT)
  OPENED.append(store)
  return store


@pytest.fixture(autouse=True)
def _no_timer_outlives_its_test():
  """An abandoned store stands for a crashed process: its pending timer never fires."""
  yield
  while OPENED:
    # the store's own reset after a commit: timer cancelled, not committed at exit either
    # (its changes stay in memory only, as a crashed process's)
    OPENED.pop()._committed()


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
  store.abandon()
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
  store.abandon()   # a crash after the flush
  again = grouped(tmp_path)
  assert again.get(hashes_of([1, 2])).found.all()


def test_the_nth_put_commits_the_group_and_a_restart_reads_it_back(tmp_path):
  store = grouped(tmp_path)
  for b in range(6):
    ids = list(range(4 * b, 4 * b + 4))
    store.put(hashes_of(ids), pages_of(ids))
  assert records(store) == 1   # puts 1-4; puts 5 and 6 are pending
  store.abandon()   # a crash now
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
  store.abandon()
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
  with pytest.raises(ValueError, match="commit_seconds must be a number > 0"):
    StoreConfig(path=str(tmp_path), commit_seconds=0)


def test_the_default_groups_on_a_local_path_only(tmp_path):
  assert StoreConfig(path=str(tmp_path)).commit_every == GROUP_COMMIT > 1
  assert StoreConfig(path=str(tmp_path), layout="chunks").commit_every == 1
  assert StoreConfig(kvstore={"driver": "memory"}).commit_every == 1


def wait_for(cond, seconds=10.0):
  end = time.monotonic() + seconds
  while not cond() and time.monotonic() < end:
    time.sleep(0.01)
  return cond()


def test_a_group_that_does_not_fill_commits_after_commit_seconds(tmp_path):
  store = grouped(tmp_path, every=100, commit_seconds=2.0)
  store.put(hashes_of([1, 2]), pages_of([1, 2]))
  assert records(store) == 0
  assert wait_for(lambda: records(store) == 1)   # the timer committed the pair
  store.put(hashes_of([3]), pages_of([3]))       # a new group arms a new timer
  assert wait_for(lambda: records(store) == 2)
  assert store._timer is None and not store._puts_pending   # nothing armed for no group
  store.abandon()                                # a crash
  crashed = grouped(tmp_path, every=100)
  got = crashed.get(hashes_of([1, 2, 3]))
  assert got.found.all() and same_bytes(got.arrays, pages_of([1, 2, 3]))


def test_timed_commits_snapshot_the_index(tmp_path):
  # puts that never fill a group: every commit is the timer's, and the journal is still
  # folded into snapshots every snapshot_every records (not only at close)
  store = grouped(tmp_path, every=100, commit_seconds=0.05, snapshot_every=2)
  for i in range(3):
    store.put(hashes_of([i]), pages_of([i]))
    assert wait_for(lambda: not store._puts_pending)
  assert store.index.journal_since_snapshot < 2
  assert any(n.startswith("snapshot-") for n in os.listdir(tmp_path / "index"))
  store.abandon()   # a crash: the timed commits are what a restart has
  assert grouped(tmp_path, every=100).contains(hashes_of(range(3))).all()


def test_flush_and_close_disarm_the_timer(tmp_path):
  store = grouped(tmp_path, every=100)
  store.put(hashes_of([1]), pages_of([1]))
  timer = store._timer
  store.flush()
  assert records(store) == 1 and store._timer is None and timer.finished.is_set()
  store.put(hashes_of([2]), pages_of([2]))
  timer = store._timer
  store.close()   # commits (a snapshot) and disarms: the timer never runs
  assert store._timer is None and timer.finished.is_set()
  assert grouped(tmp_path, every=100).contains(hashes_of([1, 2])).all()


def test_a_failed_timed_commit_unlists_its_group_and_refuses_later_puts(tmp_path):
  store = grouped(tmp_path, every=100, commit_seconds=0.1)
  store.put(hashes_of([0, 1]), pages_of([0, 1]))
  store.flush()                                  # 0 and 1 durable
  def broken():
    raise OSError(5, "Input/output error")
  store.segments.sync_deferred = broken
  store.put(hashes_of([2, 3]), pages_of([2, 3]))
  assert wait_for(lambda: store.stats()["write_errors"] == 1)
  assert store.contains(hashes_of([0, 1, 2, 3])).tolist() == [True, True, False, False]
  assert not store.put(hashes_of([4]), pages_of([4])).any()   # writing is off
  store.abandon()
  again = grouped(tmp_path, every=100)
  assert again.contains(hashes_of([0, 1, 2, 3])).tolist() == [True, True, False, False]


EXIT_WITHOUT_CLOSE = r"""
import sys
sys.path.insert(0, sys.argv[1])
from test_store import hashes_of, pages_of
from test_store_group import grouped
# no timer fires before the exit: the atexit hook commits the group
grouped(sys.argv[2], every=100, commit_seconds=600).put(hashes_of([5, 6]), pages_of([5, 6]))
"""


def test_a_process_that_exits_without_close_keeps_its_group(tmp_path):
  tests = str(pathlib.Path(__file__).resolve().parent)
  subprocess.run([sys.executable, "-c", EXIT_WITHOUT_CLOSE, tests, str(tmp_path)], check=True,
                 timeout=120)
  got = grouped(tmp_path, every=100).get(hashes_of([5, 6]))
  assert got.found.all() and same_bytes(got.arrays, pages_of([5, 6]))
