"""A non-finite value in one place of the cache never reaches another sequence.

Masked key positions (another sequence's pages, unused pages, stale slots of a
reused page, page 0 read for unused page-table columns, stale rows of the
staging ring and the sink) get softmax weight 0, and ``0 * nan = nan``: every
attention path must *select* them out. Each test builds a cache of three
sequences, fills everything that rows 1 and 2 may not see with NaN or inf
(data, scales, zeros, ring, sink; sequence 0 owns page 0 and is poisoned
whole), runs one step and checks that rows 1 and 2 give exactly what they give
on the clean cache (the same bits), and that this equals a float64 numpy
attention over the keys and values the clean pages hold (gathered and
dequantized by ``kvjax.cache.dense_pages``; a prefill chunk through the staging
ring is checked bit for bit against the clean cache only, its causal two-view
reference being test_quant_cache's).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import sharding
from kvjax.kernels import ops
from kvjax.kernels import paged_attention as pa
from kvjax import layout
from kvjax.cache.attend import dense_pages
from kvjax.cache.attend import attend
from kvjax.cache.attend import grouped_attention
from kvjax.cache.attend import write_attend
from kvjax.cache.write import sink_rows
from kvjax.cache.write import stage_rows
from kvjax.layout.pages import pool_only
from kvjax.layout.spec import QuantSpec

S, H, HQ, D = 4, 2, 4, 32   # page size, kv heads, query heads, head_dim
LENS0 = (8, 6, 3)           # sequence 0 (pages 0 and 1, poisoned whole); 1 and 2 checked
PREFILL = ((4, 4, 3), (4, 2, 0))   # LENS0 in two chunks of 4
R = 4                       # residual window of the staged specs


def _window(specs):
  return tuple(QuantSpec(**{**s.__dict__, "residual": R}) if s.residual else s for s in specs)


SPECS = {
    "f32": ("float32", QuantSpec(), QuantSpec()),
    "bf16": ("bfloat16", QuantSpec(), QuantSpec()),
    "f16": ("float16", QuantSpec(), QuantSpec()),
    "int8": ("float32", *layout.PRESETS["int8"]),
    "fp8": ("float32", *layout.PRESETS["fp8"]),
    "int4": ("float32", *layout.PRESETS["int4-kivi"]),     # bf16 scales; K per channel: a ring
    "int2-staged": ("float32", *_window(layout.PRESETS["int2-kivi-r128"])),   # window + ring
    "int2-sink": ("bfloat16", *_window((   # int2-kmin-r128-s1 with an f16 key minimum
        QuantSpec(**{**layout.PRESETS["int2-kmin-r128-s1"][0].__dict__, "zero_dtype": "float16"}),
        layout.PRESETS["int2-kmin-r128-s1"][1]))),
}


def _config(name):
  dtype, kspec, vspec = SPECS[name]
  return kvjax.CacheConfig(num_layers=1, num_kv_heads=H, head_dim=D, page_size=S,
                           num_pages=16, max_seqs=3, max_pages_per_seq=4, dtype=dtype,
                           key_quant=kspec, value_quant=vspec)


def _rand(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _layer(pages):
  return jax.tree.map(lambda a: a[0], pages)


# Plans depend on the page geometry only, not on dtype or spec: planned once for all specs
# (plan_step's compile is most of this file's time).
_plan = jax.jit(functools.partial(kvjax.plan_step, config=_config("f32")))


@functools.lru_cache(maxsize=None)
def _plans():
  """``(plans of the two T = 4 chunks that write LENS0, the state after them)``."""
  state, plans = kvjax.init(_config("f32")), []
  for n in PREFILL:
    plan, state = _plan(state, jnp.arange(3), jnp.zeros((3, 4), jnp.int32), jnp.array(n))
    plans.append(plan)
  table = np.asarray(state.page_table)
  assert tuple(np.asarray(state.seq_lens)) == LENS0
  assert table[0, 0] == 0 and 0 not in table[1:], "sequence 0 must own page 0"
  assert (table[1:] == -1).any(), "rows 1 and 2 need unused columns (read as page 0)"
  return plans, state


@functools.lru_cache(maxsize=None)
def _step_plan(t, num_new):
  """The plan of a T = t step of rows 0, 1, 2 with ``num_new`` tokens after the prefill."""
  _, state = _plans()
  plan, _ = _plan(state, jnp.arange(3), jnp.zeros((3, t), jnp.int32), jnp.array(num_new))
  return plan


def _with_floor(plan, cfg):   # staged specs read plan.fold_floor (0: nothing attached)
  if layout.needs_staging(cfg.key_quant, cfg.value_quant):
    return plan.replace(fold_floor=jnp.zeros((3,), jnp.int32))
  return plan


@functools.partial(jax.jit, static_argnames="cfg")
def _fill(plans, *, cfg):
  """One layer's K and V pages holding sequences 0, 1, 2 (``LENS0`` random tokens)."""
  state = kvjax.init(cfg)
  k, v = _layer(state.k), _layer(state.v)
  for i, plan in enumerate(plans):
    _, k, v, _ = write_attend(_rand(1 + i, (3, 4, HQ, D)), _rand(3 + i, (3, 4, H, D)),
                              _rand(5 + i, (3, 4, H, D)), k, v, _with_floor(plan, cfg))
  return k, v


def _prefilled(cfg):
  """``(k_pages, v_pages)`` of one layer after the prefill of ``LENS0``."""
  return _fill(_plans()[0], cfg=cfg)


def _poison_array(a, live, value):
  """``a`` with every element outside ``live`` (broadcast on leading axes) set to ``value``
  (floating arrays only: integer codes and log8 scales cannot hold a non-finite value)."""
  if not jnp.issubdtype(a.dtype, jnp.floating):
    return a
  x = np.array(a)
  live = live.reshape(live.shape + (1,) * (x.ndim - live.ndim))
  x[...] = np.where(np.broadcast_to(live, x.shape), x, np.asarray(value).astype(x.dtype))
  return jnp.asarray(x, a.dtype)


def poisoned(k, v, cfg, value, table, lens):
  """``k``, ``v`` pages (all layers, or one: the page axis is the first that has P entries)
  with everything rows 1 and 2 may not read (``table``, ``lens``) set to ``value``."""
  table, lens = np.asarray(table), np.asarray(lens)
  p_ = cfg.num_pages
  live_slot = np.zeros((p_, S), bool)      # pool slots holding a token of sequence 1 or 2
  live_page = np.zeros((p_,), bool)        # pool pages read (folded) by sequence 1 or 2
  ns = layout.staging_pages(cfg.key_quant, cfg.value_quant, S)
  live_ring = np.zeros((3, max(ns, 1), S), bool)
  residual = layout.residual_tokens(cfg.key_quant, cfg.value_quant)
  for r in (1, 2):
    first = int(layout.first_staged_page(lens[r], residual, S)) if ns else 10 ** 9
    for j, page in enumerate(table[r]):
      n = min(max(lens[r] - j * S, 0), S)
      if page < 0 or n == 0:
        continue
      live_slot[page, :n] = True
      if j < first:
        live_page[page] = True
      else:
        live_ring[r, j % ns, :n] = True
  live_sink = np.arange(layout.sink_tokens(cfg.key_quant, cfg.value_quant))[None, :] < np.array(
      [0, lens[1], lens[2]])[:, None]

  def fix(pages):
    lead = (None,) * (pages.data.ndim - 4)   # a leading layer axis, or none

    def pool(a):
      per_slot = a.shape[len(lead) + 1] == S   # data, per-token scales/zeros: [(L,) P, S, ...]
      return _poison_array(a, (live_slot if per_slot else live_page)[lead], value)

    return pages.replace(
        data=pool(pages.data),
        scale=None if pages.scale is None else pool(pages.scale),
        zero=None if pages.zero is None else pool(pages.zero),
        stage=None if pages.stage is None else _poison_array(pages.stage, live_ring[lead],
                                                             value),
        sink=None if pages.sink is None else _poison_array(pages.sink, live_sink[lead], value))

  return fix(k), fix(v)


def reference(q, k, v, kv_lens, positions):
  """float64 numpy attention of each query over its sequence's keys ``< kv_len, <= position``.

  q ``[B, T, Hq, D]``; k, v ``[B, K, H, D]``; returns ``[B, T, Hq, D]``.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, hq, d = q.shape
  g = hq // k.shape[2]
  out = np.zeros(q.shape)
  for r in range(b):
    for i in range(t):
      n = min(int(kv_lens[r]), int(positions[r, i]) + 1)
      if n <= 0:
        continue
      for hh in range(hq):
        s = k[r, :n, hh // g] @ q[r, i, hh] / np.sqrt(d)
        w = np.exp(s - s.max())
        out[r, i, hh] = (w / w.sum()) @ v[r, :n, hh // g]
  return out


@functools.partial(jax.jit, static_argnames=("fn", "mass"))
def _run(kp, vp, plan, *, fn, mass):
  t = plan.positions.shape[1]
  q, k_new, v_new = _rand(4, (3, t, HQ, D)), _rand(5, (3, t, H, D)), _rand(6, (3, t, H, D))
  if fn == "write_attend":
    out, kp, vp, m = write_attend(q, k_new, v_new, kp, vp, plan, with_mass=mass)
  else:   # write, then attend
    kp, vp = kvjax.write(kp, plan, k_new), kvjax.write(vp, plan, v_new)
    out, m = attend(q, kp, vp, plan, with_mass=mass)
  dense = (dense_pages(kp, plan), dense_pages(vp, plan))   # the reference: what a row may read
  return out.astype(jnp.float32), m, q, dense


def _shard(pages):
  """The pool arrays split on the page axis over 8 devices, ring and sink replicated."""
  mesh = sharding.page_mesh()
  pool = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("pages"))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return pages.replace(**{f: jax.device_put(getattr(pages, f), rep if f in ("stage", "sink")
                                            else pool)
                          for f in ("data", "scale", "zero", "stage", "sink")
                          if getattr(pages, f) is not None})


def _check(name, value, t, num_new, *, fn="write_attend", mass=False, shard=False,
           exact_reference=True):
  """One step of rows 0, 1, 2 with ``num_new`` tokens on clean and on poisoned pages."""
  cfg = _config(name)
  kp, vp = _prefilled(cfg)
  _, state = _plans()
  bad = poisoned(kp, vp, cfg, value, state.page_table, state.seq_lens)
  if shard:
    bad = tuple(_shard(p) for p in bad)
    assert len(bad[0].data.sharding.device_set) == 8
  plan = _with_floor(_step_plan(t, tuple(num_new)), cfg)
  out_bad, mass_bad, _, _ = _run(*bad, plan, fn=fn, mass=mass)
  out, mass_clean, q, (k, v) = _run(kp, vp, plan, fn=fn, mass=mass)
  out_bad, out = np.asarray(out_bad), np.asarray(out)
  assert np.isfinite(out_bad[1:]).all(), f"rows 1, 2 not finite: {out_bad[1:]}"
  # masked positions contribute exactly nothing: the same bits as on the clean cache
  np.testing.assert_array_equal(out_bad[1:], out[1:])
  if mass:
    np.testing.assert_array_equal(np.asarray(mass_bad)[1:], np.asarray(mass_clean)[1:])
  if exact_reference:   # the clean run against numpy over the clean (dequantized) K and V
    want = reference(q, k, v, np.asarray(plan.kv_lens), np.asarray(plan.positions))
    np.testing.assert_allclose(out[1:], want[1:], rtol=2e-5, atol=2e-5)


VALUES = [np.nan, np.inf]
VALUE_IDS = ["nan", "inf"]


@pytest.mark.parametrize("value", VALUES, ids=VALUE_IDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_decode_ignores_poison_outside_the_row(name, value):
  """T = 1 through ``write_attend`` (quantized pages: the kernel's jnp reference)."""
  _check(name, value, 1, (1, 1, 0))


@pytest.mark.parametrize("value", VALUES, ids=VALUE_IDS)
@pytest.mark.parametrize("name", ["f32", "bf16", "f16", "int8", "fp8"])
def test_prefill_chunk_through_attend_ignores_poison(name, value):
  """T = 4 (a padded row too) through ``write`` then ``attend``."""
  _check(name, value, 4, (4, 2, 4), fn="attend")


@pytest.mark.parametrize("name", ["int4", "int2-staged", "int2-sink"])
def test_prefill_chunk_through_the_staging_ring_ignores_poison(name):
  """T = 4 through ``write_attend``'s two views (pages fold during the chunk). The
  causal two-view reference is test_quant_cache's; here: same bits as the clean cache."""
  _check(name, np.nan, 4, (4, 2, 4), exact_reference=False)
  _check(name, np.inf, 1, (1, 1, 1), exact_reference=True)


@pytest.mark.parametrize("name, t", [("f32", 4), ("int8", 1), ("fp8", 4)])
def test_attend_with_mass_ignores_poison(name, t):
  """``attend(with_mass=True)`` (page dropping's path; quantized pages read dense)."""
  _check(name, np.nan, t, (t, t - 1, 1), fn="attend", mass=True)


def test_pages_sharded_over_8_devices_ignore_poison():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets 8 host devices)")
  _check("bf16", np.nan, 4, (4, 2, 4), fn="attend", shard=True)
  _check("int8", np.nan, 1, (1, 1, 1), shard=True)


@jax.jit
def _read(kp, vp, plan):
  """The rows' dense K and V (the reference's input) under a plan that adds no token."""
  return dense_pages(kp, plan), dense_pages(vp, plan)


@pytest.mark.parametrize("name, pages_per_split", [("int8", None), ("int2-sink", 1)])
def test_pallas_kernel_interpret_ignores_poison(name, pages_per_split):
  """The Pallas decode kernel (interpreted on CPU), one program per sequence and split
  per page (flash-decoding: splits past a sequence's pages are empty)."""
  cfg = _config(name)
  clean = _prefilled(cfg)
  plan = _with_floor(_step_plan(1, (0, 0, 0)), cfg)   # reads only, no new token
  _, state = _plans()
  dense = _read(*clean, plan)
  q = _rand(7, (3, HQ, D))
  outs = []
  for kp, vp in (clean, poisoned(*clean, cfg, np.nan, state.page_table, state.seq_lens)):
    outs.append(np.asarray(pa.paged_attention(
        q, pool_only(kp), pool_only(vp), plan.page_table, plan.kv_lens, kp.spec, vp.spec,
        k_stage=stage_rows(kp, plan), v_stage=stage_rows(vp, plan), k_sink=sink_rows(kp, plan),
        v_sink=sink_rows(vp, plan), interpret=True, pages_per_split=pages_per_split)))
  out, out_bad = outs
  assert np.isfinite(out_bad[1:]).all()
  want = reference(q[:, None], *dense, np.asarray(plan.kv_lens), np.full((3, 1), 10 ** 6))[:, 0]
  # online softmax in float32 vs float64: summation order only
  np.testing.assert_allclose(out_bad[1:], want[1:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[1:], want[1:], rtol=1e-5, atol=1e-5)


def test_attend_through_pallas_interpret_ignores_poison():
  """``attend`` with Pallas forced (ops picks the interpreter on CPU)."""
  with ops.pallas_forced(True):
    _check("int8", np.nan, 1, (1, 1, 1))


def test_reference_and_grouped_attention_select_masked_values():
  """Hand-built: the jnp decode reference and ``grouped_attention`` over keys whose masked
  values are NaN give the unmasked result (0 * nan would give nan)."""
  spec = QuantSpec()
  k = jnp.ones((2, 2, 1, 4))
  v = jnp.stack([jnp.full((2, 1, 4), 3.0), jnp.full((2, 1, 4), jnp.nan)])   # page 1: NaN
  out = pa.paged_attention_reference(jnp.ones((1, 1, 4)), kvjax.Pages(data=k),
                                     kvjax.Pages(data=v), jnp.array([[0, -1]]), jnp.array([2]),
                                     spec, spec)
  assert out.tolist() == [[[3.0] * 4]]
  kk, vv = k.reshape(1, 4, 1, 4), v.reshape(1, 4, 1, 4)
  vis = jnp.array([[[True, True, False, False]]])
  assert grouped_attention(jnp.ones((1, 1, 1, 4)), kk, vv, vis).tolist() == [[[[3.0] * 4]]]


@pytest.mark.parametrize("what", ["k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("b", [1, 3])
def test_decode_nonfinite_stays_in_its_kv_head(what, bad, b):
  """Decode (one query per row): a non-finite key or value that a row sees spoils only
  the query heads of its kv head in that row; the row's other heads and the other rows
  equal a float64 reference without it (batch 1 too: XLA:CPU miscompiled a reduction
  at batch 1, docs/ARCHITECTURE.md)."""
  kn, h, g, d = 7, 3, 2, 4
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=s).astype(np.float32) for s in
             ((b, 1, h * g, d), (b, kn, h, d), (b, kn, h, d)))
  lens = np.array([5, 7, 2])[:b]
  vis = np.arange(kn)[None, None, :] < lens[:, None, None]
  ref = np.zeros((b, 1, h * g, d))
  for r in range(b):
    for y in range(h * g):
      s = k[r, :lens[r], y // g].astype(np.float64) @ q[r, 0, y] / np.sqrt(d)
      w = np.exp(s - s.max())
      ref[r, 0, y] = (w / w.sum()) @ v[r, :lens[r], y // g]
  bad_kv = {"k": k.copy(), "v": v.copy()}
  bad_kv[what][0, 3, 1] = bad                                  # row 0, key 3, kv head 1
  got = np.asarray(grouped_attention(jnp.asarray(q), jnp.asarray(bad_kv["k"]),
                                     jnp.asarray(bad_kv["v"]), jnp.asarray(vis)))
  spoiled = np.zeros((b, 1, h * g), bool)
  spoiled[0, 0, g:2 * g] = True
  assert not np.isfinite(got[spoiled]).all()
  np.testing.assert_allclose(got[~spoiled], ref[~spoiled], rtol=1e-5, atol=1e-5)


def test_own_nonfinite_value_stays_in_its_row():
  """A query that attends a non-finite value of its own sequence may be non-finite; the
  other rows are not."""
  kp, vp = _prefilled(_config("f32"))
  _, state = _plans()
  vp = vp.replace(data=vp.data.at[int(state.page_table[1, 0]), 0].set(jnp.nan))
  out = np.asarray(_run(kp, vp, _step_plan(1, (1, 1, 1)), fn="attend", mass=False)[0])
  assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


# ----------------------------------------------------------------------------- end to end


def test_decode_step_logits_ignore_a_poisoned_stale_page():
  """``decode_step`` with random SmolLM2-shaped weights: sequence 0's pages (and page 0,
  which unused page-table columns read) and every stale slot hold NaN in all layers' K
  and V; rows 1 and 2 give the logits of the clean cache, a prefill chunk then a decode."""
  from kvjax.models import LlamaConfig
  from kvjax.models import decode_step
  from kvjax.models import init_params

  mcfg = LlamaConfig.small()
  cc = mcfg.cache_config(page_size=S, num_pages=16, max_seqs=3, max_pages_per_seq=4)
  params = init_params(mcfg, jax.random.key(0))
  rng = np.random.default_rng(3)
  tok = lambda t: jnp.asarray(rng.integers(0, mcfg.vocab_size, (3, t)), jnp.int32)  # noqa: E731
  cache = kvjax.init(cc)
  for n in PREFILL:   # sequence 0 on page 0
    _, cache = decode_step(params, cache, tok(4), jnp.arange(3), jnp.array(n), config=mcfg,
                           cache_config=cc)
  assert int(cache.page_table[0, 0]) == 0 and (np.asarray(cache.page_table[1:]) == -1).any()
  # a chunk with a padded row, then a decode token in the same [B, 4] shape (one compile;
  # T = 1 reaches the same grouped_attention for unquantized pages)
  steps = [(tok(4), jnp.array((4, 3, 2))), (tok(4), jnp.array((1, 1, 1)))]
  bad_k, bad_v = poisoned(cache.k, cache.v, cc, np.nan, cache.page_table, cache.seq_lens)
  logits = {}
  for name, c in (("clean", cache), ("bad", cache.replace(k=bad_k, v=bad_v))):
    c, logits[name] = jax.tree.map(jnp.copy, c), []   # decode_step donates its cache
    for toks, n in steps:
      lg, c = decode_step(params, c, toks, jnp.arange(3), n, config=mcfg, cache_config=cc)
      logits[name].append(np.asarray(lg))
  for (toks, n), good, bad in zip(steps, logits["clean"], logits["bad"]):
    real = np.arange(toks.shape[1])[None, :] < np.asarray(n)[:, None]
    real[0] = False                                    # sequence 0 attends its own NaN
    assert np.isfinite(good[real]).all() and np.isfinite(bad[real]).all()
    np.testing.assert_array_equal(bad[real], good[real])
