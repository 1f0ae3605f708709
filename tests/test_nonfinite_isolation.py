"""A non-finite value in one place of the cache never reaches another sequence.

Masked key positions (another sequence's pages, unused pages, stale slots of a
reused page, page 0 read for unused page-table columns, stale rows of the
staging ring and the sink) get softmax weight 0, and ``0 * nan = nan``: every
attention path must *select* them out. Each test builds a cache of three
sequences, fills everything that rows 1 and 2 may not see with NaN or inf
(data, scales, zeros, ring, sink; sequence 0 owns page 0 and is poisoned
whole), runs one step and checks that rows 1 and 2 give exactly what they give
on the clean cache, and that this equals a float64 numpy attention over the
clean keys and values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import quant
from kvjax import sharding
from kvjax.attention import _dense
from kvjax.attention import attend
from kvjax.attention import write_attend
from kvjax.kernels import ops
from kvjax.kernels import paged_attention as pa
from kvjax.paging import pool_only
from kvjax.paging import sink_rows
from kvjax.paging import stage_rows
from kvjax.quant import QuantSpec

S, H, HQ, D = 4, 2, 4, 32   # page size, kv heads, query heads, head_dim
LENS0 = (8, 6, 3)           # sequence 0 (pages 0 and 1, poisoned whole); 1 and 2 checked
R = 4                       # residual window of the staged specs


def _window(specs):
  return tuple(QuantSpec(**{**s.__dict__, "residual": R}) if s.residual else s for s in specs)


SPECS = {
    "f32": ("float32", QuantSpec(), QuantSpec()),
    "bf16": ("bfloat16", QuantSpec(), QuantSpec()),
    "f16": ("float16", QuantSpec(), QuantSpec()),
    "int8": ("float32", *quant.PRESETS["int8"]),
    "fp8": ("float32", *quant.PRESETS["fp8"]),
    "int4": ("float32", *quant.PRESETS["int4-kivi"]),     # bf16 scales; K per channel: a ring
    "int2-staged": ("float32", *_window(quant.PRESETS["int2-kivi-r128"])),   # window + ring
    "int2-sink": ("bfloat16", *_window((quant._int2_key(sink=1, zero_dtype="float16"),
                                        quant._int2_value(sink=1)))),
}


def _config(name, num_layers=1, **kw):
  dtype, kspec, vspec = SPECS[name]
  return kvjax.CacheConfig(num_layers=num_layers, num_kv_heads=H, head_dim=D, page_size=S,
                           num_pages=16, max_seqs=3, max_pages_per_seq=4, dtype=dtype,
                           key_quant=kspec, value_quant=vspec, **kw)


def _rand(seed, shape, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _layer(pages):
  return jax.tree.map(lambda a: a[0], pages)


def _put_layer(state, k, v):
  put = lambda full, new: full.at[0].set(new)  # noqa: E731
  return state.replace(k=jax.tree.map(put, state.k, k), v=jax.tree.map(put, state.v, v))


@functools.partial(jax.jit, static_argnames="cfg")
def _prefill(cfg):
  state = kvjax.init(cfg)
  t = max(LENS0)
  plan, state = kvjax.plan_step(state, jnp.arange(3), jnp.zeros((3, t), jnp.int32),
                                jnp.array(LENS0), config=cfg)
  _, k, v = write_attend(_rand(1, (3, t, HQ, D)), _rand(2, (3, t, H, D)),
                         _rand(3, (3, t, H, D)), _layer(state.k), _layer(state.v), plan)
  return _put_layer(state, k, v)


def _prefilled(cfg):
  """Sequences 0, 1, 2 written with ``LENS0`` tokens (random K and V)."""
  state = _prefill(cfg)
  table = np.asarray(state.page_table)
  assert table[0, 0] == 0 and 0 not in table[1:], "sequence 0 must own page 0"
  assert (table[1:] == -1).any(), "rows 1 and 2 need unused columns (read as page 0)"
  return state


def _poison_array(a, live, value):
  """``a`` with every element outside ``live`` (broadcast on leading axes) set to ``value``
  (floating arrays only: integer codes and log8 scales cannot hold a non-finite value)."""
  if not jnp.issubdtype(a.dtype, jnp.floating):
    return a
  x = np.array(a)
  live = live.reshape(live.shape + (1,) * (x.ndim - live.ndim))
  x[...] = np.where(np.broadcast_to(live, x.shape), x, np.asarray(value).astype(x.dtype))
  return jnp.asarray(x, a.dtype)


def poisoned(state, cfg, value):
  """``state`` with everything rows 1 and 2 may not read set to ``value`` in all layers."""
  table, lens = np.asarray(state.page_table), np.asarray(state.seq_lens)
  p_ = cfg.num_pages
  live_slot = np.zeros((p_, S), bool)      # pool slots holding a token of sequence 1 or 2
  live_page = np.zeros((p_,), bool)        # pool pages read (folded) by sequence 1 or 2
  ns = quant.staging_pages(cfg.key_quant, cfg.value_quant, S)
  live_ring = np.zeros((3, max(ns, 1), S), bool)
  residual = quant.residual_tokens(cfg.key_quant, cfg.value_quant)
  for r in (1, 2):
    first = int(quant.first_staged_page(lens[r], residual, S)) if ns else 10 ** 9
    for j, page in enumerate(table[r]):
      n = min(max(lens[r] - j * S, 0), S)
      if page < 0 or n == 0:
        continue
      live_slot[page, :n] = True
      if j < first:
        live_page[page] = True
      else:
        live_ring[r, j % ns, :n] = True
  live_sink = np.arange(quant.sink_tokens(cfg.key_quant, cfg.value_quant))[None, :] < np.array(
      [0, lens[1], lens[2]])[:, None]

  def fix(pages):
    def pool(a):
      per_slot = a.shape[2] == S   # data, per-token scales/zeros: [L, P, S, ...]
      return _poison_array(a, (live_slot if per_slot else live_page)[None], value)
    return pages.replace(
        data=pool(pages.data),
        scale=None if pages.scale is None else pool(pages.scale),
        zero=None if pages.zero is None else pool(pages.zero),
        stage=None if pages.stage is None else _poison_array(pages.stage, live_ring[None],
                                                             value),
        sink=None if pages.sink is None else _poison_array(pages.sink, live_sink[None], value))

  return state.replace(k=fix(state.k), v=fix(state.v))


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


@functools.partial(jax.jit, static_argnames=("cfg", "t", "fn", "mass"))
def _run(state, kp, vp, num_new, *, cfg, t, fn, mass):
  plan, _ = kvjax.plan_step(state, jnp.arange(3), jnp.zeros((3, t), jnp.int32), num_new,
                            config=cfg)
  q, k_new, v_new = _rand(4, (3, t, HQ, D)), _rand(5, (3, t, H, D)), _rand(6, (3, t, H, D))
  if fn == "write_attend":
    res = write_attend(q, k_new, v_new, kp, vp, plan, with_mass=mass)
    out, kp, vp = res[:3]
    m = res[3] if mass else None
  else:   # write, then attend
    kp, vp = kvjax.write(kp, plan, k_new), kvjax.write(vp, plan, v_new)
    res = attend(q, kp, vp, plan, with_mass=mass)
    out, m = res if mass else (res, None)
  dense = (_dense(kp, plan), _dense(vp, plan))   # for the reference: what the row may read
  return out.astype(jnp.float32), m, plan, q, dense


def _step(cfg, state, t, num_new, *, fn="write_attend", mass=False, shard=False):
  """One step of rows 0, 1, 2 on ``state``: ``(out, mass or None, plan, q, (k, v) dense)``."""
  kp, vp = _layer(state.k), _layer(state.v)
  if shard:
    mesh = sharding.page_mesh()
    pool = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("pages"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    place = lambda p: p.replace(**{f: jax.device_put(getattr(p, f), pool if f in (  # noqa: E731
        "data", "scale", "zero") else rep) for f in ("data", "scale", "zero", "stage", "sink")
        if getattr(p, f) is not None})
    kp, vp = place(kp), place(vp)
    assert len(kp.data.sharding.device_set) == 8
  out, m, plan, q, dense = _run(state, kp, vp, jnp.array(num_new), cfg=cfg, t=t, fn=fn,
                                mass=mass)
  return np.asarray(out), m, plan, q, dense


def _check(name, value, t, num_new, *, fn="write_attend", mass=False, shard=False,
           exact_reference=True):
  cfg = _config(name)
  clean = _prefilled(cfg)
  bad = poisoned(clean, cfg, value)
  out_bad, mass_bad, _, _, _ = _step(cfg, bad, t, num_new, fn=fn, mass=mass, shard=shard)
  out, mass_clean, plan, q, (k, v) = _step(cfg, clean, t, num_new, fn=fn, mass=mass)
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


@pytest.mark.parametrize("name", ["f32", "int8", "fp8"])
def test_attend_with_mass_ignores_poison(name):
  _check(name, np.nan, 4, (4, 3, 2), fn="attend", mass=True)
  _check(name, np.inf, 1, (1, 1, 1), fn="attend", mass=True)


def test_pages_sharded_over_8_devices_ignore_poison():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (tests/conftest.py sets 8 host devices)")
  _check("bf16", np.nan, 4, (4, 2, 4), fn="attend", shard=True)
  _check("int8", np.nan, 1, (1, 1, 1), shard=True)


@functools.partial(jax.jit, static_argnames="cfg")
def _read_plan(state, *, cfg):
  """A plan that adds no token (rows read their pages) and the rows' dense K and V."""
  plan, _ = kvjax.plan_step(state, jnp.arange(3), jnp.zeros((3, 1), jnp.int32),
                            jnp.zeros((3,), jnp.int32), config=cfg)
  kp, vp = _layer(state.k), _layer(state.v)
  return plan, (_dense(kp, plan), _dense(vp, plan))


@pytest.mark.parametrize("pages_per_split", [None, 1])
@pytest.mark.parametrize("name", ["int8", "int2-sink"])
def test_pallas_kernel_interpret_ignores_poison(name, pages_per_split):
  """The Pallas decode kernel (interpreted on CPU), one program per sequence and split
  per page (flash-decoding: splits past a sequence's pages are empty)."""
  cfg = _config(name)
  clean = _prefilled(cfg)
  plan, dense = _read_plan(clean, cfg=cfg)
  q = _rand(7, (3, HQ, D))
  outs = []
  for st in (clean, poisoned(clean, cfg, np.nan)):
    kp, vp = _layer(st.k), _layer(st.v)
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
  from kvjax.attention import grouped_attention
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


def test_own_nonfinite_value_stays_in_its_row():
  """A query that attends a non-finite value of its own sequence may be non-finite; the
  other rows are not."""
  cfg = _config("f32")
  st = _prefilled(cfg)
  page = int(st.page_table[1, 0])
  st = st.replace(v=st.v.replace(data=st.v.data.at[0, page, 0].set(jnp.nan)))
  out, _, _, _, _ = _step(cfg, st, 1, (1, 1, 1), fn="attend")
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
  tokens = jnp.asarray(rng.integers(0, mcfg.vocab_size, (3, 8)), jnp.int32)
  _, cache = decode_step(params, kvjax.init(cc), tokens, jnp.arange(3), jnp.array(LENS0),
                         config=mcfg, cache_config=cc)
  steps = [(jnp.asarray(rng.integers(0, mcfg.vocab_size, (3, t)), jnp.int32), jnp.array(n))
           for t, n in ((4, (4, 3, 2)), (1, (1, 1, 1)))]
  logits = {}
  for name, c in (("clean", cache), ("bad", poisoned(cache, cc, np.nan))):
    c, logits[name] = jax.tree.map(jnp.copy, c), []   # decode_step donates its cache
    for toks, n in steps:
      lg, c = decode_step(params, c, toks, jnp.arange(3), n, config=mcfg, cache_config=cc)
      logits[name].append(np.asarray(lg))
  for (toks, n), good, bad in zip(steps, logits["clean"], logits["bad"]):
    real = np.arange(toks.shape[1])[None, :] < np.asarray(n)[:, None]
    real[0] = False                                    # sequence 0 attends its own NaN
    assert np.isfinite(bad[real]).all()
    np.testing.assert_array_equal(bad[real], good[real])
