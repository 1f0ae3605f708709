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

from hash_reference import fmix_py
from kvjax.hashing import block_hash
from kvjax.hashing import chain_hashes
from kvjax.hashing import namespace_seed
from kvjax.prefix_index import EMPTY
from kvjax.prefix_index import TOMBSTONE
from kvjax.prefix_index import index_counts
from kvjax.prefix_index import index_delete
from kvjax.prefix_index import index_init
from kvjax.prefix_index import index_insert
from kvjax.prefix_index import index_lookup
from kvjax.prefix_index import index_rebuild
from kvjax.prefix_index import match_prefix



def home_py(key, capacity):
  """Independent spelling of the documented home slot."""
  return fmix_py(key[0] ^ fmix_py(key[1])) & (capacity - 1)


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


PAD = 32  # every batch is padded to this size (key (0, 0) is never stored): one compile per table


def _pad(keys, values=None, valid=None):
  n = len(keys)
  assert n <= PAD
  h = np.zeros((PAD, 2), np.uint32)
  v = np.full((PAD,), -1, np.int32)
  ok = np.zeros((PAD,), bool)
  if n:
    h[:n] = np.array(keys, np.uint32).reshape(n, 2)
    v[:n] = values if values is not None else -1
    ok[:n] = True if valid is None else valid
  return n, jnp.asarray(h), jnp.asarray(v), jnp.asarray(ok)


def ins(index, keys, values, valid=None):
  """index_insert on a padded batch: (index, overflow as a list)."""
  n, h, v, ok = _pad(keys, values, valid)
  index, overflow = index_insert(index, h, v, ok)
  return index, np.asarray(overflow)[:n].tolist()


def look(index, keys, valid=None):
  n, h, _, ok = _pad(keys, None, valid)
  return np.asarray(index_lookup(index, h, ok))[:n].tolist()


def dele(index, keys, valid=None, expected=None):
  n, h, v, ok = _pad(keys, expected, valid)
  return index_delete(index, h, ok, None if expected is None else v)


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
    self.index, overflow = ins(self.index, keys, [v for _, v, _ in batch],
                               [ok for _, _, ok in batch])
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
    self.index = dele(self.index, keys, [ok for _, _, ok in batch],
                      [v for _, v, _ in batch] if with_expected else None)
    before = dict(self.model)
    for key, (_, value, ok) in zip(keys, batch):
      if ok and key in before and (not with_expected or before[key] == value):
        self.model.pop(key, None)

  @rule(batch=items)
  def lookup(self, batch):
    keys = [POOL[k] for k, _, _ in batch]
    got = look(self.index, keys, [ok for _, _, ok in batch])
    want = [self.model.get(key, -1) if ok else -1 for key, (_, _, ok) in zip(keys, batch)]
    assert got == want

  @rule()
  def rebuild(self):
    self.index, _ = index_rebuild(self.index)  # rebuilt or refused, the entries stay

  @invariant()
  def agrees_with_dict(self):
    assert table_as_dict(self.index) == self.model
    check_table_invariants(self.index)
    assert look(self.index, POOL) == [self.model.get(k, -1) for k in POOL]


IndexMachine.TestCase.settings = settings(
    max_examples=20, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestIndexAgainstDict = IndexMachine.TestCase


# ---- explicit cases ----------------------------------------------------------------------------

def test_empty_lookup_misses_and_counts():
  index = index_init(CAP, max_probes=BUDGET)
  assert look(index, [(1, 2), (0, 0), (5, 6)]) == [-1, -1, -1]
  assert {k: int(v) for k, v in index_counts(index).items()} == \
      {"live": 0, "tombstones": 0, "empty": CAP}


def test_full_table_reports_overflow():
  index = index_init(8, max_probes=8)
  keys = [(k, k + 1) for k in range(1, 10)]
  index, overflow = ins(index, keys, list(range(9)))
  overflow = np.asarray(overflow)
  assert overflow.sum() == 1
  stored = table_as_dict(index)
  assert len(stored) == 8
  lost = keys[int(np.flatnonzero(overflow)[0])]
  assert lost not in stored
  assert stored == {k: i for i, k in enumerate(keys) if k != lost}
  # a full table still overwrites existing keys, and reports the new one again
  index, overflow = ins(index, [keys[0] if keys[0] != lost else keys[1], lost], [100, 101])
  assert overflow == [False, True]
  assert 100 in table_as_dict(index).values()


def test_probe_budget_overflow_on_a_chain():
  cap, budget = 16, 4
  chain = keys_with_home(5, cap, 5)
  index, overflow = ins(index_init(cap, max_probes=budget), chain, [10, 11, 12, 13, 14])
  # lowest batch positions claim first: slots 5..8; the fifth has no slot within budget
  assert overflow == [False, False, False, False, True]
  assert np.asarray(index.values)[5:9].tolist() == [10, 11, 12, 13]
  assert look(index, chain) == [10, 11, 12, 13, -1]


def test_batch_collisions_resolved_by_batch_position_and_wrap():
  cap = 16
  chain = keys_with_home(15, cap, 3)  # home is the last slot: the chain wraps to 0, 1
  index, overflow = ins(index_init(cap, max_probes=4), chain[::-1], [1, 2, 3])
  assert not any(overflow)
  values = np.asarray(index.values)
  assert [values[15], values[0], values[1]] == [1, 2, 3]
  assert look(index, chain[::-1]) == [1, 2, 3]


def test_tombstones_keep_chains_and_are_reused():
  cap = 16
  a, b, c, d = keys_with_home(2, cap, 4)
  index = index_init(cap, max_probes=4)
  index, _ = ins(index, [a, b, c], [1, 2, 3])
  index = dele(index, [b])
  values = np.asarray(index.values)
  assert values[3] == TOMBSTONE  # slot 4 (c) is live: b's slot must stay passable
  assert look(index, [a, b, c]) == [1, -1, 3]
  index, overflow = ins(index, [d], [4])
  assert overflow == [False] and np.asarray(index.values)[3] == 4  # tombstone reused
  # deleting the tail of a chain frees its slot outright (the next slot is EMPTY)
  index = dele(index, [c])
  assert np.asarray(index.values)[4] == EMPTY
  assert look(index, [a, d, c]) == [1, 4, -1]


def test_insert_existing_key_past_a_tombstone_overwrites_in_place():
  cap = 16
  a, b = keys_with_home(9, cap, 2)
  index, _ = ins(index_init(cap, max_probes=4), [a, b], [1, 2])
  index = dele(index, [a])  # slot 9 becomes a tombstone, b stays in 10
  index, _ = ins(index, [b], [7])
  assert table_as_dict(index) == {b: 7}
  values = np.asarray(index.values)
  assert values[9] == TOMBSTONE and values[10] == 7  # not a second copy in the tombstone


def test_duplicates_last_valid_wins():
  index = index_init(16, max_probes=4)
  index, overflow = ins(index, [(1, 1), (2, 2), (1, 1), (1, 1), (2, 2)], [10, 20, 11, 12, 21],
                        [True, True, True, False, True])
  assert table_as_dict(index) == {(1, 1): 11, (2, 2): 21}
  assert not any(overflow)


def test_large_batch_with_many_duplicates_matches_dict():
  # 512 items over 150 keys: duplicates share scratch cells with other keys, so the
  # last-occurrence resolution needs several rounds.
  rng = np.random.default_rng(7)
  pool = rng.integers(1, 2**32, size=(150, 2), dtype=np.uint64).astype(np.uint32)
  which = rng.integers(0, 150, size=512)
  values = rng.integers(0, 1000, size=512).astype(np.int32)
  valid = rng.random(512) < 0.8
  index, overflow = index_insert(index_init(512, max_probes=32), jnp.asarray(pool[which]),
                                 jnp.asarray(values), jnp.asarray(valid))
  model = {}
  for w, v, ok in zip(which, values, valid):
    if ok:
      model[tuple(int(x) for x in pool[w])] = int(v)
  assert not np.asarray(overflow).any()
  assert table_as_dict(index) == model
  check_table_invariants(index)


def test_rebuild_drops_tombstones_keeps_entries():
  cap = 16
  chain = keys_with_home(6, cap, 4)
  index, _ = ins(index_init(cap, max_probes=4), chain, [1, 2, 3, 4])
  index = dele(index, chain[:2])
  assert int(index_counts(index)["tombstones"]) == 2
  fresh, rebuilt = index_rebuild(index)
  assert bool(rebuilt) and int(index_counts(fresh)["tombstones"]) == 0
  assert table_as_dict(fresh) == table_as_dict(index) == dict(zip(chain[2:], [3, 4]))
  assert np.asarray(fresh.values)[6:8].tolist() == [3, 4]  # back at the home slot
  check_table_invariants(fresh)


def test_rebuild_refuses_when_it_would_overflow():
  # Inserted one at a time, four keys of home 0 fill slots 0-3 and B (home 1) goes to 4.
  # Re-inserted as one batch in slot order, B takes slot 1 in the first round, so the
  # fourth home-0 key would need slot 4, beyond its budget: the rebuild is refused.
  cap = 16
  chain = keys_with_home(0, cap, 4)
  b, = keys_with_home(1, cap, 1)
  index = index_init(cap, max_probes=4)
  for value, key in enumerate(chain + [b]):
    index, overflow = ins(index, [key], [value])
    assert overflow == [False]
  assert np.asarray(index.values)[:5].tolist() == [0, 1, 2, 3, 4]
  fresh, rebuilt = index_rebuild(index)
  assert not bool(rebuilt)
  np.testing.assert_array_equal(np.asarray(fresh.values), np.asarray(index.values))
  np.testing.assert_array_equal(np.asarray(fresh.keys), np.asarray(index.keys))


def test_reserved_key_and_negative_values_ignored():
  index = index_init(CAP, max_probes=BUDGET)
  keys = [(0, 0), (1, 0), (0, 1)]
  index, overflow = ins(index, keys, [5, -3, 6])
  assert table_as_dict(index) == {(0, 1): 6}
  assert not any(overflow)
  assert look(index, keys) == [-1, -1, 6]


def test_delete_with_expected_value():
  index, _ = ins(index_init(8), [(1, 2), (3, 4)], [5, 6])
  index = dele(index, [(1, 2), (3, 4)], expected=[9, 6])
  assert table_as_dict(index) == {(1, 2): 5}


def test_jit_no_recompile_and_pytree():
  index = index_init(CAP, max_probes=BUDGET)
  _, h, v, ok = _pad([(i, 3) for i in range(1, 5)], [1, 2, 3, 4])
  index, _ = index_insert(index, h, v, ok)
  before = index_insert._cache_size()
  index, _ = index_insert(index, h + 10, v, ok)
  assert index_insert._cache_size() == before
  leaves, treedef = jax.tree_util.tree_flatten(index)
  assert len(leaves) == 2
  assert jax.tree_util.tree_unflatten(treedef, leaves).max_probes == BUDGET


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


# ---- match_prefix: verified matches, against a trie built in Python ---------------------------

S = 4


def _parity_hash(parent, tokens):
  """Collides constantly: ignores the parent (so position and tenant) and all but 1 bit."""
  lane0 = (tokens[..., 0] & 1).astype(jnp.uint32) + 1
  return jnp.stack([lane0, jnp.ones_like(lane0)], axis=-1) + 0 * parent


def _position_hash(parent, tokens):
  """Ignores the tokens: every block at one position of one tenant's chain collides."""
  return parent + jnp.uint32(1) + 0 * tokens[..., :1].astype(jnp.uint32)


def _constant_hash(parent, tokens):
  del tokens
  return jnp.full(parent.shape, 9, jnp.uint32)


def build_cache(stored, num_pages, hash_fn, seeds):
  """Pages for ``stored`` = [(tenant, tokens)] laid out as a trie, like a cache would.

  Returns (index, meta_tokens, meta_parent, meta_namespace, trie) where trie maps
  (tenant, prefix tokens of k whole blocks) -> page.
  """
  meta_tokens = np.full((num_pages, S), -1, np.int32)
  meta_parent = np.full((num_pages,), -1, np.int32)
  meta_ns = np.zeros((num_pages, 2), np.uint32)
  trie, keys, vals = {}, [], []
  next_page = num_pages - 1  # allocate from the top so page ids differ from block indices
  for tenant, toks in stored:
    n = len(toks) // S
    hashes = np.asarray(chain_hashes(jnp.asarray(seeds[tenant]), jnp.asarray(toks[:n * S]),
                                     page_size=S, hash_fn=hash_fn))
    parent = -1
    for b in range(n):
      key = (tenant, tuple(toks[:(b + 1) * S]))
      if key not in trie:
        trie[key] = page = next_page
        next_page -= 1
        meta_tokens[page] = toks[b * S:(b + 1) * S]
        meta_parent[page] = parent
        meta_ns[page] = seeds[tenant]
        keys.append(hashes[b])
        vals.append(page)
      parent = trie[key]
  index, overflow = ins(index_init(256, max_probes=32), keys, vals)
  assert not any(overflow)
  return index, meta_tokens, meta_parent, meta_ns, trie


def reference_match(trie, tenant, toks, num_full):
  pages = []
  for b in range(num_full):
    page = trie.get((tenant, tuple(toks[:(b + 1) * S])))
    if page is None:
      break
    pages.append(page)
  return pages


def _workload(seed):
  rng = np.random.default_rng(seed)
  vocab = 3  # tiny vocabulary: many blocks share tokens, parents and hashes
  system = rng.integers(0, vocab, size=2 * S).tolist()
  stored, queries = [], []
  for _ in range(6):
    tenant = int(rng.integers(0, 2))
    toks = (system if rng.random() < 0.7 else []) + rng.integers(0, vocab, size=3 * S).tolist()
    stored.append((tenant, toks))
  for _ in range(12):
    tenant, base = stored[int(rng.integers(0, len(stored)))]
    if rng.random() < 0.3:
      tenant = 1 - tenant  # same tokens, other tenant: must never match
    cut = int(rng.integers(0, len(base) + 1))
    toks = base[:cut] + rng.integers(0, vocab, size=5 * S).tolist()
    queries.append((tenant, toks[:5 * S]))
  return stored, queries


@pytest.mark.parametrize("hash_name", ["block_hash", "parity", "position", "constant"])
def test_match_prefix_is_verified_and_maximal(hash_name):
  hash_fn = {"block_hash": block_hash, "parity": _parity_hash, "position": _position_hash,
             "constant": _constant_hash}[hash_name]
  seeds = [namespace_seed("model", None, "tenant-a"), namespace_seed("model", None, "tenant-b")]
  for workload in range(3):
    stored, queries = _workload(workload)
    index, meta_tokens, meta_parent, meta_ns, trie = build_cache(stored, 64, hash_fn, seeds)
    tenants = np.array([t for t, _ in queries])
    tokens = np.array([q for _, q in queries], np.int32)  # [12, 5 * S]
    num_full = np.random.default_rng(workload).integers(0, 6, size=len(queries)).astype(np.int32)
    m = match_prefix(index, meta_tokens, meta_parent, jnp.asarray(np.stack(seeds)[tenants]),
                     jnp.asarray(tokens), jnp.asarray(num_full), hash_fn,
                     meta_namespace=jnp.asarray(meta_ns))
    pages, counts = np.asarray(m.pages), np.asarray(m.num_matched)
    assert pages.shape == (12, 5) and counts.shape == (12,)
    for b, (tenant, toks) in enumerate(queries):
      want = reference_match(trie, tenant, toks, int(num_full[b]))
      got = pages[b, :counts[b]].tolist()
      assert pages[b, counts[b]:].tolist() == [-1] * (5 - counts[b])
      # never a wrong page: whatever matched is the trie's own path for this tenant
      assert got == want[:len(got)], (b, got, want)
      if hash_name == "block_hash":
        assert got == want  # a good hash finds every cached block
    want_hashes = chain_hashes(jnp.asarray(np.stack(seeds)[tenants]), jnp.asarray(tokens),
                               page_size=S, hash_fn=hash_fn)
    np.testing.assert_array_equal(np.asarray(m.hashes), np.asarray(want_hashes))


def test_match_prefix_tenants_and_wrong_parent_rejected():
  seed_a, seed_b = namespace_seed("m", None, "a"), namespace_seed("m", None, "b")
  toks = np.arange(2 * S, dtype=np.int32)
  # the constant hash maps every block to one key: point it at a root page holding block 0
  index, _ = ins(index_init(CAP, max_probes=BUDGET), [(9, 9)], [2])
  meta_tokens = np.full((4, S), -1, np.int32)
  meta_tokens[2] = toks[:S]
  meta_parent = np.full((4,), -1, np.int32)
  meta_ns = np.zeros((4, 2), np.uint32)
  meta_ns[2] = seed_a
  args = (index, meta_tokens, meta_parent)
  tokens = jnp.asarray(np.stack([toks, toks]))
  seeds = jnp.asarray(np.stack([seed_a, seed_b]))
  m = match_prefix(*args, seeds, tokens, jnp.array([2, 2]), _constant_hash,
                   meta_namespace=jnp.asarray(meta_ns))
  assert m.num_matched.tolist() == [1, 0] and m.pages.tolist() == [[2, -1], [-1, -1]]
  # a page with the right tokens but a different parent is not the block's page
  meta_parent[2] = 0
  m = match_prefix(*args, seeds, tokens, jnp.array([2, 2]), _constant_hash)
  assert m.num_matched.tolist() == [0, 0]
  # nor is a root page with other tokens
  meta_parent[2] = -1
  meta_tokens[2, -1] += 1
  m = match_prefix(*args, seeds, tokens, jnp.array([2, 2]), _constant_hash)
  assert m.num_matched.tolist() == [0, 0]


def test_match_prefix_short_and_bad_shapes():
  index = index_init(8)
  meta_tokens, meta_parent = jnp.zeros((4, S), jnp.int32), jnp.full((4,), -1, jnp.int32)
  m = match_prefix(index, meta_tokens, meta_parent, jnp.ones(2, jnp.uint32),
                   jnp.zeros((2, S - 1), jnp.int32), jnp.zeros((2,), jnp.int32))
  assert m.pages.shape == (2, 0) and m.num_matched.tolist() == [0, 0]
  with pytest.raises(ValueError, match="num_full_pages"):
    match_prefix(index, meta_tokens, meta_parent, jnp.ones(2, jnp.uint32),
                 jnp.zeros((2, 8), jnp.int32), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="meta_parent"):
    match_prefix(index, meta_tokens, meta_parent[:3], jnp.ones(2, jnp.uint32),
                 jnp.zeros((2, 8), jnp.int32), jnp.zeros((2,), jnp.int32))


def test_toy_plan_step_inside_jit_with_donation():
  """match_prefix + index_insert inside one donated, jitted step, as plan_step would use them."""
  from flax import struct

  @struct.dataclass
  class ToyCache:
    index: object
    tokens: jax.Array  # int32 [P, S]
    parent: jax.Array  # int32 [P]

  batch, blocks = 2, 3

  @jax.jit
  def step(cache, seed, toks, num_full):
    m = match_prefix(cache.index, cache.tokens, cache.parent, seed, toks, num_full)
    # toy allocation: block k of sequence b lives in page b * blocks + k
    pages = jnp.arange(batch * blocks, dtype=jnp.int32).reshape(batch, blocks)
    pages = jnp.where(m.pages >= 0, m.pages, pages)
    new = (jnp.arange(blocks)[None, :] >= m.num_matched[:, None]) & \
        (jnp.arange(blocks)[None, :] < num_full[:, None])
    parent = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), pages[:, :-1]], axis=1)
    target = jnp.where(new, pages, cache.tokens.shape[0]).reshape(-1)
    index, overflow = index_insert(cache.index, m.hashes.reshape(-1, 2), pages.reshape(-1),
                                   new.reshape(-1))
    cache = cache.replace(
        index=index,
        tokens=cache.tokens.at[target].set(toks.reshape(-1, S), mode="drop"),
        parent=cache.parent.at[target].set(parent.reshape(-1), mode="drop"))
    return m.num_matched, jnp.any(overflow), cache

  step = jax.jit(step, donate_argnames="cache")
  cache = ToyCache(index=index_init(CAP, max_probes=BUDGET),
                   tokens=jnp.full((batch * blocks, S), -1, jnp.int32),
                   parent=jnp.full((batch * blocks,), -1, jnp.int32))
  seed = jnp.asarray(namespace_seed("m"))
  toks = jnp.arange(batch * blocks * S, dtype=jnp.int32).reshape(batch, blocks * S)
  num_full = jnp.array([3, 2], jnp.int32)
  matched, overflow, cache = step(cache, seed, toks, num_full)
  assert matched.tolist() == [0, 0] and not bool(overflow)
  matched, overflow, cache = step(cache, seed, toks, num_full)
  assert matched.tolist() == [3, 2] and not bool(overflow)
  matched, _, cache = step(cache, seed, toks.at[0, S + 1].add(1), num_full)
  assert matched.tolist() == [1, 2]  # sequence 0 diverges in its second block
  assert step._cache_size() == 1
