"""PrefixIndex: agrees with a Python dict under any batched insert/lookup/delete sequence."""

import chex
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
from kvjax.prefix.hashing import block_hash
from kvjax.prefix.hashing import chain_hashes
from kvjax.prefix.hashing import namespace_seed
from kvjax.prefix.index import EMPTY
from kvjax.prefix.index import TOMBSTONE
from kvjax.prefix.index import halfsiphash64
from kvjax.prefix.index import home_buckets
from kvjax.prefix.index import index_counts
from kvjax.prefix.index import index_delete
from kvjax.prefix.index import index_init
from kvjax.prefix.index import index_insert
from kvjax.prefix.index import index_lookup
from kvjax.prefix.index import index_rebuild
from kvjax.prefix.index import match_prefix
from kvjax.prefix.index import process_key




M32 = 0xFFFFFFFF
KEY = 0x0123456789ABCDEF  # placement key of these tests (index_init(..., key=KEY))


def _rotl(x, b):
  return ((x << b) | (x >> (32 - b))) & M32


def halfsiphash_py(msg: bytes, key: bytes, outlen: int = 8) -> bytes:
  """HalfSipHash-2-4, an independent spelling of the reference C implementation."""
  k0, k1 = int.from_bytes(key[:4], "little"), int.from_bytes(key[4:8], "little")
  v = [k0, k1 ^ (0xEE if outlen == 8 else 0), 0x6C796765 ^ k0, 0x74656462 ^ k1]

  def rounds(count):
    for _ in range(count):
      v[0] = (v[0] + v[1]) & M32; v[1] = _rotl(v[1], 5) ^ v[0]; v[0] = _rotl(v[0], 16)  # noqa: E702
      v[2] = (v[2] + v[3]) & M32; v[3] = _rotl(v[3], 8) ^ v[2]  # noqa: E702
      v[0] = (v[0] + v[3]) & M32; v[3] = _rotl(v[3], 7) ^ v[0]  # noqa: E702
      v[2] = (v[2] + v[1]) & M32; v[1] = _rotl(v[1], 13) ^ v[2]; v[2] = _rotl(v[2], 16)  # noqa: E702

  end = len(msg) - len(msg) % 4
  for i in range(0, end, 4):
    m = int.from_bytes(msg[i:i + 4], "little")
    v[3] ^= m
    rounds(2)
    v[0] ^= m
  b = ((len(msg) & 0xFF) << 24) | int.from_bytes(msg[end:].ljust(4, b"\0"), "little")
  v[3] ^= b
  rounds(2)
  v[0] ^= b
  v[2] ^= 0xEE if outlen == 8 else 0xFF
  rounds(4)
  out = (v[1] ^ v[3]).to_bytes(4, "little")
  if outlen == 4:
    return out
  v[1] ^= 0xDD
  rounds(4)
  return out + (v[1] ^ v[3]).to_bytes(4, "little")


def homes_py(key, num_buckets, placement=KEY):
  """The documented two home buckets of ``key`` under ``placement``."""
  msg = key[0].to_bytes(4, "little") + key[1].to_bytes(4, "little")
  out = halfsiphash_py(msg, placement.to_bytes(8, "little"))
  return (int.from_bytes(out[:4], "little") & (num_buckets - 1),
          int.from_bytes(out[4:], "little") & (num_buckets - 1))


def keys_with_homes(homes, num_buckets, count, start=1, placement=KEY):
  """``count`` distinct keys (k, 7) whose two home buckets are both in ``homes``."""
  out, k = [], start
  while len(out) < count:
    if set(homes_py((k, 7), num_buckets, placement)) <= set(homes):
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


def window(index, key, choice=None):
  """Buckets on the probe paths of ``key`` (one choice or both), in path order."""
  nb, budget = index.num_buckets, index.max_probes
  homes = homes_py(key, nb, _placement(index))
  choices = [choice] if choice is not None else [0, 1]
  return [(homes[c] + d) % nb for c in choices for d in range(budget)]


def _placement(index):
  lo, hi = (int(x) for x in np.asarray(index.placement_key))
  return lo | hi << 32


def check_table_invariants(index):
  """Every live key sits on one of its paths with no EMPTY slot in a bucket before it."""
  keys = np.asarray(index.keys)
  values = np.asarray(index.values)
  w = index.bucket_size
  assert set(np.unique(values[values < 0]).tolist()) <= {EMPTY, TOMBSTONE}
  assert not keys[values < 0].any(), "EMPTY/TOMBSTONE slots hold key (0, 0)"
  has_empty = (values.reshape(-1, w) == EMPTY).any(axis=1)
  for slot in np.flatnonzero(values >= 0):
    key = (int(keys[slot, 0]), int(keys[slot, 1]))
    assert key != (0, 0)
    ok = False
    for c in (0, 1):
      path = window(index, key, c)
      if slot // w in path:
        d = path.index(slot // w)
        ok |= not has_empty[path[:d]].any()
    assert ok, f"key {key} in slot {slot}: not on a path, or an EMPTY bucket before it"


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


def small(cap=16, bucket_size=2, max_probes=2, key=KEY):
  """A small table (8 buckets of 2 slots, 2 buckets per path): chains form quickly."""
  return index_init(cap, max_probes=max_probes, key=key, bucket_size=bucket_size)


# ---- property test: a state machine against a dict ---------------------------------------------

BATCH = 6
# A small key pool over a small table, so batches collide, paths fill, tombstones pile up
# and the table fills: 10 keys whose both homes are bucket 3 plus 14 spread ones.
CAP, W, BUDGET = 16, 2, 2
NB = CAP // W
POOL = keys_with_homes([3], NB, 10) + [(k * 7919 + 1, k) for k in range(14)]

items = st.lists(st.tuples(st.integers(0, len(POOL) - 1), st.integers(0, 50), st.booleans()),
                 min_size=BATCH, max_size=BATCH)


class IndexMachine(RuleBasedStateMachine):

  def __init__(self):
    super().__init__()
    self.index = small(CAP, W, BUDGET)
    self.model = {}

  @rule(batch=items)
  def insert(self, batch):
    keys = [POOL[k] for k, _, _ in batch]
    self.index, overflow = ins(self.index, keys, [v for _, v, _ in batch],
                               [ok for _, _, ok in batch])
    values = np.asarray(self.index.values).reshape(NB, W)
    for key, (_, value, ok), over in zip(keys, batch, overflow):
      if not ok:
        assert not over, "an invalid item reported overflow"
        continue
      if over:
        # justified: the key is absent and every bucket on both its paths is live
        assert key not in self.model
        assert all((values[b] >= 0).all() for b in window(self.index, key)), \
            "overflow reported with a free slot"
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

def test_halfsiphash_matches_reference_vectors():
  # veorq/SipHash vectors.h, vectors_hsip64[n]: key bytes 00..07, message bytes 00..n-1
  key = bytes(range(8))
  want = {0: "218d1f59b9b83cc8", 7: "ff202728b07bc684", 8: "edfee820bce4858c",
          9: "5b51cccc13888307"}
  for n, hexdigest in want.items():
    assert halfsiphash_py(bytes(range(n)), key).hex() == hexdigest
  rng = np.random.default_rng(0)
  words = rng.integers(0, 2**32, size=(64, 2), dtype=np.uint64).astype(np.uint32)
  placement = rng.integers(0, 2**32, size=(2,), dtype=np.uint64).astype(np.uint32)
  out0, out1 = (np.asarray(w) for w in halfsiphash64(jnp.asarray(words), jnp.asarray(placement)))
  kbytes = placement.astype("<u4").tobytes()
  for w, a, b in zip(words, out0, out1):
    want = halfsiphash_py(w.astype("<u4").tobytes(), kbytes)
    assert want == int(a).to_bytes(4, "little") + int(b).to_bytes(4, "little")


def test_keys_give_different_placements_and_the_same_key_reproduces():
  rng = np.random.default_rng(1)
  hashes = jnp.asarray(rng.integers(1, 2**32, size=(256, 2), dtype=np.uint64).astype(np.uint32))
  a, b, a2 = (index_init(4096, key=k) for k in (1, 2, 1))
  homes = [np.stack([np.asarray(w) for w in home_buckets(hashes, i.placement_key, i.num_buckets)])
           for i in (a, b, a2)]
  np.testing.assert_array_equal(homes[0], homes[2])
  assert (homes[0] != homes[1]).mean() > 0.9  # independent placements: ~1 - 1/512 differ
  # stored in the same slots under the same key, elsewhere under another
  values = jnp.arange(256, dtype=jnp.int32)
  fa, fb, fa2 = (index_insert(i, hashes, values)[0] for i in (a, b, a2))
  np.testing.assert_array_equal(np.asarray(fa.values), np.asarray(fa2.values))
  assert (np.asarray(fa.values) != np.asarray(fb.values)).any()
  for f in (fa, fb):
    assert np.asarray(index_lookup(f, hashes)).tolist() == list(range(256))
  # the default key is this process's secret, the same for every index
  assert (np.asarray(index_init(64).placement_key) == process_key()).all()


@pytest.mark.parametrize("seed", range(6))
def test_random_inserts_to_90_percent_never_overflow(seed):
  """90 % of capacity in batches, then delete / reinsert rounds through the tombstones."""
  rng = np.random.default_rng(seed)
  cap = [1024, 4096, 16384][seed % 3]
  n = int(0.9 * cap)
  hashes = rng.integers(1, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32)
  values = np.arange(n, dtype=np.int32)
  index = index_init(cap, key=int(rng.integers(0, 2**63)))
  batch = n // 4 + 1
  for start in range(0, n, batch):  # four batches: conflicts inside and across batches
    index, overflow = index_insert(index, jnp.asarray(hashes[start:start + batch]),
                                   jnp.asarray(values[start:start + batch]))
    assert not np.asarray(overflow).any()
  assert np.asarray(index_lookup(index, jnp.asarray(hashes))).tolist() == values.tolist()
  for _ in range(3):
    gone = rng.random(n) < 0.3
    index = index_delete(index, jnp.asarray(hashes), jnp.asarray(gone))
    found = np.asarray(index_lookup(index, jnp.asarray(hashes)))
    np.testing.assert_array_equal(found, np.where(gone, -1, values))
    fresh = rng.integers(1, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32)
    hashes = np.where(gone[:, None], fresh, hashes)
    index, overflow = index_insert(index, jnp.asarray(hashes), jnp.asarray(values),
                                   jnp.asarray(gone))
    assert not np.asarray(overflow).any()
    assert np.asarray(index_lookup(index, jnp.asarray(hashes))).tolist() == values.tolist()
  assert int(index_counts(index)["live"]) == n
  if cap == 1024:
    check_table_invariants(index)


def test_empty_lookup_misses_and_counts():
  index = small(CAP, W, BUDGET)
  assert look(index, [(1, 2), (0, 0), (5, 6)]) == [-1, -1, -1]
  assert {k: int(v) for k, v in index_counts(index).items()} == \
      {"live": 0, "tombstones": 0, "empty": CAP}


def test_full_table_reports_overflow():
  index = index_init(8, key=KEY)  # one bucket of 8
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


def test_probe_budget_overflow_when_both_paths_are_full():
  chain = keys_with_homes([5], NB, 5)  # both homes bucket 5: paths 5, 6 (4 slots)
  index, overflow = ins(small(), chain, [10, 11, 12, 13, 14])
  assert sum(overflow) == 1
  values = np.asarray(index.values).reshape(NB, W)
  assert (values[5] >= 0).all() and (values[6] >= 0).all()
  assert int(index_counts(index)["live"]) == 4
  assert look(index, chain) == [-1 if o else v for o, v in zip(overflow, [10, 11, 12, 13, 14])]


def test_batch_collisions_fill_a_bucket_and_wrap():
  chain = keys_with_homes([NB - 1], NB, 3)  # home is the last bucket: the path wraps to 0
  index, overflow = ins(small(), chain[::-1], [1, 2, 3])
  assert not any(overflow)
  values = np.asarray(index.values).reshape(NB, W)
  assert sorted(values[NB - 1].tolist() + values[0].tolist()) == [-1, 1, 2, 3]
  assert look(index, chain[::-1]) == [1, 2, 3]


def test_tombstones_keep_paths_and_are_reused():
  a, b, c, d = keys_with_homes([2], NB, 4)
  index, _ = ins(small(), [a, b], [1, 2])
  index, _ = ins(index, [c], [3])        # bucket 2 full: c goes to bucket 3
  values = np.asarray(index.values).reshape(NB, W)
  assert sorted(values[2].tolist()) == [1, 2] and 3 in values[3].tolist()
  index = dele(index, [b])
  values = np.asarray(index.values).reshape(NB, W)
  assert TOMBSTONE in values[2].tolist()  # bucket 2 had no EMPTY slot: c's path stays open
  assert look(index, [a, b, c]) == [1, -1, 3]
  index, overflow = ins(index, [d], [4])
  values = np.asarray(index.values).reshape(NB, W)
  assert overflow == [False] and sorted(values[2].tolist()) == [1, 4]  # tombstone reused
  # deleting from a bucket that already has an EMPTY slot frees the slot outright
  index = dele(index, [c])
  assert np.asarray(index.values).reshape(NB, W)[3].tolist() == [EMPTY, EMPTY]
  assert look(index, [a, d, c]) == [1, 4, -1]


def test_insert_existing_key_past_a_tombstone_overwrites_in_place():
  a, b, c = keys_with_homes([4], NB, 3)
  index, _ = ins(small(), [a, b], [1, 2])
  index, _ = ins(index, [c], [3])           # c in bucket 5
  index = dele(index, [a])                  # a tombstone in bucket 4, on c's path
  index, _ = ins(index, [c], [7])
  assert table_as_dict(index) == {b: 2, c: 7}
  values = np.asarray(index.values).reshape(NB, W)
  assert TOMBSTONE in values[4].tolist() and 7 in values[5].tolist()  # not a second copy


def test_duplicates_last_valid_wins():
  index = small()
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
  index, overflow = index_insert(index_init(512, key=KEY), jnp.asarray(pool[which]),
                                 jnp.asarray(values), jnp.asarray(valid))
  model = {}
  for w, v, ok in zip(which, values, valid):
    if ok:
      model[tuple(int(x) for x in pool[w])] = int(v)
  assert not np.asarray(overflow).any()
  assert table_as_dict(index) == model
  check_table_invariants(index)


def test_rebuild_drops_tombstones_keeps_entries():
  chain = keys_with_homes([6], NB, 4)
  index, _ = ins(small(), chain, [1, 2, 3, 4])
  index = dele(index, chain[:2])
  assert int(index_counts(index)["tombstones"]) >= 1
  fresh, rebuilt = index_rebuild(index)
  assert bool(rebuilt) and int(index_counts(fresh)["tombstones"]) == 0
  assert table_as_dict(fresh) == table_as_dict(index) == dict(zip(chain[2:], [3, 4]))
  assert sorted(np.asarray(fresh.values).reshape(NB, W)[6].tolist()) == [3, 4]  # back home
  check_table_invariants(fresh)


def test_rebuild_refuses_when_it_would_overflow():
  # One bucket per path. Ys home only to bucket 1; Xs to buckets 0 and 1 with the coin
  # (bit 31 of the first HalfSipHash word) on bucket 1. Inserted Ys first, the Xs find
  # bucket 1 full and go to 0. Re-inserted as one batch in slot order, the Xs come
  # first, both buckets are empty, the coin sends an X to bucket 1 and a Y is left out.
  index = small(max_probes=1)

  def coin(key):
    msg = key[0].to_bytes(4, "little") + key[1].to_bytes(4, "little")
    return halfsiphash_py(msg, KEY.to_bytes(8, "little"))[3] >> 7

  ys = keys_with_homes([1], NB, 2)
  xs = [k for k in keys_with_homes([0, 1], NB, 200, start=5000)
        if sorted(homes_py(k, NB)) == [0, 1] and coin(k)][:2]
  for value, key in enumerate(ys + xs):
    index, overflow = ins(index, [key], [value])
    assert overflow == [False]
  assert sorted(np.asarray(index.values)[:4].tolist()) == [0, 1, 2, 3]
  fresh, rebuilt = index_rebuild(index)
  assert not bool(rebuilt)
  np.testing.assert_array_equal(np.asarray(fresh.values), np.asarray(index.values))
  np.testing.assert_array_equal(np.asarray(fresh.keys), np.asarray(index.keys))


def test_reserved_key_and_negative_values_ignored():
  index = small()
  keys = [(0, 0), (1, 0), (0, 1)]
  index, overflow = ins(index, keys, [5, -3, 6])
  assert table_as_dict(index) == {(0, 1): 6}
  assert not any(overflow)
  assert look(index, keys) == [-1, -1, 6]


def test_delete_with_expected_value():
  index, _ = ins(index_init(8, key=KEY), [(1, 2), (3, 4)], [5, 6])
  index = dele(index, [(1, 2), (3, 4)], expected=[9, 6])
  assert table_as_dict(index) == {(1, 2): 5}


def test_jit_no_recompile_and_pytree():
  index = small(CAP, W, BUDGET)
  _, h, v, ok = _pad([(i, 3) for i in range(1, 5)], [1, 2, 3, 4])
  insert = jax.jit(chex.assert_max_traces(lambda *a: index_insert(*a), n=1))
  index, _ = insert(index, h, v, ok)
  index, _ = insert(index, h + 10, v, ok)
  other, _ = insert(small(CAP, W, BUDGET, key=KEY + 1), h, v, ok)  # a new key: same program
  leaves, treedef = jax.tree_util.tree_flatten(index)
  assert len(leaves) == 3  # keys, values, placement_key
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert (rebuilt.max_probes, rebuilt.bucket_size) == (BUDGET, W)


def test_bad_arguments_raise():
  for cap in (0, 3, 12, -4, 2.0):
    with pytest.raises(ValueError, match="capacity"):
      index_init(cap)
  with pytest.raises(ValueError, match="max_probes"):
    index_init(16, max_probes=3)  # 2 buckets of 8
  with pytest.raises(ValueError, match="bucket_size"):
    index_init(16, bucket_size=3)
  for key in (-1, 2**64, np.zeros(3, np.uint32), np.zeros(2, np.int32), True):
    with pytest.raises(ValueError, match="key"):
      index_init(16, key=key)
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
  index, overflow = ins(index_init(256, key=KEY), keys, vals)
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
  index, _ = ins(small(), [(9, 9)], [2])
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

  @chex.assert_max_traces(n=1)
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
  cache = ToyCache(index=small(),
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
  assert matched.tolist() == [1, 2]  # sequence 0 diverges in its second block (one trace)


def test_shared_placement_mix_gives_the_same_tables_and_answers():
  """Index ops given ``placement_mix`` (as plan_step shares it) equal those that hash again."""
  from kvjax.prefix.index import placement_mix
  rng = np.random.default_rng(7)
  plain = shared = index_init(64, max_probes=2, key=KEY)
  for step in range(6):
    h = jnp.asarray(rng.integers(1, 40, (24, 2)), jnp.uint32)   # repeats within and across
    vals = jnp.asarray(rng.integers(-1, 50, (24,)), jnp.int32)
    ok = jnp.asarray(rng.random(24) < 0.8)
    mixed = placement_mix(shared, h)
    m0, m1 = homes_py((int(h[0, 0]), int(h[0, 1])), 1 << 30, KEY)   # the documented hash
    assert (int(mixed[0][0]) & ((1 << 30) - 1), int(mixed[1][0]) & ((1 << 30) - 1)) == (m0, m1)
    plain, over_p = index_insert(plain, h, vals, ok)
    shared, over_s = index_insert(shared, h, vals, ok, mixed=mixed)
    np.testing.assert_array_equal(over_p, over_s)
    np.testing.assert_array_equal(index_lookup(plain, h, ok), index_lookup(shared, h, ok,
                                                                          mixed=mixed))
    gone = jnp.asarray(rng.random(24) < 0.3)
    plain = index_delete(plain, h, gone, expected=vals if step % 2 else None)
    shared = index_delete(shared, h, gone, expected=vals if step % 2 else None, mixed=mixed)
    chex.assert_trees_all_equal(plain, shared)
  check_table_invariants(shared)
  with pytest.raises(ValueError, match="mixed"):
    index_lookup(shared, h, mixed=(mixed[0][:3], mixed[1][:3]))
