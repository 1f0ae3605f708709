"""The simulator's fast paths: sampled eviction, vmapped sweeps, ARC, ``replay --param``."""

import collections

import jax.numpy as jnp
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


def test_sampled_scores_are_told_the_runs_pool_size(trace):
  """On the sampled path a score sees K candidate pages; ``pool_pages`` must still be the
  run's capacity. A probe policy scores like LRU when it is (its ``cap`` parameter) and
  like MRU otherwise: its hits must be sampled LRU's, run by run, in a vmapped pair."""
  from kvjax import policies as pol
  from kvjax.policies.scoring import age, finalize, pool_pages

  def score(state, meta, clock, params):
    a = age(meta, clock)
    told = pool_pages(meta, params) == params["cap"].astype(jnp.int32)
    return finalize(jnp.where(told, a, -a), meta)

  probe = pol.register(pol.Policy(name="test-pool-probe", init=pol.no_state, score=score,
                                  update=pol.no_update, defaults={"cap": 0.0},
                                  bounds={"cap": pol.Bound(0.0, 1e6)}))
  try:
    ps = [make_params(probe, cap=float(c)) for c in CAPS]
    got = simulator.simulate_hits(trace, CAPS, probe.name, ps, sample=8)
    want = simulator.simulate_hits(trace, CAPS, "lru", sample=8)
    np.testing.assert_array_equal(got, want)
    wrong = simulator.simulate_hits(trace, CAPS, probe.name,
                                    [make_params(probe, cap=8.0)] * 2, sample=8)
    assert (wrong != want).any()   # told the sample's size, it would score as MRU
  finally:
    pol.POLICIES.pop(probe.name)


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


# ---------------------------------------------------------------- ARC


def py_arc(refs, c, partial=None):
  """ARC from the paper's pseudocode, with plain lists (MRU at the end), O(c) a step;
  with ``partial``, a partial block that is not in T1/T2 is a miss that changes nothing."""
  t1, t2, b1, b2, p, hits = [], [], [], [], 0.0, []
  partial = partial or [False] * len(refs)

  def replace(x_in_b2):
    if len(t1) >= 1 and ((x_in_b2 and len(t1) == p) or len(t1) > p):
      b1.append(t1.pop(0))
    else:
      b2.append(t2.pop(0))

  for x, part in zip(refs, partial):
    if x in t1 or x in t2:
      (t1 if x in t1 else t2).remove(x)
      t2.append(x)
      hits.append(True)
      continue
    hits.append(False)
    if part:
      continue
    if x in b1:
      p = min(c, p + max(len(b2) / len(b1), 1))
      replace(False)
      b1.remove(x)
      t2.append(x)
    elif x in b2:
      p = max(0, p - max(len(b1) / len(b2), 1))
      replace(True)
      b2.remove(x)
      t2.append(x)
    else:
      if len(t1) + len(b1) == c:
        if len(t1) < c:
          b1.pop(0)
          replace(False)
        else:
          t1.pop(0)
      elif len(t1) + len(t2) + len(b1) + len(b2) >= c:
        if len(t1) + len(t2) + len(b1) + len(b2) == 2 * c:
          b2.pop(0)
        replace(False)
      t1.append(x)
  return np.array(hits)


def test_arc_equals_python_reference_hit_for_hit(trace):
  refs = trace.block.tolist()
  hits = simulator.simulate_hits(trace, CAPS, "arc")
  for row, c in zip(hits, CAPS):
    assert (row == py_arc(refs, c)).all()
  # a hot set seen twice a round between scans: LRU loses it every round, ARC keeps it
  refs = []
  for r in range(30):
    refs += [0, 1, 2, 3, 0, 1, 2, 3] + list(range(100 + 6 * r, 106 + 6 * r))
  arc = simulator.simulate_hits(traces.from_requests([refs], [512 * len(refs)]), 8, "arc")
  assert (arc == py_arc(traces.from_requests([refs], [512 * len(refs)]).block.tolist(), 8)).all()
  assert arc.mean() > py_lru(refs, 8).mean() + 0.1


def test_arc_scan_equals_list_reference_with_and_without_bypass():
  t = traces.generate(120, seed=8)
  refs, part = t.block.tolist(), (t.filled < t.block_size).tolist()
  caps = [6, 30, 70]
  scan = simulator.simulate_hits(t, caps, "arc", path="exact")  # the jitted, vmapped scan
  scan_b = simulator.simulate_hits(t, caps, "arc-bypass", path="exact")
  host_b = simulator.simulate_hits(t, caps, "arc-bypass")
  for j, c in enumerate(caps):
    assert (scan[j] == py_arc(refs, c)).all()
    want = py_arc(refs, c, part)
    assert (scan_b[j] == want).all() and (host_b[j] == want).all()
  assert not scan_b[:, np.array(part)].any()  # a bypassed partial block never hits here
  assert (scan_b != scan).any()


def test_arc_bounded_by_min_and_refuses_params(trace):
  arc = simulator.simulate_hits(trace, CAPS, "arc").mean(axis=1)
  mn = simulator.simulate_hits(trace, CAPS, "min").mean(axis=1)
  assert (arc <= mn).all()
  with pytest.raises(ValueError, match="exact paths only"):
    simulator.simulate_hits(trace, 8, "arc", sample=4)
