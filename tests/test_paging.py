"""Paging: hand-worked plans, attention against a dense reference, refusal, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax

CFG = kvjax.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=4, page_size=4, num_pages=8,
                        max_seqs=3, max_pages_per_seq=4)
plan_step = jax.jit(kvjax.plan_step, static_argnames="config")
release = jax.jit(kvjax.release, static_argnames="config")
fork = jax.jit(kvjax.fork, static_argnames="config")


def layer(pages, i=0):
  return jax.tree.map(lambda a: a[i], pages)


def read_seq(state, sid, field="tokens"):
  """A sequence's cached history read back through its page table (numpy)."""
  s = state.page_table.shape[1] and state.meta.tokens.shape[1]
  n = int(state.seq_lens[sid])
  pages = np.asarray(state.page_table[sid])
  src = np.asarray(state.meta.tokens if field == "tokens" else state.k.data[0])
  return np.stack([src[pages[i // s], i % s] for i in range(n)]) if n else src[:0, 0]


def test_prefill_then_decode_hand_worked():
  st = kvjax.init(CFG)
  plan, st = plan_step(st, jnp.array([0, 1]), jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 0, 0]]),
                       jnp.array([6, 3]), config=CFG)
  # Free pages are taken in index order: seq 0 gets pages 0, 1; seq 1 gets page 2.
  np.testing.assert_array_equal(st.page_table, [[0, 1, -1, -1], [2, -1, -1, -1], [-1] * 4])
  np.testing.assert_array_equal(plan.slots, [[0, 1, 2, 3, 4, 5], [8, 9, 10, 32, 32, 32]])
  np.testing.assert_array_equal(plan.positions[0], np.arange(6))
  np.testing.assert_array_equal(st.seq_lens, [6, 3, 0])
  np.testing.assert_array_equal(st.meta.ref_count, [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(st.meta.filled[:3], [4, 2, 3])
  plan, st = plan_step(st, jnp.array([1, 0]), jnp.array([[10], [11]]), jnp.array([1, 1]),
                       config=CFG)
  np.testing.assert_array_equal(plan.slots, [[11], [6]])
  np.testing.assert_array_equal(plan.kv_lens, [4, 7])
  plan, st = plan_step(st, jnp.array([1]), jnp.array([[12]]), jnp.array([1]), config=CFG)
  np.testing.assert_array_equal(st.page_table[1], [2, 3, -1, -1])  # crossed into a new page
  np.testing.assert_array_equal(read_seq(st, 1), [7, 8, 9, 10, 12])
  np.testing.assert_array_equal(read_seq(st, 0), [1, 2, 3, 4, 5, 6, 11])
  assert int(st.clock) == 3 and int(st.stats.tokens_planned) == 12
  assert int(st.status) == 0


def dense_attention(q, k, v, q_pos):
  """Reference: q [T, Hq, D] at absolute positions q_pos over k, v [N, H, D], causal."""
  hq, h = q.shape[1], k.shape[1]
  kk = np.repeat(k, hq // h, axis=1)
  vv = np.repeat(v, hq // h, axis=1)
  logits = np.einsum("thd,nhd->htn", q, kk) / np.sqrt(q.shape[-1])
  logits = np.where(np.arange(k.shape[0])[None, None] <= q_pos[None, :, None], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("htn,nhd->thd", w, vv)


@pytest.mark.parametrize("hq", [2, 6])
def test_attend_matches_dense_reference_over_chunks(hq):
  """Sequences of different lengths, written in chunks of different sizes, crossing pages."""
  rng = np.random.default_rng(0)
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=4, page_size=4, num_pages=16,
                          max_seqs=3, max_pages_per_seq=5)
  st = kvjax.init(cfg)
  hist_k = {i: np.zeros((0, 2, 4), np.float32) for i in range(3)}
  hist_v = {i: np.zeros((0, 2, 4), np.float32) for i in range(3)}
  chunks = [(5, 3, 7), (1, 6, 2), (1, 1, 1), (4, 0, 3)]
  for step, ns in enumerate(chunks):
    t = max(ns)
    k = rng.normal(size=(3, t, 2, 4)).astype(np.float32)
    v = rng.normal(size=(3, t, 2, 4)).astype(np.float32)
    q = rng.normal(size=(3, t, hq, 4)).astype(np.float32)
    plan, st = plan_step(st, jnp.arange(3), jnp.zeros((3, t), jnp.int32), jnp.array(ns),
                         config=cfg)
    k_l, v_l = kvjax.layer_pages(st, 0)
    kl = kvjax.write(k_l, plan, jnp.asarray(k))
    vl = kvjax.write(v_l, plan, jnp.asarray(v))
    st = kvjax.with_layer_pages(st, 0, kl, vl)
    out = np.asarray(jax.jit(kvjax.attend)(jnp.asarray(q), kl, vl, plan).out)
    for b, n in enumerate(ns):
      hist_k[b] = np.concatenate([hist_k[b], k[b, :n]])
      hist_v[b] = np.concatenate([hist_v[b], v[b, :n]])
      if n == 0:
        continue
      q_pos = np.arange(len(hist_k[b]) - n, len(hist_k[b]))
      want = dense_attention(q[b, :n], hist_k[b], hist_v[b], q_pos)
      np.testing.assert_allclose(out[b, :n], want, atol=1e-5, rtol=1e-5)
  assert int(st.status) == 0


def test_out_of_pages_refuses_row_and_changes_nothing_else():
  st = kvjax.init(CFG)
  plan, st = plan_step(st, jnp.array([0]), jnp.ones((1, 16), jnp.int32), jnp.array([16]),
                       config=CFG)  # 4 pages
  plan, st = plan_step(st, jnp.array([1]), 2 * jnp.ones((1, 12), jnp.int32), jnp.array([12]),
                       config=CFG)  # 3 pages: 1 left
  before = st
  plan, st = plan_step(st, jnp.array([2, 1]), 3 * jnp.ones((2, 8), jnp.int32), jnp.array([8, 1]),
                       config=CFG)
  # Row 0 needs 2 pages and only 1 is free: refused. Row 1 needs 1: granted.
  np.testing.assert_array_equal(plan.refused, [True, False])
  np.testing.assert_array_equal(plan.seq_status, [kvjax.OUT_OF_PAGES, 0])
  assert int(st.status) == kvjax.OUT_OF_PAGES
  assert int(st.seq_lens[2]) == 0 and int(st.seq_lens[1]) == 13
  assert not bool(jnp.any(plan.valid[0]))
  np.testing.assert_array_equal(read_seq(st, 0), read_seq(before, 0))
  np.testing.assert_array_equal(read_seq(st, 1), [2] * 12 + [3])
  assert int(st.stats.refused) == 1


def test_sequence_full_is_flagged():
  st = kvjax.init(CFG)
  plan, st = plan_step(st, jnp.array([0]), jnp.ones((1, 17), jnp.int32), jnp.array([17]),
                       config=CFG)  # max 16 tokens per sequence
  assert bool(plan.refused[0]) and int(st.status) == kvjax.SEQ_FULL
  assert int(st.seq_lens[0]) == 0 and int(st.meta.ref_count.sum()) == 0
  assert kvjax.status_names(int(st.status)) == ["SEQ_FULL"]


def test_checked_mode_raises_and_host_check():
  cfg = CFG.__class__(**{**CFG.__dict__, "num_pages": 1, "checked": True})
  # eager: raised as CacheStatusError naming the row, with the usable state
  with pytest.raises(kvjax.CacheStatusError, match="OUT_OF_PAGES") as err:
    kvjax.plan_step(kvjax.init(cfg), jnp.array([0]), jnp.ones((1, 8), jnp.int32),
                    jnp.array([8]), config=cfg)
  assert err.value.rows == {0: ["OUT_OF_PAGES"]}
  assert int(err.value.state.seq_lens[0]) == 0
  # jitted and donated: kvjax.checked raises after the step, and the cache is not lost
  step = kvjax.checked(jax.jit(kvjax.plan_step, static_argnames="config", donate_argnums=0))
  st = kvjax.init(cfg)
  _, st = step(st, jnp.array([0]), jnp.ones((1, 4), jnp.int32), jnp.array([4]), config=cfg)
  with pytest.raises(kvjax.CacheStatusError, match="seq 1: OUT_OF_PAGES") as err:
    step(st, jnp.array([1]), jnp.ones((1, 4), jnp.int32), jnp.array([4]), config=cfg)
  kept = kvjax.clear_status(err.value.state)
  assert int(kept.seq_lens[0]) == 4 and int(kept.meta.ref_count[0]) == 1
  _, kept = step(kvjax.release(kept, jnp.array([0]), config=cfg), jnp.array([1]),
                 jnp.ones((1, 4), jnp.int32), jnp.array([4]), config=cfg)
  assert int(kept.seq_lens[1]) == 4
  _, st = plan_step(kvjax.init(CFG), jnp.array([0]), jnp.ones((1, 17), jnp.int32),
                    jnp.array([17]), config=CFG)
  with pytest.raises(kvjax.CacheStatusError, match="SEQ_FULL"):
    kvjax.check_status(st)
  kvjax.check_status(kvjax.clear_status(st))


def test_bad_rows_are_refused_not_written():
  st = kvjax.init(CFG)
  plan, st = plan_step(st, jnp.array([0, 0, 5, -1, 1]), jnp.ones((5, 2), jnp.int32),
                       jnp.array([1, 1, 1, 2, 3]), config=CFG)
  # Duplicate id 0, out-of-range 5, padding -1 (fine), num_new 3 > T = 2.
  np.testing.assert_array_equal(plan.refused, [True, True, True, False, True])
  assert int(st.status) == kvjax.BAD_INPUT
  assert int(st.meta.ref_count.sum()) == 0 and int(st.seq_lens.sum()) == 0


def test_fork_shares_pages_and_copies_partial_page_on_write():
  st = kvjax.init(CFG)
  plan, st = plan_step(st, jnp.array([0]), jnp.arange(1, 7)[None], jnp.array([6]), config=CFG)
  k = jnp.arange(6, dtype=jnp.float32)[None, :, None, None] * jnp.ones((1, 6, 2, 4))
  st = st.replace(k=jax.tree.map(lambda a, x: a.at[0].set(x), st.k,
                                 kvjax.write(layer(st.k), plan, k)))
  st = fork(st, jnp.array([0]), jnp.array([1]), config=CFG)
  np.testing.assert_array_equal(st.page_table[1], st.page_table[0])
  np.testing.assert_array_equal(st.meta.ref_count[:2], [2, 2])
  # Seq 1 appends into the shared partial page: it gets a private copy first.
  plan, st = plan_step(st, jnp.array([1]), jnp.array([[70]]), jnp.array([1]), config=CFG)
  assert int(plan.cow_src[0]) == 1 and int(plan.cow_dst[0]) == 2
  kl = kvjax.write(layer(st.k), plan, jnp.full((1, 1, 2, 4), 70.0))
  st = st.replace(k=jax.tree.map(lambda a, x: a.at[0].set(x), st.k, kl))
  np.testing.assert_array_equal(st.page_table[:2, :2], [[0, 1], [0, 2]])
  np.testing.assert_array_equal(st.meta.ref_count[:3], [2, 1, 1])
  np.testing.assert_array_equal(read_seq(st, 0), [1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(read_seq(st, 1), [1, 2, 3, 4, 5, 6, 70])
  np.testing.assert_array_equal(read_seq(st, 1, "k")[:, 0, 0], [0, 1, 2, 3, 4, 5, 70])
  np.testing.assert_array_equal(read_seq(st, 0, "k")[:, 0, 0], [0, 1, 2, 3, 4, 5])
  assert int(st.stats.cow_copies) == 1
  # Releasing both frees everything.
  st = release(st, jnp.array([0, 1, 1, -1]), config=CFG)
  assert int(st.meta.ref_count.sum()) == 0 and int(st.meta.ref_count.min()) == 0


def test_fork_into_live_sequence_is_flagged_and_skipped():
  _, st = plan_step(kvjax.init(CFG), jnp.array([0, 1]), jnp.ones((2, 3), jnp.int32),
                    jnp.array([3, 3]), config=CFG)
  st2 = fork(st, jnp.array([0]), jnp.array([1]), config=CFG)
  assert int(st2.status) == kvjax.BAD_INPUT
  np.testing.assert_array_equal(st2.meta.ref_count, st.meta.ref_count)


def test_eviction_takes_free_pages_first_then_least_recently_used_cached():
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=4,
                          max_seqs=2, max_pages_per_seq=4)
  st = kvjax.init(cfg)
  # Pages 0, 1, 2 hold cached (hashed) content, unreferenced, last used at 5, 2, 9.
  meta = st.meta.replace(
      block_hash=st.meta.block_hash.at[:3].set(jnp.array([[1, 1], [2, 2], [3, 3]], jnp.uint32)),
      last_access=jnp.array([5, 2, 9, 0], jnp.int32), filled=jnp.array([2, 2, 2, 0], jnp.int32))
  st = st.replace(meta=meta, clock=jnp.array(10, jnp.int32))
  _, st = plan_step(st, jnp.array([0]), jnp.ones((1, 6), jnp.int32), jnp.array([6]), config=cfg)
  np.testing.assert_array_equal(st.page_table[0, :3], [3, 1, 0])  # free page, then oldest
  assert int(st.stats.evictions) == 2
  # Evicted content is forgotten: the pages now hold (and are hashed by) the new blocks.
  assert not np.any(np.all(np.asarray(st.meta.block_hash[:2]) == [[2, 2], [1, 1]], axis=-1))
  np.testing.assert_array_equal(np.asarray(st.meta.tokens)[[3, 1, 0]].reshape(-1), np.ones(6))


def test_plan_step_compiles_once():
  @jax.jit
  @chex.assert_max_traces(n=1)  # same shapes, new values: one trace
  def jitted(st, seq_ids, tokens, num_new):
    return kvjax.plan_step(st, seq_ids, tokens, num_new, config=CFG)

  st = kvjax.init(CFG)
  args = lambda n: (jnp.array([0, 1]), jnp.full((2, 2), n, jnp.int32), jnp.array([n % 3, 1]))
  for n in (1, 2, 3):
    _, st = jitted(st, *args(n))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_pages=0), "num_pages must be a positive int, got 0"),
    (dict(page_size=2.5), "page_size must be a positive int, got 2.5"),
    (dict(num_kv_heads=-1), "num_kv_heads"),
    (dict(dtype="int8"), "dtype must be one of"),
])
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kvjax.CacheConfig(**{**CFG.__dict__, **kwargs})


def test_bad_shapes_and_dtypes_raise_value_error():
  st = kvjax.init(CFG)
  with pytest.raises(ValueError, match=r"seq_ids must be an integer array, got dtype float32"):
    kvjax.plan_step(st, jnp.array([0.0]), jnp.ones((1, 1), jnp.int32), jnp.array([1]), config=CFG)
  with pytest.raises(ValueError, match=r"share the batch size.*tokens \(2, 1\)"):
    kvjax.plan_step(st, jnp.array([0]), jnp.ones((2, 1), jnp.int32), jnp.array([1]), config=CFG)
  with pytest.raises(ValueError, match=r"tokens must have 2 dims, got shape \(3,\)"):
    kvjax.plan_step(st, jnp.array([0]), jnp.ones((3,), jnp.int32), jnp.array([1]), config=CFG)
  other = kvjax.CacheConfig(**{**CFG.__dict__, "max_seqs": 5})
  with pytest.raises(ValueError, match=r"page_table has shape \(3, 4\).*\(5, 4\)"):
    kvjax.plan_step(st, jnp.array([0]), jnp.ones((1, 1), jnp.int32), jnp.array([1]), config=other)
  plan, st = kvjax.plan_step(st, jnp.array([0]), jnp.ones((1, 1), jnp.int32), jnp.array([1]),
                             config=CFG)
  with pytest.raises(ValueError, match=r"x must have shape \(B, T, H, D\) = \(1, 1, 2, 4\).*"
                                       r"\(1, 1, 3, 4\)"):
    kvjax.write(layer(st.k), plan, jnp.ones((1, 1, 3, 4)))
  with pytest.raises(ValueError, match="x must be floating point"):
    kvjax.write(layer(st.k), plan, jnp.ones((1, 1, 2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of the kv heads \(2\)"):
    kvjax.attend(jnp.ones((1, 1, 3, 4)), layer(st.k), layer(st.v), plan)
  with pytest.raises(ValueError, match=r"D = 4 from the pages, got \(1, 1, 2, 8\)"):
    kvjax.attend(jnp.ones((1, 1, 2, 8)), layer(st.k), layer(st.v), plan)
  with pytest.raises(ValueError, match=r"one layer's pages \[P, S, H, D\]"):
    kvjax.write(st.k, plan, jnp.ones((1, 1, 2, 4)))


def test_eviction_follows_the_configured_policy_scores():
  """The cache ranks cached pages with the simulator's scoring function (here: frequency)."""
  from kvjax import policies
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=4,
                          max_seqs=2, max_pages_per_seq=4, eviction="weighted",
                          eviction_params=(("w_age", 0.0), ("w_freq", 1.0), ("w_size", 0.0),
                                           ("w_cost", 0.0), ("w_context", 0.0)))
  st = kvjax.init(cfg)
  meta = st.meta.replace(
      block_hash=st.meta.block_hash.at[:3].set(jnp.array([[1, 1], [2, 2], [3, 3]], jnp.uint32)),
      access_count=jnp.array([5, 1, 3, 0], jnp.int32), filled=jnp.array([2, 2, 2, 0], jnp.int32),
      last_access=jnp.array([9, 9, 9, 0], jnp.int32))
  st = st.replace(meta=meta, clock=jnp.array(10, jnp.int32))
  want = policies.weighted_score(meta, st.clock + 1, policies.make_params(
      "weighted", **dict(cfg.eviction_params)))
  order = [int(p) for p in np.argsort(-np.asarray(want), kind="stable")]
  assert order[:3] == [3, 1, 2]  # the free page, then the least used cached ones
  _, st = plan_step(st, jnp.array([0]), jnp.ones((1, 6), jnp.int32), jnp.array([6]), config=cfg)
  np.testing.assert_array_equal(st.page_table[0, :3], order[:3])
  assert int(st.stats.evictions) == 2


def test_oracle_or_unknown_eviction_policy_or_bad_params_are_rejected():
  with pytest.raises(ValueError, match="eviction='min' is an offline oracle"):
    kvjax.CacheConfig(**{**CFG.__dict__, "eviction": "min"})
  with pytest.raises(ValueError, match="policy must be one of"):
    kvjax.CacheConfig(**{**CFG.__dict__, "eviction": "clock-pro"})
  assert kvjax.CacheConfig(**{**CFG.__dict__, "eviction": "lfu"}).eviction == "lfu"
  with pytest.raises(ValueError, match="parameter w_age must be in"):
    kvjax.CacheConfig(**{**CFG.__dict__, "eviction": "weighted",
                         "eviction_params": (("w_age", -1.0),)})
