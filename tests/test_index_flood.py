"""Index flooding: blocks crafted with full knowledge of the public block hash.

The attacker knows ``block_hash`` and the namespace, so it knows the 64-bit hash
of every block it sends. Before keyed placement, the home slot was the public
``fmix32(lane0 ^ fmix32(lane1)) & (C - 1)``: a brute force over token contents
found 33 blocks on one home slot, which overflowed the 32-probe budget and kept
any victim block homing there out of the cache (``INDEX_OVERFLOW``). The
crafted set is the same here; what it no longer knows is the placement key.
"""

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from hash_reference import fmix_py
from kvjax.prefix.hashing import block_hash
from kvjax.prefix.hashing import namespace_seed
from kvjax.prefix.index import home_buckets
from kvjax.prefix.index import index_init
from kvjax.prefix.index import index_insert
from kvjax.prefix.index import index_lookup

S = 4
FLOOD = 33  # one more than the old probe budget (max_probes = 32)


def public_home(h, capacity):
  """The documented (unkeyed) home slot of the index before keyed placement."""
  return fmix_py(int(h[0]) ^ fmix_py(int(h[1]))) & (capacity - 1)


def craft_flood(seed, capacity, count, target=None):
  """Root blocks ``[t, 1, 2, 3]`` whose public home slot is ``target``: brute force over t.

  Returns (tokens int32 [count, S], hashes uint32 [count, 2], target).
  """
  t = np.arange(1, 1 << 17, dtype=np.int32)
  blocks = np.stack([t, np.full_like(t, 1), np.full_like(t, 2), np.full_like(t, 3)], axis=1)
  hashes = np.asarray(block_hash(jnp.asarray(seed, jnp.uint32), jnp.asarray(blocks)))
  homes = np.array([public_home(h, capacity) for h in hashes])
  if target is None:
    target = int(np.bincount(homes, minlength=capacity).argmax())
  pick = np.flatnonzero(homes == target)[:count]
  assert len(pick) == count, "brute force too short"
  return blocks[pick], hashes[pick], target


def _init(capacity, key):
  if key is None:  # the deployed default: this process's secret key (also runs on old code)
    return index_init(capacity)
  return index_init(capacity, key=key)


@pytest.mark.parametrize("key", [None, 0, 1, 0xDEADBEEF12345678])
def test_crafted_flood_on_one_public_home_slot_does_not_overflow(key):
  capacity = 1024
  seed = namespace_seed("kvjax")
  _, hashes, _ = craft_flood(seed, capacity, FLOOD + 1)  # 33 flood blocks + the victim
  flood, victim = hashes[:FLOOD], hashes[FLOOD:]
  index = _init(capacity, key)
  index, overflow = index_insert(index, jnp.asarray(flood), jnp.arange(FLOOD, dtype=jnp.int32))
  index, victim_overflow = index_insert(index, jnp.asarray(victim), jnp.array([99], jnp.int32))
  # old code: the 33rd flood block and the victim overflow, the victim is never found
  assert not np.asarray(overflow).any()
  assert not np.asarray(victim_overflow).any()
  found = np.asarray(index_lookup(index, jnp.asarray(hashes))).tolist()
  assert found == list(range(FLOOD)) + [99]


def test_crafted_flood_through_the_cache_keeps_the_victim_cacheable():
  """End to end: 33 attacker prompts fill pages, then a victim's first block still caches."""
  cc = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=S, num_pages=64,
                         max_seqs=8, max_pages_per_seq=4, checked=False)
  cache = kvjax.init(cc)
  capacity = cc.index_slots  # 128
  seed = np.asarray(kvjax.cache.default_seed(cc))
  blocks, _, _ = craft_flood(seed, capacity, FLOOD + 1)
  attack, victim = blocks[:FLOOD], blocks[FLOOD]
  for start in range(0, FLOOD, cc.max_seqs):
    rows = attack[start:start + cc.max_seqs]
    sids = np.arange(len(rows), dtype=np.int32)
    _, cache = kvjax.plan_step(cache, jnp.asarray(sids), jnp.asarray(rows),
                               jnp.full((len(rows),), S, jnp.int32), config=cc)
    cache = kvjax.release(cache, jnp.asarray(sids), config=cc)
  _, cache = kvjax.plan_step(cache, jnp.array([0]), jnp.asarray(victim[None]),
                             jnp.array([S], jnp.int32), config=cc)
  assert int(cache.status) & kvjax.INDEX_OVERFLOW == 0, "victim's page kept out of the index"
  cache = kvjax.release(cache, jnp.array([0]), config=cc)
  prompt = np.concatenate([victim, [5]]).astype(np.int32)[None]
  matched, cache = kvjax.attach_prefix(cache, jnp.array([1]), jnp.asarray(prompt),
                                       jnp.array([S + 1], jnp.int32), config=cc)
  assert np.asarray(matched).tolist() == [S]  # the victim's block is served from the cache


@pytest.mark.skipif("key" not in inspect.signature(index_init).parameters,
                    reason="keyed placement not present")
def test_the_attacker_cannot_predict_placement():
  """The flood that shares one public home lands on as many buckets as random keys do."""
  capacity = 1024
  _, hashes, _ = craft_flood(namespace_seed("kvjax"), capacity, 64)
  index = index_init(capacity, key=12345)
  homes = np.stack([np.asarray(w) for w in home_buckets(jnp.asarray(hashes), index.placement_key,
                                                            index.num_buckets)], axis=1)
  # 64 keys over 128 buckets: ~ 50 distinct buckets per choice for random keys
  assert len(set(homes[:, 0].tolist())) > 35 and len(set(homes[:, 1].tolist())) > 35
