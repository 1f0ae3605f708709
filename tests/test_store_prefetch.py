"""Prefetcher: what each policy hands over, the bounded buffer, and its counters, with a
store whose reads wait on a gate (so "in flight" is a state the test controls)."""

import threading
import time

import numpy as np
import pytest

from kvjax.store import BlockStore
from kvjax.store import Prefetcher
from kvjax.store import PrefetchPolicy
from kvjax.store import StoreConfig
from test_store import FMT
from test_store import hashes_of
from test_store import info_of
from test_store import pages_of
from test_store import same_bytes


class GatedStore:
  """A BlockStore (in memory) whose ``get`` blocks until ``gate`` is set."""

  def __init__(self, ids):
    self.inner = BlockStore(StoreConfig(kvstore={"driver": "memory"}, capacity=32), FMT)
    self.inner.put(hashes_of(ids), pages_of(ids), info_of(ids))
    self.format = self.inner.format
    self.gate = threading.Event()
    self.gets = 0

  def get(self, hashes):
    self.gate.wait()
    self.gets += 1
    return self.inner.get(hashes)


def wait_idle(pf):
  for _ in range(2000):
    if pf.stats()["in_flight"] == 0:
      return
    time.sleep(0.001)
  raise AssertionError("reads still in flight")


def test_wait_complete_hands_over_exactly_the_stored_pages():
  store = GatedStore(range(6))
  store.gate.set()
  with Prefetcher(store, workers=2, capacity=16, batch=2) as pf:
    assert pf.issue(hashes_of([0, 1, 2, 3, 9])) == 5
    assert pf.issue(hashes_of([1, 2])) == 0             # already in the buffer
    r = pf.take(hashes_of([3, 9, 0, 7]), PrefetchPolicy("wait_complete"))
    assert r.found.tolist() == [True, False, True, False]
    assert same_bytes({k: a[[0, 2]] for k, a in r.arrays.items()}, pages_of([3, 0]))
    np.testing.assert_array_equal(r.info.tokens[[0, 2]], info_of([3, 0]).tokens)
    s = pf.stats()
    assert (s["issued"], s["used"], s["prefetch_misses"], s["unissued"]) == (5, 2, 1, 1)
    assert store.gets == 3   # batches of 2
  s = pf.stats()
  assert s["wasted"] == 2 and s["wasted_bytes"] == 2 * FMT.page_bytes   # 1, 2 never taken
  assert s["buffered"] == 0


@pytest.mark.parametrize("mode", ["best_effort", "timeout"])
def test_pages_in_flight_are_late_and_abandoned(mode):
  store = GatedStore(range(4))
  pf = Prefetcher(store, workers=1, capacity=8, batch=4)
  pf.issue(hashes_of(range(4)))
  t0 = time.perf_counter()
  r = pf.take(hashes_of([0, 1]), PrefetchPolicy(mode, timeout_s=0.05))
  waited = time.perf_counter() - t0
  assert not r.found.any()
  assert waited >= 0.05 if mode == "timeout" else waited < 0.05
  store.gate.set()
  wait_idle(pf)
  r = pf.take(hashes_of([2, 3, 0]), PrefetchPolicy(mode))
  assert r.found.tolist() == [True, True, False]        # 0 was abandoned by the first take
  s = pf.stats()
  assert (s["late"], s["used"], s["wasted"], s["unissued"]) == (2, 2, 2, 1)
  pf.close()


def test_the_buffer_is_bounded():
  store = GatedStore(range(8))
  store.gate.set()
  pf = Prefetcher(store, workers=1, capacity=4, batch=1)
  pf.issue(hashes_of(range(4)))
  wait_idle(pf)
  assert pf.issue(hashes_of([4, 5])) == 2               # drops the two oldest staged: 0, 1
  wait_idle(pf)
  r = pf.take(hashes_of(range(6)), PrefetchPolicy("wait_complete"))
  assert r.found.tolist() == [False, False, True, True, True, True]
  store.gate.clear()
  pf.issue(hashes_of(range(4)))                         # all four in flight: the buffer is full
  assert pf.issue(hashes_of([6, 7])) == 0 and pf.stats()["skipped"] == 2
  store.gate.set()
  pf.close()
  s = pf.stats()
  assert (s["issued"], s["used"], s["wasted"]) == (10, 4, 6)
  assert s["accuracy"] == pytest.approx(0.4)


def test_argument_errors():
  with pytest.raises(ValueError, match="mode"):
    PrefetchPolicy("eager")
  with pytest.raises(ValueError, match="capacity"):
    Prefetcher(GatedStore([]), capacity=0)
