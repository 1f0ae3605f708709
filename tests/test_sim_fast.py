"""The simulator's fast paths: sampled eviction, vmapped sweeps, ARC, ``replay --param``."""

import collections

import numpy as np
import pytest

from kvjax.policies import make_params
from kvjax.sim import simulator, traces

CAPS = [40, 90]


@pytest.fixture(scope="module")
def trace():
  return traces.generate(300, seed=3)


@pytest.mark.parametrize("policy", ["lfu", "s3fifo"])
def test_sampled_with_every_page_equals_scoring_path(trace, policy):
  full = simulator.simulate_hits(trace, CAPS, policy, path="scoring")
  sampled = simulator.simulate_hits(trace, CAPS, policy, sample=max(CAPS))
  assert (full == sampled).all()


def py_lru(refs, capacity):
  cache, hits = collections.OrderedDict(), []
  for b in refs:
    hits.append(b in cache)
    if b in cache:
      cache.move_to_end(b)
      continue
    if len(cache) >= capacity:
      cache.popitem(last=False)
    cache[b] = None
  return np.array(hits)


def test_sampled_lru_is_close_to_exact_and_reproducible(trace):
  a = simulator.simulate_hits(trace, CAPS, "lru", sample=16, seed=1)
  b = simulator.simulate_hits(trace, CAPS, "lru", sample=16, seed=1)
  c = simulator.simulate_hits(trace, CAPS, "lru", sample=16, seed=2)
  assert (a == b).all()
  assert (a != c).any()
  for row, cap in zip(a, CAPS):
    exact = py_lru(trace.block.tolist(), cap)
    assert (row != exact).any()  # sampled: not LRU itself
    assert abs(row.mean() - exact.mean()) < 0.015


def test_sampled_vmapped_sweep_equals_single_runs(trace):
  ps = [make_params("lfu", half_life=50.0), make_params("lfu", half_life=5000.0)]
  both = simulator.simulate_hits(trace, [90, 90], "lfu", ps, sample=8)
  for p, h in zip(ps, both):
    assert (simulator.simulate_hits(trace, 90, "lfu", p, sample=8) == h).all()
  assert (both[0] != both[1]).any()


def test_sweep_grid_equals_single_runs(trace):
  grid = [{"half_life": 50.0}, {"half_life": 5000.0}]
  out = simulator.sweep(trace, CAPS, "lfu", grid, sample=8)
  assert out.shape == (len(grid), len(CAPS), trace.num_refs)
  for i, g in enumerate(grid):
    for j, c in enumerate(CAPS):
      one = simulator.simulate_hits(trace, c, "lfu", make_params("lfu", **g), sample=8)
      assert (out[i, j] == one).all()


@pytest.mark.parametrize("kwargs, match", [({"sample": 0}, "sample"),
                                           ({"sample": 4, "path": "scoring"}, "sampled"),
                                           ({"path": "sampled"}, "needs sample")])
def test_sampled_bad_arguments(trace, kwargs, match):
  with pytest.raises(ValueError, match=match):
    simulator.simulate_hits(trace, 8, "lfu", **kwargs)
