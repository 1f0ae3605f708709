"""Each policy's scoring on hand-made metadata where the right victim is known."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import policies as pol
from kvjax.layout.meta import init_meta
from kvjax.policies.scoring import Access
from kvjax.policies.scoring import NEVER
from kvjax.policies.scoring import argmax
from kvjax.policies.scoring import top_victims
from kvjax.policies.scoring import view

PAGE = 4  # tokens per page in these hand-made pools


def meta(n=4, **fields):
  """n full, unreferenced pages; ``fields`` override (lists)."""
  m = init_meta(n, PAGE).replace(filled=jnp.full((n,), PAGE, jnp.int32),
                                 access_count=jnp.ones((n,), jnp.int32))
  return m.replace(**{k: jnp.asarray(v, getattr(m, k).dtype) for k, v in fields.items()})


def victim(name, m, state, clock, **params):
  p = pol.get_policy(name)
  ids, ok = pol.score_and_evict(m, state, jnp.int32(clock), 1, p, pol.make_params(p, **params))
  assert bool(ok[0])
  return int(ids[0])


def access(slot, key=(9, 0), hit=False, inserted=False, evicted=False, evicted_key=(0, 0),
           clock=0, next_use=-1, filled=PAGE, position=0):
  return Access(jnp.int32(slot), jnp.asarray(key, jnp.uint32), jnp.bool_(hit),
                jnp.bool_(inserted), jnp.bool_(evicted), jnp.asarray(evicted_key, jnp.uint32),
                jnp.int32(clock), jnp.int32(next_use), jnp.int32(filled), jnp.int32(position))


# ---------------------------------------------------------------- shared rules


@pytest.mark.parametrize("name", sorted(pol.POLICIES))
def test_in_use_never_and_empty_first(name):
  p = pol.get_policy(name)
  m = meta(4, last_access=[0, 1, 2, 3], ref_count=[1, 0, 0, 1], filled=[PAGE, PAGE, 0, 0])
  s = p.score(p.init(4), m, jnp.int32(10), pol.make_params(p))
  assert np.isneginf(np.asarray(s)[[0, 3]]).all()
  assert np.asarray(s)[2] == np.inf
  ids, ok = pol.score_and_evict(m, p.init(4), jnp.int32(10), 3, p)
  assert ids.tolist()[:2] == [2, 1] and ok.tolist() == [True, True, False]


def test_argmax_matches_jnp():
  x = jax.random.normal(jax.random.PRNGKey(0), (1000,))
  x = x.at[700].set(9.0).at[900].set(9.0)
  assert int(argmax(x)) == 700 == int(jnp.argmax(x))
  assert top_victims(x, 3)[0].tolist()[:2] == [700, 900]


def test_unknown_policy_and_bad_params_raise():
  with pytest.raises(ValueError, match="nope"):
    pol.get_policy("nope")
  with pytest.raises(ValueError, match="half_life"):
    pol.make_params("lfu", half_life=0)
  with pytest.raises(ValueError, match="small_frac"):
    pol.make_params("s3fifo", small_frac=1.5)
  with pytest.raises(ValueError, match="unknown parameter"):
    pol.make_params("lru", half_life=3)
  with pytest.raises(ValueError, match="w_age"):
    pol.make_params("weighted", w_age=-1)


# ---------------------------------------------------------------- one victim per policy


def test_lru():
  assert victim("lru", meta(3, last_access=[5, 2, 7]), (), 9) == 1


def test_fifo_ignores_recency():
  p = pol.get_policy("fifo")
  st = p.init(3)
  for slot, t in ((0, 3), (1, 1), (2, 2)):
    st = p.update(st, meta(3), access(slot, inserted=True, clock=t), {})
  # page 1 was filled first, though it was used most recently
  assert victim("fifo", meta(3, last_access=[3, 9, 2]), st, 10) == 1


def test_lru2_prefers_pages_seen_once_then_oldest_second_access():
  p = pol.get_policy("lru2")
  st = p.init(3)
  for slot, t in ((0, 1), (1, 2), (2, 3)):
    st = p.update(st, meta(3), access(slot, inserted=True, clock=t), {})
  st = p.update(st, meta(3), access(0, hit=True, clock=4), {})
  st = p.update(st, meta(3), access(1, hit=True, clock=5), {})
  assert victim("lru2", meta(3), st, 6) == 2          # seen once: infinite 2-distance
  st = p.update(st, meta(3), access(2, hit=True, clock=7), {})
  assert victim("lru2", meta(3), st, 8) == 0          # oldest second-to-last access (t=1)


def test_lfu_counts_and_aging():
  p = pol.get_policy("lfu")
  st = pol.lfu_state([4.0, 1.0, 2.0], [0, 0, 0])
  assert victim("lfu", meta(3), st, 0, half_life=100.0) == 1
  st = pol.lfu_state([8.0, 2.0, 3.0], [0, 100, 100])
  # 8 accesses 10 half-lives ago are worth 8/1024 < 2
  assert victim("lfu", meta(3), st, 100, half_life=10.0) == 0
  assert victim("lfu", meta(3), st, 100, half_life=1e6) == 1
  st2 = p.update(st, meta(3), access(1, hit=True, clock=110), pol.make_params(p, half_life=10.0))
  assert float(view(st2.freq)[1]) == pytest.approx(2.0 * 0.5 + 1.0)


def test_s3fifo_probation_then_main():
  st = pol.s3fifo_state([True, False, False, True])
  m = meta(4, last_access=[1, 5, 6, 2])
  # probation holds 2 of 4 >= 25 %: its oldest (page 1) goes, not the LRU page 0
  assert victim("s3fifo", m, st, 10, small_frac=0.25) == 1
  # probation below 75 %: main's LRU page goes
  assert victim("s3fifo", m, st, 10, small_frac=0.75) == 0


def test_s3fifo_ghost_readmits_to_main():
  p = pol.get_policy("s3fifo")
  prm = pol.make_params(p)
  st = p.init(4)
  st = p.update(st, meta(4), access(2, key=(7, 0), inserted=True, evicted=True,
                                    evicted_key=(5, 0)), prm)
  assert not bool(view(st.in_main)[2])
  # the block evicted from probation (key 5) comes back: straight into main
  st = p.update(st, meta(4), access(3, key=(5, 0), inserted=True), prm)
  assert bool(view(st.in_main)[3])
  st = p.update(st, meta(4), access(2, key=(7, 0), hit=True), prm)
  assert bool(view(st.in_main)[2])  # a hit in probation promotes


def test_s3fifo_partial_pages_go_first_in_probation():
  st = pol.s3fifo_state([False, False, True])
  m = meta(3, last_access=[1, 5, 0], filled=[PAGE, 1, PAGE])
  assert victim("s3fifo", m, st, 10, small_frac=0.3) == 0
  assert victim("s3fifo", m, st, 10, small_frac=0.3, partial_bias=1.0) == 1


def test_weighted_factors():
  m = meta(3, last_access=[0, 0, 0], access_count=[5, 1, 3])
  assert victim("weighted", m, (), 10, w_age=0.0) == 1                       # frequency
  m = meta(3, last_access=[9, 1, 5], access_count=[1, 1, 1])
  assert victim("weighted", m, (), 10, w_freq=0.0) == 1                      # age
  m = meta(3, filled=[4, 1, 3])
  assert victim("weighted", m, (), 0, w_age=0.0, w_freq=0.0, w_size=1.0) == 1  # size
  m = meta(3, position=[7, 0, 3])
  assert victim("weighted", m, (), 0, w_age=0.0, w_freq=0.0, w_cost=1.0) == 1  # recompute cost
  m = meta(3, parent=[-1, 0, 0])  # page 0 is the prefix of pages 1 and 2
  v = victim("weighted", m, (), 0, w_age=0.0, w_freq=0.0, w_context=1.0)
  assert v in (1, 2)


def test_greedydual_lowest_credit_and_inflation():
  p = pol.get_policy("greedydual")
  prm = pol.make_params(p, pos_weight=0.0, freq_exp=0.0)
  st = pol.greedydual_state([5.0, 2.0, 9.0])
  assert victim("greedydual", meta(3), st, 0) == 1
  st = p.update(st, meta(3), access(1, inserted=True, evicted=True, evicted_key=(3, 0),
                                    filled=PAGE), prm)
  assert float(st.inflation) == 2.0 and float(view(st.credit)[1]) == 3.0  # L + cost (one full page)
  cost = pol.recompute_cost(jnp.int32(PAGE), jnp.int32(10), PAGE, 0.5)
  assert float(cost) == 6.0


def test_lecar_follows_heavier_expert_and_learns():
  p = pol.get_policy("lecar")
  prm = pol.make_params(p, half_life=1e6)
  m = meta(2, last_access=[0, 5])
  lfu = pol.lfu_state([9.0, 1.0], [0, 5])
  st = p.init(2)._replace(lfu=lfu)
  assert victim("lecar", m, st, 6) == 0                                  # tie: LRU expert
  st_lfu = st._replace(weights=jnp.array([0.2, 0.8]))
  assert victim("lecar", m, st_lfu, 6) == 1                              # LFU expert
  # LRU evicts key 4; it is requested again at once: LRU loses weight
  st = p.update(st, m, access(0, key=(8, 0), inserted=True, evicted=True, evicted_key=(4, 0),
                               clock=6), prm)
  st = p.update(st, m, access(-1, key=(4, 0), clock=7), prm)
  assert float(st.weights[1]) > float(st.weights[0])


def test_tinylfu_admits_only_more_frequent_blocks():
  p = pol.get_policy("tinylfu")
  prm = pol.make_params(p)
  st = p.init(4)
  m = meta(4, block_hash=[[1, 0], [2, 0], [3, 0], [4, 0]], last_access=[0, 1, 2, 3])
  for t in range(3):
    st = p.update(st, m, access(-1, key=(50, 0), clock=t), prm)   # block 50 seen 3 times
  st = p.update(st, m, access(0, key=(1, 0), hit=True, clock=4), prm)  # victim seen once
  v = victim("tinylfu", m, st, 5)
  assert v == 0  # the filter leaves LRU's choice alone
  assert bool(p.admit(st, m, access(-1, key=(50, 0)), v, prm))
  assert not bool(p.admit(st, m, access(-1, key=(77, 0)), v, prm))  # first seen: bypass
  empty = m.replace(filled=m.filled.at[v].set(0))
  assert bool(p.admit(st, empty, access(-1, key=(77, 0)), v, prm))  # free page: always


def test_freqlru_credit_and_retained_count():
  p = pol.get_policy("freqlru")
  prm = pol.make_params(p, credit=100.0)
  m = meta(3, last_access=[0, 50, 90])
  # page 0 is oldest but was referenced 4 times: 100 * log2(4) = 200 steps of credit
  assert victim("freqlru", m, pol.freqlru_state([4, 1, 1]), 100, credit=100.0) == 1
  assert victim("freqlru", m, pol.freqlru_state([4, 1, 1]), 100, credit=1.0) == 0
  # a partial page goes first whatever its credit
  assert victim("freqlru", meta(3, filled=[PAGE, PAGE, 1]), pol.freqlru_state([1, 1, 9]), 0) == 2
  st = pol.freqlru_state([4, 1, 1])
  st = p.update(st, m, access(0, key=(6, 0), inserted=True, evicted=True, evicted_key=(3, 0)),
                prm)
  assert int(view(st.count)[0]) == 1
  # key 3 returns: its 4 references are remembered
  st = p.update(st, m, access(1, key=(3, 0), inserted=True, evicted=True, evicted_key=(8, 0)),
                prm)
  assert int(view(st.count)[1]) == 5
  assert not bool(p.admit(st, m, access(-1, filled=1), 0, prm))
  assert bool(p.admit(st, m, access(-1, filled=PAGE), 0, prm))


def test_classfreq_first_seen_bonus_interval_and_ghost():
  p = pol.get_policy("classfreq")
  prm = dict(credit=100.0, interval_weight=0.0)
  m = meta(3, last_access=[0, 60, 90])
  # no learned difference between classes yet: plain freqlru (page 1 seen twice is kept)
  st = pol.classfreq_state([1, 2, 1], klass=[4, 16, 2])
  assert victim("classfreq", m, st, 100, **prm) == 0
  # class 4 is learned to come back as often as blocks seen twice: page 0 (first seen, but
  # of that class) is credited like a block seen twice and outlives page 2 (class 2)
  rate = [0.25] * 16 + [0.5]
  rate[4] = 0.5
  st = pol.classfreq_state([1, 1, 1], klass=[4, 2, 2], reuse_rate=rate)
  assert float(pol.class_bonus(st)[4]) > 0.99 and float(pol.class_bonus(st)[2]) == 0.0
  assert victim("classfreq", meta(3, last_access=[0, 10, 90]), st, 100, **prm) == 1
  # interval: two blocks seen twice, same age; the one that came back slowly goes first
  st = pol.classfreq_state([2, 2, 2], gap=[10, 5000, 10], klass=[16, 16, 16])
  m3 = meta(3, last_access=[50, 50, 60])
  assert victim("classfreq", m3, st, 100, credit=100.0, interval_weight=10.0) == 1
  assert victim("classfreq", m3, st, 100, credit=100.0, interval_weight=0.0) == 0
  # a partial page goes first; a partial block does not displace a full one
  assert victim("classfreq", meta(3, filled=[PAGE, PAGE, 1]), pol.classfreq_state([1, 1, 9]),
                0) == 2
  assert not bool(p.admit(st, m, access(-1, filled=1), 0, pol.make_params(p)))
  # ghost: an evicted block's count, class and last reference come back with it, and its
  # class is credited with a reuse
  prm = pol.make_params(p)
  st = pol.classfreq_state([3, 1, 1], klass=[-1, 6, -1], last=[40, 41, 42])
  r0 = st.reused
  st = p.update(st, m, access(1, key=(6, 0), inserted=True, evicted=True, evicted_key=(3, 0),
                              clock=50, position=1), prm)
  assert int(view(st.count)[1]) == 1
  st = p.update(st, m, access(2, key=(3, 0), inserted=True, evicted=True, evicted_key=(8, 0),
                              clock=80, position=5), prm)
  assert int(view(st.count)[2]) == 2 and int(view(st.gap)[2]) == 80 - 41
  assert int(view(st.klass)[2]) == 16  # seen twice
  assert float(st.reused[6] - r0[6]) == 1.0
  # the partial block after a first-seen full block marks it as its sequence's last full one
  st = pol.classfreq_state([1, 1, 1], klass=[-1, -1, -1])
  st = p.update(st, m, access(0, key=(5, 0), inserted=True, clock=1, position=3), prm)
  k = int(view(st.klass)[0])
  assert k == int(pol.first_seen_class(3, 0, 0))
  st = p.update(st, m, access(-1, key=(7, 0), clock=2, position=4, filled=1), prm)
  assert int(view(st.klass)[0]) == k + 1


def test_autoclass_follows_best_miniature():
  p = pol.get_policy("autoclass")
  prm = pol.make_params(p, credit=100.0)
  assert pol.autoclass_credits(prm).tolist() == [0.0, 25.0, 100.0, 400.0]
  st = p.init(16)
  assert float(pol.auto_credit(st, pol.autoclass_credits(prm))) == 0.0  # no evidence: LRU
  m = meta(3, last_access=[0, 50, 90])
  main = pol.classfreq_state([4, 1, 1])
  lru_like = st._replace(main=main, mini_hits=jnp.array([9.0, 0, 0, 0]))
  freq_like = st._replace(main=main, mini_hits=jnp.array([0, 0, 9.0, 0]))
  assert victim("autoclass", m, lru_like, 100, credit=100.0) == 0
  assert victim("autoclass", m, freq_like, 100, credit=100.0) == 1


def test_classfreq_bad_params_raise():
  for name, v in (("credit", -1.0), ("interval_weight", -2.0), ("interval_scale", 0.0)):
    with pytest.raises(ValueError, match=f"{name}.*{v}"):
      pol.make_params("classfreq", **{name: v})


def test_min_and_bypass():
  p = pol.get_policy("min-bypass")
  st = pol.min_state([10, NEVER, 30])
  assert victim("min", meta(3), st, 0) == 1
  st = pol.min_state([10, 40, 30])
  assert victim("min", meta(3), st, 0) == 1
  assert bool(p.admit(st, meta(3), access(-1, next_use=20), 1, {}))
  assert not bool(p.admit(st, meta(3), access(-1, next_use=50), 1, {}))


def test_scoring_jits_once():
  p = pol.get_policy("s3fifo")

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(m, s, c, prm):
    return pol.score_and_evict(m, s, c, 2, p, prm)

  f(meta(8), p.init(8), jnp.int32(1), pol.make_params(p))
  # new metadata, clock and parameter values: the same trace
  f(meta(8, last_access=list(range(8))), p.init(8), jnp.int32(3),
    pol.make_params(p, small_frac=0.5))


def test_autofreq_follows_best_miniature():
  p = pol.get_policy("autofreq")
  st = p.init(16)
  assert float(pol.auto_credit(st)) == pol.MINI_CREDITS[0]  # no evidence yet: LRU
  st = st._replace(mini_hits=jnp.array([0.0, 0.0, 5.0, 1.0, 0.0]))
  assert float(pol.auto_credit(st)) == pol.MINI_CREDITS[2]
  m = meta(3, last_access=[0, 50, 90])
  main = pol.freqlru_state([4, 1, 1])
  lru_like = st._replace(main=main, mini_hits=jnp.array([9.0, 0, 0, 0, 0]))
  freq_like = st._replace(main=main, mini_hits=jnp.array([0, 0, 0, 0, 9.0]))
  assert victim("autofreq", m, lru_like, 100) == 0
  assert victim("autofreq", m, freq_like, 100) == 1
