"""Attention-aware page dropping (kvjax.drop): selection, bookkeeping, and the model path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import drop
from kvjax.models import llama
from kvjax.cache.attend import attend
from kvjax.prefix.index import index_lookup

CFG = llama.LlamaConfig.small()


@pytest.fixture(scope="module")
def params():
  return llama.init_params(CFG, jax.random.key(0))


# ----------------------------------------------------------------------------- selection


def _numpy_select(mass, num_pages, budget, sink, recent, mode):
  """Reference: per row, the columns to drop (a sorted list)."""
  out = []
  for row, n in zip(mass, num_pages):
    cand = list(range(sink, max(n - recent, sink)))
    k = max(n - budget, 0)
    if mode == "h2o":
      cand.sort(key=lambda j: (row[j], j))
    out.append(sorted(cand[:k]))
  return out


@pytest.mark.parametrize("mode", ["h2o", "streaming"])
def test_select_drops_matches_numpy_on_hand_made_mass(mode):
  rng = np.random.default_rng(0)
  for case in range(40):
    b, m = 3, 12
    sink, recent = int(rng.integers(0, 3)), int(rng.integers(1, 4))
    budget = sink + recent + 1 + int(rng.integers(0, 4))
    num_pages = rng.integers(0, m + 1, b)
    mass = rng.integers(0, 5, (b, m)).astype(np.float32)   # small ints: many ties
    got = np.asarray(drop.select_drops(jnp.asarray(mass), jnp.asarray(num_pages), budget=budget,
                                       sink_pages=sink, recent_pages=recent, mode=mode))
    want = _numpy_select(mass, num_pages, budget, sink, recent, mode)
    for r in range(b):
      assert np.flatnonzero(got[r]).tolist() == want[r], (case, r, mass[r], num_pages[r])
      kept = [j for j in range(num_pages[r]) if not got[r, j]]
      assert len(kept) == min(num_pages[r], budget)
      assert all(j in kept for j in range(min(sink, num_pages[r])))               # sinks
      assert all(j in kept for j in range(max(num_pages[r] - recent, 0), num_pages[r]))


def test_h2o_keeps_heavy_hitters_and_streaming_the_window():
  mass = jnp.array([[0., 1., 9., 2., 8., 0., 0., 0.]])
  n = jnp.array([8])
  h2o = drop.select_drops(mass, n, budget=5, sink_pages=1, recent_pages=2, mode="h2o")
  assert np.flatnonzero(np.asarray(h2o[0])).tolist() == [1, 3, 5]      # 2 and 4 are heavy
  st = drop.select_drops(mass, n, budget=5, sink_pages=1, recent_pages=2, mode="streaming")
  assert np.flatnonzero(np.asarray(st[0])).tolist() == [1, 2, 3]


def _cfg(**kw):
  base = dict(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=24, max_seqs=4,
              max_pages_per_seq=8)
  base.update(kw)
  return kvjax.CacheConfig(**base)


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=3, sink_pages=1, recent_pages=2), "budget"),
    (dict(budget=5, sink_pages=-1, recent_pages=2), "sink_pages"),
    (dict(budget=5, sink_pages=1, recent_pages=0), "recent_pages"),
    (dict(budget=-1, sink_pages=0, recent_pages=1), "budget"),
    (dict(budget=4, sink_pages=1, recent_pages=1, mode="lru"), "mode"),
])
def test_drop_pages_rejects_bad_arguments(kwargs, match):
  st = drop.enable(kvjax.init(_cfg()))
  with pytest.raises(ValueError, match=match):
    drop.drop_pages(st, **kwargs, config=_cfg())


def test_drop_mode_must_be_enabled_and_rejects_staging():
  with pytest.raises(ValueError, match="drop mode"):
    drop.drop_pages(kvjax.init(_cfg()), budget=3, sink_pages=1, recent_pages=1, config=_cfg())
  staged = _cfg(head_dim=32, key_quant=kvjax.QuantSpec(bits=2, residual=4),
                value_quant=kvjax.QuantSpec(bits=2, residual=4))
  with pytest.raises(ValueError, match="staging"):
    drop.enable(kvjax.init(staged))


def test_drop_pages_compacts_table_and_moves_positions():
  cfg = _cfg()
  st = drop.enable(kvjax.init(cfg))
  _, st = kvjax.plan_step(st, jnp.array([0]), jnp.arange(13)[None], jnp.array([13]), config=cfg)
  table = np.asarray(st.page_table[0]).copy()                          # 7 pages, last partial
  mass = np.array([5., 0., 7., 1., 6., 0., 0., 0.], np.float32)
  st = st.replace(drop=st.drop.replace(mass=jnp.asarray(mass)[None].repeat(4, 0),
                                       owner=st.page_table))
  st = jax.jit(drop.drop_pages, static_argnames=("budget", "sink_pages", "recent_pages",
                                                 "mode", "config"))(
      st, budget=5, sink_pages=1, recent_pages=2, mode="h2o", config=cfg)
  keep = [0, 2, 4, 5, 6]                                               # drops columns 1 and 3
  assert np.asarray(st.page_table[0]).tolist() == table[keep].tolist() + [-1] * 3
  assert int(st.seq_lens[0]) == 13 - 4 and int(st.drop.dropped[0]) == 4
  assert int(st.drop.pages_dropped) == 2
  np.testing.assert_array_equal(np.asarray(st.drop.mass[0, :5]), mass[keep])
  ref = np.asarray(st.meta.ref_count)
  assert ref[table[[1, 3]]].tolist() == [0, 0] and ref[table[keep]].tolist() == [1] * 5
  # the next token goes into the partial last page, at compacted position 9
  plan, st = kvjax.plan_step(st, jnp.array([0]), jnp.array([[99]]), jnp.array([1]), config=cfg)
  assert plan.positions.tolist() == [[9]] and int(plan.slots[0, 0]) == table[6] * 2 + 1


def test_h2o_mean_scores_by_share_of_attention():
  cfg = _cfg()
  st = drop.enable(kvjax.init(cfg))
  _, st = kvjax.plan_step(st, jnp.array([0]), jnp.arange(11)[None], jnp.array([11]), config=cfg)
  mass = np.array([[9., 6., 2., 3., 1., 1., 0., 0.]] * 4, np.float32)   # old pages: big sums
  seen = np.array([[90., 60., 10., 30., 2., 2., 0., 0.]] * 4, np.float32)  # ... small shares
  st = st.replace(drop=st.drop.replace(mass=jnp.asarray(mass), seen=jnp.asarray(seen),
                                       owner=st.page_table))
  table = np.asarray(st.page_table[0])
  kw = dict(budget=4, sink_pages=1, recent_pages=1, config=cfg)
  h2o = drop.drop_pages(st, mode="h2o", **kw)
  mean = drop.drop_pages(st, mode="h2o_mean", **kw)
  # columns 1..4 compete for 2 heavy slots: sums keep 1 and 3, shares (.1 .2 .1 .5) keep 2 and 4
  assert np.asarray(h2o.page_table[0, :4]).tolist() == table[[0, 1, 3, 5]].tolist()
  assert np.asarray(mean.page_table[0, :4]).tolist() == table[[0, 2, 4, 5]].tolist()
  np.testing.assert_array_equal(np.asarray(mean.drop.seen[0, :4]), seen[0, [0, 2, 4, 5]])


# ----------------------------------------------------------------------------- property


def _check_invariants(st, cfg, hist):
  """Ref counts, compact tables, free pages, index <-> hashes, and no hash after a hole."""
  s_, p_ = cfg.page_size, cfg.num_pages
  table = np.asarray(st.page_table)
  lens = np.asarray(st.seq_lens)
  dropped = np.asarray(st.drop.dropped)
  ref = np.asarray(st.meta.ref_count)
  filled = np.asarray(st.meta.filled)
  hashes = np.asarray(st.meta.block_hash)
  hashed = np.any(hashes != 0, axis=1)
  counts = np.bincount(table[table >= 0], minlength=p_)
  np.testing.assert_array_equal(ref, counts, err_msg="ref_count != holders in page tables")
  for r in range(cfg.max_seqs):
    n = -(-lens[r] // s_)
    assert np.all(table[r, :n] >= 0) and np.all(table[r, n:] == -1), (r, table[r], lens[r])
    assert len(set(table[r, :n].tolist())) == n
    assert lens[r] + dropped[r] == hist[r]["logical"], r
    assert len(hist[r]["pos"]) == lens[r]
    assert np.all(filled[table[r, :max(n - 1, 0)]] == s_)
    for j in range(n):
      page = table[r, j]
      end = hist[r]["pos"][min((j + 1) * s_, lens[r]) - 1] + 1
      if hashed[page] and hist[r]["first_drop"] is not None:
        # a hashed page was complete before the sequence's first drop (full context)
        assert end <= hist[r]["first_drop"], (r, j, page, end, hist[r]["first_drop"])
  free = (ref == 0) & ~hashed
  assert np.all(filled[free] == 0)
  idx = np.flatnonzero(hashed)
  if idx.size:
    found = np.asarray(index_lookup(st.index, jnp.asarray(hashes[idx])))
    np.testing.assert_array_equal(found, idx, err_msg="hashed page not in the index")


def _after_drop(before_table, st, hist, s_):
  table = np.asarray(st.page_table)
  lens = np.asarray(st.seq_lens)
  for r, h in enumerate(hist):
    by_page = {}
    for j, page in enumerate(before_table[r]):
      if page >= 0:
        by_page[page] = h["pos"][j * s_:(j + 1) * s_]
    new = [x for page in table[r] if page >= 0 for x in by_page[page]]
    if len(new) != len(h["pos"]) and h["first_drop"] is None:
      h["first_drop"] = h["logical"]
    h["pos"] = new
    assert len(new) == lens[r]


_drop_jit = jax.jit(drop.drop_pages, static_argnames=("budget", "sink_pages", "recent_pages",
                                                      "mode", "config"))


def test_drop_pages_keeps_refcounts_tables_and_prefix_index_consistent():
  cfg = _cfg(num_pages=40, max_seqs=4, max_pages_per_seq=10)
  s_ = cfg.page_size
  plan_jit = jax.jit(kvjax.plan_step, static_argnames="config")
  attach_jit = jax.jit(kvjax.attach_prefix, static_argnames="config")
  rng = np.random.default_rng(1)
  prompt = rng.integers(0, 50, 16).astype(np.int32)
  for case in range(4):   # each mode once, h2o again with a sink page (each case compiles anew)
    st = drop.enable(kvjax.init(cfg))
    hist = [dict(logical=0, pos=[], first_drop=None) for _ in range(cfg.max_seqs)]
    mode = ("h2o", "streaming", "h2o_mean")[case % 3]
    budget, sink, recent = 5 + case % 3, case % 2, 1 + case % 3
    for step in range(14):
      op = rng.integers(0, 10)
      live = [r for r in range(cfg.max_seqs) if hist[r]["logical"] > 0]
      empty = [r for r in range(cfg.max_seqs) if hist[r]["logical"] == 0]
      if op == 0 and live and empty:                                   # fork
        src, dst = int(rng.choice(live)), int(rng.choice(empty))
        st = kvjax.fork(st, jnp.array([src]), jnp.array([dst]), config=cfg)
        hist[dst] = dict(logical=hist[src]["logical"], pos=list(hist[src]["pos"]),
                         first_drop=hist[src]["first_drop"])
      elif op == 1 and live:                                           # release
        r = int(rng.choice(live))
        st = kvjax.release(st, jnp.array([r]), config=cfg)
        hist[r] = dict(logical=0, pos=[], first_drop=None)
      elif op == 2 and empty:                                          # attach the shared prompt
        r = int(rng.choice(empty))
        cached, st = attach_jit(st, jnp.array([r]), jnp.asarray(prompt)[None],
                                jnp.array([16]), config=cfg)
        c = int(cached[0])
        hist[r] = dict(logical=c, pos=list(range(c)), first_drop=None)
      else:                                                            # write to every sequence
        ids = np.arange(cfg.max_seqs, dtype=np.int32)
        num = rng.integers(1, 6, cfg.max_seqs).astype(np.int32)
        toks = np.zeros((cfg.max_seqs, 8), np.int32)
        for r in range(cfg.max_seqs):
          lo, n = hist[r]["logical"], num[r]
          shared = lo + n <= len(prompt) and rng.random() < 0.7   # the prompt: cacheable pages
          toks[r, :n] = prompt[lo:lo + n] if shared else rng.integers(0, 50, n)
        st, offset = drop.begin_step(st, jnp.asarray(ids))
        plan, st = plan_jit(st, jnp.asarray(ids), jnp.asarray(toks), jnp.asarray(num), config=cfg)
        assert int(st.status) == 0, kvjax.status_names(int(st.status))
        np.testing.assert_array_equal(np.asarray(plan.positions[:, 0] + offset),
                                      [h["logical"] for h in hist])
        for r in range(cfg.max_seqs):
          hist[r]["pos"] += list(range(hist[r]["logical"], hist[r]["logical"] + num[r]))
          hist[r]["logical"] += int(num[r])
        mass = jnp.asarray(rng.random((cfg.max_seqs, cfg.max_pages_per_seq)), jnp.float32)
        st = drop.accumulate(st, plan, mass)
      before = np.asarray(st.page_table).copy()
      st = _drop_jit(st, budget=budget, sink_pages=sink, recent_pages=recent, mode=mode,
                     config=cfg)
      _after_drop(before, st, hist, s_)
      _check_invariants(st, cfg, hist)
    assert int(st.drop.pages_dropped) > 0


# ----------------------------------------------------------------------------- attention mass


def test_attend_with_mass_matches_numpy_softmax_and_keeps_the_output():
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=8, page_size=4, num_pages=12,
                          max_seqs=2, max_pages_per_seq=4)
  rng = np.random.default_rng(3)
  st = kvjax.init(cfg)
  plan, st = kvjax.plan_step(st, jnp.array([0, 1]), jnp.zeros((2, 7), jnp.int32),
                             jnp.array([7, 5]), config=cfg)
  layer = lambda p: jax.tree.map(lambda a: a[0], p)  # noqa: E731
  k = rng.normal(size=(2, 7, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 7, 2, 8)).astype(np.float32)
  q = rng.normal(size=(2, 7, 4, 8)).astype(np.float32)
  kp = kvjax.write(layer(st.k), plan, jnp.asarray(k))
  vp = kvjax.write(layer(st.v), plan, jnp.asarray(v))
  plain = attend(jnp.asarray(q), kp, vp, plan)
  assert plain.mass is None
  out1, mass = attend(jnp.asarray(q), kp, vp, plan, with_mass=True)
  np.testing.assert_array_equal(np.asarray(plain.out), np.asarray(out1))
  lens = [7, 5]
  for b in range(2):
    want = np.zeros(16)
    for t in range(lens[b]):
      for h in range(4):
        s = k[b, :t + 1, h // 2] @ q[b, t, h] / math.sqrt(8)
        w = np.exp(s - s.max())
        want[:t + 1] += w / w.sum()
    table = np.asarray(plan.page_table[b])
    got = np.asarray(mass[b])
    per_page = want.reshape(4, 4).sum(1)
    np.testing.assert_allclose(got, per_page, atol=1e-5)
    assert np.all(got[table < 0] == 0)


# ----------------------------------------------------------------------------- the model


def _numpy_masked_forward(p, tokens, visible, cfg):
  """float64 reference: token t at position t attends to the tokens ``visible[t]`` marks."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  lp = p.layers

  def norm(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_eps) * w

  def rope(x):
    d = x.shape[-1]
    z = x[..., :d // 2] + 1j * x[..., d // 2:]
    theta = cfg.rope_base ** (-np.arange(d // 2) * 2.0 / d)
    z = z * np.exp(1j * np.arange(x.shape[0])[:, None, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)

  t, d, g = len(tokens), cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
  x = p.embed[tokens]
  for layer in range(cfg.num_layers):
    h = norm(x, lp.attn_norm[layer])
    q = rope((h @ lp.wq[layer]).reshape(t, cfg.num_heads, d))
    k = rope((h @ lp.wk[layer]).reshape(t, cfg.num_kv_heads, d))
    v = (h @ lp.wv[layer]).reshape(t, cfg.num_kv_heads, d)
    attn = np.zeros((t, cfg.num_heads, d))
    for head in range(cfg.num_heads):
      s = q[:, head] @ k[:, head // g].T / math.sqrt(d)
      s = np.where(visible, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      attn[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, head // g]
    x = x + attn.reshape(t, -1) @ lp.wo[layer]
    h = norm(x, lp.mlp_norm[layer])
    x = x + (h @ lp.w_gate[layer] / (1 + np.exp(-(h @ lp.w_gate[layer])))
             * (h @ lp.w_up[layer])) @ lp.w_down[layer]
  return norm(x, p.final_norm) @ p.embed.T


@pytest.mark.parametrize("mode", ["h2o", "streaming"])
def test_decode_after_dropping_equals_forward_over_the_kept_tokens(params, mode):
  cc = CFG.cache_config(page_size=4, num_pages=24, max_seqs=3, max_pages_per_seq=8)
  s_ = cc.page_size
  budget, sink, recent = 5, 1, 2
  rng = np.random.default_rng(5)
  total = [40, 33]                                     # logical lengths: past the 32-token table
  seqs = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in total]
  hist = [dict(logical=0, pos=[], first_drop=None) for _ in range(cc.max_seqs)]
  visible = [np.zeros((n, n), bool) for n in total]
  got = [np.zeros((n, CFG.vocab_size)) for n in total]
  cache = drop.enable(kvjax.init(cc))
  schedule = [(8, [8, 7]), (8, [8, 8])] + [(1, [1, 1])] * 24
  for t, num in schedule:
    num = [min(n, total[r] - hist[r]["logical"]) for r, n in enumerate(num)]
    toks = np.zeros((2, t), np.int32)
    for r in range(2):
      lo = hist[r]["logical"]
      toks[r, :num[r]] = seqs[r][lo:lo + num[r]]
    ids = np.array([r if num[r] else -1 for r in range(2)], np.int32)
    logits, cache = llama.decode_step(params, cache, jnp.asarray(toks), jnp.asarray(ids),
                                      jnp.asarray(num, np.int32), config=CFG, cache_config=cc)
    assert int(cache.status) == 0
    for r in range(2):
      lo = hist[r]["logical"]
      new = list(range(lo, lo + num[r]))
      hist[r]["pos"] += new
      hist[r]["logical"] += num[r]
      for i, p in enumerate(new):
        visible[r][p, [x for x in hist[r]["pos"] if x <= p]] = True
        got[r][p] = np.asarray(logits[r, i])
    before = np.asarray(cache.page_table).copy()
    cache = _drop_jit(cache, budget=budget, sink_pages=sink, recent_pages=recent, mode=mode,
                      config=cc)
    _after_drop(before, cache, hist, s_)
    assert all(len(h["pos"]) <= budget * s_ for h in hist)
  assert int(cache.drop.pages_dropped) >= 8
  for r in range(2):
    assert hist[r]["logical"] == total[r]
    want = _numpy_masked_forward(params, seqs[r], visible[r], CFG)
    np.testing.assert_allclose(got[r], want, atol=2e-4, rtol=2e-4, err_msg=f"row {r}")
    # and tokens were really dropped: a decode query sees the budget plus its own token
    assert visible[r][-1].sum() <= budget * s_ + 1 < total[r]


def test_drop_mode_without_drops_matches_the_default_path(params):
  cc = CFG.cache_config(page_size=4, num_pages=16, max_seqs=2, max_pages_per_seq=8)
  toks = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 6)), jnp.int32)
  ids, num = jnp.array([0, 1]), jnp.array([6, 4])
  a, ca = llama.decode_step(params, kvjax.init(cc), toks, ids, num, config=CFG, cache_config=cc)
  b, cb = llama.decode_step(params, drop.enable(kvjax.init(cc)), toks, ids, num, config=CFG,
                            cache_config=cc)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(ca.page_table), np.asarray(cb.page_table))
  # every decode/prefill query spreads a mass of num_heads per layer over the pages
  np.testing.assert_allclose(np.asarray(cb.drop.mass).sum(1),
                             np.array([6, 4]) * CFG.num_heads * CFG.num_layers, rtol=1e-5)


def test_release_and_fork_keep_the_drop_fields():
  """The ordinary kvjax.release / kvjax.fork keep a drop-mode cache's rows in step."""
  cfg = _cfg()
  st = drop.enable(kvjax.init(cfg))
  plan, st = kvjax.plan_step(st, jnp.array([0]), jnp.arange(13)[None], jnp.array([13]),
                             config=cfg)
  st = drop.accumulate(st, plan, jnp.arange(1.0, 9.0)[None])
  st = drop.drop_pages(st, budget=4, sink_pages=1, recent_pages=2, mode="streaming", config=cfg)
  assert int(st.drop.dropped[0]) == 6
  d0 = st.drop
  st = kvjax.fork(st, jnp.array([0]), jnp.array([2]), config=cfg)
  assert np.asarray(st.drop.dropped).tolist() == [6, 0, 6, 0]
  for f in ("mass", "seen", "owner"):            # the fork's rows are the source's
    np.testing.assert_array_equal(np.asarray(getattr(st.drop, f))[2], np.asarray(getattr(d0, f))[0])
  assert int(drop.begin_step(st, jnp.array([2]))[1][0]) == 6
  # a skipped pair (the destination is live) copies nothing
  st = kvjax.fork(st, jnp.array([2]), jnp.array([0]), config=cfg)
  assert np.asarray(st.drop.dropped).tolist() == [6, 0, 6, 0]
  st = kvjax.release(st, jnp.array([0]), config=cfg)
  assert np.asarray(st.drop.dropped).tolist() == [0, 0, 6, 0]
  assert np.all(np.asarray(st.drop.mass)[0] == 0) and np.all(np.asarray(st.drop.owner)[0] == -1)
  assert int(st.drop.pages_dropped) == int(d0.pages_dropped)   # a counter: never reset
  st = kvjax.release(st, jnp.array([2]), config=cfg)
  st, off = drop.begin_step(st, jnp.array([2, -1]))
  assert off.tolist() == [0, 0] and int(st.drop.dropped[2]) == 0
  assert not hasattr(drop, "release") and not hasattr(drop, "fork")

