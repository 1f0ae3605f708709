"""The jitted simulator against plain-Python caches written here, on generated and real traces."""

import collections
import heapq
import json
import math
import os

import numpy as np
import pytest

from kvjax.policies import make_params
from kvjax.sim import simulator, traces

REAL = traces.default_trace_path("conversation_trace.jsonl")


# ---------------------------------------------------------------- plain-Python references


def py_next_uses(refs):
  """Index of each reference's next reference to the same block (math.inf = never)."""
  nxt, seen = [math.inf] * len(refs), {}
  for i in range(len(refs) - 1, -1, -1):
    nxt[i] = seen.get(refs[i], math.inf)
    seen[refs[i]] = i
  return nxt


def py_lru(refs, capacity):
  cache, hits = collections.OrderedDict(), []
  for b in refs:
    if b in cache:
      cache.move_to_end(b)
      hits.append(True)
      continue
    hits.append(False)
    if len(cache) >= capacity:
      cache.popitem(last=False)
    cache[b] = None
  return hits


def py_fifo(refs, capacity):
  cache, order, hits = set(), collections.deque(), []
  for b in refs:
    hits.append(b in cache)
    if b in cache:
      continue
    if len(cache) >= capacity:
      cache.discard(order.popleft())
    cache.add(b)
    order.append(b)
  return hits


def py_min(refs, capacity, bypass=False):
  """Belady's MIN with a max-heap of next uses (lazy deletion)."""
  nxt = py_next_uses(refs)
  cache, heap, hits = {}, [], []
  for i, b in enumerate(refs):
    if b in cache:
      hits.append(True)
      cache[b] = nxt[i]
      heapq.heappush(heap, (-nxt[i], b))
      continue
    hits.append(False)
    if len(cache) >= capacity:
      while True:  # drop stale heap entries
        neg, victim = heap[0]
        if victim in cache and cache[victim] == -neg:
          break
        heapq.heappop(heap)
      if bypass and nxt[i] >= -heap[0][0]:
        continue
      heapq.heappop(heap)
      del cache[victim]
    cache[b] = nxt[i]
    heapq.heappush(heap, (-nxt[i], b))
  return hits


def py_prefix(requests, hits):
  """Hits counted only in the leading run of cached blocks of each request."""
  out, i = [], 0
  for hs in requests:
    run = True
    for _ in hs:
      run = run and hits[i]
      out.append(run)
      i += 1
  return out


# ---------------------------------------------------------------- generated traces

REFERENCES = {"lru": py_lru, "fifo": py_fifo, "min": py_min,
              "min-bypass": lambda r, c: py_min(r, c, bypass=True)}


@pytest.fixture(scope="module")
def small_trace():
  return traces.generate(300, seed=3)


@pytest.mark.parametrize("policy", sorted(REFERENCES))
def test_simulator_equals_python_on_generated_traces(small_trace, policy):
  refs = small_trace.block.tolist()
  caps = [1, 7, 64, 400]
  hits = simulator.simulate_hits(small_trace, caps, policy, path="scoring")
  for c, h in zip(caps, hits):
    assert h.tolist() == REFERENCES[policy](refs, c), (policy, c)


@pytest.mark.parametrize("policy", ["lru", "fifo"])
@pytest.mark.parametrize("seed", [3, 8])
def test_exact_path_equals_python_and_scoring_path(policy, seed):
  t = traces.generate(250, seed=seed, num_prompts=6)
  refs = t.block.tolist()
  caps = [1, 2, 5, 33, 128, 1000]
  exact = simulator.simulate_hits(t, caps, policy, path="exact")
  for c, h in zip(caps, exact):
    assert h.tolist() == REFERENCES[policy](refs, c), (policy, c)
  assert (simulator.simulate_hits(t, caps[2:4], policy, path="scoring") == exact[2:4]).all()
  assert (simulator.simulate_hits(t, caps, policy) == exact).all()  # "auto" takes it


def test_exact_path_refuses_other_policies_and_bad_path(small_trace):
  with pytest.raises(ValueError, match="exact"):
    simulator.simulate_hits(small_trace, 8, "lfu", path="exact")
  with pytest.raises(ValueError, match="path"):
    simulator.simulate_hits(small_trace, 8, "lru", path="fast")


def test_min_bounds_lru_and_bypass_bounds_min(small_trace):
  caps = [16, 128]
  r = {p: simulator.simulate(small_trace, caps, p) for p in ("lru", "min", "min-bypass")}
  for c in caps:
    assert r["lru"][c] <= r["min"][c] <= r["min-bypass"][c]


def test_other_seed_and_prefix_accounting():
  t = traces.generate(200, seed=11, num_prompts=5)
  requests = [t.block[t.request == i].tolist() for i in range(t.num_requests)]
  refs = t.block.tolist()
  for c in (9, 50):
    h = py_lru(refs, c)
    got = simulator.simulate(t, [c], "lru", accounting="prefix")[c]
    assert got == np.mean(py_prefix(requests, h))
    assert simulator.simulate(t, c, "lru")[c] == np.mean(h)


def test_vmap_over_capacities_equals_single_runs(small_trace):
  both = simulator.simulate_hits(small_trace, [20, 90], "s3fifo")
  one = simulator.simulate_hits(small_trace, 20, "s3fifo")
  assert (both[0] == one).all()


def test_vmap_over_params_equals_single_runs(small_trace):
  ps = [make_params("lfu", half_life=50.0), make_params("lfu", half_life=5000.0)]
  both = simulator.simulate_hits(small_trace, [32, 32], "lfu", ps)
  for p, h in zip(ps, both):
    assert (simulator.simulate_hits(small_trace, 32, "lfu", p) == h).all()


@pytest.mark.parametrize("cap", [0, -3, 2.5, True])
def test_bad_capacity_raises(small_trace, cap):
  with pytest.raises(ValueError, match="capacity"):
    simulator.simulate(small_trace, [cap], "lru")


def test_bad_accounting_raises(small_trace):
  with pytest.raises(ValueError, match="accounting"):
    simulator.simulate(small_trace, [4], "lru", accounting="tokens")


def test_generated_trace_is_seeded():
  a, b, c = traces.generate(100, seed=5), traces.generate(100, seed=5), traces.generate(100, seed=6)
  assert (a.block == b.block).all() and (a.filled == b.filled).all()
  assert a.block.tolist() != c.block.tolist()


def test_partial_last_block_and_next_use():
  t = traces.from_requests([[1, 2, 3], [1, 2]], [1100, 1024])
  assert t.filled.tolist() == [512, 512, 76, 512, 512]
  nxt = py_next_uses(t.block.tolist())
  assert [x if x != math.inf else -1 for x in nxt] == [
      x if x < 2**30 else -1 for x in t.next_use.tolist()]


# ---------------------------------------------------------------- loader


def _write(tmp_path, lines):
  p = tmp_path / "t.jsonl"
  p.write_text("\n".join(lines) + "\n")
  return str(p)


def test_loader_reads_mooncake_lines(tmp_path):
  recs = [{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]},
          {"timestamp": 3, "input_length": 512, "output_length": 1, "hash_ids": [0]}]
  t = traces.load_mooncake(_write(tmp_path, [json.dumps(r) for r in recs]))
  assert t.block.tolist() == [0, 1, 2, 0]
  assert t.timestamp.tolist() == [0, 3] and t.output_length.tolist() == [5, 1]


@pytest.mark.parametrize("bad,match", [
    ('{"timestamp": 0, "input_length": 10', "malformed JSON"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "hash_ids"),
    ('{"timestamp": 0, "input_length": -1, "output_length": 1, "hash_ids": []}', "input_length"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": ["a"]}', "hash_ids"),
    ('{"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [1]}', "len"),
    ('[1, 2]', "JSON object"),
])
def test_loader_names_file_and_line(tmp_path, bad, match):
  good = '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [4]}'
  path = _write(tmp_path, [good, good, bad])
  with pytest.raises(ValueError, match=match) as e:
    traces.load_mooncake(path)
  assert f"{path}:3" in str(e.value)


# ---------------------------------------------------------------- the real trace


@pytest.fixture(scope="module")
def real_trace():
  if not os.path.exists(REAL):
    pytest.skip(f"real trace not present at {REAL}")
  return traces.load_mooncake(REAL)


def test_real_trace_lru_and_min_equal_python_and_published(real_trace):
  refs = real_trace.block.tolist()
  lru_hits = simulator.simulate_hits(real_trace, [1024, 6144], "lru", path="exact")[1]
  py_hits = py_lru(refs, 6144)
  assert lru_hits.tolist() == py_hits
  # the generic scoring path (a scan over the refs: 24 s for the whole trace) on a prefix
  head = real_trace.slice_requests(0, 2500)
  assert (simulator.simulate_hits(head, 1024, "lru", path="scoring").tolist()
          == py_lru(head.block.tolist(), 1024))
  # MIN runs the scoring path too (22 s for the whole trace): the simulator against the Python
  # Belady on the prefix, the Python Belady against the published figure on the whole trace
  assert (simulator.simulate_hits(head, 1024, "min").tolist()
          == py_min(head.block.tolist(), 1024))
  mn = float(np.mean(py_min(refs, 6144)))
  lru = float(lru_hits.mean())
  assert round(lru, 3) == 0.141 and round(mn, 3) == 0.357  # SOURCES.md, block-level table
  starts = np.flatnonzero(real_trace.position == 0).tolist() + [len(refs)]
  requests = [refs[a:b] for a, b in zip(starts[:-1], starts[1:])]
  assert simulator.hit_ratio(real_trace, lru_hits, "prefix") == np.mean(py_prefix(requests, py_hits))


def test_autofreq_vmap_exact_and_close_to_lru_or_better(small_trace):
  t = small_trace.slice_requests(0, 150)
  both = simulator.simulate_hits(t, [24, 160], "autofreq")
  assert (simulator.simulate_hits(t, 24, "autofreq") == both[0]).all()
  lru = simulator.simulate_hits(t, [24, 160], "lru").mean(axis=1)
  assert (both.mean(axis=1) >= lru - 0.02).all()  # the "2 points below LRU" bound


@pytest.mark.parametrize("name", ["classfreq", "autoclass"])
def test_classfreq_vmap_exact_and_close_to_lru_or_better(small_trace, name):
  t = small_trace.slice_requests(0, 150)
  both = simulator.simulate_hits(t, [24, 160], name)
  assert (simulator.simulate_hits(t, 24, name) == both[0]).all()  # padded run == unpadded
  lru = simulator.simulate_hits(t, [24, 160], "lru").mean(axis=1)
  assert (both.mean(axis=1) >= lru - 0.02).all()
