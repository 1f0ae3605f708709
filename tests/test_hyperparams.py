"""Eviction-policy parameters are arrays in the cache state: changing one changes what the
cache evicts without retracing the jitted step."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.models import LlamaConfig
from kvjax.models import decode_step
from kvjax.models import init_params

S = 2      # tokens per page
TICKS = 60  # clock steps between the hot block's last hit and the next block


def lfu_config(num_pages=3):
  return kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=S,
                           num_pages=num_pages, max_seqs=1, max_pages_per_seq=2,
                           eviction="lfu")


def traced_once(cfg):
  """attach / plan / release jitted for ``cfg``, each allowed a single trace."""
  attach = jax.jit(chex.assert_max_traces(
      lambda st, ids, tok, n: kvjax.attach_prefix(st, ids, tok, n, config=cfg), n=1))
  plan = jax.jit(chex.assert_max_traces(
      lambda st, tok, n: kvjax.plan_step(st, jnp.array([0]), tok, n, config=cfg), n=1))
  release = jax.jit(chex.assert_max_traces(lambda st, ids: kvjax.release(st, ids, config=cfg),
                                           n=1))
  return attach, plan, release


class LfuReference:
  """Plain-Python aged LFU over the events the cache reports (insert / hit per page)."""

  def __init__(self, half_life):
    self.half_life = half_life
    self.freq = {}   # page -> (aged count, stamp)

  def insert(self, page, t):
    self.freq[page] = (1.0, t)

  def hit(self, page, t):
    f, stamp = self.freq[page]
    self.freq[page] = (f * 2.0 ** (-(t - stamp) / self.half_life) + 1.0, t)

  def victim(self, pages, t):
    """The page of ``pages`` with the lowest aged count at clock ``t``."""
    def log_freq(p):
      f, stamp = self.freq[p]
      return math.log2(f) - (t - stamp) / self.half_life
    return min(pages, key=log_freq)


def serve(st, fns, block, ref):
  """One request: block ``block`` (one full page) and one more token. Returns the state,
  the page holding the block and the pages the step took."""
  attach, plan, release = fns
  prompt = jnp.array([[2 * block + 1, 2 * block + 2, 99]], jnp.int32)
  cached, st = attach(st, jnp.array([0]), prompt, jnp.array([3]))
  cached = int(cached[0])
  if cached:
    ref.hit(int(st.page_table[0, 0]), int(st.clock))
  rest = jnp.zeros((1, 3), jnp.int32).at[0, :3 - cached].set(prompt[0, cached:])
  step, st = plan(st, rest, jnp.array([3 - cached]))
  page = int(st.page_table[0, 0])
  if not cached:
    ref.insert(page, int(st.clock))
  taken = [int(p) for p in np.asarray(step.page_table[0]) if p >= 0]
  st = release(st, jnp.array([0]))
  return st, page, taken


def run(st, fns, half_life):
  """A hot block (served 4 times), TICKS idle steps, a new block, then a third block
  that must evict one of the two. Returns (victim, the reference's victim)."""
  attach = fns[0]
  ref = LfuReference(half_life)
  for _ in range(4):
    st, hot, _ = serve(st, fns, 1, ref)
  for _ in range(TICKS):   # an attach of a padding row only ticks the clock
    _, st = attach(st, jnp.array([-1]), jnp.zeros((1, 3), jnp.int32), jnp.array([0]))
  st, new, _ = serve(st, fns, 2, ref)
  want = ref.victim([hot, new], int(st.clock) + 2)   # the third block's plan_step clock
  st, _, taken = serve(st, fns, 3, ref)
  assert int(st.status) == 0
  got = [p for p in (hot, new) if p in taken]
  assert len(got) == 1, (hot, new, taken)
  return got[0], want, (hot, new)


def test_plan_step_traces_once_and_follows_the_state_params():
  cfg = lfu_config()
  fns = traced_once(cfg)
  st = kvjax.init(cfg)
  assert float(st.policy_params["half_life"]) == 4096.0
  slow, slow_want, (hot, new) = run(st, fns, 4096.0)
  assert slow == slow_want == new        # the hot block's 4 references still count
  fast_state = kvjax.set_policy_params(kvjax.init(cfg), cfg, half_life=10.0)
  fast, fast_want, pages = run(fast_state, fns, 10.0)
  assert pages == (hot, new)
  assert fast == fast_want == hot        # they aged away in TICKS steps: the hot block goes
  # the same state, parameters changed between steps: still the one trace
  st = kvjax.set_policy_params(fast_state, cfg, half_life=50.0)
  fns[1](st, jnp.zeros((1, 3), jnp.int32), jnp.array([1]))


def test_initial_params_come_from_the_config():
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=S, num_pages=3,
                          max_seqs=1, max_pages_per_seq=2, eviction="s3fifo",
                          eviction_params=(("small_frac", 0.25),))
  st = kvjax.init(cfg)
  assert {k: float(v) for k, v in st.policy_params.items()} == {"small_frac": 0.25,
                                                                 "partial_bias": 0.0}
  st2 = kvjax.set_policy_params(st, cfg, partial_bias=1.0)
  assert {k: float(v) for k, v in st2.policy_params.items()} == {"small_frac": 0.25,
                                                                  "partial_bias": 1.0}
  for k, v in st2.policy_params.items():
    assert v.shape == () and v.dtype == jnp.float32 and st.policy_params[k].dtype == v.dtype
  assert float(st.policy_params["partial_bias"]) == 0.0          # the input is unchanged
  assert cfg.eviction_params == (("small_frac", 0.25),)
  assert kvjax.init(lfu_config()).policy_params.keys() == {"half_life"}
  lru = dataclasses.replace(cfg, eviction="lru", eviction_params=())
  assert kvjax.init(lru).policy_params == {}


def test_set_policy_params_errors_name_the_parameter():
  cfg = lfu_config()
  st = kvjax.init(cfg)
  with pytest.raises(ValueError, match="unknown parameter.*nope"):
    kvjax.set_policy_params(st, cfg, nope=1.0)
  with pytest.raises(ValueError, match="half_life.*0.0"):
    kvjax.set_policy_params(st, cfg, half_life=0.0)
  with pytest.raises(ValueError, match="half_life.*nan"):
    kvjax.set_policy_params(st, cfg, half_life=float("nan"))
  lru = dataclasses.replace(cfg, eviction="lru", eviction_params=())
  with pytest.raises(ValueError, match="unknown parameter.*half_life"):
    kvjax.set_policy_params(kvjax.init(lru), lru, half_life=5.0)
  with pytest.raises(ValueError, match="policy_params"):   # a state of another policy
    kvjax.set_policy_params(kvjax.init(lru), cfg, half_life=5.0)


def test_decode_step_traces_once_across_params():
  mc = LlamaConfig(vocab_size=16, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=4, ffn_dim=8)
  cc = mc.cache_config(page_size=S, num_pages=4, max_seqs=1, max_pages_per_seq=2,
                       eviction="lfu")
  params = init_params(mc, jax.random.key(0))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, cache, tokens, num_new):
    return decode_step(params, cache, tokens, jnp.array([0]), num_new, config=mc,
                       cache_config=cc)

  tokens = jnp.array([[1, 2, 3]], jnp.int32)
  _, cache = step(params, kvjax.init(cc), tokens, jnp.array([3]))
  cache = kvjax.set_policy_params(cache, cc, half_life=50.0)
  _, cache = step(params, cache, tokens, jnp.array([1]))
  assert float(cache.policy_params["half_life"]) == 50.0
  assert int(cache.seq_lens[0]) == 4
