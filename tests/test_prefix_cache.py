"""Prefix reuse in the cache: exact logits, tenant isolation, colliding hashes, eviction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.models import LlamaConfig
from kvjax.models import decode_step
from kvjax.models import forward
from kvjax.models import init_params
from kvjax.models.generate import prefill

CFG = LlamaConfig.small()
S = 4


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(3))


# jitted once per config (an eager call compiles each of their ops on its own: ~10 s a test)
plan = jax.jit(kvjax.plan_step, static_argnames="config")
attach = jax.jit(kvjax.attach_prefix, static_argnames="config")


def cache_config(**kw):
  base = dict(page_size=S, num_pages=24, max_seqs=4, max_pages_per_seq=12)
  return CFG.cache_config(**{**base, **kw})


def run_prompt(params, cache, cc, prompt, sid, seeds=None):
  """Prefill one prompt (reusing cached pages); logits of its last token and tokens reused."""
  stats = {}
  logits, cache = prefill(params, cache, [prompt], [sid], config=CFG, cache_config=cc,
                          chunk_size=8, seeds=seeds, stats=stats)
  return logits[0], cache, stats["reused"]


def want_logits(params, prompt):
  return np.asarray(forward(params, jnp.asarray([prompt], jnp.int32), CFG))[0, -1]


@pytest.mark.parametrize("shared, expect_reused", [
    (0, 0),    # nothing in common
    (9, 8),    # two full pages and one token of a third: the partial page is recomputed
    (12, 12),  # exactly three full pages
    (21, 20),  # the whole first prompt (it ends inside page 6): 5 full pages
])
def test_logits_with_prefix_reuse_equal_those_without(params, shared, expect_reused):
  rng = np.random.default_rng(shared)
  first = rng.integers(1, CFG.vocab_size, 21).tolist()
  second = first[:shared] + rng.integers(1, CFG.vocab_size, 7).tolist()
  if shared < len(first):
    second[shared] = (first[shared] % (CFG.vocab_size - 1)) + 1  # diverge right at `shared`
  cc = cache_config()
  cache = kvjax.init(cc)
  got, cache, reused = run_prompt(params, cache, cc, first, 0)
  assert reused == 0
  np.testing.assert_allclose(got, want_logits(params, first), atol=1e-4, rtol=1e-4)
  cache = kvjax.release(cache, jnp.array([0]), config=cc)  # pages stay cached at reference 0
  got, cache, reused = run_prompt(params, cache, cc, second, 1)
  assert reused == expect_reused
  np.testing.assert_allclose(got, want_logits(params, second), atol=1e-4, rtol=1e-4)
  st = cache.stats
  assert int(st.prefix_hit_tokens) == expect_reused
  assert int(st.prefix_hit_pages) == expect_reused // S
  assert int(st.prefix_query_tokens) == len(first) + len(second)
  assert int(st.prefix_query_pages) == (len(first) - 1) // S + (len(second) - 1) // S
  assert int(cache.status) == 0


def test_live_sequences_share_pages_and_decode_exactly(params):
  """Two live sequences on one cached prefix, then decoding each: shared pages untouched."""
  rng = np.random.default_rng(1)
  system = rng.integers(1, CFG.vocab_size, 16).tolist()
  a = system + [5, 6, 7]
  b = system + [9, 10]
  cc = cache_config()
  cache = kvjax.init(cc)
  _, cache, _ = run_prompt(params, cache, cc, a, 0)
  _, cache, reused = run_prompt(params, cache, cc, b, 1)
  assert reused == 16
  np.testing.assert_array_equal(cache.page_table[0, :4], cache.page_table[1, :4])
  assert np.all(np.asarray(cache.meta.ref_count)[np.asarray(cache.page_table[0, :4])] == 2)
  seqs = [list(a), list(b)]
  for step in range(6):  # decode: each appends its own token, crossing a page boundary
    toks = [11 + step, 40 + step]
    logits, cache = decode_step(params, cache, jnp.asarray([[toks[0]], [toks[1]]], jnp.int32),
                                jnp.array([0, 1]), jnp.array([1, 1]), config=CFG,
                                cache_config=cc)
    for r in range(2):
      seqs[r].append(toks[r])
      np.testing.assert_allclose(np.asarray(logits)[r, 0], want_logits(params, seqs[r]),
                                 atol=1e-4, rtol=1e-4)
  assert int(cache.status) == 0


def test_tenants_with_different_salts_never_share(params):
  cc = cache_config()
  prompt = list(range(1, 20))
  cache = kvjax.init(cc)
  seed_a = np.asarray(kvjax.tenant_seed(cc, tenant_salt="a"))[None]
  seed_b = np.asarray(kvjax.tenant_seed(cc, tenant_salt="b"))[None]
  _, cache, _ = run_prompt(params, cache, cc, prompt, 0, seeds=seed_a)
  _, cache, reused_b = run_prompt(params, cache, cc, prompt, 1, seeds=seed_b)
  _, cache, reused_a = run_prompt(params, cache, cc, prompt, 2, seeds=seed_a)
  assert reused_b == 0 and reused_a == 16
  assert not set(np.asarray(cache.page_table[1])[:4]) & set(np.asarray(cache.page_table[0])[:4])


def colliding_hash(parent, tokens):
  """Every block of every chain gets the same hash: only verification keeps pages apart."""
  del tokens
  return jnp.ones(parent.shape, jnp.uint32) * jnp.uint32(7)


@pytest.mark.parametrize("tenants", [False, True])
def test_always_colliding_hash_never_shares_a_wrong_page(params, tenants):
  """Many prompts from a small alphabet under eviction pressure: outputs stay exact."""
  cc = cache_config(num_pages=16, hash_fn=colliding_hash)
  rng = np.random.default_rng(7)
  stems = [rng.integers(1, 4, 8).tolist() for _ in range(3)]
  cache = kvjax.init(cc)
  reused_total = 0
  for i in range(12):
    prompt = stems[i % 3][: 4 + 4 * (i % 2)] + rng.integers(1, 4, 1 + i % 6).tolist()
    sid = i % 4
    seeds = None
    if tenants:
      seeds = np.asarray(kvjax.tenant_seed(cc, tenant_salt=i % 2))[None]
    got, cache, reused = run_prompt(params, cache, cc, prompt, sid, seeds=seeds)
    reused_total += reused
    np.testing.assert_allclose(got, want_logits(params, prompt), atol=1e-4, rtol=1e-4)
    cache = kvjax.release(cache, jnp.array([sid]), config=cc)
  assert reused_total > 0  # the index did serve matches that verification accepted
  assert int(cache.status) == 0


def test_released_pages_stay_cached_and_eviction_takes_tails_first(params):
  cc = cache_config(num_pages=8, max_pages_per_seq=8)
  cache = kvjax.init(cc)
  prompt = list(range(1, 14))  # 3 full pages + 1 partial
  _, cache, _ = run_prompt(params, cache, cc, prompt, 0)
  pages = np.asarray(cache.page_table[0, :4])
  cache = kvjax.release(cache, jnp.array([0]), config=cc)
  ref = np.asarray(cache.meta.ref_count)
  hashed = np.any(np.asarray(cache.meta.block_hash) != 0, axis=-1)
  assert not ref.any() and hashed[pages[:3]].all() and not hashed[pages[3]]
  # A new 22-token prompt needs 6 pages: 5 free ones, then one cached page: the chain's tail.
  _, cache, reused = run_prompt(params, cache, cc, [50 + i for i in range(22)], 1)
  hashed = np.any(np.asarray(cache.meta.block_hash) != 0, axis=-1)
  assert reused == 0 and int(cache.stats.evictions) == 1
  assert pages[2] in np.asarray(cache.page_table[1])
  cache = kvjax.release(cache, jnp.array([1]), config=cc)
  # The head of the chain is still cached and still matches.
  _, cache, reused = run_prompt(params, cache, cc, prompt[:9] + [99], 2)
  assert reused == 8


def test_attach_prefix_bad_rows_are_flagged():
  cc = cache_config()
  cache = kvjax.init(cc)
  _, cache = plan(cache, jnp.array([0]), jnp.ones((1, 5), jnp.int32), jnp.array([5]),
                             config=cc)
  cached, cache = attach(cache, jnp.array([0, 1, 1]), jnp.ones((3, 8), jnp.int32),
                                      jnp.array([8, 8, 8]), config=cc)
  # Row 0: sequence not empty; rows 1 and 2: the same id twice.
  np.testing.assert_array_equal(cached, [0, 0, 0])
  assert int(cache.status) == kvjax.BAD_INPUT
  with pytest.raises(ValueError, match="must share the batch size"):
    attach(cache, jnp.array([0]), jnp.ones((2, 8), jnp.int32), jnp.array([8]),
                        config=cc)


def parent_blind_hash(parent, tokens):
  """Collides whenever two blocks start with the same token, whatever their prefix."""
  del parent
  return jnp.stack([tokens[..., 0].astype(jnp.uint32) + 1, jnp.ones_like(tokens[..., 0],
                                                                           jnp.uint32)], -1)


def test_reused_parent_page_orphans_its_cached_child(params):
  """A cached child must not be matched under new content of its reused parent page."""
  cc = cache_config(num_pages=6, hash_fn=parent_blind_hash)
  cache = kvjax.init(cc)
  a, b = [1, 2, 3, 4], [5, 6, 7, 8]
  _, cache, _ = run_prompt(params, cache, cc, a + b + [9], 0)
  p0, p1 = (int(p) for p in np.asarray(cache.page_table[0, :2]))
  cache = kvjax.release(cache, jnp.array([0]), config=cc)
  _, cache, _ = run_prompt(params, cache, cc, list(range(40, 53)), 3)  # holds the 4 free pages
  # A policy that keeps the child longer than its parent: p1 looks recently used.
  meta = cache.meta
  cache = cache.replace(meta=meta.replace(last_access=meta.last_access.at[p1].set(cache.clock)))
  x = [10, 11, 12, 13]
  _, cache, _ = run_prompt(params, cache, cc, x, 1)  # one page: p0 is evicted and holds x
  assert int(cache.page_table[1, 0]) == p0 and int(cache.stats.evictions) == 1
  cache = kvjax.release(cache, jnp.array([1, 3]), config=cc)
  # x + b: block 0 is p0 (verified, new content); block 1's hash finds p1, whose
  # tokens are b and whose parent was p0 -- but p1 was computed after a, not x.
  prompt = x + b + [9]
  got, cache, reused = run_prompt(params, cache, cc, prompt, 2)
  assert reused == 4
  np.testing.assert_allclose(got, want_logits(params, prompt), atol=1e-4, rtol=1e-4)


def test_page_chained_onto_a_lost_insert_is_not_indexed():
  """Found by check_invariants in the tenant property test: a row computes a block that is
  indexed already (its page stays private) and, in the same step, the next block. That next
  page chains onto an unindexed page, so no verified match can ever reach it: it must not
  be indexed (before the fix it was, a dead entry whose hash disagreed with its parent)."""
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2,
                          num_pages=8, max_seqs=2, max_pages_per_seq=4)
  st = kvjax.init(cfg)
  _, st = plan(st, jnp.array([0]), jnp.array([[1, 2, 1]]), jnp.array([3]),
                          config=cfg)
  _, st = plan(st, jnp.array([1]), jnp.array([[1, 2, 3, 1, 1]]), jnp.array([5]),
                          config=cfg)
  kvjax.check_invariants(st, cfg)
  hashed = np.flatnonzero(np.asarray(st.meta.block_hash).any(axis=1))
  assert hashed.tolist() == [int(st.page_table[0, 0])]     # only seq 0's first page
  assert int(jnp.sum(st.index.values >= 0)) == 1
  # The same prompt in one sequence is still indexed block by block.
  _, st = plan(st, jnp.array([0]), jnp.array([[3, 1, 1, 1]]), jnp.array([3]),
                          config=cfg)
  kvjax.check_invariants(st, cfg)
  assert int(jnp.sum(st.index.values >= 0)) == 3
