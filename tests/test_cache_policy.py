"""Eviction policies with history inside the cache, against the trace simulator."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.sim import simulator, traces
from kvjax.policies import adapter

S = 4  # tokens per page


def zipf_blocks(n, num_blocks, seed):
  rng = np.random.default_rng(seed)
  w = 1.0 / np.arange(1, num_blocks + 1) ** 0.9
  return rng.choice(num_blocks, size=n, p=w / w.sum()).tolist()


@functools.lru_cache(maxsize=None)
def runner(policy, num_pages, max_pages):
  """A config and its jitted attach / plan (slot 0) / release, compiled once per test run."""
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=S,
                          num_pages=num_pages, max_seqs=1, max_pages_per_seq=max_pages,
                          eviction=policy)
  attach = jax.jit(functools.partial(kvjax.attach_prefix, config=cfg))
  plan = jax.jit(lambda st, t, n: kvjax.plan_step(st, jnp.array([0]), t, n, config=cfg)[1])
  release = jax.jit(functools.partial(kvjax.release, config=cfg))
  return cfg, attach, plan, release


def run_prompts(prompts, policy, num_pages):
  """Serve each prompt (block ids, one page each, then one more token) in turn on one slot:
  attach_prefix reuses the cached leading pages, plan_step computes the rest (the pages
  that fill enter the index), release ends it.

  Returns the pages reused per request and the final state."""
  cfg, attach, plan, release = runner(policy, num_pages, 8)
  st, reused = kvjax.init(cfg), []
  t = 8 * S + 1
  for blocks in prompts:
    prompt = np.zeros(t, np.int32)
    n = len(blocks) * S + 1
    prompt[:n - 1] = [b * S + j + 1 for b in blocks for j in range(S)]
    cached, st = attach(st, jnp.array([0]), jnp.asarray(prompt)[None], jnp.array([n]))
    c = int(cached[0])
    reused.append(c // S)
    rest = np.zeros(t, np.int32)
    rest[:n - c] = prompt[c:n]
    st = plan(st, jnp.asarray(rest)[None], jnp.array([n - c]))
    st = release(st, jnp.array([0]))
  assert int(st.status) == 0
  return reused, st


def cache_hits(blocks, capacity, policy):
  """Each block is one request (one full page and one more token). The pool has one page
  more than ``capacity`` for the partial page in flight, which is free again when the
  next request comes, so ``capacity`` pages hold cached blocks."""
  reused, st = run_prompts([[b] for b in blocks], policy, capacity + 1)
  return [r == 1 for r in reused], st


@pytest.mark.parametrize("policy", ["lru", "fifo", "lru2"])
def test_cache_evicts_like_the_simulator(policy):
  """Order-based policies see the same events in the cache as in the simulator (a hit on
  attach; an eviction when a page is taken, an insertion when it fills), so the same
  blocks hit, reference by reference."""
  blocks = zipf_blocks(160, 24, seed=1)
  trace = traces.from_requests([[b] for b in blocks], [512] * len(blocks))
  want = simulator.simulate_hits(trace, 6, policy, path="scoring").tolist()
  got, _ = cache_hits(blocks, 6, policy)
  assert got == want
  assert 0 < sum(got) < len(got)


def test_policies_differ_in_the_cache():
  """A scan of one-off blocks evicts a hot block under LRU, not under LRU-2."""
  hot = [0, 1, 0, 1]
  scan = list(range(10, 14))
  blocks = hot + scan + [0, 1]
  lru, _ = cache_hits(blocks, 4, "lru")
  lru2, _ = cache_hits(blocks, 4, "lru2")
  assert lru[-2:] == [False, False] and lru2[-2:] == [True, True]


@pytest.mark.parametrize("policy", ["s3fifo", "lfu", "autofreq"])
def test_stateful_policies_run_in_the_cache_and_keep_their_state(policy):
  blocks = zipf_blocks(40, 12, seed=2)
  hits, st = cache_hits(blocks, 5, policy)
  fresh = kvjax.init(runner(policy, 6, 8)[0])
  leaves = jax.tree.leaves(st.policy)
  assert leaves and any((np.asarray(a) != np.asarray(b)).any()
                        for a, b in zip(leaves, jax.tree.leaves(fresh.policy)))
  assert 0 < sum(hits) < len(hits)


def test_admission_filter_keeps_declined_pages_out_of_the_index():
  """tinylfu turns away a block that would displace a block seen more often: its page is
  not indexed (nor are the pages after it in the chain), so the next request reuses
  fewer pages than under LRU; the bypassed references are still counted, so the chain
  gets in once it has been seen more often than what it displaces."""
  hot, new = [1, 2, 3], [11, 12, 13]
  prompts = [hot] * 4 + [new] * 2
  lru, _ = run_prompts(prompts, "lru", 4)
  tiny, _ = run_prompts(prompts, "tinylfu", 4)
  assert lru == [0, 3, 3, 3, 0, 3]
  # the first new page takes the free page (admitted); the second would displace a hot
  # block seen 4 times: declined, and the third has no indexed parent
  assert tiny == [0, 3, 3, 3, 0, 1]
  tiny_more, _ = run_prompts(prompts + [new] * 8, "tinylfu", 4)
  assert max(tiny_more[6:]) == 3, tiny_more


def test_admit_compares_with_what_the_page_held():
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=S, num_pages=2,
                          max_seqs=1, max_pages_per_seq=2, eviction="tinylfu")
  st = kvjax.init(cfg)
  old, new = jnp.array([[5, 1]], jnp.uint32), jnp.array([[6, 1]], jnp.uint32)
  meta = st.meta.replace(filled=jnp.array([S, 0]), block_hash=st.meta.block_hash.at[0].set(old[0]))
  seen = lambda pstate, key, n, kind: adapter.report(  # noqa: E731
      pstate, meta, adapter.events(jnp.zeros((n,), jnp.int32), jnp.repeat(key, n, 0),
                                   jnp.int32(1), kind=kind), st.policy_params, cfg)
  pstate = seen(st.policy, old, 3, "hit")
  ask = lambda ps, page: bool(adapter.admit(  # noqa: E731
      ps, meta, jnp.int32(2), new, jnp.array([page]), jnp.array([0]), st.policy_params,
      cfg)[0])
  assert not ask(pstate, 0)           # would displace a block seen 3 times
  assert ask(pstate, 1)               # the page was free
  assert ask(seen(pstate, new, 4, "miss"), 0)  # seen 4 times before (bypassed), 5 now


def test_oracle_policy_is_rejected_and_bad_kind_raises():
  with pytest.raises(ValueError, match="oracle"):
    kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=4,
                      max_seqs=1, max_pages_per_seq=2, eviction="min")
  with pytest.raises(ValueError, match="kind"):
    adapter.events(jnp.array([0]), None, jnp.int32(0), kind="touch")
