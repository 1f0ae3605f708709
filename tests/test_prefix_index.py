"""PrefixIndex: agrees with a Python dict under any batched insert/lookup/delete sequence."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine
from hypothesis.stateful import invariant
from hypothesis.stateful import rule

from kvjax.prefix_index import EMPTY
from kvjax.prefix_index import TOMBSTONE
from kvjax.prefix_index import index_counts
from kvjax.prefix_index import index_delete
from kvjax.prefix_index import index_init
from kvjax.prefix_index import index_insert
from kvjax.prefix_index import index_lookup

M32 = 0xFFFFFFFF


def _fmix_py(h):
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & M32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & M32
  return h ^ (h >> 16)


def home_py(key, capacity):
  """Independent spelling of the documented home slot."""
  return _fmix_py(key[0] ^ _fmix_py(key[1])) & (capacity - 1)


def keys_with_home(home, capacity, count, start=1):
  """``count`` distinct keys (k, 7) whose home slot is ``home``."""
  out, k = [], start
  while len(out) < count:
    if home_py((k, 7), capacity) == home:
      out.append((k, 7))
    k += 1
  return out


def table_as_dict(index):
  keys = np.asarray(index.keys)
  values = np.asarray(index.values)
  out = {}
  for slot in np.flatnonzero(values >= 0):
    key = (int(keys[slot, 0]), int(keys[slot, 1]))
    assert key not in out, f"key {key} stored twice"
    out[key] = int(values[slot])
  return out


def check_table_invariants(index):
  """Every live key sits within max_probes of its home with no EMPTY slot on the way."""
  keys = np.asarray(index.keys)
  values = np.asarray(index.values)
  cap, budget = index.capacity, index.max_probes
  assert set(np.unique(values[values < 0]).tolist()) <= {EMPTY, TOMBSTONE}
  assert not keys[values < 0].any(), "EMPTY/TOMBSTONE slots hold key (0, 0)"
  for slot in np.flatnonzero(values >= 0):
    key = (int(keys[slot, 0]), int(keys[slot, 1]))
    assert key != (0, 0)
    dist = (slot - home_py(key, cap)) % cap
    assert dist < budget, f"key {key} at distance {dist} >= max_probes {budget}"
    path = [(home_py(key, cap) + d) % cap for d in range(dist)]
    assert all(values[s] != EMPTY for s in path), f"EMPTY slot on the chain of {key}"


def _arrays(keys, values=None, valid=None):
  h = jnp.asarray(np.array(keys, np.uint32).reshape(-1, 2))
  out = [h]
  if values is not None:
    out.append(jnp.asarray(np.array(values, np.int32)))
  if valid is not None:
    out.append(jnp.asarray(np.array(valid, bool)))
  return out


# ---- property test: a state machine against a dict ---------------------------------------------

BATCH = 6
# A small key pool over a small table, so batches collide, chains form, tombstones pile up
# and the table fills: 10 keys sharing one home slot plus 14 spread ones.
CAP, BUDGET = 16, 4
POOL = keys_with_home(3, CAP, 10) + [(k * 7919 + 1, k) for k in range(14)]

items = st.lists(st.tuples(st.integers(0, len(POOL) - 1), st.integers(0, 50), st.booleans()),
                 min_size=BATCH, max_size=BATCH)


class IndexMachine(RuleBasedStateMachine):

  def __init__(self):
    super().__init__()
    self.index = index_init(CAP, max_probes=BUDGET)
    self.model = {}

  @rule(batch=items)
  def insert(self, batch):
    keys = [POOL[k] for k, _, _ in batch]
    h, v, ok = _arrays(keys, [v for _, v, _ in batch], [ok for _, _, ok in batch])
    self.index, overflow = index_insert(self.index, h, v, ok)
    overflow = np.asarray(overflow).tolist()
    values = np.asarray(self.index.values)
    for key, (_, value, ok), over in zip(keys, batch, overflow):
      if not ok:
        assert not over, "an invalid item reported overflow"
        continue
      if over:
        # justified: the key is absent and its whole probe window is live
        assert key not in self.model
        window = [(home_py(key, CAP) + d) % CAP for d in range(BUDGET)]
        assert all(values[s] >= 0 for s in window), "overflow reported with a free slot"
      else:
        self.model[key] = value
    # all occurrences of one key agree on overflow
    by_key = {}
    for key, (_, _, ok), over in zip(keys, batch, overflow):
      if ok:
        by_key.setdefault(key, set()).add(over)
    assert all(len(s) == 1 for s in by_key.values())

  @rule(batch=items, with_expected=st.booleans())
  def delete(self, batch, with_expected):
    keys = [POOL[k] for k, _, _ in batch]
    h, expected, ok = _arrays(keys, [v for _, v, _ in batch], [ok for _, _, ok in batch])
    self.index = index_delete(self.index, h, ok, expected if with_expected else None)
    before = dict(self.model)
    for key, (_, value, ok) in zip(keys, batch):
      if ok and key in before and (not with_expected or before[key] == value):
        self.model.pop(key, None)

  @rule(batch=items)
  def lookup(self, batch):
    keys = [POOL[k] for k, _, _ in batch]
    h, ok = _arrays(keys, valid=[ok for _, _, ok in batch])
    got = np.asarray(index_lookup(self.index, h, ok)).tolist()
    want = [self.model.get(key, -1) if ok else -1 for key, (_, _, ok) in zip(keys, batch)]
    assert got == want

  @invariant()
  def agrees_with_dict(self):
    assert table_as_dict(self.index) == self.model
    check_table_invariants(self.index)
    h, = _arrays(POOL)
    assert np.asarray(index_lookup(self.index, h)).tolist() == [self.model.get(k, -1) for k in POOL]


IndexMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestIndexAgainstDict = IndexMachine.TestCase


# ---- explicit cases ----------------------------------------------------------------------------

def test_empty_lookup_misses_and_counts():
  index = index_init(8, max_probes=4)
  h, = _arrays([(1, 2), (0, 0), (5, 6)])
  assert index_lookup(index, h).tolist() == [-1, -1, -1]
  assert {k: int(v) for k, v in index_counts(index).items()} == \
      {"live": 0, "tombstones": 0, "empty": 8}


def test_full_table_reports_overflow():
  index = index_init(8, max_probes=8)
  keys = [(k, k + 1) for k in range(1, 10)]
  h, v = _arrays(keys, list(range(9)))
  index, overflow = index_insert(index, h, v)
  overflow = np.asarray(overflow)
  assert overflow.sum() == 1
  stored = table_as_dict(index)
  assert len(stored) == 8
  lost = keys[int(np.flatnonzero(overflow)[0])]
  assert lost not in stored
  assert stored == {k: i for i, k in enumerate(keys) if k != lost}
  # a full table still overwrites existing keys, and reports the new one again
  h2, v2 = _arrays([keys[0] if keys[0] != lost else keys[1], lost], [100, 101])
  index, overflow = index_insert(index, h2, v2)
  assert np.asarray(overflow).tolist() == [False, True]
  assert 100 in table_as_dict(index).values()


def test_probe_budget_overflow_on_a_chain():
  cap, budget = 16, 3
  chain = keys_with_home(5, cap, 4)
  h, v = _arrays(chain, [10, 11, 12, 13])
  index, overflow = index_insert(index_init(cap, max_probes=budget), h, v)
  # lowest batch positions claim first: slots 5, 6, 7; the fourth has no slot within budget
  assert np.asarray(overflow).tolist() == [False, False, False, True]
  assert np.asarray(index.values)[5:8].tolist() == [10, 11, 12]
  assert index_lookup(index, h).tolist() == [10, 11, 12, -1]


def test_batch_collisions_resolved_by_batch_position_and_wrap():
  cap = 16
  chain = keys_with_home(15, cap, 3)  # home is the last slot: the chain wraps to 0, 1
  h, v = _arrays(chain[::-1], [1, 2, 3])
  index, overflow = index_insert(index_init(cap, max_probes=4), h, v)
  assert not np.asarray(overflow).any()
  values = np.asarray(index.values)
  assert [values[15], values[0], values[1]] == [1, 2, 3]
  assert index_lookup(index, h).tolist() == [1, 2, 3]


def test_tombstones_keep_chains_and_are_reused():
  cap = 16
  a, b, c, d = keys_with_home(2, cap, 4)
  index = index_init(cap, max_probes=4)
  index, _ = index_insert(index, *_arrays([a, b, c], [1, 2, 3]))
  index = index_delete(index, *_arrays([b]))
  values = np.asarray(index.values)
  assert values[3] == TOMBSTONE  # slot 4 (c) is live: b's slot must stay passable
  assert index_lookup(index, *_arrays([a, b, c])).tolist() == [1, -1, 3]
  index, overflow = index_insert(index, *_arrays([d], [4]))
  assert not bool(overflow[0]) and np.asarray(index.values)[3] == 4  # tombstone reused
  # deleting the tail of a chain frees its slot outright (the next slot is EMPTY)
  index = index_delete(index, *_arrays([c]))
  assert np.asarray(index.values)[4] == EMPTY
  assert index_lookup(index, *_arrays([a, d, c])).tolist() == [1, 4, -1]


def test_insert_existing_key_past_a_tombstone_overwrites_in_place():
  cap = 16
  a, b = keys_with_home(9, cap, 2)
  index, _ = index_insert(index_init(cap, max_probes=4), *_arrays([a, b], [1, 2]))
  index = index_delete(index, *_arrays([a]))  # slot 9 becomes a tombstone, b stays in 10
  index, _ = index_insert(index, *_arrays([b], [7]))
  assert table_as_dict(index) == {b: 7}
  values = np.asarray(index.values)
  assert values[9] == TOMBSTONE and values[10] == 7  # not a second copy in the tombstone


def test_duplicates_last_valid_wins():
  index = index_init(16, max_probes=4)
  h, v, ok = _arrays([(1, 1), (2, 2), (1, 1), (1, 1), (2, 2)], [10, 20, 11, 12, 21],
                     [True, True, True, False, True])
  index, overflow = index_insert(index, h, v, ok)
  assert table_as_dict(index) == {(1, 1): 11, (2, 2): 21}
  assert not np.asarray(overflow).any()


def test_reserved_key_and_negative_values_ignored():
  index = index_init(8, max_probes=4)
  h, v = _arrays([(0, 0), (1, 0), (0, 1)], [5, -3, 6])
  index, overflow = index_insert(index, h, v)
  assert table_as_dict(index) == {(0, 1): 6}
  assert not np.asarray(overflow).any()
  assert index_lookup(index, h).tolist() == [-1, -1, 6]


def test_delete_with_expected_value():
  index, _ = index_insert(index_init(8), *_arrays([(1, 2), (3, 4)], [5, 6]))
  index = index_delete(index, *_arrays([(1, 2), (3, 4)]), expected=jnp.array([9, 6], jnp.int32))
  assert table_as_dict(index) == {(1, 2): 5}


def test_jit_no_recompile_and_pytree():
  index = index_init(32, max_probes=8)
  h, v = _arrays([(i, 3) for i in range(1, 5)], [1, 2, 3, 4])
  index, _ = index_insert(index, h, v)
  before = index_insert._cache_size()
  index, _ = index_insert(index, h + 10, v)
  assert index_insert._cache_size() == before
  leaves, treedef = jax.tree_util.tree_flatten(index)
  assert len(leaves) == 2
  assert jax.tree_util.tree_unflatten(treedef, leaves).max_probes == 8


def test_bad_arguments_raise():
  for cap in (0, 3, 12, -4, 2.0):
    with pytest.raises(ValueError, match="capacity"):
      index_init(cap)
  with pytest.raises(ValueError, match="max_probes"):
    index_init(8, max_probes=9)
  index = index_init(8)
  with pytest.raises(ValueError, match="hashes"):
    index_lookup(index, jnp.zeros((4, 3), jnp.uint32))
  with pytest.raises(ValueError, match="values"):
    index_insert(index, jnp.ones((4, 2), jnp.uint32), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="valid"):
    index_delete(index, jnp.ones((4, 2), jnp.uint32), jnp.ones((5,), bool))
